//! Matrix products on strided views of raw buffers, through the `gemm` crate: the kernels
//! multiply sub-matrices in place (one head's columns, one Winograd position's rows) without
//! copying them out first.

use gemm::Parallelism;

/// A matrix in memory: its first element and the distance between rows (`rows`: row-major)
/// or between columns (`columns`: the transpose of a row-major matrix).
#[derive(Clone, Copy)]
pub(super) struct Strided<P> {
    pub(super) ptr: P,
    pub(super) row_stride: isize,
    pub(super) col_stride: isize,
}

impl<P> Strided<P> {
    /// Row-major, `stride` values from one row's start to the next.
    pub(super) fn rows(ptr: P, stride: usize) -> Self {
        Self {
            ptr,
            row_stride: stride as isize,
            col_stride: 1,
        }
    }

    /// Column-major, `stride` values from one column's start to the next.
    pub(super) fn columns(ptr: P, stride: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: stride as isize,
        }
    }
}

/// A raw pointer that a view can be moved along (read-only or writable).
pub(super) trait Pointer: Copy {
    /// # Safety
    /// As `pointer::offset`.
    unsafe fn offset_by(self, count: isize) -> Self;
}

impl Pointer for *const f32 {
    unsafe fn offset_by(self, count: isize) -> Self {
        self.offset(count)
    }
}

impl Pointer for *mut f32 {
    unsafe fn offset_by(self, count: isize) -> Self {
        self.offset(count)
    }
}

impl<P: Pointer> Strided<P> {
    /// The sub-matrix starting `rows` rows and `cols` columns further in.
    ///
    /// # Safety
    /// That element must lie within the matrix's buffer.
    unsafe fn shifted(self, rows: usize, cols: usize) -> Self {
        let at = rows as isize * self.row_stride + cols as isize * self.col_stride;
        Self {
            ptr: self.ptr.offset_by(at),
            ..self
        }
    }
}

/// A product's three views, moved into the tasks of [`product_split`].
#[derive(Clone, Copy)]
struct Views {
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
}

// SAFETY: the views only carry addresses between threads; each task of `product_split`
// writes its own rows (or columns) of dst and only reads lhs and rhs.
unsafe impl Send for Views {}
unsafe impl Sync for Views {}

impl Views {
    /// Through a method, so closures capture the whole (Send) wrapper, not its raw fields.
    fn get(self) -> (Strided<*mut f32>, Strided<*const f32>, Strided<*const f32>) {
        (self.dst, self.lhs, self.rhs)
    }
}

/// dst (m x n) = lhs (m x k) . rhs (k x n), added to dst when `accumulate`.
///
/// # Safety
/// Every element the three views address for these sizes must be in bounds, and dst must not
/// overlap lhs or rhs.
pub(super) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    parallelism: Parallelism,
) {
    // With lhs row-major and rhs column-major (a layer's weight read as stored), gemm takes
    // other code for a single row or a tiny product (m * n <= 256): dot products whose sums
    // run in another order than its kernels'. A row's result would then depend on how many
    // rows share the product (a U-Net's shards, a batch of one against two), so such products
    // run with zero rows added past those sizes.
    if rhs.row_stride == 1 && lhs.col_stride == 1 && m > 0 && (m <= 1 || m * n <= 256) {
        let rows = (256 / n.max(1) + 1).max(2);
        let mut a = vec![0f32; rows * k];
        let mut c = vec![0f32; rows * n];
        for i in 0..m {
            for j in 0..k {
                a[i * k + j] = *lhs.ptr.offset(i as isize * lhs.row_stride + j as isize);
            }
            if accumulate {
                for j in 0..n {
                    c[i * n + j] = *dst
                        .ptr
                        .offset(i as isize * dst.row_stride + j as isize * dst.col_stride);
                }
            }
        }
        product(
            (rows, n, k),
            Strided::rows(c.as_mut_ptr(), n),
            accumulate,
            Strided::rows(a.as_ptr(), k),
            rhs,
            Parallelism::None,
        );
        for i in 0..m {
            for j in 0..n {
                *dst.ptr
                    .offset(i as isize * dst.row_stride + j as isize * dst.col_stride) =
                    c[i * n + j];
            }
        }
        return;
    }
    // gemm computes dst = alpha * dst + beta * lhs . rhs, reading dst only when asked.
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.col_stride,
        dst.row_stride,
        accumulate,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        parallelism,
    );
}

/// Fewest rows (or columns) of dst one thread of [`product_split`] takes: below this the
/// micro-kernels' tiles run mostly empty and packing the other operand is no longer small
/// beside the thread's share of the products.
const MIN_SPLIT: usize = 64;

