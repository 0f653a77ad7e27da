//! Adding a per-channel bias (or a per-image, per-channel one such as the U-Net's timestep
//! embedding) as one op whose backward pass sums the gradient in a single contiguous sweep.
//! candle's `broadcast_add` backward reduces along strided axes one element at a time, which
//! was a sixth of a training step.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::f32_slice;

/// x viewed as (outer, channels, inner); the bias is (channels) or (outer, channels).
#[derive(Clone, Copy, Debug)]
struct Geometry {
    outer: usize,
    channels: usize,
    inner: usize,
    per_outer: bool,
}

impl Geometry {
    fn bias_index(&self, o: usize, c: usize) -> usize {
        if self.per_outer {
            o * self.channels + c
        } else {
            c
        }
    }
}

struct AddBias(Geometry);

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (x, bias) = (
            f32_slice(xs, xl, "add_bias", "input")?,
            f32_slice(bs, bl, "add_bias", "input")?,
        );
        // One pass writing x + bias (no copy of x first). A Linear layer's bias runs along
        // the last axis (inner = 1): then each row adds the bias vector element-wise, which
        // vectorises, instead of one channel lookup per element.
        let mut out = Vec::with_capacity(x.len());
        let row_len = g.channels * g.inner;
        if row_len == 0 {
            return Ok((CpuStorage::F32(out), xl.shape().clone()));
        }
        for (o, x_row) in x.chunks_exact(row_len).enumerate() {
            let b_row = &bias[g.bias_index(o, 0)..][..g.channels];
            if g.inner == 1 {
                out.extend(x_row.iter().zip(b_row).map(|(v, b)| v + b));
            } else {
                for (plane, &b) in x_row.chunks_exact(g.inner).zip(b_row) {
                    out.extend(plane.iter().map(|v| v + b));
                }
            }
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_bias = grad
            .contiguous()?
            .apply_op1_no_bwd(&SumToBias(self.0))?
            .reshape(bias.shape())?;
        Ok((Some(grad.clone()), Some(grad_bias)))
    }
}

/// The bias gradient: the output gradient summed over everything the bias was broadcast over.
struct SumToBias(Geometry);

impl CustomOp1 for SumToBias {
    fn name(&self) -> &'static str {
        "sum-to-bias"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let grad = f32_slice(storage, layout, "add_bias", "input")?;
        let len = if g.per_outer {
            g.outer * g.channels
        } else {
            g.channels
        };
        let mut out = super::parallel::zeroed(len);
        for o in 0..g.outer {
            let start = g.bias_index(o, 0);
            let acc = &mut out[start..][..g.channels];
            let rows = &grad[o * g.channels * g.inner..][..g.channels * g.inner];
            if g.inner == 1 {
                // A Linear layer's bias: add the row into the sums (vectorises).
                acc.iter_mut().zip(rows).for_each(|(a, v)| *a += v);
            } else {
                for (a, plane) in acc.iter_mut().zip(rows.chunks_exact(g.inner)) {
                    *a += plane.iter().sum::<f32>();
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// `x + bias` with the bias along axis `axis` of `x`: `bias` has `x.dim(axis)` elements, or
/// `x.dims()[..=axis]`'s product (one bias per leading index, e.g. (batch, channels)).
pub fn add_bias(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    super::require_supported(x, "add_bias")?;
    let dims = x.dims();
    if axis >= dims.len() {
        candle_core::bail!("add_bias: axis {axis} out of range for {:?}", x.shape());
    }
    let outer: usize = dims[..axis].iter().product();
    let (channels, inner) = (dims[axis], dims[axis + 1..].iter().product());
    let per_outer = match bias.elem_count() {
        n if n == channels => false,
        n if n == outer * channels => true,
        _ => candle_core::bail!(
            "add_bias: a bias of shape {:?} does not fit axis {axis} of {:?}",
            bias.shape(),
            x.shape()
        ),
    };
    let g = Geometry {
        outer,
        channels,
        inner,
        per_outer,
    };
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias(g))
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_matches;
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_broadcast_add_forward_and_backward() {
        let dev = Device::Cpu;
        // (x shape, axis, bias shape, the bias reshaped for broadcast_add)
        for (shape, axis, bias_shape, bcast) in [
            (vec![2, 5, 3, 4], 1, vec![5], vec![1, 5, 1, 1]),
            (vec![7, 6], 1, vec![6], vec![1, 6]),
            (vec![3, 4, 5], 2, vec![5], vec![1, 1, 5]),
            (vec![2, 5, 3, 3], 1, vec![2, 5], vec![2, 5, 1, 1]),
            (vec![3, 4, 5], 1, vec![3, 4], vec![3, 4, 1]),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap())
                .unwrap();
            let b =
                Var::from_tensor(&Tensor::randn(0f32, 1., bias_shape.as_slice(), &dev).unwrap())
                    .unwrap();
            let ours = add_bias(&x, &b, axis).unwrap();
            let reference = x
                .broadcast_add(&b.reshape(bcast.as_slice()).unwrap())
                .unwrap();
            let label = format!("{shape:?}");
            assert_matches(&ours, &reference, &[&x, &b], 1e-6, 1e-4, &label);
        }
    }

    #[test]
    fn an_empty_input_stays_empty() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((0, 4), DType::F32, &dev).unwrap();
        let b = Tensor::ones(4, DType::F32, &dev).unwrap();
        assert_eq!(add_bias(&x, &b, 1).unwrap().dims(), &[0, 4]);
    }

    #[test]
    fn refuses_a_bias_that_does_not_fit() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let err = add_bias(&x, &b, 1).unwrap_err().to_string();
        assert!(err.contains("does not fit axis 1"), "{err}");
    }
}
