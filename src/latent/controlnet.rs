//! ControlNet (diffusers' `ControlNetModel`): a trained copy of the U-Net's down path and mid
//! block that also reads a control image (edges, a pose, depth). Its outputs, each through a
//! 1x1 convolution, are added to the U-Net's skip connections and mid block
//! ([`ControlResiduals`]), so the image steers the layout while the prompt keeps the rest.
//!
//! The U-Net half is built by the U-Net's own block code from the same config fields; what
//! is ControlNet's own is the control image's embedding and the output convolutions.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::nn::Conv2d;
use crate::weights::{Vb, Weights};

use super::unet::encoder::EncoderHalf;
use super::unet::{in_row_shards, ControlResiduals, ExtraConditions, ShardConditions, UNetConfig};

/// ControlNet's own config fields (the rest are the U-Net's).
#[derive(Clone, Debug, Deserialize)]
struct ControlFields {
    #[serde(default = "d_conditioning_channels")]
    conditioning_channels: usize,
    #[serde(default = "d_embedding_channels")]
    conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default)]
    global_pool_conditions: bool,
    #[serde(default = "d_rgb")]
    controlnet_conditioning_channel_order: String,
}

fn d_conditioning_channels() -> usize {
    3
}
fn d_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn d_rgb() -> String {
    "rgb".into()
}

/// The control image to features at the latents' size: a 3x3 convolution, then pairs of 3x3
/// convolutions (the second of each halving the size), SiLU after each, then a 3x3
/// convolution to the U-Net's first width.
#[derive(Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn load(vb: &Vb, in_channels: usize, widths: &[usize], out_channels: usize) -> Result<Self> {
        let mut blocks = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            let vb = vb.pp("blocks");
            blocks.push(Conv2d::load(&vb.pp(2 * i), pair[0], pair[0], 3, 1, 1)?);
            blocks.push(Conv2d::load(&vb.pp(2 * i + 1), pair[0], pair[1], 3, 2, 1)?);
        }
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), in_channels, widths[0], 3, 1, 1)?,
            blocks,
            conv_out: Conv2d::load(
                &vb.pp("conv_out"),
                *widths.last().expect("checked non-empty"),
                out_channels,
                3,
                1,
                1,
            )?,
        })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(image)?.silu()?;
        for conv in &self.blocks {
            x = conv.forward(&x)?.silu()?;
        }
        self.conv_out.forward(&x)
    }
}

crate::impl_layers!(ConditioningEmbedding: conv_in, blocks, conv_out);

#[derive(Clone)]
pub struct ControlNet {
    /// The U-Net half's config (its blocks, widths, attention), read from the same file.
    pub config: UNetConfig,
    global_pool: bool,
    /// How much smaller the latents are than the control image (2 per stride-2 pair).
    pub downscale: usize,
    conditioning_channels: usize,
    /// The U-Net's first half, copied (its time embedding, conv_in, down and mid blocks).
    encoder: EncoderHalf,
    cond_embedding: ConditioningEmbedding,
    /// One 1x1 convolution per skip connection, and one for the mid block.
    down_outputs: Vec<Conv2d>,
    mid_output: Conv2d,
    device: Device,
}

impl ControlNet {
    /// Loads a diffusers `ControlNetModel` folder (`config.json` and its weights); every
    /// stored tensor must be used.
    pub fn load(
        dir: &Path,
        device: &Device,
        matrix_dtype: crate::weights::MatrixDtype,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let mut weights = Weights::open_component(dir, None, device)?;
        weights.store_matrices_as(matrix_dtype);
        let model = Self::from_config_text(&text, &config_path, &weights.root())?;
        weights.finish()?;
        Ok(model)
    }

