//! The U-Net's down, mid and up blocks (CrossAttnDownBlock2D/DownBlock2D,
//! UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D/UpBlock2D).

use candle_core::Tensor;

use super::config::{BlockConfig, UNetConfig};
use super::resnet::{ResnetBlock2D, ResnetOptions};
use super::transformer::{Transformer2D, TransformerOptions};
use crate::error::Result;
use crate::nn::Conv2d;
use crate::weights::Vb;

fn resnet_options(c: &UNetConfig, output_scale_factor: f64) -> ResnetOptions {
    ResnetOptions {
        groups: c.norm_num_groups,
        eps: c.norm_eps,
        temb_channels: Some(c.time_embedding_dim),
        time_scale_shift: c.time_scale_shift,
        output_scale_factor,
    }
}

fn transformer_options(c: &UNetConfig, block: &BlockConfig) -> TransformerOptions {
    TransformerOptions {
        heads: block.heads,
        layers: block.transformer_layers,
        context_dim: block.cross_attention_dim,
        groups: c.norm_num_groups,
        use_linear_projection: c.use_linear_projection,
        only_cross_attention: block.only_cross_attention,
    }
}

fn load_attentions(
    vb: &Vb,
    c: &UNetConfig,
    block: &BlockConfig,
    channels: usize,
    count: usize,
) -> Result<Vec<Transformer2D>> {
    if !block.cross_attention {
        return Ok(Vec::new());
    }
    let options = transformer_options(c, block);
    (0..count)
        .map(|i| Transformer2D::load(&vb.pp("attentions").pp(i), channels, &options))
        .collect()
}

#[derive(Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    pub fn load(vb: &Vb, c: &UNetConfig, index: usize, in_ch: usize) -> Result<Self> {
        let block = &c.down_blocks[index];
        let out_ch = c.block_out_channels[index];
        let options = resnet_options(c, c.resnet_out_scale_factor);
        let resnets = (0..block.layers)
            .map(|i| {
                let ch = if i == 0 { in_ch } else { out_ch };
                ResnetBlock2D::load(&vb.pp("resnets").pp(i), ch, out_ch, &options)
            })
            .collect::<Result<_>>()?;
        let is_final = index + 1 == c.block_out_channels.len();
        let downsampler = (!is_final)
            .then(|| {
                Conv2d::load(
                    &vb.pp("downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    c.downsample_padding,
                )
            })
            .transpose()?;
        Ok(Self {
            resnets,
            attentions: load_attentions(vb, c, block, out_ch, block.layers)?,
            downsampler,
        })
    }

    /// Returns the block's output and pushes every intermediate state the up path reuses.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

#[derive(Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

impl MidBlock {
    pub fn load(vb: &Vb, c: &UNetConfig, block: &BlockConfig) -> Result<Self> {
        let ch = *c.block_out_channels.last().expect("config has blocks");
        let options = resnet_options(c, c.mid_block_scale_factor);
        Ok(Self {
            resnets: (0..=block.layers)
                .map(|i| ResnetBlock2D::load(&vb.pp("resnets").pp(i), ch, ch, &options))
                .collect::<Result<_>>()?,
            attentions: load_attentions(vb, c, block, ch, block.layers)?,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

#[derive(Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// `index` counts up blocks in execution order (deepest first).
    pub fn load(vb: &Vb, c: &UNetConfig, index: usize) -> Result<Self> {
        let block = &c.up_blocks[index];
        let n = c.block_out_channels.len();
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let out_ch = reversed[index];
        let prev_out = reversed[index.saturating_sub(1)];
        let in_ch = reversed[(index + 1).min(n - 1)];
        let options = resnet_options(c, c.resnet_out_scale_factor);
        let resnets = (0..block.layers)
            .map(|i| {
                let skip_ch = if i + 1 == block.layers { in_ch } else { out_ch };
                let resnet_in = if i == 0 { prev_out } else { out_ch };
                ResnetBlock2D::load(
                    &vb.pp("resnets").pp(i),
                    resnet_in + skip_ch,
                    out_ch,
                    &options,
                )
            })
            .collect::<Result<_>>()?;
        let is_final = index + 1 == n;
        let upsampler = (!is_final)
            .then(|| Conv2d::load(&vb.pp("upsamplers.0.conv"), out_ch, out_ch, 3, 1, 1))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions: load_attentions(vb, c, block, out_ch, block.layers)?,
            upsampler,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes this block's skip connections from the end of `skips`. `upsample_size` is
    /// the size of the next skip when the input size is not a multiple of the total
    /// downsampling (diffusers' `forward_upsample_size`); otherwise the upsample doubles.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("down path pushed one skip per up resnet");
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, height, width) = h.dims4()?;
            let (th, tw) = upsample_size.unwrap_or((height * 2, width * 2));
            h = if (th, tw) == (height * 2, width * 2) {
                conv.forward_upsampled2x(&h)?
            } else {
                conv.forward(&h.upsample_nearest2d(th, tw)?)?
            };
        }
        Ok(h)
    }
}

crate::impl_layers!(DownBlock: resnets, attentions, downsampler);
crate::impl_layers!(MidBlock: resnets, attentions);
crate::impl_layers!(UpBlock: resnets, attentions, upsampler);