/// [`product`] on `threads` threads without `gemm`'s threading, which splits every block of
/// the product over the threads and waits for all of them before the next, once per block:
/// for the medium-sized products of a U-Net's layers those waits are a large part of the work.
/// Here the longer side of dst is split into one run per thread, each a single-threaded
/// product; the threads never wait for one another, and each packs its own copy of the other
/// operand's blocks (small beside its share of the products). Too short to split, the product
/// takes `gemm`'s threading, as every product does with `TEXT2IMG_SPLIT=gemm` (for
/// comparisons).
///
/// # Safety
/// As [`product`].
pub(super) unsafe fn product_split(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    threads: usize,
) {
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let parts = if split_enabled() {
        threads.min(len / MIN_SPLIT).max(1)
    } else {
        1
    };
    if parts == 1 {
        let parallelism = match threads {
            0 | 1 => Parallelism::None,
            t => Parallelism::Rayon(t),
        };
        return product((m, n, k), dst, accumulate, lhs, rhs, parallelism);
    }
    let per = len.div_ceil(parts);
    let views = Views { dst, lhs, rhs };
    rayon::scope(|scope| {
        for start in (0..len).step_by(per) {
            scope.spawn(move |_| {
                let (dst, lhs, rhs) = views.get();
                let count = per.min(len - start);
                // SAFETY: each task's run of dst's rows (or columns) is its own, and the
                // views address sub-matrices of the caller's (in bounds by its contract).
                unsafe {
                    if by_rows {
                        let (dst, lhs) = (dst.shifted(start, 0), lhs.shifted(start, 0));
                        product((count, n, k), dst, accumulate, lhs, rhs, Parallelism::None);
                    } else {
                        let (dst, rhs) = (dst.shifted(0, start), rhs.shifted(0, start));
                        product((m, count, k), dst, accumulate, lhs, rhs, Parallelism::None);
                    }
                }
            });
        }
    });
}

/// False with `TEXT2IMG_SPLIT=gemm`. Read once.
fn split_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TEXT2IMG_SPLIT").map_or(true, |v| v != "gemm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's product with a column-major weight is the same bits however many rows share
    /// the product (one, a few, a tiny m * n, many), and what the definition gives.
    #[test]
    fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
        for (n, k) in [(4, 7), (40, 33), (300, 20), (7, 129)] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
                .collect();
            let x: Vec<f32> = (0..200 * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0)
                .collect();
            let run = |m: usize, accumulate: bool| {
                let mut y = vec![0.5f32; m * n];
                // SAFETY: x has at least m rows of k, w is n x k, y m x n.
                unsafe {
                    product(
                        (m, n, k),
                        Strided::rows(y.as_mut_ptr(), n),
                        accumulate,
                        Strided::rows(x.as_ptr(), k),
                        Strided::columns(w.as_ptr(), k),
                        Parallelism::None,
                    );
                }
                y
            };
            let many = run(200, false);
            let w_t: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let want = reference(200, n, k, &x, &w_t);
            for (got, want) in many.iter().zip(&want) {
                assert!((got - want).abs() < 1e-3, "{n} {k}: {got} vs {want}");
            }
            for m in [1, 2, 3, 5] {
                assert_eq!(run(m, false), many[..m * n], "{n} {k}: {m} rows");
                let added: Vec<f32> = many[..m * n].iter().map(|v| v + 0.5).collect();
                assert_eq!(run(m, true), added, "{n} {k}: {m} rows, accumulated");
            }
        }
    }

    /// dst = lhs . rhs by the definition, for row-major operands.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn split_products_match_the_definition() {
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        // Split by rows, by columns (a short last run each), too short to split; 1-5 threads;
        // overwriting and accumulating.
        for &(m, n, k) in &[(300, 40, 17), (30, 259, 9), (20, 30, 5), (128, 128, 64)] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let want = reference(m, n, k, &a, &b);
            for threads in 1..=5 {
                for accumulate in [false, true] {
                    let mut dst = vec![if accumulate { 1.0 } else { f32::NAN }; m * n];
                    unsafe {
                        product_split(
                            (m, n, k),
                            Strided::rows(dst.as_mut_ptr(), n),
                            accumulate,
                            Strided::rows(a.as_ptr(), k),
                            Strided::rows(b.as_ptr(), n),
                            threads,
                        );
                    }
                    let offset = if accumulate { 1.0 } else { 0.0 };
                    for (i, (g, w)) in dst.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w - offset).abs() < 1e-4,
                            "{:?} threads {threads} accumulate {accumulate} at {i}: {g} vs {w}",
                            (m, n, k)
                        );
                    }
                }
            }
        }
    }
}
