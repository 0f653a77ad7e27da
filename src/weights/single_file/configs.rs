//! The configuration a single checkpoint file does not carry (block layout, heads,
//! scheduler, tokenizer): from a diffusers folder (`--config`), or built in for the released
//! architectures (`assets/configs/`, the released models' numbers); an original yaml's
//! layout and schedule over either.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::yaml_architecture::YamlArchitecture;
use super::Architecture;
use crate::error::{parse_json, Error, Result};
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

/// Where the configuration files come from: a diffusers folder (`--config`; its weights, if
/// any, are not read) or the released architecture's built-in files, with what an original
/// yaml describes (U-Net, VAE, schedule) set over them.
#[derive(Clone, Debug)]
pub struct ConfigFiles {
    folder: Option<PathBuf>,
    arch: Architecture,
    /// (file, the yaml, the keys it sets in that file).
    described: Vec<(&'static str, PathBuf, Map<String, Value>)>,
}

impl ConfigFiles {
    /// The folder's files, or `None`: the released architecture's.
    pub fn new(folder: Option<PathBuf>, arch: Architecture) -> Self {
        Self {
            folder,
            arch,
            described: Vec::new(),
        }
    }

    pub fn built_in(arch: Architecture) -> Self {
        Self::new(None, arch)
    }

    /// The same files with those the yaml at `path` describes taken from it.
    pub fn described_by(mut self, path: &Path, described: &YamlArchitecture) -> Self {
        self.described = described
            .files()
            .into_iter()
            .map(|(file, keys)| (file, path.to_path_buf(), keys.clone()))
            .collect();
        self
    }

    /// Whether the U-Net's layout comes from a yaml.
    pub fn unet_from_yaml(&self) -> Option<&Path> {
        self.described("unet/config.json").map(|(yaml, _)| yaml)
    }

    /// The yaml that describes `file`, and the keys it sets there.
    fn described(&self, file: &str) -> Option<(&Path, &Map<String, Value>)> {
        self.described
            .iter()
            .find(|(f, ..)| *f == file)
            .map(|(_, yaml, keys)| (yaml.as_path(), keys))
    }

    fn built_in_files(arch: Architecture) -> &'static [(&'static str, &'static str)] {
        match arch {
            Architecture::Sd1 => SD1,
            Architecture::Sd2 => SD2,
            Architecture::Sdxl => SDXL,
            Architecture::SdxlRefiner => SDXL_REFINER,
        }
    }

    /// The path a file stands for, in errors (`built-in sd2 config/unet/config.json`,
    /// `v1-inference.yaml (as unet/config.json)`).
    pub fn path(&self, file: &str) -> PathBuf {
        if let Some((yaml, _)) = self.described(file) {
            return PathBuf::from(format!("{} (as {file})", yaml.display()));
        }
        self.source_path(file)
    }

    fn source_path(&self, file: &str) -> PathBuf {
        match &self.folder {
            Some(dir) => dir.join(file),
            None => self.built_in_path(file),
        }
    }

    fn built_in_path(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("built-in {} config", self.arch.name())).join(file)
    }

    /// A file's text; `None` when it does not exist.
    pub fn text(&self, file: &str) -> Result<Option<String>> {
        let source = self.source_text(file)?;
        let Some((_, keys)) = self.described(file) else {
            return Ok(source);
        };
        // The yaml's keys over the folder's (or the released architecture's) file, which
        // holds what a yaml does not say (activation, epsilons, the scheduler's class).
        let (base_path, base) = match source {
            Some(text) => (self.source_path(file), text),
            None => (
                self.built_in_path(file),
                Self::built_in_text(self.arch, file)
                    .ok_or_else(|| Error::config(self.path(file), "no released config to fill in"))?
                    .to_string(),
            ),
        };
        let mut merged: Value = parse_json(&base, &base_path)?;
        let object = merged
            .as_object_mut()
            .ok_or_else(|| Error::config(&base_path, "not a JSON object"))?;
        object.extend(keys.clone());
        serde_json::to_string_pretty(&merged)
            .map(Some)
            .map_err(|e| Error::config(self.path(file), e.to_string()))
    }

    fn built_in_text(arch: Architecture, file: &str) -> Option<&'static str> {
        Self::built_in_files(arch)
            .iter()
            .find(|(name, _)| *name == file)
            .map(|(_, text)| *text)
    }

    fn source_text(&self, file: &str) -> Result<Option<String>> {
        match &self.folder {
            Some(dir) => match std::fs::read_to_string(dir.join(file)) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(dir.join(file), e)),
            },
            None => Ok(Self::built_in_text(self.arch, file).map(str::to_string)),
        }
    }

    /// A file that must exist.
    pub fn require(&self, file: &str) -> Result<String> {
        self.text(file)?
            .ok_or_else(|| Error::config(self.path(file), "missing"))
    }

    /// A tokenizer component (`tokenizer`, `tokenizer_2`).
    pub fn tokenizer(&self, component: &str) -> Result<ClipTokenizer> {
        match &self.folder {
            Some(dir) => ClipTokenizer::from_folder(&dir.join(component)),
            None => {
                let config = self.text(&format!("{component}/tokenizer_config.json"))?;
                let special = self.text(&format!("{component}/special_tokens_map.json"))?;
                ClipTokenizer::from_parts(VOCAB, MERGES, config.as_deref(), special.as_deref())
            }
        }
    }

    /// A tokenizer's vocab.json and merges.txt.
    pub fn vocabulary(&self, component: &str) -> Result<(String, String)> {
        match &self.folder {
            Some(dir) => {
                let read = |file: &str| {
                    let path = dir.join(component).join(file);
                    std::fs::read_to_string(&path).map_err(|e| Error::io(path, e))
                };
                Ok((read("vocab.json")?, read("merges.txt")?))
            }
            None => Ok((VOCAB.to_string(), MERGES.to_string())),
        }
    }

    /// Whether a component folder is there (a folder) or part of the architecture.
    pub fn has(&self, component: &str) -> bool {
        match &self.folder {
            Some(dir) => Path::new(dir).join(component).is_dir(),
            None => Self::built_in_files(self.arch)
                .iter()
                .any(|(name, _)| name.starts_with(&format!("{component}/"))),
        }
    }
}
