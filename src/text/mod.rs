//! TextEnc: the CLIP BPE tokenizer and the CLIP text transformer.

pub mod clip;
pub mod embeddings;
pub mod prompt_syntax;
pub mod tokenizer;
