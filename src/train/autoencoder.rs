//! `train-vae`: the first stage of the Latent Diffusion recipe. An AutoencoderKL of a
//! configurable size learns to reconstruct the training images (MSE) with a small KL term
//! that keeps its latents close to a unit Gaussian.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, write_json, Checkpoint};
use super::data::DataSource;
use super::log::TrainLog;
use super::optim::{AdamW, AdamWConfig};
use super::step_rng;
use crate::error::{Error, Result};
use crate::vae::{AutoencoderKl, VaeConfig};
use crate::weights::{ParamStore, Vb};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainVaeOptions {
    pub data: String,
    pub out: PathBuf,
    pub size: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Cosine decay of the learning rate over `steps` (to 10 %) after the warm-up; false:
    /// constant (runs checkpointed before the option existed).
    #[serde(default)]
    pub cosine: bool,
    pub channels: Vec<usize>,
    pub latent_channels: usize,
    pub layers_per_block: usize,
    pub norm_groups: usize,
    pub kl_weight: f64,
    pub seed: u64,
    pub save_every: usize,
    pub quiet: bool,
    /// A diffusers `vae/` folder whose decoder this run fine-tunes: its encoder stays frozen,
    /// so its latents (and a U-Net trained on them) keep their meaning, and its architecture
    /// and scaling factor are kept. `None`: train a new autoencoder from scratch.
    #[serde(default)]
    pub finetune_decoder: Option<PathBuf>,
    /// Decoder fine-tunes: the standard deviation of Gaussian noise added to each latent the
    /// decoder learns from, in the U-Net's units (latents times the scaling factor, about unit
    /// variance). A U-Net's sampled latents are near, not on, the encoder's: trained on noisy
    /// latents, the decoder still draws crisp shapes from them. 0: none.
    #[serde(default)]
    pub latent_noise: f64,
    /// Decoder fine-tunes: multiply the source's channel counts by this factor first, without
    /// changing what it computes (see `widen`), so the decoder has more capacity while the
    /// latents keep their meaning. 1: the source's size.
    #[serde(default = "one")]
    pub widen: usize,
    /// Weight of the visible-error loss: per pixel, the squared excess of the RGB distance
    /// between reconstruction and image (0-255 units) over `visible_error_threshold`, averaged
    /// over pixels. Mean squared error lets an edge's neighbours keep a faint tint of the
    /// shape, which moves the outline a checker (or an eye) draws. 0: off.
    #[serde(default)]
    pub visible_error_weight: f64,
    #[serde(default = "default_visible_error_threshold")]
    pub visible_error_threshold: f64,
    /// Decoder fine-tunes: learn from the encoder's posterior mean instead of a sample from
    /// it. The sample's noise (about a tenth of the latents' spread in a small autoencoder)
    /// teaches the decoder to hedge where an edge lies; the mean is what reconstruction
    /// decodes, and what a U-Net trained on means generates.
    #[serde(default)]
    pub decode_mean: bool,
}

fn one() -> usize {
    1
}

fn default_visible_error_threshold() -> f64 {
    17.5
}

#[derive(Serialize, Deserialize)]
struct VaeRunState {
    step: usize,
    options: TrainVaeOptions,
}

/// The diffusers `vae/config.json` for these options.
pub fn vae_config_json(o: &TrainVaeOptions) -> serde_json::Value {
    let n = o.channels.len();
    serde_json::json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": o.channels,
        "layers_per_block": o.layers_per_block,
        "act_fn": "silu",
        "latent_channels": o.latent_channels,
        "norm_num_groups": o.norm_groups,
        "sample_size": o.size,
        "scaling_factor": 1.0,
    })
}

/// What a finished run reports.
pub struct VaeReport {
    pub psnr_db: f64,
    pub scaling_factor: f64,
    pub images_per_second: f64,
}

