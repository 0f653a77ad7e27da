//! The CLIP text transformer (transformers' `CLIPTextModel`), configured by its `config.json`.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{read_json, Error, Result};
use crate::nn::{activation, attention, LayerNorm, Linear};
use crate::weights::{Vb, Weights};

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`), with its defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Present in CLIPTextModelWithProjection configs (SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Where the pooled output is read: the first `eos_token_id` of each row, or, for the
    /// legacy value 2 that released SDXL configs carry, the highest token id (transformers'
    /// rule, kept for those checkpoints).
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
}

fn d_eos() -> i64 {
    49407
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::checked(read_json(path)?, path)
    }

    /// From the text of a `config.json` that `path` names (in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        Self::checked(crate::error::parse_json(text, path)?, path)
    }

    fn checked(config: Self, path: &Path) -> Result<Self> {
        if !matches!(config.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::config(
                path,
                format!(
                    "hidden_act `{}` is not supported (quick_gelu or gelu)",
                    config.hidden_act
                ),
            ));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(Error::config(
                path,
                "hidden_size must be a multiple of num_attention_heads",
            ));
        }
        Ok(config)
    }
}

#[derive(Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(vb: &Vb, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::load(&mlp.pp("fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::load(&mlp.pp("fc2"), c.intermediate_size, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, heads: usize, act: &str) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let a = attention(
            &self.q_proj.forward(&h)?,
            &self.k_proj.forward(&h)?,
            &self.v_proj.forward(&h)?,
            heads,
            Some(mask),
        )?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self
            .fc2
            .forward(&activation(act, &self.fc1.forward(&h)?)?)?;
        Ok((x + h)?)
    }
}

/// The text transformer: token + position embeddings, causal encoder layers, final norm.
#[derive(Clone)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `text_projection` (CLIPTextModelWithProjection only).
    pub text_projection: Option<Linear>,
    device: Device,
}

impl ClipTextModel {
    /// Loads from a `text_encoder/` folder.
    pub fn load(dir: &Path, variant: Option<&str>, device: &Device) -> Result<Self> {
        Self::load_as(dir, variant, device, crate::weights::MatrixDtype::F32)
    }

    /// As [`ClipTextModel::load`], keeping weight matrices in `matrix_dtype`.
    pub fn load_as(
        dir: &Path,
        variant: Option<&str>,
        device: &Device,
        matrix_dtype: crate::weights::MatrixDtype,
    ) -> Result<Self> {
        Self::load_patched(dir, variant, device, matrix_dtype, &mut |_| Ok(()))
    }

    /// [`ClipTextModel::load_as`], with `patch` given the weights before they load (to add
    /// LoRAs).
    pub fn load_patched(
        dir: &Path,
        variant: Option<&str>,
        device: &Device,
        matrix_dtype: crate::weights::MatrixDtype,
        patch: &mut dyn FnMut(&mut Weights) -> Result<()>,
    ) -> Result<Self> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let mut weights = Weights::open_component(dir, variant, device)?;
        weights.store_matrices_as(matrix_dtype);
        patch(&mut weights)?;
        // A buffer, not a weight; diffusers' loaders drop it too.
        weights.ignore("text_model.embeddings.position_ids");
        weights.ignore("embeddings.position_ids");
        let model = Self::from_weights(config, &weights)?;
        weights.finish()?;
        Ok(model)
    }

    pub fn from_weights(config: ClipTextConfig, weights: &Weights) -> Result<Self> {
        let root = weights.root();
        // Released checkpoints prefix the transformer with `text_model.`; transformers 5
        // saves it without. Both load.
        let vb = if root.contains("text_model.embeddings.token_embedding.weight") {
            root.pp("text_model")
        } else {
            root.clone()
        };
        Self::from_vb(config, &vb, Some(&root))
    }

    /// Builds the transformer from `vb` (the `text_model` scope); `root` holds the optional
    /// `text_projection`.
    pub fn from_vb(config: ClipTextConfig, vb: &Vb, root: Option<&Vb>) -> Result<Self> {
        let d = config.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get("weight", &[config.vocab_size, d])?;
        let position_embedding = emb
            .pp("position_embedding")
            .get("weight", &[config.max_position_embeddings, d])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&vb.pp("encoder.layers").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::load(&vb.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        let text_projection = match (config.projection_dim, root) {
            (Some(p), Some(root)) if root.contains("text_projection.weight") => {
                Some(Linear::load(&root.pp("text_projection"), d, p, false)?)
            }
            _ => None,
        };
        Ok(Self {
            device: vb.device().clone(),
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
        })
    }

    /// Encodes a batch of token id rows. `clip_skip` follows diffusers: 0 (or none) is the
    /// last layer; k > 0 takes the output of the layer k from the end (1 = penultimate);
    /// the final layer norm is applied either way.
    pub fn forward(&self, ids: &[Vec<u32>], clip_skip: usize) -> Result<Tensor> {
        self.forward_inserting(ids, clip_skip, &[])
    }

    /// [`ClipTextModel::forward`] with learned vectors in place of some tokens' embeddings
    /// (textual inversion): each `(position, vectors)` fills `vectors.dim(0)` positions of
    /// every row from `position` on.
    pub fn forward_inserting(
        &self,
        ids: &[Vec<u32>],
        clip_skip: usize,
        inserted: &[(usize, &Tensor)],
    ) -> Result<Tensor> {
        let layers = self.layers.len().saturating_sub(clip_skip);
        let mut all = self.hidden_state_list_inserting(ids, layers, inserted)?;
        self.final_layer_norm
            .forward(&all.pop().expect("at least the embeddings"))
    }

    /// The hidden state after `layers` encoder layers (0 = the embeddings), without the final
    /// norm (transformers' `hidden_states[layers]`).
    pub fn hidden_states(&self, ids: &[Vec<u32>], layers: usize) -> Result<Tensor> {
        let mut all = self.hidden_state_list(ids, layers)?;
        Ok(all.pop().expect("at least the embeddings"))
    }

    /// transformers' `hidden_states[0..=layers]`: the embeddings, then each layer's output
    /// (without the final norm).
    pub fn hidden_state_list(&self, ids: &[Vec<u32>], layers: usize) -> Result<Vec<Tensor>> {
        self.hidden_state_list_inserting(ids, layers, &[])
    }

    /// [`ClipTextModel::hidden_state_list`] with inserted vectors, as in
    /// [`ClipTextModel::forward_inserting`].
    pub fn hidden_state_list_inserting(
        &self,
        ids: &[Vec<u32>],
        layers: usize,
        inserted: &[(usize, &Tensor)],
    ) -> Result<Vec<Tensor>> {
        let seq = ids.first().map_or(0, Vec::len);
        if seq == 0
            || seq > self.config.max_position_embeddings
            || ids.iter().any(|r| r.len() != seq)
        {
            return Err(Error::InvalidRequest(format!(
                "token rows must share one length between 1 and {}",
                self.config.max_position_embeddings
            )));
        }
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (ids.len() * seq,), &self.device)?;
        let tokens = self.token_embedding.index_select(&ids_t, 0)?.reshape((
            ids.len(),
            seq,
            self.config.hidden_size,
        ))?;
        let mut tokens = tokens;
        for &(at, vectors) in inserted {
            let (n, width) = vectors.dims2()?;
            if width != self.config.hidden_size || at + n > seq {
                return Err(Error::InvalidRequest(format!(
                    "{n} inserted vectors of width {width} at position {at} do not fit {seq} tokens of width {}",
                    self.config.hidden_size
                )));
            }
            let rows = vectors
                .to_dtype(tokens.dtype())?
                .unsqueeze(0)?
                .repeat((ids.len(), 1, 1))?;
            tokens = tokens.slice_assign(&[0..ids.len(), at..at + n, 0..width], &rows)?;
        }
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(seq, &self.device)?;
        let mut all = Vec::with_capacity(layers + 1);
        for layer in self.layers.iter().take(layers) {
            all.push(x.clone());
            x = layer.forward(
                &x,
                &mask,
                self.config.num_attention_heads,
                &self.config.hidden_act,
            )?;
        }
        all.push(x);
        Ok(all)
    }

    /// The pooled output (transformers' `pooler_output`): the final-normed hidden state
    /// (`last`, (batch, tokens, dim)) at each row's end-of-text position.
    pub fn pooled(&self, ids: &[Vec<u32>], last: &Tensor) -> Result<Tensor> {
        let positions: Vec<u32> = ids
            .iter()
            .map(|row| {
                let position = if self.config.eos_token_id == 2 {
                    // torch's argmax: the first position of the largest id.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max)
                } else {
                    row.iter()
                        .position(|&id| i64::from(id) == self.config.eos_token_id)
                };
                position.unwrap_or(0) as u32
            })
            .collect();
        let rows = (0..ids.len())
            .map(|b| last.get(b)?.get(positions[b] as usize))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// `CLIPTextModelWithProjection`'s `text_embeds`: the pooled output through
    /// `text_projection`.
    pub fn text_embeds(&self, ids: &[Vec<u32>], last: &Tensor) -> Result<Tensor> {
        let projection = self.text_projection.as_ref().ok_or_else(|| {
            Error::InvalidRequest(
                "this text encoder has no `text_projection` (not a CLIPTextModelWithProjection)"
                    .into(),
            )
        })?;
        projection.forward(&self.pooled(ids, last)?)
    }

    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// An additive mask that hides later tokens from earlier ones.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (n, n), device)?)
}

crate::impl_layers!(EncoderLayer: q_proj, k_proj, v_proj, out_proj, fc1, fc2);
crate::impl_layers!(ClipTextModel: layers, text_projection);
