//! AdamW with linear warm-up (then constant or cosine decay), global gradient-norm clipping and an EMA of the weights; all of
//! its state can be saved and restored, so a resumed run continues the same curve.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// `Some(n)`: after the warm-up, a cosine decay to `min_lr_ratio * lr` at step n (held
    /// there after); `None`: constant after the warm-up.
    pub decay_steps: Option<usize>,
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    pub ema_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            warmup_steps: 200,
            decay_steps: None,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
            ema_decay: 0.999,
        }
    }
}

/// One parameter's optimizer state. The moments and the EMA are plain vectors, updated in one
/// loop with the weight (which is updated inside its own storage): tensors would be copied out
/// and back every step.
struct Slot {
    name: String,
    var: Var,
    /// This parameter's learning rate relative to the schedule's (see [`AdamW::scale_lr`]).
    lr_scale: f64,
    m: Vec<f32>,
    v: Vec<f32>,
    ema: Vec<f32>,
    /// Updates this parameter has had: its moments' bias correction counts these, as
    /// PyTorch's per-parameter `step` does, so a parameter that first gets a gradient late
    /// (a frozen part unfrozen, a branch first used at step n) is not under-corrected.
    updates: u32,
    /// The gradient summed over a batch's shards, kept from step to step (one more copy of
    /// the parameter for the whole run: reallocating it every step cost fresh pages, 3 % of
    /// a training step).
    summed: Vec<f32>,
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimizer steps taken so far (the learning-rate schedule's position).
    pub step: usize,
}

/// What one optimizer step saw.
pub struct StepStats {
    pub grad_norm: f64,
    pub lr: f64,
}

impl Slot {
    /// A state vector as a tensor of the parameter's shape (for checkpoints and samples).
    fn tensor(&self, values: &[f32]) -> candle_core::Result<Tensor> {
        Tensor::from_slice(values, self.var.shape(), self.var.device())
    }
}

/// The AdamW update of one parameter, run inside the weight's storage. The state sits in a
/// RefCell because candle hands in-place ops only `&self`.
struct InPlaceUpdate<'a> {
    state: std::cell::RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>, &'a mut Vec<f32>)>,
    g: &'a [f32],
    /// clip, beta1, beta2, bias corrections 1 and 2, eps, weight-decay shrink, lr, EMA decay.
    coefficients: [f32; 9],
}

impl candle_core::InplaceOp1 for InPlaceUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (m, v, ema) = &mut *self.state.borrow_mut();
        let w = match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(data), Some((start, end))) => &mut data[start..end],
            _ => candle_core::bail!("adamw: parameters must be contiguous f32 tensors"),
        };
        if w.len() != self.g.len() || m.len() != w.len() {
            candle_core::bail!(
                "adamw: gradient of {} values for {} weights",
                self.g.len(),
                w.len()
            );
        }
        let coefficients = self.coefficients;
        let (g, m, v, ema) = (self.g, &mut m[..], &mut v[..], &mut ema[..]);
        if w.len() < PARALLEL_MIN {
            update_values(w, g, m, v, ema, coefficients);
        } else {
            // Each value's update is independent, so the chunks run in any order with the
            // same results as one loop.
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(ema.par_chunks_mut(CHUNK))
                .for_each(|((((w, g), m), v), ema)| update_values(w, g, m, v, ema, coefficients));
        }
        Ok(())
    }
}

/// Values per piece of parallel work in the optimizer's loops; a fixed size (not one per
/// thread) so that the gradient norm's partial sums, and so the run, do not depend on the
/// thread count.
const CHUNK: usize = 1 << 15;

/// Parameters smaller than this are updated on the calling thread (most biases and norms).
const PARALLEL_MIN: usize = 4 * CHUNK;

