//! SDXL's ensemble of experts (diffusers' `denoising_end` / `denoising_start`): the base model
//! runs the steps down to a timestep cutoff, a refiner model (its own U-Net and text encoder,
//! time ids with an aesthetic score) runs the rest from the same latents, no noise added, the
//! seed's generators going on.

use candle_core::Tensor;

use super::denoise::{DenoisePlan, Pass, PassOutcome};
use super::{Family, GenerateRequest, Pipeline, Resolved, StepControl, StepProgress};
use crate::cancel::CancelFlag;
use crate::error::{Error, Result};
use crate::rng::BatchGenerator;

/// The fraction of the schedule after which the refiner takes over when a request sets none
/// (A1111's "switch at").
pub const DEFAULT_REFINER_START: f64 = 0.8;

impl Pipeline {
    /// Makes `refiner` finish this model's generations from [`GenerateRequest::refiner_start`]
    /// on. It must read and write the same latents.
    pub fn set_refiner(&mut self, refiner: Pipeline) -> Result<()> {
        if refiner.family != Family::StableDiffusionXl || self.family != Family::StableDiffusionXl {
            return Err(Error::InvalidRequest(format!(
                "a refiner is an SDXL model that finishes an SDXL model's steps; here the model is {:?} and the refiner {:?}",
                self.family, refiner.family
            )));
        }
        if refiner.vae.latent_channels() != self.vae.latent_channels()
            || refiner.vae_scale_factor() != self.vae_scale_factor()
            || refiner.unet.config.in_channels != self.unet.config.in_channels
        {
            return Err(Error::InvalidRequest(
                "the refiner's latents differ from the model's (channels or size)".into(),
            ));
        }
        self.refiner = Some(Box::new(refiner));
        Ok(())
    }

    /// The refiner and the fraction where it takes over, when one runs for `req`.
    pub(super) fn refiner_handover(
        &self,
        req: &GenerateRequest,
    ) -> Result<Option<(&Pipeline, f64)>> {
        let Some(refiner) = &self.refiner else {
            return match req.refiner_start {
                Some(_) => Err(Error::InvalidRequest(
                    "refiner_start needs a refiner model (--refiner)".into(),
                )),
                None => Ok(None),
            };
        };
        let start = req.refiner_start.unwrap_or(DEFAULT_REFINER_START);
        if !(start.is_finite() && start > 0.0 && start <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "refiner start must be in (0, 1], not {start}"
            )));
        }
        if start >= 1.0 {
            return Ok(None);
        }
        if req.init_image.is_some() || req.hires.is_some() {
            // The refiner follows txt2img only: by default an img2img or hires request runs
            // without it; asked for by name, that is an error.
            if req.refiner_start.is_none() {
                return Ok(None);
            }
            return Err(Error::InvalidRequest(
                "the refiner finishes a txt2img run; for img2img or hires fix set refiner start to 1"
                    .into(),
            ));
        }
        Ok(Some((refiner, start)))
    }

    /// diffusers' `discrete_timestep_cutoff`: int(round(T - fraction x T)).
    pub(super) fn timestep_cutoff(&self, fraction: f64) -> f64 {
        let train = self
            .scheduler_config
            .get("num_train_timesteps")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(1000.0);
        (train - fraction * train).round()
    }

    /// The refiner's pass (`self` is the refiner) over the steps below the cutoff of `start`,
    /// from the base model's `latents`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refine(
        &self,
        req: &GenerateRequest,
        base: &Resolved,
        latents: Tensor,
        start: f64,
        generators: &mut BatchGenerator,
        finish: &CancelFlag,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
        (steps_before, steps_total): (usize, usize),
        warnings: &mut Vec<String>,
    ) -> Result<PassOutcome> {
        // The refiner has one text encoder: it reads the first prompt (diffusers zips the
        // prompts with the encoders it has), with the base's resolved settings.
        let first = |v: &Option<Vec<String>>| v.as_ref().map(|v| vec![v[0].clone()]);
        let req = GenerateRequest {
            prompts: vec![req.prompt().to_string()],
            negative_prompts: first(&req.negative_prompts),
            steps: Some(base.steps),
            guidance_scale: Some(base.guidance_scale),
            guidance_rescale: Some(base.guidance_rescale),
            guidance_interval: Some(base.guidance_interval),
            autoguidance: Some(1.0),
            scheduler: Some(base.scheduler),
            width: Some(base.width),
            height: Some(base.height),
            refiner_start: None,
            ..req.clone()
        };
        let resolved = self.resolve(&req)?;
        let text = self.text_conditions(&req, &resolved, warnings)?;
        let mut scheduler = self.scheduler(&req, &resolved, resolved.steps)?;
        let cutoff = self.timestep_cutoff(start);
        let remaining = scheduler
            .timesteps()
            .iter()
            .filter(|&&t| t < cutoff)
            .count();
        if remaining == 0 {
            return Ok(PassOutcome {
                latents,
                completed: 0,
                finished_early: false,
            });
        }
        let begin = scheduler.timesteps().len() - remaining;
        scheduler.set_begin_index(begin)?;
        let pass = Pass {
            scheduler,
            plan: DenoisePlan {
                latents,
                begin,
                end: None,
                inpainting: None,
            },
            steps: resolved.steps,
            size: (resolved.height, resolved.width),
            steps_before,
            steps_total,
            controlled: false,
        };
        self.run_pass(
            &req, &resolved, &text, pass, generators, finish, on_step, warnings,
        )
    }
}
