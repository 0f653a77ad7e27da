//! A bit-exact copy of PyTorch's CPU random stream, so `--seed N` gives the image that
//! diffusers gives for `torch.Generator("cpu").manual_seed(N)`.
//!
//! torch draws from a 32-bit Mersenne Twister (mt19937). `torch.randn` on a float tensor of at
//! least 16 elements first fills it with 24-bit uniforms, then turns each block of 16 into
//! normals with Box-Muller (the first 8 uniforms give the radii, the next 8 the angles; a tail
//! that is not a multiple of 16 redraws the last 16 values). Smaller tensors use a per-element
//! double-precision Box-Muller that caches its second value in the generator.
//!
//! The Box-Muller of the 16-blocks depends on the CPU kernel torch dispatches to: on x86 CPUs
//! whose best torch kernel is AVX2 it uses vectorised Cephes approximations of log, sin and cos
//! (see [`NormalKernel::Avx2`]); elsewhere (AVX-512, ARM, no AVX2) it calls the C library's
//! `logf`, `cosf` and `sinf`. Both differ only in the last bits; [`NormalKernel::host`]
//! picks the one torch picks on this machine.

use candle_core::{Device, Tensor};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The kernel torch uses to turn blocks of 16 uniforms into normals (tensors of 16 or more
/// float32 values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormalKernel {
    /// torch's AVX2 kernel: float32 Cephes polynomials for log and sin/cos (the
    /// "avx_mathfun" routines), evaluated one operation at a time as below.
    Avx2,
    /// torch's portable kernel (used by its AVX-512 and default builds and on ARM): the C
    /// library's single-precision `logf`, `cosf`, `sinf`, with the angle rounded from double.
    Scalar,
}

impl NormalKernel {
    /// The kernel torch dispatches to on this CPU: AVX2 on x86-64 CPUs with AVX2 and FMA but
    /// without the AVX-512 subset torch needs for its AVX-512 kernels, the portable one
    /// otherwise. torch's `ATEN_CPU_CAPABILITY` environment variable (`default`, `avx2`,
    /// `avx512`) overrides the choice, as it does for torch.
    pub fn host() -> Self {
        match std::env::var("ATEN_CPU_CAPABILITY").ok().as_deref() {
            Some("default") | Some("avx512") => return NormalKernel::Scalar,
            Some("avx2") => return NormalKernel::Avx2,
            _ => {}
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl");
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2 && !avx512 {
                return NormalKernel::Avx2;
            }
        }
        NormalKernel::Scalar
    }
}

