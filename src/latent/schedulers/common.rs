//! Arithmetic shared by the schedulers, written to give the values diffusers gives.
//!
//! diffusers mixes two kinds of arithmetic, and each is reproduced as it is:
//! - float32 torch tensors (`betas`, `alphas_cumprod`, `sigmas`, the per-step coefficients,
//!   which are 0-dimensional float32 tensors): here `f32` arithmetic, one IEEE operation per
//!   torch operation, in torch's order;
//! - float64 numpy (`np.linspace`, `np.arange`, `np.interp`, Karras sigmas, `_sigma_to_t`):
//!   here `f64`, with numpy's own algorithms for linspace, arange and interp.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::BatchGenerator;

/// An error about a scheduler's configuration or use.
pub(crate) fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidRequest(message.into())
}

/// How the model output is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

impl Prediction {
    pub(crate) fn parse(class: &str, value: &str, allowed: &[Prediction]) -> Result<Self> {
        let parsed = match value {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" => Some(Prediction::Velocity),
            "sample" => Some(Prediction::Sample),
            _ => None,
        };
        match parsed {
            Some(p) if allowed.contains(&p) => Ok(p),
            _ => Err(invalid(format!(
                "{class}: prediction_type `{value}` is not supported (supported: {})",
                allowed
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::Velocity => "v_prediction",
            Prediction::Sample => "sample",
        }
    }
}

/// How the inference timesteps are spread over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub(crate) fn parse(class: &str, value: &str) -> Result<Self> {
        match value {
            "linspace" => Ok(Spacing::Linspace),
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            _ => Err(invalid(format!(
                "{class}: timestep_spacing `{value}` is not supported (linspace, leading, trailing)"
            ))),
        }
    }
}

/// The beta schedule part of a scheduler config.
pub(crate) struct BetaConfig<'a> {
    pub class: &'a str,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'a str,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
    /// DDPM also offers the `laplace` and `sigmoid` schedules.
    pub extra_schedules: bool,
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU: the step is computed
/// in float, the first half counts up from `start` and the second half down from `end`, each
/// value as one fused multiply-add.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    match steps {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (float64 Python, stored as float32).
fn betas_for_alpha_bar(n: usize, alpha_bar: impl Fn(f64) -> f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on the CPU: the running product is kept in double
/// and each prefix is rounded to float.
pub(crate) fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (float32 torch).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The float32 betas of a config, as the scheduler's `__init__` computes them.
pub(crate) fn betas(config: &BetaConfig) -> Result<Vec<f32>> {
    let n = config.num_train_timesteps;
    let betas = if let Some(trained) = config.trained_betas {
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match config.beta_schedule {
            "linear" => torch_linspace_f32(config.beta_start, config.beta_end, n),
            "scaled_linear" => {
                torch_linspace_f32(config.beta_start.powf(0.5), config.beta_end.powf(0.5), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            "squaredcos_cap_v2" => betas_for_alpha_bar(n, |t| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powf(2.0)
            }),
            "laplace" if config.extra_schedules => betas_for_alpha_bar(n, |t| {
                let lmb =
                    -0.5 * (1.0f64).copysign(0.5 - t) * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lmb.exp();
                (snr / (1.0 + snr)).sqrt()
            }),
            "sigmoid" if config.extra_schedules => {
                let scale = (config.beta_end - config.beta_start) as f32;
                let start = config.beta_start as f32;
                torch_linspace_f32(-6.0, 6.0, n)
                    .into_iter()
                    .map(|x| (1.0 / (1.0 + (-x).exp())) * scale + start)
                    .collect()
            }
            other => {
                return Err(invalid(format!(
                    "{}: beta_schedule `{other}` is not implemented",
                    config.class
                )))
            }
        }
    };
    if betas.is_empty() {
        return Err(invalid(format!(
            "{}: the beta schedule is empty",
            config.class
        )));
    }
    Ok(if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

/// `alphas_cumprod = cumprod(1 - betas)` in float32.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    cumprod_f32(&alphas)
}

/// alpha-bar "before" the first training step, where the last step lands: 1 with
/// `set_alpha_to_one`, else alpha-bar of step 0 (DDIM, LCM and PNDM alike).
pub(crate) fn final_alpha_cumprod(set_alpha_to_one: bool, alphas_cumprod: &[f32]) -> f32 {
    if set_alpha_to_one {
        1.0
    } else {
        alphas_cumprod[0]
    }
}

/// The `alphas_cumprod` of a beta schedule, as diffusers' DDIM/DDPM/PNDM schedulers hold it
/// (exposed for tests).
#[allow(clippy::too_many_arguments)]
pub fn alphas_cumprod_for(
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: &str,
    trained_betas: Option<&[f64]>,
    rescale_betas_zero_snr: bool,
) -> Result<Vec<f32>> {
    let betas = betas(&BetaConfig {
        class: "scheduler",
        num_train_timesteps,
        beta_start,
        beta_end,
        beta_schedule,
        trained_betas,
        rescale_betas_zero_snr,
        extra_schedules: true,
    })?;
    Ok(alphas_cumprod(&betas))
}

/// The sigmas of the training timesteps, `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`,
/// in float32.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start`, the last value `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let div = num - 1;
    if div == 0 {
        return vec![0.0 * delta + start];
    }
    let step = delta / div as f64;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                (i as f64 / div as f64) * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    y[num - 1] = stop;
    y
}

/// `np.linspace(start, stop, num, endpoint=False)`: `start + i * ((stop - start) / num)`.
pub(crate) fn np_linspace_open(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / num as f64;
    (0..num).map(|i| i as f64 * step + start).collect()
}

/// `np.arange(start, stop, step)` with a float step: `ceil((stop - start) / step)` values,
/// the second one `start + step` and the others `start + i * (second - start)`.
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let next = start + step;
        out.push(next);
        let delta = next - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// `np.round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one x.
pub(crate) fn np_interp_arange(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0];
    }
    if x > (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j >= n - 1 || j as f64 == x {
        return fp[j.min(n - 1)];
    }
    let slope = (fp[j + 1] - fp[j]) / ((j + 1) as f64 - j as f64);
    let y = slope * (x - j as f64) + fp[j];
    if y.is_nan() {
        let y2 = slope * (x - (j + 1) as f64) + fp[j + 1];
        if y2.is_nan() && fp[j] == fp[j + 1] {
            return fp[j];
        }
        return y2;
    }
    y
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of a sigma, by linear
/// interpolation of log-sigmas (float32 `log_sigmas`, float64 arithmetic otherwise, except
/// `low - high`, a float32 difference).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // np.cumsum(dists >= 0, axis=0).argmax(axis=0): the first index of the largest count.
    let mut count = 0i64;
    let mut best = -1i64;
    let mut best_index = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_index = i;
        }
    }
    let low_index = best_index.min(log_sigmas.len().saturating_sub(2));
    let high_index = low_index + 1;
    let low = log_sigmas[low_index];
    let high = log_sigmas[high_index];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_index as f64 + w * high_index as f64
}

