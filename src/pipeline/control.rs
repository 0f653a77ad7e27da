//! ControlNets in the denoise loop, with diffusers' semantics: each unit's residuals are
//! weighed by its scale on the steps whose fraction lies in its interval
//! (`control_guidance_start/end`), several units add up (multi-ControlNet), and guess mode
//! runs them on the conditional half only, their scales ramped from 0.1 to 1 over the
//! residuals.

use candle_core::{Device, Tensor};
use image::RgbImage;

use super::picture_prep::fit_to;
use super::ResizeMode;

use crate::error::{Error, Result};
use crate::latent::controlnet::ControlNet;
use crate::latent::unet::{ControlResiduals, ExtraConditions};

/// One ControlNet steering a request: which of the pipeline's ControlNets
/// ([`super::Pipeline::add_controlnet`]), its control image, its weight and the fraction of
/// the steps it acts on.
#[derive(Clone, Debug)]
pub struct ControlUnit {
    pub net: usize,
    /// Taken as given (an edge map, a pose...), resized to the output size.
    pub image: RgbImage,
    /// diffusers' `controlnet_conditioning_scale`.
    pub scale: f64,
    /// diffusers' `control_guidance_start` and `control_guidance_end`: the unit acts on step
    /// i (of n) when i / n >= start and (i + 1) / n <= end.
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
    /// How an image of another aspect ratio is fitted (diffusers stretches it; A1111's
    /// ControlNet crops by default).
    pub resize: ResizeMode,
}

/// How a ControlNet's residuals are weighed against the prompt (A1111's `control_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControlMode {
    /// Every residual at the unit's scale, on both halves of guidance ("Balanced").
    #[default]
    Balanced,
    /// The residuals ramped from 0.1 x scale (first skip) to 1 x scale (mid block) on a log
    /// scale, on both halves ("My prompt is more important").
    Prompt,
    /// Ramped, and on the conditional half only: diffusers' `guess_mode` ("ControlNet is
    /// more important").
    Control,
}

impl ControlUnit {
    /// A unit at scale 1 over all the steps, balanced, its image stretched.
    pub fn new(net: usize, image: RgbImage) -> Self {
        Self {
            net,
            image,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            mode: ControlMode::Balanced,
            resize: ResizeMode::Stretch,
        }
    }

    /// The unit names one of `nets` loaded ControlNets, and [`ControlUnit::check_values`].
    pub fn check(&self, nets: usize) -> Result<()> {
        if self.net >= nets {
            return Err(Error::InvalidRequest(format!(
                "ControlNet {} asked for; {nets} loaded",
                self.net
            )));
        }
        self.check_values()
    }

    /// Its scale is a number and its interval lies in 0..1, start before end.
    pub fn check_values(&self) -> Result<()> {
        if !(self.scale.is_finite()) {
            return Err(Error::InvalidRequest(
                "the ControlNet's scale must be a number".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.start)
            || !(0.0..=1.0).contains(&self.end)
            || self.start >= self.end
        {
            return Err(Error::InvalidRequest(format!(
                "the ControlNet's interval {}..{} must lie in 0..1 and start before it ends",
                self.start, self.end
            )));
        }
        Ok(())
    }
}

/// The units of one pass, their images ready at the pass's size.
pub(super) struct ActiveControls<'a> {
    units: Vec<(&'a ControlNet, &'a ControlUnit, Tensor)>,
}

impl<'a> ActiveControls<'a> {
    /// Each unit's image resized to `size` (height, width) pixels as diffusers does (Lanczos),
    /// in 0..1, one row per image of the batch (`n`).
    pub fn prepare(
        nets: &'a [ControlNet],
        units: &'a [ControlUnit],
        size: (usize, usize),
        n: usize,
        device: &Device,
    ) -> Result<Self> {
        let (h, w) = size;
        let units = units
            .iter()
            .map(|unit| {
                unit.check(nets.len())?;
                let image = fit_to(&unit.image, unit.resize, w as u32, h as u32);
                let data: Vec<f32> = image
                    .as_raw()
                    .iter()
                    .map(|&v| f32::from(v) / 255.0)
                    .collect();
                let one = Tensor::from_vec(data, (h, w, 3), device)?
                    .permute((2, 0, 1))?
                    .unsqueeze(0)?
                    .contiguous()?;
                let rows = Tensor::cat(&vec![&one; n], 0)?;
                Ok((&nets[unit.net], unit, rows))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { units })
    }

    /// The summed residuals for one U-Net call at step `index` of `count` (counted from the
    /// pass's first step), or `None` when no unit acts on it. `input` has `rows` rows: the
    /// conditional half alone (`rows == n`), or the unconditional half first (`2n`);
    /// `cond` gives the conditional half's input, context and conditions for guess mode.
    #[allow(clippy::too_many_arguments)]
    pub fn residuals(
        &self,
        index: usize,
        count: usize,
        input: &Tensor,
        timestep: f64,
        context: &Tensor,
        extra: &ExtraConditions,
        cond: (&Tensor, &Tensor, &ExtraConditions),
        n: usize,
    ) -> Result<Option<ControlResiduals>> {
        let rows = input.dim(0)?;
        let halves = rows == 2 * n;
        let mut total: Option<ControlResiduals> = None;
        for (net, unit, image) in &self.units {
            let (i, c) = (index as f64, count as f64);
            let keep = i / c >= unit.start && (i + 1.0) / c <= unit.end;
            if !keep || unit.scale == 0.0 {
                continue;
            }
            // "ControlNet is more important" (guess mode) guides with the ControlNet on the
            // conditional half only; the unconditional half gets no residual.
            let guess = unit.mode == ControlMode::Control && halves;
            let residuals = if guess {
                let (cond_input, cond_context, cond_extra) = cond;
                net.forward(
                    cond_input,
                    &vec![timestep; n],
                    cond_context,
                    cond_extra,
                    image,
                )?
            } else {
                let image = if halves {
                    Tensor::cat(&[image, image], 0)?
                } else {
                    image.clone()
                };
                net.forward_sharded(input, &vec![timestep; rows], context, extra, &image)?
            };
            let count = residuals.down.len();
            // diffusers: guess mode's scales run from 0.1 to 1 (logspace) over the down
            // residuals and the mid one (A1111's 0.825^(12 - k) for SD's 13).
            let weight = |k: usize| -> f64 {
                if unit.mode != ControlMode::Balanced {
                    10f64.powf(-1.0 + k as f64 / count as f64) * unit.scale
                } else {
                    unit.scale
                }
            };
            let mut scaled = ControlResiduals {
                down: residuals
                    .down
                    .iter()
                    .enumerate()
                    .map(|(k, r)| r.affine(weight(k), 0.0))
                    .collect::<candle_core::Result<_>>()?,
                mid: residuals.mid.affine(weight(count), 0.0)?,
            };
            if guess {
                let zeros_before = |t: &Tensor| -> candle_core::Result<Tensor> {
                    Tensor::cat(&[&t.zeros_like()?, t], 0)
                };
                scaled = ControlResiduals {
                    down: scaled
                        .down
                        .iter()
                        .map(zeros_before)
                        .collect::<candle_core::Result<_>>()?,
                    mid: zeros_before(&scaled.mid)?,
                };
            }
            total = Some(match total {
                Some(t) => t.add(&scaled)?,
                None => scaled,
            });
        }
        Ok(total)
    }
}
