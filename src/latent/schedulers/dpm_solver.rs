//! DPM-Solver multistep, as diffusers' `DPMSolverMultistepScheduler` (`dpm++2m` is its
//! default `dpmsolver++` of order 2, `dpm++2m-karras` the same with Karras sigmas). Orders 1
//! to 3, the `dpmsolver++`, `dpmsolver`, `sde-dpmsolver++` and `sde-dpmsolver` algorithms
//! (the SDE ones draw noise from the generators at every step) and the `midpoint` and `heun`
//! solver types follow diffusers.

use candle_core::Tensor;

use super::common::{self, beta_config, invalid, unscaled_input_methods, Prediction, Spacing};
use super::config::DpmSolverMultistepConfig;
use super::ddim::X0Processing;
use super::euler::sigma_schedule_alphas;
use super::Scheduler;
use crate::error::Result;
use crate::rng::BatchGenerator;

const CLASS: &str = "DPMSolverMultistepScheduler";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    DpmSolverPP,
    DpmSolver,
    SdeDpmSolverPP,
    SdeDpmSolver,
}

impl Algorithm {
    fn is_sde(self) -> bool {
        matches!(self, Algorithm::SdeDpmSolverPP | Algorithm::SdeDpmSolver)
    }

    /// Whether the model output is converted to x0 (the "++" variants) or to epsilon.
    fn predicts_x0(self) -> bool {
        matches!(self, Algorithm::DpmSolverPP | Algorithm::SdeDpmSolverPP)
    }
}

pub struct DpmSolverMultistep {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    prediction: Prediction,
    algorithm: Algorithm,
    heun: bool,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    x0: X0Processing,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    begin_index: usize,
    steps_taken: usize,
}

