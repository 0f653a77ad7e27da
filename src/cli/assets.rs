//! Files embedded in the binary, unpacked on first use into the user's cache folder.

use std::path::PathBuf;

use anyhow::{Context, Result};

const CLIP_TOKENIZER: [(&str, &[u8]); 4] = [
    ("vocab.json", include_bytes!("../../assets/clip-tokenizer/vocab.json")),
    ("merges.txt", include_bytes!("../../assets/clip-tokenizer/merges.txt")),
    ("tokenizer_config.json", include_bytes!("../../assets/clip-tokenizer/tokenizer_config.json")),
    ("special_tokens_map.json", include_bytes!("../../assets/clip-tokenizer/special_tokens_map.json")),
];

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TEXT2IMG_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("text2img");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("text2img")
}

/// Unpacks `files` into `cache/name-VERSION/` (atomically: a temp folder, then a rename).
fn unpack(name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let root = cache_root();
    let dir = root.join(format!("{name}-{}", env!("CARGO_PKG_VERSION")));
    if dir.is_dir() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (file, bytes) in files {
        let path = tmp.join(file);
        std::fs::create_dir_all(path.parent().expect("has parent"))
            .with_context(|| format!("creating {}", tmp.display()))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() && !dir.is_dir() {
        anyhow::bail!("cannot create {}", dir.display());
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(dir)
}

/// The CLIP tokenizer files (vocab.json, merges.txt, configs) as a folder.
pub fn clip_tokenizer_dir() -> Result<PathBuf> {
    unpack("clip-tokenizer", &CLIP_TOKENIZER)
}

/// The built-in default model, as a diffusers-layout folder.
pub fn default_model_dir() -> Result<PathBuf> {
    anyhow::bail!("this build has no built-in model yet: pass --model DIR")
}

/// The name the built-in model goes by in metadata.
pub const DEFAULT_MODEL_NAME: &str = "text2img-default-shapes";
