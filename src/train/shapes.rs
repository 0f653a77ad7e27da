//! The `shapes` data set: 64 x 64 images of one or two flat shapes on a flat background,
//! with captions from a small grammar that say exactly what a correct image shows.
//!
//! The stream is deterministic: sample `i` of seed `s` depends on `(s, i)` only, so training
//! can resume at any data position ([`ShapesStream::seek`]) and every machine sees the same
//! data. Color-kind combinations in [`HELD_OUT`] never appear.

pub mod caption;
pub mod dataset;
pub mod draw;
pub mod palette;
pub mod prng;
pub mod scene;

pub use caption::{caption_for, parse_caption, PromptSpec, ShapeSpec};
pub use dataset::{write_dataset, write_selection, Selection};
pub use draw::{render, BBox, IMAGE_SIZE};
pub use palette::{is_held_out, Cell, Color, Kind, Relation, Size, HELD_OUT};
pub use scene::{Scene, Shape};

use prng::SplitMix64;

/// An RGB image, 64 x 64, row-major, 3 bytes a pixel.
pub type RgbImage64 = Vec<u8>;

/// One captioned image and what it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub caption: String,
    pub image: RgbImage64,
    pub scene: Scene,
    /// What the caption states (the scene with the dropped parts left out).
    pub prompt: PromptSpec,
}

impl Sample {
    /// Sample `index` of the stream seeded with `seed`.
    pub fn at(seed: u64, index: u64) -> Sample {
        let mut rng = SplitMix64::for_item(seed, index);
        let scene = Scene::random(&mut rng);
        let prompt = PromptSpec::random_for(&scene, &mut rng);
        Sample {
            caption: caption_for(&prompt),
            image: render(&scene),
            scene,
            prompt,
        }
    }
}

/// An endless, seeded stream of samples.
#[derive(Clone, Debug)]
pub struct ShapesStream {
    seed: u64,
    position: u64,
}

impl ShapesStream {
    pub fn new(seed: u64) -> Self {
        Self::seek(seed, 0)
    }

    /// The stream of `seed` positioned so that its next sample is sample `position`.
    pub fn seek(seed: u64, position: u64) -> Self {
        Self { seed, position }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The index of the next sample: the number of samples drawn since position 0.
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn next_sample(&mut self) -> Sample {
        let sample = Sample::at(self.seed, self.position);
        self.position += 1;
        sample
    }
}

impl Iterator for ShapesStream {
    type Item = Sample;

    fn next(&mut self) -> Option<Sample> {
        Some(self.next_sample())
    }
}