/// The AdamW and EMA update of a run of values, written as one pass over zipped slices so
/// that it compiles to vector code (the division and square root included, which are exact).
fn update_values(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    ema: &mut [f32],
    [clip, b1, b2, bias1, bias2, eps, shrink, lr, decay]: [f32; 9],
) {
    let values = w
        .iter_mut()
        .zip(g)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
        .zip(ema.iter_mut());
    for ((((w, &g), m), v), ema) in values {
        let gi = g * clip;
        *m = b1 * *m + (1.0 - b1) * gi;
        *v = b2 * *v + (1.0 - b2) * gi * gi;
        let update = (*m / bias1) / ((*v / bias2).sqrt() + eps);
        *w = *w * shrink - update * lr;
        *ema = *ema * decay + *w * (1.0 - decay);
    }
}

/// The sum of squares of `g` in f64, over fixed chunks in parallel, the partial sums added in
/// order (the same result for any thread count).
fn sum_of_squares(g: &[f32]) -> f64 {
    let square_sum = |c: &[f32]| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
    if g.len() < PARALLEL_MIN {
        return g.chunks(CHUNK).map(square_sum).sum();
    }
    let partial: Vec<f64> = g.par_chunks(CHUNK).map(square_sum).collect();
    partial.iter().sum()
}

/// Where a parameter's gradient is for this step's update.
enum Gradient {
    /// No shard's backward pass reached the parameter.
    Absent,
    /// One shard's gradient, read where it lies.
    InPlace(Tensor),
    /// Several shards' gradients, summed into the slot's `summed` buffer.
    Summed,
}

/// Calls `f` on a gradient's values where they lie (a contiguous f32 tensor on the CPU), or
/// on a copy otherwise. The update runs inside `f` with the gradient's storage read-locked
/// while it write-locks its weight's: candle's backward pass builds every gradient in new
/// storage (zeros plus the contributions), never in its weight's, so the two locks are on
/// different storages.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&data[a..b]));
        }
    }
    let values = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(f(&values))
}

