//! Dec: the VAE that maps latents to pixels (and images to latents), plus a cheap preview.

pub mod autoencoder;
pub mod config;
pub mod preview;
pub mod replacement;
pub mod tiling;
pub mod tiny;

pub use autoencoder::AutoencoderKl;
pub use config::VaeConfig;

/// Dec (and its encoder) as the pipeline uses it: the KL autoencoder of the model, or a tiny
/// one (TAESD) put in its place for speed.
#[allow(clippy::large_enum_variant)] // one per pipeline: its size does not matter
#[derive(Clone)]
pub enum Vae {
    Kl(AutoencoderKl),
    Tiny(tiny::AutoencoderTiny),
}

impl Vae {
    /// The U-Net's latents are the autoencoder's times this.
    pub fn scaling_factor(&self) -> f64 {
        match self {
            Vae::Kl(v) => v.config.scaling_factor,
            Vae::Tiny(v) => v.config.scaling_factor,
        }
    }

    pub fn shift_factor(&self) -> Option<f64> {
        match self {
            Vae::Kl(v) => v.config.shift_factor,
            Vae::Tiny(v) => Some(v.config.shift_factor).filter(|s| *s != 0.0),
        }
    }

    pub fn latent_channels(&self) -> usize {
        match self {
            Vae::Kl(v) => v.config.latent_channels,
            Vae::Tiny(v) => v.config.latent_channels,
        }
    }

    /// Pixels per latent.
    pub fn downsampling_factor(&self) -> usize {
        match self {
            Vae::Kl(v) => v.config.downsampling_factor(),
            Vae::Tiny(v) => v.config.downsampling_factor(),
        }
    }

    /// Unscaled latents to images in [-1, 1].
    pub fn decode(&self, z: &candle_core::Tensor) -> crate::Result<candle_core::Tensor> {
        match self {
            Vae::Kl(v) => v.decode(z),
            Vae::Tiny(v) => v.decode(z),
        }
    }

    /// [`Vae::decode`] in tiles (the KL autoencoder; the tiny one decodes whole, its memory
    /// being small).
    pub fn decode_tiled(&self, z: &candle_core::Tensor) -> crate::Result<candle_core::Tensor> {
        match self {
            Vae::Kl(v) => v.decode_tiled(z),
            Vae::Tiny(v) => v.decode(z),
        }
    }

    /// The KL autoencoder, when that is what this is.
    pub fn kl(&self) -> Option<&AutoencoderKl> {
        match self {
            Vae::Kl(v) => Some(v),
            Vae::Tiny(_) => None,
        }
    }
}
