//! text2img: Text2Img(c, u) = Dec(LatentGen(TextEnc(c), u)).
//!
//! - [`text`]: TextEnc, the CLIP tokenizer and text transformer;
//! - [`latent`]: LatentGen, the U-Net and the schedulers;
//! - [`vae`]: Dec, the autoencoder;
//! - [`pipeline`]: the composition, with classifier-free guidance and torch-exact seeds.

pub mod error;
pub mod latent;
pub mod nn;
pub mod rng;
pub mod text;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
