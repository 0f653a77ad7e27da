//! Dec (and its encoder): diffusers' `AutoencoderKL`.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::VaeConfig;
use super::tiling::{tiled, Tiles};
use crate::error::{Error, Result};
use crate::latent::unet::resnet::{ResnetBlock2D, ResnetOptions};
use crate::nn::{attention, Conv2d, GroupNorm, Linear};
use crate::weights::{Vb, Weights};

const EPS: f64 = 1e-6;

/// The VAE's single-head spatial self-attention (diffusers' `Attention` with a group norm and a
/// residual connection).
#[derive(Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn load(vb: &Vb, ch: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), groups, ch, EPS)?,
            to_q: Linear::load(&vb.pp("to_q"), ch, ch, true)?,
            to_k: Linear::load(&vb.pp("to_k"), ch, ch, true)?,
            to_v: Linear::load(&vb.pp("to_v"), ch, ch, true)?,
            to_out: Linear::load(&vb.pp("to_out.0"), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let out = attention(
            &self.to_q.forward(&tokens)?,
            &self.to_k.forward(&tokens)?,
            &self.to_v.forward(&tokens)?,
            1,
            None,
        )?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}

/// `UNetMidBlock2D` without a timestep: resnet, attention, resnet.
#[derive(Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<SpatialAttention>,
}

