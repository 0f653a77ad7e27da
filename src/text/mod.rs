//! TextEnc: the CLIP BPE tokenizer and the CLIP text transformer.

pub mod clip;
pub mod embeddings;
pub mod extra_networks;

pub mod prompt_syntax;
pub mod tokenizer;
