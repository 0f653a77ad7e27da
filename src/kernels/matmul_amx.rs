//! Intel AMX tiles for the bf16 products of [`super::matmul_bf16`]: one TDPBF16PS multiplies a
//! 16x32 bf16 tile by a 32x16 one into 16x16 f32 sums, 16 times the multiply-adds of an
//! AVX-512 FMA per cycle. The right operand keeps `matmul_bf16`'s packing: a panel of 32
//! columns in pairs is two B tiles side by side (rows of 128 bytes). The left operand is
//! packed as plain bf16 rows (an A tile's rows are 32 consecutive values of the depth).
//!
//! The tile instructions are written as inline assembly: their intrinsics are not stable.
//! Each thread loads the tile configuration before its first tile and releases it after.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;

use super::matmul_bf16::Operand;

/// Rows per micro-tile (two A tiles of 16) and depth per tile step.
pub(super) const ROWS: usize = 32;
pub(super) const DEPTH: usize = 32;

/// Whether this CPU has AMX-BF16 and the OS lets the process use the tile registers (Linux
/// asks each process to request them).
pub(super) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request for a permission; it changes no memory.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The tile configuration (palette 1): tmm0-3 the four 16x16 f32 blocks of a 32x32 result,
/// tmm4-5 two 16x32 bf16 A tiles, tmm6-7 two B tiles of 16 pairs x 16 columns; every tile 16
/// rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile configuration on this thread; [`release`] undoes it.
///
/// # Safety
/// [`available`] must hold.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn configure() {
    let mut config = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
}

/// Releases this thread's tile state.
///
/// # Safety
/// [`available`] must hold.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// c (32 x 32 f32, rows 32 values apart) = a (32 rows of `depth` bf16, `depth` a multiple of
/// 32) . b (depth / 2 pairs of a 32-column panel, 128 bytes a pair).
///
/// # Safety
/// [`configure`] ran on this thread; the buffers hold what the sizes say.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn tile(depth: usize, a: *const u16, b: *const u16, c: *mut f32) {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    let (a_stride, b_stride) = (depth * 2, 128usize);
    for step in (0..depth).step_by(DEPTH) {
        let b0 = b.add(step * 32);
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a.add(step),
            a1 = in(reg) a.add(16 * depth + step),
            b0 = in(reg) b0,
            b1 = in(reg) b0.add(32),
            sa = in(reg) a_stride,
            sb = in(reg) b_stride,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(16 * 32),
        c3 = in(reg) c.add(16 * 32 + 16),
        s = in(reg) 128usize,
        options(nostack)
    );
}

/// Packs rows 0..mc and columns 0..kc of `lhs` as bf16 rows of `depth` values (kc rounded up
/// to 32), in whole groups of 32 rows; missing rows and columns are zeros.
///
/// # Safety
/// The operand's rows 0..mc and columns 0..kc are in bounds; `out` holds mc rounded up to 32
/// rows of `depth` values.
pub(super) unsafe fn pack_rows(lhs: Operand, mc: usize, kc: usize, depth: usize, out: &mut [u16]) {
    let rows = mc.div_ceil(ROWS) * ROWS;
    for r in 0..rows {
        let dst = &mut out[r * depth..][..depth];
        if r >= mc {
            dst.fill(0);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if let Operand::F32(p, rs, 1) = lhs {
            convert_row(p.offset(r as isize * rs), kc, dst);
            continue;
        }
        for (c, v) in dst.iter_mut().enumerate() {
            *v = if c < kc { lhs.at(r, c) } else { 0 };
        }
    }
}

/// `kc` f32 values rounded to bf16 (to nearest even) into `dst`, zeros after them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_row(src: *const f32, kc: usize, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let lanes = |n: usize| -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    };
    for c0 in (0..dst.len()).step_by(32) {
        let left = kc.saturating_sub(c0);
        let lo = _mm512_maskz_loadu_ps(lanes(left), src.wrapping_add(c0));
        let hi = _mm512_maskz_loadu_ps(lanes(left.saturating_sub(16)), src.wrapping_add(c0 + 16));
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        let keep = (dst.len() - c0).min(32);
        let mask: __mmask32 = if keep >= 32 {
            u32::MAX
        } else {
            (1u32 << keep) - 1
        };
        _mm512_mask_storeu_epi16(dst.as_mut_ptr().add(c0) as *mut i16, mask, v);
    }
}
