//! PNDM (pseudo numerical methods for diffusion models), as diffusers' `PNDMScheduler`:
//! with `skip_prk_steps` a linear multistep (PLMS) method whose second step repeats the first
//! timestep (so it feeds the model `steps + 1` timesteps), otherwise a Runge-Kutta warm-up
//! over the last 4 training-spaced timesteps (12 model calls) followed by PLMS.

use candle_core::Tensor;

use super::common::{
    self, beta_config, invalid, py_slice, unscaled_input_methods, Prediction, Spacing,
};
use super::config::PndmConfig;
use super::Scheduler;
use crate::error::Result;
use crate::rng::BatchGenerator;

const CLASS: &str = "PNDMScheduler";

pub struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    skip_prk_steps: bool,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    prk_timesteps: Vec<i64>,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    /// The first step's index (img2img); `counter` counts from it, as diffusers' does.
    begin: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(config: &PndmConfig, steps: usize) -> Result<Self> {
        let betas = common::betas(&beta_config!(CLASS, config, false, false))?;
        let alphas_cumprod = common::alphas_cumprod(&betas);
        let final_alpha_cumprod =
            common::final_alpha_cumprod(config.set_alpha_to_one, &alphas_cumprod);
        let prediction = Prediction::parse(
            CLASS,
            &config.prediction_type,
            &[Prediction::Epsilon, Prediction::Velocity],
        )?;
        let spacing = Spacing::parse(CLASS, &config.timestep_spacing)?;
        let n_train = config.num_train_timesteps;

        // `_timesteps`, ascending.
        let base: Vec<i64> = match spacing {
            Spacing::Linspace => common::np_linspace(0.0, (n_train as f64) - 1.0, steps)
                .into_iter()
                .map(|t| common::np_round(t) as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = (n_train / steps) as i64;
                (0..steps as i64)
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                let mut t: Vec<i64> = common::np_arange_f64(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| common::np_round(t) as i64 - 1)
                    .collect();
                t.reverse();
                t
            }
        };

        let (prk_timesteps, plms_timesteps) = if config.skip_prk_steps {
            let mut plms = py_slice(&base, 0, -1);
            plms.extend(py_slice(&base, -2, -1));
            plms.extend(py_slice(&base, -1, base.len() as isize));
            plms.reverse();
            (Vec::new(), plms)
        } else {
            let pndm_order = 4usize;
            let last = py_slice(&base, -(pndm_order as isize), base.len() as isize);
            if last.len() * 2 != 2 * pndm_order {
                return Err(invalid(format!(
                    "{CLASS}: the Runge-Kutta warm-up (skip_prk_steps false) needs at least \
                     {pndm_order} inference steps, got {steps}"
                )));
            }
            let half = (n_train / steps / 2) as i64;
            // np.array(last).repeat(2) + np.tile([0, half], 4)
            let prk: Vec<i64> = last.iter().flat_map(|&t| [t, t + half]).collect();
            // (prk[:-1].repeat(2)[1:-1])[::-1]
            let repeated: Vec<i64> = prk[..prk.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let mut plms = py_slice(&base, 0, -3);
            plms.reverse();
            (prk, plms)
        };
        let mut timesteps_int = prk_timesteps.clone();
        timesteps_int.extend(plms_timesteps);
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            skip_prk_steps: config.skip_prk_steps,
            step_ratio: (n_train / steps) as i64,
            prk_timesteps,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            counter: 0,
            begin: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// Formula (9) of the PNDM paper: x_{t-δ} from x_t and the model output at t.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let (a_t, a_prev) = common::alpha_pair(
            CLASS,
            &self.alphas_cumprod,
            t,
            prev_t,
            self.final_alpha_cumprod,
        )?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        // Epsilon or velocity (PNDM takes no `sample` prediction): the noise.
        let model_output = common::predicted_eps(
            self.prediction,
            model_output,
            sample,
            a_t.sqrt(),
            b_t.sqrt(),
        )?;
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let scaled = common::div(&common::mul(&model_output, a_prev - a_t)?, denom)?;
        Ok((common::mul(sample, sample_coeff)? - scaled)?)
    }

    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_t = t - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let mut model_output = model_output.clone();
        let add = |acc: &Option<Tensor>, term: Tensor| -> Result<Tensor> {
            Ok(match acc {
                None => term,
                Some(a) => (a + term)?,
            })
        };
        match self.counter % 4 {
            0 => {
                let term = common::mul(&model_output, (1.0f64 / 6.0) as f32)?;
                self.cur_model_output = Some(add(&self.cur_model_output, term)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => {
                let term = common::mul(&model_output, (1.0f64 / 3.0) as f32)?;
                self.cur_model_output = Some(add(&self.cur_model_output, term)?);
            }
            _ => {
                let term = common::mul(&model_output, (1.0f64 / 6.0) as f32)?;
                model_output = add(&self.cur_model_output, term)?;
                self.cur_model_output = None;
            }
        }
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(invalid(format!(
                "{CLASS}: linear multistep steps need the 12 Runge-Kutta warm-up steps first"
            )));
        }
        let mut t = t;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let n = self.ets.len();
        let mut sample = sample.clone();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            let averaged = common::div(&(model_output + &self.ets[0])?, 2.0)?;
            sample = self
                .cur_sample
                .take()
                .ok_or_else(|| invalid(format!("{CLASS}: steps taken out of order")))?;
            averaged
        } else if n == 2 {
            let e = &self.ets;
            common::div(&(common::mul(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if n == 3 {
            let e = &self.ets;
            let sum = ((common::mul(&e[2], 23.0)? - common::mul(&e[1], 16.0)?)?
                + common::mul(&e[0], 5.0)?)?;
            common::div(&sum, 12.0)?
        } else {
            let e = &self.ets;
            let sum = (((common::mul(&e[3], 55.0)? - common::mul(&e[2], 59.0)?)?
                + common::mul(&e[1], 37.0)?)?
                - common::mul(&e[0], 9.0)?)?;
            common::mul(&sum, (1.0f64 / 24.0) as f32)?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for Pndm {
    unscaled_input_methods!();

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        common::check_begin(CLASS, index, self.timesteps_int.len())?;
        if self.counter > 0 {
            return Err(invalid(format!(
                "{CLASS}: cannot begin at step {index} after {} steps",
                self.counter
            )));
        }
        self.begin = index;
        Ok(())
    }

    common::alpha_add_noise!();

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut BatchGenerator,
    ) -> Result<Tensor> {
        common::check_step_inputs(CLASS, model_output, sample)?;
        if index != self.begin + self.counter || index >= self.timesteps_int.len() {
            return Err(invalid(format!(
                "{CLASS}: step {index} asked after {} steps of {}; steps must be taken in order",
                self.begin + self.counter,
                self.timesteps_int.len()
            )));
        }
        let t = self.timesteps_int[index];
        if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }
}
