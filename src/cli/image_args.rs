//! The options that start a generation from a picture: img2img, inpainting, hires fix.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use text2img::image_in;
use text2img::pipeline::{GenerateRequest, HiresFix, LatentUpscaler};

#[derive(Args)]
pub struct ImageInputArgs {
    /// img2img: start from this picture (PNG, JPEG, WebP; EXIF orientation honoured, alpha
    /// dropped); the output takes its size, rounded down to a multiple of 8, unless --width
    /// and --height resize it.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Inpainting: white repaints, black keeps (with --init-image).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// How far the picture is noised, 0 to 1: the last int(steps x strength) steps run
    /// (default: 0.8, SDXL 0.3; inpainting 1).
    #[arg(long)]
    pub strength: Option<f64>,
    /// Hires fix: a second img2img pass on the latents enlarged by this factor.
    #[arg(long)]
    pub hires_scale: Option<f64>,
    /// Hires fix's steps (default: --steps); int(steps x strength) of them run.
    #[arg(long)]
    pub hires_steps: Option<usize>,
    /// Hires fix's strength (default 0.7).
    #[arg(long)]
    pub hires_strength: Option<f64>,
    /// How hires fix enlarges the latents: latent (bilinear) or latent-nearest.
    #[arg(long, value_parser = ["latent", "latent-nearest"])]
    pub hires_upscaler: Option<String>,
}

impl ImageInputArgs {
    /// Reads the pictures into the request (a bad file fails here, before the model loads).
    pub fn apply(&self, request: &mut GenerateRequest) -> Result<()> {
        let max = image_in::DEFAULT_MAX_SIDE;
        if let Some(path) = &self.init_image {
            let picture =
                image_in::open(path, max).map_err(|e| anyhow::anyhow!("--init-image: {e}"))?;
            request.init_image = Some(image_in::rgb(&picture));
        }
        if let Some(path) = &self.mask {
            if self.init_image.is_none() {
                bail!("--mask needs --init-image, the picture it masks");
            }
            let mask = image_in::open(path, max).map_err(|e| anyhow::anyhow!("--mask: {e}"))?;
            request.mask = Some(image_in::luma(&mask));
        }
        request.strength = self.strength;
        let hires_asked = self.hires_steps.is_some()
            || self.hires_strength.is_some()
            || self.hires_upscaler.is_some();
        match self.hires_scale {
            Some(scale) => {
                let default = HiresFix::default();
                request.hires = Some(HiresFix {
                    scale,
                    steps: self.hires_steps,
                    strength: self.hires_strength.unwrap_or(default.strength),
                    upscaler: match self.hires_upscaler.as_deref() {
                        Some("latent-nearest") => LatentUpscaler::Nearest,
                        _ => LatentUpscaler::Bilinear,
                    },
                    ..default
                });
            }
            None if hires_asked => {
                bail!("--hires-steps, --hires-strength and --hires-upscaler need --hires-scale")
            }
            None => {}
        }
        Ok(())
    }
}
