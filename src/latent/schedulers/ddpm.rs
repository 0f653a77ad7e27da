//! DDPM ancestral sampling, as diffusers' `DDPMScheduler`: draws noise from the generators at
//! every step whose timestep is above 0.

use candle_core::Tensor;

use super::common::{
    self, alpha_noise_methods, beta_config, invalid, unscaled_input_methods, Prediction, Spacing,
};
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
        let betas = common::betas(&beta_config!(CLASS, config, true))?;
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
}

impl Scheduler for Ddpm {
    unscaled_input_methods!();
    alpha_noise_methods!();

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut BatchGenerator,
    ) -> Result<Tensor> {
        common::check_step_inputs(CLASS, model_output, sample)?;
        let t = common::step_timestep(CLASS, &self.timesteps_int, index)?;
        // `previous_timestep`: the next timestep of the schedule, -1 after the last.
        let prev_t = self.timesteps_int.get(index + 1).copied().unwrap_or(-1);
        let (a_t, a_prev) = common::alpha_pair(CLASS, &self.alphas_cumprod, t, prev_t, 1.0)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let current_alpha = a_t / a_prev;
        let current_beta = 1.0 - current_alpha;

        let x0 = common::predicted_x0(
            self.prediction,
            model_output,
            sample,
            a_t.sqrt(),
            b_t.sqrt(),
        )?;
        let x0 = self.x0.apply(x0)?;

        let x0_coeff = (a_prev.sqrt() * current_beta) / b_t;
        let sample_coeff = current_alpha.sqrt() * b_prev / b_t;
        let prev = (common::mul(&x0, x0_coeff)? + common::mul(sample, sample_coeff)?)?;
        if t <= 0 {
            return Ok(prev);
        }
        // `_get_variance`, from the same alphas.
        let variance = ((1.0 - a_prev) / (1.0 - a_t) * current_beta).max(1e-20);
        let scale = match self.variance_type {
            Variance::Small => variance.sqrt(),
            Variance::SmallLog => (0.5 * variance.ln()).exp(),
            Variance::Large => current_beta.sqrt(),
        };
        common::add_noise(prev, scale, model_output, noise)
    }
}
