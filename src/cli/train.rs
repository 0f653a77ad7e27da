//! `dataset`, `train-vae` and `train`: flags to options, then the library's training loops.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use text2img::train::autoencoder::{train_vae, TrainVaeOptions};
use text2img::train::latent::{train, DataMix, TrainOptions};
use text2img::train::shapes::{write_selection, Selection};

#[derive(Args)]
pub struct DatasetArgs {
    /// The generator (only `shapes`).
    pub kind: String,
    #[arg(long)]
    pub count: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
    /// Keep only one-shape images in these cells (comma-separated: `top left,bottom right`,
    /// or `all`); files keep their index in the stream. For curricula.
    #[arg(long)]
    pub cells: Option<String>,
    /// Keep only two-shape images; files keep their index in the stream. For curricula.
    #[arg(long, conflicts_with = "cells")]
    pub two_shapes: bool,
    /// Captions that state every attribute (size, position, background) instead of the
    /// grammar's random half of them. For curricula.
    #[arg(long)]
    pub full_captions: bool,
}

pub fn dataset(a: DatasetArgs) -> Result<()> {
    if a.kind != "shapes" {
        bail!("unknown data set `{}`; known: shapes", a.kind);
    }
    let selection = Selection {
        cells: a.cells.as_deref().map(Selection::parse_cells).transpose()?,
        two_shapes: a.two_shapes,
        full_captions: a.full_captions,
    };
    let written = write_selection(a.count, a.seed, &selection, &a.out)?;
    println!(
        "wrote {written} images with captions to {}{}",
        a.out.display(),
        if written < a.count {
            format!(" (of the stream's first {})", a.count)
        } else {
            String::new()
        }
    );
    Ok(())
}

fn parse_list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("`{s}` is not a comma-separated list of numbers"))
        })
        .collect()
}

#[derive(Args)]
pub struct TrainVaeArgs {
    /// `shapes` or a folder of images with same-named .txt captions.
    #[arg(long, default_value = "shapes")]
    pub data: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Learning-rate schedule after the warm-up: cosine (decays to 10 % at the last step)
    /// or constant.
    #[arg(long, default_value = "cosine", value_parser = ["cosine", "constant"])]
    pub lr_schedule: String,
    /// Channels per level; n levels downsample by 2^(n-1).
    #[arg(long, default_value = "32,64,64")]
    pub channels: String,
    #[arg(long, default_value_t = 4)]
    pub latent_channels: usize,
    #[arg(long, default_value_t = 1)]
    pub layers_per_block: usize,
    #[arg(long, default_value_t = 16)]
    pub norm_groups: usize,
    #[arg(long, default_value_t = 1e-6)]
    pub kl_weight: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 250)]
    pub save_every: usize,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Fine-tune the decoder of this diffusers `vae/` folder (config.json and
    /// diffusion_pytorch_model.safetensors) with its encoder frozen: the latents keep their
    /// meaning, so a U-Net trained on them works with the new decoder. The architecture
    /// options and the scaling factor come from the folder.
    #[arg(long)]
    pub finetune_decoder: Option<PathBuf>,
    /// With --finetune-decoder: Gaussian noise of this standard deviation, in the U-Net's
    /// units (scaled latents), added to the latents the decoder learns from, so that it draws
    /// crisp shapes from a U-Net's slightly-off latents too.
    #[arg(long, default_value_t = 0.0)]
    pub latent_noise: f64,
    /// With --finetune-decoder: multiply the autoencoder's channel counts (and GroupNorm
    /// groups) by this factor first, keeping what it computes: a larger decoder for the same
    /// latents. The encoder widens too (one channel list for both in the diffusers layout)
    /// and still gives the same latents.
    #[arg(long, default_value_t = 1)]
    pub widen: usize,
    /// Weight of a second reconstruction loss that sees only visible errors: per pixel, the
    /// RGB distance (0-255 units) between reconstruction and image above
    /// --visible-error-threshold, squared. Mean squared error spends little on a faint halo
    /// pixel beside an edge, but such pixels change a shape's outline. 0: off.
    #[arg(long, default_value_t = 0.0)]
    pub visible_error_weight: f64,
    /// The RGB distance (0-255 units) below which --visible-error-weight ignores an error.
    #[arg(long, default_value_t = 17.5)]
    pub visible_error_threshold: f64,
    /// With --finetune-decoder: learn from the encoder's posterior mean, not a sample from it
    /// (the sample's noise teaches the decoder to blur edges it could place exactly).
    #[arg(long)]
    pub decode_mean: bool,
}

