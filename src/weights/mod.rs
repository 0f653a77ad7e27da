//! Loading: diffusers model folders, their JSON configs and their safetensors weights.

pub mod folder;
pub mod params;
pub mod single_file;
pub mod store;

pub use params::ParamStore;
pub use store::{Vb, Weights};
