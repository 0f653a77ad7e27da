//! A pipeline from one checkpoint file: the components' weights through the checkpoint's
//! layout map ([`crate::weights::single_file`]), their configs from a diffusers folder or the
//! released architecture's built-in ones.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::conditioning::TextEncoder;
use super::family::TEXT_ENCODERS;
use super::{Family, LoadOptions, ModelDefaults, Pipeline};
use crate::error::{parse_json, Error, Result};
use crate::latent::schedulers::SchedulerKind;
use crate::latent::unet::{ExtraConditions, UNet, UNetConfig};
use crate::text::clip::{ClipTextConfig, ClipTextModel};
use crate::vae::config::VaeConfig;
use crate::vae::AutoencoderKl;
use crate::weights::lora::Part;
use crate::weights::single_file::configs::ConfigFiles;
use crate::weights::single_file::original_config::OriginalConfig;
use crate::weights::single_file::{Architecture, Checkpoint};
use crate::weights::{MatrixDtype, Weights};

/// How to load a single file, beyond [`LoadOptions`].
#[derive(Clone, Debug, Default)]
pub struct SingleFileOptions {
    pub load: LoadOptions,
    /// A diffusers folder whose configs (not weights) describe the checkpoint; `None`: the
    /// released architecture's, chosen from the file.
    pub config: Option<PathBuf>,
    /// `epsilon` or `v_prediction`; `None`: the config's, or for SD 2.x found by running the
    /// U-Net once (A1111's probe).
    pub prediction_type: Option<String>,
    /// Load the U-Net's EMA copy (`model_ema.*`) instead of its weights.
    pub ema: bool,
    /// The original training code's yaml (`None`: `NAME.yaml` beside the file, if there is
    /// one, as A1111 reads it): its `parameterization` sets the prediction type.
    pub original_config: Option<PathBuf>,
}

impl Pipeline {
    /// Loads a single-file checkpoint (`.safetensors`).
    pub fn load_single_file(path: &Path, options: &SingleFileOptions) -> Result<Self> {
        let checkpoint = Checkpoint::open(path, &options.load.device)?;
        let (configs, original) = configs_for(path, options, checkpoint.architecture)?;
        let yaml = configs.unet_from_yaml().map(Path::to_path_buf);
        Self::load_single_file_as_is(path, options, checkpoint, configs, original).map_err(|e| {
            if !matches!(e, Error::ShapeMismatch { .. } | Error::MissingTensor { .. }) {
                return e;
            }
            // The weights do not fit the layout the configs give: say whose.
            let why = match (&yaml, &options.config) {
                (Some(yaml), _) => format!("{} does not describe this checkpoint", yaml.display()),
                (None, None) => "the file is not the released architecture: give its original yaml with --original-config FILE, or its diffusers configs with --config DIR".to_string(),
                (None, Some(dir)) => format!("the configs in {} do not describe this checkpoint: give its original yaml with --original-config FILE, or another --config", dir.display()),
            };
            Error::config(path, format!("{e}; {why}"))
        })
    }

