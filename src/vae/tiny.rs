//! diffusers' `AutoencoderTiny` (TAESD, TAESDXL): a small convolutional autoencoder trained
//! to match Stable Diffusion's latents, for fast decodes and live previews. Its encoder gives
//! latents directly (no distribution to sample, so no generator draws); its decoder first
//! soft-clamps the latents (tanh(z / 3) * 3).

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::Conv2d;
use crate::weights::{Vb, Weights};

/// `AutoencoderTiny`'s config.json fields (diffusers' defaults).
#[derive(Clone, Debug, Deserialize)]
pub struct TinyConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "sixty_fours")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "sixty_fours")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "relu")]
    pub act_fn: String,
    #[serde(default = "nearest")]
    pub upsample_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "one")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn one() -> f64 {
    1.0
}
fn sixty_fours() -> Vec<usize> {
    vec![64; 4]
}
fn relu() -> String {
    "relu".into()
}
fn nearest() -> String {
    "nearest".into()
}
fn encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}

impl TinyConfig {
    /// Pixels per latent: the encoder halves the size at each level after the first.
    pub fn downsampling_factor(&self) -> usize {
        1 << self.num_encoder_blocks.len().saturating_sub(1)
    }
}

/// Three 3x3 convolutions with ReLU between, a skip, ReLU after the sum.
#[derive(Clone)]
struct Block {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
}

impl Block {
    fn load(vb: &Vb, ch: usize) -> Result<Self> {
        let conv = |i: usize| Conv2d::load(&vb.pp("conv").pp(i), ch, ch, 3, 1, 1);
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
            // Same channels in and out in every block TAESD has: the skip is the identity.
            skip: None,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.convs[0].forward(x)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        let h = self.convs[2].forward(&h)?;
        let skip = match &self.skip {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        Ok((h + skip)?.relu()?)
    }
}

/// One entry of the encoder's or decoder's `layers` sequence.
#[derive(Clone)]
enum Layer {
    Conv(Conv2d),
    Block(Block),
    Relu,
    Upsample(usize),
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::Block(b) => b.forward(x),
            Layer::Relu => Ok(x.relu()?),
            Layer::Upsample(f) => {
                let (_, _, h, w) = x.dims4()?;
                Ok(x.upsample_nearest2d(h * f, w * f)?)
            }
        }
    }
}

fn run(layers: &[Layer], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for layer in layers {
        h = layer.forward(&h)?;
    }
    Ok(h)
}

#[derive(Clone)]
pub struct AutoencoderTiny {
    pub config: TinyConfig,
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
}

impl AutoencoderTiny {
    pub fn load(dir: &Path, device: &Device, dtype: crate::weights::MatrixDtype) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::io(config_path.clone(), e))?;
        let config: TinyConfig =
            serde_json::from_str(&text).map_err(|e| Error::config(&config_path, e.to_string()))?;
        if config.act_fn != "relu" || config.upsample_fn != "nearest" {
            return Err(Error::config(
                &config_path,
                format!(
                    "AutoencoderTiny with act_fn `{}` and upsample_fn `{}`: text2img has relu and nearest (TAESD's)",
                    config.act_fn, config.upsample_fn
                ),
            ));
        }
        let lengths_match = config.encoder_block_out_channels.len()
            == config.num_encoder_blocks.len()
            && config.decoder_block_out_channels.len() == config.num_decoder_blocks.len()
            && !config.num_encoder_blocks.is_empty()
            && !config.num_decoder_blocks.is_empty();
        if !lengths_match {
            return Err(Error::config(
                &config_path,
                "the block_out_channels and num_*_blocks lists must have equal, non-zero lengths",
            ));
        }
        let mut weights = Weights::open_component(dir, None, device)?;
        weights.store_matrices_as(dtype);
        let vb = weights.root();
        let encoder = Self::load_encoder(&vb.pp("encoder").pp("layers"), &config)?;
        let decoder = Self::load_decoder(&vb.pp("decoder").pp("layers"), &config)?;
        weights.finish()?;
        Ok(Self {
            config,
            encoder,
            decoder,
        })
    }

    fn load_encoder(vb: &Vb, c: &TinyConfig) -> Result<Vec<Layer>> {
        let mut layers = Vec::new();
        for (i, (&blocks, &ch)) in c
            .num_encoder_blocks
            .iter()
            .zip(&c.encoder_block_out_channels)
            .enumerate()
        {
            let at = vb.pp(layers.len());
            layers.push(Layer::Conv(if i == 0 {
                Conv2d::load(&at, c.in_channels, ch, 3, 1, 1)?
            } else {
                Conv2d::load_without_bias(&at, ch, ch, 3, 2, 1)?
            }));
            for _ in 0..blocks {
                layers.push(Layer::Block(Block::load(&vb.pp(layers.len()), ch)?));
            }
        }
        let last = *c
            .encoder_block_out_channels
            .last()
            .expect("checked non-empty");
        layers.push(Layer::Conv(Conv2d::load(
            &vb.pp(layers.len()),
            last,
            c.latent_channels,
            3,
            1,
            1,
        )?));
        Ok(layers)
    }

    fn load_decoder(vb: &Vb, c: &TinyConfig) -> Result<Vec<Layer>> {
        let first = c.decoder_block_out_channels[0];
        let mut layers = vec![
            Layer::Conv(Conv2d::load(&vb.pp(0), c.latent_channels, first, 3, 1, 1)?),
            Layer::Relu,
        ];
        let n = c.num_decoder_blocks.len();
        for (i, (&blocks, &ch)) in c
            .num_decoder_blocks
            .iter()
            .zip(&c.decoder_block_out_channels)
            .enumerate()
        {
            let last = i + 1 == n;
            for _ in 0..blocks {
                layers.push(Layer::Block(Block::load(&vb.pp(layers.len()), ch)?));
            }
            if !last {
                layers.push(Layer::Upsample(c.upsampling_scaling_factor));
            }
            let at = vb.pp(layers.len());
            layers.push(Layer::Conv(if last {
                Conv2d::load(&at, ch, c.out_channels, 3, 1, 1)?
            } else {
                Conv2d::load_without_bias(&at, ch, ch, 3, 1, 1)?
            }));
        }
        Ok(layers)
    }

    /// Images in [-1, 1] to latents (TAESD works on [0, 1]).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        run(&self.encoder, &((x + 1.0)? / 2.0)?)
    }

    /// Latents to images in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let clamped = ((z / 3.0)?.tanh()? * 3.0)?;
        Ok(((run(&self.decoder, &clamped)? * 2.0)? - 1.0)?)
    }
}
