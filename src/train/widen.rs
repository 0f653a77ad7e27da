//! Widening a trained autoencoder without changing what it computes, so that its decoder can
//! be fine-tuned with more capacity while the latents (and a U-Net trained on them) keep their
//! meaning.
//!
//! diffusers' AutoencoderKL has one `block_out_channels` for encoder and decoder, so a larger
//! decoder means a larger encoder too. Every internal channel count is multiplied by `factor`
//! and so is `norm_num_groups`, so each GroupNorm group keeps its size: the original channels
//! keep their indices and their groups, the new channels fill new groups of their own. Weights
//! from new channels into original ones are zero, so the original channels, the latents and
//! the images are what they were (up to rounding); weights into new channels are small random
//! values, so the new channels are active and the zero weights get gradients. The
//! mid-block attention's query scores only original channels (the new query rows are zero)
//! and is rescaled for its wider head, whose scale is 1/sqrt(channels).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::TorchGenerator;

/// Standard deviation of the weights into new channels, relative to 1/sqrt(fan-in).
const NEW_WEIGHT_SCALE: f64 = 0.5;

/// Which of a tensor's dimensions are internal channels (widened), by parameter name:
/// (output, input). The image and latent ends are not widened.
fn widened_dims(name: &str) -> (bool, bool) {
    let fixed_in = name.starts_with("encoder.conv_in.")
        || name.starts_with("decoder.conv_in.")
        || name.starts_with("quant_conv.")
        || name.starts_with("post_quant_conv.");
    let fixed_out = name.starts_with("encoder.conv_out.")
        || name.starts_with("decoder.conv_out.")
        || name.starts_with("quant_conv.")
        || name.starts_with("post_quant_conv.");
    (!fixed_out, !fixed_in)
}

/// The config of the widened autoencoder: channels and groups times `factor`.
pub fn widen_config(json: &serde_json::Value, factor: usize) -> Result<serde_json::Value> {
    let bad =
        |what: &str| Error::InvalidRequest(format!("--widen: the source config has no {what}"));
    let channels: Vec<usize> = json["block_out_channels"]
        .as_array()
        .ok_or_else(|| bad("block_out_channels"))?
        .iter()
        .map(|c| c.as_u64().map(|c| c as usize * factor))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("integer block_out_channels"))?;
    let groups = json["norm_num_groups"]
        .as_u64()
        .ok_or_else(|| bad("norm_num_groups"))? as usize;
    let mut out = json.clone();
    out["block_out_channels"] = channels.into();
    out["norm_num_groups"] = (groups * factor).into();
    Ok(out)
}

/// One weight of the widened autoencoder from the original one.
fn widen_tensor(name: &str, t: &Tensor, factor: usize, rng: &mut TorchGenerator) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    let dims = t.dims().to_vec();
    let (wide_out, wide_in) = widened_dims(name);
    let is_query = name.contains(".attentions.") && name.contains(".to_q.");
    match dims.len() {
        // Biases and norm parameters: new channels get 0 (bias, norm shift) or 1 (norm scale).
        1 => {
            if !wide_out {
                return Ok(t);
            }
            let fill = if name.contains("norm") && name.ends_with(".weight") {
                1.0
            } else {
                0.0
            };
            let mut values = t.to_vec1::<f32>()?;
            if is_query {
                values.iter_mut().for_each(|v| *v *= query_rescale(factor));
            }
            values.resize(dims[0] * factor, fill);
            Ok(Tensor::from_vec(values, dims[0] * factor, &Device::Cpu)?)
        }
        // Linear [out, in] and convolution [out, in, kh, kw] weights.
        2 | 4 => {
            let (out, inp) = (dims[0], dims[1]);
            let kernel: usize = dims[2..].iter().product();
            let (new_out, new_in) = (
                if wide_out { out * factor } else { out },
                if wide_in { inp * factor } else { inp },
            );
            let std = NEW_WEIGHT_SCALE / ((new_in * kernel) as f64).sqrt();
            let old = t.flatten_all()?.to_vec1::<f32>()?;
            let mut values = vec![0f32; new_out * new_in * kernel];
            let rescale = if is_query { query_rescale(factor) } else { 1.0 };
            for o in 0..new_out {
                for i in 0..new_in {
                    let dst = &mut values[(o * new_in + i) * kernel..][..kernel];
                    if o < out && i < inp {
                        let src = &old[(o * inp + i) * kernel..][..kernel];
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s * rescale);
                    } else if o >= out && !is_query {
                        // Into a new channel: small random values; the query's new rows stay 0
                        // so the attention scores are those of the original channels.
                        dst.iter_mut()
                            .for_each(|d| *d = (rng.randn_vec(1)[0] as f64 * std) as f32);
                    }
                    // From a new channel into an original one: 0.
                }
            }
            let mut shape = dims.clone();
            (shape[0], shape[1]) = (new_out, new_in);
            Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
        }
        _ => Err(Error::InvalidRequest(format!(
            "--widen: unexpected weight {name} of shape {dims:?}"
        ))),
    }
}

