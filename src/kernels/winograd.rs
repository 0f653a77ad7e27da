//! 3x3, stride-1 convolution by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): every 4x4 block of outputs of
//! every (input, output) channel pair costs 36 multiplications instead of 144. The work
//! becomes 36 independent matrix products, one per position of the 6x6 transformed tile:
//!
//!   M[e] (out_c x tiles) = U[e] (out_c x c) . V[e] (c x tiles)
//!
//! where U = G g G^T are the transformed 3x3 filters, V = B^T d B the transformed 6x6 input
//! tiles (overlapping by 2), and the outputs are Y = A^T M A. The interpolation points are
//! 0, +-1, +-2 (and infinity); in f32 the results stay within a few 1e-6 of the direct sum
//! relative to the inputs' scale, the same order as a different summation order.
//!
//! Only the forward pass: the backward pass of `conv2d` stays the im2col one. Tile rows are
//! processed in bands so that the transformed tiles stay within the caller's memory budget,
//! and the filters are transformed per call, in blocks of output channels, instead of being
//! kept: a transformed filter bank is 4x the size of the weights.

use gemm::Parallelism;

use super::im2col::ConvGeometry;
use super::matmul::{product, Strided};
use super::parallel::{for_each_chunk, for_each_chunk_with, for_each_index_with, SharedMut};

/// Outputs per tile side, and input (transformed) tile side.
const M: usize = 4;
const T: usize = 6;
const TT: usize = T * T;

/// Largest transformed filter block kept at once, in bytes.
const FILTER_BLOCK_BYTES: usize = 32 << 20;

/// Fewest tiles (over the batch) for which the Winograd path pays: each call transforms the
/// whole filter bank (4x the weights' bytes), and the 36 products are only efficient when
/// their shared dimension, the tile count, is not tiny. Measured on SD 1.5's convolutions
/// (batch 2, 2 threads): 2x faster than im2col with 128 tiles and more (32x32, 64x64 maps),
/// 1.1x with 32 (16x16), 0.45x with 8 (8x8).
const MIN_TILES: usize = 64;

/// Whether the Winograd path takes this convolution: 3x3, stride 1, enough channels for the
/// transforms to be a small part of the work and enough tiles for the products.
pub fn applies(g: ConvGeometry, batch: usize, in_c: usize, out_c: usize) -> bool {
    let tiles = batch * g.out_h().div_ceil(M) * g.out_w().div_ceil(M);
    g.kernel == 3
        && tiles >= MIN_TILES
        && g.stride == 1
        && g.padding <= 2
        && in_c >= 16
        && out_c >= 16
        && g.out_h() >= 2
        && g.out_w() >= 2
        && enabled()
}

/// `TEXT2IMG_CONV=im2col` turns the Winograd path off (for comparisons and benchmarks).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TEXT2IMG_CONV").map_or(true, |v| v != "im2col"))
}

/// The filter transform along one axis: G (6x3) applied to three taps.
#[inline(always)]
fn filter_1d(g: [f32; 3]) -> [f32; T] {
    let [g0, g1, g2] = g;
    let a = (g0 + g2) * (-1.0 / 6.0);
    let b = g1 * (-1.0 / 6.0);
    let c = g0 * (1.0 / 24.0) + g2 * (1.0 / 6.0);
    let d = g1 * (1.0 / 12.0);
    [g0 * 0.25, a + b, a - b, c + d, c - d, g2]
}

