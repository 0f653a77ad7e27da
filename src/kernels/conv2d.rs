//! 2-D convolution (square kernel, no groups or dilation) as one differentiable graph node.
//!
//! Per image and per band of output rows, the im2col columns are gathered into a scratch
//! buffer and one product with the (out, c*k*k) weight is written straight into the output,
//! which starts as the bias: no column matrix for the batch, no transposed copy of the product,
//! no separate bias pass. The backward pass gathers the columns again instead of keeping them:
//! built from im2col and matmul nodes, a training step held every layer's columns (9x its input
//! for a 3x3 kernel) until the backward pass and paid candle's gradient accumulation (a
//! zero-filled buffer plus an add) on the columns' gradient, 9x the input again, per layer.
//!
//! Work is spread over images when there are enough of them (each thread runs whole images
//! with a single-threaded product: training batches, guidance pairs), else over the product
//! and the column rows of one image at a time.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_slice;
use super::im2col::{fill_tap_row, scatter_channel, ConvGeometry};
use super::matmul::Strided;
use super::parallel::{for_each_chunk, serially, threads_for};

/// `conv2d(upsample_nearest(x, up), weight, bias)` with `stride` and `padding`; `weight` is
/// (out, in, k, k), `bias` (out). Column buffers stay within `budget` bytes in all (images
/// whose columns are larger are convolved in bands of output rows). Differentiable in all
/// three arguments. With `bf16`, the forward pass multiplies in bf16 with f32 sums
/// ([`super::matmul_bf16`]; the caller checks that the CPU has it), except on the Winograd
/// path, which stays f32: its transforms magnify rounding errors about a hundredfold (in
/// f32, 2e-5 against values near 1), so that with bf16 products its outputs were off by up
/// to 19 % of their RMS, where the plain product's are off by about 1 %.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    up: usize,
    budget: usize,
    bf16: bool,
) -> Result<Tensor> {
    super::require_supported(x, "conv2d")?;
    super::require_supported(weight, "conv2d")?;
    let up = up.max(1);
    let (_, c, h, w) = x.dims4()?;
    let (out_c, in_c, k, k2) = weight.dims4()?;
    if in_c != c || k != k2 {
        candle_core::bail!(
            "conv2d: a {:?} weight does not fit a {c}-channel input (square kernels only)",
            weight.dims()
        );
    }
    let Some(g) = ConvGeometry::new(k, stride, padding, h * up, w * up) else {
        candle_core::bail!(
            "conv2d: a {k}x{k} kernel with stride {stride} and padding {padding} does not fit a {}x{} input",
            h * up,
            w * up
        );
    };
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(out_c, x.dtype(), x.device())?,
    };
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias,
        Conv2dOp {
            g,
            up,
            budget,
            bf16,
        },
    )
}

struct Conv2dOp {
    g: ConvGeometry,
    up: usize,
    budget: usize,
    /// Forward products in bf16.
    bf16: bool,
}

/// Sizes shared by the forward and backward passes, checked against the arguments.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    /// The input image before upsampling.
    sh: usize,
    sw: usize,
    out_c: usize,
    /// Rows of the column matrix: c * k * k.
    taps: usize,
    /// Output positions per image.
    l: usize,
}

/// How the images are spread over the threads, and the band height that keeps every
/// worker's columns within the budget.
#[derive(Clone, Copy)]
struct Plan {
    workers: usize,
    band_rows: usize,
    /// Parallelism inside one image (a single worker with several threads).
    inner: bool,
    threads: usize,
}

impl Conv2dOp {
    fn dims(&self, x: &Layout, w: &Layout) -> Result<Dims> {
        let (b, c, sh, sw) = x.shape().dims4()?;
        let (out_c, wc, k, _) = w.shape().dims4()?;
        let g = self.g;
        if (sh * self.up, sw * self.up) != (g.h, g.w) || wc != c || k != g.kernel {
            candle_core::bail!("conv2d: the arguments do not fit the geometry {g:?}");
        }
        Ok(Dims {
            b,
            c,
            sh,
            sw,
            out_c,
            taps: c * k * k,
            l: g.out_h() * g.out_w(),
        })
    }

