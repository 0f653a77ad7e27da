//! `train`: the second stage of the Latent Diffusion recipe. A U-Net learns to predict the
//! noise (or v) added to the autoencoder's latents at random timesteps, conditioned through
//! cross-attention on a text encoder that is either frozen (taken from a model folder, as
//! Stable Diffusion does) or trained jointly from scratch with the CLIP tokenizer (as the
//! Latent Diffusion paper does). Captions are dropped at random so the model also learns the
//! unconditional prediction that classifier-free guidance needs.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::autoencoder::export_weights;
use super::checkpoint::{self, write_json, Checkpoint};
use super::data::DataSource;
use super::log::TrainLog;
use super::optim::{AdamW, AdamWConfig};
use super::step_rng;
use crate::error::{Error, Result};
use crate::latent::unet::{UNet, UNetConfig};
use crate::text::clip::{ClipTextConfig, ClipTextModel};
use crate::text::tokenizer::ClipTokenizer;
use crate::vae::AutoencoderKl;
use crate::weights::store::find_weight_files;
use crate::weights::{ParamStore, Vb, Weights};

/// A second data source (`shapes` or a folder) whose items replace a `fraction` of the main
/// source's, chosen by position (so a resumed run sees the same stream).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataMix {
    pub data: String,
    pub fraction: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainOptions {
    pub data: String,
    pub out: PathBuf,
    /// A folder holding `vae/` (e.g. the output of `train-vae`, or any SD model folder).
    pub vae: PathBuf,
    /// `None`: a CLIP-architecture text encoder trained jointly; `Some(dir)`: the frozen
    /// `text_encoder/` and `tokenizer/` of that model folder.
    pub frozen_text_encoder: Option<PathBuf>,
    /// The tokenizer folder for a joint text encoder (the CLIP vocabulary).
    pub tokenizer: PathBuf,
    pub size: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    /// Cosine decay of the learning rate over `steps` (to 10 %) after the warm-up; false:
    /// constant (runs checkpointed before the option existed).
    #[serde(default)]
    pub cosine: bool,
    pub ema_decay: f64,
    pub caption_dropout: f64,
    pub v_prediction: bool,
    /// The noise schedule rescaled so that the last timestep is pure noise (Lin et al.,
    /// "Common Diffusion Noise Schedules and Sample Steps are Flawed"), with `trailing`
    /// timesteps at inference. SD's schedule leaves 6.8 % of the signal at t = 999; on a
    /// 16x16 latent the mean of that signal (the background color) stands out of the noise's
    /// mean, so a model learns to read the background from the noise, and at inference, where
    /// the noise holds no image, it draws the background at random whatever the prompt says.
    /// Needs v-prediction (at SNR 0 the noise says nothing about the image).
    #[serde(default)]
    pub zero_terminal_snr: bool,
    /// Min-SNR-gamma loss weighting (Hang et al., "Efficient Diffusion Training via Min-SNR
    /// Weighting Strategy"): each sample's loss weighted by min(SNR, gamma) over its target's
    /// own SNR weighting, so the nearly clean timesteps, easy and many, stop dominating the
    /// gradient. `None`: plain MSE. Can be set or changed at `--resume`.
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// The share of timesteps drawn from the noisier half, t in [500, 1000), instead of
    /// uniformly over [0, 1000). What a model gets wrong last (where shapes go, which shape
    /// they are) is decided there; the nearly clean half only refines edges. `None`: uniform
    /// (and the random stream of runs made before the option). Can be set at `--resume`.
    #[serde(default)]
    pub late_timesteps: Option<f64>,
    /// Where the late share's range starts: t in [late_from, 1000). `None`: 500, the noisier
    /// half. A high start (850) trains only the steps where the input holds almost nothing
    /// of the image, so layout (where a shape goes) must come from the caption. Can be set
    /// at `--resume`.
    #[serde(default)]
    pub late_from: Option<usize>,
    /// A second data source mixed into `data` (see [`DataMix`]). Can be set at `--resume`.
    #[serde(default)]
    pub mix: Option<DataMix>,
    /// Learn the autoencoder's posterior means instead of samples from the posterior. A
    /// small autoencoder's sample noise (about a tenth of the latents' spread) blurs where an
    /// edge lies; a model of the means generates the latents a decoder fine-tuned on means
    /// (`train-vae --decode-mean`) expects. Can be switched on at `--resume`.
    #[serde(default)]
    pub latent_mean: bool,
    /// The jointly trained text encoder's learning rate as a share of the U-Net's. `None`:
    /// the same rate. Can be set at `--resume`.
    #[serde(default)]
    pub text_lr_scale: Option<f64>,
    /// Start from this model folder's U-Net (and, for a joint text encoder, its text encoder
    /// and tokenizer) instead of fresh weights: fine-tuning. The architecture comes from the
    /// folder's configs; the optimizer starts afresh.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    pub unet_channels: Vec<usize>,
    pub unet_layers: usize,
    pub unet_heads: usize,
    /// ResNet blocks take the timestep as a scale and shift of their normalised features
    /// (`resnet_time_scale_shift: "scale_shift"`) instead of an added bias.
    #[serde(default)]
    pub unet_scale_shift: bool,
    /// The size of the U-Net's first convolution (diffusers' `conv_in_kernel`, odd). At
    /// least the latent size + 1 wide, its taps reach past a border for every latent pixel,
    /// so on pure noise the variance of each output channel can follow where the pixel is:
    /// a position the later layers can read where the input holds no image yet (see
    /// docs/default-model.md).
    #[serde(default = "default_conv_in_kernel")]
    pub unet_conv_in_kernel: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_max_tokens: usize,
    pub seed: u64,
    pub save_every: usize,
    pub sample_every: usize,
    /// Stop after this step although the schedule spans `steps` (taken from the command
    /// line at `--resume`, never from the checkpoint).
    #[serde(default)]
    pub stop_at: Option<usize>,
    pub quiet: bool,
}