/// The input transform along one axis: B^T (6x6) applied to six values.
#[inline(always)]
fn input_1d(d: [f32; T]) -> [f32; T] {
    let [d0, d1, d2, d3, d4, d5] = d;
    let p = d4 - 4.0 * d2;
    let q = d3 - 4.0 * d1;
    let r = d4 - d2;
    let s = 2.0 * (d3 - d1);
    [
        4.0 * d0 - 5.0 * d2 + d4,
        p + q,
        p - q,
        r + s,
        r - s,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// The output transform along one axis: A^T (4x6) applied to six values.
#[inline(always)]
fn output_1d(m: [f32; T]) -> [f32; M] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (sum12, dif12) = (m1 + m2, m1 - m2);
    let (sum34, dif34) = (m3 + m4, m3 - m4);
    [
        m0 + sum12 + sum34,
        dif12 + 2.0 * dif34,
        sum12 + 4.0 * sum34,
        dif12 + 8.0 * dif34 + m5,
    ]
}

/// V = B^T d B for the tiles of one tile row of one channel, all at once so that every step
/// is a loop over contiguous values: `lines` holds the tile row's six input lines, padded
/// (`wp` = 4 * tiles_w + 2 values each); the 36 transformed values of tile `tx` go to
/// `dst[e * tiles + tx]`. `scratch` holds 6 wp + 4 (tiles_w + 1) values.
#[inline(always)]
fn input_tile_row_generic(
    lines: &[f32],
    wp: usize,
    scratch: &mut [f32],
    dst: &mut [f32],
    tiles: usize,
) {
    let tiles_w = (wp - 2) / M;
    let (along_y, gathered) = scratch.split_at_mut(T * wp);
    // Along y: six lines into six transformed lines.
    for x in 0..wp {
        let v = input_1d(std::array::from_fn(|r| lines[r * wp + x]));
        for (a, &val) in v.iter().enumerate() {
            along_y[a * wp + x] = val;
        }
    }
    // Along x: tile tx reads columns 4 tx .. 4 tx + 5 of each transformed line. The line is
    // split into its four phases (x mod 4), so that column 4 tx + c is phase c mod 4 at tx
    // (c < 4) or tx + 1 (c = 4, 5): every read below is then contiguous.
    let n = tiles_w + 1;
    for a in 0..T {
        let line = &along_y[a * wp..][..wp];
        split_phases(&line[..tiles_w * M], gathered, n);
        gathered[tiles_w] = line[tiles_w * M];
        gathered[n + tiles_w] = line[tiles_w * M + 1];
        let (p0, rest) = gathered.split_at(n);
        let (p1, rest) = rest.split_at(n);
        let (p2, p3) = rest.split_at(n);
        for tx in 0..tiles_w {
            let v = input_1d([p0[tx], p1[tx], p2[tx], p3[tx], p0[tx + 1], p1[tx + 1]]);
            for (b, &val) in v.iter().enumerate() {
                dst[(a * T + b) * tiles + tx] = val;
            }
        }
    }
}

/// Y = A^T M A plus `bias` for the tiles of one tile row of one output channel: `m[e * tiles
/// + tx]` holds tile tx's 36 products; the first `rows` of its 4 output rows are written to
/// `out` (lines of `ow` values). `scratch` holds 40 * tiles_w values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_tile_row_generic(
    m: &[f32],
    tiles: usize,
    tiles_w: usize,
    bias: f32,
    scratch: &mut [f32],
    out: &mut [f32],
    ow: usize,
    rows: usize,
) {
    let (along_x, along_y) = scratch.split_at_mut(T * M * tiles_w);
    for a in 0..T {
        for tx in 0..tiles_w {
            let v = output_1d(std::array::from_fn(|b| m[(a * T + b) * tiles + tx]));
            for (q, &val) in v.iter().enumerate() {
                along_x[(a * M + q) * tiles_w + tx] = val;
            }
        }
    }
    for q in 0..M {
        for tx in 0..tiles_w {
            let v = output_1d(std::array::from_fn(|a| along_x[(a * M + q) * tiles_w + tx]));
            for (p, &val) in v.iter().enumerate() {
                along_y[(p * M + q) * tiles_w + tx] = val + bias;
            }
        }
    }
    // Interleave the four columns of each tile back into output lines; the last tile may
    // be cut by the right edge.
    let full = ow / M;
    for p in 0..rows {
        let line = &mut out[p * ow..][..ow];
        let cols = &along_y[p * M * tiles_w..][..M * tiles_w];
        let (c0, rest) = cols.split_at(tiles_w);
        let (c1, rest) = rest.split_at(tiles_w);
        let (c2, c3) = rest.split_at(tiles_w);
        merge_phases([c0, c1, c2, c3], &mut line[..full * M]);
        for x in full * M..ow {
            line[x] = cols[(x % M) * tiles_w + x / M];
        }
    }
}