/// diffusers' `_convert_to_karras` (rho = 7), float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_convert_to_exponential`, float64.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `x * c` for a float32 scalar (a 0-dimensional tensor or a Python number times a tensor).
pub(crate) fn mul(x: &Tensor, c: f32) -> Result<Tensor> {
    Ok(x.affine(c as f64, 0.0)?)
}

/// `x / c` for a float32 scalar.
pub(crate) fn div(x: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&c)?)
}

/// `sum_i c_i * x_i` evaluated left to right as Python does (`c0*x0 + c1*x1 - ...`): each
/// term is a scalar times a tensor; a negative sign subtracts the term.
pub(crate) fn combine(terms: &[(f32, &Tensor, bool)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, x, subtract) in terms {
        let term = mul(x, c)?;
        acc = Some(match acc {
            None if subtract => term.neg()?,
            None => term,
            Some(a) if subtract => (a - term)?,
            Some(a) => (a + term)?,
        });
    }
    acc.ok_or_else(|| invalid("empty combination"))
}

/// diffusers' `_threshold_sample` (dynamic thresholding): per batch item, `s` is the
/// `ratio`-quantile of |x| (torch.quantile, linear interpolation), clamped to
/// [1, max_value]; x is clamped to [-s, s] and divided by s.
pub(crate) fn threshold_sample(x: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let shape = x.dims().to_vec();
    let batch = shape.first().copied().unwrap_or(1);
    let flat = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = flat.len().checked_div(batch).unwrap_or(0);
    let mut out = Vec::with_capacity(flat.len());
    for row in flat.chunks(per.max(1)) {
        let mut sorted: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let rank = (ratio as f32) * (sorted.len() - 1) as f32;
        let below = rank.floor();
        let above = rank.ceil();
        let weight = rank - below;
        let lo = sorted[below as usize];
        let hi = sorted[above as usize];
        let q = if weight.abs() < 0.5 {
            lo + weight * (hi - lo)
        } else {
            hi - (hi - lo) * (1.0 - weight)
        };
        let s = q.max(1.0).min(max_value as f32);
        out.extend(row.iter().map(|v| v.max(-s).min(s) / s));
    }
    Ok(Tensor::from_vec(out, shape, x.device())?.to_dtype(x.dtype())?)
}

