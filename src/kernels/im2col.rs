//! im2col and its adjoint (col2im) for one image: the column matrix that turns a convolution
//! into a matrix product, one row per (channel, ky, kx) tap holding that tap's input value at
//! every output position of a band of output rows. `up` > 1 reads the input as if it were
//! first upsampled `up` times by nearest neighbour (a decoder's upsampler), so the upsampled
//! image is never built. The convolution itself is in `conv2d`.

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

/// Writes row `tap` = (channel, ky, kx) of one image's columns for output rows [r0, r1):
/// `dst` holds (r1 - r0) * out_w values; taps that land in the padding are zero.
/// `image` is the (c, sh, sw) input before upsampling.
pub(super) fn fill_tap_row(
    image: &[f32],
    (sh, sw): (usize, usize),
    g: ConvGeometry,
    (r0, r1): (usize, usize),
    up: usize,
    tap: usize,
    dst: &mut [f32],
) {
    let k = g.kernel;
    let (ci, ky, kx) = (tap / (k * k), tap / k % k, tap % k);
    let (oh, ow) = (g.out_h(), g.out_w());
    let (y0, y1) = valid_range(oh, g.stride, ky, g.padding, g.h);
    let (y0, y1) = (y0.max(r0), y1.min(r1));
    let (x0, x1) = valid_range(ow, g.stride, kx, g.padding, g.w);
    dst.fill(0.0);
    if x0 == x1 || y0 >= y1 {
        return; // this tap never lands inside the input: the row stays zero
    }
    let plane = &image[ci * sh * sw..][..sh * sw];
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

/// The adjoint of `fill_tap_row` for one input channel: adds the k*k tap rows of channel `ci`
/// (columns of output rows [r0, r1), `cols` holding (c * k * k) rows of (r1 - r0) * out_w)
/// into that channel's plane (`sw` wide before upsampling), each value to the input pixel it was read from.
pub(super) fn scatter_channel(
    cols: &[f32],
    sw: usize,
    g: ConvGeometry,
    (r0, r1): (usize, usize),
    up: usize,
    ci: usize,
    plane: &mut [f32],
) {
    let k = g.kernel;
    let (oh, ow) = (g.out_h(), g.out_w());
    let n = (r1 - r0) * ow;
    for ky in 0..k {
        let (y0, y1) = valid_range(oh, g.stride, ky, g.padding, g.h);
        let (y0, y1) = (y0.max(r0), y1.min(r1));
        for kx in 0..k {
            let (x0, x1) = valid_range(ow, g.stride, kx, g.padding, g.w);
            if x0 >= x1 {
                continue; // this tap never lands inside the input
            }
            let row = &cols[((ci * k + ky) * k + kx) * n..][..n];
            for oy in y0..y1 {
                let y = oy * g.stride + ky - g.padding;
                let dst_row = &mut plane[y / up * sw..][..sw];
                let src_row = &row[(oy - r0) * ow..][..ow];
                if up == 1 && g.stride == 1 {
                    // Contiguous on both sides: one vectorised run.
                    let xs = x0 + kx - g.padding;
                    let dst = &mut dst_row[xs..xs + (x1 - x0)];
                    dst.iter_mut()
                        .zip(&src_row[x0..x1])
                        .for_each(|(d, s)| *d += s);
                } else if up == 2 && g.stride == 1 {
                    // A 2x upsampler's conv: each input pixel gathers two neighbouring taps.
                    scatter_pairs(src_row, x0, x1, x0 + kx - g.padding, dst_row);
                } else if up == 1 {
                    for ox in x0..x1 {
                        dst_row[ox * g.stride + kx - g.padding] += src_row[ox];
                    }
                } else {
                    for ox in x0..x1 {
                        dst_row[(ox * g.stride + kx - g.padding) / up] += src_row[ox];
                    }
                }
            }
        }
    }
}

/// `dst[u / 2] += src[x]` for x in [x0, x1), u = ux0 + (x - x0): the adjoint of reading a
/// row upsampled 2x, with the pairs of taps that share a pixel summed as vectors.
fn scatter_pairs(src: &[f32], x0: usize, x1: usize, ux0: usize, dst: &mut [f32]) {
    let (mut x, mut u) = (x0, ux0);
    if x < x1 && u % 2 == 1 {
        dst[u / 2] += src[x];
        (x, u) = (x + 1, u + 1);
    }
    let pairs = (x1 - x) / 2;
    let out = &mut dst[u / 2..u / 2 + pairs];
    for (d, s) in out.iter_mut().zip(src[x..x + 2 * pairs].chunks_exact(2)) {
        *d += s[0] + s[1];
    }
    (x, u) = (x + 2 * pairs, u + 2 * pairs);
    if x < x1 {
        dst[u / 2] += src[x];
    }
}
