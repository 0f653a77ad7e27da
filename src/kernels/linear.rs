//! The f32 product of a linear layer at inference, x (m x k) . w (k x n), split over the
//! threads by [`product_split`] (one run of rows or columns per thread, no waits between
//! them) rather than by `gemm`'s threading: a U-Net's linear layers are many medium-sized
//! products (4096 x 320 x 320 and the like), where `gemm`'s per-block waits cost much.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::matmul::{product_split, Strided};

/// `x . w^T` for f32 `x` (.., k) and a row-major f32 `w` (n, k), a layer's weight as
/// checkpoints store it (read in place as the (k, n) operand); the result is (.., n).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::require_supported(x, "linear")?;
    super::require_supported(w, "linear")?;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2_no_bwd(&w, &LinearRows)
}

struct LinearRows;

impl CustomOp2 for LinearRows {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(xs, xl, "linear", "input")?;
        let w = super::f32_slice(ws, wl, "linear", "weight")?;
        let ((m, n, k), shape) = product_shape("linear", xl, wl)?;
        let mut y = super::parallel::zeroed(m * n);
        if m * n == 0 {
            return Ok((CpuStorage::F32(y), shape));
        }
        // SAFETY: x is m x k, w n x k and y m x n, all row-major and contiguous; w's rows
        // are the columns of the k x n operand.
        unsafe {
            product_split(
                (m, n, k),
                Strided::rows(y.as_mut_ptr(), n),
                false,
                Strided::rows(x.as_ptr(), k),
                Strided::columns(w.as_ptr(), k),
                super::parallel::threads_for(usize::MAX),
            );
        }
        Ok((CpuStorage::F32(y), shape))
    }
}

/// The sizes of a linear layer's product for an input laid out as `xl` (.., k) and an
/// (n, k) weight `wl`: (m, n, k), m the input's rows, and the output's shape (.., n). `op`
/// names the kernel in the error for a weight that does not fit.
pub(super) fn product_shape(
    op: &str,
    xl: &Layout,
    wl: &Layout,
) -> Result<((usize, usize, usize), Shape)> {
    let (n, k) = wl.shape().dims2()?;
    let dims = xl.shape().dims();
    let lead = match dims.split_last() {
        Some((&last, lead)) if last == k => lead,
        _ => candle_core::bail!("{op}: a {dims:?} input does not fit a ({n}, {k}) weight"),
    };
    let m: usize = lead.iter().product();
    let mut shape = lead.to_vec();
    shape.push(n);
    Ok(((m, n, k), Shape::from(shape)))
}

#[cfg(test)]
mod tests {
    use super::super::testing::max_diff;
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_product_on_odd_sizes_and_thread_counts() {
        let dev = Device::Cpu;
        // Rows below one thread's minimum, a split with a short last run, many runs; inputs
        // of rank 2 and 3.
        for &(lead, m, k, n) in &[
            (1, 5, 7, 3),
            (1, 130, 33, 17),
            (2, 301, 64, 40),
            (3, 1000, 19, 96),
        ] {
            let x = Tensor::randn(0f32, 1.0, (lead, m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let want = x
                .reshape((lead * m, k))
                .unwrap()
                .matmul(&w.t().unwrap())
                .unwrap()
                .reshape((lead, m, n))
                .unwrap();
            for threads in [1, 2, 3, 8] {
                let got = super::super::parallel::with_threads(threads, || linear(&x, &w).unwrap());
                assert_eq!(got.dims(), &[lead, m, n]);
                let diff = max_diff(&got, &want);
                assert!(
                    diff < 1e-4,
                    "{:?} threads {threads}: {diff}",
                    (lead, m, k, n)
                );
            }
        }
        let flat = Tensor::randn(0f32, 1.0, (70, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 9), &dev).unwrap();
        let diff = max_diff(
            &linear(&flat, &w).unwrap(),
            &flat.matmul(&w.t().unwrap()).unwrap(),
        );
        assert!(diff < 1e-4);
    }

    #[test]
    fn a_weight_that_does_not_fit_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 6), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).unwrap();
        let err = linear(&x, &w).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