#[derive(Serialize, Deserialize)]
struct RunState {
    step: usize,
    options: TrainOptions,
}

/// The Min-SNR-gamma weight of a sample at cumulative alpha `acp`, as diffusers' training
/// scripts compute it: min(SNR, gamma) / SNR for an epsilon target, min(SNR, gamma) / (SNR + 1)
/// for a v target (whose loss already weights the image error by SNR + 1). At SNR 0 (the
/// zero-terminal schedule's last step) an epsilon weight is 1 and a v weight 0.
pub fn min_snr_weight(acp: f64, gamma: f64, v_prediction: bool) -> f64 {
    let snr = acp / (1.0 - acp).max(f64::MIN_POSITIVE);
    let clipped = snr.min(gamma);
    if v_prediction {
        clipped / (snr + 1.0)
    } else if snr == 0.0 {
        1.0
    } else {
        clipped / snr
    }
}

/// A training timestep in [0, 1000): uniform, or with probability `late` from the noisier
/// range [from, 1000) (from = 500 by default: that half then gets (1 + late) / 2 of the
/// samples). Draws one number when `late` is `None` or 0 (as runs before the option did),
/// two otherwise.
fn sample_timestep(rng: &mut crate::rng::TorchGenerator, late: Option<f64>, from: usize) -> usize {
    let t = (rng.uniform() * 1000.0) as usize;
    match late {
        // For from = 500 this is 500 + t / 2, the stream of runs made before `late_from`.
        Some(p) if p > 0.0 && rng.uniform() < p => from + t * (1000 - from) / 1000,
        _ => t,
    }
}

/// Stable Diffusion's training noise schedule: scaled-linear betas from 0.00085 to 0.012;
/// with `zero_terminal_snr`, sqrt(alpha-bar) shifted and scaled so that it keeps its first
/// value and reaches 0 at the last step (the schedulers' `rescale_betas_zero_snr`).
pub fn alphas_cumprod(steps: usize, zero_terminal_snr: bool) -> Vec<f64> {
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut prod = 1.0;
    let acp: Vec<f64> = (0..steps)
        .map(|i| {
            let beta = (a + (b - a) * i as f64 / (steps - 1) as f64).powi(2);
            prod *= 1.0 - beta;
            prod
        })
        .collect();
    if !zero_terminal_snr {
        return acp;
    }
    let (first, last) = (acp[0].sqrt(), acp[steps - 1].sqrt());
    acp.iter()
        .map(|v| ((v.sqrt() - last) * first / (first - last)).powi(2))
        .collect()
}

fn default_conv_in_kernel() -> usize {
    3
}

fn unet_config_json(o: &TrainOptions, cross_dim: usize) -> serde_json::Value {
    let n = o.unet_channels.len();
    let mut down = vec!["CrossAttnDownBlock2D"; n];
    let mut up = vec!["CrossAttnUpBlock2D"; n];
    // The deepest level works at the lowest resolution; it keeps attention too when there
    // are only two levels.
    if n > 2 {
        down[n - 1] = "DownBlock2D";
        up[0] = "UpBlock2D";
    }
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": o.size / 4,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": o.unet_channels,
        "layers_per_block": o.unet_layers,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": o.unet_heads,
        "norm_num_groups": 32usize.min(o.unet_channels[0]),
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "resnet_time_scale_shift": if o.unet_scale_shift { "scale_shift" } else { "default" },
        "conv_in_kernel": o.unet_conv_in_kernel,
        "conv_out_kernel": 3,
    })
}

