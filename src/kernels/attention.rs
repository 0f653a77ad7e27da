//! Scaled dot-product attention for inference, fused: per (image, head) and block of query
//! rows, the block's scores against every key are computed into a scratch buffer that stays
//! in cache, turned into probabilities there, and multiplied by the values. The score matrix
//! of a head (SD 1.5 at 512x512: 4096 x 4096 floats, 64 MB, 16 of them per layer) is never
//! written to memory, and the heads are read in place from the (batch, tokens, heads * dim)
//! projections, without the transposed copies. Narrow heads (up to 160 values: the U-Nets')
//! run in `attention_lanes`, 16 queries per block with transposed scores; wide ones (the VAE's)
//! as two matrix products per block of rows. Unmasked (masked attention, the text encoder's
//! causal one, takes the composed path in `nn`); the backward pass for training is in
//! `attention_backward`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use super::attention_backward::AttentionBackward;
use super::attention_lanes::{self, LANES, MAX_HEAD_DIM};
use super::f32_slice;
use super::matmul::{product, Strided};
use super::parallel::{for_each_index_with, SharedMut};

/// Query rows per block, from the block's scores (rows x keys), which should fit in the L2
/// cache; fewer rows per block repack the keys and values more often.
const SCORE_BLOCK_BYTES: usize = 512 << 10;

/// The fewest queries for which narrow heads take the lane kernel: measured on SD 1.5's
/// shapes (batch 2, 8 heads), lanes against blocks: 4096 queries x 40 per head 485 vs 779 ms,
/// 1024 x 80 56 vs 67 ms, 1024 x 160 56 vs 71 ms, but 256 x 160 7.6 vs 6.2 ms.
const MIN_QUERIES_FOR_LANES: usize = 512;

/// softmax(q k^T / sqrt(d)) v per head; q (b, n, heads * d), k and v (b, m, heads * d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    for t in [q, k, v] {
        super::require_supported(t, "attention")?;
    }
    let (b, _, inner) = q.dims3()?;
    let (kb, m, k_inner) = k.dims3()?;
    if heads == 0
        || inner % heads != 0
        || (kb, k_inner) != (b, inner)
        || v.dims3()? != (b, m, inner)
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if inner == 0 {
        return q.zeros_like();
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = Attention { heads };
    if q.track_op() || k.track_op() || v.track_op() {
        q.apply_op3(&k, &v, op)
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)
    }
}

struct Attention {
    heads: usize,
}

/// The largest of a row (eight running maxima, so the loop vectorises).
#[inline(always)]
fn row_max_generic(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

dispatch!(row_max, row_max_generic, (row: &[f32]) -> f32);

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32_slice(qs, ql, "attention", "q")?;
        let k = f32_slice(ks, kl, "attention", "k")?;
        let v = f32_slice(vs, vl, "attention", "v")?;
        let (b, n, inner) = ql.shape().dims3()?;
        let m = kl.shape().dims3()?.1;
        let sizes = Sizes {
            b,
            n,
            m,
            heads: self.heads,
            d: inner / self.heads,
        };
        // Short sequences (SD 1.5's 16x16 level: 256 queries) pack little per head, and there
        // the matrix product's inner kernel is the faster one.
        let lanes = match requested_path() {
            Some(Path::Blocked) => false,
            Some(Path::Lanes) => sizes.d <= MAX_HEAD_DIM,
            None => sizes.d <= MAX_HEAD_DIM && sizes.n >= MIN_QUERIES_FOR_LANES,
        };
        let out = if lanes {
            attend_in_lanes(q, k, v, &sizes, attention_lanes::fast_available())
        } else {
            attend_in_blocks(q, k, v, &sizes)
        };
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionBackward {
            heads: self.heads,
            dout: grad.contiguous()?,
        };
        let flat = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = flat.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = flat.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = flat
            .narrow(0, nq + nk, v.elem_count())?
            .reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The problem's sizes: images, queries, keys, heads and values per head.
pub(super) struct Sizes {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub d: usize,
}

#[derive(Clone, Copy)]
enum Path {
    Lanes,
    Blocked,
}

/// `TEXT2IMG_ATTENTION=blocked` sends every head through the blocked matrix-product path,
/// `lanes` every head narrow enough through the lane kernel (for comparisons).
fn requested_path() -> Option<Path> {
    static PATH: std::sync::OnceLock<Option<Path>> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("TEXT2IMG_ATTENTION").as_deref() {
        Ok("blocked") => Some(Path::Blocked),
        Ok("lanes") => Some(Path::Lanes),
        _ => None,
    })
}

