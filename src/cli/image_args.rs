//! The options that start a generation from a picture: img2img, inpainting, hires fix.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use text2img::image_in;
use text2img::pipeline::{
    GenerateRequest, HiresFix, InpaintOptions, LatentUpscaler, MaskedContent, Outpaint, ResizeMode,
};

/// `L,T,R,B` pixels.
fn parse_outpaint(text: &str) -> Result<Outpaint, String> {
    let parts: Vec<u32> = text
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!("`{text}` is not LEFT,TOP,RIGHT,BOTTOM in pixels (such as 0,0,128,0)")
        })?;
    match parts[..] {
        [left, top, right, bottom] => Ok(Outpaint {
            left,
            top,
            right,
            bottom,
        }),
        _ => Err(format!(
            "`{text}` is not LEFT,TOP,RIGHT,BOTTOM in pixels (such as 0,0,128,0)"
        )),
    }
}

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
    /// How a picture of another size than the output is fitted: stretch, crop (cover, cut
    /// the overflow) or fill (fit inside, stretch the edges into the bands).
    #[arg(long, value_parser = ["stretch", "crop", "fill"], default_value = "stretch")]
    pub resize_mode: String,
    /// Blur the mask by this many pixels (A1111's mask blur); then the original is pasted
    /// back over the kept area along the soft edge. 0 (the default) matches diffusers.
    #[arg(long, default_value_t = 0.0)]
    pub mask_blur: f32,
    /// Inpaint only the mask's box (plus --inpaint-padding), at the full output size, and
    /// paste it back into the whole picture (A1111's "only masked").
    #[arg(long)]
    pub inpaint_only_masked: bool,
    /// Pixels around the mask's box for --inpaint-only-masked.
    #[arg(long, default_value_t = 32)]
    pub inpaint_padding: u32,
    /// What the masked area starts from: original, fill (the colours around it),
    /// latent-noise, latent-nothing.
    #[arg(long, value_parser = ["original", "fill", "latent-noise", "latent-nothing"], default_value = "original")]
    pub masked_content: String,
    /// Outpainting: grow the canvas by LEFT,TOP,RIGHT,BOTTOM pixels and paint the new area.
    #[arg(long, value_parser = parse_outpaint)]
    pub outpaint: Option<Outpaint>,
    /// With --refiner: the fraction of the steps after which the refiner takes over
    /// (default 0.8; 1 turns it off).
    #[arg(long)]
    pub refiner_start: Option<f64>,
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
        if self.outpaint.is_some() && self.init_image.is_none() {
            bail!("--outpaint needs --init-image, the picture it extends");
        }
        request.strength = self.strength;
        request.refiner_start = self.refiner_start;
        request.outpaint = self.outpaint;
        request.resize_mode = match self.resize_mode.as_str() {
            "crop" => ResizeMode::Crop,
            "fill" => ResizeMode::Fill,
            _ => ResizeMode::Stretch,
        };
        request.inpaint = InpaintOptions {
            mask_blur: self.mask_blur,
            only_masked_padding: self.inpaint_only_masked.then_some(self.inpaint_padding),
            masked_content: match self.masked_content.as_str() {
                "fill" => MaskedContent::Fill,
                "latent-noise" => MaskedContent::LatentNoise,
                "latent-nothing" => MaskedContent::LatentNothing,
                _ => MaskedContent::Original,
            },
            // With A1111's options, A1111's result: the kept area pasted back.
            keep_original: self.mask_blur > 0.0 || self.inpaint_only_masked,
        };
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
