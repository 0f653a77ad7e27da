//! text2img: Text2Img(c, u) = Dec(LatentGen(TextEnc(c), u)).

pub mod error;
pub mod latent;
pub mod rng;

pub use error::{Error, Result};