pub fn train_vae_cmd(a: TrainVaeArgs) -> Result<()> {
    let options = TrainVaeOptions {
        data: a.data,
        out: a.out.clone(),
        size: a.size,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        cosine: a.lr_schedule == "cosine",
        channels: parse_list(&a.channels)?,
        latent_channels: a.latent_channels,
        layers_per_block: a.layers_per_block,
        norm_groups: a.norm_groups,
        kl_weight: a.kl_weight,
        seed: a.seed,
        save_every: a.save_every.max(1),
        quiet: a.quiet,
        finetune_decoder: a.finetune_decoder,
        latent_noise: a.latent_noise,
        widen: a.widen,
        visible_error_weight: a.visible_error_weight,
        visible_error_threshold: a.visible_error_threshold,
        decode_mean: a.decode_mean,
    };
    let report = train_vae(options, a.resume)?;
    println!(
        "VAE in {}: held-out reconstruction {:.2} dB PSNR, scaling_factor {:.4}, {:.1} images/s",
        a.out.display(),
        report.psnr_db,
        report.scaling_factor,
        report.images_per_second
    );
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    #[arg(long, default_value = "shapes")]
    pub data: String,
    #[arg(long)]
    pub out: PathBuf,
    /// A folder with the autoencoder in `vae/` (e.g. the --out of train-vae).
    #[arg(long)]
    pub vae: PathBuf,
    /// `joint`: a CLIP text encoder trained from scratch; `frozen`: the one of --text-model.
    #[arg(long, default_value = "joint")]
    pub text_encoder: String,
    /// The model folder whose text_encoder/ and tokenizer/ a frozen run uses (default: the
    /// --init-from folder).
    #[arg(long)]
    pub text_model: Option<PathBuf>,
    /// Fine-tune: start from this diffusers model folder's U-Net (and, with a joint text
    /// encoder, its text encoder and tokenizer) instead of fresh weights. The architecture
    /// comes from the folder, so the --unet-* and --text-* size options are not used; the
    /// prediction type and the zero-terminal-SNR schedule default to its scheduler's.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value_t = 5000)]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Learning-rate schedule after the warm-up: cosine (decays to 10 % at the last step)
    /// or constant.
    #[arg(long, default_value = "cosine", value_parser = ["cosine", "constant"])]
    pub lr_schedule: String,
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f64,
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    /// `epsilon` or `v_prediction` [default: the --init-from folder's, else epsilon].
    #[arg(long)]
    pub prediction: Option<String>,
    /// Rescale the noise schedule so that its last timestep is pure noise (needs
    /// v_prediction); may be switched on when resuming a run to fine-tune it.
    #[arg(long)]
    pub zero_terminal_snr: bool,
    /// Min-SNR-gamma loss weighting (5 is the usual gamma): the nearly clean timesteps stop
    /// dominating the gradient. May be set when resuming.
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Share P of the timesteps drawn from the noisier half (t >= 500), where layout and
    /// shape are decided; the rest stay uniform over all timesteps, so that half gets
    /// (1 + P) / 2 of them. 0 = uniform. May be set when resuming.
    #[arg(long)]
    pub late_timesteps: Option<f64>,
    /// The first timestep of the late share's range (default 500): e.g. 850 trains the
    /// steps where the input is almost pure noise, so where shapes go must come from the
    /// caption. May be set when resuming.
    #[arg(long)]
    pub late_from: Option<usize>,
    /// Learn the autoencoder's posterior means, not samples from it: the latents a decoder
    /// fine-tuned with `train-vae --decode-mean` expects. May be switched on when resuming.
    #[arg(long)]
    pub latent_mean: bool,
    /// A second data source (`shapes` or a folder) mixed into --data: each item of the
    /// stream comes from it with probability --mix-fraction, decided by the item's position,
    /// so a resumed run sees the same mix. For curricula (e.g. a folder of two-shape images
    /// written by `dataset shapes --two-shapes`). May be set when resuming.
    #[arg(long)]
    pub mix: Option<String>,
    /// The share of items drawn from --mix.
    #[arg(long, default_value_t = 0.5, requires = "mix")]
    pub mix_fraction: f64,
    /// A joint text encoder's learning rate as a share of the U-Net's (e.g. 0.1): trained at
    /// the full rate, it learns to drop words the U-Net cannot read yet (see
    /// docs/default-model.md). May be set when resuming.
    #[arg(long)]
    pub text_lr_scale: Option<f64>,
    #[arg(long, default_value = "64,128,128")]
    pub unet_channels: String,
    #[arg(long, default_value_t = 1)]
    pub unet_layers: usize,
    #[arg(long, default_value_t = 4)]
    pub unet_heads: usize,
    /// The timestep scales and shifts each ResNet block's normalised features
    /// (diffusers' `resnet_time_scale_shift: "scale_shift"`) instead of being added to them,
    /// so it can switch features off where the input holds no image yet.
    #[arg(long)]
    pub unet_scale_shift: bool,
    /// The size of the U-Net's first convolution (odd; diffusers' `conv_in_kernel`). At least
    /// the latent size + 1 (17 for 64x64 images and a factor-4 autoencoder) lets every latent
    /// pixel tell how far it is from each border even on pure noise: a position the U-Net can
    /// use at the noisiest steps, where the layout is decided.
    #[arg(long, default_value_t = 3)]
    pub unet_conv_in_kernel: usize,
    #[arg(long, default_value_t = 128)]
    pub text_hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub text_layers: usize,
    #[arg(long, default_value_t = 4)]
    pub text_heads: usize,
    /// Context length of a joint text encoder (captions are short).
    #[arg(long, default_value_t = 32)]
    pub text_max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 250)]
    pub save_every: usize,
    /// Every N steps, render four captions x four seeds with the EMA weights into
    /// OUT/samples/step-N.png (0: never).
    #[arg(long, default_value_t = 500)]
    pub sample_every: usize,
    /// Stop after step N (its checkpoint and export are written) while the learning-rate
    /// schedule still spans --steps, so that a later --resume carries on the same run: for
    /// runs in stages (e.g. a text encoder held still, then released with --text-lr-scale)
    /// or split over sessions.
    #[arg(long)]
    pub stop_at: Option<usize>,
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
}

