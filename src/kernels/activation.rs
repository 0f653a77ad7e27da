//! SiLU and the exact (erf) GELU for inference, on the vectorised functions of `fast_math`
//! (candle runs libm's scalar expf/erff per element). No backward pass: training keeps
//! candle's differentiable ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::f32_slice;
use super::parallel::for_each_chunk;

/// Elements per parallel chunk: large enough that splitting pays for itself.
const CHUNK: usize = 1 << 14;

#[derive(Clone, Copy)]
enum Kind {
    Silu,
    Gelu,
}

struct Activation(Kind);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Silu => "silu",
            Kind::Gelu => "gelu-erf",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name(), "input")?;
        let mut out = super::parallel::zeroed(x.len());
        // The last chunk may be shorter: for_each_chunk takes whole chunks, so split by hand.
        let whole = x.len() / CHUNK * CHUNK;
        let (head, tail) = out.split_at_mut(whole);
        let kind = self.0;
        let run = move |src: &[f32], dst: &mut [f32]| match kind {
            Kind::Silu => {
                dst.copy_from_slice(src);
                super::fast_math::silu_in_place(dst);
            }
            Kind::Gelu => super::fast_math::gelu_into(src, dst),
        };
        for_each_chunk(head, CHUNK, |i, dst| run(&x[i * CHUNK..][..CHUNK], dst));
        run(&x[whole..], tail);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

fn apply(x: &Tensor, kind: Kind) -> Result<Tensor> {
    super::require_supported(x, "activation")?;
    x.contiguous()?.apply_op1_no_bwd(&Activation(kind))
}

/// x * sigmoid(x), not differentiable.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    apply(x, Kind::Silu)
}

/// 0.5 x (1 + erf(x / sqrt 2)), not differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    apply(x, Kind::Gelu)
}

#[cfg(test)]
mod tests {
    use super::super::testing::max_diff;
    use super::*;
    use candle_core::Device;

    #[test]
    fn match_candles_ops_on_odd_sizes() {
        let dev = Device::Cpu;
        // Sizes below, at and above a chunk, not multiples of the vector width.
        for n in [1usize, 37, CHUNK, 3 * CHUNK + 5] {
            let x = Tensor::randn(0f32, 3., n, &dev).unwrap();
            let strided = Tensor::randn(0f32, 3., (n, 2), &dev).unwrap().t().unwrap();
            for x in [x, strided] {
                assert!(max_diff(&silu(&x).unwrap(), &candle_nn::ops::silu(&x).unwrap()) < 1e-5);
                assert!(max_diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-5);
            }
        }
    }
}
