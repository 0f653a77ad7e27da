//! im2col / col2im for 2-D convolution, as candle custom ops with a backward pass, so that
//! training convolutions become matrix products (forward and both gradients). candle's own
//! conv2d backward goes through a slow transposed convolution; this path is what makes
//! training on the CPU practical.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::f32_slice;
use super::parallel::for_each_chunk;

/// Geometry of a square-kernel convolution over an (h, w) input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub h: usize,
    pub w: usize,
}

impl ConvGeometry {
    /// The geometry, or None when the kernel does not fit the padded input (or stride is 0).
    pub fn new(kernel: usize, stride: usize, padding: usize, h: usize, w: usize) -> Option<Self> {
        let fits =
            stride > 0 && kernel > 0 && kernel <= h + 2 * padding && kernel <= w + 2 * padding;
        fits.then_some(Self {
            kernel,
            stride,
            padding,
            h,
            w,
        })
    }

    /// Bytes of one image's im2col column matrix for `channels` input channels.
    pub fn column_bytes(&self, channels: usize) -> usize {
        channels * self.kernel * self.kernel * self.out_h() * self.out_w() * 4
    }

    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kernel) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

/// (b, c, h, w) -> (c * k * k, b * out_h * out_w): one row per (channel, ky, kx) tap, holding
/// that tap's value at every output position of every image, so the whole batch's convolution
/// is one `W (out, c*k*k) x cols` product and the weight gradient one product too (a per-image
/// batched product would leave a (b, out, c*k*k) gradient to be summed along a strided axis).
/// `rows` restricts the output to rows [r0, r1) of each image (a band; the full range in
/// training, the only case with a backward pass). `up` > 1 convolves the input as if it were
/// first upsampled `up` times by nearest neighbour (the geometry is the upsampled one), so
/// the upsampled image is never built.
struct Im2Col {
    g: ConvGeometry,
    rows: (usize, usize),
    up: usize,
}

/// (c * k * k, b * out_h * out_w) -> (b, c, h, w), summing overlapping taps.
struct Col2Im(ConvGeometry, usize);

