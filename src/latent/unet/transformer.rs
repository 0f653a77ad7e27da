//! `Transformer2DModel` (continuous input): GroupNorm, a projection to tokens, transformer
//! blocks with self-attention, cross-attention on the text embeddings and a GEGLU
//! feed-forward, then the projection back and a residual add.

use candle_core::Tensor;

use crate::error::Result;
use crate::nn::{attention, geglu, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::Vb;

/// diffusers' `Attention` with `to_q`/`to_k`/`to_v` (no bias) and `to_out.0`.
#[derive(Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    pub fn load(
        vb: &Vb,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(&vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let out = attention(
            &self.to_q.forward(x)?,
            &self.to_k.forward(context)?,
            &self.to_v.forward(context)?,
            self.heads,
            None,
        )?;
        self.to_out.forward(&out)
    }
}

#[derive(Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: &Vb, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::load(&vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// GEGLU: the projection's first half gated by GELU of its second half.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&geglu(&self.proj.forward(x)?)?)
    }
}

#[derive(Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn load(
        vb: &Vb,
        dim: usize,
        heads: usize,
        context_dim: usize,
        only_cross: bool,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        let attn1_context = if only_cross { context_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: CrossAttention::load(&vb.pp("attn1"), dim, attn1_context, heads, head_dim)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention::load(&vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
            only_cross_attention: only_cross,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let self_context = if self.only_cross_attention {
            context
        } else {
            &h
        };
        let x = (x + self.attn1.forward(&h, self_context)?)?;
        let x = (&x + self.attn2.forward(&self.norm2.forward(&x)?, context)?)?;
        Ok((&x + self.ff.forward(&self.norm3.forward(&x)?)?)?)
    }
}

#[derive(Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

pub struct TransformerOptions {
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

#[derive(Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    pub fn load(vb: &Vb, channels: usize, o: &TransformerOptions) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if o.use_linear_projection {
                Projection::Linear(Linear::load(&vb.pp(name), channels, channels, true)?)
            } else {
                Projection::Conv(Conv2d::load(&vb.pp(name), channels, channels, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), o.groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..o.layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &vb.pp("transformer_blocks").pp(i),
                        channels,
                        o.heads,
                        o.context_dim,
                        o.only_cross_attention,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)
        };
        let to_image = |t: Tensor| -> Result<Tensor> {
            Ok(t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?)
        };
        let normed = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(tokens)?)?,
            Projection::Linear(lin) => to_image(lin.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}

crate::impl_layers!(CrossAttention: to_q, to_k, to_v, to_out);
crate::impl_layers!(FeedForward: proj, out);
crate::impl_layers!(BasicTransformerBlock: attn1, attn2, ff);
crate::impl_layers!(Transformer2D: proj_in, blocks, proj_out);

impl crate::nn::Layers for Projection {
    fn layers_mut<'a>(&'a mut self, out: &mut Vec<crate::nn::LayerMut<'a>>) {
        match self {
            Self::Conv(c) => crate::nn::Layers::layers_mut(c, out),
            Self::Linear(l) => crate::nn::Layers::layers_mut(l, out),
        }
    }
}