    fn load_single_file_as_is(
        path: &Path,
        options: &SingleFileOptions,
        mut checkpoint: Checkpoint,
        configs: ConfigFiles,
        original: Option<(PathBuf, OriginalConfig)>,
    ) -> Result<Self> {
        let load = &options.load;
        let (device, wd) = (&load.device, load.weight_dtype);
        let arch = checkpoint.architecture;
        let index: Value = parse_json(
            &configs.require("model_index.json")?,
            &configs.path("model_index.json"),
        )?;
        let family = Family::from_class(
            index.get("_class_name").and_then(Value::as_str),
            configs.has("text_encoder_2"),
            &configs.path("model_index.json"),
        )?;
        let encoders = arch.text_encoders().len();
        let first = arch.first_encoder_slot();
        // An SDXL pipeline has both encoders, its refiner the second alone.
        let wanted = match family {
            Family::StableDiffusionXl if configs.has("text_encoder") => 2,
            _ => 1,
        };
        if encoders != wanted {
            return Err(Error::config(
                configs.path("model_index.json"),
                format!(
                    "describes a pipeline with {wanted} text encoder(s), but {} is {} ({encoders})",
                    path.display(),
                    arch.description()
                ),
            ));
        }

        let unet_path = configs.path("unet/config.json");
        let unet_text = unet_config_text(&configs, checkpoint.inpainting)?;
        let unet_config = UNetConfig::from_json(&unet_text, &unet_path)?;
        let mut loras = super::loras::LoraLoad::open(&load.loras)?;
        let mut weights = checkpoint.unet(&unet_config, options.ema)?;
        weights.store_matrices_as(wd);
        loras.patch(&mut weights, Part::Unet)?;
        let unet = UNet::from_weights(unet_config, &weights.root())?;
        weights.finish()?;

        let vae_config = VaeConfig::from_json(
            &configs.require("vae/config.json")?,
            &configs.path("vae/config.json"),
        )?;
        let vae = match &load.vae {
            Some(path) => {
                checkpoint.skip_vae();
                crate::vae::replacement::load(path, &vae_config, wd, &load.device)?
            }
            None => {
                let mut weights = checkpoint.vae(vae_config.block_out_channels.len())?;
                weights.store_matrices_as(wd);
                let vae = AutoencoderKl::from_weights(vae_config, &weights.root())?;
                weights.finish()?;
                crate::vae::Vae::Kl(vae)
            }
        };

        let mut text_encoders = Vec::new();
        for (i, (tokenizer, encoder)) in TEXT_ENCODERS
            .into_iter()
            .enumerate()
            .skip(first)
            .take(encoders)
        {
            let file = format!("{encoder}/config.json");
            let config = ClipTextConfig::from_json(&configs.require(&file)?, &configs.path(&file))?;
            let projection = i == 1;
            let mut weights = checkpoint.text_encoder(i - first, &config, projection)?;
            weights.store_matrices_as(wd);
            loras.patch(&mut weights, Part::TextEncoder(i))?;
            let model = ClipTextModel::from_weights(config, &weights)?;
            weights.finish()?;
            text_encoders.push(TextEncoder {
                tokenizer: std::sync::Arc::new(configs.tokenizer(tokenizer)?),
                model,
            });
        }
        checkpoint.finish()?;
        let load_warnings = loras.finish()?;

        let scheduler_path = configs.path("scheduler/scheduler_config.json");
        let mut scheduler_config: Value = parse_json(
            &configs.require("scheduler/scheduler_config.json")?,
            &scheduler_path,
        )?;
        let original = original
            .map(|(y, config)| {
                let text_width = unet.config.cross_attention_dim().unwrap_or(0);
                match config.mismatch(unet.config.block_out_channels[0], text_width) {
                    Some(why) => Err(Error::config(y, why)),
                    None => Ok(config),
                }
            })
            .transpose()?;
        let prediction = match &options.prediction_type {
            Some(p) => Some(p.clone()),
            None if original
                .as_ref()
                .is_some_and(|o| o.prediction_type.is_some()) =>
            {
                original
                    .as_ref()
                    .and_then(|o| o.prediction_type)
                    .map(str::to_string)
            }
            None if arch == Architecture::Sd2 && options.config.is_none() => {
                Some(probe_prediction_type(&unet, device)?.to_string())
            }
            None => None,
        };
        if let Some(prediction) = prediction {
            if !matches!(prediction.as_str(), "epsilon" | "v_prediction") {
                return Err(Error::InvalidRequest(format!(
                    "prediction type `{prediction}`: use epsilon or v_prediction"
                )));
            }
            scheduler_config["prediction_type"] = Value::from(prediction);
        }
        let class = index
            .pointer("/scheduler/1")
            .or_else(|| scheduler_config.get("_class_name"))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(&scheduler_path, "no scheduler class named"))?
            .to_string();
        let folder_scheduler = SchedulerKind::from_diffusers_class(&class, &scheduler_config)?;
        let mut defaults = ModelDefaults::default();
        if arch == Architecture::Sd2
            && options.config.is_none()
            && scheduler_config["prediction_type"] == "v_prediction"
        {
            // The v-prediction SD 2.x models were trained at 768x768.
            defaults.width = Some(768);
            defaults.height = Some(768);
        }
        let name = path
            .file_stem()
            .map_or_else(|| "checkpoint".into(), |s| s.to_string_lossy().into_owned());
        let pipeline = Pipeline {
            name,
            family,
            text_encoders,
            unet,
            guide_unet: None,
            vae,
            scheduler_config,
            folder_scheduler,
            force_zeros_for_empty_prompt: index
                .get("force_zeros_for_empty_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(family == Family::StableDiffusionXl),
            defaults,
            embeddings: Vec::new(),
            skipped_embeddings: Vec::new(),
            load_warnings,
            preview_vae: None,
            controlnets: Vec::new(),
            aesthetic_time_ids: index
                .get("requires_aesthetics_score")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            refiner: None,
            device: device.clone(),
        };
        pipeline.check_widths(&unet_path)?;
        Ok(pipeline)
    }
}

