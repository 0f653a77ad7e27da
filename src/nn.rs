//! Small building blocks shared by the three models, each loaded from a [`Vb`] with the shape
//! its config implies (so a mismatched checkpoint fails with both shapes named).

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::kernels::im2col::ConvGeometry;
use crate::weights::{Matrix, MatrixDtype, Vb};

#[derive(Clone, Debug)]
pub struct Linear {
    /// (out, in), as checkpoints store it: the products read it as the transposed (in, out)
    /// operand in place (their packing reads either layout), so loading copies nothing.
    weight: Matrix,
    bias: Option<Tensor>,
    /// The weight's name in the checkpoint (what a LoRA names it by).
    name: std::sync::Arc<str>,
}

impl Linear {
    pub fn load(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_matrix("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(vb.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            name: vb.name("weight").into(),
        })
    }

    /// This layer with `delta` (in the checkpoint's (out, in) layout, f32) added to its
    /// weight, kept as before: the same arithmetic as a LoRA merged at load, so the two give
    /// the same image where the weights are kept as loaded (f32 or f16 files).
    pub fn patched(&self, delta: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: self.weight.patched(delta)?,
            ..self.clone()
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::cancel::check()?;
        let (n, k) = (self.weight.dims()[0], self.weight.dims()[1]);
        let flops = 2.0 * (x.elem_count() / k.max(1) * k * n) as f64;
        let bf16 = bf16_products(&self.weight, x);
        let _span = crate::profile::span(if bf16 { "linear (bf16)" } else { "linear" })
            .counting(crate::flops::Kind::Dense, flops);
        let y = if let (true, Some(weight)) = (bf16, self.weight.float()) {
            crate::kernels::matmul_bf16::linear(x, weight)?
        } else {
            // A weight kept in f16/bf16/q8 is widened first, so it takes the same product.
            let weight = self.weight.widened(x.dtype())?;
            if f32_row_split(&weight, x) {
                crate::kernels::linear::linear(x, &weight)?
            } else {
                let weight_t = weight.t()?;
                match x.dims() {
                    [b, n, k] => {
                        x.reshape((b * n, *k))?
                            .matmul(&weight_t)?
                            .reshape((*b, *n, ()))?
                    }
                    _ => x.matmul(&weight_t)?,
                }
            }
        };
        Ok(match &self.bias {
            Some(b) => add_bias_last(&y, b)?,
            None => y,
        })
    }
}

/// Whether a layer's products run in bf16: its weight is stored in bf16, the activations are
/// f32 on the CPU and need no gradient (the bf16 product has none), and bf16 products are
/// enabled and supported (elsewhere the weight is widened).
fn bf16_products(weight: &Matrix, x: &Tensor) -> bool {
    weight.dtype() == MatrixDtype::Bf16
        && !x.track_op()
        && crate::kernels::supports(x)
        && crate::kernels::matmul_bf16::available()
}

/// Whether a layer's f32 product takes `kernels::linear` (split over the threads without
/// `gemm`'s waits): at inference, for f32 activations and (widened) weights on the CPU.
fn f32_row_split(weight: &Tensor, x: &Tensor) -> bool {
    weight.dtype() == candle_core::DType::F32
        && !x.track_op()
        && !weight.track_op()
        && crate::kernels::supports(x)
}

/// A layer whose weight a LoRA may change, reached by its weight's checkpoint name.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

impl LayerMut<'_> {
    pub fn name(&self) -> &str {
        match self {
            Self::Linear(l) => &l.name,
            Self::Conv(c) => &c.name,
        }
    }

    /// The weight's shape as the checkpoint stores it: (out, in) or (out, in, k, k).
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Linear(l) => l.weight.dims().to_vec(),
            Self::Conv(c) => c.weight.dims().to_vec(),
        }
    }

    /// The weight in the checkpoint's layout, as f32.
    pub fn weight(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Linear(l) => l.weight.to_f32()?,
            Self::Conv(c) => c.weight.to_f32()?,
        })
    }

    /// Replaces the layer by a copy with `delta` added to its weight (the original's
    /// tensors are untouched: other copies of the model that share them see no change).
    pub fn patch(&mut self, delta: &Tensor) -> Result<()> {
        match self {
            Self::Linear(l) => **l = l.patched(delta)?,
            Self::Conv(c) => **c = c.patched(delta)?,
        }
        Ok(())
    }
}

