//! Single-file checkpoints: one `.safetensors` holding U-Net, VAE and text encoder(s) under
//! the original code's prefixes (`model.diffusion_model.`, `first_stage_model.`,
//! `cond_stage_model.`, SDXL's `conditioner.embedders.N.`), in its own tensor names.
//!
//! The file is one source of named tensors ([`Weights`]); [`layout`] maps each component's
//! names onto diffusers' ones, and the components load as they do from a folder. The
//! architecture is read from the names and shapes ([`Checkpoint::open`]); what shapes cannot
//! tell (heads, scheduler, tokenizer) comes from [`configs`].

pub mod configs;
pub mod layout;
pub mod original_config;
pub mod yaml_architecture;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::error::{Error, Result};
use crate::latent::unet::config::UNetConfig;
use crate::text::clip::ClipTextConfig;
use crate::weights::store::{Piece, Weights};

/// The released architectures a checkpoint can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// SD 1.x: one CLIP ViT-L text encoder (768 wide), Hugging Face layout.
    Sd1,
    /// SD 2.x: one OpenCLIP ViT-H text encoder (1024 wide).
    Sd2,
    /// SDXL base: CLIP ViT-L and OpenCLIP ViT-bigG.
    Sdxl,
    /// SDXL's refiner: OpenCLIP ViT-bigG alone (SDXL's second encoder), aesthetic-score
    /// conditioning.
    SdxlRefiner,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Sd1 => "sd1",
            Architecture::Sd2 => "sd2",
            Architecture::Sdxl => "sdxl",
            Architecture::SdxlRefiner => "sdxl-refiner",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Architecture::Sd1 => "Stable Diffusion 1.x",
            Architecture::Sd2 => "Stable Diffusion 2.x",
            Architecture::Sdxl => "Stable Diffusion XL (base)",
            Architecture::SdxlRefiner => "Stable Diffusion XL refiner",
        }
    }

    /// Each text encoder's prefix and whether it is stored in OpenCLIP's layout.
    pub fn text_encoders(self) -> &'static [(&'static str, TextLayout)] {
        match self {
            Architecture::Sd1 => &[("cond_stage_model.transformer.", TextLayout::HuggingFace)],
            Architecture::Sd2 => &[("cond_stage_model.model.", TextLayout::OpenClip)],
            Architecture::Sdxl => &[
                (
                    "conditioner.embedders.0.transformer.",
                    TextLayout::HuggingFace,
                ),
                ("conditioner.embedders.1.model.", TextLayout::OpenClip),
            ],
            Architecture::SdxlRefiner => {
                &[("conditioner.embedders.0.model.", TextLayout::OpenClip)]
            }
        }
    }

    /// The pipeline's text encoder slot (`TEXT_ENCODERS`) of the file's first encoder: the
    /// refiner's only encoder is SDXL's second.
    pub fn first_encoder_slot(self) -> usize {
        match self {
            Architecture::SdxlRefiner => 1,
            _ => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextLayout {
    HuggingFace,
    OpenClip,
}

pub const UNET_PREFIX: &str = "model.diffusion_model.";
const EMA_PREFIX: &str = "model_ema.";

/// The original training code's noise-schedule buffers, saved beside the weights.
const SCHEDULE_BUFFERS: [&str; 13] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
];

/// An opened checkpoint: its tensors, and what it was found to be.
pub struct Checkpoint {
    pub path: PathBuf,
    weights: Weights,
    names: Vec<String>,
    pub architecture: Architecture,
    /// A 9-channel inpainting U-Net.
    pub inpainting: bool,
    vae_prefix: &'static str,
    /// Stored tensors deliberately left unloaded (checked by [`Checkpoint::finish`]).
    skipped: BTreeSet<String>,
}

impl Checkpoint {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::config(path, "checkpoint file does not exist"));
        }
        let weights = Weights::open_single(path, &["ckpt", "pt", "pth"], device)?.ok_or_else(|| {
            Error::config(
                path,
                "not a checkpoint file: expected .safetensors, .ckpt, .pt or .pth (or a diffusers folder)",
            )
        })?;
        let shapes: HashMap<&str, &[usize]> = weights.shapes().collect();
        let (architecture, inpainting) = detect(&shapes).map_err(|m| Error::config(path, m))?;
        let vae_prefix = ["first_stage_model.", "vae."]
            .into_iter()
            .find(|p| shapes.keys().any(|n| n.starts_with(p)))
            .ok_or_else(|| {
                Error::config(
                    path,
                    "the checkpoint has no VAE (`first_stage_model.*` tensors)",
                )
            })?;
        let mut names: Vec<String> = shapes.keys().map(|n| n.to_string()).collect();
        names.sort();
        Ok(Self {
            path: path.to_path_buf(),
            weights,
            names,
            architecture,
            inpainting,
            vae_prefix,
            skipped: BTreeSet::new(),
        })
    }

    /// The U-Net's weights, in diffusers' names; `ema` takes the `model_ema.` copy instead.
    pub fn unet(&mut self, config: &UNetConfig, ema: bool) -> Result<Weights> {
        let mut layout = layout::unet(&self.names, UNET_PREFIX, config);
        if ema {
            // The EMA copy names each tensor by its path with the dots taken out.
            for (_, piece) in layout.iter_mut() {
                let stored = piece.stored();
                let rest = stored.strip_prefix("model.").unwrap_or(stored);
                let ema_name = format!("{EMA_PREFIX}{}", rest.replace('.', ""));
                if self.names.binary_search(&ema_name).is_err() {
                    return Err(Error::config(
                        &self.path,
                        format!("no EMA copy of `{stored}` (`{ema_name}`)"),
                    ));
                }
                self.skipped.insert(stored.to_string());
                *piece = Piece::Whole(ema_name);
            }
        }
        self.weights.component(&layout)
    }

    /// Leaves the checkpoint's own VAE unloaded (another replaces it).
    pub fn skip_vae(&mut self) {
        let prefix = self.vae_prefix;
        self.skip_where(|n| n.starts_with(prefix));
    }

    pub fn vae(&self, levels: usize) -> Result<Weights> {
        self.weights
            .component(&layout::vae(&self.names, self.vae_prefix, levels))
    }

    /// Text encoder `index` (0, or 1 for SDXL's second).
    pub fn text_encoder(
        &mut self,
        index: usize,
        config: &ClipTextConfig,
        projection: bool,
    ) -> Result<Weights> {
        let (prefix, kind) = self.architecture.text_encoders()[index];
        let layout = match kind {
            TextLayout::HuggingFace => {
                self.skip_where(|n| n.starts_with(prefix) && n.ends_with("position_ids"));
                layout::clip_hf(&self.names, prefix)
            }
            TextLayout::OpenClip => {
                let unused = layout::open_clip_unused(&self.names, prefix, config, projection);
                self.skipped.extend(unused);
                layout::open_clip(&self.names, prefix, config, projection)
            }
        };
        self.weights.component(&layout)
    }

    fn skip_where(&mut self, keep_out: impl Fn(&str) -> bool) {
        let skipped: Vec<String> = self.names.iter().filter(|n| keep_out(n)).cloned().collect();
        self.skipped.extend(skipped);
    }

    /// Fails if a stored tensor went into no component and is none of the known extras
    /// (schedule buffers, the EMA copy, position ids): the file is not what it was taken for.
    pub fn finish(&mut self) -> Result<()> {
        self.skip_where(|n| {
            SCHEDULE_BUFFERS.contains(&n)
                || n.starts_with(EMA_PREFIX)
                || n.ends_with("position_ids")
                || n == "model_ema.decay"
                || n == "model_ema.num_updates"
        });
        for name in &self.skipped {
            self.weights.ignore(name);
        }
        self.weights.finish()
    }
}

