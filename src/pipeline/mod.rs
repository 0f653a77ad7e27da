//! The composition Text2Img((c_1..c_m), u) = Dec(LatentGen((TextEnc_i(c_i))_i, u)): text
//! encoding ([`conditioning`]), classifier-free guidance, the scheduler loop seeded from
//! torch's generator, VAE decode. One text encoder for Stable Diffusion 1.x/2.x, two for
//! SDXL ([`family`]).

pub mod conditioning;
pub mod control;
pub mod convert;
pub mod cost;
mod denoise;
pub mod family;
pub mod guidance;
pub mod image_start;
mod loras;
pub mod picture_prep;
pub mod refiner;
pub mod single_file;
pub mod size;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use serde_json::Value;

use crate::cancel::{self, CancelFlag};
use crate::error::{read_json, Error, Result};
use crate::latent::controlnet::ControlNet;
use crate::latent::schedulers::Scheduler;
use crate::latent::schedulers::{self, SchedulerKind, SchedulerOptions, TimestepSpacing};
use crate::latent::unet::UNet;
use crate::rng::BatchGenerator;
use crate::text::clip::ClipTextModel;
use crate::text::embeddings::Embedding;
use crate::text::tokenizer::ClipTokenizer;
use crate::vae::preview::latent_preview;
use crate::vae::tiny::AutoencoderTiny;
use crate::vae::{AutoencoderKl, Vae, VaeConfig};
use crate::weights::folder::{self, ModelFolder};
use crate::weights::lora::Part;
use crate::weights::store::has_weight_files;
pub use conditioning::PromptSyntax;
use conditioning::{Conditioning, TextEncoder};
pub use control::{ControlMode, ControlUnit};
use denoise::{Pass, TextConditions};
pub use family::Family;
pub use guidance::GuidanceInterval;
pub use picture_prep::{InpaintOptions, MaskedContent, Outpaint, ResizeMode};
pub use single_file::SingleFileOptions;

/// The folder, beside `unet/`, of autoguidance's weaker U-Net.
pub const GUIDE_UNET: &str = "guide_unet";

/// A LoRA file and how strongly it changes the text encoders and the U-Net (A1111's
/// `<lora:NAME:TE_W:UNET_W>`; usually one weight for both).
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub path: std::path::PathBuf,
    pub text_weight: f64,
    pub unet_weight: f64,
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `fp16` picks `*.fp16.safetensors`.
    pub variant: Option<String>,
    pub device: Device,
    /// Storage dtype of the weight matrices and convolution kernels: f32, or f16/bf16 for
    /// half the memory (computation stays f32; each layer widens its weight as it runs).
    pub weight_dtype: crate::weights::MatrixDtype,
    /// LoRA files merged into the weights as they load.
    pub loras: Vec<LoraSpec>,
    /// Another autoencoder in place of the model's own (see [`crate::vae::replacement`]).
    pub vae: Option<std::path::PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            variant: None,
            device: Device::Cpu,
            weight_dtype: crate::weights::MatrixDtype::F32,
            loras: Vec::new(),
            vae: None,
        }
    }
}

/// One generation request; every field has a default, so callers set only what they need.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The condition strings, one per text encoder (SDXL: `prompt`, `prompt_2`). An encoder
    /// with no string here, or an empty one past the first, takes the first, as diffusers'
    /// `prompt_2 = prompt_2 or prompt`. [`GenerateRequest::new`] sets one.
    pub prompts: Vec<String>,
    /// The unconditional strings of classifier-free guidance, one per encoder, filled in the
    /// same way. `None`: no negative prompt, which is "" for SD 1.x/2.x and zero embeddings
    /// for SDXL folders with `force_zeros_for_empty_prompt` (as diffusers).
    pub negative_prompts: Option<Vec<String>>,
    /// Image i uses seed + i. `None` draws a seed.
    pub seed: Option<u64>,
    /// `None`: the model's default (50 for diffusers-layout folders).
    pub steps: Option<usize>,
    /// `None`: the model's default (7.5 for SD, 5 for SDXL). <= 1 disables guidance.
    pub guidance_scale: Option<f64>,
    /// diffusers' `guidance_rescale` (0 to 1; see [`guidance::guide`]). `None`: the model's
    /// default, else 0 (off).
    pub guidance_rescale: Option<f64>,
    /// The fraction of the steps where guidance applies (see [`GuidanceInterval`]). `None`:
    /// the model's default, else all of them.
    pub guidance_interval: Option<GuidanceInterval>,
    /// Autoguidance's weight w (see [`guidance::autoguide`]): the prediction moves w - 1 times
    /// the conditional prediction's distance from a weaker U-Net's further from it. Needs a
    /// model folder with a `guide_unet/`. <= 1 is off; `None`: the model's default, else off.
    pub autoguidance: Option<f64>,
    /// `None`: the model folder's own scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// Overrides the scheduler's `timestep_spacing` (`trailing` for SD-Turbo-style models).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// `None`: the U-Net's `sample_size` times the VAE factor.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: usize,
    /// DDIM's eta (0 = deterministic).
    pub eta: f64,
    /// 0: the text encoder's last layer; k: the k-th layer from the end (diffusers' meaning).
    pub clip_skip: usize,
    /// How the prompts are read: A1111's weights, BREAK and long prompts (the default), or
    /// plainly as diffusers does.
    pub prompt_syntax: PromptSyntax,
    /// SDXL time ids: the (height, width) the model is told the original image had (default:
    /// the output size), the crop's (top, left) (default 0, 0) and the target (height, width)
    /// (default: the output size).
    pub original_size: Option<(usize, usize)>,
    pub crop_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    /// img2img and inpainting: the picture to start from, resized to the output size (whose
    /// default is the picture's own size rounded down to a multiple of 8).
    pub init_image: Option<RgbImage>,
    /// Inpainting: white is repainted, black kept (grey levels of half and more count as
    /// white); resized to the output size. Needs `init_image`.
    pub mask: Option<GrayImage>,
    /// How far the picture is noised, in (0, 1]: the last int(steps x strength) steps run.
    /// `None`: 1 for inpainting, else the family's img2img default (diffusers': 0.8, SDXL 0.3).
    pub strength: Option<f64>,
    /// A second pass at a larger size (A1111's hires fix).
    pub hires: Option<HiresFix>,
    /// How a picture of another size is fitted to the output size.
    pub resize_mode: ResizeMode,
    /// A1111's inpainting options (mask blur, only masked, masked content, paste-back).
    pub inpaint: InpaintOptions,
    /// Grow the picture's canvas and inpaint the new area.
    pub outpaint: Option<Outpaint>,
    /// Decode (and encode) in overlapping tiles, as diffusers' `vae.enable_tiling()`: the
    /// memory of one tile at any size, at the price of a slightly different image.
    pub vae_tiling: bool,
    /// With a refiner ([`Pipeline::set_refiner`]): the fraction of the schedule after which
    /// the refiner takes over (diffusers' `denoising_end`/`denoising_start`). `None`: 0.8;
    /// 1: the refiner does not run.
    pub refiner_start: Option<f64>,
    /// The refiner's aesthetic scores for the conditional and the unconditional half
    /// (diffusers' defaults: 6 and 2.5).
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
    /// ControlNets that steer the layout ([`Pipeline::add_controlnet`] loads them); their
    /// residuals add up.
    pub controls: Vec<ControlUnit>,
}