/// The four phases of `line` (4 n values): `phases[c * stride + t] = line[4 t + c]`. The
/// tiles' columns come out of a line this way, so that the transforms across tiles run on
/// contiguous values.
#[inline(always)]
fn split_phases(line: &[f32], phases: &mut [f32], stride: usize) {
    let n = line.len() / M;
    assert!(line.len() == n * M && stride >= n && phases.len() >= 3 * stride + n);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2; the lengths were checked above.
        done = unsafe { split_phases_avx2(line, phases, stride) };
    }
    for t in done..n {
        for c in 0..M {
            phases[c * stride + t] = line[t * M + c];
        }
    }
}

/// The inverse of [`split_phases`]: `line[4 t + c] = phases[c][t]` for the 4 n values of `line`.
#[inline(always)]
fn merge_phases(phases: [&[f32]; M], line: &mut [f32]) {
    let n = line.len() / M;
    assert!(line.len() == n * M && phases.iter().all(|p| p.len() >= n));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2; the lengths were checked above.
        done = unsafe { merge_phases_avx2(phases, line) };
    }
    for (t, quad) in line.chunks_exact_mut(M).enumerate().skip(done) {
        quad.copy_from_slice(&[phases[0][t], phases[1][t], phases[2][t], phases[3][t]]);
    }
}

/// [`split_phases`] eight tiles (32 values) at a time: a 4x8 transpose in registers, instead
/// of 32 scalar moves. Returns how many tiles it did (a multiple of 8).
/// Safety: AVX2; `line` holds 4 n values and `phases` 3 stride + n, stride >= n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn split_phases_avx2(line: &[f32], phases: &mut [f32], stride: usize) -> usize {
    use std::arch::x86_64::*;
    let groups = line.len() / (8 * M);
    let (src, dst) = (line.as_ptr(), phases.as_mut_ptr());
    for g in 0..groups {
        // r0 = tiles 0-1 (4 values each), r1 = tiles 2-3, r2 = 4-5, r3 = 6-7.
        let r0 = _mm256_loadu_ps(src.add(32 * g));
        let r1 = _mm256_loadu_ps(src.add(32 * g + 8));
        let r2 = _mm256_loadu_ps(src.add(32 * g + 16));
        let r3 = _mm256_loadu_ps(src.add(32 * g + 24));
        // Lanes: a = tiles 0 | 4, b = 1 | 5, c = 2 | 6, d = 3 | 7.
        let a = _mm256_permute2f128_ps::<0x20>(r0, r2);
        let b = _mm256_permute2f128_ps::<0x31>(r0, r2);
        let c = _mm256_permute2f128_ps::<0x20>(r1, r3);
        let d = _mm256_permute2f128_ps::<0x31>(r1, r3);
        // Pairs of tiles per phase: (t0 t1 | t4 t5) and (t2 t3 | t6 t7), phases 0-1 and 2-3.
        let ab_lo = _mm256_castps_pd(_mm256_unpacklo_ps(a, b));
        let ab_hi = _mm256_castps_pd(_mm256_unpackhi_ps(a, b));
        let cd_lo = _mm256_castps_pd(_mm256_unpacklo_ps(c, d));
        let cd_hi = _mm256_castps_pd(_mm256_unpackhi_ps(c, d));
        let p = [
            _mm256_unpacklo_pd(ab_lo, cd_lo),
            _mm256_unpackhi_pd(ab_lo, cd_lo),
            _mm256_unpacklo_pd(ab_hi, cd_hi),
            _mm256_unpackhi_pd(ab_hi, cd_hi),
        ];
        for (ph, v) in p.into_iter().enumerate() {
            _mm256_storeu_ps(dst.add(ph * stride + 8 * g), _mm256_castpd_ps(v));
        }
    }
    groups * 8
}

