//! Matrix products in bf16 with f32 sums, on AVX-512 BF16's dot-product instruction
//! (VDPBF16PS: each of 16 f32 lanes adds the products of two bf16 pairs): twice the
//! multiply-adds of an f32 FMA per instruction, on operands half the bytes; on AMX tiles
//! ([`super::matmul_amx`]) where the CPU has those. Taken, once [`enable`]d, by the layers whose
//! weights are stored in bf16 (`--dtype bf16 --compute bf16`) on CPUs that have it.
//!
//! Blocked as GotoBLAS does: for each block of `NC` columns and `KC` of depth, the right
//! operand is packed once into panels of `NR` columns with the depth in pairs
//! (`[k/2][NR][2]` bf16: one pair per lane), and each block of `MC` rows of the left operand
//! into panels of `MR` rows (`[k/2][MR]` pairs, broadcast one at a time); an `MR` x `NR`
//! micro-kernel keeps its 24 accumulators in registers. Both operands are rounded to bf16 (to
//! nearest, ties to even) as they are packed, so f32 activations and bf16 weights mix.
//!
//! The same packed layout has a portable micro-kernel, used where the CPU lacks the
//! instruction only by the tests (callers check [`available`] first).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::matmul::Strided;
use super::parallel::threads_for;

/// Micro-kernel rows (broadcast values) and columns (two 16-lane registers).
const MR: usize = 12;
const NR: usize = 32;
/// Depth per packed block (even: whole pairs), rows per packed left block (a multiple of
/// `MR`), columns per packed right block (a multiple of `NR`). A right block is
/// KC x NC x 2 bytes = 384 KiB, within a core's L2; a left block 90 KiB.
const KC: usize = 384;
const MC: usize = 120;
const NC: usize = 512;

/// An operand of [`product`]: f32 values (rounded as they are packed) or bf16 bits.
#[derive(Clone, Copy)]
pub(super) enum Operand {
    F32(*const f32, isize, isize),
    Bf16(*const u16, isize, isize),
}

impl Operand {
    pub(super) fn f32(m: Strided<*const f32>) -> Self {
        Self::F32(m.ptr, m.row_stride, m.col_stride)
    }

    pub(super) fn bf16(m: Strided<*const u16>) -> Self {
        Self::Bf16(m.ptr, m.row_stride, m.col_stride)
    }

    /// The element at (r, c) as bf16 bits.
    ///
    /// # Safety
    /// (r, c) must address an element inside the operand's buffer.
    #[inline(always)]
    pub(super) unsafe fn at(self, r: usize, c: usize) -> u16 {
        match self {
            Self::F32(p, rs, cs) => to_bf16(*p.offset(r as isize * rs + c as isize * cs)),
            Self::Bf16(p, rs, cs) => *p.offset(r as isize * rs + c as isize * cs),
        }
    }

    /// The operand starting `r` rows and `c` columns further on.
    pub(super) unsafe fn offset(self, r: usize, c: usize) -> Self {
        match self {
            Self::F32(p, rs, cs) => Self::F32(p.offset(r as isize * rs + c as isize * cs), rs, cs),
            Self::Bf16(p, rs, cs) => {
                Self::Bf16(p.offset(r as isize * rs + c as isize * cs), rs, cs)
            }
        }
    }
}

/// f32 to bf16 bits, rounded to nearest with ties to even (quiet NaNs stay NaN).
#[inline(always)]
pub(super) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Whether layers stored in bf16 multiply in bf16: asked for with [`enable`] (off by default)
/// and [`supported`] by this CPU.
pub fn available() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed) && supported()
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the bf16 products of layers stored in bf16 on or off for the process; returns
/// whether they run (the CPU supports them). Off by default: on the one CPU measured so far (a
/// 16-core Xeon with AMX), the SD 1.5 U-Net step was no faster than with f32 products; see
/// the README's figures.
pub fn enable(on: bool) -> bool {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
    available()
}

