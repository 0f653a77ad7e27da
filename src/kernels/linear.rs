//! The f32 product of a linear layer at inference, x (m x k) . w (k x n), with its rows split
//! over the threads: each thread multiplies its own run of rows in one single-threaded
//! product. `gemm`'s own threading splits every block of the product over the threads and
//! waits for all of them before the next, once per block; a U-Net's linear layers are many
//! medium-sized products (4096 x 320 x 320 and the like), where those waits are a large part
//! of the work. Here the threads never wait for one another and each packs its own copy of
//! the weight's blocks (k x n values, small next to its rows' m / threads x k x n products).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use super::matmul::{product, Strided};

/// Fewest rows a thread takes: below this the micro-kernels' row tiles run mostly empty and
/// the weight packing is no longer small beside the products.
const MIN_ROWS_PER_THREAD: usize = 64;

/// Whether linear layers take the row split (`TEXT2IMG_LINEAR=gemm` keeps `gemm`'s own
/// threading, for comparisons). Read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TEXT2IMG_LINEAR").map_or(true, |v| v != "gemm"))
}

/// `x . w` for f32 `x` (.., k) and a row-major f32 `w` (k, n); the result is (.., n).
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
        let (k, n) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: a {dims:?} input does not fit a ({k}, {n}) weight");
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("the input has a last dimension") = n;
        let mut y = super::parallel::zeroed(m * n);
        if m * n == 0 {
            return Ok((CpuStorage::F32(y), Shape::from(shape)));
        }
        let threads = super::parallel::threads_for(m / MIN_ROWS_PER_THREAD);
        let rows = m.div_ceil(threads);
        // One run of rows per thread; with one run, gemm's own threading over this thread's
        // share of the cores (a product too short to split by rows, e.g. a middle block's).
        let parallelism = if threads == 1 {
            match super::parallel::threads_for(usize::MAX) {
                1 => Parallelism::None,
                t => Parallelism::Rayon(t),
            }
        } else {
            Parallelism::None
        };
        super::parallel::for_each_chunk(&mut y, rows * n, |i, out| {
            let len = out.len() / n;
            // SAFETY: out is rows i*rows .. i*rows + len of y (row-major, n columns); those
            // rows of x lie within its m x k values, and w is k x n.
            unsafe {
                product(
                    (len, n, k),
                    Strided::rows(out.as_mut_ptr(), n),
                    false,
                    Strided::rows(x.as_ptr().add(i * rows * k), k),
                    Strided::rows(w.as_ptr(), n),
                    parallelism,
                );
            }
        });
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
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
            let w = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
            let want = x
                .reshape((lead * m, k))
                .unwrap()
                .matmul(&w)
                .unwrap()
                .reshape((lead, m, n))
                .unwrap();
            for threads in [1, 2, 3, 8] {
                let got = super::super::parallel::with_threads(threads, || linear(&x, &w).unwrap());
                assert_eq!(got.dims(), &[lead, m, n]);
                let diff = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-4,
                    "{:?} threads {threads}: {diff}",
                    (lead, m, k, n)
                );
            }
        }
        let flat = Tensor::randn(0f32, 1.0, (70, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (9, 4), &dev).unwrap();
        let diff = (linear(&flat, &w).unwrap() - flat.matmul(&w).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4);
    }

    #[test]
    fn a_weight_that_does_not_fit_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 6), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 2), candle_core::DType::F32, &dev).unwrap();
        let err = linear(&x, &w).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