fn text_config_json(o: &TrainOptions) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": o.text_hidden,
        "intermediate_size": o.text_hidden * 4,
        "num_hidden_layers": o.text_layers,
        "num_attention_heads": o.text_heads,
        "max_position_embeddings": o.text_max_tokens,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": o.text_hidden,
        "torch_dtype": "float32",
    })
}

/// Refuses a U-Net this trainer cannot train with a text encoder of width `cross_dim`.
fn check_unet_fits(unet: &UNetConfig, cross_dim: usize, path: &Path) -> Result<()> {
    if unet.text_time.is_some() {
        return Err(Error::config(
            path,
            "SDXL U-Nets (two text encoders, size conditioning) cannot be trained here",
        ));
    }
    if let Some(b) = unet
        .down_blocks
        .iter()
        .find(|b| b.cross_attention && b.cross_attention_dim != cross_dim)
    {
        return Err(Error::config(
            path,
            format!(
                "the U-Net's cross_attention_dim is {}, but the text encoder gives {cross_dim} \
                 features",
                b.cross_attention_dim
            ),
        ));
    }
    Ok(())
}

/// A fine-tuning source component's weights: the plain files, else the fp16 variant (folders
/// downloaded with only `*.fp16.safetensors`); the error names the plain files.
fn source_weights(dir: &Path) -> Result<Weights> {
    let files = match find_weight_files(dir, None) {
        Ok(files) => files,
        Err(e) => find_weight_files(dir, Some("fp16")).map_err(|_| e)?,
    };
    Weights::open_files(&files, &Device::Cpu)
}

/// Copies a folder's files (not recursive).
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    copy_files_where(from, to, |_| true)
}

/// Copies a component folder's files except its weights (a fine-tuning source's configs: the
/// run writes its own weights, and an SD folder's can be gigabytes).
fn copy_config_files(from: &Path, to: &Path) -> Result<()> {
    copy_files_where(from, to, |name| {
        !(name.contains(".safetensors") || name.contains(".bin"))
    })
}

