//! GroupNorm, optionally fused with the SiLU that follows it in every U-Net and VAE block, as
//! one candle op with its own backward pass. candle composes GroupNorm from a dozen ops whose
//! backward passes are broadcast reductions along strided axes; here each (image, group) is one
//! pass over contiguous memory, forward and backward, and the normalised tensor is never kept.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::parallel::for_each_chunk;
use super::{f32_slice, moments};

/// Values normalised, then passed through the SiLU, at a time: 8 KiB, well inside L1.
const BLOCK: usize = 2048;

#[derive(Clone, Copy, Debug)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// (batch, channels, spatial size) of an input of rank >= 3.
fn dims(shape: &Shape, groups: usize) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 3 {
        candle_core::bail!("group_norm: input rank must be at least 3, got {shape:?}");
    }
    let (b, c) = (d[0], d[1]);
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels cannot be split into {groups} groups");
    }
    Ok((b, c, d[2..].iter().product()))
}

/// (sum(gz), sum(gz * xhat)) over one channel, xhat = (x - mean) * rstd, accumulated in
/// eight f32 lanes per quantity (so the loop vectorises; each lane sums an eighth of the
/// channel) whose totals are then added in f64.
#[inline(always)]
fn channel_sums_generic(gz: &[f32], x: &[f32], mean: f32, rstd: f32) -> (f64, f64) {
    let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
    let (gc, xc) = (gz.chunks_exact(8), x.chunks_exact(8));
    let (gr, xr) = (gc.remainder(), xc.remainder());
    for (g8, x8) in gc.zip(xc) {
        for j in 0..8 {
            a[j] += g8[j];
            b[j] += g8[j] * ((x8[j] - mean) * rstd);
        }
    }
    let mut sums = (0f64, 0f64);
    for (&g, &xv) in gr.iter().zip(xr) {
        sums.0 += g as f64;
        sums.1 += (g * ((xv - mean) * rstd)) as f64;
    }
    for j in 0..8 {
        sums.0 += a[j] as f64;
        sums.1 += b[j] as f64;
    }
    sums
}

