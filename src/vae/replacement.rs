//! `--vae`: an autoencoder given apart from the model, as users swap in a better decoder
//! (`vae-ft-mse-840000-ema-pruned.safetensors` for SD 1.x, `sdxl-vae-fp16-fix` for SDXL):
//! a diffusers `AutoencoderKL` folder (or a pipeline folder's `vae/`), or one file in the
//! original (LDM) layout or in diffusers' names. A file carries no config: it takes the
//! model's own VAE config, and a tensor of another shape is an error naming it. A folder may
//! also hold an `AutoencoderTiny` (TAESD, TAESDXL): fast decodes of the same latents.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::tiny::AutoencoderTiny;
use super::{AutoencoderKl, Vae, VaeConfig};
use crate::error::{read_json, Error, Result};
use crate::weights::single_file::layout;
use crate::weights::Weights;

/// The replacement autoencoder at `path`, for a model whose own VAE has `model_config`.
pub fn load(
    path: &Path,
    model_config: &VaeConfig,
    dtype: crate::weights::MatrixDtype,
    device: &Device,
) -> Result<Vae> {
    if path.is_dir() {
        let dir: PathBuf = if path.join("vae").join("config.json").is_file() {
            path.join("vae")
        } else {
            path.to_path_buf()
        };
        let config_path = dir.join("config.json");
        let config: serde_json::Value = read_json(&config_path)?;
        match config.get("_class_name").and_then(|c| c.as_str()) {
            None | Some("AutoencoderKL") => {}
            Some("AutoencoderTiny") => {
                let vae = AutoencoderTiny::load(&dir, device, dtype)?;
                let c = &vae.config;
                if c.latent_channels != model_config.latent_channels
                    || c.downsampling_factor() != model_config.downsampling_factor()
                {
                    return Err(Error::config(
                        config_path,
                        format!(
                            "this VAE has {} latent channels at 1/{} size; the model's has {} at 1/{}",
                            c.latent_channels,
                            c.downsampling_factor(),
                            model_config.latent_channels,
                            model_config.downsampling_factor()
                        ),
                    ));
                }
                return Ok(Vae::Tiny(vae));
            }
            Some(other) => {
                return Err(Error::config(
                    config_path,
                    format!("--vae needs an AutoencoderKL or AutoencoderTiny; this is a `{other}`"),
                ))
            }
        }
        let vae = AutoencoderKl::load_as(&dir, None, device, dtype)?;
        check_latents(&vae.config, model_config, &config_path)?;
        return Ok(Vae::Kl(vae));
    }
    if !path.is_file() {
        return Err(Error::config(path, "--vae: no such file or folder"));
    }
    let weights = Weights::open_single(path, &["ckpt", "pt", "pth"], device)?.ok_or_else(|| {
        Error::config(
            path,
            "not a VAE file: expected .safetensors, .ckpt, .pt or .pth, or a folder",
        )
    })?;
    let mut names: Vec<String> = weights.names().cloned().collect();
    names.sort();
    let has = |name: &str| names.binary_search(&name.to_string()).is_ok();
    let ldm_prefix = ["", "first_stage_model.", "vae."]
        .into_iter()
        .find(|p| has(&format!("{p}encoder.down.0.block.0.conv1.weight")));
    let config = model_config.clone();
    let mut weights = if let Some(prefix) = ldm_prefix {
        weights.component(&layout::vae(
            &names,
            prefix,
            config.block_out_channels.len(),
        ))?
    } else if has("encoder.down_blocks.0.resnets.0.conv1.weight") {
        weights
    } else {
        return Err(Error::config(
            path,
            "does not look like a VAE: no `encoder.down.0.*` (original layout) or \
             `encoder.down_blocks.0.*` (diffusers layout) tensors",
        ));
    };
    weights.store_matrices_as(dtype);
    AutoencoderKl::from_stored(config, weights)
        .map(Vae::Kl)
        .map_err(|e| Error::config(path, format!("not a VAE for this model: {e}")))
}

/// A replacement must speak the U-Net's latents: the same channels and downsampling.
fn check_latents(vae: &VaeConfig, model: &VaeConfig, path: &Path) -> Result<()> {
    if vae.latent_channels != model.latent_channels
        || vae.downsampling_factor() != model.downsampling_factor()
    {
        return Err(Error::config(
            path,
            format!(
                "this VAE has {} latent channels at 1/{} size; the model's has {} at 1/{}",
                vae.latent_channels,
                vae.downsampling_factor(),
                model.latent_channels,
                model.downsampling_factor()
            ),
        ));
    }
    Ok(())
}