/// A model's patchable layers (its linear layers and convolutions), for LoRAs applied to a
/// loaded model.
pub trait Layers {
    fn layers_mut<'a>(&'a mut self, out: &mut Vec<LayerMut<'a>>);
}

impl Layers for Linear {
    fn layers_mut<'a>(&'a mut self, out: &mut Vec<LayerMut<'a>>) {
        out.push(LayerMut::Linear(self));
    }
}

impl Layers for Conv2d {
    fn layers_mut<'a>(&'a mut self, out: &mut Vec<LayerMut<'a>>) {
        out.push(LayerMut::Conv(self));
    }
}

impl<T: Layers> Layers for Option<T> {
    fn layers_mut<'a>(&'a mut self, out: &mut Vec<LayerMut<'a>>) {
        if let Some(t) = self {
            t.layers_mut(out);
        }
    }
}

impl<T: Layers> Layers for Vec<T> {
    fn layers_mut<'a>(&'a mut self, out: &mut Vec<LayerMut<'a>>) {
        for t in self {
            t.layers_mut(out);
        }
    }
}

/// `impl Layers` for a struct: the fields that hold layers, in any order.
#[macro_export]
macro_rules! impl_layers {
    ($ty:ty: $($field:ident),+ $(,)?) => {
        impl $crate::nn::Layers for $ty {
            fn layers_mut<'a>(&'a mut self, out: &mut Vec<$crate::nn::LayerMut<'a>>) {
                $($crate::nn::Layers::layers_mut(&mut self.$field, out);)+
            }
        }
    };
}

fn add_bias_last(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    add_bias(y, bias, y.rank() - 1)
}

/// `x + bias` along `axis` (bias: that axis's length, or the product of the dims up to it);
/// the fused kernel when it applies (its backward pass sums in one sweep), candle's broadcast
/// otherwise.
pub fn add_bias(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    if crate::kernels::supports(x) {
        return Ok(crate::kernels::bias::add_bias(x, bias, axis)?);
    }
    let mut shape: Vec<usize> = bias.dims().to_vec();
    shape.resize(x.rank() - axis - 1 + shape.len(), 1);
    while shape.len() < x.rank() {
        shape.insert(0, 1);
    }
    Ok(x.broadcast_add(&bias.reshape(shape)?)?)
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Matrix,
    bias: Tensor,
    stride: usize,
    padding: usize,
    /// The weight's name in the checkpoint (what a LoRA names it by).
    name: std::sync::Arc<str>,
}