/// Where one task of the split reads and writes: `rows` query rows from element `q0` of q
/// (and of the output), against the head whose first key row starts at element `kv0`.
struct Task {
    q0: usize,
    kv0: usize,
    rows: usize,
}

/// Runs `f` for every (image, head, block of `rows` query rows) over the threads, with one
/// `init()` state per run of tasks, and returns the output `f` writes through the pointer
/// (each task its own rows of its head's columns; all zero when there are no keys).
fn for_each_block<S>(
    sizes: &Sizes,
    rows: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, Task, SharedMut) + Sync,
) -> Vec<f32> {
    let &Sizes { b, n, m, heads, d } = sizes;
    let inner = heads * d;
    let blocks = n.div_ceil(rows.max(1));
    let tasks = b * heads * blocks;
    let mut out = super::parallel::zeroed(b * n * inner);
    if tasks == 0 || m == 0 {
        return out;
    }
    let out_ptr = SharedMut::new(&mut out);
    for_each_index_with(tasks, init, |state, task| {
        let (img, rest) = (task / (heads * blocks), task % (heads * blocks));
        let (h, blk) = (rest / blocks, rest % blocks);
        let r0 = blk * rows;
        let at = Task {
            q0: (img * n + r0) * inner + h * d,
            kv0: img * m * inner + h * d,
            rows: rows.min(n - r0),
        };
        f(state, at, out_ptr);
    });
    out
}

/// Narrow heads: per (image, head) and block of 16 queries, the transposed-score kernel.
fn attend_in_lanes(q: &[f32], k: &[f32], v: &[f32], sizes: &Sizes, fast: bool) -> Vec<f32> {
    let &Sizes { m, heads, d, .. } = sizes;
    let scale = 1.0 / (d as f32).sqrt();
    let init = || attention_lanes::Scratch::new(d, m);
    for_each_block(sizes, LANES, init, |scratch, at, out| {
        let block = attention_lanes::Block {
            q0: at.q0,
            rows: at.rows,
            kv0: at.kv0,
            keys: m,
            d,
            stride: heads * d,
            scale,
        };
        // SAFETY: the block's rows of q and out and all m rows of k and v lie inside their
        // buffers, d columns from the head's first; this task alone writes those elements.
        unsafe { attention_lanes::block(scratch, &block, q, k, v, out.get(), fast) };
    })
}

