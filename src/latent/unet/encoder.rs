//! The U-Net's first half, which a ControlNet copies: the timestep embedding (with SDXL's
//! added text/time embedding and LCM's guidance embedding), `conv_in`, the down blocks and the
//! mid block. One loader and one forward pass serve both models.

use candle_core::{Device, Tensor};

use super::blocks::{DownBlock, MidBlock};
use super::embeddings::{timestep_features, TimestepEmbedding};
use super::{ExtraConditions, UNetConfig};
use crate::error::{Error, Result};
use crate::nn::Conv2d;
use crate::weights::Vb;

#[derive(Clone)]
pub struct EncoderHalf {
    time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding` (over `text_embeds` and the time ids' features).
    add_embedding: Option<TimestepEmbedding>,
    pub(crate) conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
}

crate::impl_layers!(EncoderHalf: time_embedding, add_embedding, conv_in, down_blocks, mid_block);

impl EncoderHalf {
    /// Its modules under `vb` by diffusers' names, shaped by `c`.
    pub fn load(vb: &Vb, c: &UNetConfig) -> Result<Self> {
        let ch0 = c.block_out_channels[0];
        let mut down_blocks = Vec::new();
        let mut in_ch = ch0;
        for (i, &out_ch) in c.block_out_channels.iter().enumerate() {
            down_blocks.push(DownBlock::load(&vb.pp("down_blocks").pp(i), c, i, in_ch)?);
            in_ch = out_ch;
        }
        Ok(Self {
            time_embedding: TimestepEmbedding::load_with_cond(
                &vb.pp("time_embedding"),
                ch0,
                c.time_embedding_dim,
                c.time_cond_proj_dim,
            )?,
            add_embedding: c
                .text_time
                .as_ref()
                .map(|tt| {
                    TimestepEmbedding::load(
                        &vb.pp("add_embedding"),
                        tt.input_dim,
                        c.time_embedding_dim,
                    )
                })
                .transpose()?,
            conv_in: Conv2d::load(
                &vb.pp("conv_in"),
                c.in_channels,
                ch0,
                c.conv_in_kernel,
                1,
                c.conv_in_kernel / 2,
            )?,
            down_blocks,
            mid_block: c
                .mid_block
                .as_ref()
                .map(|m| MidBlock::load(&vb.pp("mid_block"), c, m))
                .transpose()?,
        })
    }

    /// `conv_in(sample)` (plus `added`: a ControlNet's control-image features), then the down
    /// blocks, pushing every state the up path (or a ControlNet's outputs) reuses onto
    /// `skips`, then the mid block.
    pub fn forward(
        &self,
        sample: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        added: Option<&Tensor>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut x = self.conv_in.forward(sample)?;
        if let Some(added) = added {
            x = (x + added)?;
        }
        skips.push(x.clone());
        for block in &self.down_blocks {
            x = block.forward(&x, temb, context, skips)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, temb, context)?;
        }
        Ok(x)
    }

    /// The timestep embedding every block reads: the timesteps' features through
    /// `time_embedding`, plus (SDXL) `add_embedding` of the pooled text embedding and the time
    /// ids.
    pub fn embed_time(
        &self,
        config: &UNetConfig,
        timesteps: &[f64],
        extra: &ExtraConditions,
        device: &Device,
    ) -> Result<Tensor> {
        let batch = timesteps.len();
        let features = timestep_features(
            timesteps,
            config.block_out_channels[0],
            config.flip_sin_to_cos,
            config.freq_shift,
            device,
        )?;
        if let (Some(cond), Some(dim)) = (extra.timestep_cond, config.time_cond_proj_dim) {
            if cond.dims() != [batch, dim] {
                return Err(Error::InvalidRequest(format!(
                    "the guidance embedding has shape {:?}; the U-Net takes ({batch}, {dim})",
                    cond.dims()
                )));
            }
        }
        let mut temb = self
            .time_embedding
            .forward_cond(&features, extra.timestep_cond)?;
        if let (Some(add), Some(tt)) = (&self.add_embedding, &config.text_time) {
            let Some((text_embeds, time_ids)) = extra.text_time else {
                return Err(Error::InvalidRequest(
                    "this U-Net (SDXL) needs the pooled text embedding and the time ids".into(),
                ));
            };
            let count = time_ids.dim(1)?;
            let want = tt.text_embeds_dim_with(count);
            if text_embeds.dims() != [batch, want] || time_ids.dims() != [batch, count] {
                return Err(Error::InvalidRequest(format!(
                    "text embeddings {:?} and time ids {:?}: the U-Net takes ({batch}, {want}) with {count} time ids",
                    text_embeds.dims(),
                    time_ids.dims()
                )));
            }
            let ids: Vec<f64> = time_ids
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1()?;
            let time_features = timestep_features(
                &ids,
                tt.time_embed_dim,
                config.flip_sin_to_cos,
                config.freq_shift,
                device,
            )?
            .reshape((batch, count * tt.time_embed_dim))?;
            let text_embeds = text_embeds.to_dtype(time_features.dtype())?;
            let added = add.forward(&Tensor::cat(&[&text_embeds, &time_features], 1)?)?;
            temb = (temb + added)?;
        }
        Ok(temb)
    }
}