/// The single-head attention scores scale by 1/sqrt(channels); scaling the query by
/// sqrt(factor) keeps the original scores in the wider head.
fn query_rescale(factor: usize) -> f32 {
    (factor as f32).sqrt()
}

/// Every weight of the autoencoder, widened by `factor` (see the module doc).
pub fn widen_weights(
    weights: &[(String, Tensor)],
    factor: usize,
    seed: u64,
) -> Result<Vec<(String, Tensor)>> {
    let mut rng = TorchGenerator::new(seed ^ 0x5769_6465_6e21);
    weights
        .iter()
        .map(|(name, t)| Ok((name.clone(), widen_tensor(name, t, factor, &mut rng)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::autoencoder::{vae_config_json, TrainVaeOptions};
    use crate::vae::{AutoencoderKl, VaeConfig};
    use crate::weights::{ParamStore, Vb};
    use std::collections::BTreeMap;

    /// A random autoencoder (every weight, bias and norm parameter random) as named tensors.
    fn random_vae(json: &serde_json::Value) -> (VaeConfig, Vec<(String, Tensor)>) {
        let config: VaeConfig = serde_json::from_value(json.clone()).unwrap();
        let params = ParamStore::new(7, &Device::Cpu);
        AutoencoderKl::from_weights(config.clone(), &Vb::from(&params)).unwrap();
        let mut rng = TorchGenerator::new(11);
        let weights = params
            .tensors(DType::F32)
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                let noise = rng.randn(t.dims(), &Device::Cpu).unwrap();
                (name, (t + (noise * 0.1).unwrap()).unwrap())
            })
            .collect();
        (config, weights)
    }

    fn build(config: VaeConfig, weights: &[(String, Tensor)]) -> AutoencoderKl {
        let params = ParamStore::new(0, &Device::Cpu);
        let vae = AutoencoderKl::from_weights(config, &Vb::from(&params)).unwrap();
        let values: BTreeMap<String, Tensor> = weights.iter().cloned().collect();
        params.load_values(&values).unwrap();
        vae
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    #[test]
    fn widened_autoencoder_computes_the_same_latents_and_images() {
        let options = TrainVaeOptions {
            data: "shapes".into(),
            out: "unused".into(),
            size: 16,
            steps: 1,
            batch: 1,
            lr: 1e-3,
            cosine: false,
            channels: vec![8, 16],
            latent_channels: 4,
            layers_per_block: 1,
            norm_groups: 4,
            kl_weight: 1e-6,
            seed: 0,
            save_every: 1,
            quiet: true,
            finetune_decoder: None,
            latent_noise: 0.0,
            widen: 1,
            visible_error_weight: 0.0,
            visible_error_threshold: 17.5,
            decode_mean: false,
        };
        let json = vae_config_json(&options);
        let (config, weights) = random_vae(&json);
        let wide_json = widen_config(&json, 2).unwrap();
        assert_eq!(wide_json["block_out_channels"], serde_json::json!([16, 32]));
        assert_eq!(wide_json["norm_num_groups"], 8);
        let wide_config: VaeConfig = serde_json::from_value(wide_json).unwrap();
        let wide_weights = widen_weights(&weights, 2, 3).unwrap();
        let (small, wide) = (build(config, &weights), build(wide_config, &wide_weights));

        let mut rng = TorchGenerator::new(5);
        let x = rng.randn(&[2, 3, 16, 16], &Device::Cpu).unwrap();
        let (mean, logvar) = small.encode(&x).unwrap();
        let (wide_mean, wide_logvar) = wide.encode(&x).unwrap();
        assert!(max_abs(&mean) > 0.01);
        assert!(max_diff(&mean, &wide_mean) < 1e-4, "latent means differ");
        assert!(
            max_diff(&logvar, &wide_logvar) < 1e-4,
            "latent log-variances differ"
        );
        let z = rng.randn(&[2, 4, 8, 8], &Device::Cpu).unwrap();
        let (image, wide_image) = (small.decode(&z).unwrap(), wide.decode(&z).unwrap());
        assert!(
            max_diff(&image, &wide_image) < 1e-4,
            "decoded images differ"
        );

        // The new channels are live: weights into them are random, not zero.
        let (_, conv) = wide_weights
            .iter()
            .find(|(n, _)| n == "decoder.up_blocks.1.resnets.0.conv1.weight")
            .unwrap();
        let new_rows = conv.narrow(0, 8, 8).unwrap();
        assert!(max_abs(&new_rows) > 0.0);
    }
}
