//! Where the reverse diffusion starts: noise (txt2img), a picture noised to a strength
//! (img2img, diffusers' `StableDiffusionImg2ImgPipeline`), or a picture with a mask
//! (inpainting, `StableDiffusionInpaintPipeline`, for 4-channel U-Nets and 9-channel
//! inpainting U-Nets). Each makes a [`DenoisePlan`] for the one loop in [`super::denoise`].
//!
//! The generators are drawn from in diffusers' order, so a seed gives diffusers' image:
//! img2img samples the VAE's latent distribution with generator i for image i, then draws
//! the noise; inpainting samples the picture's (and then the masked picture's) distribution
//! with the first generator only (diffusers encodes the one picture once and repeats it).

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};

use super::denoise::{DenoisePlan, Inpainting};
use super::{GenerateRequest, MaskedContent, Pipeline, Resolved};
use crate::error::{Error, Result};
use crate::latent::schedulers::Scheduler;
use crate::rng::BatchGenerator;
use crate::vae::Vae;

/// The first step an img2img run of `steps` takes at `strength` (diffusers' `get_timesteps`:
/// the last int(steps x strength) steps run).
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    let run = steps_run(steps, Some(strength));
    if run == 0 {
        return Err(Error::InvalidRequest(format!(
            "strength {strength} of {steps} steps leaves no step to run (int(steps x strength) = 0); raise one of them"
        )));
    }
    Ok(steps - run)
}

/// The steps a pass of `steps` runs: int(steps x strength) from a picture, all from noise.
pub fn steps_run(steps: usize, strength: Option<f64>) -> usize {
    match strength {
        Some(s) => ((steps as f64 * s) as usize).min(steps),
        None => steps,
    }
}

pub fn check_strength(strength: f64) -> Result<()> {
    if strength.is_finite() && strength > 0.0 && strength <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "strength must be in (0, 1], not {strength}"
        )))
    }
}

/// An RGB picture as the VAE takes it: (1, 3, h, w) in [-1, 1] (x / 255 * 2 - 1 in float32).
pub fn pixels(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 255.0 * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// diffusers' binarised mask: 1 where the grey level is at least half (repaint), else 0;
/// (1, 1, h, w).
pub fn binary_mask(mask: &GrayImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let data: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&v| {
            if f32::from(v) / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, h, w), device)?)
}

/// The VAE's encoder as a request uses it: whole, or in tiles (`vae_tiling`).
pub struct Encoding<'a> {
    pub vae: &'a Vae,
    pub tiled: bool,
}

/// What an encoder gives: the KL autoencoder a distribution (mean, log-variance) to sample,
/// the tiny one latents.
enum Encoded {
    Distribution(Tensor, Tensor),
    Latents(Tensor),
}

impl Encoding<'_> {
    fn encode(&self, x: &Tensor) -> Result<Encoded> {
        Ok(match (self.vae, self.tiled) {
            (Vae::Kl(kl), true) => {
                let (mean, logvar) = kl.encode_tiled(x)?;
                Encoded::Distribution(mean, logvar)
            }
            (Vae::Kl(kl), false) => {
                let (mean, logvar) = kl.encode(x)?;
                Encoded::Distribution(mean, logvar)
            }
            (Vae::Tiny(tiny), _) => Encoded::Latents(tiny.encode(x)?),
        })
    }
}

/// The latents of an encoded picture for one generator, scaled as the U-Net's latents are
/// (diffusers' `retrieve_latents(vae.encode(x), generator)` times `scaling_factor`): a
/// distribution is sampled with that generator; the tiny autoencoder's latents draw nothing.
fn sample_latents(
    vae: &Vae,
    encoded: &Encoded,
    generators: &mut BatchGenerator,
    index: usize,
) -> Result<Tensor> {
    let sample = match encoded {
        Encoded::Distribution(mean, logvar) => {
            let std = (logvar * 0.5)?.exp()?;
            let eps = generators.randn_one(index, mean.dims(), mean.device())?;
            (mean + (std * eps)?)?
        }
        Encoded::Latents(latents) => latents.clone(),
    };
    let sample = match vae.shift_factor() {
        Some(shift) => (sample - shift)?,
        None => sample,
    };
    Ok((sample * vae.scaling_factor())?)
}

/// The noise of the whole batch, one row per generator.
fn batch_noise(
    shape: &[usize],
    generators: &mut BatchGenerator,
    device: &Device,
) -> Result<Tensor> {
    Ok(generators.randn(shape, device)?)
}

/// txt2img: noise scaled to the scheduler's starting sigma.
pub fn from_noise(
    shape: &[usize],
    scheduler: &dyn Scheduler,
    generators: &mut BatchGenerator,
    device: &Device,
) -> Result<DenoisePlan> {
    let latents = (batch_noise(shape, generators, device)? * scheduler.init_noise_sigma())?;
    Ok(DenoisePlan {
        latents,
        begin: 0,
        end: None,
        inpainting: None,
    })
}

