//! CPU kernels that candle lacks or runs slowly, each tested against a plain reference.

pub mod im2col;