/// The range of output positions along one axis whose tap `kpos` lands inside the input.
fn valid_range(
    out: usize,
    stride: usize,
    kpos: usize,
    padding: usize,
    len: usize,
) -> (usize, usize) {
    // o * stride + kpos - padding in [0, len)
    let lo = padding.saturating_sub(kpos).div_ceil(stride);
    let hi = if len + padding > kpos {
        (len + padding - kpos - 1) / stride + 1
    } else {
        0
    };
    (lo.min(out), hi.min(out).max(lo.min(out)))
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, (r0, r1), up) = (self.g, self.rows, self.up.max(1));
        let (b, c, sh, sw) = layout.shape().dims4()?;
        let src = f32_slice(storage, layout, "im2col", "input")?;
        let (h, w) = (sh * up, sw * up);
        let (oh, ow, k) = (g.out_h(), g.out_w(), g.kernel);
        if (g.h, g.w) != (h, w) {
            candle_core::bail!(
                "im2col: a {sh}x{sw} input upsampled {up}x is not {}x{}",
                g.h,
                g.w
            );
        }
        if r0 > r1 || r1 > oh {
            candle_core::bail!("im2col: rows {r0}..{r1} outside the {oh} output rows");
        }
        let l = (r1 - r0) * ow;
        let mut out = vec![0f32; c * k * k * b * l];
        // One chunk per tap row: (channel, ky, kx) across the batch.
        for_each_chunk(&mut out, b * l, |row_index, row| {
            let (ci, ky, kx) = (row_index / (k * k), row_index / k % k, row_index % k);
            let (y0, y1) = valid_range(oh, g.stride, ky, g.padding, h);
            let (y0, y1) = (y0.max(r0), y1.min(r1));
            let (x0, x1) = valid_range(ow, g.stride, kx, g.padding, w);
            if x0 == x1 || y0 >= y1 {
                return; // this tap never lands inside the input: the row stays zero
            }
            for bi in 0..b {
                let plane = &src[(bi * c + ci) * sh * sw..][..sh * sw];
                let dst = &mut row[bi * l..][..l];
                for oy in y0..y1 {
                    let y = oy * g.stride + ky - g.padding;
                    let src_row = &plane[y / up * sw..][..sw];
                    let dst_row = &mut dst[(oy - r0) * ow..][..ow];
                    if up > 1 {
                        for ox in x0..x1 {
                            dst_row[ox] = src_row[(ox * g.stride + kx - g.padding) / up];
                        }
                    } else if g.stride == 1 {
                        let xs = x0 + kx - g.padding;
                        dst_row[x0..x1].copy_from_slice(&src_row[xs..xs + (x1 - x0)]);
                    } else {
                        for ox in x0..x1 {
                            dst_row[ox] = src_row[ox * g.stride + kx - g.padding];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((c * k * k, b * l))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if self.rows != (0, self.g.out_h()) || self.up > 1 {
            candle_core::bail!("im2col: a band of rows or an upsampled input has no backward pass");
        }
        let (b, c) = (arg.dim(0)?, arg.dim(1)?);
        Ok(Some(
            grad_res
                .contiguous()?
                .apply_op1_no_bwd(&Col2Im(self.g, b * c))?
                .reshape(arg.shape())?,
        ))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, planes) = (self.0, self.1);
        let (rows, cols) = layout.shape().dims2()?;
        let (oh, ow, k) = (g.out_h(), g.out_w(), g.kernel);
        let l = oh * ow;
        let b = cols / l.max(1);
        if l == 0 || cols % l != 0 || rows % (k * k) != 0 || b * (rows / (k * k)) != planes {
            candle_core::bail!("col2im: columns {rows}x{cols} do not fit the geometry");
        }
        let c = rows / (k * k);
        let src = f32_slice(storage, layout, "im2col", "input")?;
        let (h, w) = (g.h, g.w);
        let mut out = vec![0f32; b * c * h * w];
        // One chunk per output plane (image, channel), gathering its k*k tap rows.
        for_each_chunk(&mut out, h * w, |plane_index, plane| {
            let (bi, ci) = (plane_index / c, plane_index % c);
            for ky in 0..k {
                let (y0, y1) = valid_range(oh, g.stride, ky, g.padding, h);
                for kx in 0..k {
                    let (x0, x1) = valid_range(ow, g.stride, kx, g.padding, w);
                    let row = &src[((ci * k + ky) * k + kx) * cols + bi * l..][..l];
                    for oy in y0..y1 {
                        let y = oy * g.stride + ky - g.padding;
                        let dst_row = &mut plane[y * w..][..w];
                        let src_row = &row[oy * ow..][..ow];
                        for ox in x0..x1 {
                            dst_row[ox * g.stride + kx - g.padding] += src_row[ox];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(b * c * h * w)))
    }
}

/// A differentiable conv2d (square kernel, no groups or dilation) as im2col + matmul.
/// `weight` is (out, in, k, k); `bias` is (out).
pub fn conv2d_im2col(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (out_c, in_c, k, _) = weight.dims4()?;
    let Some(g) = ConvGeometry::new(k, stride, padding, h, w) else {
        candle_core::bail!(
            "conv2d: a {k}x{k} kernel with stride {stride} and padding {padding} does not fit a {h}x{w} input"
        );
    };
    let l = g.out_h() * g.out_w();
    let rows = (0, g.out_h());
    let cols = x.contiguous()?.apply_op1(Im2Col { g, rows, up: 1 })?; // (in*k*k, b*L)
    let wmat = weight.reshape((out_c, in_c * k * k))?;
    let y = wmat.matmul(&cols)?; // (out, b*L)
    let y = y.reshape((out_c, b, l))?.transpose(0, 1)?; // (b, out, L)
    let y = match bias {
        Some(bias) => super::bias::add_bias(&y, bias, 1)?,
        None => y.contiguous()?,
    };
    y.reshape((b, out_c, g.out_h(), g.out_w()))
}

/// Inference convolution of images whose whole column matrix would not fit `budget` bytes:
/// each image's output rows are made in bands whose columns do fit, each band's columns
/// gathered straight from the image (padding included) and its product written into the
/// image's output. Same result as `conv2d_im2col`; the memory is one band's columns instead of
/// the image's (a 512x512 VAE decoder layer: 1.2 GB), with no padded or concatenated copies.
///
/// `up` > 1 convolves `x` upsampled `up` times by nearest neighbour (a decoder's upsampler)
/// without building the upsampled image.
pub fn conv2d_im2col_banded(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    up: usize,
    budget: usize,
) -> Result<Tensor> {
    let up = up.max(1);
    let (b, in_c, h, w) = x.dims4()?;
    let (h, w) = (h * up, w * up);
    let (out_c, _, k, _) = weight.dims4()?;
    let Some(g) = ConvGeometry::new(k, stride, padding, h, w) else {
        candle_core::bail!(
            "conv2d: a {k}x{k} kernel with stride {stride} and padding {padding} does not fit a {h}x{w} input"
        );
    };
    let (oh, ow) = (g.out_h(), g.out_w());
    let row_bytes = in_c * k * k * ow * 4;
    let rows = (budget / row_bytes.max(1)).clamp(1, oh);
    let wmat = weight.reshape((out_c, in_c * k * k))?;
    let x = x.contiguous()?;
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        let image = x.narrow(0, i, 1)?;
        let out = Tensor::zeros((1, out_c, oh, ow), x.dtype(), x.device())?;
        let mut r0 = 0;
        while r0 < oh {
            let r1 = (r0 + rows).min(oh);
            let cols = image.apply_op1_no_bwd(&Im2Col {
                g,
                rows: (r0, r1),
                up,
            })?;
            let y = wmat.matmul(&cols)?; // (out, band rows * ow)
            let y = match bias {
                Some(bias) => super::bias::add_bias(&y, bias, 0)?,
                None => y,
            };
            out.slice_set(&y.reshape((1, out_c, r1 - r0, ow))?, 2, r0)?;
            r0 = r1;
        }
        images.push(out);
    }
    if b == 1 {
        return Ok(images.remove(0));
    }
    Tensor::cat(&images, 0)
}

#[cfg(test)]
mod tests {
    use super::super::testing::max_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// The reference is candle's own conv2d (and, at stride 1, its backward pass; its strided
    /// backward gets odd sizes wrong), plus finite differences, exact here because the
    /// convolution is linear in each argument.
    #[test]
    fn matches_candle_conv2d_and_finite_differences() {
        let dev = Device::Cpu;
        for (k, stride, padding, h, w) in [
            (3, 1, 1, 7, 5),
            (3, 2, 1, 9, 6),
            (3, 2, 0, 8, 8),
            (1, 1, 0, 5, 3),
            (3, 2, 1, 8, 8),
            (5, 1, 2, 3, 1),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1., 4, &dev).unwrap()).unwrap();
            let ours = conv2d_im2col(&x, &wt, Some(&bias), stride, padding).unwrap();
            let reference = x
                .conv2d(&wt, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&ours, &reference) < 1e-4);
            let probe = Tensor::randn(0f32, 1., reference.dims(), &dev).unwrap();
            let loss = |x: &Tensor, wt: &Tensor| -> f64 {
                let y = conv2d_im2col(x, wt, Some(&bias), stride, padding).unwrap();
                (y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            };
            let grads = (&ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            if stride == 1 {
                let g2 = (&reference * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for v in [x.as_tensor(), wt.as_tensor(), bias.as_tensor()] {
                    assert!(max_diff(grads.get(v).unwrap(), g2.get(v).unwrap()) < 1e-3);
                }
            }
            for (var, n) in [(&x, 2 * 3 * h * w), (&wt, 4 * 3 * k * k)] {
                let grad: Vec<f32> = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                for i in (0..n).step_by(7) {
                    let bump = |d: f32| {
                        let mut v = base.clone();
                        v[i] += d;
                        Tensor::from_vec(v, var.as_tensor().dims(), &dev).unwrap()
                    };
                    let (plus, minus) = if std::ptr::eq(var, &x) {
                        (loss(&bump(0.5), &wt), loss(&bump(-0.5), &wt))
                    } else {
                        (loss(&x, &bump(0.5)), loss(&x, &bump(-0.5)))
                    };
                    let numeric = (plus - minus) as f32;
                    assert!(
                        (numeric - grad[i]).abs() < 2e-3 * (1.0 + numeric.abs()),
                        "k{k} s{stride} p{padding} {i}: {numeric} vs {}",
                        grad[i]
                    );
                }
            }
        }
    }

    /// Bands of one output row, of two rows, and a budget larger than the image, at strides
    /// 1 and 2 with and without padding: all equal to the one-product convolution.
    #[test]
    fn banded_convolution_matches_the_whole_image() {
        let dev = Device::Cpu;
        for (k, stride, padding, h, w) in [
            (3, 1, 1, 7, 5),
            (3, 2, 1, 9, 6),
            (3, 2, 0, 8, 8),
            (1, 1, 0, 5, 3),
        ] {
            let x = Tensor::randn(0f32, 1., (2, 3, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., 4, &dev).unwrap();
            let whole = conv2d_im2col(&x, &wt, Some(&bias), stride, padding).unwrap();
            let row_bytes =
                3 * k * k * ConvGeometry::new(k, stride, padding, h, w).unwrap().out_w() * 4;
            for budget in [1, row_bytes, 2 * row_bytes + 1, 1 << 30] {
                let banded =
                    conv2d_im2col_banded(&x, &wt, Some(&bias), stride, padding, 1, budget).unwrap();
                assert_eq!(banded.dims(), whole.dims());
                assert!(
                    max_diff(&banded, &whole) < 1e-5,
                    "k{k} s{stride} p{padding} budget {budget}"
                );
            }
        }
    }

    /// Upsampling folded into the columns equals upsampling first, at strides 1 and 2.
    #[test]
    fn upsampled_convolution_matches_upsampling_first() {
        let dev = Device::Cpu;
        for (k, stride, padding, h, w) in [(3, 1, 1, 4, 3), (3, 2, 1, 5, 4), (1, 1, 0, 3, 3)] {
            let x = Tensor::randn(0f32, 1., (2, 3, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., 4, &dev).unwrap();
            let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            let reference = conv2d_im2col(&up, &wt, Some(&bias), stride, padding).unwrap();
            for budget in [1, 1 << 30] {
                let fused =
                    conv2d_im2col_banded(&x, &wt, Some(&bias), stride, padding, 2, budget).unwrap();
                assert_eq!(fused.dims(), reference.dims());
                assert!(
                    max_diff(&fused, &reference) < 1e-5,
                    "k{k} s{stride} budget {budget}"
                );
            }
        }
    }
}
