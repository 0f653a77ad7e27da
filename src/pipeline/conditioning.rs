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
use crate::text::tokenizer::ClipTokenizer;

/// One text encoder with its tokenizer.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
}

impl TextEncoder {
    /// Token ids, padded to the tokenizer's length; a truncation becomes a warning.
    fn ids(&self, text: &str, warnings: &mut Vec<String>) -> Vec<u32> {
        let encoded = self.tokenizer.encode_padded(text);
        if let Some(cut) = &encoded.truncated {
            warnings.push(format!(
                "the prompt was truncated because CLIP can only handle sequences up to {} tokens; removed: \"{cut}\"",
                self.tokenizer.model_max_length()
            ));
        }
        encoded.ids
    }
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
pub fn stable_diffusion(
    encoder: &TextEncoder,
    prompt: &str,
    clip_skip: usize,
    warnings: &mut Vec<String>,
) -> Result<Conditioning> {
    let ids = encoder.ids(prompt, warnings);
    Ok(Conditioning {
        context: encoder.model.forward(&[ids], clip_skip)?,
        text_embeds: None,
    })
}

/// SDXL's conditioning from one string per encoder: `hidden_states[-(clip_skip + 2)]` of each,
/// concatenated, and the last encoder's projected pooled output.
pub fn sdxl(
    encoders: &[TextEncoder],
    prompts: &[&str],
    clip_skip: usize,
    warnings: &mut Vec<String>,
) -> Result<Conditioning> {
    let mut parts = Vec::with_capacity(encoders.len());
    let mut text_embeds = None;
    for (encoder, prompt) in encoders.iter().zip(prompts) {
        let ids = encoder.ids(prompt, warnings);
        let layers = encoder.model.num_layers();
        let mut hidden = encoder
            .model
            .hidden_state_list(std::slice::from_ref(&ids), layers)?;
        let last = hidden.pop().expect("the last layer");
        // hidden now ends with hidden_states[-2]; take -(clip_skip + 2).
        let index = hidden.len() - 1 - clip_skip.min(hidden.len() - 1);
        parts.push(hidden[index].clone());
        if encoder.model.text_projection.is_some() {
            let normed = encoder.model.final_layer_norm(&last)?;
            text_embeds = Some(encoder.model.text_embeds(&[ids], &normed)?);
        }
    }
    Ok(Conditioning {
        context: Tensor::cat(&parts, 2)?,
        text_embeds,
    })
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
