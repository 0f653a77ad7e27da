//! The noise predictor: diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x/2.x/XL,
//! including SDXL's added text/time conditioning and LCM's guidance-scale embedding.

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod encoder;
pub mod resnet;
pub mod transformer;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::{Vb, Weights};
use blocks::UpBlock;
pub use config::UNetConfig;
use encoder::EncoderHalf;

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

/// `run(start, len)` over `batch` rows split into one shard per thread, side by side
/// ([`crate::kernels::parallel::in_shards`]), the shards' results in order: the U-Net's and
/// the ControlNet's guidance halves. One shard gets the whole batch.
pub(crate) fn in_row_shards<R: Send>(
    batch: usize,
    run: &(dyn Fn(usize, usize) -> Result<R> + Sync),
) -> Result<Vec<R>> {
    crate::kernels::parallel::in_shards(batch, run)
        .into_iter()
        .collect()
}

/// Rows `start..start + len` of a batch's extra conditions, for one shard of it.
pub(crate) struct ShardConditions {
    text_time: Option<(Tensor, Tensor)>,
    timestep_cond: Option<Tensor>,
    control: Option<ControlResiduals>,
}

impl ShardConditions {
    pub fn of(extra: &ExtraConditions, start: usize, len: usize) -> Result<Self> {
        let rows = |t: &Tensor| t.narrow(0, start, len);
        Ok(Self {
            text_time: match extra.text_time {
                Some((embeds, ids)) => Some((rows(embeds)?, rows(ids)?)),
                None => None,
            },
            timestep_cond: extra.timestep_cond.map(rows).transpose()?,
            control: extra.control.map(|c| c.rows(start, len)).transpose()?,
        })
    }

    pub fn view(&self) -> ExtraConditions<'_> {
        ExtraConditions {
            text_time: self.text_time.as_ref().map(|(e, i)| (e, i)),
            timestep_cond: self.timestep_cond.as_ref(),
            control: self.control.as_ref(),
        }
    }
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
    /// Time embedding, conv_in, down blocks and mid block (what a ControlNet copies).
    encoder: EncoderHalf,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    device: Device,
}

impl UNet {
    /// Loads from a `unet/` folder; every stored tensor must be used.
    pub fn load(dir: &Path, variant: Option<&str>, device: &Device) -> Result<Self> {
        Self::load_as(dir, variant, device, crate::weights::MatrixDtype::F32)
    }

    /// As [`UNet::load`], keeping weight matrices and kernels in `matrix_dtype`.
    pub fn load_as(
        dir: &Path,
        variant: Option<&str>,
        device: &Device,
        matrix_dtype: crate::weights::MatrixDtype,
    ) -> Result<Self> {
        Self::load_patched(dir, variant, device, matrix_dtype, &mut |_| Ok(()))
    }

    /// [`UNet::load_as`], with `patch` given the weights before they load (to add LoRAs).
    pub fn load_patched(
        dir: &Path,
        variant: Option<&str>,
        device: &Device,
        matrix_dtype: crate::weights::MatrixDtype,
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
        // The down path first: a mismatch is reported where the weights begin.
        let encoder = EncoderHalf::load(vb, c)?;
        let up_blocks = (0..c.up_blocks.len())
            .map(|i| UpBlock::load(&vb.pp("up_blocks").pp(i), c, i))
            .collect::<Result<_>>()?;
        Ok(Self {
            encoder,
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
    pub fn weight_dtype(&self) -> crate::weights::MatrixDtype {
        self.encoder.conv_in.dtype()
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
        let parts = in_row_shards(batch, &|start, len| {
            let rows = |t: &Tensor| t.narrow(0, start, len);
            let shard = ShardConditions::of(extra, start, len)?;
            self.forward_conditioned(
                &rows(sample)?,
                &timesteps[start..start + len],
                &rows(context)?,
                &shard.view(),
            )
        })?;
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
        let temb = self
            .encoder
            .embed_time(&self.config, timesteps, extra, &self.device)?;

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

        let mut skips = Vec::new();
        let mut x = self
            .encoder
            .forward(&sample, &temb, context, None, &mut skips)?;
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

crate::impl_layers!(UNet: encoder, up_blocks, conv_out);
