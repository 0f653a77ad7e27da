//! CPU kernels that candle lacks or runs slowly, each tested against a plain reference.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Defines `$name`, which runs `$generic` compiled for the best instruction set available
/// (AVX-512, AVX2+FMA, baseline), chosen at run time: `$generic` is written as plain loops
/// that the compiler vectorises for each.
macro_rules! dispatch {
    ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

pub mod activation;
pub mod attention;
mod attention_backward;
mod attention_lanes;
pub mod bias;
pub mod conv2d;
pub mod dequantize;
pub mod fast_math;
pub mod geglu;
pub mod group_norm;
pub mod im2col;
pub mod layer_norm;
pub mod linear;
mod matmul;
mod matmul_amx;
pub mod matmul_bf16;
pub mod parallel;
pub mod softmax;
pub mod winograd;

/// Whether these kernels apply to `x`: they take f32 tensors on the CPU (other dtypes and
/// devices take candle's own ops).
pub fn supports(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}

/// Fails with a message naming the kernel unless [`supports`] holds.
fn require_supported(x: &Tensor, kernel: &str) -> Result<()> {
    if !supports(x) {
        candle_core::bail!("{kernel}: the kernel takes f32 tensors on the CPU");
    }
    Ok(())
}

/// A custom op argument as a contiguous f32 slice, or an error naming the kernel and argument.
fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    kernel: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{kernel}: {what} must be f32"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{kernel}: {what} must be contiguous"),
    }
}

/// Mean and 1/std of a run of values (biased variance, as PyTorch), accumulated in f64.
fn moments(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = sum_f64(x, |v| v) / n;
    let var = sum_f64(x, |v| (v - mean) * (v - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// The f64 sum of `f` over the values, in eight running sums: one chain of dependent adds
/// waits out each add's latency, eight independent ones vectorise (a group norm of 128
/// channels at 512x512, 2 threads: 44.3 -> 27.6 ms).
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut sums = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for chunk in chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += f(v as f64);
        }
    }
    sums.iter().sum::<f64>() + rest
}

#[cfg(test)]
mod testing {
    use candle_core::Tensor;

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The largest magnitude in `t`, at least 1: tolerances scale with it, since the inputs are
    /// random and unseeded, so an f32 rounding of a large value can exceed a fixed bound.
    fn scale(t: &Tensor) -> f32 {
        max_abs(t).max(1.0)
    }

    /// `ours` against `reference` (both computed from `inputs`): the forward values within
    /// `forward_tol`, and the gradient of sum(out * probe) for every input, same shape, within
    /// `grad_tol`; both relative to the reference's largest magnitude when that exceeds 1.
    pub fn assert_matches(
        ours: &Tensor,
        reference: &Tensor,
        inputs: &[&Tensor],
        forward_tol: f32,
        grad_tol: f32,
        label: &str,
    ) {
        let forward = max_diff(ours, reference);
        let bound = forward_tol * scale(reference);
        assert!(
            forward < bound,
            "{label} forward: {forward} (bound {bound})"
        );
        let probe = Tensor::randn(0f32, 1., ours.dims(), ours.device()).unwrap();
        let grads = |out: &Tensor| {
            (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g1, g2) = (grads(ours), grads(reference));
        for v in inputs {
            let (a, r) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert_eq!(a.dims(), r.dims(), "{label}");
            let diff = max_diff(a, r);
            let bound = grad_tol * scale(r);
            assert!(
                diff < bound,
                "{label} grad {:?}: {diff} (bound {bound})",
                v.dims()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// The one-chain sums `moments` replaced, as the plain reference.
    fn reference(x: &[f32], eps: f64) -> (f32, f32) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
    }

    #[test]
    fn moments_match_the_plain_sums_on_odd_lengths() {
        // Lengths around the eight running sums, and values far from zero with a small
        // spread, where a sum in f32 would lose the variance. The means must be equal: f32
        // values near 1000 are multiples of 2^-14, so up to 10^5 of them sum exactly in f64
        // whatever the order.
        for len in [1usize, 7, 8, 9, 17, 1000, 100_003] {
            let x: Vec<f32> = (0..len)
                .map(|i| 1000.0 + ((i * 7919) % 101) as f32 * 1e-3)
                .collect();
            let (mean, rstd) = super::moments(&x, 1e-6);
            let (want_mean, want_rstd) = reference(&x, 1e-6);
            assert_eq!(mean, want_mean, "length {len}");
            let rel = ((rstd - want_rstd) / want_rstd).abs();
            assert!(rel < 1e-6, "length {len}: rstd {rstd} against {want_rstd}");
        }
    }
}