/// (alpha_t, sigma_t) of a sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// lambda = log(alpha) - log(sigma).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistep {
    pub fn new(config: &DpmSolverMultistepConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = sigma_schedule_alphas(&beta_config!(CLASS, config, false))?;
        let flags = [
            config.use_beta_sigmas,
            config.use_exponential_sigmas,
            config.use_karras_sigmas,
        ];
        common::check_sigma_flags(CLASS, flags)?;
        let algorithm = match config.algorithm_type.as_str() {
            "dpmsolver++" => Algorithm::DpmSolverPP,
            "dpmsolver" => Algorithm::DpmSolver,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPP,
            "sde-dpmsolver" => Algorithm::SdeDpmSolver,
            other => {
                return Err(invalid(format!(
                    "{CLASS}: algorithm_type `{other}` is not implemented"
                )))
            }
        };
        let heun = match config.solver_type.as_str() {
            "midpoint" => false,
            "heun" => true,
            other => {
                return Err(invalid(format!(
                    "{CLASS}: solver_type `{other}` is not implemented"
                )))
            }
        };
        if !algorithm.predicts_x0() && config.final_sigmas_type == "zero" {
            return Err(invalid(format!(
                "{CLASS}: final_sigmas_type `zero` is not supported for algorithm_type `{}`; use `sigma_min`",
                config.algorithm_type
            )));
        }
        if !(1..=3).contains(&config.solver_order) {
            return Err(invalid(format!(
                "{CLASS}: solver_order {} is not supported (1, 2, 3)",
                config.solver_order
            )));
        }
        if algorithm == Algorithm::SdeDpmSolver && config.solver_order == 3 {
            return Err(invalid(format!(
                "{CLASS}: third-order sde-dpmsolver has no update rule"
            )));
        }
        if config.use_beta_sigmas || config.use_lu_lambdas || config.use_flow_sigmas {
            return Err(invalid(format!(
                "{CLASS}: use_beta_sigmas, use_lu_lambdas and use_flow_sigmas are not supported"
            )));
        }
        if matches!(
            config.variance_type.as_deref(),
            Some("learned") | Some("learned_range")
        ) {
            return Err(invalid(format!(
                "{CLASS}: learned variance types are not supported"
            )));
        }
        let prediction = Prediction::parse(
            CLASS,
            &config.prediction_type,
            &[
                Prediction::Epsilon,
                Prediction::Sample,
                Prediction::Velocity,
            ],
        )?;
        let spacing = Spacing::parse(CLASS, &config.timestep_spacing)?;
        let n_train = config.num_train_timesteps;

        // lambda_min_clipped: the number of (flipped, increasing) lambdas below it.
        let clipped = if config.lambda_min_clipped == f64::NEG_INFINITY {
            0
        } else {
            alphas_cumprod
                .iter()
                .rev()
                .map(|&a| {
                    let alpha = a.sqrt();
                    let sigma = (1.0 - a).sqrt();
                    lambda(alpha, sigma) as f64
                })
                .take_while(|&l| l < config.lambda_min_clipped)
                .count()
        };
        let last_timestep = n_train as i64 - clipped as i64;

        let timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> =
                    common::np_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
                        .into_iter()
                        .map(common::np_round)
                        .collect();
                t.reverse();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = last_timestep.div_euclid(steps as i64 + 1);
                let mut t: Vec<f64> = (0..=steps as i64)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect();
                t.pop();
                t
            }
            Spacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                common::np_arange_f64(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| (common::np_round(t) as i64 - 1) as f64)
                    .collect()
            }
        };
        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let log_sigmas = common::log_sigmas(&train_sigmas);
        let (mut sigmas, timesteps): (Vec<f64>, Vec<f64>) =
            if config.use_karras_sigmas || config.use_exponential_sigmas {
                // The flipped training sigmas: the smallest is the first training sigma.
                let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
                let sigma_max = config
                    .sigma_max
                    .unwrap_or(train_sigmas[train_sigmas.len() - 1] as f64);
                if config.use_karras_sigmas {
                    let sigmas = common::karras_sigmas(sigma_min, sigma_max, steps);
                    let round = config.beta_schedule != "squaredcos_cap_v2";
                    let t = sigmas
                        .iter()
                        .map(|&s| {
                            let t = common::sigma_to_t(s, &log_sigmas);
                            if round {
                                common::np_round(t)
                            } else {
                                t
                            }
                        })
                        .collect();
                    (sigmas, t)
                } else {
                    let sigmas = common::exponential_sigmas(sigma_min, sigma_max, steps);
                    let t = sigmas
                        .iter()
                        .map(|&s| common::sigma_to_t(s, &log_sigmas))
                        .collect();
                    (sigmas, t)
                }
            } else {
                let sigmas = common::interp_sigmas(timesteps.iter().copied(), &train_sigmas);
                (sigmas, timesteps)
            };
        let (final_sigma_zero, sigma_last) =
            common::final_sigma(CLASS, &config.final_sigmas_type, &alphas_cumprod)?;
        sigmas.push(sigma_last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        // `.to(torch.int64)`: fractional timesteps are truncated.
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| (t as i64) as f64).collect();

        let begin_index = common::begin_index(&timesteps);

        Ok(Self {
            sigmas,
            timesteps,
            prediction,
            algorithm,
            heun,
            solver_order: config.solver_order,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigma_zero,
            x0: if config.thresholding {
                X0Processing::Threshold {
                    ratio: config.dynamic_thresholding_ratio,
                    max_value: config.sample_max_value,
                }
            } else {
                X0Processing::None
            },
            model_outputs: vec![None; config.solver_order],
            lower_order_nums: 0,
            begin_index,
            steps_taken: 0,
        })
    }

    fn sigma(&self, index: usize) -> Result<f32> {
        self.sigmas.get(index).copied().ok_or_else(|| {
            invalid(format!(
                "{CLASS}: sigma index {index} is out of range ({} sigmas; diffusers raises \
                 IndexError here)",
                self.sigmas.len()
            ))
        })
    }

    /// `convert_model_output`: x0 for the "++" algorithms, epsilon otherwise.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index)?);
        if self.algorithm.predicts_x0() {
            let x0 = common::predicted_x0(self.prediction, model_output, sample, alpha_t, sigma_t)?;
            self.x0.apply(x0)
        } else {
            let eps =
                common::predicted_eps(self.prediction, model_output, sample, alpha_t, sigma_t)?;
            match self.x0 {
                X0Processing::None => Ok(eps),
                processing => {
                    let x0 = common::div(&(sample - common::mul(&eps, sigma_t)?)?, alpha_t)?;
                    let x0 = processing.apply(x0)?;
                    common::div(&(sample - common::mul(&x0, alpha_t)?)?, sigma_t)
                }
            }
        }
    }

    fn first_order(
        &self,
        i: usize,
        m0: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(i + 1)?);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigma(i)?);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match (self.algorithm, noise) {
            (Algorithm::DpmSolverPP, _) => common::combine(&[
                (sigma_t / sigma_s, sample, false),
                (alpha_t * ((-h).exp() - 1.0), m0, true),
            ]),
            (Algorithm::DpmSolver, _) => common::combine(&[
                (alpha_t / alpha_s, sample, false),
                (sigma_t * (h.exp() - 1.0), m0, true),
            ]),
            (Algorithm::SdeDpmSolverPP, Some(z)) => common::combine(&[
                (sigma_t / sigma_s * (-h).exp(), sample, false),
                (alpha_t * (1.0 - (-2.0 * h).exp()), m0, false),
                (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt(), z, false),
            ]),
            (Algorithm::SdeDpmSolver, Some(z)) => common::combine(&[
                (alpha_t / alpha_s, sample, false),
                (2.0 * (sigma_t * (h.exp() - 1.0)), m0, true),
                (sigma_t * ((2.0 * h).exp() - 1.0).sqrt(), z, false),
            ]),
            _ => Err(invalid(format!("{CLASS}: the SDE update needs noise"))),
        }
    }

    fn second_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let m0 = self.output(1)?;
        let m1 = self.output(2)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(i + 1)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigma(i)?);
        let (alpha_s1, sigma_s1) = alpha_sigma(
            self.sigma(
                i.checked_sub(1)
                    .ok_or_else(|| invalid("no previous step"))?,
            )?,
        );
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = common::mul(&(m0 - m1)?, 1.0 / r0)?;
        let em = (-h).exp() - 1.0;
        let ep = h.exp() - 1.0;
        let e2 = 1.0 - (-2.0 * h).exp();
        match (self.algorithm, self.heun, noise) {
            (Algorithm::DpmSolverPP, false, _) => common::combine(&[
                (sigma_t / sigma_s0, sample, false),
                (alpha_t * em, d0, true),
                (0.5 * (alpha_t * em), &d1, true),
            ]),
            (Algorithm::DpmSolverPP, true, _) => common::combine(&[
                (sigma_t / sigma_s0, sample, false),
                (alpha_t * em, d0, true),
                (alpha_t * (em / h + 1.0), &d1, false),
            ]),
            (Algorithm::DpmSolver, false, _) => common::combine(&[
                (alpha_t / alpha_s0, sample, false),
                (sigma_t * ep, d0, true),
                (0.5 * (sigma_t * ep), &d1, true),
            ]),
            (Algorithm::DpmSolver, true, _) => common::combine(&[
                (alpha_t / alpha_s0, sample, false),
                (sigma_t * ep, d0, true),
                (sigma_t * (ep / h - 1.0), &d1, true),
            ]),
            (Algorithm::SdeDpmSolverPP, false, Some(z)) => common::combine(&[
                (sigma_t / sigma_s0 * (-h).exp(), sample, false),
                (alpha_t * e2, d0, false),
                (0.5 * (alpha_t * e2), &d1, false),
                (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt(), z, false),
            ]),
            (Algorithm::SdeDpmSolverPP, true, Some(z)) => common::combine(&[
                (sigma_t / sigma_s0 * (-h).exp(), sample, false),
                (alpha_t * e2, d0, false),
                (
                    alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0),
                    &d1,
                    false,
                ),
                (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt(), z, false),
            ]),
            (Algorithm::SdeDpmSolver, false, Some(z)) => common::combine(&[
                (alpha_t / alpha_s0, sample, false),
                (2.0 * (sigma_t * ep), d0, true),
                (sigma_t * ep, &d1, true),
                (sigma_t * ((2.0 * h).exp() - 1.0).sqrt(), z, false),
            ]),
            (Algorithm::SdeDpmSolver, true, Some(z)) => common::combine(&[
                (alpha_t / alpha_s0, sample, false),
                (2.0 * (sigma_t * ep), d0, true),
                (2.0 * (sigma_t * (ep / h - 1.0)), &d1, true),
                (sigma_t * ((2.0 * h).exp() - 1.0).sqrt(), z, false),
            ]),
            _ => Err(invalid(format!("{CLASS}: the SDE update needs noise"))),
        }
    }

    fn third_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let m0 = self.output(1)?;
        let m1 = self.output(2)?;
        let m2 = self.output(3)?;
        let prev = |k: usize| i.checked_sub(k).ok_or_else(|| invalid("no previous step"));
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(i + 1)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigma(i)?);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigma(prev(1)?)?);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigma(prev(2)?)?);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let h_1 = lambda_s1 - lambda_s2;
        let r0 = h_0 / h;
        let r1 = h_1 / h;
        let d0 = m0;
        let d1_0 = common::mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = common::mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + common::mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = common::mul(&diff, 1.0 / (r0 + r1))?;
        let em = (-h).exp() - 1.0;
        match (self.algorithm, noise) {
            (Algorithm::DpmSolverPP, _) => common::combine(&[
                (sigma_t / sigma_s0, sample, false),
                (alpha_t * em, d0, true),
                (alpha_t * (em / h + 1.0), &d1, false),
                (
                    alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5),
                    &d2,
                    true,
                ),
            ]),
            (Algorithm::DpmSolver, _) => {
                let ep = h.exp() - 1.0;
                common::combine(&[
                    (alpha_t / alpha_s0, sample, false),
                    (sigma_t * ep, d0, true),
                    (sigma_t * (ep / h - 1.0), &d1, true),
                    (sigma_t * ((h.exp() - 1.0 - h) / (h * h) - 0.5), &d2, true),
                ])
            }
            (Algorithm::SdeDpmSolverPP, Some(z)) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                common::combine(&[
                    (sigma_t / sigma_s0 * (-h).exp(), sample, false),
                    (alpha_t * e2, d0, false),
                    (alpha_t * (e2 / (-2.0 * h) + 1.0), &d1, false),
                    (
                        alpha_t
                            * ((1.0 - (-2.0 * h).exp() - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5),
                        &d2,
                        false,
                    ),
                    (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt(), z, false),
                ])
            }
            _ => Err(invalid(format!(
                "{CLASS}: no third-order update for this algorithm"
            ))),
        }
    }

    /// The k-th most recent converted model output (1 = the newest).
    fn output(&self, k: usize) -> Result<&Tensor> {
        let n = self.model_outputs.len();
        self.model_outputs
            .get(n.wrapping_sub(k))
            .and_then(|m| m.as_ref())
            .ok_or_else(|| {
                invalid(format!(
                    "{CLASS}: missing the model output of an earlier step"
                ))
            })
    }
}

