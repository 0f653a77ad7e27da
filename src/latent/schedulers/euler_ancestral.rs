//! Ancestral Euler sampling, as diffusers' `EulerAncestralDiscreteScheduler`: an Euler step
//! down to `sigma_down`, then fresh noise of size `sigma_up` from the generators (at every
//! step, the last included).

use candle_core::Tensor;

use super::common::{self, invalid, BetaConfig, Prediction, Spacing};
use super::config::EulerAncestralDiscreteConfig;
use super::euler::{begin_index, euler_init_noise_sigma, euler_timesteps, sigma_schedule_alphas};
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
        let alphas_cumprod = sigma_schedule_alphas(&BetaConfig {
            class: CLASS,
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: &config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
            extra_schedules: false,
        })?;
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
        let train_sigmas: Vec<f64> = common::train_sigmas(&alphas_cumprod)
            .into_iter()
            .map(|s| s as f64)
            .collect();
        let mut sigmas: Vec<f32> = timesteps32
            .iter()
            .map(|&t| common::np_interp_arange(t as f64, &train_sigmas) as f32)
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
        self.sigmas
            .get(self.begin_index + index)
            .copied()
            .ok_or_else(|| invalid(format!("{CLASS}: no sigma for step {index}")))
    }
}

impl Scheduler for EulerAncestralDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigma(index)?;
        common::div(sample, (sigma * sigma + 1.0).sqrt())
    }

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
            Prediction::Velocity => {
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                (common::mul(model_output, c_out)? + common::div(sample, sigma * sigma + 1.0)?)?
            }
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
        let z = noise.randn(model_output.dims(), common::device_of(model_output))?;
        Ok((prev + common::mul(&z, sigma_up)?)?)
    }
}