/// PyTorch's CPU generator: mt19937 plus the cached second normal sample.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchGenerator {
    state: Vec<u32>,
    index: usize,
    seed: u64,
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchGenerator {
    /// The generator `torch.Generator("cpu").manual_seed(seed)` makes, with the normal kernel
    /// torch uses on this machine ([`NormalKernel::host`]).
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::host())
    }

    /// As [`TorchGenerator::new`], with a chosen normal kernel.
    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        let mut state = vec![0u32; N];
        // torch seeds its mt19937 with the low 32 bits of the 64-bit seed.
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            index: N,
            seed,
            next_double_normal: None,
            kernel,
        }
    }

    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & UPPER_MASK) | (self.state[(i + 1) % N] & LOWER_MASK);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= MATRIX_A;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// One 32-bit draw (torch's `random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// A uniform draw in [0, 1) from one 32-bit output (for training's own draws; not a
    /// torch distribution).
    pub fn uniform(&mut self) -> f64 {
        self.next_u32() as f64 / 4_294_967_296.0
    }

    /// torch's `random64()`: the first 32-bit draw is the high half.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// Uniform in [0, 1) with float's 24 bits, as `uniform_real_distribution<float>`.
    fn uniform_f32(&mut self) -> f32 {
        ((self.next_u32() & 0x00ff_ffff) as f64 / (1u64 << 24) as f64) as f32
    }

    /// Uniform in [0, 1) with double's 53 bits, as `uniform_real_distribution<double>`.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 / (1u64 << 53) as f64
    }

    /// One sample of `normal_distribution<double>` (used for tensors under 16 elements).
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=self)` for a float32 tensor, as a flat vector.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let kernel = self.kernel;
        for start in (0..=n - 16).step_by(16) {
            box_muller_16(&mut data[start..start + 16], kernel);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail, kernel);
        }
        data
    }

    /// `torch.randn(shape, generator=self)` as a float32 tensor.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn_vec(n), shape, device)
    }
}

/// torch's `normal_fill_16`: 8 radii from the first half, 8 angles from the second.
fn box_muller_16(data: &mut [f32], kernel: NormalKernel) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let (radius, sin, cos) = match kernel {
            NormalKernel::Scalar => {
                // The angle is computed in double (2.0f * pi<double> * u2), then stored as float.
                let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
                ((-2.0 * u1.ln()).sqrt(), theta.sin(), theta.cos())
            }
            NormalKernel::Avx2 => {
                let theta = (2.0f64 * std::f64::consts::PI) as f32 * u2;
                let (sin, cos) = cephes::sincos(theta);
                ((-2.0 * cephes::log(u1)).sqrt(), sin, cos)
            }
        };
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// Scalar equivalents of the single-precision Cephes approximations that torch's AVX2
/// random-normal kernel evaluates eight lanes at a time. torch's x86 builds compile that kernel
/// with FMA enabled and the compiler fuses each multiplication whose only use is an addition
/// into a fused multiply-add (where both terms of an addition are products, the one computed
/// first is fused); every step below is one float32 operation of that compiled kernel, so the
/// results agree to the bit.
#[allow(clippy::excessive_precision)]
mod cephes {
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const LOG_P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const LOG_Q1: f32 = -2.12194440e-4;
    const LOG_Q2: f32 = 0.693359375;

    /// Natural logarithm for x > 0 (x <= 0 gives NaN).
    pub fn log(x: f32) -> f32 {
        if x.is_nan() || x <= 0.0 {
            return f32::NAN;
        }
        // Denormals are cut off at the smallest normal number.
        let x = x.max(f32::MIN_POSITIVE);
        let bits = x.to_bits();
        let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
        // The mantissa as a number in [0.5, 1), then m - 1 (or 2m - 1 below sqrt(1/2)).
        let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let below = m < SQRTHF;
        let tmp = if below { m } else { 0.0 };
        m -= 1.0;
        if below {
            e -= 1.0;
        }
        m += tmp;
        let z = m * m;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(m, p);
        }
        y *= m;
        y = y.mul_add(z, e * LOG_Q1);
        y = (-z).mul_add(0.5, y);
        e.mul_add(LOG_Q2, m + y)
    }

    const FOPI: f32 = 1.27323954473516;
    const DP1: f32 = -0.78515625;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8;
    const SINCOF: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    const COSCOF: [f32; 3] = [
        2.443315711809948E-5,
        -1.388731625493765E-3,
        4.166664568298827E-2,
    ];

    /// (sin x, cos x).
    pub fn sincos(x: f32) -> (f32, f32) {
        let sign_sin = x.to_bits() & 0x8000_0000;
        let mut x = x.abs();
        // Octant: x * 4/pi truncated, then rounded up to even.
        let j = (((x * FOPI) as i32) + 1) & !1;
        let y = j as f32;
        let swap_sin = ((j & 4) as u32) << 29;
        let poly_is_sin = (j & 2) == 0;
        // Extended-precision reduction x - y * pi/4.
        x = y.mul_add(DP1, x);
        x = y.mul_add(DP2, x);
        x = y.mul_add(DP3, x);
        let sign_cos = ((!(j - 2) & 4) as u32) << 29;
        let sign_sin = sign_sin ^ swap_sin;

        let z = x * x;
        let mut c = COSCOF[0];
        c = c.mul_add(z, COSCOF[1]);
        c = c.mul_add(z, COSCOF[2]);
        c *= z;
        c = c.mul_add(z, -(z * 0.5));
        c += 1.0;

        let mut s = SINCOF[0];
        s = s.mul_add(z, SINCOF[1]);
        s = s.mul_add(z, SINCOF[2]);
        s *= z;
        s = s.mul_add(x, x);

        // The kernel blends the two polynomials with masks and additions of +0.0, kept here.
        let (sin, cos) = if poly_is_sin {
            (s + 0.0, c + 0.0)
        } else {
            (c + 0.0, s + 0.0)
        };
        (
            f32::from_bits(sin.to_bits() ^ sign_sin),
            f32::from_bits(cos.to_bits() ^ sign_cos),
        )
    }
}

/// One generator per image of a batch, as diffusers' `randn_tensor` uses a list of
/// generators: image i's noise comes from generator i alone, so each image can be
/// reproduced on its own from its seed.
#[derive(Clone, Debug)]
pub struct BatchGenerator {
    generators: Vec<TorchGenerator>,
}

impl BatchGenerator {
    /// Generators seeded `seed`, `seed + 1`, ... (one per image).
    pub fn consecutive(seed: u64, count: usize) -> Self {
        Self {
            generators: (0..count as u64)
                .map(|i| TorchGenerator::new(seed.wrapping_add(i)))
                .collect(),
        }
    }

    /// As [`BatchGenerator::consecutive`], with a chosen normal kernel.
    pub fn consecutive_with_kernel(seed: u64, count: usize, kernel: NormalKernel) -> Self {
        Self {
            generators: (0..count as u64)
                .map(|i| TorchGenerator::with_kernel(seed.wrapping_add(i), kernel))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.generators.len()
    }

    pub fn is_empty(&self) -> bool {
        self.generators.is_empty()
    }

    pub fn seeds(&self) -> Vec<u64> {
        self.generators.iter().map(|g| g.seed()).collect()
    }

    /// Noise of `shape` from generator `index` alone (diffusers passing one generator of its
    /// list, as when it samples a picture's latent distribution).
    pub fn randn_one(
        &mut self,
        index: usize,
        shape: &[usize],
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let count = self.generators.len();
        let Some(g) = self.generators.get_mut(index) else {
            candle_core::bail!("no generator {index} of {count}");
        };
        let n: usize = shape.iter().product();
        Tensor::from_vec(g.randn_vec(n), shape, device)
    }

    /// Noise of `shape`, whose first axis is the batch: row i comes from generator i.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        if shape.first() != Some(&self.generators.len()) {
            candle_core::bail!(
                "noise shape {shape:?} does not start with the batch of {} generators",
                self.generators.len()
            );
        }
        let per_item: usize = shape[1..].iter().product();
        let mut data = Vec::with_capacity(per_item * self.generators.len());
        for g in &mut self.generators {
            data.extend(g.randn_vec(per_item));
        }
        Tensor::from_vec(data, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The 10000th output of mt19937 seeded 5489 is 4123659995 (C++ standard, [rand.predef]).
        let mut g = TorchGenerator::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }
}