/// Whether this CPU has bf16 products: AVX-512 BF16's dot product (VDPBF16PS), with AMX tiles
/// where it has those too.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x (.., k) . w^T` for f32 activations and a bf16 (n, k) weight (a layer's, as checkpoints
/// store it), in bf16 products with f32 sums: a linear layer's product without widening its
/// weight. Inference only (no gradient).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::require_supported(x, "bf16 linear")?;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2_no_bwd(&w, &LinearBf16)
}

struct LinearBf16;

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "bf16 linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(xs, xl, "bf16 linear", "input")?;
        let (CpuStorage::BF16(w), Some((w0, w1))) = (ws, wl.contiguous_offsets()) else {
            candle_core::bail!("bf16 linear: the weight must be a contiguous bf16 matrix");
        };
        let ((m, n, k), shape) = super::linear::product_shape("bf16 linear", xl, wl)?;
        let w = &w[w0..w1];
        let mut y = super::parallel::zeroed(m * n);
        // SAFETY: x is m x k, w n x k and y m x n, all row-major and contiguous; w's rows
        // are the columns of the k x n operand.
        unsafe {
            product(
                (m, n, k),
                Strided::rows(y.as_mut_ptr(), n),
                false,
                Operand::f32(Strided::rows(x.as_ptr(), k)),
                Operand::bf16(Strided::columns(w.as_ptr() as *const u16, k)),
                threads_for(usize::MAX),
            );
        }
        Ok((CpuStorage::F32(y), shape))
    }
}

/// Which micro-kernel runs: AMX tiles or VDPBF16PS where the CPU has them, else (tests) the
/// portable one.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kernel {
    Amx,
    Native,
    Portable,
}

