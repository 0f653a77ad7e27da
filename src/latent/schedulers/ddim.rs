//! DDIM, as diffusers' `DDIMScheduler`: deterministic for eta = 0, drawing variance noise
//! from the generators at every step for eta > 0.

use candle_core::Tensor;

use super::common::{
    self, alpha_noise_methods, beta_config, invalid, unscaled_input_methods, Prediction, Spacing,
};
use super::config::DdimConfig;
use super::Scheduler;
use crate::error::Result;
use crate::rng::BatchGenerator;

const CLASS: &str = "DDIMScheduler";

/// What is done to the predicted original sample.
#[derive(Clone, Copy, Debug)]
pub(crate) enum X0Processing {
    None,
    Clip(f64),
    Threshold { ratio: f64, max_value: f64 },
}

impl X0Processing {
    pub(crate) fn new(
        thresholding: bool,
        clip_sample: bool,
        ratio: f64,
        max_value: f64,
        clip_range: f64,
    ) -> Self {
        if thresholding {
            X0Processing::Threshold { ratio, max_value }
        } else if clip_sample {
            X0Processing::Clip(clip_range)
        } else {
            X0Processing::None
        }
    }

    pub(crate) fn apply(self, x0: Tensor) -> Result<Tensor> {
        match self {
            X0Processing::None => Ok(x0),
            X0Processing::Clip(r) => common::clamp(&x0, r),
            X0Processing::Threshold { ratio, max_value } => {
                common::threshold_sample(&x0, ratio, max_value)
            }
        }
    }
}

/// What DDIM and LCM build alike from their configs (which share these fields' names).
pub(crate) struct DdimParts {
    pub alphas_cumprod: Vec<f32>,
    /// alpha-bar "before" the first training step: 1, or alpha-bar of step 0.
    pub final_alpha_cumprod: f32,
    pub prediction: Prediction,
    pub x0: X0Processing,
}

/// `DdimParts` from a DDIM-style config (`?` on errors, in a function returning `Result`).
macro_rules! ddim_parts {
    ($class:expr, $config:expr) => {{
        let config = $config;
        let betas = common::betas(&beta_config!($class, config, false))?;
        let alphas_cumprod = common::alphas_cumprod(&betas);
        let final_alpha_cumprod =
            common::final_alpha_cumprod(config.set_alpha_to_one, &alphas_cumprod);
        let prediction = Prediction::parse(
            $class,
            &config.prediction_type,
            &[
                Prediction::Epsilon,
                Prediction::Sample,
                Prediction::Velocity,
            ],
        )?;
        $crate::latent::schedulers::ddim::DdimParts {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            x0: $crate::latent::schedulers::ddim::X0Processing::new(
                config.thresholding,
                config.clip_sample,
                config.dynamic_thresholding_ratio,
                config.sample_max_value,
                config.clip_sample_range,
            ),
        }
    }};
}
pub(crate) use ddim_parts;

pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    x0: X0Processing,
    step_ratio: i64,
    eta: f64,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
}

/// The DDIM/DDPM timesteps (descending integers) for a spacing.
pub(crate) fn discrete_timesteps(
    class: &str,
    spacing: Spacing,
    n_train: usize,
    steps: usize,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    if steps > n_train {
        return Err(invalid(format!(
            "{class}: {steps} inference steps is more than the {n_train} training timesteps"
        )));
    }
    Ok(match spacing {
        Spacing::Linspace => {
            let mut t: Vec<i64> = common::np_linspace(0.0, n_train as f64 - 1.0, steps)
                .into_iter()
                .map(|t| common::np_round(t) as i64)
                .collect();
            t.reverse();
            t
        }
        Spacing::Leading => {
            let ratio = (n_train / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| i * ratio + steps_offset)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            common::np_arange_f64(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| common::np_round(t) as i64 - 1)
                .collect()
        }
    })
}

impl Ddim {
    pub fn new(config: &DdimConfig, steps: usize, eta: f64) -> Result<Self> {
        let DdimParts {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            x0,
        } = ddim_parts!(CLASS, config);
        let spacing = Spacing::parse(CLASS, &config.timestep_spacing)?;
        let n_train = config.num_train_timesteps;
        let timesteps_int =
            discrete_timesteps(CLASS, spacing, n_train, steps, config.steps_offset)?;
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            x0,
            step_ratio: (n_train / steps) as i64,
            eta,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
        })
    }
}

impl Scheduler for Ddim {
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
        // The previous timestep is t minus the leading step ratio, whatever the spacing.
        let prev_t = t - self.step_ratio;
        let (a_t, a_prev) = common::alpha_pair(
            CLASS,
            &self.alphas_cumprod,
            t,
            prev_t,
            self.final_alpha_cumprod,
        )?;
        let b_t = 1.0 - a_t;

        let (alpha, sigma) = (a_t.sqrt(), b_t.sqrt());
        let x0 = common::predicted_x0(self.prediction, model_output, sample, alpha, sigma)?;
        let eps = common::predicted_eps(self.prediction, model_output, sample, alpha, sigma)?;
        let x0 = self.x0.apply(x0)?;

        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = (self.eta as f32) * variance.sqrt();
        let direction = common::mul(&eps, (1.0 - a_prev - std_dev * std_dev).sqrt())?;
        let prev = (common::mul(&x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            common::add_noise(prev, std_dev, model_output, noise)
        } else {
            Ok(prev)
        }
    }
}