/// Wide heads: per (image, head) and block of query rows, two matrix products around a
/// softmax in a cache-sized score buffer.
fn attend_in_blocks(q: &[f32], k: &[f32], v: &[f32], sizes: &Sizes) -> Vec<f32> {
    let &Sizes { n, m, heads, d, .. } = sizes;
    let inner = heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    // At least d rows: each block repacks the keys and values (m x d each), which for
    // wide heads (the VAE's single 512-wide head) costs as much as a small block's
    // products; SD 1.5's VAE attention at 512x512 ran 2.4x faster with 512 rows than 32.
    let rows = (SCORE_BLOCK_BYTES / (m.max(1) * 4))
        .max(d)
        .clamp(1, n.max(1));
    // Per thread: one block's scores and its rows' sums.
    let init = || (vec![0f32; rows * m], Vec::with_capacity(rows));
    for_each_block(sizes, rows, init, |(scores, sums), at, out_ptr| {
        let Task { q0, kv0, rows: len } = at;
        // SAFETY: every view stays inside its tensor: the task's len rows of q and out, all
        // m rows of k and v, the head's d columns of each (row stride inner); scores holds
        // len x m. This task alone writes those rows and columns of out.
        unsafe {
            // scores (len x m) = q_blk (len x d) . k^T (d x m)
            product(
                (len, m, d),
                Strided::rows(scores.as_mut_ptr(), m),
                false,
                Strided::rows(q.as_ptr().add(q0), inner),
                Strided::columns(k.as_ptr().add(kv0), inner),
                Parallelism::None,
            );
        }
        sums.clear();
        for row in scores[..len * m].chunks_exact_mut(m) {
            let max = row_max(row);
            sums.push(super::fast_math::exp_shifted_sum(row, max, scale));
        }
        unsafe {
            // out_blk (len x d) = p (len x m) . v (m x d)
            product(
                (len, d, m),
                Strided::rows(out_ptr.get().add(q0), inner),
                false,
                Strided::rows(scores.as_ptr(), m),
                Strided::rows(v.as_ptr().add(kv0), inner),
                Parallelism::None,
            );
            for (r, &sum) in sums.iter().enumerate() {
                let inv = 1.0 / sum;
                let row = std::slice::from_raw_parts_mut(out_ptr.get().add(q0 + r * inner), d);
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The composed reference: per head, softmax(q k^T / sqrt(d)) v in f32 with candle's ops.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let (b, n, inner) = q.dims3().unwrap();
        let m = k.dim(1).unwrap();
        let d = inner / heads;
        let split = |x: &Tensor, len: usize| {
            x.reshape((b, len, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q, n), split(k, m), split(v, m));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, inner))
            .unwrap()
    }

    #[test]
    fn matches_the_composed_attention_on_odd_sizes() {
        let dev = Device::Cpu;
        // (batch, queries, keys, heads, head dim): self- and cross-attention shapes, odd
        // token counts, one head, and more query rows than one block holds.
        for &(b, n, m, heads, d) in &[
            (2, 37, 37, 4, 10),
            (1, 64, 77, 8, 40),
            (3, 5, 1, 1, 8),
            (1, 300, 700, 2, 16),
            // A wide single head (the VAE's): blocks of d = 160 rows, more than the score
            // budget alone would give, the last block short.
            (1, 350, 1000, 1, 160),
            // Wider than the lane kernel takes; SD 1.5's 40-wide heads over 4096 keys with
            // a short last block; key and channel counts leaving each tile remainder (keys
            // mod 6: 0-5, channels mod 6: 0-5), one key past a chunk, exactly one chunk.
            (1, 40, 90, 1, 200),
            (1, 4099, 300, 2, 40),
            (2, 17, 257, 3, 11),
            (1, 33, 6, 2, 5),
            (1, 20, 8, 2, 13),
            (1, 18, 9, 1, 3),
            (1, 16, 256, 1, 12),
        ] {
            let q = Tensor::randn(0f32, 1.5, (b, n, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.5, (b, m, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (b, m, heads * d), &dev).unwrap();
            let want = reference(&q, &k, &v, heads);
            let ours = attention(&q, &k, &v, heads).unwrap();
            let diff = crate::kernels::testing::max_diff(&ours, &want);
            assert!(
                diff < 2e-5,
                "{:?}: max difference {diff}",
                (b, n, m, heads, d)
            );
            // Every path on every shape, whichever one `attention` picked.
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (qv, kv, vv) = (flat(&q), flat(&k), flat(&v));
            let sizes = Sizes { b, n, m, heads, d };
            let mut paths = vec![("blocked", attend_in_blocks(&qv, &kv, &vv, &sizes))];
            if d <= MAX_HEAD_DIM {
                paths.push(("lanes", attend_in_lanes(&qv, &kv, &vv, &sizes, false)));
                if attention_lanes::fast_available() {
                    paths.push(("lanes avx2", attend_in_lanes(&qv, &kv, &vv, &sizes, true)));
                }
            }
            let want = flat(&want);
            for (name, got) in paths {
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 2e-5, "{name} {:?}: {diff}", (b, n, m, heads, d));
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_the_heads_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 12), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 5, 8), candle_core::DType::F32, &dev).unwrap();
        let err = attention(&q, &k, &k, 4).unwrap_err().to_string();
        assert!(err.contains("do not fit 4 heads"), "{err}");
        assert!(attention(&q, &q, &q, 5).is_err());
        let empty = Tensor::zeros((1, 600, 0), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(
            attention(&empty, &empty, &empty, 2).unwrap().dims(),
            &[1, 600, 0]
        );
    }
}
