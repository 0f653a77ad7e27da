//! Resumable checkpoints: weights, optimizer moments and EMA, and the run's position, written
//! to a temporary folder and swapped in by rename, so a kill at any moment leaves either the
//! previous checkpoint or the new one, never a torn mix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{read_json, Error, Result};

pub struct Checkpoint<S> {
    pub params: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub state: S,
}

fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).map_err(|e| Error::config(path, e.to_string()))
}

/// Writes tensors to `path` atomically (a temporary file beside it, then a rename).
pub fn save_tensors_atomic(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    save_tensors(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let map =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(map.into_iter().collect())
}

/// Writes pretty JSON atomically, creating the parent folder (configs of a run's output).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let text = serde_json::to_string_pretty(value).expect("a JSON value serializes");
    crate::png_out::write_atomic(path, text.as_bytes())
}

/// Writes the checkpoint of a run whose output folder is `out`.
pub fn save<S: Serialize>(out: &Path, checkpoint: &Checkpoint<S>) -> Result<()> {
    let final_dir = dir(out);
    let tmp = out.join("checkpoint.tmp");
    let old = out.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_tensors(&checkpoint.params, &tmp.join("params.safetensors"))?;
    save_tensors(&checkpoint.optimizer, &tmp.join("optimizer.safetensors"))?;
    let state = serde_json::to_string_pretty(&checkpoint.state).expect("state serializes");
    std::fs::write(tmp.join("state.json"), state).map_err(|e| Error::io(&tmp, e))?;
    for f in ["params.safetensors", "optimizer.safetensors", "state.json"] {
        let file = std::fs::File::open(tmp.join(f)).map_err(|e| Error::io(tmp.join(f), e))?;
        file.sync_all().map_err(|e| Error::io(tmp.join(f), e))?;
    }
    let _ = std::fs::remove_dir_all(&old);
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Loads the checkpoint of `out` (falling back to the previous one if a swap was cut short).
pub fn load<S: DeserializeOwned>(out: &Path) -> Result<Checkpoint<S>> {
    let mut d = dir(out);
    if !d.join("state.json").is_file() {
        let old = out.join("checkpoint.old");
        if old.join("state.json").is_file() {
            d = old;
        } else {
            return Err(Error::config(&d, "no checkpoint to resume from"));
        }
    }
    Ok(Checkpoint {
        params: load_tensors(&d.join("params.safetensors"))?,
        optimizer: load_tensors(&d.join("optimizer.safetensors"))?,
        state: read_json(&d.join("state.json"))?,
    })
}