/// A1111's hires fix: the first pass's latents upscaled and refined by img2img at the larger
/// size, the seed's generators continuing.
#[derive(Clone, Debug, PartialEq)]
pub struct HiresFix {
    /// The second pass's size as a factor of the first's (A1111's `hr_scale`), used for the
    /// sides `width`/`height` leave open.
    pub scale: f64,
    /// An explicit size (A1111's `hr_resize_x`/`hr_resize_y`); rounded down to a multiple of 8.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// `None`: as many as the first pass.
    pub steps: Option<usize>,
    /// img2img's strength for the second pass (A1111's `denoising_strength`, default 0.7).
    pub strength: f64,
    pub upscaler: LatentUpscaler,
}

impl Default for HiresFix {
    fn default() -> Self {
        Self {
            scale: 2.0,
            width: None,
            height: None,
            steps: None,
            strength: 0.7,
            upscaler: LatentUpscaler::Bilinear,
        }
    }
}

/// How hires fix enlarges the latents (A1111's "Latent" and "Latent (nearest)").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LatentUpscaler {
    #[default]
    Bilinear,
    Nearest,
}

impl LatentUpscaler {
    /// A1111's names, and the command line's.
    pub const NAMES: [(&'static str, &'static str, LatentUpscaler); 2] = [
        ("Latent", "latent", LatentUpscaler::Bilinear),
        (
            "Latent (nearest)",
            "latent-nearest",
            LatentUpscaler::Nearest,
        ),
    ];

    pub fn a1111_name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, _, u)| *u == self)
            .map_or("Latent", |(name, _, _)| name)
    }
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompts: vec![String::new()],
            negative_prompts: None,
            seed: None,
            steps: None,
            guidance_scale: None,
            guidance_rescale: None,
            guidance_interval: None,
            autoguidance: None,
            scheduler: None,
            timestep_spacing: None,
            width: None,
            height: None,
            num_images: 1,
            eta: 0.0,
            clip_skip: 0,
            prompt_syntax: PromptSyntax::default(),
            original_size: None,
            crop_top_left: (0, 0),
            target_size: None,
            init_image: None,
            mask: None,
            strength: None,
            hires: None,
            resize_mode: ResizeMode::default(),
            inpaint: InpaintOptions::default(),
            outpaint: None,
            vae_tiling: false,
            refiner_start: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
            controls: Vec::new(),
        }
    }
}

impl GenerateRequest {
    /// A request for one prompt (for every text encoder), all else default.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompts: vec![prompt.into()],
            ..Self::default()
        }
    }

    /// The first condition string (what metadata calls the prompt).
    pub fn prompt(&self) -> &str {
        self.prompts.first().map_or("", String::as_str)
    }

    /// The first negative string, "" when there is none.
    pub fn negative_prompt(&self) -> &str {
        self.negative_prompts
            .as_ref()
            .and_then(|n| n.first())
            .map_or("", String::as_str)
    }

    /// Sets the negative prompt (for every encoder).
    pub fn with_negative(mut self, negative: impl Into<String>) -> Self {
        self.negative_prompts = Some(vec![negative.into()]);
        self
    }
}

/// `m` strings from a list, diffusers' way: missing or empty entries past the first take
/// the first.
fn per_encoder(strings: &[String], m: usize) -> Vec<&str> {
    let first = strings.first().map_or("", String::as_str);
    (0..m)
        .map(|i| match strings.get(i) {
            Some(s) if i == 0 || !s.is_empty() => s.as_str(),
            _ => first,
        })
        .collect()
}

/// Defaults a model folder may carry in `text2img.json` (diffusers ignores the file).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct ModelDefaults {
    /// `None`: the family's default (diffusers': 50, or 4 for LCM pipelines).
    #[serde(default)]
    pub steps: Option<usize>,
    /// `None`: the family's default (diffusers': 7.5 for SD, 5 for SDXL, 8.5 for LCM).
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// `None`: 0 (no rescale, as diffusers).
    #[serde(default)]
    pub guidance_rescale: Option<f64>,
    /// `[start, end]`, fractions of the steps; `None`: every step.
    #[serde(default)]
    pub guidance_interval: Option<[f64; 2]>,
    /// Autoguidance's weight; needs the folder's `guide_unet/`. `None`: off.
    #[serde(default)]
    pub autoguidance: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
}

/// What the step callback sees after each scheduler step.
pub struct StepProgress<'a> {
    /// 1-based.
    pub step: usize,
    pub total: usize,
    latents: &'a Tensor,
    /// The tiny autoencoder that draws full-size previews, if the pipeline has one.
    preview_vae: Option<&'a AutoencoderTiny>,
}

