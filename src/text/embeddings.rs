//! Textual-inversion embeddings: learned token vectors under a name. Where the name appears in
//! a prompt, its vectors take the place of the name's tokens (A1111's behaviour; the name is
//! matched by its token ids, so it works inside weights and brackets too).
//!
//! Formats: A1111's `.pt` (`string_to_param`, a pickle read without running it) and
//! `.safetensors` (`emb_params`), SDXL's `clip_l` + `clip_g`, and diffusers' `learned_embeds`
//! (`{token: vector}`). The name is the file's stem.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::Weights;

/// One embedding: its name and its vectors for each text-encoder width it has
/// (`(n, width)`; SDXL embeddings have one for each of the two encoders).
#[derive(Clone, Debug)]
pub struct Embedding {
    pub name: String,
    pub vectors: Vec<Tensor>,
    pub path: PathBuf,
}

impl Embedding {
    pub fn load(path: &Path) -> Result<Self> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| Error::config(path, "an embedding file needs a name"))?;
        let bad = |m: String| Error::config(path, m);
        let weights = Weights::open_single(path, &["pt", "bin", "ckpt"], &Device::Cpu)?
            .ok_or_else(|| {
                bad("not an embedding file: expected .pt, .bin or .safetensors".into())
            })?;
        let tensors = weights.stored_tensors()?;
        let pick = |key: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == key)
                .map(|(_, t)| t.clone())
        };
        let mut vectors: Vec<Tensor> = if let (Some(l), Some(g)) = (pick("clip_l"), pick("clip_g"))
        {
            vec![l, g]
        } else if let Some(t) = pick("emb_params") {
            vec![t]
        } else if let Some((_, t)) = tensors
            .iter()
            .find(|(n, _)| n.starts_with("string_to_param."))
        {
            vec![t.clone()]
        } else if tensors.len() == 1 {
            // diffusers' learned_embeds: {"<token>": vector}.
            vec![tensors[0].1.clone()]
        } else {
            let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).take(5).collect();
            return Err(bad(format!(
                "not a textual-inversion embedding (tensors: {})",
                names.join(", ")
            )));
        };
        for v in &mut vectors {
            let t = v.to_dtype(DType::F32)?;
            *v = match t.rank() {
                1 => t.unsqueeze(0)?,
                2 => t,
                _ => return Err(bad(format!("an embedding of shape {:?}", t.dims()))),
            };
            let n = v.dim(0)?;
            if n == 0 || n > crate::text::prompt_syntax::CHUNK_TOKENS {
                return Err(bad(format!(
                    "{n} vectors; an embedding has 1 to {}",
                    crate::text::prompt_syntax::CHUNK_TOKENS
                )));
            }
        }
        Ok(Self {
            name,
            vectors,
            path: path.to_path_buf(),
        })
    }

    /// Every embedding file (`.pt`, `.bin`, `.safetensors`) in a folder and its subfolders
    /// (people sort theirs by model: `embeddings/sdxl/`, `embeddings/sd15/`), in path order,
    /// as A1111 reads it. A file that does not read as an embedding is left out with a
    /// warning, so one bad download does not take the others with it; a folder that cannot be
    /// read is an error.
    pub fn load_dir(dir: &Path) -> Result<(Vec<Self>, Vec<String>)> {
        let mut paths = Vec::new();
        collect_files(dir, &mut paths, 0)?;
        paths.sort();
        let mut warnings = Vec::new();
        let embeddings = paths
            .iter()
            .filter_map(|p| match Self::load(p) {
                Ok(e) => Some(e),
                Err(e) => {
                    warnings.push(format!("{e}; left out"));
                    None
                }
            })
            .collect();
        Ok((embeddings, warnings))
    }

    /// Its token count and width (of its first encoder's vectors), as A1111 lists them.
    pub fn shape(&self) -> (Option<usize>, Option<usize>) {
        let first = self.vectors.first();
        (
            first.and_then(|v| v.dim(0).ok()),
            first.and_then(|v| v.dim(1).ok()),
        )
    }

    /// The vectors for a text encoder of `width` features.
    pub fn for_width(&self, width: usize) -> Result<&Tensor> {
        self.vectors
            .iter()
            .find(|v| v.dim(1).is_ok_and(|w| w == width))
            .ok_or_else(|| {
                let widths: Vec<usize> = self.vectors.iter().filter_map(|v| v.dim(1).ok()).collect();
                Error::InvalidRequest(format!(
                    "embedding `{}` ({}) has vectors {widths:?} wide; this model's text encoder takes {width}",
                    self.name,
                    self.path.display()
                ))
            })
    }
}

/// The embedding files under `dir`, hidden entries left out. Below the top, an unreadable
/// folder is skipped rather than failing the rest; links are followed, so the depth is
/// bounded (a link to a parent would otherwise never end).
fn collect_files(dir: &Path, into: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    const MAX_DEPTH: usize = 8;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if depth == 0 => return Err(Error::io(dir, e)),
        Err(_) => return Ok(()),
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            if depth < MAX_DEPTH {
                collect_files(&path, into, depth + 1)?;
            }
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            matches!(
                e.to_ascii_lowercase().as_str(),
                "pt" | "bin" | "safetensors"
            )
        }) {
            into.push(path);
        }
    }
    Ok(())
}