impl Scheduler for DpmSolverMultistep {
    unscaled_input_methods!();

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        common::check_begin(CLASS, index, self.timesteps.len())?;
        if self.steps_taken > 0 {
            return Err(invalid(format!(
                "{CLASS}: cannot begin at step {index} after {} steps",
                self.steps_taken
            )));
        }
        self.begin_index = 0;
        self.steps_taken = index;
        Ok(())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(self.begin_index + index)?);
        Ok((common::mul(original, alpha_t)? + common::mul(noise, sigma_t)?)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut BatchGenerator,
    ) -> Result<Tensor> {
        common::check_step_inputs(CLASS, model_output, sample)?;
        if index != self.steps_taken {
            return Err(invalid(format!(
                "{CLASS}: step {index} asked after {} steps; steps must be taken in order",
                self.steps_taken
            )));
        }
        let i = self.begin_index + index;
        let n = self.timesteps.len();
        let lower_order_final = i + 1 == n
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;

        let converted = self.convert(model_output, sample, i)?;
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(converted.clone());

        let z = if self.algorithm.is_sde() {
            Some(noise.randn(model_output.dims(), common::device_of(model_output))?)
        } else {
            None
        };
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &converted, sample, z.as_ref())?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, sample, z.as_ref())?
        } else {
            self.third_order(i, sample, z.as_ref())?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.steps_taken += 1;
        Ok(prev)
    }
}