/// dst (m x n, rows contiguous) = lhs (m x k) . rhs (k x n) in bf16 with f32 sums, added to
/// dst when `accumulate`; its rows split over up to `threads` threads (a product of fewer
/// rows than two micro-tiles per thread uses fewer). Callers check [`available`].
///
/// # Safety
/// Every element the views address for these sizes must be in bounds; dst (row stride
/// `dst.row_stride`, column stride 1) must not overlap lhs or rhs.
pub(super) unsafe fn product(
    sizes: (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    threads: usize,
) {
    let kernel = if supported() && super::matmul_amx::available() {
        Kernel::Amx
    } else if supported() {
        Kernel::Native
    } else {
        Kernel::Portable
    };
    product_with(kernel, sizes, dst, accumulate, lhs, rhs, threads)
}

/// Raw views shared by the threads of one product: each writes its own rows of dst and its
/// own panels of the packed right block.
#[derive(Clone, Copy)]
struct Shared {
    dst: *mut f32,
    ld: isize,
    lhs: Operand,
    rhs: Operand,
    bp: *mut u16,
}
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Runs `f(0..parts)`, side by side on the thread pool when there are several.
fn fan_out(parts: usize, f: impl Fn(usize) + Sync) {
    if parts <= 1 {
        return f(0);
    }
    rayon::scope(|scope| {
        for t in 0..parts {
            let f = &f;
            scope.spawn(move |_| f(t));
        }
    });
}

/// The blocked product. Per block of the right operand, the threads first pack its panels
/// (each a share, into the one buffer they all read), then multiply their own runs of rows,
/// each packing its own rows of the left operand.
unsafe fn product_with(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    threads: usize,
) {
    assert_eq!(
        dst.col_stride, 1,
        "bf16 product: rows of dst must be contiguous"
    );
    if m == 0 || n == 0 {
        return;
    }
    let mut bp = vec![0u16; KC * NC];
    let shared = Shared {
        dst: dst.ptr,
        ld: dst.row_stride,
        lhs,
        rhs,
        bp: bp.as_mut_ptr(),
    };
    let (row_parts, rows_per) = row_runs(m, MR, threads);
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        let panels = nc.div_ceil(NR);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // AMX reads the depth in whole tiles of 32: the panels get zero pairs up to one.
            let depth = match kernel {
                Kernel::Amx => kc.next_multiple_of(super::matmul_amx::DEPTH),
                _ => kc,
            };
            let pairs = depth.div_ceil(2);
            let pack_parts = threads.min(panels).max(1);
            let per = panels.div_ceil(pack_parts);
            fan_out(pack_parts, |t| {
                let s = shared;
                let (p0, p1) = (t * per, ((t + 1) * per).min(panels));
                if p0 >= p1 {
                    return;
                }
                // SAFETY: panels p0..p1 of the block lie inside bp (KC x NC values) and no
                // other part writes them; the operand's rows k0.. and columns j0.. are in bounds.
                unsafe {
                    let out = std::slice::from_raw_parts_mut(
                        s.bp.add(p0 * pairs * 2 * NR),
                        (p1 - p0) * pairs * 2 * NR,
                    );
                    let cols = (nc - p0 * NR).min((p1 - p0) * NR);
                    pack_right(kernel, s.rhs.offset(k0, j0 + p0 * NR), kc, cols, pairs, out);
                }
            });
            let add = accumulate || k0 > 0;
            #[cfg(target_arch = "x86_64")]
            if kernel == Kernel::Amx {
                let (parts, per) = row_runs(m, super::matmul_amx::ROWS, threads);
                fan_out(parts, |t| {
                    let (r0, r1) = (t * per, ((t + 1) * per).min(m));
                    // SAFETY: rows r0..r1 belong to this part alone.
                    unsafe { amx_rows(shared, (r0, r1), (j0, nc), (k0, kc, depth), add) };
                });
                continue;
            }
            fan_out(row_parts, |t| {
                let s = shared;
                let (r0, r1) = (t * rows_per, ((t + 1) * rows_per).min(m));
                let mut ap = vec![0u32; MC * KC / 2];
                let mut tile = [[0f32; NR]; MR];
                for i0 in (r0..r1).step_by(MC) {
                    let mc = MC.min(r1 - i0);
                    // SAFETY: rows i0..i0 + mc belong to this part alone; every view stays
                    // inside the caller's (the packed buffers hold whole panels).
                    unsafe {
                        pack_left(kernel, s.lhs.offset(i0, k0), mc, kc, &mut ap);
                        for jp in 0..panels {
                            let b = s.bp.add(jp * pairs * 2 * NR);
                            let cols = NR.min(nc - jp * NR);
                            for ip in 0..mc.div_ceil(MR) {
                                let a = ap.as_ptr().add(ip * pairs * MR);
                                match kernel {
                                    #[cfg(target_arch = "x86_64")]
                                    Kernel::Native => tile_native(pairs, a, b, &mut tile),
                                    _ => tile_portable(pairs, a, b, &mut tile),
                                }
                                let row0 = i0 + ip * MR;
                                let rows = MR.min(i0 + mc - row0);
                                let at = (row0, j0 + jp * NR);
                                store_tile(s, at, &tile[..rows], cols, add);
                            }
                        }
                    }
                }
            });
        }
    }
}

/// How `m` rows split into runs of whole `unit`-row micro-tiles over at most `threads`
/// threads: the number of runs and the rows per run (the last may be shorter or empty).
fn row_runs(m: usize, unit: usize, threads: usize) -> (usize, usize) {
    let parts = threads.min(m.div_ceil(unit)).max(1);
    (parts, m.div_ceil(unit).div_ceil(parts) * unit)
}

/// Writes (or, with `add`, adds) a micro-tile's first `cols` columns of each of its rows into
/// dst at (row, column) `at`.
///
/// # Safety
/// Those rows and columns of dst are in bounds and written by this thread alone.
unsafe fn store_tile(s: Shared, at: (usize, usize), tile: &[[f32; NR]], cols: usize, add: bool) {
    let origin = s.dst.offset(at.0 as isize * s.ld + at.1 as isize);
    for (r, vals) in tile.iter().enumerate() {
        let row = std::slice::from_raw_parts_mut(origin.offset(r as isize * s.ld), cols);
        if add {
            row.iter_mut().zip(vals).for_each(|(d, v)| *d += v);
        } else {
            row.copy_from_slice(&vals[..cols]);
        }
    }
}

