//! Classifier-free guidance: how the conditional and unconditional predictions combine.
//!
//! Guidance pushes the prediction past the conditional one, and with a zero-terminal-SNR
//! schedule (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
//! section 3.4) the push overshoots: colors burn and flat areas get blotches. Their fix,
//! diffusers' `guidance_rescale`, scales each image's guided prediction back to the standard
//! deviation of its conditional one and blends that with the plain guided prediction.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The part of the denoising steps where guidance applies, as fractions of the step count
/// (the `start` / `stop` of diffusers' guiders, e.g. `ClassifierFreeGuidance`). Outside it the
/// U-Net runs on the conditional half only: guidance is what fixes an image's content in the
/// noisy early steps, while in the last steps it mostly sharpens and over-saturates (Kynkäänniemi
/// et al. 2024, "Applying Guidance in a Limited Interval"), and skipping it there halves
/// those steps' cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuidanceInterval {
    pub start: f64,
    pub end: f64,
}

impl Default for GuidanceInterval {
    fn default() -> Self {
        Self {
            start: 0.0,
            end: 1.0,
        }
    }
}

impl GuidanceInterval {
    /// Checks `0 <= start < end <= 1`.
    pub fn new(start: f64, end: f64) -> Result<Self> {
        if !(start.is_finite() && end.is_finite() && 0.0 <= start && start < end && end <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "guidance interval must satisfy 0 <= start < end <= 1, not {start},{end}"
            )));
        }
        Ok(Self { start, end })
    }

    /// Parses `START,END`, e.g. `0,0.5`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidRequest(format!(
                "guidance interval `{text}` is not START,END (two numbers from 0 to 1, e.g. 0,0.5)"
            ))
        };
        let (start, end) = text.split_once(',').ok_or_else(bad)?;
        let start: f64 = start.trim().parse().map_err(|_| bad())?;
        let end: f64 = end.trim().parse().map_err(|_| bad())?;
        Self::new(start, end)
    }

    pub fn is_full(&self) -> bool {
        self.start <= 0.0 && self.end >= 1.0
    }

    /// Whether step `i` (0-based) of `steps` is guided: diffusers' guiders' rule,
    /// `int(start * steps) <= i < int(stop * steps)` (the same f64 product, floored).
    pub fn guides_step(&self, i: usize, steps: usize) -> bool {
        let first = (self.start * steps as f64).floor() as usize;
        let stop = (self.end * steps as f64).floor() as usize;
        first <= i && i < stop
    }
}

impl std::fmt::Display for GuidanceInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.start, self.end)
    }
}

/// `uncond + scale * (text - uncond)`, then, when `rescale > 0`, blended by `rescale` with
/// that result rescaled per image (dimension 0) to the standard deviation of `text`.
/// Standard deviations are unbiased (n - 1), as torch's `std`.
pub fn guide(uncond: &Tensor, text: &Tensor, scale: f64, rescale: f64) -> Result<Tensor> {
    let guided = (uncond + ((text - uncond)? * scale)?)?;
    if rescale <= 0.0 {
        return Ok(guided);
    }
    let ratio = (per_image_std(text)? / per_image_std(&guided)?)?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    Ok(((rescaled * rescale)? + (guided * (1.0 - rescale))?)?)
}

/// Autoguidance (Karras et al., "Guiding a diffusion model with a bad version of itself",
/// 2024): `guided + (weight - 1) * (text - weak)`, where `weak` is a weaker U-Net's conditional
/// prediction for the same input. A weaker model makes the same kinds of errors, only larger;
/// stepping away from it removes some of the strong model's own (blurred, lumpy shapes)
/// without the loss of variety that a larger classifier-free scale brings. Added to the
/// classifier-free result (`guided`, which is `text` itself without it), after its
/// `guidance_rescale`, which therefore does not damp this term; weight 1 changes nothing.
pub fn autoguide(guided: &Tensor, text: &Tensor, weak: &Tensor, weight: f64) -> Result<Tensor> {
    Ok((guided + ((text - weak)? * (weight - 1.0))?)?)
}

