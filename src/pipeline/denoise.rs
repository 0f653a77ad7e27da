//! LatentGen's loop: one loop runs any [`DenoisePlan`] (txt2img's noise, img2img's noised
//! picture, inpainting's known region or extra channels, hires fix's second pass). What
//! differs between the features is in the plan, built by [`super::image_start`]; the loop
//! only asks the plan for the U-Net's extra input channels and the blend after each step.

use candle_core::Tensor;

use super::conditioning::Conditioning;
use super::{guidance, Pipeline, Resolved, StepControl, StepProgress};
use crate::cancel::{self, CancelFlag};
use crate::error::{Error, Result};
use crate::latent::schedulers::Scheduler;
use crate::latent::unet::embeddings::guidance_scale_embedding;
use crate::latent::unet::{ControlResiduals, ExtraConditions};

use super::control::ActiveControls;
use crate::rng::BatchGenerator;

/// Where a pass starts and what it adds to each step.
pub struct DenoisePlan {
    /// The latents before the first step, (n, latent channels, h, w).
    pub latents: Tensor,
    /// The index of the first timestep run (img2img skips the first ones).
    pub begin: usize,
    /// The index after the last timestep run (a base model that hands over to a refiner
    /// stops early); `None`: the schedule's end.
    pub end: Option<usize>,
    pub inpainting: Option<Inpainting>,
}

/// How inpainting keeps the unmasked region.
pub enum Inpainting {
    /// A plain (4-channel) U-Net: after each step the known region's latents, noised to the
    /// next step's level with the start's noise, replace the latents outside the mask.
    Blend {
        image_latents: Tensor,
        /// (n, 1, h, w): 1 repaints, 0 keeps.
        mask: Tensor,
        noise: Tensor,
    },
    /// An inpainting U-Net (9 channels): the mask and the masked picture's latents,
    /// (n, 5, h, w), join its input channels at every step.
    Channels { extra: Tensor },
}

/// The text side of a run, ready for the U-Net: the guidance batch (unconditional rows
/// first when guiding) and the conditional half alone.
pub struct TextConditions {
    pub conditioning: Conditioning,
    /// Classifier-free guidance: the batch holds an unconditional and a conditional half.
    pub cfg: bool,
    pub n: usize,
}

impl TextConditions {
    /// The conditional half's rows of a guidance-batch tensor.
    fn cond_rows(&self, t: &Tensor) -> Result<Tensor> {
        Ok(if self.cfg {
            t.narrow(0, self.n, self.n)?
        } else {
            t.clone()
        })
    }
}

/// One run of the loop over a scheduler's steps.
pub struct Pass {
    pub scheduler: Box<dyn Scheduler>,
    pub plan: DenoisePlan,
    /// The steps the schedule was made for (the guidance interval's fractions count them).
    pub steps: usize,
    /// The output's (height, width) in pixels, for SDXL's time ids.
    pub size: (usize, usize),
    /// Steps run before this pass (hires fix's second pass follows the first), and the
    /// steps of all passes, for progress.
    pub steps_before: usize,
    pub steps_total: usize,
    /// Whether the request's ControlNets steer this pass (not the refiner's).
    pub controlled: bool,
}

/// What a pass ended with.
pub struct PassOutcome {
    pub latents: Tensor,
    /// Steps this pass ran.
    pub completed: usize,
    /// The caller asked to finish early: later passes do not run.
    pub finished_early: bool,
}