/// A1111's test for SD 2.x v-prediction checkpoints: at t = 999, with input and context all
/// 0.5, an epsilon U-Net predicts about the input itself, a v U-Net far below it.
fn probe_prediction_type(unet: &UNet, device: &Device) -> Result<&'static str> {
    let context_width = unet.config.cross_attention_dim().unwrap_or(1024);
    let x = (Tensor::ones(
        (1, unet.config.in_channels, 8, 8),
        candle_core::DType::F32,
        device,
    )? * 0.5)?;
    let context = (Tensor::ones((1, 2, context_width), candle_core::DType::F32, device)? * 0.5)?;
    let out = unet.forward_conditioned(&x, &[999.0], &context, &ExtraConditions::default())?;
    let mean = (out - &x)?.mean_all()?.to_scalar::<f32>()?;
    Ok(if mean < -1.0 {
        "v_prediction"
    } else {
        "epsilon"
    })
}

/// Writes a single-file checkpoint as a diffusers folder at `out`: each component's weights
/// under diffusers' names in their stored dtype (the weight matrices as `matrices` where it
/// is given), the configs it was loaded with (the
/// scheduler's prediction type as resolved), and the tokenizer files. The checkpoint is
/// loaded first, so a file that does not load is not converted; the folder is written beside
/// `out` and renamed into place, so a failed conversion leaves nothing behind.
pub fn convert_single_file(
    path: &Path,
    options: &SingleFileOptions,
    matrices: Option<MatrixDtype>,
    out: &Path,
) -> Result<()> {
    if out.exists() {
        return Err(Error::config(out, "already exists; choose a new folder"));
    }
    let pipeline = Pipeline::load_single_file(path, options)?;
    let scheduler_config = pipeline.scheduler_config.clone();
    let defaults = pipeline.defaults.clone();
    drop(pipeline);
    let mut checkpoint = Checkpoint::open(path, &options.load.device)?;
    let arch = checkpoint.architecture;
    let (configs, _) = configs_for(path, options, arch)?;
    super::convert::write_staged(out, |staging| {
        let write_text = |file: &str, text: &str| -> Result<()> {
            let target = staging.join(file);
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            std::fs::write(&target, text).map_err(|e| Error::io(&target, e))
        };
        let write_weights = |component: &str,
                             file: &str,
                             weights: Weights,
                             model: &dyn Fn(&Weights) -> Result<()>| {
            let file = staging.join(component).join(file);
            super::convert::write_weights(weights, matrices, model, &file)
        };
        let copy = |file: &str| -> Result<String> {
            let text = configs.require(file)?;
            write_text(file, &text)?;
            Ok(text)
        };
        copy("model_index.json")?;
        let unet_text = unet_config_text(&configs, checkpoint.inpainting)?;
        write_text("unet/config.json", &unet_text)?;
        let vae_text = copy("vae/config.json")?;
        let unet_config = UNetConfig::from_json(&unet_text, &configs.path("unet/config.json"))?;
        write_weights(
            "unet",
            "diffusion_pytorch_model.safetensors",
            checkpoint.unet(&unet_config, options.ema)?,
            &|w| UNet::from_weights(unet_config.clone(), &w.root()).map(drop),
        )?;
        let vae_config = VaeConfig::from_json(&vae_text, &configs.path("vae/config.json"))?;
        write_weights(
            "vae",
            "diffusion_pytorch_model.safetensors",
            checkpoint.vae(vae_config.block_out_channels.len())?,
            &|w| AutoencoderKl::from_weights(vae_config.clone(), &w.root()).map(drop),
        )?;
        // The encoders' slots as the load fills them: the refiner's one encoder is the
        // second (`text_encoder_2`, with its projection).
        let (encoders, first) = (arch.text_encoders().len(), arch.first_encoder_slot());
        for (i, (tokenizer, encoder)) in TEXT_ENCODERS
            .into_iter()
            .enumerate()
            .skip(first)
            .take(encoders)
        {
            let file = format!("{encoder}/config.json");
            let text = copy(&file)?;
            let config = ClipTextConfig::from_json(&text, &configs.path(&file))?;
            write_weights(
                encoder,
                "model.safetensors",
                checkpoint.text_encoder(i - first, &config, i == 1)?,
                &|w| ClipTextModel::from_weights(config.clone(), w).map(drop),
            )?;
            for part in ["tokenizer_config.json", "special_tokens_map.json"] {
                copy(&format!("{tokenizer}/{part}"))?;
            }
            let (vocab, merges) = configs.vocabulary(tokenizer)?;
            write_text(&format!("{tokenizer}/vocab.json"), &vocab)?;
            write_text(&format!("{tokenizer}/merges.txt"), &merges)?;
        }
        let scheduler = serde_json::to_string_pretty(&scheduler_config)
            .map_err(|e| Error::config(staging, e.to_string()))?;
        write_text("scheduler/scheduler_config.json", &scheduler)?;
        if defaults.width.is_some() {
            // The size a v-prediction SD 2.x file defaults to, which diffusers reads from the
            // U-Net's sample size.
            let mut unet: Value = parse_json(&unet_text, &configs.path("unet/config.json"))?;
            unet["sample_size"] = Value::from(defaults.width.unwrap_or(512) / 8);
            let text = serde_json::to_string_pretty(&unet)
                .map_err(|e| Error::config(staging, e.to_string()))?;
            write_text("unet/config.json", &text)?;
        }
        Ok(())
    })
}