/// img2img from latents the U-Net already speaks (hires fix's second pass): noised to the
/// `begin`-th step's level.
pub fn from_latents(
    latents: &Tensor,
    begin: usize,
    scheduler: &mut dyn Scheduler,
    generators: &mut BatchGenerator,
) -> Result<DenoisePlan> {
    scheduler.set_begin_index(begin)?;
    let noise = batch_noise(latents.dims(), generators, latents.device())?;
    Ok(DenoisePlan {
        latents: scheduler.add_noise(latents, &noise, begin)?,
        begin,
        end: None,
        inpainting: None,
    })
}

/// img2img from a picture of the output size: encoded, sampled with each image's generator,
/// noised to the `begin`-th step's level.
pub fn from_picture(
    vae: &Encoding,
    picture: &RgbImage,
    begin: usize,
    scheduler: &mut dyn Scheduler,
    generators: &mut BatchGenerator,
    device: &Device,
) -> Result<DenoisePlan> {
    let encoded = vae.encode(&pixels(picture, device)?)?;
    let rows = (0..generators.len())
        .map(|i| sample_latents(vae.vae, &encoded, generators, i))
        .collect::<Result<Vec<_>>>()?;
    let init = Tensor::cat(&rows, 0)?;
    from_latents(&init, begin, scheduler, generators)
}

/// Inpainting: `picture` and `mask` of the output size, `latent_shape` the batch's latents.
/// A 9-channel U-Net gets the mask and the masked picture's latents as extra input channels;
/// a 4-channel one gets the known region put back after each step.
#[allow(clippy::too_many_arguments)]
pub fn inpainting(
    encoding: &Encoding,
    unet_channels: usize,
    picture: &RgbImage,
    mask: &GrayImage,
    begin: usize,
    full_strength: bool,
    content: MaskedContent,
    scheduler: &mut dyn Scheduler,
    generators: &mut BatchGenerator,
    device: &Device,
) -> Result<DenoisePlan> {
    let vae = encoding.vae;
    let n = generators.len();
    let latent_channels = vae.latent_channels();
    let f = vae.downsampling_factor();
    let (w, h) = (picture.width() as usize, picture.height() as usize);
    let shape = [n, latent_channels, h / f, w / f];
    let blend = unet_channels == latent_channels;
    if !blend && unet_channels != 2 * latent_channels + 1 {
        return Err(Error::InvalidRequest(format!(
            "inpainting needs a U-Net of {latent_channels} input channels, or {} (an inpainting U-Net); this one has {unet_channels}",
            2 * latent_channels + 1
        )));
    }
    let mask_full = binary_mask(mask, device)?;
    if mask_full.sum_all()?.to_scalar::<f32>()? == 0.0 {
        return Err(Error::InvalidRequest(
            "the mask is empty: nothing to repaint (white marks the area to repaint)".into(),
        ));
    }
    scheduler.set_begin_index(begin)?;
    let image = pixels(picture, device)?;
    // The picture's latents: the blend's known region, and img2img's start below full strength.
    let image_latents = if blend || !full_strength {
        let encoded = encoding.encode(&image)?;
        Some(sample_latents(vae, &encoded, generators, 0)?.repeat((n, 1, 1, 1))?)
    } else {
        None
    };
    let noise = batch_noise(&shape, generators, device)?;
    // diffusers' `interpolate(mask, size)`: nearest, the top-left pixel of each latent's cell.
    let mask_latent = mask_full
        .reshape((1, 1, h / f, f, w / f, f))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((1, 1, h / f, w / f))?
        .repeat((n, 1, 1, 1))?;
    let latents = match &image_latents {
        Some(init) if !full_strength => {
            // A1111's masked content: what the masked area starts from (the kept area and
            // the blend are unchanged).
            let start = match content {
                MaskedContent::LatentNothing => init.broadcast_mul(&(1.0 - &mask_latent)?)?,
                MaskedContent::LatentNoise => {
                    let random = batch_noise(&shape, generators, device)?;
                    (init.broadcast_mul(&(1.0 - &mask_latent)?)?
                        + random.broadcast_mul(&mask_latent)?)?
                }
                MaskedContent::Original | MaskedContent::Fill => init.clone(),
            };
            scheduler.add_noise(&start, &noise, begin)?
        }
        _ => (&noise * scheduler.init_noise_sigma())?,
    };
    // The masked picture (repaint area grey) is always encoded and sampled, with the first
    // generator: a 4-channel U-Net does not read it, but the draw moves that generator on.
    let keep = (1.0 - &mask_full)?;
    let masked = image.broadcast_mul(&keep)?;
    let inpainting = if blend {
        // (The tiny autoencoder's latents draw nothing.)
        if vae.kl().is_some() {
            let eps_shape = [1, latent_channels, h / f, w / f];
            generators.randn_one(0, &eps_shape, device)?;
        }
        Inpainting::Blend {
            image_latents: image_latents.expect("encoded for the blend"),
            mask: mask_latent,
            noise,
        }
    } else {
        let encoded = encoding.encode(&masked)?;
        let masked_latents = sample_latents(vae, &encoded, generators, 0)?.repeat((n, 1, 1, 1))?;
        Inpainting::Channels {
            extra: Tensor::cat(&[&mask_latent, &masked_latents], 1)?,
        }
    };
    Ok(DenoisePlan {
        latents,
        begin,
        end: None,
        inpainting: Some(inpainting),
    })
}

