//! Matrix products on strided views of raw buffers, through the `gemm` crate: the kernels
//! multiply sub-matrices in place (one head's columns, one Winograd position's rows) without
//! copying them out first.

use gemm::Parallelism;

/// A matrix in memory: its first element and the distance between rows (`rows`: row-major)
/// or between columns (`columns`: the transpose of a row-major matrix).
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