/// Copies the files of a folder (not recursive) whose names `keep` accepts.
fn copy_files_where(from: &Path, to: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_file() && keep(name) {
            let target = to.join(name);
            std::fs::copy(&path, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    Ok(())
}

/// Writes the static parts of the output model folder (configs, tokenizer, VAE, scheduler).
/// A fine-tuning run takes its U-Net config (and a joint text encoder's config and tokenizer)
/// from the source folder when it starts; a resumed run keeps what it started with.
fn prepare_folder(o: &TrainOptions, resume: bool) -> Result<()> {
    let out = &o.out;
    let vae_dir = o.vae.join("vae");
    copy_files(&vae_dir, &out.join("vae"))?;
    if let Some(source) = &o.init_from {
        if !resume {
            copy_config_files(&source.join("unet"), &out.join("unet"))?;
            if o.frozen_text_encoder.is_none() {
                // Over the CLIP vocabulary: a folder may share it instead of holding a copy
                // (as the built-in model does).
                copy_files(&o.tokenizer, &out.join("tokenizer"))?;
                if source.join("tokenizer").is_dir() {
                    copy_files(&source.join("tokenizer"), &out.join("tokenizer"))?;
                }
                copy_config_files(&source.join("text_encoder"), &out.join("text_encoder"))?;
            }
        }
    }
    let tokenizer_dir = match &o.frozen_text_encoder {
        Some(dir) => Some(dir.join("tokenizer")),
        None if o.init_from.is_none() => Some(o.tokenizer.clone()),
        None => None,
    };
    if let Some(dir) = tokenizer_dir {
        copy_files(&dir, &out.join("tokenizer"))?;
    }
    if o.frozen_text_encoder.is_none() && o.init_from.is_none() {
        // The joint encoder's context is `text_max_tokens` long: make the tokenizer pad to it.
        let path = out.join("tokenizer").join("tokenizer_config.json");
        let mut cfg: serde_json::Value = crate::error::read_json(&path)?;
        cfg["model_max_length"] = o.text_max_tokens.into();
        write_json(&path, &cfg)?;
        write_json(
            &out.join("text_encoder").join("config.json"),
            &text_config_json(o),
        )?;
    } else if let Some(dir) = &o.frozen_text_encoder {
        copy_files(&dir.join("text_encoder"), &out.join("text_encoder"))?;
    }
    let prediction = if o.v_prediction {
        "v_prediction"
    } else {
        "epsilon"
    };
    write_json(
        &out.join("scheduler").join("scheduler_config.json"),
        &serde_json::json!({
            "_class_name": "DPMSolverMultistepScheduler",
            "_diffusers_version": "0.42.1",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "prediction_type": prediction,
            "steps_offset": if o.zero_terminal_snr { 0 } else { 1 },
            "timestep_spacing": if o.zero_terminal_snr { "trailing" } else { "leading" },
            "rescale_betas_zero_snr": o.zero_terminal_snr,
        }),
    )?;
    write_json(
        &out.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "safety_checker": [null, null],
            "requires_safety_checker": false,
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    write_json(
        &out.join("text2img.json"),
        &serde_json::json!({"steps": 20, "guidance_scale": 5.0, "width": o.size, "height": o.size}),
    )
}

/// One training batch after noising: what the text encoder and the U-Net see and what the
/// U-Net should predict.
pub struct NoisyBatch {
    pub ids: Vec<Vec<u32>>,
    /// The noised latents, (batch, channels, height, width).
    pub noisy: Tensor,
    pub timesteps: Vec<f64>,
    /// The noise or v, shaped as `noisy`.
    pub target: Tensor,
    /// Per-sample loss weights, (batch, 1, 1, 1) (Min-SNR weighting); `None`: all 1.
    pub weights: Option<Tensor>,
}

impl NoisyBatch {
    /// The loss of samples `start..start + len` and its gradients: their share of the batch's
    /// weighted mean squared error, so that the shards' losses and gradients sum to the whole
    /// batch's.
    pub fn loss_and_grads(
        &self,
        text_encoder: &ClipTextModel,
        unet: &UNet,
        start: usize,
        len: usize,
    ) -> Result<(f64, GradStore)> {
        debug_assert!(start + len <= self.ids.len() && self.ids.len() == self.noisy.dim(0)?);
        let scale = 1.0 / self.target.elem_count() as f64;
        let context = text_encoder.forward(&self.ids[start..start + len], 0)?;
        let noisy = self.noisy.narrow(0, start, len)?;
        let pred = unet.forward_timesteps(&noisy, &self.timesteps[start..start + len], &context)?;
        let target = self.target.narrow(0, start, len)?;
        let mut squared = (pred - target)?.sqr()?;
        if let Some(w) = &self.weights {
            squared = squared.broadcast_mul(&w.narrow(0, start, len)?)?;
        }
        let loss = (squared.sum_all()? * scale)?;
        let grads = loss.backward()?;
        Ok((loss.to_scalar::<f32>()? as f64, grads))
    }
}

pub struct TrainReport {
    pub images_per_second: f64,
    pub final_loss: f64,
    pub parameters: usize,
    /// The checkpoint's step a `--resume` run went on from (`None`: a fresh run).
    pub resumed_from: Option<usize>,
}

/// Mixed into the run's seed for the --mix source's own stream (the choice of source per item
/// hashes the run's seed itself).
const MIX_SEED: u64 = 0x6d69_7865_6420_6d78;

pub fn train(mut o: TrainOptions, resume: bool) -> Result<TrainReport> {
    let device = Device::Cpu;
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    let mut start = 0;
    let resumed = if resume {
        let ck: Checkpoint<RunState> = checkpoint::load(&o.out)?;
        start = ck.state.step;
        // The checkpoint keeps the run's architecture, data and seed; the command line gives
        // where the run lives now (a run folder copied or moved, to fork a run or carry it
        // to another machine, writes to its new place), the stage options, and the length.
        let cli = std::mem::replace(&mut o, ck.state.options.clone());
        o.out = cli.out;
        o.vae = cli.vae;
        o.tokenizer = cli.tokenizer;
        o.frozen_text_encoder = cli.frozen_text_encoder.or(o.frozen_text_encoder);
        o.late_from = cli.late_from.or(o.late_from);
        o.text_lr_scale = cli.text_lr_scale.or(o.text_lr_scale);
        o.snr_gamma = cli.snr_gamma.or(o.snr_gamma);
        o.late_timesteps = cli.late_timesteps.or(o.late_timesteps);
        o.mix = cli.mix.or(o.mix);
        o.latent_mean |= cli.latent_mean;
        // A run may switch to the zero-SNR schedule when resumed (fine-tuning), not back.
        o.zero_terminal_snr |= cli.zero_terminal_snr;
        o.steps = cli.steps.max(start);
        o.quiet = cli.quiet;
        o.sample_every = cli.sample_every;
        o.stop_at = cli.stop_at;
        Some(ck)
    } else {
        None
    };
    if o.snr_gamma.is_some_and(|g| !(g > 0.0 && g.is_finite())) {
        return Err(Error::InvalidRequest(
            "--snr-gamma must be a positive number (5 is the usual choice)".into(),
        ));
    }
    if o.late_timesteps.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(Error::InvalidRequest(
            "--late-timesteps must be a share between 0 and 1".into(),
        ));
    }
    if o.mix
        .as_ref()
        .is_some_and(|m| !(m.fraction > 0.0 && m.fraction <= 1.0))
    {
        return Err(Error::InvalidRequest(
            "--mix-fraction must be a share above 0 and at most 1".into(),
        ));
    }
    if o.late_from.is_some_and(|t| t >= 1000) {
        return Err(Error::InvalidRequest(
            "--late-from must be a timestep below 1000".into(),
        ));
    }
    if o.zero_terminal_snr && !o.v_prediction {
        return Err(Error::InvalidRequest(
            "the zero-terminal-SNR schedule needs v-prediction: at its last timestep the input \
             is pure noise, so a noise prediction says nothing about the image"
                .into(),
        ));
    }
    if let (Some(source), None) = (&o.init_from, &resumed) {
        let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
        if same(source, &o.out) {
            return Err(Error::InvalidRequest(format!(
                "--init-from {} is the output folder: fine-tune into another folder (the run \
                 would overwrite the model it starts from)",
                source.display()
            )));
        }
        if !source.join("unet").join("config.json").is_file() {
            return Err(Error::config(
                source,
                "--init-from needs a model folder with unet/config.json",
            ));
        }
        if o.frozen_text_encoder.is_none() && !source.join("text_encoder").is_dir() {
            return Err(Error::config(
                source,
                "--init-from with a joint text encoder needs the folder's text_encoder/",
            ));
        }
        // Before anything is written to the output folder.
        let text_dir = match &o.frozen_text_encoder {
            Some(dir) => dir.join("text_encoder"),
            None => source.join("text_encoder"),
        };
        let text_config = ClipTextConfig::from_file(&text_dir.join("config.json"))?;
        let unet_path = source.join("unet").join("config.json");
        check_unet_fits(
            &UNetConfig::from_file(&unet_path)?,
            text_config.hidden_size,
            &unet_path,
        )?;
    }
    prepare_folder(&o, resumed.is_some())?;
    let tokenizer = ClipTokenizer::from_folder(&o.out.join("tokenizer"))?;
    let vae = AutoencoderKl::load(&o.out.join("vae"), None, &device)?;
    let scaling = vae.config.scaling_factor;

    let params = ParamStore::new(o.seed, &device);
    let text_encoder = match &o.frozen_text_encoder {
        Some(_) => ClipTextModel::load(&o.out.join("text_encoder"), None, &device)?,
        None => {
            let config =
                ClipTextConfig::from_file(&o.out.join("text_encoder").join("config.json"))?;
            ClipTextModel::from_vb(config, &Vb::from(&params).pp("text_model"), None)?
        }
    };
    let cross_dim = text_encoder.config.hidden_size;
    let unet_config_path = o.out.join("unet").join("config.json");
    if o.init_from.is_none() {
        write_json(&unet_config_path, &unet_config_json(&o, cross_dim))?;
    }
    // A fine-tuning source's config was checked against its text encoder at the start; a
    // generated one is built for `cross_dim`.
    let unet_config = UNetConfig::from_file(&unet_config_path)?;
    if o.init_from.is_some() {
        // The record of the run names the architecture it really trains.
        o.unet_channels = unet_config.block_out_channels.clone();
        o.unet_scale_shift = unet_config.time_scale_shift;
        o.unet_conv_in_kernel = unet_config.conv_in_kernel;
        if let Some(first) = unet_config.down_blocks.first() {
            (o.unet_layers, o.unet_heads) = (first.layers, first.heads);
        }
        if o.frozen_text_encoder.is_none() {
            let t = &text_encoder.config;
            (o.text_hidden, o.text_layers) = (t.hidden_size, t.num_hidden_layers);
            (o.text_heads, o.text_max_tokens) = (t.num_attention_heads, t.max_position_embeddings);
        }
    }
    let unet_params = ParamStore::new(o.seed.wrapping_add(1), &device);
    let unet = UNet::from_weights(unet_config, &Vb::from(&unet_params))?;
    if let (Some(source), None) = (&o.init_from, &resumed) {
        unet_params.load_from(&source_weights(&source.join("unet"))?)?;
        if o.frozen_text_encoder.is_none() {
            let mut weights = source_weights(&source.join("text_encoder"))?;
            // transformers 5 saves the transformer without its `text_model.` prefix.
            let unprefixed: Vec<String> = weights
                .names()
                .filter(|n| !n.starts_with("text_model."))
                .cloned()
                .collect();
            for name in unprefixed {
                weights.alias(format!("text_model.{name}"), name);
            }
            params.load_from(&weights)?;
        }
    }
    let mut vars: Vec<_> = unet_params
        .vars()
        .into_iter()
        .map(|(k, v)| (format!("unet.{k}"), v))
        .collect();
    vars.extend(
        params
            .vars()
            .into_iter()
            .map(|(k, v)| (format!("text_encoder.{k}"), v)),
    );
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            lr: o.lr,
            warmup_steps: o.warmup_steps,
            decay_steps: o.cosine.then_some(o.steps),
            ema_decay: o.ema_decay,
            ..Default::default()
        },
    )?;
    if let Some(scale) = o.text_lr_scale {
        opt.scale_lr("text_encoder.", scale);
    }
    if let Some(ck) = &resumed {
        let split = |prefix: &str| {
            ck.params
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
                .collect()
        };
        unet_params.load_values(&split("unet."))?;
        params.load_values(&split("text_encoder."))?;
        opt.load_state(&ck.optimizer, start)?;
    }
    let mut data = DataSource::open(&o.data, o.seed, o.size)?;
    if let Some(mix) = &o.mix {
        // Its own seed: a `shapes` mix must not repeat the main stream's items.
        let extra = DataSource::open(&mix.data, o.seed ^ MIX_SEED, o.size)?;
        data = DataSource::mixed(data, extra, mix.fraction, o.seed)?;
    }
    // Sample prompts: four captions from a part of the stream far from what training reads
    // first (for a folder, the positions wrap around to its first captions).
    let sample_prompts = if o.sample_every > 0 {
        data.batch(1 << 40, 4, &device)?.captions
    } else {
        Vec::new()
    };
    let acp = alphas_cumprod(1000, o.zero_terminal_snr);
    // The last step of this invocation: --stop-at ends a stage before the schedule does.
    let end = o.stop_at.map_or(o.steps, |n| n.min(o.steps));
    let mut log = TrainLog::open(&o.out, "step,loss,lr,grad_norm", start, end, o.quiet)?;
    let parameters = unet_params.num_parameters() + params.num_parameters();
    log.println(format!(
        "U-Net {} parameters, text encoder {} trainable parameters",
        unet_params.num_parameters(),
        params.num_parameters()
    ));
    let mut last_loss = f64::NAN;
    for step in start..end {
        let batch = data.batch((step * o.batch) as u64, o.batch, &device)?;
        let mut rng = step_rng(o.seed, step as u64);
        // The autoencoder is frozen: its latents carry no gradient.
        let (mean, logvar) = vae.encode(&batch.images)?;
        // Drawn either way, so the random stream does not depend on the option.
        let eps = rng.randn(mean.dims(), &device)?;
        let z0 = (training_latent(mean, &logvar, &eps, o.latent_mean)? * scaling)?.detach();
        let b = o.batch;
        let timesteps: Vec<usize> = (0..b)
            .map(|_| sample_timestep(&mut rng, o.late_timesteps, o.late_from.unwrap_or(500)))
            .collect();
        let ids: Vec<Vec<u32>> = batch
            .captions
            .iter()
            .map(|c| {
                let drop = rng.uniform() < o.caption_dropout;
                tokenizer.encode_padded(if drop { "" } else { c }).ids
            })
            .collect();
        let noise = rng.randn(z0.dims(), &device)?;
        let coef = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = timesteps.iter().map(|&t| f(acp[t]) as f32).collect();
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), &device)?)
        };
        let (sa, sb) = (coef(&|a| a.sqrt())?, coef(&|a| (1.0 - a).sqrt())?);
        let noisy = (z0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?;
        let target = if o.v_prediction {
            (noise.broadcast_mul(&sa)? - z0.broadcast_mul(&sb)?)?
        } else {
            noise
        };
        let t_f: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let weights = match o.snr_gamma {
            Some(gamma) => Some(coef(&|a| min_snr_weight(a, gamma, o.v_prediction))?),
            None => None,
        };
        let noisy_batch = NoisyBatch {
            ids,
            noisy,
            timesteps: t_f,
            target,
            weights,
        };
        let shard =
            |start: usize, len: usize| noisy_batch.loss_and_grads(&text_encoder, &unet, start, len);
        let (losses, grads): (Vec<f64>, Vec<_>) = super::shards(b, &shard)?.into_iter().unzip();
        let stats = opt.step_summed(&grads)?;
        last_loss = losses.iter().sum();
        log.step(step + 1, last_loss, b, &[stats.lr, stats.grad_norm])?;
        let done = step + 1 == end;
        let saving = (step + 1) % o.save_every == 0 || done;
        if saving {
            save(&o, &unet_params, &params, &opt, step + 1)?;
            export(&o, &opt)?;
        }
        if o.sample_every > 0 && (step + 1) % o.sample_every == 0 {
            if !saving {
                export(&o, &opt)?;
            }
            let path = write_samples(&o, step + 1, &sample_prompts)?;
            log.println(format!("samples: {}", path.display()));
        }
    }
    log.finish();
    Ok(TrainReport {
        images_per_second: log.images_per_second(),
        final_loss: last_loss,
        parameters,
        resumed_from: resume.then_some(start),
    })
}