impl Conv2d {
    pub fn load(
        vb: &Vb,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get_matrix("weight", &[out_channels, in_channels, kernel, kernel])?,
            bias: vb.get("bias", &[out_channels])?,
            stride,
            padding,
            name: vb.name("weight").into(),
        })
    }

    /// A convolution stored without a bias (a zero bias adds nothing).
    pub fn load_without_bias(
        vb: &Vb,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get_matrix("weight", &[out_channels, in_channels, kernel, kernel])?;
        Ok(Self {
            bias: Tensor::zeros(out_channels, DType::F32, vb.device())?,
            weight,
            stride,
            padding,
            name: vb.name("weight").into(),
        })
    }

    /// How its kernel is kept.
    pub fn dtype(&self) -> MatrixDtype {
        self.weight.dtype()
    }

    /// This convolution with `delta` (f32, the kernel's shape) added to its kernel, kept as
    /// before (see [`Linear::patched`]).
    pub fn patched(&self, delta: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: self.weight.patched(delta)?,
            ..self.clone()
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.convolve(x, 1)
    }

    /// `forward(upsample_nearest2d(x, 2h, 2w))`, the upsamplers of the U-Net and the VAE
    /// decoder. The upsampling is folded into the convolution's columns, so the 4x larger
    /// upsampled image is never built (a 512x512 VAE decode: 268 MB at its peak).
    pub fn forward_upsampled2x(&self, x: &Tensor) -> Result<Tensor> {
        self.convolve(x, 2)
    }

    /// Our convolution (one graph node; its columns built per image within a budget) where
    /// the kernels take the input, candle's otherwise (another dtype or device, or a kernel
    /// that does not fit the input: candle then says what is wrong).
    fn convolve(&self, x: &Tensor, up: usize) -> Result<Tensor> {
        crate::cancel::check()?;
        let bf16 = bf16_products(&self.weight, x);
        let weight = self.weight.widened(x.dtype())?;
        let (b, c, h, w) = x.dims4()?;
        let k = weight.dim(2)?;
        let geometry = ConvGeometry::new(k, self.stride, self.padding, h * up, w * up);
        // Counted as a direct convolution's multiply-adds, whichever algorithm runs.
        let flops = match geometry {
            Some(g) => 2.0 * (b * weight.dim(0)? * g.out_h() * g.out_w() * c * k * k) as f64,
            None => 0.0,
        };
        let _span = crate::profile::span(conv_label(k, self.stride, up, bf16, || {
            geometry.is_some_and(|g| {
                crate::kernels::winograd::applies(g, b, c, weight.dim(0).unwrap_or(0))
            })
        }))
        .counting(crate::flops::Kind::Dense, flops);
        if crate::kernels::supports(x) && geometry.is_some() {
            return Ok(crate::kernels::conv2d::conv2d(
                x,
                &weight,
                Some(&self.bias),
                self.stride,
                self.padding,
                up,
                COLUMN_BUDGET,
                bf16,
            )?);
        }
        let x = if up > 1 {
            x.upsample_nearest2d(h * up, w * up)?
        } else {
            x.clone()
        };
        let y = x.conv2d(&weight, self.padding, self.stride, 1, 1)?;
        add_bias(&y, &self.bias, 1)
    }
}

/// The profile's name for a convolution: its kernel and stride, an upsampling folded in, and
/// the product that runs (Winograd, which stays f32, or im2col with bf16 products).
fn conv_label(
    kernel: usize,
    stride: usize,
    up: usize,
    bf16: bool,
    winograd: impl FnOnce() -> bool,
) -> &'static str {
    if !crate::profile::enabled() {
        return "";
    }
    let winograd = kernel == 3 && stride == 1 && winograd();
    match (kernel, stride, up > 1) {
        (3, 1, false) if winograd => "conv 3x3, Winograd",
        (3, 1, true) if winograd => "conv 3x3 upsampling, Winograd",
        (3, 1, false) if bf16 => "conv 3x3, im2col (bf16)",
        (3, 1, false) => "conv 3x3, im2col",
        (3, 1, true) => "conv 3x3 upsampling, im2col",
        (3, _, _) => "conv 3x3, strided",
        (1, _, _) if bf16 => "conv 1x1 (bf16)",
        (1, _, _) => "conv 1x1",
        _ => "conv, other",
    }
}

/// Largest im2col column buffers (bytes, all threads together) a convolution builds; larger
/// images are convolved in bands of output rows whose columns fit.
const COLUMN_BUDGET: usize = 128 << 20;