    /// From a `config.json`'s text (`path` names it in errors) and the weights under `vb`.
    pub fn from_config_text(text: &str, path: &Path, vb: &Vb) -> Result<Self> {
        let mut raw: Value = crate::error::parse_json(text, path)?;
        match raw.get("_class_name").and_then(Value::as_str) {
            Some("ControlNetModel") | None => {}
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!("this is a `{other}`, not a ControlNetModel"),
                ))
            }
        }
        let fields: ControlFields =
            serde_json::from_value(raw.clone()).map_err(|e| Error::config(path, e.to_string()))?;
        if fields.controlnet_conditioning_channel_order != "rgb" {
            return Err(Error::config(
                path,
                "only `controlnet_conditioning_channel_order` = \"rgb\" is supported",
            ));
        }
        // The U-Net half has no up path: give the U-Net config the mirror of the down path,
        // which only its validation reads.
        if let Some(obj) = raw.as_object_mut() {
            let ups: Vec<Value> = obj
                .get("down_block_types")
                .and_then(Value::as_array)
                .map(|downs| {
                    downs
                        .iter()
                        .rev()
                        .map(|d| Value::String(d.as_str().unwrap_or("").replace("Down", "Up")))
                        .collect()
                })
                .unwrap_or_default();
            if !ups.is_empty() {
                obj.insert("up_block_types".into(), Value::Array(ups));
            }
        }
        let config = UNetConfig::from_json(&raw.to_string(), path)?;
        Self::from_parts(config, &fields, vb).map_err(|e| match e {
            Error::InvalidRequest(m) => Error::config(path, m),
            e => e,
        })
    }

    /// A single-file ControlNet: the original layout (`control_model.input_hint_block.*`,
    /// `zero_convs.*`, as released) or the diffusers names in one file. A single file
    /// carries no config: the U-Net half is the base model's encoder (`base`), as
    /// diffusers' `ControlNetModel.from_unet` makes it, and the control image's
    /// convolutions are read from the shapes. Every stored tensor must be used.
    pub fn load_file(
        path: &Path,
        base: &UNetConfig,
        device: &Device,
        matrix_dtype: crate::weights::MatrixDtype,
    ) -> Result<Self> {
        let weights = Weights::open_single(path, &["ckpt", "pt", "pth"], device)?
            .ok_or_else(|| {
                Error::config(path, "not a ControlNet file: expected .safetensors, .ckpt, .pt or .pth (or a diffusers folder)")
            })?;
        let names: Vec<String> = {
            let mut n: Vec<String> = weights.names().cloned().collect();
            n.sort();
            n
        };
        let diffusers = names
            .iter()
            .any(|n| n == "controlnet_cond_embedding.conv_in.weight");
        let prefix = ["control_model.", ""]
            .into_iter()
            .find(|p| names.contains(&format!("{p}input_hint_block.0.weight")));
        let component = match (diffusers, prefix) {
            (true, _) => None,
            (false, Some(prefix)) => Some(weights.component(
                &crate::weights::single_file::layout::controlnet(&names, prefix, base),
            )?),
            (false, None) => {
                return Err(Error::config(
                    path,
                    "not a ControlNet: it has neither `control_model.input_hint_block.*` nor `controlnet_cond_embedding.*` tensors",
                ))
            }
        };
        // The original layout's tensors come as a component of the file: the file's own
        // check then finds the tensors no rule mapped.
        let (mut model_weights, file) = match component {
            Some(c) => (c, Some(weights)),
            None => (weights, None),
        };
        model_weights.store_matrices_as(matrix_dtype);
        let shape = |name: &str| -> Result<Vec<usize>> {
            model_weights
                .shapes()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.to_vec())
                .ok_or_else(|| Error::config(path, format!("no `{name}` tensor")))
        };
        // conv_in, then pairs (same width, then the next width at half the size), conv_out.
        let conv_in = shape("controlnet_cond_embedding.conv_in.weight")?;
        let pairs = (0..)
            .take_while(|k| {
                model_weights.contains(&format!(
                    "controlnet_cond_embedding.blocks.{}.weight",
                    2 * k + 1
                ))
            })
            .count();
        let mut widths = vec![conv_in[0]];
        for k in 0..pairs {
            widths.push(
                shape(&format!(
                    "controlnet_cond_embedding.blocks.{}.weight",
                    2 * k + 1
                ))?[0],
            );
        }
        let fields = ControlFields {
            conditioning_channels: conv_in[1],
            conditioning_embedding_out_channels: widths,
            global_pool_conditions: false,
            controlnet_conditioning_channel_order: "rgb".into(),
        };
        let model = Self::from_parts(base.clone(), &fields, &model_weights.root())?;
        model_weights.finish()?;
        if let Some(file) = file {
            file.finish()?;
        }
        Ok(model)
    }

    fn from_parts(config: UNetConfig, fields: &ControlFields, vb: &Vb) -> Result<Self> {
        let widths = &fields.conditioning_embedding_out_channels;
        if widths.is_empty() {
            return Err(Error::InvalidRequest(
                "`conditioning_embedding_out_channels` is empty".into(),
            ));
        }
        let c = &config;
        let ch0 = c.block_out_channels[0];
        let mut down_outputs = vec![Conv2d::load(
            &vb.pp("controlnet_down_blocks").pp(0),
            ch0,
            ch0,
            1,
            1,
            0,
        )?];
        for (i, &out_ch) in c.block_out_channels.iter().enumerate() {
            let last = i + 1 == c.block_out_channels.len();
            let outputs = c.down_blocks[i].layers + usize::from(!last);
            for _ in 0..outputs {
                let k = down_outputs.len();
                down_outputs.push(Conv2d::load(
                    &vb.pp("controlnet_down_blocks").pp(k),
                    out_ch,
                    out_ch,
                    1,
                    1,
                    0,
                )?);
            }
        }
        let last = *c.block_out_channels.last().expect("config has blocks");
        Ok(Self {
            global_pool: fields.global_pool_conditions,
            downscale: 1 << (widths.len() - 1),
            conditioning_channels: fields.conditioning_channels,
            encoder: EncoderHalf::load(vb, c)?,
            cond_embedding: ConditioningEmbedding::load(
                &vb.pp("controlnet_cond_embedding"),
                fields.conditioning_channels,
                widths,
                ch0,
            )?,
            down_outputs,
            mid_output: Conv2d::load(&vb.pp("controlnet_mid_block"), last, last, 1, 1, 0)?,
            device: vb.device().clone(),
            config,
        })
    }

    /// [`ControlNet::forward`] with the batch split into shards, one per thread, as
    /// [`super::unet::UNet::forward_sharded`]: guidance's two halves side by side. Each row's
    /// residuals are the same as in one pass.
    pub fn forward_sharded(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        extra: &ExtraConditions,
        image: &Tensor,
    ) -> Result<ControlResiduals> {
        let batch = sample.dim(0)?;
        let parts = in_row_shards(batch, &|start, len| {
            let rows = |t: &Tensor| t.narrow(0, start, len);
            let shard = ShardConditions::of(extra, start, len)?;
            self.forward(
                &rows(sample)?,
                &timesteps[start..start + len],
                &rows(context)?,
                &shard.view(),
                &rows(image)?,
            )
        })?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one shard"));
        }
        let cat = |pick: &dyn Fn(&ControlResiduals) -> &Tensor| -> Result<Tensor> {
            let tensors: Vec<&Tensor> = parts.iter().map(pick).collect();
            Ok(Tensor::cat(&tensors, 0)?)
        };
        Ok(ControlResiduals {
            down: (0..parts[0].down.len())
                .map(|k| cat(&|r| &r.down[k]))
                .collect::<Result<_>>()?,
            mid: cat(&|r| &r.mid)?,
        })
    }

    /// The residuals for `sample` (batch, in_channels, h, w) at `timesteps` with the control
    /// `image` (batch, 3, h x downscale, w x downscale), values in 0..1; unscaled (the
    /// caller weighs them, per residual in guess mode).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        extra: &ExtraConditions,
        image: &Tensor,
    ) -> Result<ControlResiduals> {
        let (_, _, h, w) = sample.dims4()?;
        let (_, c, ih, iw) = image.dims4()?;
        if c != self.conditioning_channels || ih != h * self.downscale || iw != w * self.downscale {
            return Err(Error::InvalidRequest(format!(
                "the control image is {c}x{ih}x{iw}; this ControlNet takes {}x{}x{} for latents of {h}x{w}",
                self.conditioning_channels,
                h * self.downscale,
                w * self.downscale
            )));
        }
        let extra = ExtraConditions {
            control: None,
            ..*extra
        };
        let temb = self
            .encoder
            .embed_time(&self.config, timesteps, &extra, &self.device)?;
        let hint = self.cond_embedding.forward(image)?;
        let mut skips = Vec::new();
        let x = self
            .encoder
            .forward(sample, &temb, context, Some(&hint), &mut skips)?;
        let pool = |t: Tensor| -> Result<Tensor> {
            Ok(if self.global_pool {
                t.mean_keepdim(3)?.mean_keepdim(2)?
            } else {
                t
            })
        };
        let down = skips
            .iter()
            .zip(&self.down_outputs)
            .map(|(s, conv)| pool(conv.forward(s)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(ControlResiduals {
            down,
            mid: pool(self.mid_output.forward(&x)?)?,
        })
    }

    /// Why this ControlNet cannot steer `unet` (made for another base model), if it cannot.
    pub fn mismatch(&self, unet: &UNetConfig) -> Option<String> {
        let (a, b) = (&self.config, unet);
        let describe = |c: &UNetConfig| {
            format!(
                "widths {:?}, text width {}, {}",
                c.block_out_channels,
                c.cross_attention_dim().unwrap_or(0),
                if c.text_time.is_some() {
                    "SDXL conditioning"
                } else {
                    "no SDXL conditioning"
                }
            )
        };
        let same = a.block_out_channels == b.block_out_channels
            && a.cross_attention_dim() == b.cross_attention_dim()
            && a.text_time.is_some() == b.text_time.is_some()
            && a.down_blocks
                .iter()
                .map(|d| d.layers)
                .eq(b.down_blocks.iter().map(|d| d.layers));
        (!same).then(|| {
            format!(
                "this ControlNet was made for another base model ({}); the model's U-Net has {}",
                describe(a),
                describe(b)
            )
        })
    }
}

crate::impl_layers!(ControlNet: encoder, cond_embedding, down_outputs, mid_output);
