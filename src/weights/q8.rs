//! `--dtype q8`: weight matrices and convolution kernels kept as int8, with one f32 scale per
//! output channel (the weight's first dimension), symmetric: `w ≈ q * scale`, `q` in
//! -127..=127, `scale = max |w| / 127` over the channel. A quarter of f32's memory and half
//! of bf16's; the layers widen one weight at a time to f32 as they run.
//!
//! Per output channel, because a channel's weights share one range: a per-tensor scale
//! would give the small channels of a layer whose largest weight is 10x the rest only a
//! few levels.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// The suffix of the tensor that holds a quantized weight's scales in a saved file
/// (`conv1.weight` and `conv1.weight_scale`).
pub const SCALE_SUFFIX: &str = "_scale";

/// An int8 weight with one f32 scale per output channel.
#[derive(Clone, Debug)]
pub struct Q8Matrix {
    values: Vec<i8>,
    scales: Vec<f32>,
    shape: Vec<usize>,
    /// Where its dequantized weights are made.
    device: Device,
}

impl Q8Matrix {
    /// Quantizes a weight (any float dtype; its first dimension the output channels). A
    /// weight with a NaN or infinite value is refused (no scale stands for it); the error
    /// names the channel, the caller the tensor.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let shape = weight.dims().to_vec();
        let rows = shape.first().copied().unwrap_or(1);
        let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let row_len = values.len().checked_div(rows).unwrap_or(0);
        let mut quantized = vec![0i8; values.len()];
        let mut scales = vec![0f32; rows];
        if row_len > 0 {
            quantized
                .par_chunks_mut(row_len)
                .zip(scales.par_iter_mut())
                .zip(values.par_chunks(row_len))
                .for_each(|((q, scale), row)| *scale = quantize_row(row, q));
        }
        if let Some(channel) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::InvalidRequest(format!(
                "output channel {channel} has a NaN or infinite weight, which int8 cannot hold"
            )));
        }
        Ok(Self {
            values: quantized,
            scales,
            shape,
            device: weight.device().clone(),
        })
    }

    /// A quantized weight as a file stores it: `values` row-major in `shape`, one scale per
    /// row of the first dimension. The error says what does not fit (the caller names the
    /// tensor).
    pub fn from_parts(
        values: Vec<i8>,
        scales: Vec<f32>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let rows = shape.first().copied().unwrap_or(1);
        let len: usize = shape.iter().product();
        if values.len() != len || scales.len() != rows {
            return Err(Error::InvalidRequest(format!(
                "has {} int8 values and {} scales for its shape {shape:?} (one scale per row: {rows})",
                values.len(),
                scales.len()
            )));
        }
        if let Some(bad) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
            return Err(Error::InvalidRequest(format!("has a scale of {bad}")));
        }
        Ok(Self {
            values,
            scales,
            shape: shape.to_vec(),
            device: device.clone(),
        })
    }

    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    /// The int8 values, row-major.
    pub fn values(&self) -> &[i8] {
        &self.values
    }

    /// One scale per output channel.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Bytes held: the values and the scales.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// The f32 weight these values stand for (`q * scale`), spread over the threads.
    pub fn dequantize(&self) -> Result<Tensor> {
        let out = crate::kernels::dequantize::dequantize(&self.values, &self.scales)
            .ok_or(Error::Cancelled)?;
        Ok(Tensor::from_vec(out, self.shape.as_slice(), &self.device)?)
    }
}

/// Quantizes one output channel into `q` and returns its scale: 0 for an all-zero channel
/// (whose values are then all 0), NaN for one holding a NaN or an infinity.
fn quantize_row(row: &[f32], q: &mut [i8]) -> f32 {
    let mut max = 0f32;
    for v in row {
        if !v.is_finite() {
            return f32::NAN;
        }
        max = max.max(v.abs());
    }
    if max == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let scale = max / 127.0;
    for (q, v) in q.iter_mut().zip(row) {
        *q = (v / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_is_within_half_a_step_of_its_channels_scale() {
        let dev = Device::Cpu;
        // Channels of very different ranges, one all zero, odd sizes.
        let base = Tensor::randn(0f32, 1.0, (5, 3, 3, 3), &dev).unwrap();
        let ranges = Tensor::new(&[1e-3f32, 1.0, 0.0, 40.0, 0.25], &dev)
            .unwrap()
            .reshape((5, 1, 1, 1))
            .unwrap();
        let w = base.broadcast_mul(&ranges).unwrap();
        let q = Q8Matrix::quantize(&w).unwrap();
        assert_eq!(q.dims(), &[5, 3, 3, 3]);
        assert_eq!(q.bytes(), 5 * 27 + 5 * 4);
        let back = q.dequantize().unwrap();
        let w_rows: Vec<Vec<f32>> = w.flatten_from(1).unwrap().to_vec2().unwrap();
        let back_rows: Vec<Vec<f32>> = back.flatten_from(1).unwrap().to_vec2().unwrap();
        for (r, (a, b)) in w_rows.iter().zip(&back_rows).enumerate() {
            let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((q.scales()[r] - max / 127.0).abs() <= 1e-6 * max.max(1e-30));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= q.scales()[r] * 0.5 + 1e-7,
                    "row {r}: {x} -> {y}"
                );
            }
            // The largest value of a channel is exact (it sets the scale).
            if max > 0.0 {
                assert!(q.values()[r * 27..][..27].iter().any(|v| v.abs() == 127));
            }
        }
        assert!(back_rows[2].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn a_weight_with_a_nan_or_an_infinity_is_refused() {
        for bad in [f32::NAN, f32::INFINITY] {
            let w = Tensor::new(&[[1f32, 2.0], [bad, 0.5]], &Device::Cpu).unwrap();
            let err = Q8Matrix::quantize(&w).unwrap_err().to_string();
            assert!(err.contains("channel 1"), "{err}");
        }
    }

    #[test]
    fn parts_that_do_not_fit_their_shape_are_refused() {
        let err =
            Q8Matrix::from_parts(vec![0; 6], vec![1.0; 2], &[3, 2], &Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("6 int8 values and 2 scales"),
            "{err}"
        );
        let err = Q8Matrix::from_parts(vec![0; 6], vec![1.0, f32::NAN, 1.0], &[3, 2], &Device::Cpu);
        assert!(err.unwrap_err().to_string().contains("scale"));
        let ok = Q8Matrix::from_parts(
            vec![1, -2, 3, 4, 5, 127],
            vec![0.5, 1.0, 2.0],
            &[3, 2],
            &Device::Cpu,
        )
        .unwrap();
        let back: Vec<f32> = ok
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, [0.5, -1.0, 3.0, 4.0, 10.0, 254.0]);
    }
}