#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(vb: &Vb, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::InvalidRequest(format!(
                "{}: {channels} channels cannot be split into {groups} norm groups",
                vb.name("weight")
            )));
        }
        Ok(Self {
            weight: vb.get("weight", &[channels])?,
            bias: vb.get("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(norm(x))` in one pass, the pairing of every ResNet block.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let _span = crate::profile::span("group norm");
        let (w, b, g, eps) = (&self.weight, &self.bias, self.groups, self.eps);
        if crate::kernels::supports(x) {
            return Ok(crate::kernels::group_norm::group_norm(
                x, w, b, g, eps, silu,
            )?);
        }
        Ok(crate::kernels::group_norm::group_norm_reference(
            x, w, b, g, eps, silu,
        )?)
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[dim])?,
            bias: vb.get("bias", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = crate::profile::span("layer norm");
        // candle's fused kernel has no backward pass; training takes ours, which has one.
        let training = x.track_op() || self.weight.track_op();
        if training && crate::kernels::supports(x) {
            Ok(crate::kernels::layer_norm::layer_norm(
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?)
        } else if training {
            Ok(candle_nn::ops::layer_norm_slow(
                x,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?)
        } else {
            Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?)
        }
    }
}

/// Largest attention score matrix (bytes) computed at once at inference, for the whole process
/// (shards running side by side each take their share).
const ATTENTION_SCORE_BUDGET: usize = 256 << 20;

/// Multi-head scaled dot-product attention on (batch, tokens, heads * head_dim) inputs.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    crate::cancel::check()?;
    let cross = k.dim(1)? != q.dim(1)?;
    // Scores and their products with the values: 2 x 2 x batch x n x m x inner.
    let (b, n, inner) = q.dims3()?;
    let flops = 4.0 * (b * n * k.dim(1)? * inner) as f64;
    let _span = crate::profile::span(if cross {
        "attention, cross"
    } else {
        "attention, self"
    })
    .counting(crate::flops::Kind::Attention, flops);
    if mask.is_none() && [q, k, v].iter().all(|t| crate::kernels::supports(t)) {
        return Ok(crate::kernels::attention::attention(q, k, v, heads)?);
    }
    let budget = crate::kernels::parallel::share_of(ATTENTION_SCORE_BUDGET);
    attention_with_budget(q, k, v, heads, mask, budget)
}

fn attention_with_budget(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    budget: usize,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let head_dim = inner / heads;
    let split = |x: &Tensor, len: usize| -> Result<Tensor> {
        Ok(x.reshape((b, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let q = split(q, n)?;
    let k = split(k, m)?;
    let v = split(v, m)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // At large sizes the full score matrix does not fit in memory (SD 1.5 at 1024x1024:
    // 16384^2 scores per head); inference then takes the queries in slices, each row's
    // softmax being independent of the others.
    let score_bytes = b * heads * n * m * 4;
    if !q.track_op() && !k.track_op() && score_bytes > budget {
        let rows = (budget / (b * heads * m * 4)).max(1);
        let kt = k.t()?;
        let mut outs = Vec::with_capacity(n.div_ceil(rows));
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let scores = q.narrow(2, start, len)?.matmul(&kt)?;
            let mask = match mask {
                Some(mask) => {
                    let rank = mask.rank();
                    Some(if rank >= 2 && mask.dim(rank - 2)? == n {
                        mask.narrow(rank - 2, start, len)?
                    } else {
                        mask.clone()
                    })
                }
                None => None,
            };
            let probs = scaled_softmax(&scores, scale, mask.as_ref())?;
            outs.push(probs.matmul(&v)?);
        }
        let out = Tensor::cat(&outs, 2)?;
        return Ok(out.transpose(1, 2)?.reshape((b, n, inner))?);
    }
    let scores = q.matmul(&k.t()?)?;
    let probs = scaled_softmax(&scores, scale, mask)?;
    let out = probs.matmul(&v)?;
    Ok(out.transpose(1, 2)?.reshape((b, n, inner))?)
}

/// softmax(scale * scores + mask) over the last axis. Our kernel folds the scale into its
/// pass (and has a backward pass, which candle's fused softmax lacks); with a mask the scores
/// are scaled and masked first.
fn scaled_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let ours = crate::kernels::supports(scores);
    let (scores, scale) = match mask {
        Some(mask) => ((scores * scale)?.broadcast_add(mask)?, 1.0),
        None if ours => (scores.clone(), scale),
        None => ((scores * scale)?, 1.0),
    };
    if ours {
        return Ok(crate::kernels::softmax::softmax_scaled_last_dim(
            &scores, scale,
        )?);
    }
    Ok(candle_nn::ops::softmax(&scores, D::Minus1)?)
}

/// x * sigmoid(x); inference runs our vectorised kernel.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() && crate::kernels::supports(x) {
        return Ok(crate::kernels::activation::silu(x)?);
    }
    Ok(candle_nn::ops::silu(x)?)
}

/// Exact (erf) GELU, as torch's default; inference runs our vectorised kernel.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() && crate::kernels::supports(x) {
        return Ok(crate::kernels::activation::gelu_erf(x)?);
    }
    Ok(x.gelu_erf()?)
}

