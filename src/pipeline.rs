//! The composition Text2Img(c, u) = Dec(LatentGen(TextEnc(c), u)): text encoding,
//! classifier-free guidance, the scheduler loop seeded from torch's generator, VAE decode.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{read_json, Error, Result};
use crate::latent::schedulers::{self, SchedulerKind, SchedulerOptions};
use crate::latent::unet::UNet;
use crate::rng::BatchGenerator;
use crate::text::clip::ClipTextModel;
use crate::text::tokenizer::ClipTokenizer;
use crate::vae::preview::latent_preview;
use crate::vae::AutoencoderKl;
use crate::weights::folder::{self, ModelFolder};

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `fp16` picks `*.fp16.safetensors`.
    pub variant: Option<String>,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            variant: None,
            device: Device::Cpu,
        }
    }
}

/// One generation request; every field has a default, so callers set only what they need.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance ("" when empty, as diffusers).
    pub negative_prompt: String,
    /// Image i uses seed + i. `None` draws a seed.
    pub seed: Option<u64>,
    /// `None`: the model's default (50 for diffusers-layout folders).
    pub steps: Option<usize>,
    /// `None`: the model's default (7.5 for diffusers-layout folders). <= 1 disables guidance.
    pub guidance_scale: Option<f64>,
    /// `None`: the model folder's own scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// `None`: the U-Net's `sample_size` times the VAE factor.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: usize,
    /// DDIM's eta (0 = deterministic).
    pub eta: f64,
    /// 0: the text encoder's last layer; k: the k-th layer from the end (diffusers' meaning).
    pub clip_skip: usize,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: None,
            steps: None,
            guidance_scale: None,
            scheduler: None,
            width: None,
            height: None,
            num_images: 1,
            eta: 0.0,
            clip_skip: 0,
        }
    }
}

/// Defaults a model folder may carry in `text2img.json` (diffusers ignores the file).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ModelDefaults {
    #[serde(default = "d_steps")]
    pub steps: usize,
    #[serde(default = "d_guidance")]
    pub guidance_scale: f64,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
}

fn d_steps() -> usize {
    50
}
fn d_guidance() -> f64 {
    7.5
}

impl Default for ModelDefaults {
    fn default() -> Self {
        Self {
            steps: d_steps(),
            guidance_scale: d_guidance(),
            scheduler: None,
            width: None,
            height: None,
        }
    }
}

/// What the step callback sees after each scheduler step.
pub struct StepProgress<'a> {
    /// 1-based.
    pub step: usize,
    pub total: usize,
    latents: &'a Tensor,
}

impl StepProgress<'_> {
    /// A cheap RGB preview of image `index` (one pixel per latent): (rgb, width, height).
    pub fn preview(&self, index: usize) -> Result<(Vec<u8>, usize, usize)> {
        latent_preview(&self.latents.get(index)?)
    }
}

/// What a step callback asks the loop to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepControl {
    Continue,
    /// Stop sampling and decode the latents as they are (A1111's "interrupt").
    Finish,
    /// Stop and return `Error::Cancelled`.
    Cancel,
}

/// One 8-bit RGB image and the seed that made it.
#[derive(Clone, Debug)]
pub struct GeneratedImage {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB, 3 bytes per pixel.
    pub rgb: Vec<u8>,
    pub seed: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub text: Duration,
    pub steps: Duration,
    pub decode: Duration,
}

/// The settings a request resolved to (for metadata and logs).
#[derive(Clone, Debug)]
pub struct Resolved {
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    pub width: usize,
    pub height: usize,
}

pub struct Generation {
    pub images: Vec<GeneratedImage>,
    pub resolved: Resolved,
    pub timings: Timings,
    /// Things the user should know (e.g. the part of a prompt that was truncated).
    pub warnings: Vec<String>,
    /// Scheduler steps run: `resolved.steps` unless a callback asked to finish early.
    pub completed_steps: usize,
}

/// A loaded model: load once, serve many requests.
pub struct Pipeline {
    pub name: String,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet,
    pub vae: AutoencoderKl,
    scheduler_config: Value,
    folder_scheduler: SchedulerKind,
    pub defaults: ModelDefaults,
    device: Device,
}