impl Pipeline {
    /// The plan of a request's first pass: noise, a noised picture or inpainting. The
    /// picture and the mask come fitted to the output size ([`super::picture_prep`]).
    pub(super) fn start_plan(
        &self,
        req: &GenerateRequest,
        resolved: &Resolved,
        scheduler: &mut dyn Scheduler,
        generators: &mut BatchGenerator,
    ) -> Result<DenoisePlan> {
        let f = self.vae_scale_factor();
        let (w, h) = (resolved.width, resolved.height);
        let Some(picture) = &req.init_image else {
            let shape = [generators.len(), self.vae.latent_channels(), h / f, w / f];
            return from_noise(&shape, scheduler, generators, &self.device);
        };
        for (what, size) in [
            ("picture", Some(picture.dimensions())),
            ("mask", req.mask.as_ref().map(|m| m.dimensions())),
        ] {
            if let Some((pw, ph)) = size.filter(|&s| s != (w as u32, h as u32)) {
                return Err(Error::InvalidRequest(format!(
                    "the {what} is {pw}x{ph}, not the output's {w}x{h}: fit it first"
                )));
            }
        }
        let encoding = Encoding {
            vae: &self.vae,
            tiled: req.vae_tiling,
        };
        let strength = resolved.strength.expect("resolved with the picture");
        let begin = first_step(resolved.steps, strength)?;
        match &req.mask {
            None => from_picture(
                &encoding,
                picture,
                begin,
                scheduler,
                generators,
                &self.device,
            ),
            Some(mask) => inpainting(
                &encoding,
                self.unet.config.in_channels,
                picture,
                mask,
                begin,
                strength == 1.0,
                req.inpaint.masked_content,
                scheduler,
                generators,
                &self.device,
            ),
        }
    }
}

/// Latents resized for hires fix's second pass, as A1111's latent upscalers:
/// `interpolate(mode="bilinear", antialias=False)` (align_corners false) or `mode="nearest"`.
pub fn upscale_latents(
    latents: &Tensor,
    height: usize,
    width: usize,
    nearest: bool,
) -> Result<Tensor> {
    let (n, c, h, w) = latents.dims4()?;
    let x = latents.to_dtype(DType::F32)?;
    if nearest {
        let rows: Vec<u32> = (0..height).map(|i| ((i * h) / height) as u32).collect();
        let cols: Vec<u32> = (0..width).map(|j| ((j * w) / width) as u32).collect();
        let device = x.device();
        let x = x.index_select(&Tensor::new(rows.as_slice(), device)?, 2)?;
        return Ok(x.index_select(&Tensor::new(cols.as_slice(), device)?, 3)?);
    }
    // Bilinear with half-pixel centres: source = (dst + 0.5) * in / out - 0.5, clamped at 0.
    let taps = |out: usize, input: usize| -> Vec<(usize, usize, f32)> {
        let scale = input as f32 / out as f32;
        (0..out)
            .map(|d| {
                let src = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(input - 1);
                let i1 = (i0 + 1).min(input - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(height, h), taps(width, w));
    let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; n * c * height * width];
    for plane in 0..n * c {
        let src = &data[plane * h * w..(plane + 1) * h * w];
        let dst = &mut out[plane * height * width..(plane + 1) * height * width];
        for (y, &(y0, y1, fy)) in ty.iter().enumerate() {
            for (xx, &(x0, x1, fx)) in tx.iter().enumerate() {
                let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
                let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
                dst[y * width + xx] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (n, c, height, width),
        latents.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_step_follows_diffusers_get_timesteps() {
        assert_eq!(first_step(10, 0.5).unwrap(), 5);
        assert_eq!(first_step(10, 1.0).unwrap(), 0);
        assert_eq!(first_step(50, 0.75).unwrap(), 13); // int(37.5) = 37 steps run
        assert_eq!(first_step(4, 0.3).unwrap(), 3);
        assert!(first_step(4, 0.2).is_err()); // int(0.8) = 0 steps
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(first_step(10, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn latent_upscale_matches_torch_interpolate() {
        // torch.nn.functional.interpolate(torch.arange(6.).reshape(1,1,2,3), size=(3,5),
        // mode="bilinear", antialias=False)
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let up = upscale_latents(&x, 3, 5, false).unwrap();
        let got: Vec<f32> = up.flatten_all().unwrap().to_vec1().unwrap();
        let want = [
            0.0, 0.4, 1.0, 1.6, 2.0, 1.5, 1.9, 2.5, 3.1, 3.5, 3.0, 3.4, 4.0, 4.6, 5.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        // mode="nearest": floor(dst * in / out).
        let near = upscale_latents(&x, 4, 6, true).unwrap();
        let got: Vec<f32> = near.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            got,
            [
                0., 0., 1., 1., 2., 2., 0., 0., 1., 1., 2., 2., 3., 3., 4., 4., 5., 5., 3., 3., 4.,
                4., 5., 5.
            ]
        );
    }
}
