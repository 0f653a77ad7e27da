//! LayerNorm over the last axis with its own backward pass. candle's fused LayerNorm has none,
//! and the composed one it falls back to costs a dozen ops and strided reductions per call;
//! the text encoder and every transformer block of the U-Net run it three times per layer.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::parallel::for_each_chunk;
use super::{f32_slice, moments};

#[derive(Clone, Copy)]
struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "layer_norm", "input")?;
        let (w, b) = (
            f32_slice(ws, wl, "layer_norm", "weight")?,
            f32_slice(bs, bl, "layer_norm", "bias")?,
        );
        let n = w.len();
        if n == 0 || b.len() != n || xl.shape().dims().last() != Some(&n) {
            candle_core::bail!(
                "layer_norm: weight and bias must match the last axis of {:?}",
                xl.shape()
            );
        }
        let mut out = super::parallel::zeroed(x.len());
        for_each_chunk(&mut out, n, |row, dst| {
            let src = &x[row * n..][..n];
            let (mean, rstd) = moments(src, self.eps);
            for (((d, &v), &wv), &bv) in dst.iter_mut().zip(src).zip(w).zip(b) {
                *d = (v - mean) * rstd * wv + bv;
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = weight.elem_count();
        let total = x.elem_count();
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &grad.contiguous()?,
            &weight.contiguous()?,
            &LayerNormBackward(*self),
        )?;
        let grad_x = packed.narrow(0, 0, total)?.reshape(x.shape())?;
        let grad_w = packed.narrow(0, total, n)?.reshape(weight.shape())?;
        let grad_b = packed.narrow(0, total + n, n)?.reshape(bias.shape())?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// (x, grad of the output, weight) -> grad_x ++ grad_weight ++ grad_bias, flat.
struct LayerNormBackward(LayerNormOp);

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (
            f32_slice(xs, xl, "layer_norm", "input")?,
            f32_slice(gs, gl, "layer_norm", "gradient")?,
        );
        let w = f32_slice(ws, wl, "layer_norm", "weight")?;
        let n = w.len();
        let rows = x.len() / n;
        // Per row: grad_x, then the row's contributions to grad_weight and grad_bias (summed
        // over rows afterwards, so the parallel loop writes disjoint chunks).
        let chunk = 3 * n;
        let mut work = vec![0f32; rows * chunk];
        for_each_chunk(&mut work, chunk, |row, dst| {
            let (xr, gr) = (&x[row * n..][..n], &g[row * n..][..n]);
            let (mean, rstd) = moments(xr, self.0.eps);
            let (dx, rest) = dst.split_at_mut(n);
            let (dw, db) = rest.split_at_mut(n);
            let (mut m1, mut m2) = (0f32, 0f32);
            for i in 0..n {
                let xhat = (xr[i] - mean) * rstd;
                dw[i] = gr[i] * xhat;
                db[i] = gr[i];
                let gxhat = gr[i] * w[i];
                m1 += gxhat;
                m2 += gxhat * xhat;
                dx[i] = gxhat;
            }
            let (m1, m2) = (m1 / n as f32, m2 / n as f32);
            for i in 0..n {
                let xhat = (xr[i] - mean) * rstd;
                dx[i] = rstd * (dx[i] - m1 - xhat * m2);
            }
        });
        let mut out = Vec::with_capacity(x.len() + 2 * n);
        for row in 0..rows {
            out.extend_from_slice(&work[row * chunk..][..n]);
        }
        let mut params = vec![0f32; 2 * n];
        for row in 0..rows {
            for (p, &v) in params.iter_mut().zip(&work[row * chunk + n..][..2 * n]) {
                *p += v;
            }
        }
        out.extend_from_slice(&params);
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * n)))
    }
}

/// LayerNorm over the last axis of an f32 CPU tensor, differentiable in all three arguments.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    super::require_supported(x, "layer_norm")?;
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps },
    )
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_matches;
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_layer_norm_forward_and_backward() {
        let dev = Device::Cpu;
        for shape in [vec![3, 7], vec![2, 5, 16], vec![4, 1]] {
            let n = *shape.last().unwrap();
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., shape.as_slice(), &dev).unwrap() + 0.3).unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, n, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, n, &dev).unwrap()).unwrap();
            let ours = layer_norm(&x, &w, &b, 1e-5).unwrap();
            let reference = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
            let label = format!("{shape:?}");
            assert_matches(&ours, &reference, &[&x, &w, &b], 1e-5, 1e-4, &label);
        }
    }
}