/// What the names and shapes say the checkpoint is: the architecture and whether its U-Net
/// is an inpainting one; otherwise what it looks like instead.
pub fn detect(shapes: &HashMap<&str, &[usize]>) -> Result<(Architecture, bool), String> {
    let has = |name: &str| shapes.contains_key(name);
    let any = |f: &dyn Fn(&str) -> bool| shapes.keys().any(|n| f(n));
    let conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight");
    let Some(conv_in) = conv_in else {
        let looks = if any(&|n| {
            n.starts_with("lora_") || n.contains(".lora_down.") || n.contains("lora_A")
        }) {
            "a LoRA (it changes a model; it is not one)"
        } else if any(&|n| {
            n.contains("string_to_param") || n == "emb_params" || n == "clip_l" || n == "clip_g"
        }) {
            "a textual-inversion embedding"
        } else if any(&|n| n.contains("joint_blocks.")) {
            "a Stable Diffusion 3 model, which text2img does not run"
        } else if any(&|n| n.contains("double_blocks.")) {
            "a Flux model, which text2img does not run"
        } else if any(&|n| n.starts_with("control_model.") || n.starts_with("controlnet_")) {
            "a ControlNet"
        } else if has("down_blocks.0.resnets.0.conv1.weight")
            || has("conv_in.weight") && has("time_embedding.linear_1.weight")
        {
            "a diffusers-layout U-Net alone (load the whole diffusers folder instead)"
        } else if has("encoder.down.0.block.0.conv1.weight") || has("encoder.conv_in.weight") {
            "a VAE alone"
        } else {
            "none of the Stable Diffusion layouts (no `model.diffusion_model.*` tensors)"
        };
        return Err(format!(
            "not a Stable Diffusion checkpoint: it looks like {looks}"
        ));
    };
    let inpainting = match conv_in.get(1) {
        Some(4) => false,
        Some(9) => true,
        other => {
            return Err(format!(
                "a U-Net with {other:?} input channels; text2img runs 4 (or 9 for inpainting)"
            ))
        }
    };
    let architecture = if has("conditioner.embedders.1.model.ln_final.weight") {
        Architecture::Sdxl
    } else if has("conditioner.embedders.0.model.ln_final.weight") {
        Architecture::SdxlRefiner
    } else if has("cond_stage_model.model.ln_final.weight") {
        Architecture::Sd2
    } else if has("cond_stage_model.transformer.text_model.final_layer_norm.weight")
        || has("cond_stage_model.transformer.final_layer_norm.weight")
    {
        Architecture::Sd1
    } else {
        return Err("a U-Net without a text encoder that text2img knows (cond_stage_model.transformer / cond_stage_model.model / conditioner.embedders)".into());
    };
    Ok((architecture, inpainting))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(
        entries: &[(&'static str, &'static [usize])],
    ) -> HashMap<&'static str, &'static [usize]> {
        entries.iter().copied().collect()
    }

    const CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";

    #[test]
    fn the_architecture_is_read_from_names_and_shapes() {
        let sd1 = shapes(&[
            (CONV_IN, &[320, 4, 3, 3]),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
        ]);
        assert_eq!(detect(&sd1), Ok((Architecture::Sd1, false)));
        let sd2_inpaint = shapes(&[
            (CONV_IN, &[320, 9, 3, 3]),
            ("cond_stage_model.model.ln_final.weight", &[1024]),
        ]);
        assert_eq!(detect(&sd2_inpaint), Ok((Architecture::Sd2, true)));
        let sdxl = shapes(&[
            (CONV_IN, &[320, 4, 3, 3]),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("conditioner.embedders.1.model.ln_final.weight", &[1280]),
        ]);
        assert_eq!(detect(&sdxl), Ok((Architecture::Sdxl, false)));
        let refiner = shapes(&[
            (CONV_IN, &[384, 4, 3, 3]),
            ("conditioner.embedders.0.model.ln_final.weight", &[1280]),
        ]);
        assert_eq!(detect(&refiner), Ok((Architecture::SdxlRefiner, false)));
        let sd3 = shapes(&[(
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            &[4, 4],
        )]);
        assert!(detect(&sd3).unwrap_err().contains("Stable Diffusion 3"));
        let flux = shapes(&[("double_blocks.0.img_attn.qkv.weight", &[4, 4])]);
        assert!(detect(&flux).unwrap_err().contains("Flux"));
        let embedding = shapes(&[("emb_params", &[2, 768])]);
        assert!(detect(&embedding).unwrap_err().contains("embedding"));
        let odd = shapes(&[(CONV_IN, &[320, 8, 3, 3])]);
        assert!(detect(&odd).unwrap_err().contains("input channels"));
    }
}