/// One thread's rows r0..r1 of a block (columns j0..j0 + nc, depth k0..k0 + kc padded to
/// `depth`) on AMX tiles: its rows packed in blocks of MC, then 32 x 32 tiles against every
/// panel of the packed right block.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_rows(
    s: Shared,
    (r0, r1): (usize, usize),
    (j0, nc): (usize, usize),
    (k0, kc, depth): (usize, usize, usize),
    add: bool,
) {
    use super::matmul_amx::{configure, pack_rows, release, tile, ROWS};
    const MC_AMX: usize = 128;
    let mut ap = vec![0u16; MC_AMX * depth];
    let mut out = [[0f32; NR]; ROWS];
    configure();
    for i0 in (r0..r1).step_by(MC_AMX) {
        let mc = MC_AMX.min(r1 - i0);
        pack_rows(s.lhs.offset(i0, k0), mc, kc, depth, &mut ap);
        for jp in 0..nc.div_ceil(NR) {
            let b = s.bp.add(jp * depth / 2 * 2 * NR);
            let cols = NR.min(nc - jp * NR);
            for ip in 0..mc.div_ceil(ROWS) {
                tile(
                    depth,
                    ap.as_ptr().add(ip * ROWS * depth),
                    b,
                    out.as_mut_ptr() as *mut f32,
                );
                let row0 = i0 + ip * ROWS;
                let rows = ROWS.min(i0 + mc - row0);
                store_tile(s, (row0, j0 + jp * NR), &out[..rows], cols, add);
            }
        }
    }
    release();
}

/// Packs rows 0..kc and columns 0..nc of `rhs` into panels of NR columns, `[pair][NR][2]`
/// each, `panel_pairs` pairs to a panel; a missing last row of an odd depth, the pairs past
/// kc and the columns past nc are zeros.
unsafe fn pack_right(
    kernel: Kernel,
    rhs: Operand,
    kc: usize,
    nc: usize,
    panel_pairs: usize,
    bp: &mut [u16],
) {
    let pairs = kc.div_ceil(2);
    if panel_pairs > pairs {
        for panel in bp.chunks_mut(panel_pairs * 2 * NR).take(nc.div_ceil(NR)) {
            panel[pairs * 2 * NR..].fill(0);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        let (kcp, stride) = ((kc, nc), panel_pairs);
        match rhs {
            Operand::F32(p, rs, 1) => return pack_right_native(Rows::F32(p), rs, kcp, stride, bp),
            Operand::Bf16(p, rs, 1) => {
                return pack_right_native(Rows::Bf16(p), rs, kcp, stride, bp)
            }
            _ => {}
        }
    }
    let _ = kernel;
    // A layer's (n, k) weight read as the (k, n) operand: each column's values lie in a row,
    // and a pair is two neighbours.
    if let Operand::Bf16(p, 1, cs) = rhs {
        for jp in 0..nc.div_ceil(NR) {
            let panel = &mut bp[jp * panel_pairs * 2 * NR..][..pairs * 2 * NR];
            let cols = NR.min(nc - jp * NR);
            for c in 0..NR {
                if c >= cols {
                    for pair in panel.chunks_exact_mut(2 * NR) {
                        pair[2 * c] = 0;
                        pair[2 * c + 1] = 0;
                    }
                    continue;
                }
                let column = std::slice::from_raw_parts(p.offset((jp * NR + c) as isize * cs), kc);
                for (pr, pair) in panel.chunks_exact_mut(2 * NR).enumerate() {
                    pair[2 * c] = column[2 * pr];
                    pair[2 * c + 1] = column.get(2 * pr + 1).copied().unwrap_or(0);
                }
            }
        }
        return;
    }
    for jp in 0..nc.div_ceil(NR) {
        let panel = &mut bp[jp * panel_pairs * 2 * NR..][..pairs * 2 * NR];
        let cols = NR.min(nc - jp * NR);
        for p in 0..pairs {
            let out = &mut panel[p * 2 * NR..][..2 * NR];
            for c in 0..NR {
                let col = jp * NR + c;
                let (lo, hi) = if c < cols {
                    let hi = if 2 * p + 1 < kc {
                        rhs.at(2 * p + 1, col)
                    } else {
                        0
                    };
                    (rhs.at(2 * p, col), hi)
                } else {
                    (0, 0)
                };
                out[2 * c] = lo;
                out[2 * c + 1] = hi;
            }
        }
    }
}

/// Packs rows 0..mc and columns 0..kc of `lhs` into panels of MR rows, `[pair][MR]` each,
/// a pair's first value in the low half; missing rows and an odd depth's last value are
/// zeros.
unsafe fn pack_left(kernel: Kernel, lhs: Operand, mc: usize, kc: usize, ap: &mut [u32]) {
    let pairs = kc.div_ceil(2);
    #[cfg(target_arch = "x86_64")]
    if let (Kernel::Native, Operand::F32(p, rs, 1)) = (kernel, lhs) {
        return pack_left_f32_native(p, rs, mc, kc, ap);
    }
    let _ = kernel;
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut ap[ip * pairs * MR..][..pairs * MR];
        let rows = MR.min(mc - ip * MR);
        for r in 0..MR {
            if r >= rows {
                for p in 0..pairs {
                    panel[p * MR + r] = 0;
                }
                continue;
            }
            let row = ip * MR + r;
            for p in 0..pairs {
                let lo = lhs.at(row, 2 * p) as u32;
                let hi = if 2 * p + 1 < kc {
                    lhs.at(row, 2 * p + 1) as u32
                } else {
                    0
                };
                panel[p * MR + r] = lo | hi << 16;
            }
        }
    }
}

