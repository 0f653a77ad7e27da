//! `unet/config.json` (diffusers' `UNet2DConditionModel`), with the class's defaults. Fields
//! that may be an int or a per-block list are normalised to per-block lists.

use std::path::Path;

use serde::Deserialize;

use crate::error::{read_json, Error, Result};

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn per_block(&self, blocks: usize, path: &Path, field: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); blocks]),
            OneOrMany::Many(v) if v.len() == blocks => Ok(v.clone()),
            OneOrMany::Many(v) => Err(Error::config(
                path,
                format!("`{field}` has {} entries for {blocks} blocks", v.len()),
            )),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct RawUNetConfig {
    #[serde(default = "d4")]
    in_channels: usize,
    #[serde(default = "d4")]
    out_channels: usize,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "d_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "d_down")]
    down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    up_block_types: Vec<String>,
    #[serde(default = "d_false_one")]
    only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_channels")]
    block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    layers_per_block: OneOrMany<usize>,
    #[serde(default = "d1")]
    downsample_padding: usize,
    #[serde(default = "d1f")]
    mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    act_fn: String,
    #[serde(default = "d_groups")]
    norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    norm_eps: f64,
    #[serde(default = "d_cross")]
    cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_one")]
    transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_head")]
    attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default = "d_default")]
    resnet_time_scale_shift: String,
    #[serde(default = "d1f")]
    resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    time_embedding_type: String,
    #[serde(default)]
    time_embedding_dim: Option<usize>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
    #[serde(default = "d3")]
    conv_in_kernel: usize,
    #[serde(default = "d3")]
    conv_out_kernel: usize,
    #[serde(default)]
    sample_size: Option<usize>,
    // Features of other model families; refused with a clear error when set.
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    encoder_hid_dim: Option<usize>,
    #[serde(default)]
    num_class_embeds: Option<usize>,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    time_embedding_act_fn: Option<String>,
    #[serde(default)]
    timestep_post_act: Option<String>,
    #[serde(default)]
    resnet_skip_time_act: bool,
    #[serde(default = "d_attention_type")]
    attention_type: String,
    #[serde(default)]
    mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    cross_attention_norm: Option<String>,
}

fn d1() -> usize {
    1
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d1f() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_false_one() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn d_one() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_head() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_attention_type() -> String {
    "default".into()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

/// One down or up block, as the model code needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockConfig {
    pub cross_attention: bool,
    pub layers: usize,
    /// Number of attention heads (diffusers' misnamed `attention_head_dim` for SD 1.x/2.x).
    pub heads: usize,
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
    pub only_cross_attention: bool,
}

/// SDXL's added conditioning (`addition_embed_type: "text_time"`): the pooled text
/// embedding and six size/crop numbers, embedded and added to the timestep embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTimeConfig {
    /// Sinusoidal features per time id (`addition_time_embed_dim`).
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: text embedding width + 6 x time_embed_dim.
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// The width of the pooled text embedding the U-Net expects with SDXL's six time ids.
    pub fn text_embeds_dim(&self) -> usize {
        self.text_embeds_dim_with(6)
    }

    /// The pooled text embedding's width with `ids` time ids (the SDXL refiner takes five:
    /// the aesthetic score in place of the target size).
    pub fn text_embeds_dim_with(&self, ids: usize) -> usize {
        self.input_dim.saturating_sub(ids * self.time_embed_dim)
    }
}

/// The U-Net's architecture, every number read from `unet/config.json`.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<BlockConfig>,
    /// Up blocks in execution order (deepest first), with their own layer counts.
    pub up_blocks: Vec<BlockConfig>,
    /// The mid block, if any (`UNetMidBlock2DCrossAttn`).
    pub mid_block: Option<BlockConfig>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub resnet_out_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub time_embedding_dim: usize,
    /// LCM: the width of the guidance-scale embedding added to the timestep features.
    pub time_cond_proj_dim: Option<usize>,
    /// SDXL's added conditioning, when `addition_embed_type` is `text_time`.
    pub text_time: Option<TextTimeConfig>,
    /// `resnet_time_scale_shift` = `scale_shift`: the timestep embedding scales and shifts
    /// each ResNet block's normalised features (`default`: it is added before the norm).
    pub time_scale_shift: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub sample_size: Option<usize>,
}

impl UNetConfig {
    /// The width of the context its cross-attention reads (the largest over the down blocks;
    /// `None` without down blocks).
    pub fn cross_attention_dim(&self) -> Option<usize> {
        self.down_blocks.iter().map(|b| b.cross_attention_dim).max()
    }

    /// The pooled text-embedding width of SDXL's added conditioning; `None` without it.
    pub fn text_embeds_dim(&self) -> Option<usize> {
        self.text_time.as_ref().map(TextTimeConfig::text_embeds_dim)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawUNetConfig = read_json(path)?;
        Self::from_raw(raw, path)
    }