/// [`merge_phases`] eight tiles at a time (the transpose of [`split_phases_avx2`]).
/// Safety: AVX2; `line` holds 4 n values and each phase at least n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn merge_phases_avx2(phases: [&[f32]; M], line: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let groups = line.len() / (8 * M);
    let dst = line.as_mut_ptr();
    for g in 0..groups {
        let p: [__m256; M] =
            std::array::from_fn(|ph| _mm256_loadu_ps(phases[ph].as_ptr().add(8 * g)));
        // (t0p0 t0p1 t1p0 t1p1 | t4.. t5..), (t2.. t3.. | t6.. t7..), the same for phases 2-3.
        let lo01 = _mm256_castps_pd(_mm256_unpacklo_ps(p[0], p[1]));
        let hi01 = _mm256_castps_pd(_mm256_unpackhi_ps(p[0], p[1]));
        let lo23 = _mm256_castps_pd(_mm256_unpacklo_ps(p[2], p[3]));
        let hi23 = _mm256_castps_pd(_mm256_unpackhi_ps(p[2], p[3]));
        // Whole tiles: t0 | t4, t1 | t5, t2 | t6, t3 | t7.
        let t04 = _mm256_castpd_ps(_mm256_unpacklo_pd(lo01, lo23));
        let t15 = _mm256_castpd_ps(_mm256_unpackhi_pd(lo01, lo23));
        let t26 = _mm256_castpd_ps(_mm256_unpacklo_pd(hi01, hi23));
        let t37 = _mm256_castpd_ps(_mm256_unpackhi_pd(hi01, hi23));
        _mm256_storeu_ps(dst.add(32 * g), _mm256_permute2f128_ps::<0x20>(t04, t15));
        _mm256_storeu_ps(
            dst.add(32 * g + 8),
            _mm256_permute2f128_ps::<0x20>(t26, t37),
        );
        _mm256_storeu_ps(
            dst.add(32 * g + 16),
            _mm256_permute2f128_ps::<0x31>(t04, t15),
        );
        _mm256_storeu_ps(
            dst.add(32 * g + 24),
            _mm256_permute2f128_ps::<0x31>(t26, t37),
        );
    }
    groups * 8
}

dispatch!(input_tile_row, input_tile_row_generic, (lines: &[f32], wp: usize, scratch: &mut [f32], dst: &mut [f32], tiles: usize));
dispatch!(output_tile_row, output_tile_row_generic, (m: &[f32], tiles: usize, tiles_w: usize, bias: f32, scratch: &mut [f32], out: &mut [f32], ow: usize, rows: usize));

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    out_c: usize,
    /// The input before upsampling.
    sh: usize,
    sw: usize,
    g: ConvGeometry,
    tiles_h: usize,
    tiles_w: usize,
}

/// The padded input positions that `tiles` tiles read along one axis (4 tiles + 2, from
/// -padding): for each, its index in the stored (not upsampled) image, or usize::MAX where it
/// falls in the padding. Tile t reads entries 4t .. 4t + 5.
fn padded_sources(tiles: usize, virtual_len: usize, up: usize, padding: usize) -> Vec<usize> {
    (0..tiles * M + 2)
        .map(|i| {
            let pos = i as isize - padding as isize;
            if pos >= 0 && (pos as usize) < virtual_len {
                pos as usize / up
            } else {
                usize::MAX
            }
        })
        .collect()
}

