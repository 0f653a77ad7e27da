//! text2img: Text2Img(c, u) = Dec(LatentGen(TextEnc(c), u)).
//!
//! - [`text`]: TextEnc, the CLIP tokenizer and text transformer;
//! - [`latent`]: LatentGen, the U-Net and the schedulers;
//! - [`vae`]: Dec, the autoencoder;
//! - [`pipeline`]: the composition, with classifier-free guidance and torch-exact seeds.
//!
//! A program should call [`process::configure`] first thing in `main` (the allocator and
//! thread settings the `text2img` binary uses). Load a model once, then serve many requests:
//!
//! ```
//! use text2img::pipeline::{GenerateRequest, LoadOptions, Pipeline};
//! use text2img::latent::schedulers::SchedulerKind;
//!
//! # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/sd1-tiny");
//! let pipeline = Pipeline::load(model, &LoadOptions::default())?;
//! let request = GenerateRequest {
//!     prompts: vec!["a red circle on a blue background".into()],
//!     seed: Some(42),
//!     steps: Some(4),
//!     scheduler: Some(SchedulerKind::Euler),
//!     ..Default::default()
//! };
//! let mut steps_seen = 0;
//! let generation = pipeline.generate(&request, &mut |progress| {
//!     let (_rgb, _w, _h) = progress.preview(0).expect("preview"); // a cheap step preview
//!     steps_seen = progress.step;
//!     true // returning false cancels
//! })?;
//! let image = &generation.images[0];
//! assert_eq!((image.width, image.height, image.seed), (64, 64, 42));
//! assert_eq!(image.rgb.len(), 64 * 64 * 3);
//! assert_eq!(steps_seen, 4);
//! # Ok::<(), text2img::Error>(())
//! ```

pub mod alloc_count;
pub mod cancel;
pub mod canny;
pub mod error;
pub mod flops;
pub mod image_in;
pub mod kernels;
pub mod latent;
pub mod nn;
pub mod pipeline;
pub mod png_out;
pub mod process;
pub mod profile;
pub mod rng;
pub mod scale;
pub mod serve;
pub mod text;
pub mod train;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
pub use pipeline::{GenerateRequest, Generation, LoadOptions, Pipeline};
