//! TextEnc_1..m: the condition strings through their text encoders, composed into what the
//! U-Net takes, as diffusers' pipelines compose them.
//!
//! - Stable Diffusion (m = 1): the encoder's last layer (or the layer `clip_skip` from the end)
//!   after the final layer norm.
//! - SDXL (m = 2): each encoder's penultimate hidden state (no final norm), concatenated on
//!   the feature axis; the second encoder's pooled, projected output (`text_embeds`) goes into
//!   the added embedding with the time ids.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::text::clip::ClipTextModel;
use crate::text::embeddings::Embedding;
use crate::text::prompt_syntax::{self, Chunk, ChunkTokens, EmbeddingName};
use crate::text::tokenizer::ClipTokenizer;

/// How a prompt's text is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// AUTOMATIC1111's: `(word:1.3)` weights, `BREAK`, prompts of any length in 75-token
    /// chunks (see [`prompt_syntax`]). A prompt with none of it, under 76 tokens, reads as
    /// `Plain` does.
    #[default]
    A1111,
    /// The text as diffusers reads it: no weights, cut at 77 tokens (with a warning).
    Plain,
}

/// One text encoder with its tokenizer.
#[derive(Clone)]
pub struct TextEncoder {
    /// Shared by the copies of a pipeline (its cache too).
    pub tokenizer: std::sync::Arc<ClipTokenizer>,
    pub model: ClipTextModel,
}

impl TextEncoder {
    /// The prompt's chunks of token ids with their weights. Plain: one chunk, padded to the
    /// tokenizer's length (a truncation becomes a warning).
    fn chunks(
        &self,
        text: &str,
        syntax: PromptSyntax,
        embeddings: &[Embedding],
        warnings: &mut Vec<String>,
    ) -> Vec<Chunk> {
        match syntax {
            PromptSyntax::Plain => {
                let encoded = self.tokenizer.encode_padded(text);
                if let Some(cut) = &encoded.truncated {
                    warnings.push(format!(
                        "the prompt was truncated because CLIP can only handle sequences up to {} tokens; removed: \"{cut}\"",
                        self.tokenizer.model_max_length()
                    ));
                }
                let weights = vec![1.0; encoded.ids.len()];
                vec![Chunk {
                    ids: encoded.ids,
                    weights,
                    embeddings: Vec::new(),
                }]
            }
            PromptSyntax::A1111 => {
                let t = &self.tokenizer;
                let tokens = ChunkTokens {
                    bos: t.bos_id(),
                    eos: t.eos_id(),
                    comma: t.token_to_id(",</w>"),
                    per_chunk: t.model_max_length().saturating_sub(2),
                };
                let pieces = prompt_syntax::parse(text);
                // Only embeddings with vectors of this encoder's width are found (a folder
                // may hold embeddings for other models; the pipeline checks the ones named).
                let width = self.model.config.hidden_size;
                let names: Vec<EmbeddingName> = embeddings
                    .iter()
                    .map(|e| match e.for_width(width) {
                        Ok(v) => EmbeddingName {
                            ids: t.encode_plain(&e.name),
                            vectors: v.dim(0).unwrap_or(0),
                        },
                        Err(_) => EmbeddingName {
                            ids: Vec::new(),
                            vectors: 0,
                        },
                    })
                    .collect();
                let mut chunks =
                    prompt_syntax::chunks(&pieces, |piece| t.encode_plain(piece), &tokens, &names);
                // Past the first EOS, the tokenizer's own padding (SD 2.x's `!`), as A1111
                // and diffusers both pad.
                for chunk in &mut chunks {
                    if let Some(end) = chunk.ids.iter().position(|&id| id == tokens.eos) {
                        chunk.ids[end + 1..].fill(t.pad_id());
                    }
                }
                chunks
            }
        }
    }
}

