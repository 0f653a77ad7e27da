//! What a request will cost before it runs: seconds and peak memory, from the model's own
//! architecture, measured on this machine.
//!
//! The U-Net and the VAE decoder each run once at two small sizes while their operations are
//! counted ([`crate::flops`]) and their heap peak is measured ([`crate::alloc_count`]). A
//! U-Net evaluation's operations are `a x pixels + b x pixels^2` (the convolutions and linear
//! layers grow with the pixels, self-attention with their square), its memory `c + d x
//! pixels`; two sizes fix both. The seconds come from timing the larger probe: attention and
//! the rest each at their own measured rate. A request is then the sum over its evaluations
//! (steps x rows, the guide U-Net's, each image's decode).

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{conditioning, Pipeline, Resolved};
use crate::error::Result;
use crate::flops;
use crate::latent::unet::embeddings::guidance_scale_embedding;
use crate::latent::unet::ExtraConditions;

/// The two latent sizes the probes run at (square).
const PROBE_SIZES: [usize; 2] = [16, 48];

/// `fixed + linear x p + quadratic x p^2` in the latent pixels p of one image.
#[derive(Clone, Copy, Debug, Default)]
struct Curve {
    fixed: f64,
    linear: f64,
    quadratic: f64,
}

impl Curve {
    fn at(&self, pixels: f64) -> f64 {
        (self.fixed + self.linear * pixels + self.quadratic * pixels * pixels).max(0.0)
    }

    /// Through two points with `fixed` = 0 (operations) or `quadratic` = 0 (memory).
    fn no_fixed(p: [f64; 2], v: [f64; 2]) -> Self {
        // v = l p + q p^2: two equations.
        let q = (v[1] / p[1] - v[0] / p[0]) / (p[1] - p[0]);
        let l = v[0] / p[0] - q * p[0];
        Self {
            fixed: 0.0,
            linear: l,
            quadratic: q,
        }
    }

    fn line(p: [f64; 2], v: [f64; 2]) -> Self {
        let slope = ((v[1] - v[0]) / (p[1] - p[0])).max(0.0);
        Self {
            fixed: (v[0] - slope * p[0]).max(0.0),
            linear: slope,
            quadratic: 0.0,
        }
    }
}

/// One model part's measured cost curves.
#[derive(Clone, Copy, Debug, Default)]
struct PartCost {
    attention_flops: Curve,
    dense_flops: Curve,
    /// Heap bytes at its peak beyond what was live before (None without the counting
    /// allocator).
    peak_bytes: Option<Curve>,
    attention_rate: f64,
    dense_rate: f64,
}

impl PartCost {
    fn seconds(&self, pixels: f64) -> f64 {
        self.attention_flops.at(pixels) / self.attention_rate
            + self.dense_flops.at(pixels) / self.dense_rate
    }
}

/// A request's estimated cost.
#[derive(Clone, Copy, Debug)]
pub struct Estimate {
    pub seconds: f64,
    /// Peak heap bytes beyond the loaded model; `None` where the process cannot measure it.
    pub peak_bytes: Option<f64>,
    /// Operations (multiply-adds count two).
    pub flops: f64,
}

/// The cost curves of a loaded pipeline ([`CostModel::measure`]).
#[derive(Clone, Debug)]
pub struct CostModel {
    unet: PartCost,
    vae: PartCost,
    /// Latent pixels per image pixel (1 / 64 for SD).
    latent_per_pixel: f64,
}

/// Runs `f`, returning its counted operations, heap peak above the start and seconds.
fn measure<R>(f: impl FnOnce() -> Result<R>) -> Result<(f64, f64, Option<f64>, f64)> {
    crate::alloc_count::reset_peak();
    let before = crate::alloc_count::live();
    let started = Instant::now();
    let (out, attention, dense) = flops::count(f);
    let seconds = started.elapsed().as_secs_f64();
    out?;
    let peak = match (crate::alloc_count::peak(), before) {
        (Some(p), Some(b)) => Some(p.saturating_sub(b) as f64),
        _ => None,
    };
    Ok((attention, dense, peak, seconds))
}

/// The per-kind rates from one timed run: attention's share of the time from the layer
/// profile, the rest to everything else.
fn rates(attention: f64, dense: f64, seconds: f64, attention_seconds: f64) -> (f64, f64) {
    let attention_seconds = attention_seconds.clamp(0.0, seconds * 0.95);
    let dense_seconds = (seconds - attention_seconds).max(seconds * 0.05);
    let attention_rate = if attention > 0.0 && attention_seconds > 0.0 {
        attention / attention_seconds
    } else {
        (attention + dense) / seconds.max(1e-9)
    };
    (attention_rate.max(1.0), (dense / dense_seconds).max(1.0))
}

fn probe_part(run: &dyn Fn(usize) -> Result<()>) -> Result<PartCost> {
    let mut pixels = [0.0; 2];
    let mut attention = [0.0; 2];
    let mut dense = [0.0; 2];
    let mut peaks = [None; 2];
    let mut timing = (0.0, 0.0);
    // A first run warms the kernels' caches and the allocator, so the measured ones do not
    // count first touches.
    run(PROBE_SIZES[0])?;
    for (i, &size) in PROBE_SIZES.iter().enumerate() {
        let was_profiling = crate::profile::enabled();
        crate::profile::reset();
        crate::profile::enable(true);
        let measured = measure(|| run(size));
        crate::profile::enable(was_profiling);
        let (a, d, peak, seconds) = measured?;
        let attention_seconds: f64 = crate::profile::totals()
            .iter()
            .filter(|(name, _)| name.starts_with("attention"))
            .map(|(_, t)| t.seconds)
            .sum();
        crate::profile::reset();
        pixels[i] = (size * size) as f64;
        attention[i] = a;
        dense[i] = d;
        peaks[i] = peak;
        timing = (seconds, attention_seconds);
    }
    let (attention_rate, dense_rate) = rates(attention[1], dense[1], timing.0, timing.1);
    Ok(PartCost {
        attention_flops: Curve::no_fixed(pixels, attention),
        dense_flops: Curve::no_fixed(pixels, dense),
        peak_bytes: match peaks {
            [Some(a), Some(b)] => Some(Curve::line(pixels, [a, b])),
            _ => None,
        },
        attention_rate,
        dense_rate,
    })
}