    /// From the text of a `config.json` that `path` names (in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        Self::from_raw(crate::error::parse_json(text, path)?, path)
    }

    fn from_raw(raw: RawUNetConfig, path: &Path) -> Result<Self> {
        let err = |m: String| Error::config(path, m);
        let refuse = |field: &str, what: &str| {
            err(format!(
                "`{field}` = {what} is not supported (Stable Diffusion 1.x/2.x/XL UNets only)"
            ))
        };
        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let (Some(time_dim), Some(input_dim)) = (
                    raw.addition_time_embed_dim,
                    raw.projection_class_embeddings_input_dim,
                ) else {
                    return Err(err("`addition_embed_type` \"text_time\" needs `addition_time_embed_dim` and `projection_class_embeddings_input_dim`".into()));
                };
                if input_dim <= 6 * time_dim {
                    return Err(err(format!(
                        "`projection_class_embeddings_input_dim` {input_dim} leaves no room for text embeddings beside 6 time ids x {time_dim}"
                    )));
                }
                Some(TextTimeConfig {
                    time_embed_dim: time_dim,
                    input_dim,
                })
            }
            Some(v) => return Err(refuse("addition_embed_type", v)),
        };
        if raw
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(refuse("reverse_transformer_layers_per_block", "set"));
        }
        if let Some(v) = &raw.class_embed_type {
            return Err(refuse("class_embed_type", v));
        }
        if raw.encoder_hid_dim.is_some() {
            return Err(refuse("encoder_hid_dim", "set"));
        }
        if raw.num_class_embeds.is_some() {
            return Err(refuse("num_class_embeds", "set"));
        }
        if raw.dual_cross_attention {
            return Err(refuse("dual_cross_attention", "true"));
        }
        if !matches!(
            raw.resnet_time_scale_shift.as_str(),
            "default" | "scale_shift"
        ) {
            return Err(refuse(
                "resnet_time_scale_shift",
                &raw.resnet_time_scale_shift,
            ));
        }
        if raw.time_embedding_type != "positional" {
            return Err(refuse("time_embedding_type", &raw.time_embedding_type));
        }
        if raw.time_embedding_act_fn.is_some() || raw.timestep_post_act.is_some() {
            return Err(refuse("time_embedding_act_fn/timestep_post_act", "set"));
        }
        if raw.resnet_skip_time_act {
            return Err(refuse("resnet_skip_time_act", "true"));
        }
        if raw.attention_type != "default" {
            return Err(refuse("attention_type", &raw.attention_type));
        }
        if raw.mid_block_only_cross_attention == Some(true) {
            return Err(refuse("mid_block_only_cross_attention", "true"));
        }
        if raw.cross_attention_norm.is_some() {
            return Err(refuse("cross_attention_norm", "set"));
        }
        if raw.act_fn != "silu" && raw.act_fn != "swish" {
            return Err(refuse("act_fn", &raw.act_fn));
        }
        let Some(norm_num_groups) = raw.norm_num_groups else {
            return Err(refuse("norm_num_groups", "null"));
        };
        if norm_num_groups == 0 {
            return Err(err("norm_num_groups must be at least 1".into()));
        }
        if raw.conv_in_kernel.is_multiple_of(2) || raw.conv_out_kernel.is_multiple_of(2) {
            return Err(err("conv_in_kernel and conv_out_kernel must be odd".into()));
        }
        let n = raw.block_out_channels.len();
        if n == 0 || raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(err(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same length",
                raw.down_block_types.len(),
                raw.up_block_types.len()
            )));
        }
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`; for
        // these UNets `attention_head_dim` holds the head count.
        let heads_field = raw
            .num_attention_heads
            .clone()
            .unwrap_or_else(|| raw.attention_head_dim.clone());
        let heads = heads_field.per_block(n, path, "attention_head_dim")?;
        let only_cross = raw
            .only_cross_attention
            .per_block(n, path, "only_cross_attention")?;
        let layers = raw
            .layers_per_block
            .per_block(n, path, "layers_per_block")?;
        let cross_dims = raw
            .cross_attention_dim
            .per_block(n, path, "cross_attention_dim")?;
        let transformer_layers =
            raw.transformer_layers_per_block
                .per_block(n, path, "transformer_layers_per_block")?;

        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in raw.down_block_types.iter().enumerate() {
            let cross_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return Err(err(format!("down block type `{other}` is not supported"))),
            };
            down_blocks.push(BlockConfig {
                cross_attention,
                layers: layers[i],
                heads: heads[i],
                transformer_layers: transformer_layers[i],
                cross_attention_dim: cross_dims[i],
                only_cross_attention: only_cross[i],
            });
        }
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in raw.up_block_types.iter().enumerate() {
            let cross_attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return Err(err(format!("up block type `{other}` is not supported"))),
            };
            let r = n - 1 - i;
            up_blocks.push(BlockConfig {
                cross_attention,
                layers: layers[r] + 1,
                heads: heads[r],
                transformer_layers: transformer_layers[r],
                cross_attention_dim: cross_dims[r],
                only_cross_attention: only_cross[r],
            });
        }
        let mid_block = match raw.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => Some(BlockConfig {
                cross_attention: true,
                layers: 1,
                heads: heads[n - 1],
                transformer_layers: transformer_layers[n - 1],
                cross_attention_dim: cross_dims[n - 1],
                only_cross_attention: false,
            }),
            None => None,
            Some(other) => return Err(err(format!("mid block type `{other}` is not supported"))),
        };
        for (i, (c, h)) in raw.block_out_channels.iter().zip(&heads).enumerate() {
            if *h == 0 || c % h != 0 {
                return Err(err(format!(
                    "block {i}: {c} channels cannot be split into {h} attention heads"
                )));
            }
            if c % norm_num_groups != 0 {
                return Err(err(format!(
                    "block {i}: {c} channels cannot be split into {norm_num_groups} norm groups"
                )));
            }
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            time_embedding_dim: raw
                .time_embedding_dim
                .unwrap_or(raw.block_out_channels[0] * 4),
            block_out_channels: raw.block_out_channels,
            down_blocks,
            up_blocks,
            mid_block,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            resnet_out_scale_factor: raw.resnet_out_scale_factor,
            act_fn: raw.act_fn,
            norm_num_groups,
            norm_eps: raw.norm_eps,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
            time_cond_proj_dim: raw.time_cond_proj_dim,
            text_time,
            time_scale_shift: raw.resnet_time_scale_shift == "scale_shift",
            conv_in_kernel: raw.conv_in_kernel,
            conv_out_kernel: raw.conv_out_kernel,
            sample_size: raw.sample_size,
        })
    }
}