/// `x.clamp(-r, r)`.
pub(crate) fn clamp(x: &Tensor, r: f64) -> Result<Tensor> {
    Ok(x.clamp(-r as f32, r as f32)?)
}

/// Checks the tensors a step gets.
pub(crate) fn check_step_inputs(class: &str, model_output: &Tensor, sample: &Tensor) -> Result<()> {
    if model_output.dims() != sample.dims() {
        return Err(invalid(format!(
            "{class}: model output {:?} and sample {:?} differ in shape",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

/// The device of a tensor (for noise draws).
pub(crate) fn device_of(x: &Tensor) -> &Device {
    x.device()
}

/// `alphas_cumprod[t]`, an error when `t` is outside the training schedule.
pub(crate) fn alpha_at(class: &str, alphas_cumprod: &[f32], t: i64) -> Result<f32> {
    usize::try_from(t)
        .ok()
        .and_then(|i| alphas_cumprod.get(i).copied())
        .ok_or_else(|| {
            invalid(format!(
                "{class}: timestep {t} is outside the training schedule"
            ))
        })
}

/// `(alphas_cumprod[t], alphas_cumprod[prev_t])`, the second `final_alpha` when `prev_t` is
/// negative.
pub(crate) fn alpha_pair(
    class: &str,
    alphas_cumprod: &[f32],
    t: i64,
    prev_t: i64,
    final_alpha: f32,
) -> Result<(f32, f32)> {
    let a_t = alpha_at(class, alphas_cumprod, t)?;
    let a_prev = if prev_t >= 0 {
        alpha_at(class, alphas_cumprod, prev_t)?
    } else {
        final_alpha
    };
    Ok((a_t, a_prev))
}

/// The integer timestep of the `index`-th step.
pub(crate) fn step_timestep(class: &str, timesteps: &[i64], index: usize) -> Result<i64> {
    timesteps
        .get(index)
        .copied()
        .ok_or_else(|| invalid(format!("{class}: no step {index}")))
}

/// `sigmas[begin_index + index]` of the Euler schedulers.
pub(crate) fn euler_sigma(
    class: &str,
    sigmas: &[f32],
    begin_index: usize,
    index: usize,
) -> Result<f32> {
    sigmas
        .get(begin_index + index)
        .copied()
        .ok_or_else(|| invalid(format!("{class}: no sigma for step {index}")))
}

/// The predicted original sample of a model output, with `alpha` and `sigma` the signal and
/// noise scales of the sample (`sqrt(alpha_prod)` and `sqrt(1 - alpha_prod)`).
pub(crate) fn predicted_x0(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => div(&(sample - mul(model_output, sigma)?)?, alpha)?,
        Prediction::Sample => model_output.clone(),
        Prediction::Velocity => (mul(sample, alpha)? - mul(model_output, sigma)?)?,
    })
}

/// The predicted noise of a model output (scales as in [`predicted_x0`]).
pub(crate) fn predicted_eps(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => model_output.clone(),
        Prediction::Sample => div(&(sample - mul(model_output, alpha)?)?, sigma)?,
        Prediction::Velocity => (mul(model_output, alpha)? + mul(sample, sigma)?)?,
    })
}

/// The predicted original sample of a v-prediction in sigma space (the Euler schedulers):
/// `model_output * -sigma / sqrt(sigma^2 + 1) + sample / (sigma^2 + 1)`.
pub(crate) fn velocity_x0_sigma(
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
    Ok((mul(model_output, c_out)? + div(sample, sigma * sigma + 1.0)?)?)
}

/// `prev + scale * z` with `z` drawn from the generators in the shape of `model_output`.
pub(crate) fn add_noise(
    prev: Tensor,
    scale: f32,
    model_output: &Tensor,
    noise: &mut BatchGenerator,
) -> Result<Tensor> {
    let z = noise.randn(model_output.dims(), device_of(model_output))?;
    Ok((prev + mul(&z, scale)?)?)
}

/// diffusers' `add_noise` of the schedulers on alphas (DDIM, DDPM, PNDM, LCM): `original` at
/// the noise level of the `index`-th timestep, `sqrt(a_t) original + sqrt(1 - a_t) noise`,
/// in float32 as torch computes it.
pub(crate) fn noised_by_alpha(
    class: &str,
    alphas_cumprod: &[f32],
    timesteps: &[i64],
    index: usize,
    original: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let a_t = alpha_at(
        class,
        alphas_cumprod,
        step_timestep(class, timesteps, index)?,
    )?;
    Ok((mul(original, a_t.sqrt())? + mul(noise, (1.0 - a_t).sqrt())?)?)
}

/// diffusers' `add_noise` of the Euler schedulers: `original + sigma noise`.
pub(crate) fn noised_by_sigma(sigma: f32, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
    Ok((original + mul(noise, sigma)?)?)
}

/// A step index a schedule of `len` timesteps can begin at.
pub(crate) fn check_begin(class: &str, index: usize, len: usize) -> Result<()> {
    if index < len {
        Ok(())
    } else {
        Err(invalid(format!(
            "{class}: cannot begin at step {index} of {len}"
        )))
    }
}

/// The sigmas of fractional training timesteps, `np.interp(t, arange, train_sigmas)` in
/// float64 of the float32 training sigmas.
pub(crate) fn interp_sigmas(
    timesteps: impl IntoIterator<Item = f64>,
    train_sigmas: &[f32],
) -> Vec<f64> {
    let train64: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    timesteps
        .into_iter()
        .map(|t| np_interp_arange(t, &train64))
        .collect()
}

/// The float32 log of the training sigmas (`log_sigmas`).
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

/// At most one of `use_beta_sigmas`, `use_exponential_sigmas` and `use_karras_sigmas`.
pub(crate) fn check_sigma_flags(class: &str, flags: [bool; 3]) -> Result<()> {
    if flags.iter().filter(|&&b| b).count() > 1 {
        return Err(invalid(format!(
            "{class}: only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used"
        )));
    }
    Ok(())
}

/// `final_sigmas_type`: whether it is `zero`, and the last sigma (0, or the first training
/// sigma for `sigma_min`).
pub(crate) fn final_sigma(
    class: &str,
    final_sigmas_type: &str,
    alphas_cumprod: &[f32],
) -> Result<(bool, f64)> {
    match final_sigmas_type {
        "zero" => Ok((true, 0.0)),
        "sigma_min" => Ok((
            false,
            ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt() as f64,
        )),
        other => Err(invalid(format!(
            "{class}: final_sigmas_type `{other}` is not supported (zero, sigma_min)"
        ))),
    }
}

/// `index_for_timestep` of the first timestep: the second match when it appears twice.
pub(crate) fn begin_index(timesteps: &[f64]) -> usize {
    let Some(&first) = timesteps.first() else {
        return 0;
    };
    let matches: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == first)
        .map(|(i, _)| i)
        .collect();
    if matches.len() > 1 {
        matches[1]
    } else {
        0
    }
}

