//! TextEnc: the CLIP BPE tokenizer and the CLIP text transformer.

pub mod clip;
pub mod tokenizer;
