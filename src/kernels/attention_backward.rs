//! The backward pass of the fused attention, for training: per (image, head), blocks of
//! query rows recompute their scores and probabilities in a cache-sized buffer (the forward
//! kept none), then
//!
//!   dV += P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(P * dP)) * scale,
//!   dQ  = dS K,     dK += dS^T Q,
//!
//! the heads read and written in place in the (batch, tokens, heads * dim) layout. The
//! composed path it replaces materialised every score matrix several times over (scores,
//! probabilities, their gradients, and the zero-filled sums candle's autograd accumulates
//! them in) and copied each head out and back.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;

use super::attention::{row_max, Sizes};
use super::f32_slice;
use super::matmul::{product, Strided};
use super::parallel::{for_each_index_with, SharedMut};

/// Query rows per block, from the bytes of one of the block's two buffers (its
/// probabilities and their gradients, rows x keys each): together 512 KB per thread, which
/// should stay in the L2 cache.
const SCORE_BLOCK_BYTES: usize = 256 << 10;

/// (q, k, v) -> dq, dk and dv one after the other in one flat buffer, for the output
/// gradient `dout` (the same shape as q).
pub(super) struct AttentionBackward {
    pub heads: usize,
    pub dout: Tensor,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-backward"
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
        let q = f32_slice(qs, ql, "attention backward", "q")?;
        let k = f32_slice(ks, kl, "attention backward", "k")?;
        let v = f32_slice(vs, vl, "attention backward", "v")?;
        let (b, n, inner) = ql.shape().dims3()?;
        let m = kl.shape().dims3()?.1;
        if self.dout.dims() != ql.shape().dims() {
            candle_core::bail!(
                "attention backward: output gradient {:?} for queries {:?}",
                self.dout.dims(),
                ql.shape().dims()
            );
        }
        let (storage, layout) = self.dout.storage_and_layout();
        let Storage::Cpu(dout_storage) = &*storage else {
            candle_core::bail!("attention backward: the output gradient is not on the CPU");
        };
        let dout = f32_slice(
            dout_storage,
            layout,
            "attention backward",
            "output gradient",
        )?;
        let sizes = Sizes {
            b,
            n,
            m,
            heads: self.heads,
            d: inner / self.heads.max(1),
        };
        let rows = (SCORE_BLOCK_BYTES / (m.max(1) * 4)).clamp(1, n.max(1));
        let out = backward(q, k, v, dout, &sizes, rows);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// dq (b x n x inner), dk and dv (b x m x inner each), concatenated; query blocks of `rows`.
pub(super) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    sizes: &Sizes,
    rows: usize,
) -> Vec<f32> {
    let &Sizes { b, n, m, heads, d } = sizes;
    let inner = heads * d;
    let (q_len, kv_len) = (b * n * inner, b * m * inner);
    let mut out = vec![0f32; q_len + 2 * kv_len];
    if b * heads * n * m * d == 0 {
        // No queries, keys or channels: every gradient is zero.
        return out;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let rows = rows.clamp(1, n);
    let out_ptr = SharedMut::new(&mut out);
    // Per thread: one block's probabilities and their gradients, and the rows' P . dP.
    let init = || (vec![0f32; rows * m], vec![0f32; rows * m]);
    for_each_index_with(b * heads, init, |(p, dp), task| {
        let (img, h) = (task / heads, task % heads);
        let kv0 = img * m * inner + h * d;
        let (dq, dk, dv) = unsafe {
            let base = out_ptr.get();
            (base, base.add(q_len), base.add(q_len + kv_len))
        };
        for (blk, r0) in (0..n).step_by(rows).enumerate() {
            let len = rows.min(n - r0);
            let q0 = (img * n + r0) * inner + h * d;
            let first = blk == 0;
            // SAFETY: every view stays inside its buffer: the block's len rows of q, dout and
            // dq, all m rows of k, v, dk and dv, the head's d columns of each (row stride
            // inner); p and dp hold len x m. Only this task writes this head's columns of
            // dq, dk and dv.
            unsafe {
                // p (len x m) = q_blk . k^T, then softmax(scale * p) row by row.
                product(
                    (len, m, d),
                    Strided::rows(p.as_mut_ptr(), m),
                    false,
                    Strided::rows(q.as_ptr().add(q0), inner),
                    Strided::columns(k.as_ptr().add(kv0), inner),
                    Parallelism::None,
                );
                for row in p[..len * m].chunks_exact_mut(m) {
                    let max = row_max(row);
                    let inv = 1.0 / super::fast_math::exp_shifted_sum(row, max, scale);
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                // dv (m x d) += p^T (m x len) . dout_blk (len x d)
                product(
                    (m, d, len),
                    Strided::rows(dv.add(kv0), inner),
                    !first,
                    Strided::columns(p.as_ptr(), m),
                    Strided::rows(dout.as_ptr().add(q0), inner),
                    Parallelism::None,
                );
                // dp (len x m) = dout_blk (len x d) . v^T (d x m)
                product(
                    (len, m, d),
                    Strided::rows(dp.as_mut_ptr(), m),
                    false,
                    Strided::rows(dout.as_ptr().add(q0), inner),
                    Strided::columns(v.as_ptr().add(kv0), inner),
                    Parallelism::None,
                );
            }
            // ds = p * (dp - rowsum(p * dp)) * scale, in dp's place.
            for (pr, dr) in p[..len * m].chunks_exact(m).zip(dp.chunks_exact_mut(m)) {
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for (g, &pv) in dr.iter_mut().zip(pr) {
                    *g = pv * (*g - dot) * scale;
                }
            }
            // SAFETY: as above.
            unsafe {
                // dq_blk (len x d) = ds (len x m) . k (m x d)
                product(
                    (len, d, m),
                    Strided::rows(dq.add(q0), inner),
                    false,
                    Strided::rows(dp.as_ptr(), m),
                    Strided::rows(k.as_ptr().add(kv0), inner),
                    Parallelism::None,
                );
                // dk (m x d) += ds^T (m x len) . q_blk (len x d)
                product(
                    (m, d, len),
                    Strided::rows(dk.add(kv0), inner),
                    !first,
                    Strided::columns(dp.as_ptr(), m),
                    Strided::rows(q.as_ptr().add(q0), inner),
                    Parallelism::None,
                );
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The largest difference, NaN when either side has one (f32::max would skip it).
    fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).fold(0f32, |a, (x, y)| {
            let d = (x - y).abs();
            if d.is_nan() || a.is_nan() {
                f32::NAN
            } else {
                a.max(d)
            }
        })
    }

    /// Gradients of sum(attention(q, k, v) * w) through candle's composed ops.
    fn reference(q: &Var, k: &Var, v: &Var, w: &Tensor, heads: usize) -> [Vec<f32>; 3] {
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
        let (qh, kh, vh) = (
            split(q.as_tensor(), n),
            split(k.as_tensor(), m),
            split(v.as_tensor(), m),
        );
        let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        // candle's fused softmax has no backward pass; the composed one does.
        let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
        let out = probs
            .matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, inner))
            .unwrap();
        let grads = (out * w).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |x: &Var| {
            let g = grads.get(x.as_tensor()).unwrap();
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        [flat(q), flat(k), flat(v)]
    }

    #[test]
    fn gradients_match_the_composed_attention() {
        let dev = Device::Cpu;
        // (batch, queries, keys, heads, head dim, rows per block): one block, several with a
        // short last one, single-row blocks, cross-attention's few keys, one key.
        for &(b, n, m, heads, d, rows) in &[
            (2, 37, 37, 4, 10, 64),
            (1, 50, 23, 2, 16, 16),
            (2, 9, 77, 3, 8, 1),
            (1, 12, 1, 1, 5, 5),
            (3, 64, 64, 4, 32, 7),
        ] {
            let var = |len: usize, s: f32| Var::randn(0f32, s, (b, len, heads * d), &dev).unwrap();
            let (q, k, v) = (var(n, 1.5), var(m, 1.5), var(m, 1.0));
            let w = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let want = reference(&q, &k, &v, &w, heads);
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let sizes = Sizes { b, n, m, heads, d };
            let got = backward(
                &flat(q.as_tensor()),
                &flat(k.as_tensor()),
                &flat(v.as_tensor()),
                &flat(&w),
                &sizes,
                rows,
            );
            let (dq, rest) = got.split_at(b * n * heads * d);
            let (dk, dv) = rest.split_at(b * m * heads * d);
            for (name, got, want) in [
                ("dq", dq, &want[0]),
                ("dk", dk, &want[1]),
                ("dv", dv, &want[2]),
            ] {
                let diff = max_abs_diff(got, want);
                assert!(
                    diff < 1e-4,
                    "{name} {:?}: {diff}",
                    (b, n, m, heads, d, rows)
                );
            }
        }
    }

    #[test]
    fn autograd_through_the_fused_op_matches_the_composed_one() {
        let dev = Device::Cpu;
        let (b, n, m, heads, d) = (2, 40, 24, 2, 12);
        let var = |len: usize| Var::randn(0f32, 1.0, (b, len, heads * d), &dev).unwrap();
        let (q, k, v) = (var(n), var(m), var(m));
        let w = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
        let want = reference(&q, &k, &v, &w, heads);
        let out = super::super::attention::attention(&q, &k, &v, heads).unwrap();
        let grads = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (x, want) in [(&q, &want[0]), (&k, &want[1]), (&v, &want[2])] {
            let got = grads.get(x.as_tensor()).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let diff = max_abs_diff(&got, want);
            assert!(diff < 1e-4, "{diff}");
        }
    }

    #[test]
    fn no_queries_or_keys_give_zero_gradients() {
        let sizes = Sizes {
            b: 1,
            n: 3,
            m: 0,
            heads: 1,
            d: 4,
        };
        let got = backward(&[1.0; 12], &[], &[], &[1.0; 12], &sizes, 8);
        assert_eq!(got, vec![0.0; 12]);
    }
}