/// The embeddings' vectors a chunk inserts, with their positions.
fn inserted<'a>(
    chunk: &Chunk,
    embeddings: &'a [Embedding],
    width: usize,
) -> Result<Vec<(usize, &'a Tensor)>> {
    chunk
        .embeddings
        .iter()
        .map(|&(at, e)| Ok((at, embeddings[e].for_width(width)?)))
        .collect()
}

/// A1111's emphasis on one chunk's encoding (1, tokens, width): each token's vector times its
/// weight, then the whole rescaled to its former mean. Unweighted chunks pass unchanged.
fn emphasize(z: Tensor, chunk: &Chunk) -> Result<Tensor> {
    if chunk.is_plain() {
        return Ok(z);
    }
    let weights = Tensor::from_slice(&chunk.weights, (1, chunk.weights.len(), 1), z.device())?
        .to_dtype(z.dtype())?;
    let before = z.mean_all()?;
    let weighted = z.broadcast_mul(&weights)?;
    let after = weighted.mean_all()?;
    Ok(weighted.broadcast_mul(&(before / after)?)?)
}

/// The conditioning of one prompt (batch 1).
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// (1, tokens, cross_attention_dim): what cross-attention reads.
    pub context: Tensor,
    /// SDXL: the second encoder's `text_embeds` (1, projection_dim).
    pub text_embeds: Option<Tensor>,
}

impl Conditioning {
    /// Zeros of the same shapes (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            text_embeds: self
                .text_embeds
                .as_ref()
                .map(Tensor::zeros_like)
                .transpose()?,
        })
    }

    /// Pads the context with `empty`'s (one empty chunk) until it has `tokens` tokens: a
    /// prompt and its negative of different chunk counts (A1111's padding).
    pub fn padded_to(&self, tokens: usize, empty: &Conditioning) -> Result<Self> {
        let mut parts = vec![self.context.clone()];
        let mut have = self.context.dim(1)?;
        let step = empty.context.dim(1)?;
        while have < tokens && step > 0 {
            parts.push(empty.context.clone());
            have += step;
        }
        Ok(Self {
            context: Tensor::cat(&parts, 1)?,
            text_embeds: self.text_embeds.clone(),
        })
    }

    /// Row-repeats to `n` and stacks `rows` (e.g. [uncond, cond]) along the batch.
    pub fn batch(rows: &[&Conditioning], n: usize) -> Result<Self> {
        let contexts: Vec<Tensor> = rows
            .iter()
            .map(|c| c.context.repeat((n, 1, 1)))
            .collect::<candle_core::Result<_>>()?;
        let text_embeds = if rows.iter().all(|c| c.text_embeds.is_some()) {
            let parts: Vec<Tensor> = rows
                .iter()
                .map(|c| c.text_embeds.as_ref().expect("checked").repeat((n, 1)))
                .collect::<candle_core::Result<_>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        Ok(Self {
            context: Tensor::cat(&contexts, 0)?,
            text_embeds,
        })
    }
}

