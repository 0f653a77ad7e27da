//! LatentGen: the U-Net noise predictor and the schedulers that integrate it.

pub mod controlnet;
pub mod schedulers;
pub mod unet;
