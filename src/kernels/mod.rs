//! CPU kernels that candle lacks or runs slowly, each tested against a plain reference.

pub mod bias;
pub mod group_norm;
pub mod im2col;
pub mod layer_norm;
pub mod parallel;
pub mod softmax;