impl CostModel {
    /// Runs the probes (a fraction of a second for small models, a few seconds for SDXL on two
    /// cores). Nothing else may run on the process meanwhile: the counters are process-wide.
    pub fn measure(pipeline: &Pipeline) -> Result<Self> {
        let device = &pipeline.device;
        let cond =
            pipeline.encode_prompts(&[String::new()], 0, Default::default(), &mut Vec::new())?;
        let unet = &pipeline.unet;
        let run_unet = |size: usize| -> Result<()> {
            let x = Tensor::zeros((1, unet.config.in_channels, size, size), DType::F32, device)?;
            let f = pipeline.vae_scale_factor();
            let ids = conditioning::time_ids(
                (size * f, size * f),
                (0, 0),
                (size * f, size * f),
                1,
                device,
            )?;
            let guidance = unet
                .config
                .time_cond_proj_dim
                .map(|dim| guidance_scale_embedding(&[7.5], dim, device))
                .transpose()?;
            let extra = ExtraConditions {
                text_time: cond.text_embeds.as_ref().map(|e| (e, &ids)),
                timestep_cond: guidance.as_ref(),
                control: None,
            };
            unet.forward_conditioned(&x, &[500.0], &cond.context, &extra)?;
            Ok(())
        };
        let vae = &pipeline.vae;
        let run_vae = |size: usize| -> Result<()> {
            let z = Tensor::zeros((1, vae.latent_channels(), size, size), DType::F32, device)?;
            vae.decode(&z)?;
            Ok(())
        };
        let f = pipeline.vae_scale_factor() as f64;
        Ok(Self {
            unet: probe_part(&run_unet)?,
            vae: probe_part(&run_vae)?,
            latent_per_pixel: 1.0 / (f * f),
        })
    }

    /// The cost of running `resolved` for `images` images, with classifier-free guidance's
    /// second row when `cfg`, plus `extra_evaluations` guide U-Net evaluations per step (taken
    /// at the U-Net's cost).
    pub fn estimate(&self, resolved: &Resolved, images: usize, cfg: bool, guide: bool) -> Estimate {
        let rows = images as f64 * if cfg { 2.0 } else { 1.0 };
        let per_evaluation = rows + if guide { images as f64 } else { 0.0 };
        // The passes' (latent pixels, evaluations): img2img runs int(steps x strength) of its
        // steps, hires fix adds its second pass at the larger size. PNDM runs one evaluation
        // more than its steps; the others as many.
        let latent = |w: usize, h: usize| (w * h) as f64 * self.latent_per_pixel;
        let run = super::image_start::steps_run;
        let mut passes = vec![(
            latent(resolved.width, resolved.height),
            (run(resolved.steps, resolved.strength) + 1) as f64 * per_evaluation,
        )];
        if let Some(h) = &resolved.hires {
            passes.push((
                latent(h.width, h.height),
                (run(h.steps, Some(h.strength)) + 1) as f64 * per_evaluation,
            ));
        }
        let (out_w, out_h) = resolved.output_size();
        let out = latent(out_w, out_h);
        let first = passes[0].0;
        let mut seconds = 0.0;
        let mut flops = 0.0;
        let mut unet_peak: Option<f64> = Some(0.0);
        for &(pixels, evaluations) in &passes {
            seconds += evaluations * self.unet.seconds(pixels);
            flops += evaluations
                * (self.unet.attention_flops.at(pixels) + self.unet.dense_flops.at(pixels));
            unet_peak = unet_peak
                .zip(self.unet.peak_bytes)
                .map(|(p, u)| p.max(u.at(pixels) * rows));
        }
        // Dec for each image; an img2img picture is encoded once per image, at about half
        // the decoder's cost (the encoder has half its layers at the large sizes).
        let encodes = if resolved.strength.is_some() {
            0.5 * images as f64
        } else {
            0.0
        };
        seconds += images as f64 * self.vae.seconds(out) + encodes * self.vae.seconds(first);
        flops += (images as f64 + encodes)
            * (self.vae.attention_flops.at(out) + self.vae.dense_flops.at(out));
        // The U-Net runs the guidance pair at once; one image is decoded at a time.
        let peak_bytes = match (unet_peak, self.vae.peak_bytes) {
            (Some(u), Some(v)) => Some(u.max(v.at(out))),
            _ => None,
        };
        Estimate {
            seconds,
            peak_bytes,
            flops,
        }
    }

    /// Scales the time estimates by `factor` (measured / estimated of finished jobs).
    pub fn rescale(&mut self, factor: f64) {
        if factor.is_finite() && factor > 0.0 {
            for part in [&mut self.unet, &mut self.vae] {
                part.attention_rate /= factor;
                part.dense_rate /= factor;
            }
        }
    }
}
