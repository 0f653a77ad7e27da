//! The noise predictor: diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x/2.x.

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod resnet;
pub mod transformer;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::{silu, Conv2d, GroupNorm};
use crate::weights::{Vb, Weights};
use blocks::{DownBlock, MidBlock, UpBlock};
pub use config::UNetConfig;
use embeddings::{timestep_features, TimestepEmbedding};

pub struct UNet {
    pub config: UNetConfig,
    time_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    device: Device,
}

impl UNet {
    /// Loads from a `unet/` folder; every stored tensor must be used.
    pub fn load(dir: &Path, variant: Option<&str>, device: &Device) -> Result<Self> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open_component(dir, variant, device)?;
        let model = Self::from_weights(config, &weights.root())?;
        weights.finish()?;
        Ok(model)
    }

    pub fn from_weights(config: UNetConfig, vb: &Vb) -> Result<Self> {
        let c = &config;
        let ch0 = c.block_out_channels[0];
        let mut down_blocks = Vec::new();
        let mut in_ch = ch0;
        for i in 0..c.block_out_channels.len() {
            down_blocks.push(DownBlock::load(&vb.pp("down_blocks").pp(i), c, i, in_ch)?);
            in_ch = c.block_out_channels[i];
        }
        let mid_block = c
            .mid_block
            .as_ref()
            .map(|m| MidBlock::load(&vb.pp("mid_block"), c, m))
            .transpose()?;
        let up_blocks = (0..c.up_blocks.len())
            .map(|i| UpBlock::load(&vb.pp("up_blocks").pp(i), c, i))
            .collect::<Result<_>>()?;
        Ok(Self {
            time_embedding: TimestepEmbedding::load(
                &vb.pp("time_embedding"),
                ch0,
                c.time_embedding_dim,
            )?,
            conv_in: Conv2d::load(
                &vb.pp("conv_in"),
                c.in_channels,
                ch0,
                c.conv_in_kernel,
                1,
                c.conv_in_kernel / 2,
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                c.norm_num_groups,
                ch0,
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(
                &vb.pp("conv_out"),
                ch0,
                c.out_channels,
                c.conv_out_kernel,
                1,
                c.conv_out_kernel / 2,
            )?,
            device: vb.device().clone(),
            config,
        })
    }

    /// Predicts the noise (or v) for `sample` (batch, in_channels, h, w) at `timestep`, with
    /// cross-attention on `context` (batch, tokens, cross_attention_dim).
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_timesteps(sample, &vec![timestep; sample.dim(0)?], context)
    }

    /// As [`UNet::forward`] with one timestep per batch row (training).
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
    ) -> Result<Tensor> {
        let (batch, channels, _, _) = sample.dims4()?;
        if timesteps.len() != batch {
            return Err(Error::InvalidRequest(format!(
                "{} timesteps for a batch of {batch}",
                timesteps.len()
            )));
        }
        if channels != self.config.in_channels {
            return Err(Error::InvalidRequest(format!(
                "the U-Net takes {} latent channels, got {channels}",
                self.config.in_channels
            )));
        }
        let features = timestep_features(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            &self.device,
        )?;
        let temb = self.time_embedding.forward(&features)?;

        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        // When the size is not a multiple of 2^upsamplers, each upsample must hit the size of
        // the skip it meets instead of simply doubling.
        let upsamplers = self.config.block_out_channels.len() - 1;
        let factor = 1usize << upsamplers;
        let (_, _, h, w) = sample.dims4()?;
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &temb, context, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &temb, context)?;
        }
        for block in &self.up_blocks {
            let remaining = skips.len() - block.num_layers();
            let upsample_size = if forward_upsample_size && remaining > 0 {
                let (_, _, sh, sw) = skips[remaining - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            x = block.forward(&x, &mut skips, &temb, context, upsample_size)?;
        }
        let x = silu(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}
