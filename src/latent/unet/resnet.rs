//! `ResnetBlock2D`: two GroupNorm-SiLU-conv stages with an optional timestep injection and a
//! 1x1 shortcut when the channel count changes. Shared with the VAE.

use candle_core::Tensor;

use crate::error::Result;
use crate::nn::{add_bias, silu, Conv2d, GroupNorm, Linear};
use crate::weights::Vb;

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetOptions {
    pub groups: usize,
    pub eps: f64,
    /// Width of the timestep embedding; `None` in the VAE.
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: &Vb, in_ch: usize, out_ch: usize, o: &ResnetOptions) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), o.groups, in_ch, o.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: o
                .temb_channels
                .map(|t| Linear::load(&vb.pp("time_emb_proj"), t, out_ch, true))
                .transpose()?,
            norm2: GroupNorm::load(&vb.pp("norm2"), o.groups, out_ch, o.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: (in_ch != out_ch)
                .then(|| Conv2d::load(&vb.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0))
                .transpose()?,
            output_scale_factor: o.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            // One (batch, channels) bias per image.
            h = add_bias(&h, &proj.forward(&silu(temb)?)?, 1)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        Ok(if self.output_scale_factor == 1.0 {
            out
        } else {
            (out / self.output_scale_factor)?
        })
    }
}
