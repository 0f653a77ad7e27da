//! How a model's weight matrices and convolution kernels are held in memory (`--dtype`):
//! as a float tensor (f32, or f16/bf16 for half the memory) or quantized to int8
//! ([`super::q8`]). The other tensors (norms, biases, embeddings) stay f32 whatever it is.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::q8::Q8Matrix;
use crate::error::Result;

/// What the weight matrices and kernels are kept as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatrixDtype {
    #[default]
    F32,
    F16,
    Bf16,
    /// int8 with one f32 scale per output channel.
    Q8,
}

impl MatrixDtype {
    /// The float dtype of a float storage; `None` for q8.
    pub fn float(self) -> Option<DType> {
        match self {
            Self::F32 => Some(DType::F32),
            Self::F16 => Some(DType::F16),
            Self::Bf16 => Some(DType::BF16),
            Self::Q8 => None,
        }
    }

    /// The name `--dtype` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
        }
    }
}

impl From<DType> for MatrixDtype {
    /// A float dtype's storage (other dtypes: f32).
    fn from(dtype: DType) -> Self {
        match dtype {
            DType::F16 => Self::F16,
            DType::BF16 => Self::Bf16,
            _ => Self::F32,
        }
    }
}

/// One weight matrix or convolution kernel, in the checkpoint's layout ((out, in) or
/// (out, in, k, k)). Clones share the data.
#[derive(Clone, Debug)]
pub enum Matrix {
    Float(Tensor),
    Q8(Arc<Q8Matrix>),
}

impl Matrix {
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Float(t) => t.dims(),
            Self::Q8(q) => q.dims(),
        }
    }

    pub fn dtype(&self) -> MatrixDtype {
        match self {
            Self::Float(t) => t.dtype().into(),
            Self::Q8(_) => MatrixDtype::Q8,
        }
    }

    /// The tensor a float weight is kept as (`None` for q8).
    pub fn float(&self) -> Option<&Tensor> {
        match self {
            Self::Float(t) => Some(t),
            Self::Q8(_) => None,
        }
    }

    /// The weight in `dtype` for one product: a float weight converted where it is kept in
    /// another dtype, a q8 weight dequantized (and converted).
    pub fn widened(&self, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Self::Float(t) if t.dtype() == dtype => t.clone(),
            Self::Float(t) => {
                let _span = crate::profile::span("widen f16/bf16");
                t.to_dtype(dtype)?
            }
            Self::Q8(q) => {
                let _span = crate::profile::span("dequantize q8");
                q.dequantize()?.to_dtype(dtype)?
            }
        })
    }

    /// The weight as f32.
    pub fn to_f32(&self) -> Result<Tensor> {
        self.widened(DType::F32)
    }

    /// This weight with `delta` (f32, the same shape) added, kept as before: a float weight
    /// in its dtype, a q8 weight quantized again (its scales follow the new values).
    pub fn patched(&self, delta: &Tensor) -> Result<Self> {
        let sum = (self.to_f32()? + delta.to_dtype(DType::F32)?)?;
        Ok(match self {
            Self::Float(t) => Self::Float(sum.to_dtype(t.dtype())?),
            Self::Q8(_) => Self::Q8(Arc::new(Q8Matrix::quantize(&sum)?)),
        })
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Q8(q) => q.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A q8 weight patched (a per-request LoRA) is the dequantized weight plus the delta,
    /// quantized again: new scales follow the new values; a float weight keeps its dtype.
    #[test]
    fn a_patch_keeps_how_the_weight_is_held() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 10), &dev).unwrap();
        let delta = Tensor::randn(0f32, 3.0, (6, 10), &dev).unwrap();
        let q = Matrix::Q8(Arc::new(Q8Matrix::quantize(&w).unwrap()));
        let patched = q.patched(&delta).unwrap();
        assert_eq!(patched.dtype(), MatrixDtype::Q8);
        let want = Q8Matrix::quantize(&(q.to_f32().unwrap() + &delta).unwrap()).unwrap();
        let Matrix::Q8(got) = &patched else {
            unreachable!()
        };
        assert_eq!(got.values(), want.values());
        assert_eq!(got.scales(), want.scales());
        let Matrix::Q8(before) = &q else {
            unreachable!()
        };
        assert_ne!(got.scales(), before.scales());
        let half = Matrix::Float(w.to_dtype(DType::BF16).unwrap());
        assert_eq!(half.patched(&delta).unwrap().dtype(), MatrixDtype::Bf16);
        assert_eq!(half.widened(DType::F32).unwrap().dtype(), DType::F32);
        assert_eq!(q.bytes(), 60 + 6 * 4);
    }
}