pub fn train_cmd(a: TrainArgs) -> Result<()> {
    let frozen = match a.text_encoder.as_str() {
        "joint" => None,
        "frozen" => Some(
            a.text_model
                .clone()
                .or(a.init_from.clone())
                .context("--text-encoder frozen needs --text-model DIR")?,
        ),
        other => bail!("--text-encoder must be `joint` or `frozen`, not `{other}`"),
    };
    if a.unet_conv_in_kernel.is_multiple_of(2) {
        bail!(
            "--unet-conv-in-kernel must be odd (the convolution keeps the latent's size), not {}",
            a.unet_conv_in_kernel
        );
    }
    if let Some(scale) = a.text_lr_scale {
        if frozen.is_some() {
            bail!("--text-lr-scale is for a joint text encoder; a frozen one is not trained");
        }
        if !(scale.is_finite() && scale >= 0.0) {
            bail!("--text-lr-scale must be a share of the learning rate (0 or more), not {scale}");
        }
    }
    // A fine-tuning run keeps what its source was trained to predict unless told otherwise:
    // an SD 2.x v-prediction U-Net trained on noise targets would be ruined.
    let source = match &a.init_from {
        Some(dir) => source_schedule(dir)?,
        None => SourceSchedule::default(),
    };
    let v_prediction = match (a.prediction.as_deref(), source.prediction.as_str()) {
        (Some("epsilon"), _) | (None, "epsilon") => false,
        (Some("v_prediction"), _) | (None, "v_prediction") => true,
        (Some(other), _) => {
            bail!("--prediction must be `epsilon` or `v_prediction`, not `{other}`")
        }
        (None, other) => bail!(
            "the --init-from folder's scheduler predicts `{other}`; training predicts \
             `epsilon` or `v_prediction` (pass --prediction to choose one)"
        ),
    };
    let tokenizer = crate::assets::clip_tokenizer_dir()?;
    let options = TrainOptions {
        data: a.data,
        out: a.out.clone(),
        vae: a.vae,
        frozen_text_encoder: frozen,
        tokenizer,
        size: a.size,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        cosine: a.lr_schedule == "cosine",
        warmup_steps: a.warmup,
        ema_decay: a.ema_decay,
        caption_dropout: a.caption_dropout,
        v_prediction,
        zero_terminal_snr: a.zero_terminal_snr || source.zero_terminal_snr,
        snr_gamma: a.snr_gamma,
        late_timesteps: a.late_timesteps,
        late_from: a.late_from,
        latent_mean: a.latent_mean,
        mix: a.mix.map(|data| DataMix {
            data,
            fraction: a.mix_fraction,
        }),
        text_lr_scale: a.text_lr_scale,
        init_from: a.init_from,
        unet_channels: parse_list(&a.unet_channels)?,
        unet_layers: a.unet_layers,
        unet_heads: a.unet_heads,
        unet_scale_shift: a.unet_scale_shift,
        unet_conv_in_kernel: a.unet_conv_in_kernel,
        text_hidden: a.text_hidden,
        text_layers: a.text_layers,
        text_heads: a.text_heads,
        text_max_tokens: a.text_max_tokens,
        seed: a.seed,
        save_every: a.save_every.max(1),
        sample_every: a.sample_every,
        stop_at: a.stop_at,
        quiet: a.quiet,
    };
    let report = train(options, a.resume)?;
    if let Some(step) = report.resumed_from {
        println!("resumed from the checkpoint at step {step}");
    }
    println!(
        "model in {}: {} trainable parameters, final loss {:.4}, {:.1} images/s",
        a.out.display(),
        report.parameters,
        report.final_loss,
        report.images_per_second
    );
    Ok(())
}

