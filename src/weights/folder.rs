//! Finding a model: a local diffusers-layout folder, or a Hugging Face repo id resolved in
//! (and, when the network allows, downloaded into) the standard Hugging Face cache.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{read_json, Error, Result};

/// The components a Stable Diffusion 1.x/2.x folder must have, with the files each needs.
const CONFIG_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
];

/// A diffusers-layout model folder on disk.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    pub root: PathBuf,
    /// `model_index.json`, parsed.
    pub index: Value,
    /// A short name for metadata: the repo id or the folder name.
    pub name: String,
}

/// Whether `model_index.json` names `component` as absent (`[null, null]`).
fn declared_absent(index: &Value, component: &str) -> bool {
    index
        .get(component)
        .and_then(Value::as_array)
        .is_some_and(|pair| pair.first().is_some_and(Value::is_null))
}

impl ModelFolder {
    /// Opens a local folder, checking that every file of the layout is present.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::config(root, "model folder does not exist"));
        }
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::config(
                index_path,
                "missing file of the diffusers layout",
            ));
        }
        let index: Value = read_json(&index_path)?;
        for file in CONFIG_FILES {
            // special_tokens_map.json is optional in newer tokenizer folders.
            if *file == "tokenizer/special_tokens_map.json" {
                continue;
            }
            // A component the index declares absent ([null, null]: the SDXL refiner has no
            // first text encoder) has no files.
            let component = file.split('/').next().unwrap_or_default();
            if declared_absent(&index, component) {
                continue;
            }
            let path = root.join(file);
            if !path.is_file() {
                return Err(Error::config(path, "missing file of the diffusers layout"));
            }
        }
        let name = root
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| root.display().to_string());
        Ok(Self {
            root: root.to_path_buf(),
            index,
            name,
        })
    }

    pub fn component(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The diffusers class that `model_index.json` names for a component.
    pub fn class_of(&self, component: &str) -> Option<&str> {
        self.index.get(component)?.as_array()?.get(1)?.as_str()
    }
}

/// Resolves `--model`: an existing path is a folder; otherwise `ORG/NAME` is a repo id.
pub fn resolve(model: &str, variant: Option<&str>) -> Result<ModelFolder> {
    let path = Path::new(model);
    if path.exists() || !looks_like_repo_id(model) {
        return ModelFolder::open(path);
    }
    let snapshot = match cached_snapshot(model)? {
        Some(dir) => dir,
        None => download(model, variant)?,
    };
    let mut folder = ModelFolder::open(&snapshot)?;
    folder.name = model.to_string();
    Ok(folder)
}

/// Resolves `--config` for a single file: an existing path is a folder; otherwise `ORG/NAME`
/// is a repo id whose configs (not weights) are taken from the Hugging Face cache, or
/// downloaded, as diffusers' `from_single_file(config=...)` does.
pub fn config_folder(spec: &Path) -> Result<PathBuf> {
    let text = spec.to_string_lossy();
    if spec.exists() || !looks_like_repo_id(&text) {
        return Ok(spec.to_path_buf());
    }
    match cached_snapshot(&text)? {
        Some(dir) => Ok(dir),
        None => download_configs(&text),
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let valid = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if valid(a) && valid(b))
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("huggingface").join("hub")
}

/// `models--ORG--NAME/snapshots/<rev of refs/main>/` if it holds a model_index.json.
fn cached_snapshot(repo: &str) -> Result<Option<PathBuf>> {
    let repo_dir = hub_cache_dir().join(format!("models--{}", repo.replace('/', "--")));
    let refs = repo_dir.join("refs").join("main");
    let snapshots = repo_dir.join("snapshots");
    let mut candidates = Vec::new();
    if let Ok(rev) = std::fs::read_to_string(&refs) {
        candidates.push(snapshots.join(rev.trim()));
    }
    if let Ok(read) = std::fs::read_dir(&snapshots) {
        let mut others: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
        others.sort();
        candidates.extend(others);
    }
    Ok(candidates
        .into_iter()
        .find(|dir| dir.join("model_index.json").is_file()))
}

/// A repo's configuration files: `model_index.json`, then each component's config (and a
/// tokenizer's vocabulary), no weights.
fn download_configs(repo: &str) -> Result<PathBuf> {
    let hub = HubRepo::open(repo)?;
    let index: Value = read_json(&hub.root.join("model_index.json"))?;
    let components = index.as_object().into_iter().flatten().filter(|(name, v)| {
        !name.starts_with('_') && v.is_array() && !declared_absent(&index, name)
    });
    for (name, _) in components {
        if name == "scheduler" {
            hub.fetch("scheduler/scheduler_config.json")?;
        } else if name.starts_with("tokenizer") {
            for file in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
                hub.fetch(&format!("{name}/{file}"))?;
            }
            // Optional in newer tokenizer folders.
            let _ = hub.fetch(&format!("{name}/special_tokens_map.json"));
        } else if !matches!(
            name.as_str(),
            "safety_checker" | "feature_extractor" | "image_encoder"
        ) {
            hub.fetch(&format!("{name}/config.json"))?;
        }
    }
    Ok(hub.root)
}

/// One repo on the hub, its files fetched into the hub cache; `root` is the snapshot folder
/// they land in (known once `model_index.json` is fetched).
struct HubRepo {
    repo: String,
    cache: PathBuf,
    remote: hf_hub::api::sync::ApiRepo,
    root: PathBuf,
}

impl HubRepo {
    fn open(repo: &str) -> Result<Self> {
        let cache = hub_cache_dir();
        let hub_err = |message: String| Error::Hub {
            repo: repo.to_string(),
            message,
        };
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty());
        if offline {
            return Err(hub_err(format!(
                "not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                cache.display()
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::new()
            .with_cache_dir(cache.clone())
            .with_progress(true)
            .build()
            .map_err(|e| hub_err(e.to_string()))?;
        let mut hub = Self {
            repo: repo.to_string(),
            cache,
            remote: api.model(repo.to_string()),
            root: PathBuf::new(),
        };
        let index_path = hub.fetch("model_index.json")?;
        hub.root = index_path
            .parent()
            .ok_or_else(|| hub_err("bad cache path".into()))?
            .to_path_buf();
        Ok(hub)
    }

    fn fetch(&self, file: &str) -> Result<PathBuf> {
        self.remote.get(file).map_err(|e| Error::Hub {
            repo: self.repo.clone(),
            message: format!(
                "not in the Hugging Face cache ({}) and downloading `{file}` failed: {e}",
                self.cache.display()
            ),
        })
    }
}

fn download(repo: &str, variant: Option<&str>) -> Result<PathBuf> {
    let hub = HubRepo::open(repo)?;
    for file in CONFIG_FILES.iter().skip(1) {
        hub.fetch(file)?;
    }
    let weights = match variant {
        Some(v) => format!(".{v}.safetensors"),
        None => ".safetensors".into(),
    };
    for (component, stem) in [
        ("text_encoder", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ] {
        hub.fetch(&format!("{component}/{stem}{weights}"))?;
    }
    Ok(hub.root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_apart_from_paths() {
        assert!(looks_like_repo_id("runwayml/stable-diffusion-v1-5"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id("/abs/model"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("name"));
    }
}