/// The portable micro-kernel: what VDPBF16PS computes, one lane at a time (each bf16
/// product is exact in f32; the sums round as the instruction's do, up to their order).
unsafe fn tile_portable(pairs: usize, a: *const u32, b: *const u16, out: &mut [[f32; NR]; MR]) {
    *out = [[0.0; NR]; MR];
    for p in 0..pairs {
        let bs = std::slice::from_raw_parts(b.add(p * 2 * NR), 2 * NR);
        for (r, row) in out.iter_mut().enumerate() {
            let pair = *a.add(p * MR + r);
            let (lo, hi) = (from_bf16(pair as u16), from_bf16((pair >> 16) as u16));
            for (c, acc) in row.iter_mut().enumerate() {
                *acc += hi * from_bf16(bs[2 * c + 1]);
                *acc += lo * from_bf16(bs[2 * c]);
            }
        }
    }
}

/// The AVX-512 BF16 micro-kernel: per pair of depth, two 32-value loads of the right panel
/// and one broadcast per row, 24 accumulating dot products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_native(pairs: usize, a: *const u32, b: *const u16, out: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..pairs {
        let bb = b.add(p * 2 * NR) as *const __m512i;
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bb));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bb.add(1)));
        let ar = a.add(p * MR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    for (row, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
        _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
    }
}

/// The rows a native packer reads: f32 (rounded as packed) or bf16 bits.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Rows {
    F32(*const f32),
    Bf16(*const u16),
}

