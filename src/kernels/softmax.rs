//! Softmax over the last axis with its own backward pass (grad_x = y * (g - sum(g * y)) per
//! row). candle's fused softmax has no backward pass and its composed one materialises the
//! exponentials, the row sums and their broadcast gradients; attention in training runs this.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::f32_slice;
use super::parallel::for_each_chunk;

fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.shape().dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("softmax: empty last axis in {:?}", layout.shape()),
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "softmax", "input")?;
        let n = last_dim(layout)?;
        let mut out = vec![0f32; x.len()];
        for_each_chunk(&mut out, n, |row, dst| {
            let src = &x[row * n..][..n];
            let max = src.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = (v - max).exp();
                sum += *d;
            }
            let inv = 1.0 / sum;
            dst.iter_mut().for_each(|d| *d *= inv);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// (softmax output y, grad of y) -> grad of the input.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-dim-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (
            f32_slice(ys, yl, "softmax", "input")?,
            f32_slice(gs, gl, "softmax", "input")?,
        );
        let n = last_dim(yl)?;
        let mut out = vec![0f32; y.len()];
        for_each_chunk(&mut out, n, |row, dst| {
            let (y, g) = (&y[row * n..][..n], &g[row * n..][..n]);
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((d, &yv), &gv) in dst.iter_mut().zip(y).zip(g) {
                *d = yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// Softmax over the last axis of an f32 CPU tensor, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    super::require_supported(x, "softmax")?;
    x.contiguous()?.apply_op1(Softmax)
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_matches;
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_the_composed_softmax_forward_and_backward() {
        let dev = Device::Cpu;
        for shape in [vec![3, 7], vec![2, 3, 5, 1], vec![2, 4, 33]] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 3., shape.as_slice(), &dev).unwrap())
                .unwrap();
            let ours = softmax_last_dim(&x).unwrap();
            let reference = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
            let label = format!("{shape:?}");
            assert_matches(&ours, &reference, &[&x], 1e-6, 1e-5, &label);
        }
    }
}
