//! `vae/config.json` (diffusers' `AutoencoderKL`), with the class's defaults.

use std::path::Path;

use serde::Deserialize;

use crate::error::{read_json, Error, Result};

#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
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
fn d32() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_scale() -> f64 {
    0.18215
}
fn d_silu() -> String {
    "silu".into()
}
fn d_channels() -> Vec<usize> {
    vec![64]
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::checked(read_json(path)?, path)
    }

    /// From the text of a `config.json` that `path` names (in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        Self::checked(crate::error::parse_json(text, path)?, path)
    }

    fn checked(c: Self, path: &Path) -> Result<Self> {
        let n = c.block_out_channels.len();
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "block_out_channels, down_block_types and up_block_types must have the same length",
            ));
        }
        if let Some(t) = c
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(Error::config(
                path,
                format!("down block type `{t}` is not supported"),
            ));
        }
        if let Some(t) = c.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(Error::config(
                path,
                format!("up block type `{t}` is not supported"),
            ));
        }
        if c.act_fn != "silu" && c.act_fn != "swish" {
            return Err(Error::config(
                path,
                format!("act_fn `{}` is not supported", c.act_fn),
            ));
        }
        if c.norm_num_groups == 0 {
            return Err(Error::config(path, "norm_num_groups must be at least 1"));
        }
        if let Some(ch) = c
            .block_out_channels
            .iter()
            .find(|ch| *ch % c.norm_num_groups != 0)
        {
            return Err(Error::config(
                path,
                format!(
                    "{ch} channels cannot be split into {} norm groups",
                    c.norm_num_groups
                ),
            ));
        }
        Ok(c)
    }

    /// How many pixels one latent covers along each axis.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