fn save(
    o: &TrainOptions,
    unet: &ParamStore,
    text: &ParamStore,
    opt: &AdamW,
    step: usize,
) -> Result<()> {
    let mut all = std::collections::BTreeMap::new();
    for (k, v) in unet.tensors(DType::F32)? {
        all.insert(format!("unet.{k}"), v);
    }
    for (k, v) in text.tensors(DType::F32)? {
        all.insert(format!("text_encoder.{k}"), v);
    }
    checkpoint::save(
        &o.out,
        &Checkpoint {
            params: all,
            optimizer: opt.state()?,
            state: RunState {
                step,
                options: o.clone(),
            },
        },
    )
}

/// Renders the sample prompts x 4 seeds with the output folder as it now is (the EMA
/// weights) into `samples/step-NNNNNN.png`, so a run can be watched as it learns.
fn write_samples(o: &TrainOptions, step: usize, prompts: &[String]) -> Result<std::path::PathBuf> {
    let pipeline = crate::pipeline::load_local(&o.out, &Default::default())?;
    let mut rows = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let request = crate::pipeline::GenerateRequest {
            seed: Some(0),
            num_images: 4,
            ..crate::pipeline::GenerateRequest::new(prompt.clone())
        };
        rows.push(pipeline.generate(&request, &mut |_| true)?.images);
    }
    let (rgb, w, h) = crate::png_out::grid(&rows, 2)?;
    let dir = o.out.join("samples");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(format!("step-{step:06}.png"));
    let text = format!("step {step}; rows: {}; seeds 0..3", prompts.join(" | "));
    crate::png_out::write_atomic(
        &path,
        &crate::png_out::encode_rgb_png(&rgb, w, h, Some(&text))?,
    )?;
    Ok(path)
}