/// Stable Diffusion's conditioning: `clip_skip` 0 is the last layer, k the k-th from the end;
/// the final layer norm either way.
/// Each chunk is encoded on its own; the encodings are concatenated along the tokens.
pub fn stable_diffusion(
    encoder: &TextEncoder,
    prompt: &str,
    clip_skip: usize,
    syntax: PromptSyntax,
    embeddings: &[Embedding],
    warnings: &mut Vec<String>,
) -> Result<Conditioning> {
    let width = encoder.model.config.hidden_size;
    let parts = encoder
        .chunks(prompt, syntax, embeddings, warnings)
        .into_iter()
        .map(|chunk| {
            let vectors = inserted(&chunk, embeddings, width)?;
            let ids = std::slice::from_ref(&chunk.ids);
            let z = encoder.model.forward_inserting(ids, clip_skip, &vectors)?;
            emphasize(z, &chunk)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Conditioning {
        context: Tensor::cat(&parts, 1)?,
        text_embeds: None,
    })
}

/// SDXL's conditioning from one string per encoder: `hidden_states[-(clip_skip + 2)]` of each,
/// concatenated, and the last encoder's projected pooled output.
///
/// Each encoder chunks its own string; where they differ in chunk count, the shorter is
/// padded with empty chunks. The pooled embedding comes from the first chunk (as A1111).
pub fn sdxl(
    encoders: &[TextEncoder],
    prompts: &[&str],
    clip_skip: usize,
    syntax: PromptSyntax,
    embeddings: &[Embedding],
    warnings: &mut Vec<String>,
) -> Result<Conditioning> {
    let mut chunk_lists: Vec<Vec<Chunk>> = encoders
        .iter()
        .zip(prompts)
        .map(|(encoder, prompt)| encoder.chunks(prompt, syntax, embeddings, warnings))
        .collect();
    let count = chunk_lists.iter().map(Vec::len).max().unwrap_or(1);
    for (encoder, chunks) in encoders.iter().zip(&mut chunk_lists) {
        let empty = encoder.chunks("", syntax, &[], &mut Vec::new());
        while chunks.len() < count {
            chunks.extend(empty.iter().cloned());
        }
    }
    let mut per_chunk = Vec::with_capacity(count);
    let mut text_embeds = None;
    for k in 0..count {
        let mut parts = Vec::with_capacity(encoders.len());
        for (encoder, chunks) in encoders.iter().zip(&chunk_lists) {
            let chunk = &chunks[k];
            let ids = std::slice::from_ref(&chunk.ids);
            let layers = encoder.model.num_layers();
            let vectors = inserted(chunk, embeddings, encoder.model.config.hidden_size)?;
            let mut hidden = encoder
                .model
                .hidden_state_list_inserting(ids, layers, &vectors)?;
            let last = hidden.pop().expect("the last layer");
            // hidden now ends with hidden_states[-2]; take -(clip_skip + 2).
            let index = hidden.len() - 1 - clip_skip.min(hidden.len() - 1);
            parts.push(emphasize(hidden[index].clone(), chunk)?);
            if k == 0 && encoder.model.text_projection.is_some() {
                let normed = encoder.model.final_layer_norm(&last)?;
                text_embeds = Some(encoder.model.text_embeds(ids, &normed)?);
            }
        }
        per_chunk.push(Tensor::cat(&parts, 2)?);
    }
    Ok(Conditioning {
        context: Tensor::cat(&per_chunk, 1)?,
        text_embeds,
    })
}

/// The SDXL refiner's five time ids per row: original (height, width), crop (top, left),
/// aesthetic score; the first `negative_rows` rows (classifier-free guidance's unconditional
/// half) take the negative score, the next `rows` the positive one.
pub fn aesthetic_time_ids(
    original: (usize, usize),
    crop_top_left: (usize, usize),
    (negative, positive): (f64, f64),
    negative_rows: usize,
    rows: usize,
    device: &Device,
) -> Result<Tensor> {
    let row = |score: f64| {
        [
            original.0 as f32,
            original.1 as f32,
            crop_top_left.0 as f32,
            crop_top_left.1 as f32,
            score as f32,
        ]
    };
    let data: Vec<f32> = (0..negative_rows)
        .flat_map(|_| row(negative))
        .chain((0..rows).flat_map(|_| row(positive)))
        .collect();
    Ok(Tensor::from_vec(data, (negative_rows + rows, 5), device)?)
}

/// SDXL's six time ids per row: original (height, width), crop (top, left), target (height,
/// width).
pub fn time_ids(
    original: (usize, usize),
    crop_top_left: (usize, usize),
    target: (usize, usize),
    rows: usize,
    device: &Device,
) -> Result<Tensor> {
    let one = [
        original.0,
        original.1,
        crop_top_left.0,
        crop_top_left.1,
        target.0,
        target.1,
    ]
    .map(|v| v as f32);
    let data: Vec<f32> = (0..rows).flat_map(|_| one).collect();
    Ok(Tensor::from_vec(data, (rows, 6), device)?)
}
