//! Attention for narrow heads (every Stable Diffusion U-Net's 40 to 160 values per head),
//! 16 queries at a time held across the vector lanes. The scores are computed transposed,
//! one row of 16 per key (keys x 16 in a buffer that stays in cache), so that:
//! - a head's keys and values are packed once per thread and run of the head's query blocks
//!   (the tasks run blocks innermost), not once per block (a general
//!   matrix product repacks them for every block: that and its thin shapes held the blocked
//!   attention to about 55 GFLOP/s on SD 1.5's 64x64 self-attention here);
//! - the softmax over the keys runs down the columns: every max, exp and sum is a whole-vector
//!   operation, with no horizontal reductions;
//! - both products use a 6 x 16 register tile (six keys or six head channels against the 16
//!   queries), like a tuned matrix product's inner kernel.

use super::fast_math::exp_lanes;

/// Queries per block: two AVX2 vectors.
pub const LANES: usize = 16;
/// The widest head this kernel takes; wider ones (the VAE's single 512-wide head) take the
/// blocked matrix-product path, whose packing costs little beside their long rows (SD 1.5's
/// VAE attention: 337 ms blocked, 411 ms in lanes).
pub const MAX_HEAD_DIM: usize = 160;
/// Keys per pass of the value product: the chunk's probabilities (16 KB) and values stay in
/// the L1/L2 caches while every group of head channels reads them.
const KEY_CHUNK: usize = 256;

/// One thread's buffers: one head's keys and values packed contiguous (m x d each; read by
/// every query block of the head, and in the projections' layout a head's rows lie `heads * d`
/// apart, a stride the hardware prefetcher follows poorly), the block's scaled queries
/// (d x 16), its scores (keys x 16) and its output (d x 16), the last three transposed.
pub struct Scratch {
    keys: Vec<f32>,
    values: Vec<f32>,
    /// The element offset of the head whose keys and values are packed: meaningful within one
    /// attention call only (a scratch lives for one call's run of tasks).
    packed: Option<usize>,
    queries: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

impl Scratch {
    pub fn new(d: usize, m: usize) -> Self {
        Self {
            keys: vec![0.0; m * d],
            values: vec![0.0; m * d],
            packed: None,
            queries: vec![0.0; d * LANES],
            scores: vec![0.0; m * LANES],
            out: vec![0.0; d * LANES],
        }
    }

    /// Packs the keys and values of the head starting at element `kv0` (rows `stride` apart)
    /// unless they are the ones already packed.
    fn pack(&mut self, k: &[f32], v: &[f32], kv0: usize, stride: usize, d: usize) {
        if self.packed == Some(kv0) {
            return;
        }
        let rows = self
            .keys
            .chunks_exact_mut(d)
            .zip(self.values.chunks_exact_mut(d));
        for (j, (kr, vr)) in rows.enumerate() {
            let at = kv0 + j * stride;
            kr.copy_from_slice(&k[at..at + d]);
            vr.copy_from_slice(&v[at..at + d]);
        }
        self.packed = Some(kv0);
    }
}

/// Where one (image, head, query block) reads and writes: element offsets of its first query
/// row and of its head's first key row (the head's first column), and the row stride.
pub struct Block {
    pub q0: usize,
    pub rows: usize,
    pub kv0: usize,
    pub keys: usize,
    pub d: usize,
    /// Distance between rows of q, k, v and the output (heads * d).
    pub stride: usize,
    pub scale: f32,
}

/// softmax(q k^T * scale) v for the block's (at most 16) query rows; `fast` asks for the
/// AVX2 kernels, which run only where [`fast_available`] says so.
///
/// # Safety
/// q and out must hold rows `q0 / stride .. + rows` and k, v rows `kv0 / stride .. + keys`,
/// each `d` values from the given offset; no other thread may write those output elements.
pub unsafe fn block(
    s: &mut Scratch,
    b: &Block,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: *mut f32,
    fast: bool,
) {
    let (d, m, stride) = (b.d, b.keys, b.stride);
    let fast = fast && fast_available();
    debug_assert!(b.rows <= LANES && d <= MAX_HEAD_DIM);
    debug_assert!(b.q0 + (b.rows.max(1) - 1) * stride + d <= q.len());
    debug_assert!(b.kv0 + (m.max(1) - 1) * stride + d <= k.len().min(v.len()));
    for c in 0..d {
        let lanes = &mut s.queries[c * LANES..(c + 1) * LANES];
        for (i, x) in lanes.iter_mut().enumerate() {
            *x = if i < b.rows {
                q[b.q0 + i * stride + c] * b.scale
            } else {
                0.0
            };
        }
    }
    s.pack(k, v, b.kv0, stride, d);
    let scores = &mut s.scores[..m * LANES];
    let mut max = [f32::NEG_INFINITY; LANES];
    scores_t(
        fast,
        s.keys.as_ptr(),
        m,
        d,
        s.queries.as_ptr(),
        scores.as_mut_ptr(),
        &mut max,
    );
    let mut sums = [0f32; LANES];
    exp_lanes(scores, &max, &mut sums);
    let o = &mut s.out[..d * LANES];
    o.fill(0.0);
    for j0 in (0..m).step_by(KEY_CHUNK) {
        let keys = KEY_CHUNK.min(m - j0);
        values_t(
            fast,
            s.values.as_ptr().add(j0 * d),
            keys,
            d,
            scores.as_ptr().add(j0 * LANES),
            o.as_mut_ptr(),
        );
    }
    for i in 0..b.rows {
        let inv = 1.0 / sums[i];
        let row = out.add(b.q0 + i * stride);
        for c in 0..d {
            *row.add(c) = o[c * LANES + i] * inv;
        }
    }
}

/// Whether the vector kernels run here (AVX2 and FMA); otherwise the portable loops do.
pub fn fast_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// scores[j][0..16] = sum_c k[j][c] queries[c][0..16] for keys j < m (packed rows of d),
/// and each lane's largest score into `max`.
unsafe fn scores_t(
    fast: bool,
    k: *const f32,
    m: usize,
    d: usize,
    queries: *const f32,
    scores: *mut f32,
    max: &mut [f32; LANES],
) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        return avx2::scores(k, m, d, queries, scores, max);
    }
    let _ = fast;
    for j in 0..m {
        let mut acc = [0f32; LANES];
        for c in 0..d {
            let kv = *k.add(j * d + c);
            let qrow = std::slice::from_raw_parts(queries.add(c * LANES), LANES);
            for (a, &x) in acc.iter_mut().zip(qrow) {
                *a += kv * x;
            }
        }
        std::ptr::copy_nonoverlapping(acc.as_ptr(), scores.add(j * LANES), LANES);
        for (mx, &x) in max.iter_mut().zip(&acc) {
            *mx = mx.max(x);
        }
    }
}