/// The [`BetaConfig`] of a scheduler config with the usual beta fields
/// (`beta_config!(CLASS, config, extra_schedules)`, or with an explicit
/// `rescale_betas_zero_snr` for configs without it).
macro_rules! beta_config {
    ($class:expr, $config:expr, $extra:expr) => {
        beta_config!($class, $config, $extra, $config.rescale_betas_zero_snr)
    };
    ($class:expr, $config:expr, $extra:expr, $rescale:expr) => {
        $crate::latent::schedulers::common::BetaConfig {
            class: $class,
            num_train_timesteps: $config.num_train_timesteps,
            beta_start: $config.beta_start,
            beta_end: $config.beta_end,
            beta_schedule: &$config.beta_schedule,
            trained_betas: $config.trained_betas.as_deref(),
            rescale_betas_zero_snr: $rescale,
            extra_schedules: $extra,
        }
    };
}
pub(crate) use beta_config;

/// The `Scheduler` methods of the schedulers that work on the unscaled sample:
/// `init_noise_sigma` 1 and an identity `scale_model_input` (plus `timesteps` from the
/// `timesteps` field).
macro_rules! unscaled_input_methods {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            1.0
        }

        fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
            Ok(sample.clone())
        }
    };
}
pub(crate) use unscaled_input_methods;

