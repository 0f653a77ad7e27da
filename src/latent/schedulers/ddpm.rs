//! DDPM ancestral sampling, as diffusers' `DDPMScheduler`: draws noise from the generators at
//! every step whose timestep is above 0.

use candle_core::Tensor;

use super::common::{self, invalid, BetaConfig, Prediction, Spacing};
use super::config::DdpmConfig;
use super::ddim::{discrete_timesteps, X0Processing};
use super::Scheduler;
use crate::error::Result;
use crate::rng::BatchGenerator;

const CLASS: &str = "DDPMScheduler";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

pub struct Ddpm {
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    variance_type: Variance,
    x0: X0Processing,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
}

impl Ddpm {
    pub fn new(config: &DdpmConfig, steps: usize) -> Result<Self> {
        let betas = common::betas(&BetaConfig {
            class: CLASS,
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: &config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
            extra_schedules: true,
        })?;
        let alphas_cumprod = common::alphas_cumprod(&betas);
        let prediction = Prediction::parse(
            CLASS,
            &config.prediction_type,
            &[
                Prediction::Epsilon,
                Prediction::Sample,
                Prediction::Velocity,
            ],
        )?;
        let variance_type = match config.variance_type.as_str() {
            "fixed_small" => Variance::Small,
            "fixed_small_log" => Variance::SmallLog,
            "fixed_large" => Variance::Large,
            other => {
                return Err(invalid(format!(
                    "{CLASS}: variance_type `{other}` is not supported \
                     (fixed_small, fixed_small_log, fixed_large)"
                )))
            }
        };
        let spacing = Spacing::parse(CLASS, &config.timestep_spacing)?;
        let timesteps_int = discrete_timesteps(
            CLASS,
            spacing,
            config.num_train_timesteps,
            steps,
            config.steps_offset,
        )?;
        Ok(Self {
            alphas_cumprod,
            prediction,
            variance_type,
            x0: X0Processing::new(
                config.thresholding,
                config.clip_sample,
                config.dynamic_thresholding_ratio,
                config.sample_max_value,
                config.clip_sample_range,
            ),
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
        })
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| {
                invalid(format!(
                    "{CLASS}: timestep {t} is outside the training schedule"
                ))
            })
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut BatchGenerator,
    ) -> Result<Tensor> {
        common::check_step_inputs(CLASS, model_output, sample)?;
        let t = *self
            .timesteps_int
            .get(index)
            .ok_or_else(|| invalid(format!("{CLASS}: no step {index}")))?;
        // `previous_timestep`: the next timestep of the schedule, -1 after the last.
        let prev_t = self.timesteps_int.get(index + 1).copied().unwrap_or(-1);
        let a_t = self.alpha(t)?;
        let a_prev = if prev_t >= 0 {
            self.alpha(prev_t)?
        } else {
            1.0
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let current_alpha = a_t / a_prev;
        let current_beta = 1.0 - current_alpha;

        let x0 = match self.prediction {
            Prediction::Epsilon => common::div(
                &(sample - common::mul(model_output, b_t.sqrt())?)?,
                a_t.sqrt(),
            )?,
            Prediction::Sample => model_output.clone(),
            Prediction::Velocity => {
                (common::mul(sample, a_t.sqrt())? - common::mul(model_output, b_t.sqrt())?)?
            }
        };
        let x0 = self.x0.apply(x0)?;

        let x0_coeff = (a_prev.sqrt() * current_beta) / b_t;
        let sample_coeff = current_alpha.sqrt() * b_prev / b_t;
        let mut prev = (common::mul(&x0, x0_coeff)? + common::mul(sample, sample_coeff)?)?;

        if t > 0 {
            let z = noise.randn(model_output.dims(), common::device_of(model_output))?;
            // `_get_variance`, from the same alphas.
            let variance = ((1.0 - a_prev) / (1.0 - a_t) * current_beta).max(1e-20);
            let scale = match self.variance_type {
                Variance::Small => variance.sqrt(),
                Variance::SmallLog => (0.5 * variance.ln()).exp(),
                Variance::Large => current_beta.sqrt(),
            };
            prev = (prev + common::mul(&z, scale)?)?;
        }
        Ok(prev)
    }
}
