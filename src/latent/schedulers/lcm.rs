//! LCM, as diffusers' `LCMScheduler`: each step predicts the clean sample through the
//! consistency boundary condition, then re-noises it to the next timestep with fresh noise
//! (every step but the last, so one step draws none).

use candle_core::Tensor;

use super::common::{
    self, alpha_noise_methods, beta_config, invalid, unscaled_input_methods, Prediction,
};
use super::config::LcmConfig;
use super::ddim::{ddim_parts, DdimParts, X0Processing};
use super::Scheduler;
use crate::error::Result;
use crate::rng::BatchGenerator;

const CLASS: &str = "LCMScheduler";

pub struct Lcm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    x0: X0Processing,
    timestep_scaling: f64,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
}

/// The LCM schedule: `original_inference_steps` evenly spaced training timesteps (k - 1,
/// 2k - 1, ...), reversed, of which `steps` are taken at evenly spaced indices.
pub(crate) fn lcm_timesteps(
    n_train: usize,
    original_steps: usize,
    steps: usize,
) -> Result<Vec<i64>> {
    if original_steps == 0 || original_steps > n_train {
        return Err(invalid(format!(
            "{CLASS}: original_inference_steps {original_steps} must be between 1 and the {n_train} training timesteps"
        )));
    }
    if steps > original_steps {
        return Err(invalid(format!(
            "{CLASS}: {steps} inference steps is more than original_inference_steps ({original_steps})"
        )));
    }
    let k = (n_train / original_steps) as i64;
    let origin: Vec<i64> = (1..=original_steps as i64)
        .rev()
        .map(|i| i * k - 1)
        .collect();
    // np.floor(np.linspace(0, len, num=steps, endpoint=False))
    Ok(common::np_linspace_open(0.0, origin.len() as f64, steps)
        .into_iter()
        .map(|x| origin[x.floor() as usize])
        .collect())
}

impl Lcm {
    pub fn new(config: &LcmConfig, steps: usize) -> Result<Self> {
        let DdimParts {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            x0,
        } = ddim_parts!(CLASS, config);
        let timesteps_int = lcm_timesteps(
            config.num_train_timesteps,
            config.original_inference_steps,
            steps,
        )?;
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            x0,
            timestep_scaling: config.timestep_scaling,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
        })
    }
}

impl Scheduler for Lcm {
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
        let last = index + 1 == self.timesteps_int.len();
        let prev_t = if last {
            t
        } else {
            self.timesteps_int[index + 1]
        };
        let (a_t, a_prev) = common::alpha_pair(
            CLASS,
            &self.alphas_cumprod,
            t,
            prev_t,
            self.final_alpha_cumprod,
        )?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        // The boundary condition scalings, float32 as torch computes them from the integer
        // timestep tensor times the float `timestep_scaling`.
        let sigma_data = 0.5f32;
        let scaled = t as f32 * self.timestep_scaling as f32;
        let c_skip = sigma_data * sigma_data / (scaled * scaled + sigma_data * sigma_data);
        let c_out = scaled / (scaled * scaled + sigma_data * sigma_data).sqrt();

        let x0 = common::predicted_x0(
            self.prediction,
            model_output,
            sample,
            a_t.sqrt(),
            b_t.sqrt(),
        )?;
        let x0 = self.x0.apply(x0)?;
        let denoised = (common::mul(&x0, c_out)? + common::mul(sample, c_skip)?)?;
        if last {
            Ok(denoised)
        } else {
            common::add_noise(
                common::mul(&denoised, a_prev.sqrt())?,
                b_prev.sqrt(),
                model_output,
                noise,
            )
        }
    }
}
