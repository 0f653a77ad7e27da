//! Euler's method on the probability-flow ODE in sigma space, as diffusers'
//! `EulerDiscreteScheduler` (without churn: `s_churn` is 0 in diffusers' pipelines, so it
//! never draws noise). The timesteps fed to the U-Net are float32 values, fractional for
//! `linspace` spacing and Karras/exponential sigmas.

use candle_core::Tensor;

use super::common::{
    self, begin_index, beta_config, invalid, sigma_scaled_input_methods, BetaConfig, Prediction,
    Spacing,
};
use super::config::EulerDiscreteConfig;
use super::Scheduler;
use crate::error::Result;
use crate::rng::BatchGenerator;

const CLASS: &str = "EulerDiscreteScheduler";

pub struct EulerDiscrete {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction: Prediction,
    /// diffusers starts at the second occurrence of the first timestep when it appears twice.
    begin_index: usize,
}

/// The float32 timesteps of the Euler schedulers for a spacing, in order.
pub(crate) fn euler_timesteps(
    spacing: Spacing,
    n_train: usize,
    steps: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        Spacing::Linspace => common::np_linspace(0.0, n_train as f64 - 1.0, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = (n_train / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            common::np_arange_f64(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| common::np_round(t) as f32 - 1.0)
                .collect()
        }
    }
}

/// `init_noise_sigma` of the Euler schedulers: the largest sigma for `linspace` and
/// `trailing` spacing, `sqrt(max^2 + 1)` otherwise (float32).
pub(crate) fn euler_init_noise_sigma(spacing: Spacing, sigmas: &[f32]) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// The training `alphas_cumprod` of the Euler/DPM schedulers (with zero-SNR rescaling the
/// last one is set to 2^-24 so that its sigma stays finite).
pub(crate) fn sigma_schedule_alphas(config: &BetaConfig) -> Result<Vec<f32>> {
    let betas = common::betas(config)?;
    let mut alphas_cumprod = common::alphas_cumprod(&betas);
    if config.rescale_betas_zero_snr {
        let last = alphas_cumprod.len() - 1;
        alphas_cumprod[last] = 2f32.powi(-24);
    }
    Ok(alphas_cumprod)
}

impl EulerDiscrete {
    pub fn new(config: &EulerDiscreteConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = sigma_schedule_alphas(&beta_config!(CLASS, config, false))?;
        let prediction = Prediction::parse(
            CLASS,
            &config.prediction_type,
            &[
                Prediction::Epsilon,
                Prediction::Velocity,
                Prediction::Sample,
            ],
        )?;
        let spacing = Spacing::parse(CLASS, &config.timestep_spacing)?;
        let karras = config.use_karras_sigmas.unwrap_or(false);
        let exponential = config.use_exponential_sigmas.unwrap_or(false);
        let beta = config.use_beta_sigmas.unwrap_or(false);
        common::check_sigma_flags(CLASS, [karras, exponential, beta])?;
        if beta {
            return Err(invalid(format!(
                "{CLASS}: use_beta_sigmas is not supported"
            )));
        }
        if config.interpolation_type != "linear" {
            return Err(invalid(format!(
                "{CLASS}: interpolation_type `{}` is not supported (linear)",
                config.interpolation_type
            )));
        }
        let continuous_v = match config.timestep_type.as_str() {
            "discrete" => false,
            "continuous" => prediction == Prediction::Velocity,
            other => {
                return Err(invalid(format!(
                    "{CLASS}: timestep_type `{other}` is not supported (discrete, continuous)"
                )))
            }
        };

        let timesteps32 = euler_timesteps(
            spacing,
            config.num_train_timesteps,
            steps,
            config.steps_offset,
        );
        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let log_sigmas = common::log_sigmas(&train_sigmas);
        let mut sigmas =
            common::interp_sigmas(timesteps32.iter().map(|&t| t as f64), &train_sigmas);
        let mut timesteps: Vec<f64> = timesteps32.iter().map(|&t| t as f64).collect();
        if karras || exponential {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if karras {
                common::karras_sigmas(sigma_min, sigma_max, steps)
            } else {
                common::exponential_sigmas(sigma_min, sigma_max, steps)
            };
            timesteps = sigmas
                .iter()
                .map(|&s| common::sigma_to_t(s, &log_sigmas))
                .collect();
        }
        let (_, sigma_last) =
            common::final_sigma(CLASS, &config.final_sigmas_type, &alphas_cumprod)?;
        sigmas.push(sigma_last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let timesteps: Vec<f64> = if continuous_v {
            sigmas[..sigmas.len() - 1]
                .iter()
                .map(|s| (0.25f32 * s.ln()) as f64)
                .collect()
        } else {
            timesteps.into_iter().map(|t| t as f32 as f64).collect()
        };
        let init_noise_sigma = euler_init_noise_sigma(spacing, &sigmas);
        Ok(Self {
            begin_index: begin_index(&timesteps),
            sigmas,
            timesteps,
            init_noise_sigma,
            prediction,
        })
    }

    fn sigma(&self, index: usize) -> Result<f32> {
        common::euler_sigma(CLASS, &self.sigmas, self.begin_index, index)
    }
}

impl Scheduler for EulerDiscrete {
    sigma_scaled_input_methods!();

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut BatchGenerator,
    ) -> Result<Tensor> {
        common::check_step_inputs(CLASS, model_output, sample)?;
        let sigma = self.sigma(index)?;
        let sigma_next = self.sigma(index + 1)?;
        // gamma = 0 (no churn): sigma_hat = sigma * (0 + 1).
        let sigma_hat = sigma * 1.0;
        let x0 = match self.prediction {
            Prediction::Sample => model_output.clone(),
            Prediction::Epsilon => (sample - common::mul(model_output, sigma_hat)?)?,
            Prediction::Velocity => common::velocity_x0_sigma(model_output, sample, sigma)?,
        };
        let derivative = common::div(&(sample - x0)?, sigma_hat)?;
        let dt = sigma_next - sigma_hat;
        Ok((sample + common::mul(&derivative, dt)?)?)
    }
}