impl StepProgress<'_> {
    /// An RGB preview of image `index`: (rgb, width, height). With a preview VAE
    /// ([`Pipeline::set_preview_vae`]) the picture at full size (TAESD's decode of the
    /// latents so far), otherwise a cheap one of one pixel per latent.
    pub fn preview(&self, index: usize) -> Result<(Vec<u8>, usize, usize)> {
        let latents = self.latents.narrow(0, index, 1)?;
        match self.preview_vae {
            Some(tiny) => {
                let z = (latents / tiny.config.scaling_factor)?;
                let image = to_rgb8(&tiny.decode(&z)?.get(0)?, 0)?;
                Ok((image.rgb, image.width, image.height))
            }
            None => latent_preview(&latents.get(0)?),
        }
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

/// How another thread stops a running generation (the server's jobs). Both flags are looked
/// at inside each U-Net step, not only between steps (see [`crate::cancel`]), so a stop frees
/// the cores within a fraction of a second at any image size.
#[derive(Clone, Debug, Default)]
pub struct StopFlags {
    /// Stop at once, in the steps or in the decode, with [`Error::Cancelled`].
    pub cancel: CancelFlag,
    /// Stop sampling at once and decode the latents of the last finished step (A1111's
    /// interrupt). The decode that follows runs to its end: it makes the images asked for.
    pub finish: CancelFlag,
}

impl StepControl {
    /// A plain callback's answer: go on, or cancel.
    fn continue_if(go_on: bool) -> Self {
        if go_on {
            StepControl::Continue
        } else {
            StepControl::Cancel
        }
    }
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
    pub guidance_rescale: f64,
    pub guidance_interval: GuidanceInterval,
    /// 1: off.
    pub autoguidance: f64,
    pub scheduler: SchedulerKind,
    /// The first pass's size (the output's, without hires fix).
    pub width: usize,
    pub height: usize,
    /// img2img and inpainting: the strength the picture was noised to.
    pub strength: Option<f64>,
    pub hires: Option<ResolvedHires>,
    /// Where the refiner takes over, when one runs.
    pub refiner_start: Option<f64>,
}

/// Hires fix's second pass as it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedHires {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub strength: f64,
    pub upscaler: LatentUpscaler,
    /// The factor asked for (for metadata).
    pub scale: f64,
}

impl Resolved {
    /// The size of the images that come out.
    pub fn output_size(&self) -> (usize, usize) {
        match &self.hires {
            Some(h) => (h.width, h.height),
            None => (self.width, self.height),
        }
    }