/// `sum += part`, in parallel for large gradients.
fn add_into(sum: &mut [f32], part: &[f32]) {
    let add = |(s, p): (&mut [f32], &[f32])| s.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    if sum.len() < PARALLEL_MIN {
        add((sum, part));
    } else {
        sum.par_chunks_mut(CHUNK)
            .zip(part.par_chunks(CHUNK))
            .for_each(add);
    }
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let weights = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                Ok(Slot {
                    m: vec![0.0; weights.len()],
                    v: vec![0.0; weights.len()],
                    ema: weights,
                    updates: 0,
                    summed: Vec::new(),
                    name,
                    var,
                    lr_scale: 1.0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    /// Scales the learning rate (and so the weight decay) of the parameters whose names
    /// start with `prefix`; returns how many there are. A jointly trained text encoder at a
    /// fraction of the U-Net's rate learns more slowly to drop what the U-Net cannot read yet.
    pub fn scale_lr(&mut self, prefix: &str, scale: f64) -> usize {
        let mut n = 0;
        for slot in self.slots.iter_mut().filter(|s| s.name.starts_with(prefix)) {
            slot.lr_scale = scale;
            n += 1;
        }
        n
    }

    pub fn learning_rate(&self) -> f64 {
        let c = &self.config;
        let warm = c.warmup_steps.max(1);
        let step = self.step + 1;
        if step < warm {
            return c.lr * step as f64 / warm as f64;
        }
        match c.decay_steps {
            Some(end) if end > warm => {
                let progress = ((step - warm) as f64 / (end - warm) as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine)
            }
            _ => c.lr,
        }
    }

    /// One AdamW update from the gradients of `loss`'s backward pass. The update runs as one
    /// loop over each parameter's values (moments, weight and EMA together) rather than a dozen
    /// tensor ops per parameter.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepStats> {
        self.step_summed(std::slice::from_ref(grads))
    }

    /// As `step`, with each parameter's gradient the sum over `shards` (the backward passes
    /// of a batch split into parts, summed in order).
    pub fn step_summed(&mut self, shards: &[GradStore]) -> Result<StepStats> {
        // Pass 1: the global norm, and where each parameter's gradient is for pass 2.
        let mut sq = 0f64;
        let mut gradients = Vec::with_capacity(self.slots.len());
        for slot in &mut self.slots {
            let parts: Vec<&Tensor> = shards
                .iter()
                .filter_map(|g| g.get(slot.var.as_tensor()))
                .collect();
            gradients.push(match parts.as_slice() {
                [] => Gradient::Absent,
                [one] => {
                    sq += with_values(one, sum_of_squares)?;
                    Gradient::InPlace((*one).clone())
                }
                [first, rest @ ..] => {
                    let sum = &mut slot.summed;
                    sum.clear();
                    with_values(first, |g| sum.extend_from_slice(g))?;
                    for part in rest {
                        with_values(part, |g| add_into(sum, g))?;
                    }
                    sq += sum_of_squares(sum);
                    Gradient::Summed
                }
            });
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::InvalidRequest(
                "the gradient is not finite (training diverged); lower the learning rate".into(),
            ));
        }
        let clip = if self.config.max_grad_norm > 0.0 && grad_norm > self.config.max_grad_norm {
            self.config.max_grad_norm / grad_norm
        } else {
            1.0
        };
        let lr = self.learning_rate();
        self.step += 1;
        let c = &self.config;
        // The EMA warms up like diffusers' EMAModel, so short runs are not dominated by
        // their random initial weights.
        let decay = c
            .ema_decay
            .min((1.0 + self.step as f64) / (10.0 + self.step as f64)) as f32;
        let (b1, b2, eps, clip) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32, clip as f32);
        for (slot, gradient) in self.slots.iter_mut().zip(gradients) {
            if let Gradient::Absent = gradient {
                continue;
            }
            let lr = lr * slot.lr_scale;
            let (lr32, shrink) = (lr as f32, (1.0 - lr * c.weight_decay) as f32);
            slot.updates += 1;
            let t = slot.updates as i32;
            let bias1 = (1.0 - c.beta1.powi(t)) as f32;
            let bias2 = (1.0 - c.beta2.powi(t)) as f32;
            let coefficients = [clip, b1, b2, bias1, bias2, eps, shrink, lr32, decay];
            let Slot {
                var,
                m,
                v,
                ema,
                summed,
                ..
            } = slot;
            let mut run = |g: &[f32]| -> Result<()> {
                let update = InPlaceUpdate {
                    state: std::cell::RefCell::new((m, v, ema)),
                    g,
                    coefficients,
                };
                Ok(var.as_tensor().inplace_op1(&update)?)
            };
            match gradient {
                Gradient::InPlace(g) => with_values(&g, |g| run(g))??,
                Gradient::Summed => run(summed)?,
                Gradient::Absent => {}
            }
        }
        Ok(StepStats { grad_norm, lr })
    }

    /// The EMA weights by name (what gets exported and sampled from).
    pub fn ema(&self) -> Result<BTreeMap<String, Tensor>> {
        self.slots
            .iter()
            .map(|s| Ok((s.name.clone(), s.tensor(&s.ema)?)))
            .collect()
    }

    /// Everything needed to resume: moments, EMA and update count, by `m.NAME`, `v.NAME`,
    /// `ema.NAME` and `t.NAME` (a one-element u32 tensor).
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.tensor(&s.m)?);
            out.insert(format!("v.{}", s.name), s.tensor(&s.v)?);
            out.insert(format!("ema.{}", s.name), s.tensor(&s.ema)?);
            let t = Tensor::from_vec(vec![s.updates], 1, &candle_core::Device::Cpu)?;
            out.insert(format!("t.{}", s.name), t);
        }
        Ok(out)
    }

    /// Restores what `state` saved. Checkpoints written before update counts were kept lack
    /// `t.NAME`; those parameters take the global step, which is what their moments were
    /// corrected with.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: usize) -> Result<()> {
        for s in &mut self.slots {
            let get = |k: String| -> Result<Vec<f32>> {
                let t = state.get(&k).ok_or_else(|| {
                    Error::InvalidRequest(format!("checkpoint lacks optimizer tensor `{k}`"))
                })?;
                if t.shape() != s.var.shape() {
                    return Err(Error::InvalidRequest(format!(
                        "checkpoint optimizer tensor `{k}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        s.var.dims()
                    )));
                }
                Ok(t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            };
            s.m = get(format!("m.{}", s.name))?;
            s.v = get(format!("v.{}", s.name))?;
            s.ema = get(format!("ema.{}", s.name))?;
            s.updates = match state.get(&format!("t.{}", s.name)) {
                Some(t) => t
                    .flatten_all()?
                    .to_vec1::<u32>()?
                    .first()
                    .copied()
                    .unwrap_or(0),
                None => step as u32,
            };
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps on a 3-element weight against AdamW written out in f64 (PyTorch's formula:
    /// decoupled weight decay, bias-corrected moments), with clipping and the EMA.
    #[test]
    fn step_matches_the_adamw_formula() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let w0 = [0.5f64, -1.0, 2.0];
        let var = Var::from_vec(w0.iter().map(|&v| v as f32).collect(), 3, &dev).unwrap();
        let config = AdamWConfig {
            lr: 0.1,
            warmup_steps: 1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            ema_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], config.clone()).unwrap();
        let (mut m, mut v, mut w, mut ema) = ([0f64; 3], [0f64; 3], w0, w0);
        for (step, coef) in [(1i32, [3.0f64, 0.0, -4.0]), (2, [0.1, 0.2, 0.3])] {
            // loss = sum(coef * w), so the gradient is coef.
            let c = Tensor::from_vec(coef.iter().map(|&x| x as f32).collect(), 3, &dev).unwrap();
            let loss = (var.as_tensor() * &c).unwrap().sum_all().unwrap();
            let stats = opt.step(&loss.backward().unwrap()).unwrap();
            let norm = coef.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((stats.grad_norm - norm).abs() < 1e-5);
            let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
            let decay = 0.5f64.min((1.0 + step as f64) / (10.0 + step as f64));
            for i in 0..3 {
                let g = coef[i] * clip;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let update = (m[i] / (1.0 - 0.9f64.powi(step)))
                    / ((v[i] / (1.0 - 0.999f64.powi(step))).sqrt() + 1e-8);
                w[i] = w[i] * (1.0 - 0.1 * 0.01) - 0.1 * update;
                ema[i] = ema[i] * decay + w[i] * (1.0 - decay);
            }
            let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
            let got_ema: Vec<f32> = opt.ema().unwrap()["w"].to_vec1().unwrap();
            for i in 0..3 {
                assert!((got[i] as f64 - w[i]).abs() < 1e-5, "step {step} w[{i}]");
                assert!(
                    (got_ema[i] as f64 - ema[i]).abs() < 1e-5,
                    "step {step} ema[{i}]"
                );
            }
        }
    }

    /// A scaled part moves by its share of the step: the first AdamW update is lr times
    /// the gradient's sign (plus weight decay), so a quarter of the rate moves a quarter as far.
    #[test]
    fn a_scaled_prefix_moves_by_its_share_of_the_rate() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let var = |v: f32| Var::from_vec(vec![v; 2], 2, &dev).unwrap();
        let (unet, text) = (var(1.0), var(1.0));
        let config = AdamWConfig {
            lr: 0.1,
            warmup_steps: 1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let vars = vec![
            ("unet.w".into(), unet.clone()),
            ("text_encoder.w".into(), text.clone()),
        ];
        let mut opt = AdamW::new(vars, config).unwrap();
        assert_eq!(opt.scale_lr("text_encoder.", 0.25), 1);
        assert_eq!(opt.scale_lr("vae.", 0.5), 0);
        let loss =
            (unet.as_tensor().sum_all().unwrap() + text.as_tensor().sum_all().unwrap()).unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let moved = |v: &Var| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((moved(&unet) - 0.1).abs() < 1e-5, "{}", moved(&unet));
        assert!((moved(&text) - 0.025).abs() < 1e-5, "{}", moved(&text));
    }

    /// Gradients of a batch's shards, summed by `step_summed`, update the weights as the
    /// gradient of the whole batch does.
    #[test]
    fn shard_gradients_sum_to_the_batch_gradient() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let config = AdamWConfig {
            lr: 0.1,
            warmup_steps: 1,
            ..Default::default()
        };
        let (a, b) = ([3.0f32, 0.0, -4.0], [0.5f32, 2.0, 1.0]);
        let coef = |c: [f32; 3]| Tensor::from_vec(c.to_vec(), 3, &dev).unwrap();
        let grads = |var: &Var, c: [f32; 3]| {
            (var.as_tensor() * coef(c))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let fresh = || Var::from_vec(vec![0.5f32, -1.0, 2.0], 3, &dev).unwrap();
        let (whole, sharded) = (fresh(), fresh());
        let mut opt = AdamW::new(vec![("w".into(), whole.clone())], config.clone()).unwrap();
        let sum = [a[0] + b[0], a[1] + b[1], a[2] + b[2]];
        let stats = opt.step(&grads(&whole, sum)).unwrap();
        let mut opt2 = AdamW::new(vec![("w".into(), sharded.clone())], config).unwrap();
        let stats2 = opt2
            .step_summed(&[grads(&sharded, a), grads(&sharded, b)])
            .unwrap();
        assert!((stats.grad_norm - stats2.grad_norm).abs() < 1e-6);
        let (w1, w2): (Vec<f32>, Vec<f32>) = (
            whole.as_tensor().to_vec1().unwrap(),
            sharded.as_tensor().to_vec1().unwrap(),
        );
        assert_eq!(w1, w2);
        assert_ne!(w1, vec![0.5f32, -1.0, 2.0]);
    }

    /// A parameter whose first gradient comes at the third step moves by the full learning
    /// rate (Adam's first update is lr * sign(g)), as with PyTorch's per-parameter step count;
    /// with the global step its moments would be corrected as if two updates had happened.
    /// The count survives a save and restore.
    #[test]
    fn a_late_parameter_gets_its_own_bias_correction() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let early = Var::from_vec(vec![0f32], 1, &dev).unwrap();
        let late = Var::from_vec(vec![0f32], 1, &dev).unwrap();
        let config = AdamWConfig {
            lr: 0.1,
            warmup_steps: 1,
            weight_decay: 0.0,
            max_grad_norm: 0.0,
            ..Default::default()
        };
        let vars = vec![
            ("early".into(), early.clone()),
            ("late".into(), late.clone()),
        ];
        let mut opt = AdamW::new(vars.clone(), config.clone()).unwrap();
        for step in 0..3 {
            let mut loss = early.as_tensor().sum_all().unwrap();
            if step == 2 {
                loss = (loss + late.as_tensor().sum_all().unwrap()).unwrap();
            }
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let moved = late.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!(
            (moved + 0.1).abs() < 1e-5,
            "first update of `late`: {moved}"
        );

        let mut restored = AdamW::new(vars, config).unwrap();
        restored
            .load_state(&opt.state().unwrap(), opt.step)
            .unwrap();
        let counts: Vec<u32> = restored.slots.iter().map(|s| s.updates).collect();
        assert_eq!(counts, vec![3, 1]);
        let mut wrong = opt.state().unwrap();
        wrong.insert(
            "m.late".into(),
            Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap(),
        );
        let err = restored.load_state(&wrong, 3).unwrap_err().to_string();
        assert!(err.contains("m.late") && err.contains("shape"), "{err}");
    }

    #[test]
    fn warmup_then_cosine_or_constant() {
        let config = AdamWConfig {
            lr: 1.0,
            warmup_steps: 10,
            decay_steps: Some(110),
            ..Default::default()
        };
        let mut opt = AdamW::new(Vec::new(), config.clone()).unwrap();
        let mut at = |step: usize| {
            opt.step = step;
            opt.learning_rate()
        };
        assert!((at(0) - 0.1).abs() < 1e-12);
        assert!((at(9) - 1.0).abs() < 1e-12);
        assert!((at(59) - 0.55).abs() < 1e-12, "{}", at(59));
        assert!((at(109) - 0.1).abs() < 1e-12);
        assert!((at(500) - 0.1).abs() < 1e-12);
        let mut constant = AdamW::new(
            Vec::new(),
            AdamWConfig {
                decay_steps: None,
                ..config
            },
        )
        .unwrap();
        constant.step = 500;
        assert_eq!(constant.learning_rate(), 1.0);
    }
}
