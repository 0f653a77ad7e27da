//! Ancestral Euler sampling, as diffusers' `EulerAncestralDiscreteScheduler`: an Euler step
//! down to `sigma_down`, then fresh noise of size `sigma_up` from the generators (at every
//! step, the last included).

use candle_core::Tensor;

use super::common::{
    self, begin_index, beta_config, sigma_scaled_input_methods, Prediction, Spacing,
};
use super::config::EulerAncestralDiscreteConfig;
use super::euler::{euler_init_noise_sigma, euler_timesteps, sigma_schedule_alphas};
use super::Scheduler;
use crate::error::Result;
use crate::rng::BatchGenerator;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

pub struct EulerAncestralDiscrete {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction: Prediction,
    begin_index: usize,
}

impl EulerAncestralDiscrete {
    pub fn new(config: &EulerAncestralDiscreteConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = sigma_schedule_alphas(&beta_config!(CLASS, config, false))?;
        // diffusers raises NotImplementedError for `sample` at the first step.
        let prediction = Prediction::parse(
            CLASS,
            &config.prediction_type,
            &[Prediction::Epsilon, Prediction::Velocity],
        )?;
        let spacing = Spacing::parse(CLASS, &config.timestep_spacing)?;
        let timesteps32 = euler_timesteps(
            spacing,
            config.num_train_timesteps,
            steps,
            config.steps_offset,
        );
        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f32> =
            common::interp_sigmas(timesteps32.iter().map(|&t| t as f64), &train_sigmas)
                .into_iter()
                .map(|s| s as f32)
                .collect();
        sigmas.push(0.0);
        let timesteps: Vec<f64> = timesteps32.iter().map(|&t| t as f64).collect();
        Ok(Self {
            init_noise_sigma: euler_init_noise_sigma(spacing, &sigmas),
            begin_index: begin_index(&timesteps),
            sigmas,
            timesteps,
            prediction,
        })
    }

    fn sigma(&self, index: usize) -> Result<f32> {
        common::euler_sigma(CLASS, &self.sigmas, self.begin_index, index)
    }
}

impl Scheduler for EulerAncestralDiscrete {
    sigma_scaled_input_methods!();

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut BatchGenerator,
    ) -> Result<Tensor> {
        common::check_step_inputs(CLASS, model_output, sample)?;
        let sigma = self.sigma(index)?;
        let sigma_to = self.sigma(index + 1)?;
        let x0 = match self.prediction {
            Prediction::Velocity => common::velocity_x0_sigma(model_output, sample, sigma)?,
            _ => (sample - common::mul(model_output, sigma)?)?,
        };
        let sigma_from = sigma;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let derivative = common::div(&(sample - x0)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (sample + common::mul(&derivative, dt)?)?;
        common::add_noise(prev, sigma_up, model_output, noise)
    }
}