/// Writes the EMA weights into the output folder's diffusers layout.
fn export(o: &TrainOptions, opt: &AdamW) -> Result<()> {
    let ema = opt.ema()?;
    let part = |prefix: &str| -> std::collections::BTreeMap<String, Tensor> {
        ema.iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect()
    };
    export_weights(
        &part("unet."),
        &o.out
            .join("unet")
            .join("diffusion_pytorch_model.safetensors"),
    )?;
    if o.frozen_text_encoder.is_none() {
        export_weights(
            &part("text_encoder."),
            &o.out.join("text_encoder").join("model.safetensors"),
        )?;
    }
    Ok(())
}

/// The latent a training step learns: the posterior mean (`latent_mean`) or a sample from the
/// posterior, `mean + exp(logvar / 2) * eps`.
fn training_latent(
    mean: Tensor,
    logvar: &Tensor,
    eps: &Tensor,
    latent_mean: bool,
) -> Result<Tensor> {
    if latent_mean {
        Ok(mean)
    } else {
        Ok((mean + ((logvar * 0.5)?.exp()? * eps)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::{alphas_cumprod, min_snr_weight, sample_timestep, training_latent};
    use candle_core::{Device, Tensor};

    #[test]
    fn latent_mean_learns_the_mean_and_otherwise_a_posterior_sample() {
        let d = Device::Cpu;
        let mean = Tensor::new(&[1.0f32, -2.0, 0.5], &d).unwrap();
        let logvar = Tensor::new(&[0.0f32, (0.25f32).ln() * 2.0, -100.0], &d).unwrap();
        let eps = Tensor::new(&[2.0f32, 4.0, 3.0], &d).unwrap();
        let values = |latent_mean| -> Vec<f32> {
            training_latent(mean.clone(), &logvar, &eps, latent_mean)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(values(true), [1.0, -2.0, 0.5]);
        // Standard deviations 1, 0.25 and about 0.
        let sampled = values(false);
        for (got, want) in sampled.iter().zip([3.0f32, -1.0, 0.5]) {
            assert!((got - want).abs() < 1e-5, "{sampled:?}");
        }
    }

    /// Without the option the stream is the old one (one draw per timestep); with it, the
    /// asked share lands in the noisier half on top of the uniform draws' own half.
    #[test]
    fn late_timesteps_shift_the_share_of_noisy_samples() {
        for off in [None, Some(0.0)] {
            let mut a = super::super::step_rng(5, 0);
            let mut b = super::super::step_rng(5, 0);
            for _ in 0..100 {
                assert_eq!(
                    sample_timestep(&mut a, off, 500),
                    (b.uniform() * 1000.0) as usize
                );
            }
        }
        let share = |late: f64| {
            let mut rng = super::super::step_rng(6, 0);
            let n = 20_000;
            let ts: Vec<usize> = (0..n)
                .map(|_| sample_timestep(&mut rng, Some(late), 500))
                .collect();
            assert!(ts.iter().all(|&t| t < 1000));
            ts.iter().filter(|&&t| t >= 500).count() as f64 / n as f64
        };
        assert_eq!(share(1.0), 1.0);
        assert!((share(0.0) - 0.5).abs() < 0.02, "{}", share(0.0));
        assert!((share(0.2) - 0.6).abs() < 0.02, "{}", share(0.2));
        assert!((share(0.5) - 0.75).abs() < 0.02, "{}", share(0.5));
        // A later start: every late draw lands in [850, 1000), spread over all of it.
        let mut rng = super::super::step_rng(7, 0);
        let ts: Vec<usize> = (0..20_000)
            .map(|_| sample_timestep(&mut rng, Some(1.0), 850))
            .collect();
        assert!(ts.iter().all(|&t| (850..1000).contains(&t)));
        assert!(ts.contains(&850) && ts.contains(&999));
        let high = ts.iter().filter(|&&t| t >= 925).count() as f64 / ts.len() as f64;
        assert!((high - 0.5).abs() < 0.02, "{high}");
    }

    /// Min-SNR-5 weights on SD's schedule and the zero-terminal one: noisy timesteps (SNR
    /// below gamma) keep an epsilon weight of 1, clean ones are scaled down to gamma / SNR;
    /// v targets carry the extra 1 / (SNR + 1); SNR 0 gives 1 (epsilon) and 0 (v).
    #[test]
    fn min_snr_weights() {
        let sd = alphas_cumprod(1000, false);
        let snr = |a: f64| a / (1.0 - a);
        // t = 0: SNR ~ 1175 (alpha-bar 0.99915).
        let s0 = snr(sd[0]);
        assert!((s0 - 1175.5).abs() < 1.0, "{s0}");
        assert!((min_snr_weight(sd[0], 5.0, false) - 5.0 / s0).abs() < 1e-12);
        assert!((min_snr_weight(sd[0], 5.0, true) - 5.0 / (s0 + 1.0)).abs() < 1e-12);
        // t = 999: SNR 0.0047, below gamma.
        let s999 = snr(sd[999]);
        assert_eq!(min_snr_weight(sd[999], 5.0, false), 1.0);
        assert!((min_snr_weight(sd[999], 5.0, true) - s999 / (s999 + 1.0)).abs() < 1e-12);
        let zero = alphas_cumprod(1000, true);
        assert_eq!(min_snr_weight(zero[999], 5.0, false), 1.0);
        assert_eq!(min_snr_weight(zero[999], 5.0, true), 0.0);
        // The weights never grow past 1 and fall monotonically with the SNR (epsilon).
        let w: Vec<f64> = sd.iter().map(|&a| min_snr_weight(a, 5.0, false)).collect();
        assert!(w.iter().all(|&x| x > 0.0 && x <= 1.0));
        assert!(w.windows(2).all(|p| p[0] <= p[1] + 1e-15));
    }

    /// diffusers' `DDPMScheduler(beta_start=0.00085, beta_end=0.012,
    /// beta_schedule="scaled_linear", rescale_betas_zero_snr=...).alphas_cumprod` (float32).
    #[test]
    fn noise_schedules_match_diffusers() {
        let zero = alphas_cumprod(1000, true);
        let expected = [
            (0, 0.999_149_98),
            (1, 0.998_233_5),
            (250, 0.652_456_76),
            (500, 0.241_018_64),
            (900, 0.002_960_391_3),
            (998, 1.967_963_4e-7),
            (999, 0.0),
        ];
        for (t, want) in expected {
            let got = zero[t];
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-2),
                "t {t}: {got} vs {want}"
            );
        }
        // SD's own schedule keeps 6.8 % of the signal (sqrt of alpha-bar) at its last step.
        let sd = alphas_cumprod(1000, false);
        assert!((sd[999].sqrt() - 0.0683).abs() < 1e-3, "{}", sd[999].sqrt());
        assert!((sd[0] - zero[0]).abs() < 1e-12);
    }
}