/// The convolution of `x` ((b, c, sh, sw), read as upsampled `up` times) with `w`
/// ((out_c, c, 3, 3)) plus `bias`, into `y` ((b, out_c, out_h, out_w)). Scratch buffers stay
/// within about `budget` bytes beside the filter block. Panics if a slice's length does not
/// fit the sizes (the output is written through raw pointers: checked here, once).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    (b, c, sh, sw): (usize, usize, usize, usize),
    out_c: usize,
    g: ConvGeometry,
    up: usize,
    budget: usize,
    y: &mut [f32],
) {
    run(
        x,
        w,
        bias,
        (b, c, sh, sw),
        out_c,
        g,
        up,
        (budget, FILTER_BLOCK_BYTES),
        y,
    )
}

/// [`forward`] with the filter block limit as an argument (tests force small blocks).
#[allow(clippy::too_many_arguments)]
fn run(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    (b, c, sh, sw): (usize, usize, usize, usize),
    out_c: usize,
    g: ConvGeometry,
    up: usize,
    (budget, filter_block_bytes): (usize, usize),
    y: &mut [f32],
) {
    let (oh, ow) = (g.out_h(), g.out_w());
    assert!(
        g.kernel == 3 && g.stride == 1,
        "winograd: 3x3 stride-1 geometry only"
    );
    assert_eq!(
        (sh * up, sw * up),
        (g.h, g.w),
        "winograd: input size vs geometry"
    );
    assert_eq!(x.len(), b * c * sh * sw, "winograd: input length");
    assert_eq!(w.len(), out_c * c * 9, "winograd: weight length");
    assert_eq!(bias.len(), out_c, "winograd: bias length");
    assert_eq!(y.len(), b * out_c * oh * ow, "winograd: output length");
    let d = Dims {
        b,
        c,
        out_c,
        sh,
        sw,
        g,
        tiles_h: oh.div_ceil(M),
        tiles_w: ow.div_ceil(M),
    };
    let rows_src = padded_sources(d.tiles_h, g.h, up, g.padding);
    let cols_src = padded_sources(d.tiles_w, g.w, up, g.padding);
    // Filter blocks: all output channels at once when the transformed bank is small enough.
    // Blocks of even size (512 channels in two blocks of 256, not 455 + 57).
    let most = (filter_block_bytes / (TT * c * 4)).clamp(1, out_c);
    let blocks = out_c.div_ceil(most);
    let block = out_c.div_ceil(blocks);
    // Tile rows per band: the transformed inputs and products of a band within the budget.
    let per_tile_row = TT * (c + block) * 4 * b * d.tiles_w;
    let band_rows = (budget / per_tile_row.max(1)).clamp(1, d.tiles_h);
    let mut filters = vec![0f32; TT * block.min(out_c) * c];
    let mut filters_block = usize::MAX;
    let max_tiles = b * band_rows * d.tiles_w;
    let mut v = vec![0f32; TT * c * max_tiles];
    let mut m = vec![0f32; TT * block * max_tiles];
    for r0 in (0..d.tiles_h).step_by(band_rows) {
        // A stopped job's output is discarded (see `crate::cancel`).
        if crate::cancel::requested() {
            return;
        }
        let r1 = (r0 + band_rows).min(d.tiles_h);
        let tiles = b * (r1 - r0) * d.tiles_w;
        transform_inputs(
            x,
            d,
            (r0, r1),
            &rows_src,
            &cols_src,
            &mut v[..TT * c * tiles],
        );
        for blk in 0..blocks {
            let o0 = blk * block;
            let n_o = block.min(out_c - o0);
            if filters_block != blk {
                transform_filters(
                    &w[o0 * c * 9..][..n_o * c * 9],
                    c,
                    &mut filters[..TT * n_o * c],
                );
                filters_block = blk;
            }
            products(
                &filters[..TT * n_o * c],
                &v[..TT * c * tiles],
                (n_o, c, tiles),
                &mut m,
            );
            write_outputs(&m[..TT * n_o * tiles], d, (r0, r1), o0, n_o, bias, y);
        }
    }
}