/// Where a checkpoint's configs come from: `--config`'s folder or the released architecture's,
/// with the layout and schedule of its original yaml (the one named, or `NAME.yaml` beside
/// the file, as A1111 reads it) over them.
fn configs_for(
    path: &Path,
    options: &SingleFileOptions,
    arch: Architecture,
) -> Result<(ConfigFiles, Option<(PathBuf, OriginalConfig)>)> {
    let configs = ConfigFiles::new(options.config.clone(), arch);
    let yaml = options.original_config.clone().or_else(|| {
        let beside = path.with_extension("yaml");
        beside.is_file().then_some(beside)
    });
    let Some(yaml) = yaml else {
        return Ok((configs, None));
    };
    let original = OriginalConfig::read(&yaml)?;
    let configs = configs.described_by(&yaml, &original.architecture);
    Ok((configs, Some((yaml, original))))
}

/// The U-Net's config: an inpainting checkpoint (9 input channels: the latents, the mask and
/// the masked picture's latents) takes the released architecture's with `in_channels` 9, as
/// `stable-diffusion-inpainting` is SD 1.5 with such a U-Net.
fn unet_config_text(configs: &ConfigFiles, inpainting: bool) -> Result<String> {
    let text = configs.require("unet/config.json")?;
    if !inpainting {
        return Ok(text);
    }
    let path = configs.path("unet/config.json");
    let mut unet: Value = parse_json(&text, &path)?;
    unet["in_channels"] = Value::from(9);
    serde_json::to_string_pretty(&unet).map_err(|e| Error::config(path, e.to_string()))
}
