//! Which pipeline a model folder is: read from `model_index.json`'s class name (or, without
//! one, from the components present), with a clear error for layouts not supported yet.

use std::path::Path;

use crate::error::{Error, Result};
use crate::weights::folder::ModelFolder;

/// The pipelines text2img runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline` (SD 1.x/2.x): one CLIP text encoder.
    StableDiffusion,
    /// `LatentConsistencyModelPipeline`: SD 1.x/2.x with an LCM-distilled U-Net.
    LatentConsistency,
    /// `StableDiffusionXLPipeline`: two text encoders and `text_time` added conditioning.
    StableDiffusionXl,
}

/// Each text encoder's tokenizer and model folders, in the order of the condition strings
/// (SDXL takes both, the others the first).
pub const TEXT_ENCODERS: [(&str, &str); 2] = [
    ("tokenizer", "text_encoder"),
    ("tokenizer_2", "text_encoder_2"),
];

const SUPPORTED: &str =
    "StableDiffusionPipeline, StableDiffusionXLPipeline, LatentConsistencyModelPipeline";

impl Family {
    pub fn detect(folder: &ModelFolder) -> Result<Self> {
        let index = folder.root.join("model_index.json");
        let class = folder.index.get("_class_name").and_then(|v| v.as_str());
        Self::from_class(class, folder.component("text_encoder_2").is_dir(), &index)
    }

    /// From `model_index.json`'s class name (`index` names the file in errors); without
    /// one, a second text encoder means SDXL.
    pub fn from_class(class: Option<&str>, has_text_encoder_2: bool, index: &Path) -> Result<Self> {
        Ok(match class {
            Some("StableDiffusionPipeline") => Family::StableDiffusion,
            Some("LatentConsistencyModelPipeline") => Family::LatentConsistency,
            // The img2img class is how SDXL refiner folders are saved.
            Some("StableDiffusionXLPipeline") | Some("StableDiffusionXLImg2ImgPipeline") => {
                Family::StableDiffusionXl
            }
            Some(other) => return Err(unsupported(index, other)),
            None if has_text_encoder_2 => Family::StableDiffusionXl,
            None => Family::StableDiffusion,
        })
    }

    /// The (component, class) pairs the family loads, checked against `model_index.json`.
    pub fn components(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::StableDiffusion | Family::LatentConsistency => &[
                ("unet", "UNet2DConditionModel"),
                ("vae", "AutoencoderKL"),
                ("text_encoder", "CLIPTextModel"),
            ],
            Family::StableDiffusionXl => &[
                ("unet", "UNet2DConditionModel"),
                ("vae", "AutoencoderKL"),
                ("text_encoder", "CLIPTextModel"),
                ("text_encoder_2", "CLIPTextModelWithProjection"),
            ],
        }
    }

    /// Guidance when neither the request nor `text2img.json` sets one (diffusers' defaults).
    pub fn default_guidance(self) -> f64 {
        match self {
            Family::StableDiffusion => 7.5,
            Family::LatentConsistency => 8.5,
            Family::StableDiffusionXl => 5.0,
        }
    }

    /// img2img's strength when the request sets none (diffusers' img2img pipelines: 0.8 for
    /// Stable Diffusion, 0.3 for SDXL).
    pub fn default_strength(self) -> f64 {
        match self {
            Family::StableDiffusionXl => 0.3,
            _ => 0.8,
        }
    }

    /// Steps when neither the request nor `text2img.json` sets them (diffusers' defaults).
    pub fn default_steps(self) -> usize {
        match self {
            Family::LatentConsistency => 4,
            _ => 50,
        }
    }
}

fn unsupported(index: &Path, class: &str) -> Error {
    Error::config(
        index,
        format!("`{class}` folders are not supported yet; text2img runs {SUPPORTED}"),
    )
}