/// U in the layout [o][e][i]: U[e] is the (n_o x c) matrix with row stride 36c.
fn transform_filters(w: &[f32], c: usize, u: &mut [f32]) {
    for_each_chunk(u, TT * c, |o, dst| {
        filter_row(&w[o * c * 9..][..c * 9], c, dst)
    });
}

/// U = G g G^T for the `c` filters of one output channel (`w`: c x 3 x 3), into `dst[e * c +
/// i]`: a loop over the filters, so that each step is vectorised across them.
#[inline(always)]
fn filter_row_generic(w: &[f32], c: usize, dst: &mut [f32]) {
    for i in 0..c {
        let g: [f32; 9] = std::array::from_fn(|k| w[i * 9 + k]);
        let cols: [[f32; T]; 3] = std::array::from_fn(|x| filter_1d([g[x], g[3 + x], g[6 + x]]));
        for a in 0..T {
            let row = filter_1d([cols[0][a], cols[1][a], cols[2][a]]);
            for (b, &val) in row.iter().enumerate() {
                dst[(a * T + b) * c + i] = val;
            }
        }
    }
}

dispatch!(filter_row, filter_row_generic, (w: &[f32], c: usize, dst: &mut [f32]));

/// V for the tile rows `band` of every image, in the layout [i][e][t] (t runs over images,
/// then tile rows, then tile columns).
fn transform_inputs(
    x: &[f32],
    d: Dims,
    (r0, r1): (usize, usize),
    rows_src: &[usize],
    cols_src: &[usize],
    v: &mut [f32],
) {
    let tiles = d.b * (r1 - r0) * d.tiles_w;
    let plane = d.sh * d.sw;
    let wp = cols_src.len();
    // The padded line's inside: positions lead .. lead + inside read the stored line, the
    // rest is padding, zero from the buffer's start and never written but by whole-line
    // fills of zeros (rows in the padding).
    let lead = cols_src.iter().take_while(|&&s| s == usize::MAX).count();
    let inside = cols_src[lead..]
        .iter()
        .take_while(|&&s| s != usize::MAX)
        .count();
    let inside_src = &cols_src[lead..][..inside];
    // Without upsampling the inside is one contiguous run of the stored line.
    let contiguous = inside_src.windows(2).all(|p| p[1] == p[0] + 1);
    // Per thread: the six padded input lines of a tile row, and the transform's scratch.
    let init = || (vec![0f32; T * wp], vec![0f32; T * wp + M * (d.tiles_w + 1)]);
    for_each_chunk_with(v, TT * tiles, init, |(lines, scratch), i, dst| {
        let mut t = 0;
        for img in 0..d.b {
            let src = &x[(img * d.c + i) * plane..][..plane];
            for ty in r0..r1 {
                let rows = &rows_src[ty * M..][..T];
                for (line, &sy) in lines.chunks_mut(wp).zip(rows) {
                    if sy == usize::MAX {
                        line.fill(0.0);
                        continue;
                    }
                    let src_line = &src[sy * d.sw..][..d.sw];
                    let line = &mut line[lead..][..inside];
                    if contiguous && inside > 0 {
                        line.copy_from_slice(&src_line[inside_src[0]..][..inside]);
                    } else {
                        for (val, &sx) in line.iter_mut().zip(inside_src) {
                            *val = src_line[sx];
                        }
                    }
                }
                input_tile_row(lines, wp, scratch, &mut dst[t..], tiles);
                t += d.tiles_w;
            }
        }
    });
}

/// M[e] = U[e] . V[e] for the 36 positions, in the layout [o][e][t], spread over the threads
/// by position (each product single-threaded).
fn products(u: &[f32], v: &[f32], (n_o, c, tiles): (usize, usize, usize), m: &mut [f32]) {
    let m_ptr = SharedMut::new(m);
    for_each_index_with(
        TT,
        || (),
        |_, e| {
            // SAFETY: for position e the product writes m[o * 36 * tiles + e * tiles + t] for
            // o < n_o, t < tiles, inside m (36 * n_o * tiles long) and disjoint from every other
            // position's elements; u and v are read within their lengths by the same reasoning.
            unsafe {
                product(
                    (n_o, tiles, c),
                    Strided::rows(m_ptr.get().add(e * tiles), TT * tiles),
                    false,
                    Strided::rows(u.as_ptr().add(e * c), TT * c),
                    Strided::rows(v.as_ptr().add(e * tiles), TT * tiles),
                    Parallelism::None,
                );
            }
        },
    );
}