impl MidBlock {
    fn load(vb: &Vb, ch: usize, c: &VaeConfig) -> Result<Self> {
        let o = options(c);
        Ok(Self {
            resnets: (0..2)
                .map(|i| ResnetBlock2D::load(&vb.pp("resnets").pp(i), ch, ch, &o))
                .collect::<Result<_>>()?,
            attention: c
                .mid_block_add_attention
                .then(|| SpatialAttention::load(&vb.pp("attentions.0"), ch, c.norm_num_groups))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

fn options(c: &VaeConfig) -> ResnetOptions {
    ResnetOptions {
        groups: c.norm_num_groups,
        eps: EPS,
        temb_channels: None,
        time_scale_shift: false,
        output_scale_factor: 1.0,
    }
}

#[derive(Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

#[derive(Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<EncoderBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let chs = &c.block_out_channels;
        let o = options(c);
        let mut blocks = Vec::new();
        let mut in_ch = chs[0];
        for (i, &out_ch) in chs.iter().enumerate() {
            let bvb = vb.pp("down_blocks").pp(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let ch = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::load(&bvb.pp("resnets").pp(j), ch, out_ch, &o)
                })
                .collect::<Result<_>>()?;
            let downsampler = (i + 1 < chs.len())
                .then(|| Conv2d::load(&bvb.pp("downsamplers.0.conv"), out_ch, out_ch, 3, 2, 0))
                .transpose()?;
            blocks.push(EncoderBlock {
                resnets,
                downsampler,
            });
            in_ch = out_ch;
        }
        let last = *chs.last().expect("validated non-empty");
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, chs[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::load(&vb.pp("mid_block"), last, c)?,
            norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, last, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), last, 2 * c.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(down) = &block.downsampler {
                // diffusers pads right and bottom by one, then convolves without padding.
                h = down.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

#[derive(Clone)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

#[derive(Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<DecoderBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let o = options(c);
        let mut blocks = Vec::new();
        let mut prev = reversed[0];
        for (i, &out_ch) in reversed.iter().enumerate() {
            let bvb = vb.pp("up_blocks").pp(i);
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let ch = if j == 0 { prev } else { out_ch };
                    ResnetBlock2D::load(&bvb.pp("resnets").pp(j), ch, out_ch, &o)
                })
                .collect::<Result<_>>()?;
            let upsampler = (i + 1 < reversed.len())
                .then(|| Conv2d::load(&bvb.pp("upsamplers.0.conv"), out_ch, out_ch, 3, 1, 1))
                .transpose()?;
            blocks.push(DecoderBlock { resnets, upsampler });
            prev = out_ch;
        }
        let first = c.block_out_channels[0];
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.latent_channels, reversed[0], 3, 1, 1)?,
            mid: MidBlock::load(&vb.pp("mid_block"), reversed[0], c)?,
            blocks,
            norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, first, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), first, c.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for block in &self.blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(up) = &block.upsampler {
                h = up.forward_upsampled2x(&h)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// The KL autoencoder: images in [-1, 1] <-> latents.
#[derive(Clone)]
pub struct AutoencoderKl {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

/// The legacy attention names that old VAE checkpoints use, and diffusers still accepts.
const LEGACY_ATTENTION: [(&str, &str); 4] = [
    ("to_q", "query"),
    ("to_k", "key"),
    ("to_v", "value"),
    ("to_out.0", "proj_attn"),
];

impl AutoencoderKl {
    pub fn load(dir: &Path, variant: Option<&str>, device: &Device) -> Result<Self> {
        Self::load_as(dir, variant, device, crate::weights::MatrixDtype::F32)
    }

    /// As [`AutoencoderKl::load`], keeping weight matrices and kernels in `matrix_dtype`.
    pub fn load_as(
        dir: &Path,
        variant: Option<&str>,
        device: &Device,
        matrix_dtype: crate::weights::MatrixDtype,
    ) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let mut weights = Weights::open_component(dir, variant, device)?;
        weights.store_matrices_as(matrix_dtype);
        Self::from_stored(config, weights)
    }

    /// The autoencoder from weights in diffusers' names (the legacy attention names
    /// accepted); every stored tensor must be used.
    pub fn from_stored(config: VaeConfig, mut weights: Weights) -> Result<Self> {
        Self::accept_legacy_names(&mut weights);
        let model = Self::from_weights(config, &weights.root())?;
        weights.finish()?;
        Ok(model)
    }

    /// Lets `weights` serve the mid-block attention under its legacy names too (`query`,
    /// `proj_attn`, ...), as diffusers does.
    pub fn accept_legacy_names(weights: &mut Weights) {
        for part in ["encoder", "decoder"] {
            for (new, old) in LEGACY_ATTENTION {
                for leaf in ["weight", "bias"] {
                    let stored = format!("{part}.mid_block.attentions.0.{old}.{leaf}");
                    if weights.contains(&stored) {
                        weights.alias(
                            format!("{part}.mid_block.attentions.0.{new}.{leaf}"),
                            stored,
                        );
                    }
                }
            }
        }
    }

    pub fn from_weights(config: VaeConfig, vb: &Vb) -> Result<Self> {
        let l2 = 2 * config.latent_channels;
        let l = config.latent_channels;
        Ok(Self {
            encoder: Encoder::load(&vb.pp("encoder"), &config)?,
            decoder: Decoder::load(&vb.pp("decoder"), &config)?,
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2d::load(&vb.pp("quant_conv"), l2, l2, 1, 1, 0))
                .transpose()?,
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::load(&vb.pp("post_quant_conv"), l, l, 1, 1, 0))
                .transpose()?,
            config,
        })
    }

    /// Decodes unscaled latents (the U-Net's latents divided by `scaling_factor`) to images
    /// in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// [`AutoencoderKl::decode`] in overlapping tiles, as diffusers' `enable_tiling()`: a
    /// latent larger than one tile (`sample_size / factor`) is decoded tile by tile.
    pub fn decode_tiled(&self, z: &Tensor) -> Result<Tensor> {
        let Some(tile_out) = self.config.sample_size else {
            return self.decode(z);
        };
        let tile_in = tile_out / self.config.downsampling_factor();
        let (_, _, h, w) = z.dims4()?;
        if h <= tile_in && w <= tile_in {
            return self.decode(z);
        }
        tiled(z, &Tiles::new(tile_in, tile_out), &|tile| self.decode(tile))
    }

    /// Encodes images in [-1, 1] to the latent distribution's (mean, log-variance).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_maybe_tiled(x, false)
    }

    /// [`AutoencoderKl::encode`] in overlapping tiles when the picture is larger than one
    /// (`sample_size`), as diffusers' `enable_tiling()`.
    pub fn encode_tiled(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_maybe_tiled(x, true)
    }

    fn encode_maybe_tiled(&self, x: &Tensor, tiling: bool) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let f = self.config.downsampling_factor();
        if h % f != 0 || w % f != 0 {
            return Err(Error::InvalidRequest(format!(
                "image size {w}x{h} is not a multiple of the VAE's factor {f}"
            )));
        }
        let moments_of = |x: &Tensor| -> Result<Tensor> {
            let moments = self.encoder.forward(x)?;
            Ok(match &self.quant_conv {
                Some(conv) => conv.forward(&moments)?,
                None => moments,
            })
        };
        let moments = match self.config.sample_size {
            Some(tile) if tiling && (h > tile || w > tile) => {
                tiled(x, &Tiles::new(tile, tile / f), &moments_of)?
            }
            _ => moments_of(x)?,
        };
        let l = self.config.latent_channels;
        Ok((
            moments.narrow(1, 0, l)?,
            moments.narrow(1, l, l)?.clamp(-30.0, 20.0)?,
        ))
    }
}