/// Whether a parameter belongs to the decoder side (what `finetune_decoder` trains).
fn is_decoder_parameter(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// A VAE folder's config, as JSON and parsed, and its named weights.
type SourceVae = (serde_json::Value, VaeConfig, Vec<(String, Tensor)>);

/// The source folder's config and weights, for fine-tuning its decoder.
fn read_source_vae(dir: &Path) -> Result<SourceVae> {
    let config_path = dir.join("config.json");
    let json: serde_json::Value = crate::error::read_json(&config_path)?;
    let config = VaeConfig::from_file(&config_path)?;
    let weights_path = dir.join("diffusion_pytorch_model.safetensors");
    if !weights_path.is_file() {
        return Err(Error::InvalidRequest(format!(
            "--finetune-decoder: {} is missing",
            weights_path.display()
        )));
    }
    let weights = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .map_err(|e| Error::InvalidRequest(format!("{}: {e}", weights_path.display())))?;
    Ok((json, config, weights.into_iter().collect()))
}

pub fn train_vae(mut o: TrainVaeOptions, resume: bool) -> Result<VaeReport> {
    let device = Device::Cpu;
    if o.widen == 0 || (o.widen > 1 && o.finetune_decoder.is_none()) {
        return Err(Error::InvalidRequest(format!(
            "--widen {} must be at least 1, and more than 1 needs --finetune-decoder",
            o.widen
        )));
    }
    if o.latent_noise < 0.0
        || !o.latent_noise.is_finite()
        || (o.latent_noise > 0.0 && o.finetune_decoder.is_none())
    {
        return Err(Error::InvalidRequest(format!(
            "--latent-noise {} must be a finite number >= 0, and it needs --finetune-decoder \
             (a new autoencoder's latents have no scale yet)",
            o.latent_noise
        )));
    }
    let max_distance = 255.0 * 3f64.sqrt();
    let weight_ok = o.visible_error_weight >= 0.0 && o.visible_error_weight.is_finite();
    let threshold_ok = (0.0..max_distance).contains(&o.visible_error_threshold);
    if !(weight_ok && threshold_ok) {
        return Err(Error::InvalidRequest(format!(
            "--visible-error-weight {} must be a finite number >= 0 and --visible-error-threshold \
             {} an RGB distance from 0 to {max_distance:.0}",
            o.visible_error_weight, o.visible_error_threshold
        )));
    }
    if o.decode_mean && o.finetune_decoder.is_none() {
        return Err(Error::InvalidRequest(
            "--decode-mean needs --finetune-decoder (a new autoencoder learns its posterior \
             from the samples)"
                .into(),
        ));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    let mut start = 0;
    let resumed = if resume {
        let ck: Checkpoint<VaeRunState> = checkpoint::load(&o.out)?;
        start = ck.state.step;
        // The run's recorded options, except where it lives now and, when given, where its
        // source decoder is: a copied run folder resumes into the copy, and a moved source can
        // be named again.
        let (steps, out, source) = (o.steps, o.out.clone(), o.finetune_decoder.clone());
        o = ck.state.options.clone();
        o.steps = steps.max(start);
        o.out = out;
        if source.is_some() {
            o.finetune_decoder = source;
        }
        Some(ck)
    } else {
        None
    };
    // Fine-tuning takes the architecture from the source folder, not the options.
    let source = match &o.finetune_decoder {
        Some(dir) => {
            let (mut json, mut config, mut weights) = read_source_vae(dir)?;
            if o.widen > 1 {
                json = super::widen::widen_config(&json, o.widen)?;
                config = serde_json::from_value(json.clone()).map_err(|e| {
                    Error::InvalidRequest(format!("--widen: the widened config: {e}"))
                })?;
                weights = super::widen::widen_weights(&weights, o.widen, o.seed)?;
            }
            o.channels = config.block_out_channels.clone();
            o.latent_channels = config.latent_channels;
            o.layers_per_block = config.layers_per_block;
            o.norm_groups = config.norm_num_groups;
            Some((json, weights))
        }
        None => None,
    };
    let config_path = o.out.join("vae").join("config.json");
    // A resumed fine-tune needs the source it started from: its encoder makes the latents.
    if let (Some((json, _)), Some(_)) = (&source, &resumed) {
        let recorded: serde_json::Value = crate::error::read_json(&config_path)?;
        let shape = |j: &serde_json::Value| {
            let keys = [
                "block_out_channels",
                "norm_num_groups",
                "latent_channels",
                "layers_per_block",
            ];
            keys.map(|k| j[k].clone())
        };
        if shape(json) != shape(&recorded) {
            return Err(Error::InvalidRequest(format!(
                "--resume: the source autoencoder {} is not the one this run started from (its \
                 architecture{} differs from {}); name the original with --finetune-decoder",
                o.finetune_decoder
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display(),
                if o.widen > 1 { ", widened," } else { "" },
                config_path.display()
            )));
        }
    }
    let factor = 1 << o.channels.len().saturating_sub(1);
    if o.channels.is_empty() || o.size == 0 || !o.size.is_multiple_of(factor) {
        return Err(Error::InvalidRequest(format!(
            "--size {} must be a positive multiple of the autoencoder's downsampling factor {factor} \
             (one halving per --channels entry after the first)",
            o.size
        )));
    }
    let config_json = match &source {
        Some((json, _)) => json.clone(),
        None => vae_config_json(&o),
    };
    write_json(&config_path, &config_json)?;
    let config = VaeConfig::from_file(&config_path)?;
    let params = ParamStore::new(o.seed, &device);
    let vae = AutoencoderKl::from_weights(config, &Vb::from(&params))?;
    if let Some((_, weights)) = &source {
        let values: std::collections::BTreeMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(candle_core::DType::F32)?)))
            .collect::<Result<_>>()?;
        params.load_values(&values)?;
    }
    let decoder_only = source.is_some();
    // In the decoder's own (unscaled) latent units.
    let latent_noise = match &source {
        Some((json, _)) if o.latent_noise > 0.0 => {
            o.latent_noise / json["scaling_factor"].as_f64().unwrap_or(1.0)
        }
        _ => 0.0,
    };
    // Fine-tuning the decoder: the latents come from the source's encoder loaded as plain
    // tensors, so its forward pass records no graph (the trainable copy's encoder is never
    // updated and holds the same values).
    let frozen_encoder = match &o.finetune_decoder {
        Some(dir) => Some(AutoencoderKl::load(dir, None, &device)?),
        None => None,
    };
    let trained: Vec<_> = params
        .vars()
        .into_iter()
        .filter(|(name, _)| !decoder_only || is_decoder_parameter(name))
        .collect();
    let mut opt = AdamW::new(
        trained,
        AdamWConfig {
            lr: o.lr,
            warmup_steps: 100,
            decay_steps: o.cosine.then_some(o.steps),
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    if let Some(ck) = &resumed {
        params.load_values(&ck.params)?;
        opt.load_state(&ck.optimizer, start)?;
    }
    let data = DataSource::open(&o.data, o.seed, o.size)?;
    let visible = o.visible_error_weight > 0.0;
    let header = if visible {
        "step,loss,mse,kl,visible"
    } else {
        "step,loss,mse,kl"
    };
    let mut log = TrainLog::open(&o.out, header, start, o.steps, o.quiet)?;
    // Pixels are in [-1, 1]: 255 RGB units span 2.
    let threshold = o.visible_error_threshold * 2.0 / 255.0;
    log.println(format!(
        "VAE: {} parameters, factor {}",
        params.num_parameters(),
        1 << (o.channels.len() - 1)
    ));
    for step in start..o.steps {
        let batch = data.batch((step * o.batch) as u64, o.batch, &device)?;
        let mut rng = step_rng(o.seed, step as u64);
        let latent = [o.batch, o.latent_channels, o.size / factor, o.size / factor];
        let eps = rng.randn(&latent, &device)?;
        let noise = if latent_noise > 0.0 {
            Some((rng.randn(&latent, &device)? * latent_noise)?)
        } else {
            None
        };
        // Means over the whole batch, as sums over its shards.
        let (pixels, latents) = (batch.images.elem_count() as f64, eps.elem_count() as f64);
        let shard = |start: usize, len: usize| -> Result<([f64; 4], GradStore)> {
            let images = batch.images.narrow(0, start, len)?;
            let (mean, logvar) = match &frozen_encoder {
                Some(frozen) => frozen.encode(&images)?,
                None => vae.encode(&images)?,
            };
            let mut z = if o.decode_mean {
                mean.clone()
            } else {
                (&mean + ((&logvar * 0.5)?.exp()? * eps.narrow(0, start, len)?)?)?
            };
            if let Some(noise) = &noise {
                z = (z + noise.narrow(0, start, len)?)?;
            }
            let recon = vae.decode(&z)?;
            let error = (recon - &images)?;
            let mse = (error.sqr()?.sum_all()? / pixels)?;
            let visible_error = if visible {
                (visible_error_sum(&error, threshold)? / (pixels / 3.0))?
            } else {
                mse.zeros_like()?
            };
            let kl = (((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)?
                .sum_all()?
                .affine(0.5 / latents, 0.0)?;
            let reconstruction = (&mse + (&visible_error * o.visible_error_weight)?)?;
            let loss = if decoder_only {
                reconstruction
            } else {
                (&reconstruction + (&kl * o.kl_weight)?)?
            };
            let grads = loss.backward()?;
            let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
            let parts = [
                scalar(&loss)?,
                scalar(&mse)?,
                scalar(&kl)?,
                scalar(&visible_error)?,
            ];
            Ok((parts, grads))
        };
        let (parts, grads): (Vec<[f64; 4]>, Vec<_>) =
            super::shards(o.batch, &shard)?.into_iter().unzip();
        opt.step_summed(&grads)?;
        let total = |i: usize| parts.iter().map(|p| p[i]).sum::<f64>();
        // The visible column only when its loss is on (the header above says which).
        let columns = [total(1), total(2), total(3)];
        let logged = if visible { 3 } else { 2 };
        log.step(step + 1, total(0), o.batch, &columns[..logged])?;
        if (step + 1) % o.save_every == 0 || step + 1 == o.steps {
            save(&o, &params, &opt, step + 1)?;
        }
    }
    log.finish();
    let rate = log.images_per_second();
    // The autoencoder ships its final weights (an EMA matters little for this first
    // stage, and a short run's EMA still remembers its random start); evaluate them on
    // images the run never trained on.
    let (psnr_db, mut scaling_factor) = evaluate(&vae, &o, &device)?;
    let mut json = config_json;
    match json["scaling_factor"].as_f64() {
        // The latents did not change: a U-Net trained on them expects the old factor.
        Some(kept) if decoder_only => scaling_factor = kept,
        _ => json["scaling_factor"] = scaling_factor.into(),
    }
    write_json(&config_path, &json)?;
    let weights = params.tensors(candle_core::DType::F32)?;
    export_weights(
        &weights,
        &o.out
            .join("vae")
            .join("diffusion_pytorch_model.safetensors"),
    )?;
    Ok(VaeReport {
        psnr_db,
        scaling_factor,
        images_per_second: rate,
    })
}

/// The visible-error loss summed over pixels: for an error tensor `(batch, 3, h, w)` in pixel
/// units of [-1, 1], each pixel's RGB distance in excess of `threshold` (same units), squared.
fn visible_error_sum(error: &Tensor, threshold: f64) -> Result<Tensor> {
    // The small constant keeps the square root's gradient finite at zero error.
    let distance = (error.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    Ok((distance - threshold)?.relu()?.sqr()?.sum_all()?)
}

fn save(o: &TrainVaeOptions, params: &ParamStore, opt: &AdamW, step: usize) -> Result<()> {
    checkpoint::save(
        &o.out,
        &Checkpoint {
            params: params.tensors(candle_core::DType::F32)?,
            optimizer: opt.state()?,
            state: VaeRunState {
                step,
                options: o.clone(),
            },
        },
    )
}

/// Writes weights as fp16 safetensors atomically.
pub fn export_weights(
    tensors: &std::collections::BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let half = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(candle_core::DType::F16)?)))
        .collect::<Result<std::collections::BTreeMap<_, _>>>()?;
    checkpoint::save_tensors_atomic(&half, path)
}

/// Held-out reconstruction PSNR (8-bit, peak 255) and the latent scaling factor
/// (1 / std of the latents, as Stable Diffusion chose 0.18215).
fn evaluate(vae: &AutoencoderKl, o: &TrainVaeOptions, device: &Device) -> Result<(f64, f64)> {
    let held_out = DataSource::open(&o.data, o.seed.wrapping_add(0x5eed_0ff5), o.size)?;
    let batch = held_out.batch(1_000_000, 32, device)?;
    let (mean, _) = vae.encode(&batch.images)?;
    let recon = vae.decode(&mean)?;
    let to8 = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(((t.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
            .round()?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let (a, b) = (to8(&recon)?, to8(&batch.images)?);
    let mse = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10();
    let std = mean.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()? as f64;
    Ok((psnr, 1.0 / std.max(1e-6)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_error_counts_only_the_distance_above_the_threshold() {
        // Four pixels of one image; errors in 0-255 RGB units, scaled to the [-1, 1] range.
        // Distances: 10 (below), 30 * sqrt(2) ~ 42.4, 40, 0.
        let rgb = [
            [10.0, 0.0, 0.0],
            [30.0, -30.0, 0.0],
            [0.0, 0.0, 40.0],
            [0.0, 0.0, 0.0],
        ];
        let planes: Vec<f32> = (0..3)
            .flat_map(|c| rgb.iter().map(move |p| (p[c] * 2.0 / 255.0) as f32))
            .collect();
        let error = candle_core::Var::from_vec(planes, (1, 3, 2, 2), &Device::Cpu).unwrap();
        let threshold = 17.5 * 2.0 / 255.0;
        let loss = visible_error_sum(error.as_tensor(), threshold).unwrap();
        let excess = |d: f64| ((d - 17.5) * 2.0 / 255.0).max(0.0);
        let expected = excess(30.0 * 2f64.sqrt()).powi(2) + excess(40.0).powi(2);
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - expected).abs() < 1e-6 * expected.max(1e-3),
            "{got} vs {expected}"
        );
        // Pixels below the threshold get no gradient; a pixel above it is pushed along its
        // own error.
        let grads = loss.backward().unwrap();
        let g = grads.get(error.as_tensor()).unwrap().flatten_all().unwrap();
        let g: Vec<f32> = g.to_vec1().unwrap();
        let at = |c: usize, p: usize| g[c * 4 + p];
        assert_eq!([at(0, 0), at(1, 0), at(2, 0)], [0.0; 3]);
        assert_eq!([at(0, 3), at(1, 3), at(2, 3)], [0.0; 3]);
        assert!(at(0, 1) > 0.0 && at(1, 1) < 0.0 && at(2, 2) > 0.0);
        // d/de of (|e| - t)^2 along the error is 2 (|e| - t).
        let expected_blue = 2.0 * excess(40.0);
        assert!(
            (at(2, 2) as f64 - expected_blue).abs() < 1e-4,
            "{}",
            at(2, 2)
        );
    }
}
