//! The classifier-free guidance options that `generate`, `grid` and `evaluate` share.

use clap::Args;

use text2img::pipeline::GuidanceInterval;

#[derive(Args)]
pub struct GuidanceArgs {
    /// <= 1 runs no unconditional pass (default: the model's).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Scale the guided prediction back toward the conditional one's spread, 0 to 1
    /// (diffusers' guidance_rescale; 0.7 is the paper's value for zero-terminal-SNR models;
    /// default: the model's, else 0).
    #[arg(long)]
    pub guidance_rescale: Option<f64>,
    /// Guide only this part of the steps, START,END as fractions of them (e.g. 0,0.5: the
    /// first half); the other steps run the conditional prediction alone, at half the cost
    /// (default: the model's, else 0,1).
    #[arg(long, value_parser = GuidanceInterval::parse)]
    pub guidance_interval: Option<GuidanceInterval>,
    /// Autoguidance's weight w: step w - 1 times further from a weaker U-Net's prediction
    /// (the model folder's guide_unet/), on the steps of the guidance interval; <= 1 is off
    /// (default: the model's, else off).
    #[arg(long)]
    pub autoguidance: Option<f64>,
}