/// `add_noise` of the schedulers on alphas (DDIM, DDPM, PNDM, LCM): `alphas_cumprod` at the
/// index's timestep, from the `alphas_cumprod` and `timesteps_int` fields.
macro_rules! alpha_add_noise {
    () => {
        fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
            common::noised_by_alpha(
                CLASS,
                &self.alphas_cumprod,
                &self.timesteps_int,
                index,
                original,
                noise,
            )
        }
    };
}
pub(crate) use alpha_add_noise;

/// The img2img methods of the schedulers on alphas without a step counter (DDIM, DDPM, LCM):
/// they take the step index as it comes.
macro_rules! alpha_noise_methods {
    () => {
        fn set_begin_index(&mut self, index: usize) -> Result<()> {
            common::check_begin(CLASS, index, self.timesteps_int.len())
        }

        common::alpha_add_noise!();
    };
}
pub(crate) use alpha_noise_methods;

/// The `Scheduler` methods of the Euler schedulers, which scale the input by its sigma
/// (`sample / sqrt(sigma^2 + 1)`) and noise a sample by it, from the `timesteps`,
/// `init_noise_sigma` and `begin_index` fields and the `sigma(index)` method.
macro_rules! sigma_scaled_input_methods {
    () => {
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

        fn set_begin_index(&mut self, index: usize) -> Result<()> {
            common::check_begin(CLASS, index, self.timesteps.len())?;
            // The step index is then the schedule's index: no lookup of the first timestep.
            self.begin_index = 0;
            Ok(())
        }

        fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
            common::noised_by_sigma(self.sigma(index)?, original, noise)
        }
    };
}
pub(crate) use sigma_scaled_input_methods;

/// Python-style slice `v[start..end]` with negative indices counted from the end and
/// out-of-range bounds clamped.
pub(crate) fn py_slice<T: Clone>(v: &[T], start: isize, end: isize) -> Vec<T> {
    let len = v.len() as isize;
    let norm = |i: isize| -> usize {
        let i = if i < 0 { i + len } else { i };
        i.clamp(0, len) as usize
    };
    let (s, e) = (norm(start), norm(end));
    if s >= e {
        Vec::new()
    } else {
        v[s..e].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_conventions() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 2), vec![0.0, 999.0]);
        let v = np_linspace(0.0, 1.0, 5);
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn arange_counts_like_numpy() {
        let v = np_arange_f64(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], 1000.0);
        assert_eq!(np_arange_f64(1000.0, 0.0, -62.5).len(), 16);
    }

    #[test]
    fn round_is_half_to_even() {
        assert_eq!(np_round(937.5), 938.0);
        assert_eq!(np_round(812.5), 812.0);
    }

    #[test]
    fn python_slices() {
        let v = [1, 2, 3];
        assert_eq!(py_slice(&v, 0, -1), vec![1, 2]);
        assert_eq!(py_slice(&v, -2, -1), vec![2]);
        assert_eq!(py_slice(&[7], -2, -1), Vec::<i32>::new());
        assert_eq!(py_slice(&v, -4, 3), vec![1, 2, 3]);
    }

    #[test]
    fn torch_linspace_endpoints() {
        let v = torch_linspace_f32(0.1, 0.2, 5);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[4], 0.2f32);
        assert_eq!(torch_linspace_f32(0.3, 0.4, 1), vec![0.3f32]);
    }
}
