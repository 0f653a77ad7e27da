//! Loading: diffusers model folders, their JSON configs and their safetensors weights.

pub mod folder;
pub mod store;

pub use store::{Vb, Weights};