/// GEGLU: the last axis's first half times the exact GELU of its second half. f32 CPU tensors
/// take our fused kernel (with its own backward pass), others candle's ops.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let _span = crate::profile::span("geglu");
    if crate::kernels::supports(x) {
        return Ok(crate::kernels::geglu::geglu(x)?);
    }
    let (hidden, gate) = halves(x)?;
    Ok((hidden * gate.gelu_erf()?)?)
}

/// CLIP's `quick_gelu`: x * sigmoid(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// Applies a named activation from a config (`silu`/`swish`, `gelu`, `quick_gelu`).
pub fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    match name {
        "silu" | "swish" => silu(x),
        "gelu" => gelu(x),
        "quick_gelu" => quick_gelu(x),
        "relu" => Ok(x.relu()?),
        other => Err(crate::Error::InvalidRequest(format!(
            "unsupported activation `{other}`"
        ))),
    }
}

/// Splits the last axis in two halves (torch's `chunk(2, -1)`).
pub fn halves(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, n)?, x.narrow(D::Minus1, n, n)?))
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sliced_attention_equals_the_full_one() {
        let dev = Device::Cpu;
        let (b, n, m, heads, d) = (2, 37, 29, 3, 8);
        let q = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
        let mask = Tensor::randn(0f32, 1.0, (n, m), &dev).unwrap();
        for mask in [None, Some(&mask)] {
            let full = attention_with_budget(&q, &k, &v, heads, mask, usize::MAX).unwrap();
            // 5 query rows per slice: 8 slices, the last one short.
            let sliced =
                attention_with_budget(&q, &k, &v, heads, mask, b * heads * m * 4 * 5).unwrap();
            let diff = (full - sliced).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        }
    }
}

#[cfg(test)]
mod trainable_tests {
    use super::*;
    use crate::weights::ParamStore;
    use candle_core::{Device, Var};
    use std::collections::BTreeMap;

    /// Layers built from trainable parameters must read the parameters' current values: the
    /// optimizer and `--resume` update them in place after the model is built.
    #[test]
    fn layers_follow_their_parameters_after_an_update() {
        let dev = Device::Cpu;
        let params = ParamStore::new(3, &dev);
        let vb = Vb::from(&params);
        let linear = Linear::load(&vb.pp("lin"), 5, 4, true).unwrap();
        let conv = Conv2d::load(&vb.pp("conv"), 2, 3, 3, 1, 1).unwrap();
        let norm = LayerNorm::load(&vb.pp("norm"), 5, 1e-5).unwrap();
        let mut values = BTreeMap::new();
        for (name, var) in params.vars() {
            let fill = if name.ends_with("bias") { 1.0 } else { 0.0 };
            values.insert(name, (var.ones_like().unwrap() * fill).unwrap());
        }
        params.load_values(&values).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 5), &dev).unwrap()).unwrap();
        let img = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &dev).unwrap()).unwrap();
        for y in [
            linear.forward(&x).unwrap(),
            conv.forward(&img).unwrap(),
            norm.forward(&x).unwrap(),
        ] {
            let ones = y.ones_like().unwrap();
            let diff: f32 = (y - ones)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-5, "a layer still uses its initial weights");
        }
    }
}
