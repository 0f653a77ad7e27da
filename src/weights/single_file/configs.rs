//! The configuration a single checkpoint file does not carry (block layout, heads,
//! scheduler, tokenizer): from a diffusers folder (`--config`), or built in for the released
//! architectures (`assets/configs/`, the released models' numbers).

use std::path::{Path, PathBuf};

use super::Architecture;
use crate::error::{Error, Result};
use crate::text::tokenizer::ClipTokenizer;

macro_rules! files {
    ($dir:literal: $($file:literal),* $(,)?) => {
        &[$(($file, include_str!(concat!("../../../assets/configs/", $dir, "/", $file)))),*]
    };
}

const SD1: &[(&str, &str)] = files!("sd1": "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json");
const SD2: &[(&str, &str)] = files!("sd2": "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json");
const SDXL: &[(&str, &str)] = files!("sdxl": "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "text_encoder_2/config.json", "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json", "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json");

const SDXL_REFINER: &[(&str, &str)] = files!("sdxl-refiner": "model_index.json",
    "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
    "text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json");

const VOCAB: &str = include_str!("../../../assets/clip-tokenizer/vocab.json");
const MERGES: &str = include_str!("../../../assets/clip-tokenizer/merges.txt");

/// Where the configuration files come from.
#[derive(Clone, Debug)]
pub enum ConfigFiles {
    /// A diffusers pipeline folder (its weights, if any, are not read).
    Folder(PathBuf),
    BuiltIn(Architecture),
}

impl ConfigFiles {
    fn built_in(arch: Architecture) -> &'static [(&'static str, &'static str)] {
        match arch {
            Architecture::Sd1 => SD1,
            Architecture::Sd2 => SD2,
            Architecture::Sdxl => SDXL,
            Architecture::SdxlRefiner => SDXL_REFINER,
        }
    }

    /// The path a file stands for, in errors (`built-in sd2/unet/config.json`).
    pub fn path(&self, file: &str) -> PathBuf {
        match self {
            ConfigFiles::Folder(dir) => dir.join(file),
            ConfigFiles::BuiltIn(arch) => {
                PathBuf::from(format!("built-in {} config", arch.name())).join(file)
            }
        }
    }

    /// A file's text; `None` when it does not exist.
    pub fn text(&self, file: &str) -> Result<Option<String>> {
        match self {
            ConfigFiles::Folder(dir) => match std::fs::read_to_string(dir.join(file)) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(dir.join(file), e)),
            },
            ConfigFiles::BuiltIn(arch) => Ok(Self::built_in(*arch)
                .iter()
                .find(|(name, _)| *name == file)
                .map(|(_, text)| text.to_string())),
        }
    }

    /// A file that must exist.
    pub fn require(&self, file: &str) -> Result<String> {
        self.text(file)?
            .ok_or_else(|| Error::config(self.path(file), "missing"))
    }

    /// A tokenizer component (`tokenizer`, `tokenizer_2`).
    pub fn tokenizer(&self, component: &str) -> Result<ClipTokenizer> {
        match self {
            ConfigFiles::Folder(dir) => ClipTokenizer::from_folder(&dir.join(component)),
            ConfigFiles::BuiltIn(_) => {
                let config = self.text(&format!("{component}/tokenizer_config.json"))?;
                let special = self.text(&format!("{component}/special_tokens_map.json"))?;
                ClipTokenizer::from_parts(VOCAB, MERGES, config.as_deref(), special.as_deref())
            }
        }
    }

    /// A tokenizer's vocab.json and merges.txt.
    pub fn vocabulary(&self, component: &str) -> Result<(String, String)> {
        match self {
            ConfigFiles::Folder(dir) => {
                let read = |file: &str| {
                    let path = dir.join(component).join(file);
                    std::fs::read_to_string(&path).map_err(|e| Error::io(path, e))
                };
                Ok((read("vocab.json")?, read("merges.txt")?))
            }
            ConfigFiles::BuiltIn(_) => Ok((VOCAB.to_string(), MERGES.to_string())),
        }
    }

    /// Whether a component folder is there (a folder) or part of the architecture.
    pub fn has(&self, component: &str) -> bool {
        match self {
            ConfigFiles::Folder(dir) => Path::new(dir).join(component).is_dir(),
            ConfigFiles::BuiltIn(arch) => Self::built_in(*arch)
                .iter()
                .any(|(name, _)| name.starts_with(&format!("{component}/"))),
        }
    }
}