    fn plan(&self, d: Dims) -> Plan {
        let threads = threads_for(usize::MAX);
        let workers = if d.b >= threads { threads } else { 1 };
        let row_bytes = d.taps * self.g.out_w() * 4;
        let budget = super::parallel::share_of(self.budget) / workers;
        let band_rows = (budget / row_bytes.max(1)).clamp(1, self.g.out_h());
        Plan {
            workers,
            band_rows,
            inner: workers == 1 && threads > 1,
            threads,
        }
    }

    fn bands(&self, plan: Plan) -> impl Iterator<Item = (usize, usize)> {
        let oh = self.g.out_h();
        (0..oh)
            .step_by(plan.band_rows)
            .map(move |r0| (r0, (r0 + plan.band_rows).min(oh)))
    }

    /// One image's columns for output rows `band` into `cols` ((c*k*k) x band positions).
    fn fill(&self, image: &[f32], d: Dims, band: (usize, usize), cols: &mut [f32]) {
        let n = (band.1 - band.0) * self.g.out_w();
        let fill = |tap: usize, row: &mut [f32]| {
            fill_tap_row(image, (d.sh, d.sw), self.g, band, self.up, tap, row)
        };
        for_each_chunk(&mut cols[..d.taps * n], n, fill);
    }
}

/// dst (m x n) = lhs (m x k) . rhs (k x n), added to dst when `accumulate`; threaded when the
/// plan gives one image all the threads; in bf16 when `bf16`.
///
/// # Safety
/// As [`super::matmul::product`].
unsafe fn product(
    sizes: (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    plan: Plan,
    bf16: bool,
) {
    let threads = if plan.inner { plan.threads } else { 1 };
    if bf16 {
        use super::matmul_bf16::{product, Operand};
        let (lhs, rhs) = (Operand::f32(lhs), Operand::f32(rhs));
        return product(sizes, dst, accumulate, lhs, rhs, threads);
    }
    super::matmul::product_split(sizes, dst, accumulate, lhs, rhs, threads);
}

/// Runs `f(first image, that run's slice of out)` over `workers` contiguous runs of images
/// (`image_len` values each) in parallel, and returns the runs' results in order.
fn run_images<R: Send>(
    out: &mut [f32],
    image_len: usize,
    workers: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> Vec<R> {
    let images = out.len() / image_len.max(1);
    if workers <= 1 || images <= 1 {
        return vec![f(0, out)];
    }
    let per = images.div_ceil(workers);
    let watch = crate::cancel::Watch::current();
    // Each worker runs its images single-threaded (column gathering included).
    out.par_chunks_mut(per * image_len)
        .enumerate()
        .map(|(i, run)| watch.enter(|| serially(|| f(i * per, run))))
        .collect()
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d"
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
        let d = self.dims(xl, wl)?;
        let x = f32_slice(xs, xl, "conv2d", "input")?;
        let w = f32_slice(ws, wl, "conv2d", "weight")?;
        let bias = f32_slice(bs, bl, "conv2d", "bias")?;
        if bias.len() != d.out_c {
            candle_core::bail!(
                "conv2d: {} biases for {} output channels",
                bias.len(),
                d.out_c
            );
        }
        let plan = self.plan(d);
        let (ow, image_in, image_out) = (self.g.out_w(), d.c * d.sh * d.sw, d.out_c * d.l);
        let shape = Shape::from((d.b, d.out_c, self.g.out_h(), ow));
        if d.b * image_out == 0 {
            return Ok((CpuStorage::F32(Vec::new()), shape));
        }
        let mut y = super::parallel::zeroed(d.b * image_out);
        // Winograd stays f32 even with bf16 products (see `conv2d`), and even with AMX tiles:
        // sending the 3x3 convolutions to im2col and AMX made an SD 1.5 VAE decode to 512x512
        // 2.2x slower on a 16-core Xeon (6.3 s against 2.9 s).
        if super::winograd::applies(self.g, d.b, d.c, d.out_c) {
            let budget = super::parallel::share_of(self.budget);
            let dims = (d.b, d.c, d.sh, d.sw);
            super::winograd::forward(x, w, bias, dims, d.out_c, self.g, self.up, budget, &mut y);
            return Ok((CpuStorage::F32(y), shape));
        }
        run_images(&mut y, image_out, plan.workers, |first, run| {
            let mut cols = vec![0f32; d.taps * plan.band_rows * ow];
            for (j, dst) in run.chunks_mut(image_out).enumerate() {
                let image = &x[(first + j) * image_in..][..image_in];
                for band in self.bands(plan) {
                    // A stopped job's output is discarded (see `crate::cancel`).
                    if crate::cancel::requested() {
                        return;
                    }
                    let (start, n) = (band.0 * ow, (band.1 - band.0) * ow);
                    self.fill(image, d, band, &mut cols);
                    for (o, &bv) in bias.iter().enumerate() {
                        dst[o * d.l + start..][..n].fill(bv);
                    }
                    // SAFETY: dst is out_c rows of l values and the band's n positions start at
                    // `start` with start + n <= l; w is out_c x taps and cols taps x n, row-major.
                    unsafe {
                        product(
                            (d.out_c, n, d.taps),
                            Strided::rows(dst.as_mut_ptr().add(start), d.l),
                            true,
                            Strided::rows(w.as_ptr(), d.taps),
                            Strided::rows(cols.as_ptr(), n),
                            plan,
                            self.bf16,
                        );
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = Conv2dBackward {
            g: self.g,
            up: self.up,
            budget: self.budget,
        };
        let flat = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let (nx, nw) = (x.elem_count(), w.elem_count());
        let dx = flat.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = flat.narrow(0, nx, nw)?.reshape(w.shape())?;
        let db = flat.narrow(0, nx + nw, bias.elem_count())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (x, weight, grad of the output) -> the input, weight and bias gradients, one after the
/// other in one flat buffer (one op computes all three from the same columns).
struct Conv2dBackward {
    g: ConvGeometry,
    up: usize,
    budget: usize,
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = Conv2dOp {
            g: self.g,
            up: self.up,
            budget: self.budget,
            bf16: false,
        };
        let d = op.dims(xl, wl)?;
        let x = f32_slice(xs, xl, "conv2d backward", "input")?;
        let w = f32_slice(ws, wl, "conv2d backward", "weight")?;
        let grad = f32_slice(gs, gl, "conv2d backward", "output gradient")?;
        let (ow, image_in, image_out) = (self.g.out_w(), d.c * d.sh * d.sw, d.out_c * d.l);
        if grad.len() != d.b * image_out {
            candle_core::bail!("conv2d backward: the output gradient has the wrong size");
        }
        let plan = op.plan(d);
        let wlen = d.out_c * d.taps;
        let mut out = vec![0f32; d.b * image_in + wlen + d.out_c];
        if d.b * image_in * image_out == 0 {
            // An empty batch, image or output: every gradient is zero.
            let len = out.len();
            return Ok((CpuStorage::F32(out), Shape::from(len)));
        }
        let (dx, rest) = out.split_at_mut(d.b * image_in);
        let partials = run_images(dx, image_in, plan.workers, |first, run| {
            let mut dw = vec![0f32; wlen];
            let mut db = vec![0f32; d.out_c];
            let mut cols = vec![0f32; d.taps * plan.band_rows * ow];
            let mut dcols = vec![0f32; d.taps * plan.band_rows * ow];
            for (j, dx_image) in run.chunks_mut(image_in).enumerate() {
                let i = first + j;
                let image = &x[i * image_in..][..image_in];
                let g_image = &grad[i * image_out..][..image_out];
                for band in op.bands(plan) {
                    let (start, n) = (band.0 * ow, (band.1 - band.0) * ow);
                    op.fill(image, d, band, &mut cols);
                    let gb = g_image[start..].as_ptr();
                    // SAFETY: g_image is out_c rows of l values, read at [start, start + n) of
                    // each; cols and dcols hold taps x n values, dw out_c x taps, w out_c x taps.
                    unsafe {
                        // dW += grad_band (out_c x n) . cols^T (n x taps)
                        product(
                            (d.out_c, d.taps, n),
                            Strided::rows(dw.as_mut_ptr(), d.taps),
                            true,
                            Strided::rows(gb, d.l),
                            Strided::columns(cols.as_ptr(), n),
                            plan,
                            false,
                        );
                        // dcols = W^T (taps x out_c) . grad_band (out_c x n)
                        product(
                            (d.taps, n, d.out_c),
                            Strided::rows(dcols.as_mut_ptr(), n),
                            false,
                            Strided::columns(w.as_ptr(), d.taps),
                            Strided::rows(gb, d.l),
                            plan,
                            false,
                        );
                    }
                    for (o, acc) in db.iter_mut().enumerate() {
                        *acc += g_image[o * d.l + start..][..n].iter().sum::<f32>();
                    }
                    let plane = d.sh * d.sw;
                    let dcols = &dcols[..d.taps * n];
                    let scatter = |ci: usize, dst: &mut [f32]| {
                        scatter_channel(dcols, d.sw, self.g, band, self.up, ci, dst)
                    };
                    for_each_chunk(dx_image, plane, scatter);
                }
            }
            (dw, db)
        });
        // The runs' weight and bias gradients, summed in run order (deterministic for a
        // given thread count).
        let (dw_out, db_out) = rest.split_at_mut(wlen);
        for (dw, db) in partials {
            dw_out.iter_mut().zip(&dw).for_each(|(a, b)| *a += b);
            db_out.iter_mut().zip(&db).for_each(|(a, b)| *a += b);
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_matches, max_diff};
    use super::*;
    use candle_core::{Device, Var};

    /// (kernel, stride, padding, h, w): odd sizes, strides 1 and 2, with and without padding,
    /// a 1x1 kernel and a kernel wider than the image.
    const CASES: [(usize, usize, usize, usize, usize); 6] = [
        (3, 1, 1, 7, 5),
        (3, 2, 1, 9, 6),
        (3, 2, 0, 8, 8),
        (1, 1, 0, 5, 3),
        (3, 2, 1, 8, 8),
        (5, 1, 2, 3, 1),
    ];

    fn var(dims: &[usize]) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap()).unwrap()
    }

    /// Budgets of one output row's columns, of two rows and a bit, and of the whole image.
    fn budgets(
        c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        h: usize,
        w: usize,
    ) -> [usize; 3] {
        let row = c * k * k * ConvGeometry::new(k, stride, padding, h, w).unwrap().out_w() * 4;
        [1, 2 * row + 1, 1 << 30]
    }

    /// The forward pass against candle's conv2d, whole and in bands, for one image (the
    /// threads share each image) and three (the threads share the images); the gradients
    /// against candle's at stride 1 (its strided backward gets odd sizes wrong) and against
    /// finite differences everywhere, exact up to rounding because the convolution is linear
    /// in each argument.
    #[test]
    fn matches_candle_and_finite_differences() {
        for (k, stride, padding, h, w) in CASES {
            for b in [1, 3] {
                let (x, wt, bias) = (var(&[b, 3, h, w]), var(&[4, 3, k, k]), var(&[4]));
                let reference = x
                    .conv2d(&wt, padding, stride, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap();
                for budget in budgets(3, k, stride, padding, h, w) {
                    let label = format!("k{k} s{stride} p{padding} b{b} budget {budget}");
                    let ours =
                        conv2d(&x, &wt, Some(&bias), stride, padding, 1, budget, false).unwrap();
                    if stride == 1 {
                        let inputs = [x.as_tensor(), wt.as_tensor(), bias.as_tensor()];
                        assert_matches(&ours, &reference, &inputs, 1e-4, 1e-3, &label);
                    } else {
                        assert!(max_diff(&ours, &reference) < 1e-4, "{label}");
                    }
                    check_finite_differences(&x, &wt, &bias, stride, padding, budget, &label);
                }
            }
        }
    }

    /// bf16 products (the portable micro-kernel where the CPU lacks AVX-512 BF16) against
    /// candle's f32 convolution: errors of bf16 rounding, relative to the outputs' size, on
    /// the im2col path (a 5x5 kernel and a stride of 2, which the Winograd path never takes).
    #[test]
    fn bf16_products_stay_within_bf16_rounding() {
        for (k, stride, padding) in [(5, 1, 2), (3, 2, 1), (1, 1, 0)] {
            let (x, wt) = (var(&[2, 24, 11, 9]), var(&[7, 24, k, k]));
            let bias = var(&[7]);
            let reference = x
                .conv2d(&wt, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 7, 1, 1)).unwrap())
                .unwrap();
            let ours = conv2d(&x, &wt, Some(&bias), stride, padding, 1, 1 << 30, true).unwrap();
            let rms = reference.sqr().unwrap().mean_all().unwrap().sqrt().unwrap();
            let rel = max_diff(&ours, &reference) / rms.to_scalar::<f32>().unwrap();
            // Products of two values rounded to 8 significant bits (2^-9 relative each):
            // measured 0.7-1.0 % of the RMS at worst (f32 products: about 1e-6).
            assert!(rel < 0.03 && rel > 1e-5, "k{k} s{stride}: {rel}");
        }
    }

    fn check_finite_differences(
        x: &Var,
        wt: &Var,
        bias: &Var,
        stride: usize,
        padding: usize,
        budget: usize,
        label: &str,
    ) {
        let out = conv2d(x, wt, Some(bias), stride, padding, 1, budget, false).unwrap();
        let probe = Tensor::randn(0f32, 1., out.dims(), &Device::Cpu).unwrap();
        let loss = |x: &Tensor, wt: &Tensor, bias: &Tensor| -> f64 {
            let y = conv2d(x, wt, Some(bias), stride, padding, 1, budget, false).unwrap();
            (y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let grads = (&out * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let vars = [x, wt, bias];
        for (which, var) in vars.iter().enumerate() {
            let grad: Vec<f32> = grads
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
            for i in (0..base.len()).step_by(5) {
                let bumped = |d: f32| -> f64 {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap();
                    let mut args = [
                        x.as_tensor().clone(),
                        wt.as_tensor().clone(),
                        bias.as_tensor().clone(),
                    ];
                    args[which] = t;
                    loss(&args[0], &args[1], &args[2])
                };
                let numeric = (bumped(0.5) - bumped(-0.5)) as f32;
                assert!(
                    (numeric - grad[i]).abs() < 2e-3 * (1.0 + numeric.abs()),
                    "{label} argument {which} element {i}: {numeric} vs {}",
                    grad[i]
                );
            }
        }
    }

    /// Upsampling folded into the columns equals upsampling first, forward and backward, at
    /// strides 1 and 2, whole and in bands.
    #[test]
    fn upsampled_convolution_matches_upsampling_first() {
        for (k, stride, padding, h, w) in [(3, 1, 1, 4, 3), (3, 2, 1, 5, 4), (1, 1, 0, 3, 3)] {
            for b in [1, 3] {
                let (x, wt, bias) = (var(&[b, 3, h, w]), var(&[4, 3, k, k]), var(&[4]));
                let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
                let reference =
                    conv2d(&up, &wt, Some(&bias), stride, padding, 1, 1 << 30, false).unwrap();
                for budget in [1, 1 << 30] {
                    let fused =
                        conv2d(&x, &wt, Some(&bias), stride, padding, 2, budget, false).unwrap();
                    let label = format!("k{k} s{stride} b{b} budget {budget}");
                    let inputs = [x.as_tensor(), wt.as_tensor(), bias.as_tensor()];
                    assert_matches(&fused, &reference, &inputs, 1e-5, 1e-4, &label);
                }
            }
        }
    }

    /// An image comes out bit-identical alone and inside a batch, whichever way the threads
    /// split the work (a generated image depends on its seed only).
    #[test]
    fn an_image_does_not_depend_on_its_batch() {
        let x = Tensor::randn(0f32, 1., (3, 8, 12, 10), &Device::Cpu).unwrap();
        let wt = Tensor::randn(0f32, 1., (16, 8, 3, 3), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1., 16, &Device::Cpu).unwrap();
        let batch = conv2d(&x, &wt, Some(&bias), 1, 1, 1, 1 << 30, false).unwrap();
        for i in 0..3 {
            let alone = conv2d(
                &x.narrow(0, i, 1).unwrap(),
                &wt,
                Some(&bias),
                1,
                1,
                1,
                1 << 30,
                false,
            )
            .unwrap();
            assert_eq!(
                max_diff(&alone, &batch.narrow(0, i, 1).unwrap()),
                0.0,
                "image {i}"
            );
        }
    }
}