impl Pipeline {
    /// Loads a diffusers-layout folder or a Hugging Face repo id.
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self> {
        let folder = folder::resolve(model, options.variant.as_deref())?;
        Self::load_folder(&folder, options)
    }

    pub fn load_folder(folder: &ModelFolder, options: &LoadOptions) -> Result<Self> {
        let variant = options.variant.as_deref();
        let device = &options.device;
        for (component, class) in [
            ("unet", "UNet2DConditionModel"),
            ("vae", "AutoencoderKL"),
            ("text_encoder", "CLIPTextModel"),
        ] {
            if let Some(found) = folder.class_of(component) {
                if found != class {
                    return Err(Error::config(
                        folder.root.join("model_index.json"),
                        format!("{component} is a `{found}`; only `{class}` is supported (Stable Diffusion 1.x/2.x)"),
                    ));
                }
            }
        }
        let scheduler_path = folder.component("scheduler").join("scheduler_config.json");
        let scheduler_config: Value = read_json(&scheduler_path)?;
        let class = folder
            .class_of("scheduler")
            .map(str::to_string)
            .or_else(|| {
                scheduler_config
                    .get("_class_name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| Error::config(&scheduler_path, "no scheduler class named"))?;
        let folder_scheduler = SchedulerKind::from_diffusers_class(&class, &scheduler_config)?;
        let defaults_path = folder.root.join("text2img.json");
        let defaults = if defaults_path.is_file() {
            read_json(&defaults_path)?
        } else {
            ModelDefaults::default()
        };
        let tokenizer = ClipTokenizer::from_folder(&folder.component("tokenizer"))?;
        let text_encoder = ClipTextModel::load(&folder.component("text_encoder"), variant, device)?;
        let unet = UNet::load(&folder.component("unet"), variant, device)?;
        let vae = AutoencoderKl::load(&folder.component("vae"), variant, device)?;
        Ok(Self {
            name: folder.name.clone(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            folder_scheduler,
            defaults,
            device: device.clone(),
        })
    }

    /// The pixels one latent covers (diffusers' `vae_scale_factor`).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.downsampling_factor()
    }

    /// The scheduler used when a request names none.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.defaults
            .scheduler
            .as_deref()
            .and_then(|s| SchedulerKind::from_cli_name(s).ok())
            .unwrap_or(self.folder_scheduler)
    }

    /// Fills a request's open fields with this model's defaults and checks it.
    pub fn resolve(&self, req: &GenerateRequest) -> Result<Resolved> {
        let f = self.vae_scale_factor();
        let native = self.unet.config.sample_size.map(|s| s * f);
        let width = req.width.or(self.defaults.width).or(native).unwrap_or(512);
        let height = req
            .height
            .or(self.defaults.height)
            .or(native)
            .unwrap_or(512);
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::InvalidRequest(format!(
                    "{name} {v} is not a positive multiple of {f}"
                )));
            }
        }
        let steps = req.steps.unwrap_or(self.defaults.steps);
        if steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        if req.num_images == 0 {
            return Err(Error::InvalidRequest(
                "num_images must be at least 1".into(),
            ));
        }
        let guidance_scale = req.guidance_scale.unwrap_or(self.defaults.guidance_scale);
        if !guidance_scale.is_finite() {
            return Err(Error::InvalidRequest(
                "guidance scale must be a finite number".into(),
            ));
        }
        if !(req.eta.is_finite() && req.eta >= 0.0) {
            return Err(Error::InvalidRequest("eta must be a number >= 0".into()));
        }
        if req.clip_skip >= self.text_encoder.num_layers() {
            return Err(Error::InvalidRequest(format!(
                "clip skip {} must be below the text encoder's {} layers",
                req.clip_skip,
                self.text_encoder.num_layers()
            )));
        }
        Ok(Resolved {
            steps,
            guidance_scale,
            scheduler: req.scheduler.unwrap_or_else(|| self.default_scheduler()),
            width,
            height,
        })
    }

    /// TextEnc: the embeddings of one prompt (1, tokens, dim), warning on truncation.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        clip_skip: usize,
        warnings: &mut Vec<String>,
    ) -> Result<Tensor> {
        let encoded = self.tokenizer.encode_padded(prompt);
        if let Some(cut) = &encoded.truncated {
            warnings.push(format!(
                "the prompt was truncated because CLIP can only handle sequences up to {} tokens; removed: \"{cut}\"",
                self.tokenizer.model_max_length()
            ));
        }
        self.text_encoder.forward(&[encoded.ids], clip_skip)
    }

    /// Runs a request. `on_step` sees each step's progress; returning `false` cancels.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generation> {
        self.generate_controlled(req, &mut |p| {
            if on_step(p) {
                StepControl::Continue
            } else {
                StepControl::Cancel
            }
        })
    }

    /// Runs a request; after each step `on_step` may continue, finish early (decoding the
    /// latents as they are) or cancel.
    pub fn generate_controlled(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
    ) -> Result<Generation> {
        let resolved = self.resolve(req)?;
        let mut timings = Timings::default();
        let mut warnings = Vec::new();
        let n = req.num_images;
        let cfg = resolved.guidance_scale > 1.0;
        let seed = req.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));

        let started = Instant::now();
        let cond = self.encode_prompt(&req.prompt, req.clip_skip, &mut warnings)?;
        let cond = cond.repeat((n, 1, 1))?;
        let context = if cfg {
            // diffusers encodes the negative prompt from the last layer even with clip skip;
            // we do the same so that a seed gives diffusers' image.
            let uncond = self.encode_prompt(&req.negative_prompt, 0, &mut Vec::new())?;
            Tensor::cat(&[&uncond.repeat((n, 1, 1))?, &cond], 0)?
        } else {
            cond
        };
        timings.text = started.elapsed();

        let started = Instant::now();
        // diffusers' pipeline rewrites some scheduler keys before the loop; so do we.
        let config = schedulers::stable_diffusion_pipeline_config(
            resolved.scheduler,
            &self.scheduler_config,
        )?;
        let mut scheduler = schedulers::build(
            resolved.scheduler,
            &config,
            resolved.steps,
            &SchedulerOptions { eta: req.eta },
        )?;
        let f = self.vae_scale_factor();
        let shape = [
            n,
            self.unet.config.in_channels,
            resolved.height / f,
            resolved.width / f,
        ];
        let mut generators = BatchGenerator::consecutive(seed, n);
        let mut latents = (generators.randn(&shape, &self.device)? * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let mut completed_steps = 0;
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let pred = self.unet.forward(&input, t, &context)?;
            let pred = if cfg {
                let uncond = pred.narrow(0, 0, n)?;
                let text = pred.narrow(0, n, n)?;
                (&uncond + ((text - &uncond)? * resolved.guidance_scale)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, &mut generators)?;
            let progress = StepProgress {
                step: i + 1,
                total: timesteps.len(),
                latents: &latents,
            };
            completed_steps = i + 1;
            match on_step(&progress) {
                StepControl::Continue => {}
                StepControl::Finish => break,
                StepControl::Cancel => return Err(Error::Cancelled),
            }
        }
        timings.steps = started.elapsed();

        let started = Instant::now();
        let mut images = Vec::with_capacity(n);
        for (i, image_seed) in generators.seeds().into_iter().enumerate() {
            let z = (latents.narrow(0, i, 1)? / self.vae.config.scaling_factor)?;
            let z = match self.vae.config.shift_factor {
                Some(shift) => (z + shift)?,
                None => z,
            };
            let decoded = self.vae.decode(&z)?;
            images.push(to_rgb8(&decoded.get(0)?, image_seed)?);
        }
        timings.decode = started.elapsed();
        Ok(Generation {
            images,
            resolved,
            timings,
            warnings,
            completed_steps,
        })
    }
}

/// diffusers' postprocess: (x / 2 + 0.5) clamped to [0, 1], times 255, rounded half to even.
pub fn to_rgb8(image: &Tensor, seed: u64) -> Result<GeneratedImage> {
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        return Err(Error::InvalidRequest(format!(
            "the VAE made {c} channels, not 3"
        )));
    }
    let x = ((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let hwc: Vec<f32> = x.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let rgb = hwc
        .iter()
        .map(|v| (v * 255.0).round_ties_even() as u8)
        .collect();
    Ok(GeneratedImage {
        width: w,
        height: h,
        rgb,
        seed,
    })
}

/// Loads a model folder from disk (no hub lookup).
pub fn load_local(path: &Path, options: &LoadOptions) -> Result<Pipeline> {
    Pipeline::load_folder(&ModelFolder::open(path)?, options)
}
