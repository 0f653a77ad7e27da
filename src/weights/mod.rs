//! Loading: diffusers model folders, their JSON configs and their safetensors weights.

pub mod folder;
pub mod lora;
pub mod matrix;
pub mod params;
pub mod pickle;
pub mod q8;
pub mod single_file;
pub mod store;
pub mod torch_file;
pub mod writer;

pub use matrix::{Matrix, MatrixDtype};
pub use params::ParamStore;
pub use store::{Vb, Weights};