impl Pipeline {
    /// Runs a pass: `on_step` sees each step; `finish` ends it early, inside a step (the
    /// latents of the last finished step stand).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_pass(
        &self,
        req: &super::GenerateRequest,
        resolved: &Resolved,
        text: &TextConditions,
        pass: Pass,
        generators: &mut BatchGenerator,
        finish: &CancelFlag,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
        warnings: &mut Vec<String>,
    ) -> Result<PassOutcome> {
        let Pass {
            mut scheduler,
            plan,
            steps,
            size,
            steps_before,
            steps_total,
            controlled,
        } = pass;
        let n = text.n;
        let cfg = text.cfg;
        let conditioning = &text.conditioning;
        let rows = conditioning.context.dim(0)?;
        let time_ids = match &conditioning.text_embeds {
            Some(_) if self.aesthetic_time_ids => Some(super::conditioning::aesthetic_time_ids(
                req.original_size.unwrap_or(size),
                req.crop_top_left,
                (req.negative_aesthetic_score, req.aesthetic_score),
                if cfg { n } else { 0 },
                n,
                &self.device,
            )?),
            Some(_) => Some(super::conditioning::time_ids(
                req.original_size.unwrap_or(size),
                req.crop_top_left,
                req.target_size.unwrap_or(size),
                rows,
                &self.device,
            )?),
            None => None,
        };
        let guidance_embedding = self
            .unet
            .config
            .time_cond_proj_dim
            .map(|dim| {
                guidance_scale_embedding(&vec![resolved.guidance_scale; rows], dim, &self.device)
            })
            .transpose()?;
        let extra = ExtraConditions {
            text_time: conditioning.text_embeds.as_ref().zip(time_ids.as_ref()),
            timestep_cond: guidance_embedding.as_ref(),
            control: None,
        };
        // The conditional half alone: for the steps outside the guidance interval and for
        // autoguidance's weaker U-Net. LCM U-Nets never need it: they have no unconditional
        // half and no guide U-Net.
        let cond_context = text.cond_rows(&conditioning.context)?;
        let cond_embeds = conditioning
            .text_embeds
            .as_ref()
            .map(|t| text.cond_rows(t))
            .transpose()?;
        let cond_time_ids = time_ids.as_ref().map(|t| text.cond_rows(t)).transpose()?;
        let cond_extra = ExtraConditions {
            text_time: cond_embeds.as_ref().zip(cond_time_ids.as_ref()),
            timestep_cond: None,
            control: None,
        };
        let guide_unet = match &self.guide_unet {
            Some(unet) if resolved.autoguidance > 1.0 => Some(unet),
            _ => None,
        };
        // An inpainting U-Net's extra channels, for a batch of `rows` rows.
        let with_channels = |input: Tensor, rows: usize| -> Result<Tensor> {
            match &plan.inpainting {
                Some(Inpainting::Channels { extra }) => {
                    let extra = if rows == n {
                        extra.clone()
                    } else {
                        Tensor::cat(&vec![extra; rows / n], 0)?
                    };
                    Ok(Tensor::cat(&[&input, &extra], 1)?)
                }
                _ => Ok(input),
            }
        };

        let timesteps_len = scheduler.timesteps().len();
        let controls = if controlled && !req.controls.is_empty() {
            Some(ActiveControls::prepare(
                &self.controlnets,
                &req.controls,
                size,
                n,
                &self.device,
            )?)
        } else {
            None
        };
        // The ControlNets' residuals for one U-Net call on `input` (latents only, without an
        // inpainting U-Net's extra channels) at step `i`.
        let control_for = |i: usize,
                           t: f64,
                           input: &Tensor,
                           context: &Tensor,
                           extra: &ExtraConditions,
                           scaled: &Tensor|
         -> Result<Option<ControlResiduals>> {
            match &controls {
                Some(c) => c.residuals(
                    i - plan.begin,
                    timesteps_len - plan.begin,
                    input,
                    t,
                    context,
                    extra,
                    (scaled, &cond_context, &cond_extra),
                    n,
                ),
                None => Ok(None),
            }
        };

        let timesteps = scheduler.timesteps().to_vec();
        // Counted in requested steps over the whole schedule, as diffusers' guiders do (PNDM
        // runs one or more evaluations beyond them; a full interval guides those too).
        let interval = resolved.guidance_interval;
        let guides = |i: usize| interval.is_full() || interval.guides_step(i, steps);
        if (cfg || guide_unet.is_some()) && !(plan.begin..timesteps.len()).any(guides) {
            warnings.push(format!(
                "guidance interval {interval} covers none of the {steps} steps: no step is guided"
            ));
        }
        let mut latents = plan.latents.clone();
        let mut completed = 0;
        let mut finished_early = false;
        let end = plan.end.unwrap_or(timesteps.len()).min(timesteps.len());
        for (i, &t) in timesteps.iter().enumerate().take(end).skip(plan.begin) {
            cancel::check()?;
            if finish.is_cancelled() {
                finished_early = true;
                break;
            }
            let guided = cfg && guides(i);
            let scaled = scheduler.scale_model_input(&latents, i)?;
            // The model evaluations of one step, which `finish` may cut short.
            let predict = || -> Result<Tensor> {
                let pred = if guided || !cfg {
                    let input = if guided {
                        Tensor::cat(&[&scaled, &scaled], 0)?
                    } else {
                        scaled.clone()
                    };
                    let control =
                        control_for(i, t, &input, &conditioning.context, &extra, &scaled)?;
                    self.unet.forward_sharded(
                        &with_channels(input, rows)?,
                        &vec![t; rows],
                        &conditioning.context,
                        &ExtraConditions {
                            control: control.as_ref(),
                            ..extra
                        },
                    )?
                } else {
                    // `cfg` excludes U-Nets that embed the guidance scale.
                    debug_assert!(guidance_embedding.is_none());
                    let control = control_for(i, t, &scaled, &cond_context, &cond_extra, &scaled)?;
                    self.unet.forward_sharded(
                        &with_channels(scaled.clone(), n)?,
                        &vec![t; n],
                        &cond_context,
                        &ExtraConditions {
                            control: control.as_ref(),
                            ..cond_extra
                        },
                    )?
                };
                let (pred, text_pred) = if guided {
                    let uncond = pred.narrow(0, 0, n)?;
                    let text_pred = pred.narrow(0, n, n)?;
                    let guided = guidance::guide(
                        &uncond,
                        &text_pred,
                        resolved.guidance_scale,
                        resolved.guidance_rescale,
                    )?;
                    (guided, text_pred)
                } else {
                    (pred.clone(), pred)
                };
                let pred = match guide_unet {
                    Some(weak_unet) if guides(i) => {
                        let weak = weak_unet.forward_sharded(
                            &with_channels(scaled.clone(), n)?,
                            &vec![t; n],
                            &cond_context,
                            &cond_extra,
                        )?;
                        guidance::autoguide(&pred, &text_pred, &weak, resolved.autoguidance)?
                    }
                    _ => pred,
                };
                Ok(pred)
            };
            let pred = match cancel::watching(&[finish], predict) {
                Ok(pred) => pred,
                // Finished inside the step: the last finished step's latents stand.
                Err(_) if finish.is_cancelled() && !cancel::requested() => {
                    finished_early = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            latents = scheduler.step(&pred, i, &latents, generators)?;
            if let Some(Inpainting::Blend {
                image_latents,
                mask,
                noise,
            }) = &plan.inpainting
            {
                // diffusers: the known region at the next step's noise level (clean after
                // the last step), outside the mask.
                let known = if i + 1 < timesteps.len() {
                    scheduler.add_noise(image_latents, noise, i + 1)?
                } else {
                    image_latents.clone()
                };
                latents = (known.broadcast_mul(&(1.0 - mask)?)? + latents.broadcast_mul(mask)?)?;
            }
            completed += 1;
            let progress = StepProgress {
                step: steps_before + completed,
                total: steps_total,
                latents: &latents,
                preview_vae: self.preview_vae.as_ref(),
            };
            match on_step(&progress) {
                StepControl::Continue => {}
                StepControl::Finish => {
                    finished_early = true;
                    break;
                }
                StepControl::Cancel => return Err(Error::Cancelled),
            }
        }
        Ok(PassOutcome {
            latents,
            completed,
            finished_early,
        })
    }
}