/// Y = A^T M A plus the bias for output channels o0..o0+n_o, written into y where the tiles
/// fall inside the output.
fn write_outputs(
    m: &[f32],
    d: Dims,
    (r0, r1): (usize, usize),
    o0: usize,
    n_o: usize,
    bias: &[f32],
    y: &mut [f32],
) {
    let (oh, ow) = (d.g.out_h(), d.g.out_w());
    let tiles = d.b * (r1 - r0) * d.tiles_w;
    let y_ptr = SharedMut::new(y);
    let init = || vec![0f32; T * M * d.tiles_w + M * M * d.tiles_w];
    for_each_index_with(n_o, init, |scratch, o| {
        let src = &m[o * TT * tiles..][..TT * tiles];
        let bv = bias[o0 + o];
        let mut t = 0;
        for img in 0..d.b {
            // SAFETY: this call alone writes output channel o0 + o of every image, inside y
            // (b * out_c planes of oh * ow values; `forward` checked its length).
            let plane = unsafe {
                std::slice::from_raw_parts_mut(
                    y_ptr.get().add((img * d.out_c + o0 + o) * oh * ow),
                    oh * ow,
                )
            };
            for ty in r0..r1 {
                let rows = M.min(oh - ty * M);
                let out = &mut plane[ty * M * ow..][..rows * ow];
                output_tile_row(&src[t..], tiles, d.tiles_w, bv, scratch, out, ow, rows);
                t += d.tiles_w;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::TorchGenerator;

    /// The direct sum, in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        (b, c, sh, sw): (usize, usize, usize, usize),
        out_c: usize,
        g: ConvGeometry,
        up: usize,
    ) -> Vec<f32> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut y = vec![0f32; b * out_c * oh * ow];
        for img in 0..b {
            for o in 0..out_c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[o] as f64;
                        for i in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let yy = (oy + ky) as isize - g.padding as isize;
                                    let xx = (ox + kx) as isize - g.padding as isize;
                                    if yy < 0 || xx < 0 || yy as usize >= g.h || xx as usize >= g.w
                                    {
                                        continue;
                                    }
                                    let (sy, sx) = (yy as usize / up, xx as usize / up);
                                    acc += x[((img * c + i) * sh + sy) * sw + sx] as f64
                                        * w[((o * c + i) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        y[((img * out_c + o) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    fn random(rng: &mut TorchGenerator, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| rng.uniform() as f32 * 2.0 * scale - scale)
            .collect()
    }

    #[test]
    fn matches_the_direct_sum_on_odd_sizes_paddings_and_upsampling() {
        let mut rng = TorchGenerator::new(5);
        // (batch, in, out, h, w, padding, up, budget): sizes that are not multiples of the
        // tile, paddings 0-2, the decoder's fused upsampling, and budgets small enough to
        // force bands of one tile row and several filter blocks.
        let cases = [
            (2, 16, 17, 9, 7, 1, 1, 1 << 30),
            (1, 19, 16, 4, 13, 0, 1, 1 << 30),
            (3, 16, 20, 5, 6, 2, 1, 1),
            (2, 16, 16, 3, 5, 1, 2, 1 << 30),
            (1, 24, 18, 8, 8, 1, 1, 1),
            // Upsampling with paddings 0 and 2; bands of two tile rows with a short last one
            // (a budget of about two tile rows: 5 tile rows in bands of 2, 2, 1).
            (1, 16, 16, 5, 4, 0, 2, 1 << 30),
            (2, 16, 16, 4, 3, 2, 2, 1 << 30),
            (1, 16, 16, 18, 9, 1, 1, 2 * 36 * 32 * 4 * 3),
            // Rows of 8 tiles and more (the vectorised phase split and merge) with a tail:
            // 10 tiles, 17 upsampled, 17 without padding.
            (1, 16, 17, 6, 37, 1, 1, 1 << 30),
            (2, 16, 16, 3, 34, 1, 2, 1 << 30),
            (1, 17, 16, 5, 70, 0, 1, 1 << 30),
        ];
        for &(b, c, out_c, sh, sw, padding, up, budget) in &cases {
            let g = ConvGeometry::new(3, 1, padding, sh * up, sw * up).unwrap();
            let x = random(&mut rng, b * c * sh * sw, 1.0);
            let w = random(&mut rng, out_c * c * 9, 0.3);
            let bias = random(&mut rng, out_c, 0.5);
            let mut y = vec![f32::NAN; b * out_c * g.out_h() * g.out_w()];
            forward(&x, &w, &bias, (b, c, sh, sw), out_c, g, up, budget, &mut y);
            let want = reference(&x, &w, &bias, (b, c, sh, sw), out_c, g, up);
            let worst = y
                .iter()
                .zip(&want)
                .map(|(a, r)| (a - r).abs())
                .fold(0f32, f32::max);
            // The worst of a few thousand outputs: 2.04e-5 on the widest case, before and
            // after the vectorised phase split (the same values).
            assert!(
                worst < 3e-5,
                "case {:?}: max error {worst}",
                (b, c, out_c, sh, sw, padding, up)
            );
        }
    }

    /// The phase split and merge against their definition, for every tail length.
    #[test]
    fn phase_split_and_merge_are_inverse_transposes() {
        for n in 0..35 {
            let line: Vec<f32> = (0..4 * n).map(|i| i as f32).collect();
            let stride = n + 3;
            let mut phases = vec![-1f32; 3 * stride + n];
            split_phases(&line, &mut phases, stride);
            for t in 0..n {
                for c in 0..M {
                    assert_eq!(phases[c * stride + t], line[4 * t + c], "n {n} t {t} c {c}");
                }
            }
            let parts: [&[f32]; M] = std::array::from_fn(|c| &phases[c * stride..][..n]);
            let mut back = vec![0f32; 4 * n];
            merge_phases(parts, &mut back);
            assert_eq!(back, line, "n {n}");
        }
    }

    #[test]
    fn filter_blocks_give_the_same_result() {
        // A bank larger than the block limit is transformed and applied block by block.
        let (b, c, out_c, s) = (2, 40, 20, 7);
        let g = ConvGeometry::new(3, 1, 1, s, s).unwrap();
        let mut rng = TorchGenerator::new(9);
        let x = random(&mut rng, b * c * s * s, 1.0);
        let w = random(&mut rng, out_c * c * 9, 0.05);
        let bias = random(&mut rng, out_c, 0.5);
        let mut y = vec![f32::NAN; b * out_c * s * s];
        // Blocks of at most 3 output channels (7 blocks of 3, the last short), in one band
        // and in bands of one tile row (the filters transformed again for each band).
        run(
            &x,
            &w,
            &bias,
            (b, c, s, s),
            out_c,
            g,
            1,
            (1 << 30, TT * c * 4 * 3),
            &mut y,
        );
        let mut banded = vec![f32::NAN; y.len()];
        run(
            &x,
            &w,
            &bias,
            (b, c, s, s),
            out_c,
            g,
            1,
            (1, TT * c * 4 * 3),
            &mut banded,
        );
        assert_eq!(y, banded);
        let want = reference(&x, &w, &bias, (b, c, s, s), out_c, g, 1);
        for (a, r) in y.iter().zip(&want) {
            assert!((a - r).abs() < 1e-4, "{a} vs {r}");
        }
    }
}