/// out[c][0..16] += sum_j v[j][c] p[j][0..16] over `keys` keys (packed rows of d).
unsafe fn values_t(fast: bool, v: *const f32, keys: usize, d: usize, p: *const f32, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        return avx2::values(v, keys, d, p, out);
    }
    let _ = fast;
    for c in 0..d {
        let acc = std::slice::from_raw_parts_mut(out.add(c * LANES), LANES);
        for j in 0..keys {
            let vv = *v.add(j * d + c);
            let prow = std::slice::from_raw_parts(p.add(j * LANES), LANES);
            for (a, &x) in acc.iter_mut().zip(prow) {
                *a += vv * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// Keys (or head channels) per register tile: 6 x 2 accumulators, 2 vectors of the
    /// 16-lane operand and a broadcast fill 15 of the 16 AVX2 registers.
    const TILE: usize = 6;

    /// R keys' scores from R rows of k (R <= 6), and their maxima folded into `max`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn score_rows<const R: usize>(
        k: *const f32,
        d: usize,
        queries: *const f32,
        scores: *mut f32,
        max: &mut [__m256; 2],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..d {
            let q0 = _mm256_loadu_ps(queries.add(c * LANES));
            let q1 = _mm256_loadu_ps(queries.add(c * LANES + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let kv = _mm256_broadcast_ss(&*k.add(r * d + c));
                a[0] = _mm256_fmadd_ps(kv, q0, a[0]);
                a[1] = _mm256_fmadd_ps(kv, q1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(scores.add(r * LANES), a[0]);
            _mm256_storeu_ps(scores.add(r * LANES + 8), a[1]);
            max[0] = _mm256_max_ps(max[0], a[0]);
            max[1] = _mm256_max_ps(max[1], a[1]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(
        k: *const f32,
        m: usize,
        d: usize,
        queries: *const f32,
        scores: *mut f32,
        lane_max: &mut [f32; LANES],
    ) {
        let mut max = [
            _mm256_loadu_ps(lane_max.as_ptr()),
            _mm256_loadu_ps(lane_max.as_ptr().add(8)),
        ];
        let mut j = 0;
        while j + TILE <= m {
            let (kt, st) = (k.add(j * d), scores.add(j * LANES));
            score_rows::<TILE>(kt, d, queries, st, &mut max);
            j += TILE;
        }
        let (k, s, mx) = (k.add(j * d), scores.add(j * LANES), &mut max);
        match m - j {
            0 => {}
            1 => score_rows::<1>(k, d, queries, s, mx),
            2 => score_rows::<2>(k, d, queries, s, mx),
            3 => score_rows::<3>(k, d, queries, s, mx),
            4 => score_rows::<4>(k, d, queries, s, mx),
            _ => score_rows::<5>(k, d, queries, s, mx),
        }
        _mm256_storeu_ps(lane_max.as_mut_ptr(), max[0]);
        _mm256_storeu_ps(lane_max.as_mut_ptr().add(8), max[1]);
    }

    /// R head channels' outputs (from column `c` of v, R <= 6) accumulated over `keys` keys.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn value_rows<const R: usize>(
        v: *const f32,
        d: usize,
        keys: usize,
        p: *const f32,
        out: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            a[0] = _mm256_loadu_ps(out.add(r * LANES));
            a[1] = _mm256_loadu_ps(out.add(r * LANES + 8));
        }
        for j in 0..keys {
            let p0 = _mm256_loadu_ps(p.add(j * LANES));
            let p1 = _mm256_loadu_ps(p.add(j * LANES + 8));
            let row = v.add(j * d);
            for (r, a) in acc.iter_mut().enumerate() {
                let vv = _mm256_broadcast_ss(&*row.add(r));
                a[0] = _mm256_fmadd_ps(vv, p0, a[0]);
                a[1] = _mm256_fmadd_ps(vv, p1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * LANES), a[0]);
            _mm256_storeu_ps(out.add(r * LANES + 8), a[1]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn values(
        v: *const f32,
        keys: usize,
        d: usize,
        p: *const f32,
        out: *mut f32,
    ) {
        let mut c = 0;
        while c + TILE <= d {
            value_rows::<TILE>(v.add(c), d, keys, p, out.add(c * LANES));
            c += TILE;
        }
        let (v, o) = (v.add(c), out.add(c * LANES));
        match d - c {
            0 => {}
            1 => value_rows::<1>(v, d, keys, p, o),
            2 => value_rows::<2>(v, d, keys, p, o),
            3 => value_rows::<3>(v, d, keys, p, o),
            4 => value_rows::<4>(v, d, keys, p, o),
            _ => value_rows::<5>(v, d, keys, p, o),
        }
    }
}
