//! Dec: the VAE that maps latents to pixels (and images to latents), plus a cheap preview.

pub mod autoencoder;
pub mod config;
pub mod preview;
pub mod replacement;
pub mod tiling;

pub use autoencoder::AutoencoderKl;
pub use config::VaeConfig;
