//! A bit-exact copy of PyTorch's CPU random stream, so `--seed N` gives the image that
//! diffusers gives for `torch.Generator("cpu").manual_seed(N)`.
//!
//! torch draws from a 32-bit Mersenne Twister (mt19937). `torch.randn` on a float tensor of at
//! least 16 elements first fills it with 24-bit uniforms, then turns each block of 16 into
//! normals with Box-Muller (the first 8 uniforms give the radii, the next 8 the angles; a tail
//! that is not a multiple of 16 redraws the last 16 values). Smaller tensors use a per-element
//! double-precision Box-Muller that caches its second value in the generator.

use candle_core::{Device, Tensor};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// PyTorch's CPU generator: mt19937 plus the cached second normal sample.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchGenerator {
    state: Vec<u32>,
    index: usize,
    seed: u64,
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// The generator `torch.Generator("cpu").manual_seed(seed)` makes.
    pub fn new(seed: u64) -> Self {
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
        }
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
        for start in (0..=n - 16).step_by(16) {
            box_muller_16(&mut data[start..start + 16]);
        }
        if n % 16 != 0 {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
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
fn box_muller_16(data: &mut [f32]) {
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = two_pi * u2;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
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

    pub fn len(&self) -> usize {
        self.generators.len()
    }

    pub fn is_empty(&self) -> bool {
        self.generators.is_empty()
    }

    pub fn seeds(&self) -> Vec<u64> {
        self.generators.iter().map(|g| g.seed()).collect()
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
