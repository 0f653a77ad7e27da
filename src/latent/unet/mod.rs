//! The noise predictor: diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x/2.x/XL,
//! including SDXL's added text/time conditioning and LCM's guidance-scale embedding.

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod resnet;
pub mod transformer;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::{Vb, Weights};
use blocks::{DownBlock, MidBlock, UpBlock};
pub use config::UNetConfig;
use embeddings::{timestep_features, TimestepEmbedding};

/// Conditioning beyond the timestep and the text context, for the U-Nets that take it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtraConditions<'a> {
    /// SDXL: the pooled text embedding (batch, dim) and the six time ids (batch, 6):
    /// original height and width, crop top and left, target height and width.
    pub text_time: Option<(&'a Tensor, &'a Tensor)>,
    /// LCM: the guidance-scale embedding (batch, `time_cond_proj_dim`).
    pub timestep_cond: Option<&'a Tensor>,
    /// ControlNets' residuals, added to the skip connections and the mid block's output.
    pub control: Option<&'a ControlResiduals>,
}

/// What ControlNets add to a U-Net's pass: one tensor per skip connection (in the order the
/// down path makes them) and one for the mid block's output, each with the batch's rows.
#[derive(Clone, Debug)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlResiduals {
    /// Rows `start..start + len` of every residual.
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            down: self
                .down
                .iter()
                .map(|t| t.narrow(0, start, len))
                .collect::<candle_core::Result<_>>()?,
            mid: self.mid.narrow(0, start, len)?,
        })
    }

    /// The sum of two ControlNets' residuals (multi-ControlNet).
    pub fn add(&self, other: &Self) -> Result<Self> {
        Ok(Self {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
            mid: (&self.mid + &other.mid)?,
        })
    }
}

#[derive(Clone)]
pub struct UNet {
    pub config: UNetConfig,
    time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding` (over `text_embeds` and the time ids' features).
    add_embedding: Option<TimestepEmbedding>,
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
        Self::load_as(dir, variant, device, DType::F32)
    }

    /// As [`UNet::load`], keeping weight matrices and kernels in `matrix_dtype`.
    pub fn load_as(
        dir: &Path,
        variant: Option<&str>,
        device: &Device,
        matrix_dtype: DType,
    ) -> Result<Self> {
        Self::load_patched(dir, variant, device, matrix_dtype, &mut |_| Ok(()))
    }

    /// [`UNet::load_as`], with `patch` given the weights before they load (to add LoRAs).
    pub fn load_patched(
        dir: &Path,
        variant: Option<&str>,
        device: &Device,
        matrix_dtype: DType,
        patch: &mut dyn FnMut(&mut Weights) -> Result<()>,
    ) -> Result<Self> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let mut weights = Weights::open_component(dir, variant, device)?;
        weights.store_matrices_as(matrix_dtype);
        patch(&mut weights)?;
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

    /// The dtype its weight matrices and kernels are kept in (`--dtype`).
    pub fn weight_dtype(&self) -> DType {
        self.conv_in.dtype()
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
        self.forward_conditioned(sample, timesteps, context, &ExtraConditions::default())
    }

    /// `forward_conditioned` with the batch split into shards, one per thread (see
    /// `kernels::parallel::in_shards`): classifier-free guidance's two halves run side by side.
    /// Each row's result is the same as in one pass.
    pub fn forward_sharded(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        extra: &ExtraConditions,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        if timesteps.len() != batch {
            return self.forward_conditioned(sample, timesteps, context, extra);
        }
        let shard = |start: usize, len: usize| -> Result<Tensor> {
            if (start, len) == (0, batch) {
                return self.forward_conditioned(sample, timesteps, context, extra);
            }
            let rows = |t: &Tensor| t.narrow(0, start, len);
            let text_time = match extra.text_time {
                Some((embeds, ids)) => Some((rows(embeds)?, rows(ids)?)),
                None => None,
            };
            let timestep_cond = extra.timestep_cond.map(rows).transpose()?;
            let control = extra.control.map(|c| c.rows(start, len)).transpose()?;
            let extra = ExtraConditions {
                text_time: text_time.as_ref().map(|(e, i)| (e, i)),
                timestep_cond: timestep_cond.as_ref(),
                control: control.as_ref(),
            };
            self.forward_conditioned(
                &rows(sample)?,
                &timesteps[start..start + len],
                &rows(context)?,
                &extra,
            )
        };
        let parts = crate::kernels::parallel::in_shards(batch, &shard)
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one shard"));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The full forward pass: one timestep per batch row, plus the extra conditions that
    /// SDXL (`text_time`) and LCM (`timestep_cond`) U-Nets take.
    pub fn forward_conditioned(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        extra: &ExtraConditions,
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
        let temb = embed_time(
            &self.config,
            &self.time_embedding,
            self.add_embedding.as_ref(),
            timesteps,
            extra,
            &self.device,
        )?;

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
        if let Some(control) = extra.control {
            if control.down.len() != skips.len() {
                return Err(Error::InvalidRequest(format!(
                    "the ControlNet gives {} residuals; the U-Net has {} skip connections",
                    control.down.len(),
                    skips.len()
                )));
            }
            for (skip, residual) in skips.iter_mut().zip(&control.down) {
                *skip = (&*skip + residual)?;
            }
            x = (x + &control.mid)?;
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
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

/// The timestep embedding every block reads: the timesteps' features through
/// `time_embedding`, plus (SDXL) `add_embedding` of the pooled text embedding and the time
/// ids. Shared by the U-Net and its ControlNets, which embed time alike.
pub(crate) fn embed_time(
    config: &UNetConfig,
    time_embedding: &TimestepEmbedding,
    add_embedding: Option<&TimestepEmbedding>,
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
    let mut temb = time_embedding.forward_cond(&features, extra.timestep_cond)?;
    if let (Some(add), Some(tt)) = (add_embedding, &config.text_time) {
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

crate::impl_layers!(UNet: time_embedding, add_embedding, conv_in, down_blocks, mid_block, up_blocks, conv_out);