dispatch!(channel_sums, channel_sums_generic, (gz: &[f32], x: &[f32], mean: f32, rstd: f32) -> (f64, f64));

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, s) = dims(xl.shape(), self.groups)?;
        let (x, w, bias) = (
            f32_slice(xs, xl, "group_norm", "input")?,
            f32_slice(ws, wl, "group_norm", "weight")?,
            f32_slice(bs, bl, "group_norm", "bias")?,
        );
        if w.len() != c || bias.len() != c {
            candle_core::bail!("group_norm: weight and bias must have {c} elements");
        }
        let cg = c / self.groups;
        let group_len = cg * s;
        let mut out = super::parallel::zeroed(b * c * s);
        for_each_chunk(&mut out, group_len, |i, dst| {
            let src = &x[i * group_len..][..group_len];
            let (mean, rstd) = moments(src, self.eps);
            let c0 = (i % self.groups) * cg;
            for ci in 0..cg {
                // (v - mean) first: folding the mean into the shift cancels badly when the
                // group's variance is tiny and rstd large.
                let (scale, shift) = (w[c0 + ci] * rstd, bias[c0 + ci]);
                let (src, dst) = (&src[ci * s..][..s], &mut dst[ci * s..][..s]);
                // The SiLU follows block by block, while the block is still in the L1 cache
                // (a 512x512 channel is 1 MiB; after the whole channel it was re-read from
                // further out: 128 channels at 512x512, with the SiLU, 48.4 -> 32.3 ms).
                for (src, dst) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = (v - mean) * scale + shift;
                    }
                    if self.silu {
                        super::fast_math::silu_in_place(dst);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = weight.dim(0)?;
        let n = x.elem_count();
        let params = Tensor::cat(&[weight, bias], 0)?;
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &grad.contiguous()?,
            &params.contiguous()?,
            &GroupNormBackward(*self),
        )?;
        let grad_x = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let grad_w = packed.narrow(0, n, c)?;
        let grad_b = packed.narrow(0, n + c, c)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// (x, grad of the output, weight ++ bias) -> grad_x ++ grad_weight ++ grad_bias, flat.
struct GroupNormBackward(GroupNormOp);

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let (b, c, s) = dims(xl.shape(), op.groups)?;
        let (x, g, p) = (
            f32_slice(xs, xl, "group_norm", "input")?,
            f32_slice(gs, gl, "group_norm", "gradient")?,
            f32_slice(ps, pl, "group_norm", "parameters")?,
        );
        let (w, bias) = p.split_at(c);
        let cg = c / op.groups;
        let group_len = cg * s;
        let n = b * c * s;
        // Per group: grad_x, then that group's per-channel grad_weight and grad_bias partials,
        // so the parallel loop writes disjoint chunks; the partials are summed over images after.
        let chunk = group_len + 2 * cg;
        let mut work = vec![0f32; b * op.groups * chunk];
        for_each_chunk(&mut work, chunk, |i, dst| {
            let xg = &x[i * group_len..][..group_len];
            let gg = &g[i * group_len..][..group_len];
            let (mean, rstd) = moments(xg, op.eps);
            let c0 = (i % op.groups) * cg;
            let (dx, partials) = dst.split_at_mut(group_len);
            // Per channel: dx gets gz, the gradient at the affine output (through the SiLU),
            // and the partials its sums: the bias gradient sum(gz) and the weight gradient
            // sum(gz * xhat). The group's two means of the normalisation's backward follow
            // from them: mean(gz * w) and mean(gz * w * xhat).
            let (mut m1, mut m2) = (0f64, 0f64);
            for ci in 0..cg {
                let (wc, bc) = (w[c0 + ci], bias[c0 + ci]);
                let range = ci * s..(ci + 1) * s;
                let (gz, xc) = (&mut dx[range.clone()], &xg[range.clone()]);
                if op.silu {
                    for (z, &xv) in gz.iter_mut().zip(xc) {
                        *z = (xv - mean) * rstd * wc + bc;
                    }
                    super::fast_math::silu_backward_in_place(gz, &gg[range]);
                } else {
                    gz.copy_from_slice(&gg[range]);
                }
                let (db, dw) = channel_sums(gz, xc, mean, rstd);
                partials[ci] = dw as f32;
                partials[cg + ci] = db as f32;
                m1 += wc as f64 * db;
                m2 += wc as f64 * dw;
            }
            let (m1, m2) = (
                (m1 / group_len as f64) as f32,
                (m2 / group_len as f64) as f32,
            );
            for ci in 0..cg {
                let wc = w[c0 + ci];
                let range = ci * s..(ci + 1) * s;
                for (d, &xv) in dx[range.clone()].iter_mut().zip(&xg[range]) {
                    let xhat = (xv - mean) * rstd;
                    *d = rstd * (*d * wc - m1 - xhat * m2);
                }
            }
        });
        let mut out = Vec::with_capacity(n + 2 * c);
        for i in 0..b * op.groups {
            out.extend_from_slice(&work[i * chunk..][..group_len]);
        }
        let mut grad_params = vec![0f32; 2 * c];
        for i in 0..b * op.groups {
            let c0 = (i % op.groups) * cg;
            let partials = &work[i * chunk + group_len..][..2 * cg];
            for ci in 0..cg {
                grad_params[c0 + ci] += partials[ci];
                grad_params[c + c0 + ci] += partials[cg + ci];
            }
        }
        out.extend_from_slice(&grad_params);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

/// GroupNorm over `groups` channel groups of a (batch, channels, ...) f32 tensor, then SiLU
/// when `silu` is set. Differentiable in all three arguments.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    super::require_supported(x, "group_norm")?;
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        GroupNormOp { groups, eps, silu },
    )
}

/// The plain composition of candle ops that the kernel must match.
pub fn group_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let xg = x.reshape((b, groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut pdims = vec![1; dims.len()];
    pdims[1] = c;
    let y = normed
        .broadcast_mul(&weight.reshape(pdims.as_slice())?)?
        .broadcast_add(&bias.reshape(pdims.as_slice())?)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_matches;
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_the_composed_reference_forward_and_backward() {
        let dev = Device::Cpu;
        for (shape, groups, silu) in [
            (vec![2, 6, 5, 3], 3, true),
            (vec![3, 8, 7], 2, false),
            (vec![1, 4, 1, 1], 4, true),
            (vec![2, 32, 9, 9], 8, false),
            // Several full runs of eight values per channel, through the SiLU.
            (vec![2, 16, 6, 6], 4, true),
        ] {
            let c = shape[1];
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., shape.as_slice(), &dev).unwrap() + 0.7).unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev).unwrap()).unwrap();
            let ours = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
            let reference = group_norm_reference(&x, &w, &b, groups, 1e-5, silu).unwrap();
            let label = format!("{shape:?}");
            assert_matches(&ours, &reference, &[&x, &w, &b], 1e-5, 1e-4, &label);
        }
    }

    #[test]
    fn refuses_channels_that_do_not_split_into_groups() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 6, 2, 2), DType::F32, &dev).unwrap();
        let p = Tensor::ones(6, DType::F32, &dev).unwrap();
        let err = group_norm(&x, &p, &p, 4, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("6 channels cannot be split into 4 groups"),
            "{err}"
        );
    }
}
