//! GEGLU (the U-Net feed-forward's gate: the first half of the projection times the exact
//! GELU of its second half) as one op with its own backward pass. Composed from candle's ops it
//! is four graph nodes (two narrows, a scalar-libm GELU, a product), each paying a copy or a
//! zero-filled gradient of the projection's size in training.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::f32_slice;
use super::parallel::for_each_chunk;

/// F, half the last axis, which must be even and non-zero.
fn half_width(layout: &Layout) -> Result<usize> {
    match layout.shape().dims().last() {
        Some(&n) if n > 0 && n % 2 == 0 => Ok(n / 2),
        _ => candle_core::bail!(
            "geglu: the last axis must have an even, non-zero length, got {:?}",
            layout.shape()
        ),
    }
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "geglu", "input")?;
        let f = half_width(layout)?;
        let mut out = super::parallel::zeroed(x.len() / 2);
        for_each_chunk(&mut out, f, |row, dst| {
            super::fast_math::geglu_row(&x[row * 2 * f..][..2 * f], dst)
        });
        let mut dims = layout.shape().dims().to_vec();
        *dims.last_mut().expect("checked non-empty") = f;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &GegluBackward)?,
        ))
    }
}

/// (input x, grad of the output) -> grad of x.
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (
            f32_slice(xs, xl, "geglu", "input")?,
            f32_slice(gs, gl, "geglu", "output gradient")?,
        );
        let f = half_width(xl)?;
        if g.len() * 2 != x.len() {
            candle_core::bail!(
                "geglu: gradient {:?} for input {:?}",
                gl.shape(),
                xl.shape()
            );
        }
        let mut out = super::parallel::zeroed(x.len());
        for_each_chunk(&mut out, 2 * f, |row, dst| {
            super::fast_math::geglu_backward_row(
                &x[row * 2 * f..][..2 * f],
                &g[row * f..][..f],
                dst,
            )
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// x[..., :F] * gelu(x[..., F:]) for an f32 CPU tensor whose last axis is 2F; differentiable.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    super::require_supported(x, "geglu")?;
    x.contiguous()?.apply_op1(Geglu)
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_matches;
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_the_composed_geglu_forward_and_backward() {
        let dev = Device::Cpu;
        for shape in [vec![3, 8], vec![2, 5, 34], vec![1, 7, 3, 2]] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2., shape.as_slice(), &dev).unwrap())
                .unwrap();
            let ours = geglu(&x).unwrap();
            let f = shape[shape.len() - 1] / 2;
            let hidden = x.narrow(D::Minus1, 0, f).unwrap();
            let gate = x.narrow(D::Minus1, f, f).unwrap();
            let reference = (hidden * gate.gelu_erf().unwrap()).unwrap();
            assert_matches(&ours, &reference, &[&x], 2e-6, 2e-5, &format!("{shape:?}"));
        }
    }

    #[test]
    fn an_odd_last_axis_is_an_error() {
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = geglu(&x).unwrap_err().to_string();
        assert!(err.contains("even"), "{err}");
    }
}
