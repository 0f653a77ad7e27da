//! The options that steer a generation with ControlNets.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use text2img::image_in;
use text2img::pipeline::{ControlMode, ControlUnit, GenerateRequest, Pipeline};

#[derive(Args)]
pub struct ControlArgs {
    /// A ControlNet (a diffusers ControlNetModel folder) steering the layout by its
    /// --control-image; repeatable, each with its own --control-image, in the same order.
    #[arg(long = "controlnet", value_name = "DIR")]
    controlnets: Vec<PathBuf>,
    /// The control image (an edge map, a pose, a depth map...) of each --controlnet, taken as
    /// given and resized to the output size.
    #[arg(long = "control-image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// Each ControlNet's weight (diffusers' controlnet_conditioning_scale); one value for
    /// all, or one per --controlnet. Default 1.
    #[arg(long = "control-scale", value_name = "W")]
    scales: Vec<f64>,
    /// The fraction of the steps where each ControlNet starts acting (default 0)...
    #[arg(long = "control-start", value_name = "FRACTION")]
    starts: Vec<f64>,
    /// ...and where it stops (default 1).
    #[arg(long = "control-end", value_name = "FRACTION")]
    ends: Vec<f64>,
    /// How each control image is made from its file: `none` takes it as given, `canny` draws
    /// its edges (OpenCV's Canny); one value for all, or one per --controlnet.
    #[arg(long = "control-preprocess", value_parser = ["none", "canny"], value_name = "none|canny")]
    preprocess: Vec<String>,
    /// Canny's thresholds: a gradient above --canny-high is an edge, and one above
    /// --canny-low connected to an edge.
    #[arg(long, default_value_t = 100.0)]
    canny_low: f64,
    #[arg(long, default_value_t = 200.0)]
    canny_high: f64,
    /// diffusers' guess mode: the ControlNets see the conditional half of guidance only
    /// (the prompt may be empty), their residuals ramped from 0.1 to 1 over the blocks.
    #[arg(long)]
    guess_mode: bool,
}

/// The i-th of `values` (one for all, or one per ControlNet), or `default`.
fn nth(flag: &str, values: &[f64], i: usize, count: usize, default: f64) -> Result<f64> {
    match values.len() {
        0 => Ok(default),
        1 => Ok(values[0]),
        n if n == count => Ok(values[i]),
        n => bail!("{n} values of {flag} for {count} ControlNets: give one, or one each"),
    }
}

impl ControlArgs {
    /// Reads the control images into the request (a bad file fails here, before the model
    /// loads).
    pub fn apply(&self, request: &mut GenerateRequest) -> Result<()> {
        let count = self.controlnets.len();
        if self.images.len() != count {
            bail!(
                "{count} --controlnet and {} --control-image: each ControlNet needs its image",
                self.images.len()
            );
        }
        if count == 0
            && (!self.scales.is_empty()
                || !self.starts.is_empty()
                || !self.ends.is_empty()
                || !self.preprocess.is_empty()
                || self.guess_mode)
        {
            bail!("--control-scale, --control-start, --control-end, --control-preprocess and --guess-mode need a --controlnet");
        }
        request.controls = self
            .images
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let picture = image_in::open(path, image_in::DEFAULT_MAX_SIDE)
                    .map_err(|e| anyhow::anyhow!("--control-image: {e}"))?;
                let preprocess = match self.preprocess.len() {
                    0 => "none",
                    1 => self.preprocess[0].as_str(),
                    n if n == count => self.preprocess[i].as_str(),
                    n => bail!("{n} values of --control-preprocess for {count} ControlNets: give one, or one each"),
                };
                let image = image_in::rgb(&picture);
                let image = match preprocess {
                    "canny" => text2img::canny::canny_rgb(&image, self.canny_low, self.canny_high),
                    _ => image,
                };
                let unit = ControlUnit {
                    scale: nth("--control-scale", &self.scales, i, count, 1.0)?,
                    start: nth("--control-start", &self.starts, i, count, 0.0)?,
                    end: nth("--control-end", &self.ends, i, count, 1.0)?,
                    mode: if self.guess_mode {
                        ControlMode::Control
                    } else {
                        ControlMode::Balanced
                    },
                    ..ControlUnit::new(i, image)
                };
                unit.check(count)?;
                Ok(unit)
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// Loads the ControlNets into the pipeline, in the order of the flags.
    pub fn load(
        &self,
        pipeline: &mut Pipeline,
        dtype: text2img::weights::MatrixDtype,
    ) -> Result<()> {
        for dir in &self.controlnets {
            pipeline
                .add_controlnet(dir, dtype)
                .with_context(|| format!("loading ControlNet {}", dir.display()))?;
        }
        Ok(())
    }
}

/// `text2img preprocess canny IN OUT`: the control image a preprocessor makes, to look at.
#[derive(Args)]
pub struct PreprocessArgs {
    /// The preprocessor.
    #[arg(value_parser = ["canny"])]
    kind: String,
    /// The picture.
    input: PathBuf,
    /// The PNG to write.
    output: PathBuf,
    #[arg(long, default_value_t = 100.0)]
    low: f64,
    #[arg(long, default_value_t = 200.0)]
    high: f64,
}

pub fn preprocess_cmd(a: PreprocessArgs) -> Result<()> {
    let picture = image_in::open(&a.input, image_in::DEFAULT_MAX_SIDE)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
    let edges = text2img::canny::canny_rgb(&image_in::rgb(&picture), a.low, a.high);
    let png = text2img::png_out::encode_rgb_png(
        edges.as_raw(),
        edges.width() as usize,
        edges.height() as usize,
        None,
    )?;
    text2img::png_out::write_atomic(&a.output, &png)?;
    println!("{}", a.output.display());
    Ok(())
}