/// Mask of the first `n` (at most 16) lanes.
#[cfg(target_arch = "x86_64")]
fn lanes(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// [`pack_right`] for rows with contiguous columns: per pair of rows and 16 columns, one
/// conversion of both rows (f32: rounded to nearest even) and one interleaving permutation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_right_native(
    src: Rows,
    rs: isize,
    (kc, nc): (usize, usize),
    panel_pairs: usize,
    bp: &mut [u16],
) {
    use std::arch::x86_64::*;
    let pairs = kc.div_ceil(2);
    // Lane 2c takes the first row's column c (element c), lane 2c + 1 the second's (16 + c).
    let idx: [u16; 32] = std::array::from_fn(|i| (i / 2 + (i % 2) * 16) as u16);
    let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
    // Rows 2p and 2p + 1 at columns c0.. (addresses past the end are masked off, never read), as 32 bf16 values: the first row's 16, then the
    // second's (zeros past kc or nc).
    let both = |pr: usize, c0: usize, mask: __mmask16| -> __m512i {
        let second = 2 * pr + 1 < kc;
        let (r0, r1) = ((2 * pr) as isize * rs, (2 * pr + 1) as isize * rs);
        match src {
            Rows::F32(p) => {
                let lo = _mm512_maskz_loadu_ps(mask, p.wrapping_offset(r0).wrapping_add(c0));
                let hi = if second {
                    _mm512_maskz_loadu_ps(mask, p.wrapping_offset(r1).wrapping_add(c0))
                } else {
                    _mm512_setzero_ps()
                };
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
            }
            Rows::Bf16(p) => {
                let lo = _mm256_maskz_loadu_epi16(
                    mask,
                    p.wrapping_offset(r0).wrapping_add(c0) as *const i16,
                );
                let hi = if second {
                    _mm256_maskz_loadu_epi16(
                        mask,
                        p.wrapping_offset(r1).wrapping_add(c0) as *const i16,
                    )
                } else {
                    _mm256_setzero_si256()
                };
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            }
        }
    };
    for jp in 0..nc.div_ceil(NR) {
        let panel = bp.as_mut_ptr().add(jp * panel_pairs * 2 * NR);
        for half in 0..2 {
            let c0 = jp * NR + half * 16;
            let mask: __mmask16 = lanes(nc.saturating_sub(c0));
            for pr in 0..pairs {
                let interleaved = _mm512_permutexvar_epi16(idx, both(pr, c0, mask));
                _mm512_storeu_si512(
                    panel.add(pr * 2 * NR + half * 32) as *mut __m512i,
                    interleaved,
                );
            }
        }
    }
}