    /// The U-Net evaluations' steps of all passes (hires fix's second pass runs
    /// int(steps x strength)).
    pub fn steps_run(&self) -> usize {
        image_start::steps_run(self.steps, self.strength)
            + self
                .hires
                .as_ref()
                .map_or(0, |h| image_start::steps_run(h.steps, Some(h.strength)))
    }
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

/// An embedding left out because its width fits none of the model's text encoders.
#[derive(Clone, Debug, PartialEq)]
pub struct SkippedEmbedding {
    pub name: String,
    /// Its token count and width, where it has vectors.
    pub vectors: Option<usize>,
    pub width: Option<usize>,
}

/// A loaded model: load once, serve many requests.
#[derive(Clone)]
pub struct Pipeline {
    pub name: String,
    pub family: Family,
    /// TextEnc_1..m, in the order of the condition strings.
    pub text_encoders: Vec<TextEncoder>,
    pub unet: UNet,
    /// Autoguidance's weaker U-Net (`guide_unet/`, beside `unet/`; diffusers ignores it): the
    /// same inputs and conditioning, less capacity or training.
    pub guide_unet: Option<UNet>,
    pub vae: Vae,
    scheduler_config: Value,
    folder_scheduler: SchedulerKind,
    /// SDXL: an absent negative prompt means zero embeddings.
    force_zeros_for_empty_prompt: bool,
    /// The SDXL refiner's time ids: the aesthetic score in place of the target size
    /// (`requires_aesthetics_score` in `model_index.json`).
    pub aesthetic_time_ids: bool,
    /// A second model that finishes the steps from `refiner_start` on (SDXL's refiner).
    pub refiner: Option<Box<Pipeline>>,
    pub defaults: ModelDefaults,
    /// Textual-inversion embeddings the prompts may name ([`Pipeline::add_embeddings`]).
    pub embeddings: Vec<Embedding>,
    /// Embeddings offered from a shared folder that do not fit this model's text encoders
    /// (A1111's "skipped"), by name and shape.
    pub skipped_embeddings: Vec<SkippedEmbedding>,
    /// What the user should know about the load (LoRA modules that matched no layer).
    pub load_warnings: Vec<String>,
    /// A tiny autoencoder (TAESD) for full-size step previews.
    pub preview_vae: Option<AutoencoderTiny>,
    /// ControlNets requests may use ([`GenerateRequest::controls`] names them by index).
    pub controlnets: Vec<ControlNet>,
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
        let wd = options.weight_dtype;
        let device = &options.device;
        let family = Family::detect(folder)?;
        for (component, class) in family.components() {
            if let Some(found) = folder.class_of(component) {
                if found != *class {
                    return Err(Error::config(
                        folder.root.join("model_index.json"),
                        format!("{component} is a `{found}`; this pipeline needs a `{class}`"),
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
        // SDXL has two text encoders; its refiner only the second.
        let encoders: &[usize] = match family {
            Family::StableDiffusionXl if !folder.component("text_encoder").is_dir() => &[1],
            Family::StableDiffusionXl => &[0, 1],
            _ => &[0],
        };
        let mut loras = loras::LoraLoad::open(&options.loras)?;
        let mut text_encoders = Vec::new();
        for &i in encoders {
            let (tokenizer, encoder) = family::TEXT_ENCODERS[i];
            let model = ClipTextModel::load_patched(
                &folder.component(encoder),
                variant,
                device,
                wd,
                &mut |w| loras.patch(w, Part::TextEncoder(i)),
            )?;
            text_encoders.push(TextEncoder {
                tokenizer: std::sync::Arc::new(ClipTokenizer::from_folder(
                    &folder.component(tokenizer),
                )?),
                model,
            });
        }
        let unet = UNet::load_patched(&folder.component("unet"), variant, device, wd, &mut |w| {
            loras.patch(w, Part::Unet)
        })?;
        let load_warnings = loras.finish()?;
        let guide_folder = folder.component(GUIDE_UNET);
        let guide_unet = if guide_folder.is_dir() {
            // The guide is optional and often trained here, in one precision only: a variant
            // it lacks falls back to its plain weights rather than failing the whole model.
            let guide_variant = variant.filter(|v| has_weight_files(&guide_folder, Some(v)));
            Some(UNet::load_as(&guide_folder, guide_variant, device, wd)?)
        } else {
            None
        };
        let vae = match &options.vae {
            Some(path) => {
                let own = VaeConfig::from_file(&folder.component("vae").join("config.json"))?;
                crate::vae::replacement::load(path, &own, wd, device)?
            }
            None => Vae::Kl(AutoencoderKl::load_as(
                &folder.component("vae"),
                variant,
                device,
                wd,
            )?),
        };
        let pipeline = Self {
            name: folder.name.clone(),
            family,
            text_encoders,
            unet,
            guide_unet,
            vae,
            scheduler_config,
            folder_scheduler,
            force_zeros_for_empty_prompt: folder
                .index
                .get("force_zeros_for_empty_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(family == Family::StableDiffusionXl),
            aesthetic_time_ids: folder
                .index
                .get("requires_aesthetics_score")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            refiner: None,
            defaults,
            embeddings: Vec::new(),
            skipped_embeddings: Vec::new(),
            load_warnings,
            preview_vae: None,
            controlnets: Vec::new(),
            device: device.clone(),
        };
        pipeline.check_widths(&folder.component("unet").join("config.json"))?;
        pipeline.check_guide_unet(folder)?;
        Ok(pipeline)
    }

    /// A guide U-Net must read and write what the U-Net does, and a default autoguidance
    /// weight needs one.
    fn check_guide_unet(&self, folder: &ModelFolder) -> Result<()> {
        let Some(guide) = &self.guide_unet else {
            return match self.defaults.autoguidance {
                Some(w) if w > 1.0 => Err(Error::config(
                    folder.root.join("text2img.json"),
                    format!("autoguidance {w} needs a `{GUIDE_UNET}/` folder beside `unet/`"),
                )),
                _ => Ok(()),
            };
        };
        let config = folder.component(GUIDE_UNET).join("config.json");
        let (main, weak) = (&self.unet.config, &guide.config);
        if main.time_cond_proj_dim.is_some() {
            return Err(Error::config(
                config,
                "autoguidance does not support a U-Net that embeds the guidance scale (time_cond_proj_dim, as LCM's)",
            ));
        }
        let mismatch = if main.in_channels != weak.in_channels {
            Some(format!(
                "in_channels {} (the U-Net's: {})",
                weak.in_channels, main.in_channels
            ))
        } else if main.out_channels != weak.out_channels {
            Some(format!(
                "out_channels {} (the U-Net's: {})",
                weak.out_channels, main.out_channels
            ))
        } else if main.cross_attention_dim() != weak.cross_attention_dim() {
            Some(format!(
                "cross_attention_dim {:?} (the U-Net's: {:?})",
                weak.cross_attention_dim(),
                main.cross_attention_dim()
            ))
        } else if main.text_embeds_dim() != weak.text_embeds_dim() {
            Some(format!(
                "text-embedding features {:?} (the U-Net's: {:?}; addition_embed_type text_time)",
                weak.text_embeds_dim(),
                main.text_embeds_dim()
            ))
        } else if weak.time_cond_proj_dim.is_some() {
            Some("a guidance-scale embedding (time_cond_proj_dim), which autoguidance does not support".to_string())
        } else {
            None
        };
        match mismatch {
            Some(what) => Err(Error::config(config, format!("the guide U-Net has {what}"))),
            None => Ok(()),
        }
    }

    /// The text encoders' widths must add up to what the U-Net's cross-attention reads, and
    /// an SDXL U-Net's added embedding must fit the pooled text embedding.
    fn check_widths(&self, unet_config: &Path) -> Result<()> {
        let context: usize = self
            .text_encoders
            .iter()
            .map(|e| e.model.config.hidden_size)
            .sum();
        let cross = self.unet.config.cross_attention_dim().unwrap_or(context);
        if cross != context {
            return Err(Error::config(
                unet_config,
                format!("the U-Net's cross_attention_dim is {cross}, but the text encoders give {context} features"),
            ));
        }
        match (&self.unet.config.text_time, self.family) {
            (Some(tt), Family::StableDiffusionXl) => {
                let last = &self.text_encoders.last().expect("two encoders").model;
                let projection = last.text_projection.as_ref().map(|_| last.config.projection_dim);
                let ids = if self.aesthetic_time_ids { 5 } else { 6 };
                if projection.flatten() != Some(tt.text_embeds_dim_with(ids)) {
                    return Err(Error::config(
                        unet_config,
                        format!(
                            "projection_class_embeddings_input_dim expects {} text-embedding features; text_encoder_2 projects to {:?}",
                            tt.text_embeds_dim_with(ids),
                            projection.flatten()
                        ),
                    ));
                }
            }
            (None, Family::StableDiffusionXl) => {
                return Err(Error::config(
                    unet_config,
                    "an SDXL pipeline needs a U-Net with `addition_embed_type` \"text_time\"",
                ))
            }
            (Some(_), _) => {
                return Err(Error::config(
                    unet_config,
                    "this U-Net takes SDXL's text_time conditioning, but the folder is not an SDXL pipeline",
                ))
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// Loads a ControlNet (a diffusers `ControlNetModel` folder, or a single file in the
    /// original or the diffusers layout) for requests to use; returns its index for
    /// [`ControlUnit::net`]. One made for another base model is refused.
    pub fn add_controlnet(
        &mut self,
        dir: &Path,
        matrix_dtype: crate::weights::MatrixDtype,
    ) -> Result<usize> {
        let net = if dir.is_file() {
            ControlNet::load_file(dir, &self.unet.config, &self.device, matrix_dtype).map_err(
                |e| match e {
                    Error::ShapeMismatch { .. } | Error::MissingTensor { .. } => {
                        Error::config(dir, format!("{e}: a ControlNet for another base model?"))
                    }
                    e => e,
                },
            )?
        } else {
            ControlNet::load(dir, &self.device, matrix_dtype)?
        };
        if let Some(why) = net.mismatch(&self.unet.config) {
            return Err(Error::config(dir.join("config.json"), why));
        }
        if net.downscale != self.vae_scale_factor() {
            return Err(Error::config(
                dir.join("config.json"),
                format!(
                    "its control images are {}x the latents; this model's VAE is {}x",
                    net.downscale,
                    self.vae_scale_factor()
                ),
            ));
        }
        self.controlnets.push(net);
        Ok(self.controlnets.len() - 1)
    }

    /// A copy of this pipeline with `specs` merged into copies of the layers they change;
    /// every other tensor is shared with `self`, which stays exactly as it was. A server
    /// applies a request's LoRAs this way, so the next request without them gets the plain
    /// model's image. Returns the copy and warnings for LoRA modules that matched no layer.
    pub fn with_loras(&self, specs: &[LoraSpec]) -> Result<(Pipeline, Vec<String>)> {
        let mut copy = self.clone();
        let mut loras = loras::LoraLoad::open(specs)?;
        // SDXL's refiner has only the second of SDXL's two text encoders.
        let first = match self.family {
            Family::StableDiffusionXl if self.text_encoders.len() == 1 => 1,
            _ => 0,
        };
        for (i, encoder) in copy.text_encoders.iter_mut().enumerate() {
            loras.patch_layers(&mut encoder.model, Part::TextEncoder(first + i))?;
        }
        loras.patch_layers(&mut copy.unet, Part::Unet)?;
        let warnings = loras.finish()?;
        Ok((copy, warnings))
    }

    /// Makes textual-inversion embeddings nameable in prompts. Each must have vectors for every
    /// text encoder's width: with `strict` one that has not is an error (files the user named),
    /// otherwise it is left out and a returned warning says so (a shared folder holds
    /// embeddings for other models too). A later embedding of a name replaces an earlier one.
    pub fn add_embeddings(
        &mut self,
        embeddings: Vec<Embedding>,
        strict: bool,
    ) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for embedding in embeddings {
            let fits = self
                .text_encoders
                .iter()
                .try_for_each(|e| embedding.for_width(e.model.config.hidden_size).map(|_| ()));
            match fits {
                Ok(()) => {
                    self.embeddings.retain(|e| e.name != embedding.name);
                    self.skipped_embeddings.retain(|e| e.name != embedding.name);
                    self.embeddings.push(embedding);
                }
                Err(e) if strict => return Err(e),
                Err(e) => {
                    warnings.push(format!("{e}; left out"));
                    self.skipped_embeddings.retain(|e| e.name != embedding.name);
                    let (vectors, width) = embedding.shape();
                    self.skipped_embeddings.push(SkippedEmbedding {
                        name: embedding.name.clone(),
                        vectors,
                        width,
                    });
                }
            }
        }
        Ok(warnings)
    }

    /// Draws step previews with a tiny autoencoder (a TAESD folder for this model's latents).
    pub fn set_preview_vae(&mut self, dir: &Path) -> Result<()> {
        let tiny = AutoencoderTiny::load(dir, &self.device, crate::weights::MatrixDtype::F32)?;
        if tiny.config.latent_channels != self.vae.latent_channels()
            || tiny.config.downsampling_factor() != self.vae_scale_factor()
        {
            return Err(Error::config(
                dir,
                format!(
                    "this preview VAE decodes {} latent channels at 1/{} size; the model's latents have {} at 1/{}",
                    tiny.config.latent_channels,
                    tiny.config.downsampling_factor(),
                    self.vae.latent_channels(),
                    self.vae_scale_factor()
                ),
            ));
        }
        self.preview_vae = Some(tiny);
        Ok(())
    }

    /// The pixels one latent covers (diffusers' `vae_scale_factor`).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.downsampling_factor()
    }

    /// The scheduler used when a request names none.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.defaults
            .scheduler
            .as_deref()
            .and_then(|s| SchedulerKind::from_cli_name(s).ok())
            .unwrap_or(self.folder_scheduler)
    }

    /// Whether the U-Net takes the guidance scale as an embedding (LCM) instead of a
    /// second, unconditional pass.
    pub fn embeds_guidance(&self) -> bool {
        self.unet.config.time_cond_proj_dim.is_some()
    }

    /// Fills a request's open fields with this model's defaults and checks it.
    pub fn resolve(&self, req: &GenerateRequest) -> Result<Resolved> {
        let f = self.vae_scale_factor();
        let native = self.unet.config.sample_size.map(|s| s * f);
        // A picture gives its own size, rounded down to the VAE's factor (diffusers).
        let grow = req.outpaint.unwrap_or_default();
        let picture = match &req.init_image {
            Some(p) => {
                let (pw, ph) = (
                    (p.width() + grow.left + grow.right) as usize,
                    (p.height() + grow.top + grow.bottom) as usize,
                );
                let (w, h) = (pw / f * f, ph / f * f);
                if w == 0 || h == 0 {
                    return Err(Error::InvalidRequest(format!(
                        "the init image is {}x{}: smaller than {f} pixels a side",
                        p.width(),
                        p.height()
                    )));
                }
                Some((w, h))
            }
            None => None,
        };
        let width = req
            .width
            .or(picture.map(|p| p.0))
            .or(self.defaults.width)
            .or(native)
            .unwrap_or(512);
        let height = req
            .height
            .or(picture.map(|p| p.1))
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
        let steps = req
            .steps
            .or(self.defaults.steps)
            .unwrap_or(self.family.default_steps());
        if steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        if req.num_images == 0 {
            return Err(Error::InvalidRequest(
                "num_images must be at least 1".into(),
            ));
        }
        let guidance_scale = req
            .guidance_scale
            .or(self.defaults.guidance_scale)
            .unwrap_or(self.family.default_guidance());
        if !guidance_scale.is_finite() {
            return Err(Error::InvalidRequest(
                "guidance scale must be a finite number".into(),
            ));
        }
        let guidance_rescale = req
            .guidance_rescale
            .or(self.defaults.guidance_rescale)
            .unwrap_or(0.0);
        if !(0.0..=1.0).contains(&guidance_rescale) {
            return Err(Error::InvalidRequest(format!(
                "guidance rescale must be between 0 and 1, not {guidance_rescale}"
            )));
        }
        let mut guidance_interval = match (req.guidance_interval, self.defaults.guidance_interval) {
            (Some(interval), _) => GuidanceInterval::new(interval.start, interval.end)?,
            (None, Some([start, end])) => GuidanceInterval::new(start, end)
                .map_err(|e| Error::InvalidRequest(format!("the model's text2img.json: {e}")))?,
            (None, None) => GuidanceInterval::default(),
        };
        let autoguidance = req
            .autoguidance
            .or(self.defaults.autoguidance)
            .unwrap_or(1.0);
        if !(autoguidance.is_finite() && autoguidance >= 0.0) {
            return Err(Error::InvalidRequest(format!(
                "autoguidance must be a number >= 0 (1 or less is off), not {autoguidance}"
            )));
        }
        let autoguidance = if autoguidance > 1.0 {
            if self.guide_unet.is_none() {
                return Err(Error::InvalidRequest(format!(
                    "autoguidance {autoguidance} needs a guide U-Net (a `{GUIDE_UNET}/` folder beside `unet/`); this model has none"
                )));
            }
            autoguidance
        } else {
            1.0
        };
        // With neither guidance there is nothing to confine (and nothing to record).
        if (guidance_scale <= 1.0 || self.embeds_guidance()) && autoguidance <= 1.0 {
            guidance_interval = GuidanceInterval::default();
        }
        if !(req.eta.is_finite() && req.eta >= 0.0) {
            return Err(Error::InvalidRequest("eta must be a number >= 0".into()));
        }
        // SDXL reads the penultimate layer already, so clip skip goes one further.
        let reserved = usize::from(self.family == Family::StableDiffusionXl);
        let layers = self
            .text_encoders
            .iter()
            .map(|e| e.model.num_layers())
            .min()
            .unwrap_or(0);
        if req.clip_skip + reserved >= layers {
            return Err(Error::InvalidRequest(format!(
                "clip skip {} must be below {}: the text encoder has {layers} layers",
                req.clip_skip,
                layers - reserved
            )));
        }
        let strength = self.resolve_strength(req)?;
        let hires = match &req.hires {
            Some(h) => Some(self.resolve_hires(h, req, width, height, steps)?),
            None => None,
        };
        if req.prompts.len() > self.text_encoders.len() {
            return Err(Error::InvalidRequest(format!(
                "{} prompts for a model with {} text encoder(s)",
                req.prompts.len(),
                self.text_encoders.len()
            )));
        }
        Ok(Resolved {
            steps,
            guidance_scale,
            guidance_rescale,
            guidance_interval,
            autoguidance,
            scheduler: req.scheduler.unwrap_or_else(|| self.default_scheduler()),
            width,
            height,
            strength,
            hires,
            refiner_start: self.refiner_handover(req)?.map(|(_, start)| start),
        })
    }

    /// The strength of an img2img or inpainting request (`None` for txt2img), and the
    /// checks on what the request pairs with its picture.
    fn resolve_strength(&self, req: &GenerateRequest) -> Result<Option<f64>> {
        let latent = self.vae.latent_channels();
        let inpainting_unet = self.unet.config.in_channels != latent;
        match (&req.init_image, &req.mask) {
            (None, Some(_)) => {
                return Err(Error::InvalidRequest(
                    "a mask needs the picture it masks (an init image)".into(),
                ))
            }
            (None, None) if req.outpaint.is_some() => {
                return Err(Error::InvalidRequest(
                    "outpainting needs an init image to extend".into(),
                ))
            }
            (None, None) if req.strength.is_some() => {
                return Err(Error::InvalidRequest(
                    "strength needs an init image to start from".into(),
                ))
            }
            (_, None) if inpainting_unet && req.outpaint.is_none() => {
                return Err(Error::InvalidRequest(format!(
                    "this is an inpainting model (its U-Net takes {} channels): give it a picture and a mask",
                    self.unet.config.in_channels
                )))
            }
            (None, None) => return Ok(None),
            _ => {}
        }
        let default = if req.mask.is_some() || req.outpaint.is_some() {
            1.0
        } else {
            self.family.default_strength()
        };
        let strength = req.strength.unwrap_or(default);
        image_start::check_strength(strength)?;
        Ok(Some(strength))
    }

    fn resolve_hires(
        &self,
        h: &HiresFix,
        req: &GenerateRequest,
        width: usize,
        height: usize,
        steps: usize,
    ) -> Result<ResolvedHires> {
        if req.init_image.is_some() {
            return Err(Error::InvalidRequest(
                "hires fix is a second pass of txt2img; an img2img request sets its size instead"
                    .into(),
            ));
        }
        if !(h.scale.is_finite() && h.scale > 0.0 && h.scale <= 8.0) {
            return Err(Error::InvalidRequest(format!(
                "hires scale must be a number in (0, 8], not {}",
                h.scale
            )));
        }
        let f = self.vae_scale_factor();
        // A1111: the size the factor gives, on the latents' grid.
        let side = |asked: Option<usize>, base: usize| -> usize {
            asked.unwrap_or((base as f64 * h.scale) as usize) / f * f
        };
        let (w, hh) = (side(h.width, width), side(h.height, height));
        if w == 0 || hh == 0 {
            return Err(Error::InvalidRequest(format!(
                "hires size {w}x{hh} is empty"
            )));
        }
        let hires_steps = h.steps.unwrap_or(steps);
        image_start::first_step(hires_steps, h.strength)
            .map_err(|e| Error::InvalidRequest(format!("hires fix: {}", e.message())))?;
        Ok(ResolvedHires {
            width: w,
            height: hh,
            steps: hires_steps,
            strength: h.strength,
            upscaler: h.upscaler,
            scale: h.scale,
        })
    }

    /// TextEnc: the conditioning of one set of condition strings (batch 1).
    pub fn encode_prompts(
        &self,
        prompts: &[String],
        clip_skip: usize,
        syntax: PromptSyntax,
        warnings: &mut Vec<String>,
    ) -> Result<Conditioning> {
        let strings = per_encoder(prompts, self.text_encoders.len());
        match self.family {
            Family::StableDiffusionXl => conditioning::sdxl(
                &self.text_encoders,
                &strings,
                clip_skip,
                syntax,
                &self.embeddings,
                warnings,
            ),
            _ => conditioning::stable_diffusion(
                &self.text_encoders[0],
                strings[0],
                clip_skip,
                syntax,
                &self.embeddings,
                warnings,
            ),
        }
    }

    /// Runs a request. `on_step` sees each step's progress; returning `false` cancels.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generation> {
        self.generate_controlled(req, &mut |p| StepControl::continue_if(on_step(p)))
    }

    /// The unconditional half of classifier-free guidance.
    fn encode_negative(&self, req: &GenerateRequest, cond: &Conditioning) -> Result<Conditioning> {
        match &req.negative_prompts {
            None if self.family == Family::StableDiffusionXl
                && self.force_zeros_for_empty_prompt =>
            {
                cond.zeros_like()
            }
            // diffusers encodes the negative prompt from the last layer (SDXL: the
            // penultimate) even with clip skip; so do we, so that a seed gives its image.
            None => self.encode_prompts(&[String::new()], 0, req.prompt_syntax, &mut Vec::new()),
            Some(negatives) => {
                self.encode_prompts(negatives, 0, req.prompt_syntax, &mut Vec::new())
            }
        }
    }

    /// Runs a request; after each step `on_step` may continue, finish early (decoding the
    /// latents as they are) or cancel.
    pub fn generate_controlled(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
    ) -> Result<Generation> {
        self.generate_stoppable(req, &StopFlags::default(), on_step)
    }

    /// [`Pipeline::generate_controlled`] that another thread can also stop through `stop`,
    /// inside a step or a decode.
    pub fn generate_stoppable(
        &self,
        req: &GenerateRequest,
        stop: &StopFlags,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
    ) -> Result<Generation> {
        // A kernel that saw the stop may fail in any way; the stop is the cause.
        fn cancelled<T>(result: Result<T>, stop: &StopFlags) -> Result<T> {
            match result {
                Err(_) if stop.cancel.is_cancelled() => Err(Error::Cancelled),
                other => other,
            }
        }
        let denoised = cancelled(
            cancel::watching(&[&stop.cancel], || self.denoise(req, &stop.finish, on_step)),
            stop,
        )?;
        cancelled(
            cancel::watching(&[&stop.cancel], || decode(&self.vae, denoised)),
            stop,
        )
    }

    /// Runs one request and is used up by it: the text encoders and the U-Net are freed
    /// before decoding, so the decoder's activations
    /// (SD 1.5 at 512x512: about 1 GB) reuse the U-Net's memory instead of adding to it. For
    /// one-shot callers such as the command line; a server keeps its pipeline and calls
    /// [`Pipeline::generate`].
    pub fn generate_once(
        self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generation> {
        let denoised = self.denoise(req, &CancelFlag::new(), &mut |p| {
            StepControl::continue_if(on_step(p))
        })?;
        let Pipeline {
            vae,
            unet,
            guide_unet,
            text_encoders,
            refiner,
            ..
        } = self;
        drop(text_encoders);
        drop(unet);
        drop(guide_unet);
        drop(refiner);
        decode(&vae, denoised)
    }

    /// Encodes the prompts and runs the scheduler's steps: the latents, not yet decoded.
    /// `finish` ends the sampling early, inside a step: the latents of the last finished step
    /// are returned.
    fn denoise(
        &self,
        req: &GenerateRequest,
        finish: &CancelFlag,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
    ) -> Result<Denoised> {
        let (prepared, paste) = picture_prep::prepare(req, self.vae_scale_factor())?;
        let req = &prepared;
        let resolved = self.resolve(req)?;
        let mut timings = Timings::default();
        let mut warnings = Vec::new();
        let seed = req.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));

        let started = Instant::now();
        let text = self.text_conditions(req, &resolved, &mut warnings)?;
        timings.text = started.elapsed();

        let started = Instant::now();
        let mut generators = BatchGenerator::consecutive(seed, req.num_images);
        let mut steps_total = resolved.steps_run();
        let mut scheduler = self.scheduler(req, &resolved, resolved.steps)?;
        // The refiner and its handover, as the request resolved them.
        let handover = self.refiner.as_deref().zip(resolved.refiner_start);
        // With a refiner, the base stops at the cutoff (diffusers' `denoising_end`).
        let end = handover.map(|(_, start)| {
            let cutoff = self.timestep_cutoff(start);
            let base_steps = scheduler
                .timesteps()
                .iter()
                .filter(|&&t| t >= cutoff)
                .count();
            steps_total = scheduler.timesteps().len();
            base_steps
        });
        let mut plan = self.start_plan(req, &resolved, scheduler.as_mut(), &mut generators)?;
        plan.end = end;
        let first = Pass {
            scheduler,
            plan,
            steps: resolved.steps,
            size: (resolved.height, resolved.width),
            steps_before: 0,
            steps_total,
            controlled: true,
        };
        let mut outcome = self.run_pass(
            req,
            &resolved,
            &text,
            first,
            &mut generators,
            finish,
            on_step,
            &mut warnings,
        )?;
        let mut completed_steps = outcome.completed;
        if let (Some((refiner, start)), false) = (handover, outcome.finished_early) {
            outcome = refiner.refine(
                req,
                &resolved,
                outcome.latents,
                start,
                &mut generators,
                finish,
                on_step,
                (completed_steps, steps_total),
                &mut warnings,
            )?;
            completed_steps += outcome.completed;
        }
        if let (Some(h), false) = (&resolved.hires, outcome.finished_early) {
            let f = self.vae_scale_factor();
            let upscaled = image_start::upscale_latents(
                &outcome.latents,
                h.height / f,
                h.width / f,
                h.upscaler == LatentUpscaler::Nearest,
            )?;
            let mut scheduler = self.scheduler(req, &resolved, h.steps)?;
            let begin = image_start::first_step(h.steps, h.strength)?;
            let plan =
                image_start::from_latents(&upscaled, begin, scheduler.as_mut(), &mut generators)?;
            let second = Pass {
                scheduler,
                plan,
                steps: h.steps,
                size: (h.height, h.width),
                steps_before: completed_steps,
                steps_total,
                controlled: true,
            };
            outcome = self.run_pass(
                req,
                &resolved,
                &text,
                second,
                &mut generators,
                finish,
                on_step,
                &mut warnings,
            )?;
            completed_steps += outcome.completed;
        }
        timings.steps = started.elapsed();
        Ok(Denoised {
            tiled: req.vae_tiling,
            paste,
            latents: outcome.latents,
            seeds: generators.seeds(),
            resolved,
            timings,
            warnings,
            completed_steps,
        })
    }

    /// The scheduler of a pass of `steps` steps.
    fn scheduler(
        &self,
        req: &GenerateRequest,
        resolved: &Resolved,
        steps: usize,
    ) -> Result<Box<dyn Scheduler>> {
        // diffusers' StableDiffusionPipeline rewrites some scheduler keys before the loop;
        // so do we. The SDXL and LCM pipelines run the folder's config as it is.
        let config = match self.family {
            Family::StableDiffusion => schedulers::stable_diffusion_pipeline_config(
                resolved.scheduler,
                &self.scheduler_config,
            )?,
            _ => self.scheduler_config.clone(),
        };
        schedulers::build(
            resolved.scheduler,
            &config,
            steps,
            &SchedulerOptions {
                eta: req.eta,
                timestep_spacing: req.timestep_spacing,
            },
        )
    }

    /// TextEnc for a request: the prompts (and, with guidance, the negative prompts) encoded
    /// into the batch the U-Net takes.
    fn text_conditions(
        &self,
        req: &GenerateRequest,
        resolved: &Resolved,
        warnings: &mut Vec<String>,
    ) -> Result<TextConditions> {
        let n = req.num_images;
        // LCM U-Nets take the guidance as an embedding: no unconditional pass.
        let cfg = resolved.guidance_scale > 1.0 && !self.embeds_guidance();
        let cond = self.encode_prompts(&req.prompts, req.clip_skip, req.prompt_syntax, warnings)?;
        let conditioning = if cfg {
            let uncond = self.encode_negative(req, &cond)?;
            // A prompt and a negative prompt of different chunk counts: the shorter gets
            // empty chunks, so that guidance stays one batch (A1111).
            let (cond_len, uncond_len) = (cond.context.dim(1)?, uncond.context.dim(1)?);
            let (cond, uncond) = if cond_len == uncond_len {
                (cond, uncond)
            } else {
                let empty =
                    self.encode_prompts(&[String::new()], 0, req.prompt_syntax, &mut Vec::new())?;
                let tokens = cond_len.max(uncond_len);
                (
                    cond.padded_to(tokens, &empty)?,
                    uncond.padded_to(tokens, &empty)?,
                )
            };
            Conditioning::batch(&[&uncond, &cond], n)?
        } else {
            Conditioning::batch(&[&cond], n)?
        };
        Ok(TextConditions {
            conditioning,
            cfg,
            n,
        })
    }
}

/// A request's latents after the scheduler's steps, with what the generation reports.
struct Denoised {
    /// Decode in tiles.
    tiled: bool,
    /// Inpainting: how the images go back into the original picture.
    paste: Option<picture_prep::PasteBack>,
    latents: Tensor,
    seeds: Vec<u64>,
    resolved: Resolved,
    timings: Timings,
    warnings: Vec<String>,
    completed_steps: usize,
}

/// Dec: the latents to images, one at a time.
fn decode(vae: &Vae, d: Denoised) -> Result<Generation> {
    let Denoised {
        tiled,
        paste,
        latents,
        seeds,
        resolved,
        mut timings,
        warnings,
        completed_steps,
    } = d;
    let started = Instant::now();
    let mut images = Vec::with_capacity(seeds.len());
    for (i, image_seed) in seeds.into_iter().enumerate() {
        let z = (latents.narrow(0, i, 1)? / vae.scaling_factor())?;
        let z = match vae.shift_factor() {
            Some(shift) => (z + shift)?,
            None => z,
        };
        let decoded = if tiled {
            vae.decode_tiled(&z)?
        } else {
            vae.decode(&z)?
        };
        let image = to_rgb8(&decoded.get(0)?, image_seed)?;
        images.push(match &paste {
            Some(p) => {
                let (rgb, width, height) = p.apply(&image.rgb, image.width, image.height);
                GeneratedImage {
                    width,
                    height,
                    rgb,
                    seed: image_seed,
                }
            }
            None => image,
        });
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
