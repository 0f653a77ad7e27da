//! `ResnetBlock2D`: two GroupNorm-SiLU-conv stages with an optional timestep injection and a
//! 1x1 shortcut when the channel count changes. Shared with the VAE.
//!
//! The timestep enters in one of diffusers' two ways: added to the features before the second
//! norm (`default`, Stable Diffusion), or as a per-channel scale and shift of the normalised
//! features (`scale_shift`, as in DeepFloyd IF and the improved-DDPM U-Net), which lets the
//! timestep gate features multiplicatively.

use candle_core::Tensor;

use crate::error::Result;
use crate::nn::{add_bias, halves, silu, Conv2d, GroupNorm, Linear};
use crate::weights::Vb;

#[derive(Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    time_scale_shift: bool,
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
    /// The timestep embedding scales and shifts the normalised features instead of being
    /// added before the norm (its projection is twice as wide).
    pub time_scale_shift: bool,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: &Vb, in_ch: usize, out_ch: usize, o: &ResnetOptions) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), o.groups, in_ch, o.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: o
                .temb_channels
                .map(|t| {
                    let width = if o.time_scale_shift {
                        2 * out_ch
                    } else {
                        out_ch
                    };
                    Linear::load(&vb.pp("time_emb_proj"), t, width, true)
                })
                .transpose()?,
            time_scale_shift: o.time_scale_shift,
            norm2: GroupNorm::load(&vb.pp("norm2"), o.groups, out_ch, o.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: (in_ch != out_ch)
                .then(|| Conv2d::load(&vb.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0))
                .transpose()?,
            output_scale_factor: o.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let time = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&silu(temb)?)?),
            _ => None,
        };
        let h = match time {
            Some(time) if self.time_scale_shift => {
                // (batch, 2 * channels): the first half scales (as 1 + scale), the second
                // shifts, each image's channels.
                let (scale, shift) = halves(&time)?;
                let (b, c) = scale.dims2()?;
                let h = self.norm2.forward(&h)?;
                let h = h.broadcast_mul(&(scale + 1.0)?.reshape((b, c, 1, 1))?)?;
                silu(&add_bias(&h, &shift, 1)?)?
            }
            // One (batch, channels) bias per image.
            Some(time) => self.norm2.forward_silu(&add_bias(&h, &time, 1)?)?,
            None => self.norm2.forward_silu(&h)?,
        };
        let h = self.conv2.forward(&h)?;
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

crate::impl_layers!(ResnetBlock2D: conv1, time_emb_proj, conv2, conv_shortcut);