/// [`pack_left`] for f32 rows with contiguous columns: 32 values of a row converted at once
/// (16 pairs, rounded to nearest even), scattered to their pairs' places in the panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_left_f32_native(p: *const f32, rs: isize, mc: usize, kc: usize, ap: &mut [u32]) {
    use std::arch::x86_64::*;
    let pairs = kc.div_ceil(2);
    let offsets: [i32; 16] = std::array::from_fn(|j| (j * MR) as i32);
    let offsets = _mm512_loadu_si512(offsets.as_ptr() as *const __m512i);
    for ip in 0..mc.div_ceil(MR) {
        let panel = ap.as_mut_ptr().add(ip * pairs * MR);
        let rows = MR.min(mc - ip * MR);
        for r in 0..MR {
            if r >= rows {
                for pr in 0..pairs {
                    *panel.add(pr * MR + r) = 0;
                }
                continue;
            }
            let row = p.offset((ip * MR + r) as isize * rs);
            for k0 in (0..kc).step_by(32) {
                let left = kc - k0;
                let lo = _mm512_maskz_loadu_ps(lanes(left), row.wrapping_add(k0));
                let hi = _mm512_maskz_loadu_ps(
                    lanes(left.saturating_sub(16)),
                    row.wrapping_add(k0 + 16),
                );
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let base = panel.add(k0 / 2 * MR + r) as *mut i32;
                _mm512_mask_i32scatter_epi32::<4>(base, lanes(left.div_ceil(2)), offsets, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::TorchGenerator;

    fn random(rng: &mut TorchGenerator, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
    }

    /// The product of the operands rounded to bf16, summed in f64: what the kernel computes
    /// up to the order of its f32 sums.
    fn reference(a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| r(a[i * k + p]) * r(b[p * n + j])).sum();
            }
        }
        out
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        // 1 + 3 * 2^-8 is halfway between odd 0x3f81 and even 0x3f82.
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    }

    fn check(kernel: Kernel, sizes: (usize, usize, usize), threads: usize, accumulate: bool) {
        let (m, n, k) = sizes;
        let mut rng = TorchGenerator::new((m * 1000 + n * 10 + k) as u64);
        let (a, b) = (random(&mut rng, m * k), random(&mut rng, k * n));
        let start = random(&mut rng, m * n);
        // The destination sits inside a wider buffer (row stride n + 3) whose margins must
        // stay untouched.
        let stride = n + 3;
        let mut dst = vec![7.0f32; m * stride];
        for i in 0..m {
            dst[i * stride..][..n].copy_from_slice(&start[i * n..][..n]);
        }
        // Half the cases give the right operand as bf16 bits, the left transposed (column
        // stride m), as a convolution's and an attention's views are.
        let b16: Vec<u16> = b.iter().map(|&x| to_bf16(x)).collect();
        let mut a_t = vec![0f32; m * k];
        for i in 0..m {
            for p in 0..k {
                a_t[p * m + i] = a[i * k + p];
            }
        }
        let bf16_rhs = (m + n + k) % 2 == 0;
        unsafe {
            let lhs = if bf16_rhs {
                Operand::F32(a_t.as_ptr(), 1, m as isize)
            } else {
                Operand::f32(Strided::rows(a.as_ptr(), k))
            };
            let rhs = if bf16_rhs {
                Operand::bf16(Strided::rows(b16.as_ptr(), n))
            } else {
                Operand::f32(Strided::rows(b.as_ptr(), n))
            };
            product_with(
                kernel,
                sizes,
                Strided::rows(dst.as_mut_ptr(), stride),
                accumulate,
                lhs,
                rhs,
                threads,
            );
        }
        let want = reference(&a, &b, sizes);
        for i in 0..m {
            for j in 0..n {
                let base = if accumulate {
                    start[i * n + j] as f64
                } else {
                    0.0
                };
                let (got, want) = (dst[i * stride + j] as f64, base + want[i * n + j]);
                // f32 sums of k products of magnitude <= 1.
                let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6;
                assert!(
                    (got - want).abs() <= tol,
                    "{kernel:?} {sizes:?} threads {threads}: ({i}, {j}) {got} vs {want}"
                );
            }
            assert!(dst[i * stride + n..][..3].iter().all(|&v| v == 7.0));
        }
    }

    #[test]
    fn linear_multiplies_by_a_bf16_weight() {
        use candle_core::{DType, Device};
        let mut rng = TorchGenerator::new(3);
        let (k, n) = (40, 33);
        let x = random(&mut rng, 2 * 5 * k);
        let w = random(&mut rng, k * n);
        let xt = Tensor::from_vec(x.clone(), (2, 5, k), &Device::Cpu).unwrap();
        // The layer's (n, k) weight: the transpose of the (k, n) operand `w`.
        let wt = Tensor::from_vec(w.clone(), (k, n), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = linear(&xt, &wt).unwrap();
        assert_eq!(y.dims(), &[2, 5, n]);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference(&x, &w, (10, n, k));
        for (got, want) in y.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-4, "{got} vs {want}");
        }
        // A weight that does not fit the input is an error, not a panic.
        let narrow = wt.narrow(1, 0, k - 1).unwrap();
        assert!(linear(&xt, &narrow).is_err());
    }

    /// Sizes around every block edge: panels of 12 rows and 32 columns, blocks of 120 rows,
    /// 512 columns and 384 of depth, odd depths (a half-empty last pair).
    const SIZES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (5, 7, 3),
        (12, 32, 2),
        (13, 33, 17),
        (25, 65, 384),
        (121, 40, 385),
        (30, 513, 770),
        (130, 20, 9),
        (7, 600, 1),
    ];

    #[test]
    fn portable_kernel_matches_the_rounded_operands_product() {
        for (i, &sizes) in SIZES.iter().enumerate() {
            check(Kernel::Portable, sizes, 1 + i % 3, i % 2 == 0);
        }
    }

    /// AMX tiles, on CPUs that have them (the tests pass elsewhere without them).
    #[test]
    fn amx_tiles_match_the_rounded_operands_product() {
        if !(supported() && super::super::matmul_amx::available()) {
            eprintln!("no AMX on this CPU: the tile kernel is not tested");
            return;
        }
        for (i, &sizes) in SIZES.iter().enumerate() {
            check(Kernel::Amx, sizes, 1 + i % 3, i % 2 == 1);
        }
    }

    /// The instruction itself, on CPUs that have it (the tests pass elsewhere without it).
    #[test]
    fn native_kernel_matches_the_rounded_operands_product() {
        if !supported() {
            eprintln!("no AVX-512 BF16 on this CPU: the native bf16 kernel is not tested");
            return;
        }
        for (i, &sizes) in SIZES.iter().enumerate() {
            check(Kernel::Native, sizes, 1 + i % 3, i % 2 == 1);
        }
    }
}