/// The unbiased standard deviation of each image of a batch, shaped (n, 1, 1, ...) to
/// broadcast back over it. Accumulated in f32 whatever the input's dtype.
fn per_image_std(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let flat = x.to_dtype(DType::F32)?.reshape((n, ()))?;
    let count = flat.dim(1)?;
    let mean = flat.mean_keepdim(1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let variance = (centred.sqr()?.sum_keepdim(1)? / (count.saturating_sub(1).max(1)) as f64)?;
    let mut shape = vec![n];
    shape.resize(x.rank(), 1);
    Ok(variance.sqrt()?.reshape(shape)?.to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(values: &[f32], shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn interval_guides_the_steps_inside_it() {
        let full = GuidanceInterval::default();
        assert!((0..12).all(|i| full.guides_step(i, 12)));
        assert!(full.is_full());
        // The first half of 12 steps: steps 0-5.
        let early = GuidanceInterval::parse("0,0.5").unwrap();
        let guided: Vec<usize> = (0..12).filter(|&i| early.guides_step(i, 12)).collect();
        assert_eq!(guided, vec![0, 1, 2, 3, 4, 5]);
        // Both ends are floored, as in diffusers: of 10 steps over 0.25-0.65, steps 2 to 5.
        let middle = GuidanceInterval::parse(" 0.25 , 0.65").unwrap();
        let guided: Vec<usize> = (0..10).filter(|&i| middle.guides_step(i, 10)).collect();
        assert_eq!(guided, vec![2, 3, 4, 5]);
        assert!(!middle.is_full());
        assert_eq!(middle.to_string(), "0.25,0.65");
        // The shipped default, 0-0.8 of 12 steps: the last three are unguided.
        let shipped = GuidanceInterval::new(0.0, 0.8).unwrap();
        assert_eq!((0..12).filter(|&i| shipped.guides_step(i, 12)).count(), 9);
        // Python's int(0.29 * 100) is 28: the product is 28.999..., and so is ours.
        let inexact = GuidanceInterval::new(0.0, 0.29).unwrap();
        assert_eq!(
            (0..100).filter(|&i| inexact.guides_step(i, 100)).count(),
            28
        );
    }

    #[test]
    fn bad_intervals_are_refused_with_the_reason() {
        for bad in [
            "0.5", "a,b", "0.6,0.4", "0,1.5", "-0.1,0.5", "0.3,0.3", "nan,1",
        ] {
            let err = GuidanceInterval::parse(bad).unwrap_err().to_string();
            assert!(err.contains("guidance interval"), "{bad}: {err}");
        }
    }

    #[test]
    fn autoguidance_steps_away_from_the_weak_prediction() {
        let guided = tensor(&[1.0, 2.0], (1, 2, 1, 1));
        let text = tensor(&[0.5, 1.0], (1, 2, 1, 1));
        let weak = tensor(&[0.0, 3.0], (1, 2, 1, 1));
        let out = autoguide(&guided, &text, &weak, 2.5).unwrap();
        // 1 + 1.5 * 0.5, 2 + 1.5 * -2
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.75, -1.0]
        );
        let same = autoguide(&guided, &text, &weak, 1.0).unwrap();
        assert_eq!(
            same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.0]
        );
    }

    #[test]
    fn without_rescale_it_is_plain_guidance() {
        let u = tensor(&[0.0, 1.0, 2.0, 3.0], (1, 1, 2, 2));
        let t = tensor(&[1.0, 1.0, 0.0, 5.0], (1, 1, 2, 2));
        let g = guide(&u, &t, 3.0, 0.0).unwrap();
        let got: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![3.0, 1.0, -4.0, 9.0]);
    }

    #[test]
    fn full_rescale_gives_the_conditional_spread_per_image() {
        // Two images with different spreads: each is rescaled by its own ratio.
        let u = tensor(&[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], (2, 1, 2, 2));
        let t = tensor(&[1.0, -1.0, 1.0, -1.0, 1.0, 3.0, 1.0, 3.0], (2, 1, 2, 2));
        let g = guide(&u, &t, 4.0, 1.0).unwrap();
        let std_t: Vec<f32> = per_image_std(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let std_g: Vec<f32> = per_image_std(&g)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in std_t.iter().zip(&std_g) {
            assert!((a - b).abs() < 1e-5, "{std_t:?} vs {std_g:?}");
        }
        // Image 0: guided = 4 * t, std ratio 1/4, so the result is t itself.
        let got: Vec<f32> = g.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![1.0, -1.0, 1.0, -1.0]);
        // Image 1: guided = 1 + 4 (t - 1) = [1, 9, 1, 9], std 4.6188 against t's 1.1547:
        // scaled by 1/4 (the mean is scaled too, as in diffusers).
        let got: Vec<f32> = g.get(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip([0.25f32, 2.25, 0.25, 2.25]) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn partial_rescale_blends_linearly() {
        let u = tensor(&[0.0, 0.5, -0.5, 2.0], (1, 1, 2, 2));
        let t = tensor(&[1.0, 0.0, 0.5, 1.0], (1, 1, 2, 2));
        let plain: Vec<f32> = guide(&u, &t, 5.0, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let full: Vec<f32> = guide(&u, &t, 5.0, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let part: Vec<f32> = guide(&u, &t, 5.0, 0.7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..4 {
            let want = 0.7 * full[i] + 0.3 * plain[i];
            assert!((part[i] - want).abs() < 1e-5, "{part:?}");
        }
    }
}