/// What a fine-tuning source's scheduler says about its training targets.
struct SourceSchedule {
    prediction: String,
    zero_terminal_snr: bool,
}

impl Default for SourceSchedule {
    fn default() -> Self {
        Self {
            prediction: "epsilon".into(),
            zero_terminal_snr: false,
        }
    }
}

/// The prediction type and zero-terminal-SNR setting of `dir/scheduler/scheduler_config.json`
/// (diffusers' defaults, epsilon and off, when the folder has no scheduler or the keys are
/// missing).
fn source_schedule(dir: &std::path::Path) -> Result<SourceSchedule> {
    let path = dir.join("scheduler").join("scheduler_config.json");
    let mut out = SourceSchedule::default();
    if !path.is_file() {
        return Ok(out);
    }
    let config: serde_json::Value = text2img::error::read_json(&path)?;
    if let Some(p) = config.get("prediction_type").and_then(|v| v.as_str()) {
        out.prediction = p.into();
    }
    out.zero_terminal_snr = config
        .get("rescale_betas_zero_snr")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    Ok(out)
}

#[derive(Args)]
pub struct AverageArgs {
    /// Where the averaged `unet/` and `text_encoder/` go (other components are not written).
    #[arg(long)]
    pub out: PathBuf,
    /// The model folders (diffusers layout, one architecture), at least two.
    #[arg(required = true, num_args = 2..)]
    pub models: Vec<PathBuf>,
}

pub fn average_cmd(a: AverageArgs) -> Result<()> {
    let models: Vec<&std::path::Path> = a.models.iter().map(PathBuf::as_path).collect();
    text2img::train::average::average_models(&models, &a.out)?;
    println!("averaged {} models into {}", models.len(), a.out.display());
    Ok(())
}
