//! Softmax over the last axis, of the input times a scale (attention's 1/sqrt(d), folded in
//! so the scores are not rescaled in a pass of their own), with its own backward pass
//! (grad_x = scale * y * (g - sum(g * y)) per row). candle's fused softmax has no backward pass
//! and its composed one materialises the exponentials, the row sums and their broadcast
//! gradients; attention runs this in training and at inference.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::f32_slice;
use super::parallel::for_each_chunk;

fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.shape().dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("softmax: empty last axis in {:?}", layout.shape()),
    }
}

struct Softmax {
    scale: f32,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "softmax", "input")?;
        let n = last_dim(layout)?;
        let scale = self.scale;
        let mut out = vec![0f32; x.len()];
        for_each_chunk(&mut out, n, |row, dst| {
            let src = &x[row * n..][..n];
            // The maximum of scale * x: of x when the scale is positive, else the minimum.
            let max = if scale >= 0.0 {
                src.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
            } else {
                src.iter().fold(f32::INFINITY, |m, &v| m.min(v))
            };
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = (v - max) * scale;
            }
            super::fast_math::exp_in_place(dst);
            let inv = 1.0 / dst.iter().sum::<f32>();
            dst.iter_mut().for_each(|d| *d *= inv);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxBackward { scale: self.scale },
        )?))
    }
}

/// (softmax output y, grad of y) -> grad of the input.
struct SoftmaxBackward {
    scale: f32,
}

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
        let scale = self.scale;
        let mut out = vec![0f32; y.len()];
        for_each_chunk(&mut out, n, |row, dst| {
            let (y, g) = (&y[row * n..][..n], &g[row * n..][..n]);
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((d, &yv), &gv) in dst.iter_mut().zip(y).zip(g) {
                *d = scale * yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// Softmax over the last axis of an f32 CPU tensor, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax_scaled_last_dim(x, 1.0)
}

/// softmax(scale * x) over the last axis, differentiable.
pub fn softmax_scaled_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    super::require_supported(x, "softmax")?;
    x.contiguous()?.apply_op1(Softmax {
        scale: scale as f32,
    })
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
            for scale in [0.125, -0.7] {
                let ours = softmax_scaled_last_dim(&x, scale).unwrap();
                let reference =
                    candle_nn::ops::softmax(&(x.as_tensor() * scale).unwrap(), D::Minus1).unwrap();
                let label = format!("{shape:?} scale {scale}");
                assert_matches(&ours, &reference, &[&x], 1e-6, 1e-5, &label);
            }
        }
    }
}
