//! The models a server runs: the one loaded now, the checkpoints it may switch to (its
//! `--model` and those in `--models-dir`, in A1111's layout: `Stable-diffusion/`, `Lora/`,
//! `embeddings/`), and the LoRAs that requests name.
//!
//! One model is loaded at a time (two would double the memory); the worker thread loads
//! another when a job asks for it, so a switch waits behind the jobs queued before it.
//! A request's LoRAs are merged into a copy of the layers they change
//! ([`Pipeline::with_loras`]); the loaded model itself never changes, so the next request
//! without them gets the plain model's image, bit for bit.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::latent::controlnet::ControlNet;
use crate::pipeline::cost::CostModel;
use crate::pipeline::{LoraSpec, Pipeline};
use crate::vae::Vae;

/// Builds a pipeline from a checkpoint's source (a file, a folder or a repo id), with the
/// server's load options (dtype, embeddings, a preview VAE).
pub type Loader = Box<dyn Fn(&str) -> Result<Pipeline> + Send + Sync>;

/// A model the server has loaded, with what requests cost on it.
pub struct Loaded {
    pub pipeline: Arc<Pipeline>,
    pub cost: CostModel,
    pub checkpoint: Checkpoint,
    /// The checkpoint's own VAE, for a switch back from another (`sd_vae` "Automatic").
    own_vae: Vae,
}

/// A checkpoint the server can load.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// What clients name it by (A1111's `title`): the file's name under `Stable-diffusion/`,
    /// or the startup model's name.
    pub title: String,
    /// The title without its extension (A1111's `model_name`).
    pub model_name: String,
    /// Its file, folder or repo id.
    pub source: String,
    /// A VAE from `VAE/` in place of the checkpoint's own (`sd_vae`); `None`: its own.
    pub vae: Option<PathBuf>,
}

impl Checkpoint {
    /// Whether a client's name means this checkpoint: its title or model name, or (as
    /// A1111 accepts) the title followed by a hash in brackets.
    pub fn answers_to(&self, name: &str) -> bool {
        let name = name.trim();
        let bare = without_hash(name);
        [name, bare]
            .iter()
            .any(|n| *n == self.title || *n == self.model_name)
    }
}

/// A file (or model folder) under one of `--models-dir`'s folders, by the name clients
/// use for it: a LoRA, a ControlNet, a VAE.
#[derive(Clone, Debug)]
pub struct NamedFile {
    pub name: String,
    pub path: PathBuf,
}

/// The extensions of checkpoint and LoRA files, in the order a name is looked up.
const WEIGHT_EXTENSIONS: [&str; 4] = ["safetensors", "ckpt", "pt", "pth"];

pub struct Models {
    loader: Loader,
    /// The `--model` the server started with (listed first, even outside `models_dir`).
    startup: Checkpoint,
    /// `--models-dir`.
    models_dir: Option<PathBuf>,
    /// Where `<lora:NAME>` is looked up (`--lora-dir`, or `Lora/` under `--models-dir`).
    lora_dir: Option<PathBuf>,
    /// `ControlNet/` and `VAE/` under `--models-dir`.
    controlnet_dir: Option<PathBuf>,
    vae_dir: Option<PathBuf>,
    vaes: RwLock<Vec<NamedFile>>,
    /// The VAE requests run with unless they name another (`sd_vae`); `None`: the
    /// checkpoint's own ("Automatic").
    selected_vae: RwLock<Option<NamedFile>>,
    checkpoints: RwLock<Vec<Checkpoint>>,
    loras: RwLock<Vec<NamedFile>>,
    controlnets: RwLock<Vec<NamedFile>>,
    /// The ControlNets loaded for the loaded model, kept for the next request that uses them
    /// (dropped with the model).
    loaded_controlnets: Mutex<Vec<(PathBuf, ControlNet)>>,
    /// The model requests run on unless they name another (`sd_model_checkpoint`).
    selected: RwLock<Checkpoint>,
    loaded: RwLock<Option<Arc<Loaded>>>,
    /// The last request's LoRA copy of the loaded model, for the next request with the same
    /// LoRAs (a client making several images with one LoRA pays for the merge once).
    lora_copy: Mutex<Option<(LoraKey, Arc<Pipeline>)>>,
}

/// What a LoRA copy was made from: the model, and each LoRA's file (with its size and time,
/// so a replaced file is merged again) and weights.
#[derive(Clone, Debug, PartialEq)]
struct LoraKey {
    model: String,
    loras: Vec<(PathBuf, u64, Option<SystemTime>, u64, u64)>,
}

impl LoraKey {
    fn of(model: &str, specs: &[LoraSpec]) -> Self {
        let loras = specs
            .iter()
            .map(|s| {
                let meta = std::fs::metadata(&s.path).ok();
                (
                    s.path.clone(),
                    meta.as_ref().map_or(0, std::fs::Metadata::len),
                    meta.and_then(|m| m.modified().ok()),
                    s.text_weight.to_bits(),
                    s.unet_weight.to_bits(),
                )
            })
            .collect();
        Self {
            model: model.to_string(),
            loras,
        }
    }
}

impl Models {
    /// The server's models, with `pipeline` (loaded from `startup.source`) loaded.
    pub fn new(
        loader: Loader,
        pipeline: Pipeline,
        startup: Checkpoint,
        models_dir: Option<PathBuf>,
        lora_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let lora_dir = lora_dir.or_else(|| models_dir.as_ref().map(|d| d.join("Lora")));
        let controlnet_dir = models_dir.as_ref().map(|d| d.join("ControlNet"));
        let vae_dir = models_dir.as_ref().map(|d| d.join("VAE"));
        let loaded = Self::measure(pipeline, startup.clone())?;
        let models = Self {
            loader,
            selected: RwLock::new(startup.clone()),
            startup,
            models_dir,
            lora_dir,
            controlnet_dir,
            vae_dir,
            vaes: RwLock::new(Vec::new()),
            selected_vae: RwLock::new(None),
            checkpoints: RwLock::new(Vec::new()),
            loras: RwLock::new(Vec::new()),
            controlnets: RwLock::new(Vec::new()),
            loaded_controlnets: Mutex::new(Vec::new()),
            loaded: RwLock::new(Some(Arc::new(loaded))),
            lora_copy: Mutex::new(None),
        };
        models.refresh_checkpoints()?;
        models.refresh_loras()?;
        models.refresh_controlnets()?;
        models.refresh_vaes()?;
        Ok(models)
    }

    fn measure(mut pipeline: Pipeline, checkpoint: Checkpoint) -> Result<Loaded> {
        let own_vae = pipeline.vae.clone();
        if let Some(vae) = &checkpoint.vae {
            pipeline.vae = replacement_vae(&own_vae, vae, &pipeline)?;
        }
        let measuring = std::time::Instant::now();
        let cost = CostModel::measure(&pipeline)?;
        eprintln!(
            "measured what requests cost with {} in {:.2} s",
            checkpoint.title,
            measuring.elapsed().as_secs_f64()
        );
        Ok(Loaded {
            pipeline: Arc::new(pipeline),
            cost,
            checkpoint,
            own_vae,
        })
    }

    /// The loaded model (`None` while the worker loads another).
    pub fn loaded(&self) -> Option<Arc<Loaded>> {
        read(&self.loaded).clone()
    }

    pub fn selected(&self) -> Checkpoint {
        read(&self.selected).clone()
    }

    pub fn select(&self, checkpoint: Checkpoint) {
        *write(&self.selected) = checkpoint;
    }

    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        read(&self.checkpoints).clone()
    }

    pub fn loras(&self) -> Vec<NamedFile> {
        read(&self.loras).clone()
    }

    /// The checkpoint a client's name means; an error listing the known ones if none.
    pub fn find(&self, name: &str) -> Result<Checkpoint> {
        let checkpoints = read(&self.checkpoints);
        checkpoints
            .iter()
            .find(|c| c.answers_to(name))
            .cloned()
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "no checkpoint `{name}`; known: {}",
                    checkpoints
                        .iter()
                        .map(|c| c.title.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// Rescans `Stable-diffusion/` (A1111's `/sdapi/v1/refresh-checkpoints`).
    pub fn refresh_checkpoints(&self) -> Result<()> {
        let mut found = vec![self.startup.clone()];
        if let Some(dir) = &self.models_dir {
            let dir = dir.join("Stable-diffusion");
            for (relative, path) in walk(&dir, pipeline_folder)? {
                let is_file = path.is_file() && has_extension(&path, &WEIGHT_EXTENSIONS);
                let is_folder = path.join("model_index.json").is_file();
                if !(is_file || is_folder) || same_place(&path, &self.startup.source) {
                    continue;
                }
                let model_name = if is_file {
                    relative.with_extension("")
                } else {
                    relative.clone()
                };
                found.push(Checkpoint {
                    title: slashes(&relative),
                    model_name: slashes(&model_name),
                    source: path.display().to_string(),
                    vae: None,
                });
            }
        }
        *write(&self.checkpoints) = found;
        Ok(())
    }

    /// Rescans the LoRA folder (A1111's `/sdapi/v1/refresh-loras`).
    pub fn refresh_loras(&self) -> Result<()> {
        *write(&self.loras) = named_files(self.lora_dir.as_deref(), &Scan::LORAS)?;
        Ok(())
    }

    /// Rescans `ControlNet/`: single files and diffusers folders (with a `config.json`).
    pub fn refresh_controlnets(&self) -> Result<()> {
        *write(&self.controlnets) =
            named_files(self.controlnet_dir.as_deref(), &Scan::CONTROLNETS)?;
        Ok(())
    }

    /// Rescans `VAE/` (A1111's `/sdapi/v1/refresh-vae`): single files and folders.
    pub fn refresh_vaes(&self) -> Result<()> {
        *write(&self.vaes) = named_files(self.vae_dir.as_deref(), &Scan::VAES)?;
        Ok(())
    }

    pub fn vaes(&self) -> Vec<NamedFile> {
        read(&self.vaes).clone()
    }

    /// The VAE a client's `sd_vae` means: `None` for "Automatic" or "None" (the checkpoint's
    /// own), else a file under `VAE/` by its name (with or without the extension).
    pub fn find_vae(&self, name: &str) -> Result<Option<NamedFile>> {
        let name = name.trim();
        if name.eq_ignore_ascii_case("automatic") || name.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        let vaes = read(&self.vaes);
        vaes.iter()
            .find(|v| v.name == name || Path::new(&v.name).with_extension("") == Path::new(name))
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "no VAE `{name}`; known: Automatic, None{}",
                    vaes.iter()
                        .map(|v| format!(", {}", v.name))
                        .collect::<String>()
                ))
            })
    }

    pub fn selected_vae(&self) -> Option<NamedFile> {
        read(&self.selected_vae).clone()
    }

    pub fn select_vae(&self, vae: Option<NamedFile>) {
        *write(&self.selected_vae) = vae;
    }

    pub fn controlnets(&self) -> Vec<NamedFile> {
        read(&self.controlnets).clone()
    }

    /// The ControlNet a request's `model` names: its name under `ControlNet/`, with or
    /// without A1111's ` [hash]` suffix.
    pub fn find_controlnet(&self, name: &str) -> Result<NamedFile> {
        let bare = without_hash(name.trim());
        let find = || {
            read(&self.controlnets)
                .iter()
                .find(|c| c.name == bare)
                .cloned()
        };
        if let Some(found) = find() {
            return Ok(found);
        }
        // Added since the last scan?
        self.refresh_controlnets()?;
        find().ok_or_else(|| {
            let known: Vec<String> = self.controlnets().into_iter().map(|c| c.name).collect();
            Error::InvalidRequest(match &self.controlnet_dir {
                None => format!("no ControlNet `{name}`: this server has no --models-dir"),
                Some(dir) => format!(
                    "no ControlNet `{name}` in {}; known: {}",
                    dir.display(),
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            })
        })
    }

    /// `pipeline` with the ControlNets at `paths` added in that order (loaded once per
    /// model, then kept).
    pub fn with_controlnets(
        &self,
        pipeline: Arc<Pipeline>,
        paths: &[PathBuf],
    ) -> Result<Arc<Pipeline>> {
        if paths.is_empty() {
            return Ok(pipeline);
        }
        let mut copy = (*pipeline).clone();
        copy.controlnets.clear();
        let mut cache = self
            .loaded_controlnets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for path in paths {
            match cache.iter().find(|(p, _)| p == path) {
                Some((_, net)) => copy.controlnets.push(net.clone()),
                None => {
                    let dtype = copy.unet.weight_dtype();
                    let index = copy.add_controlnet(path, dtype)?;
                    cache.push((path.clone(), copy.controlnets[index].clone()));
                }
            }
        }
        Ok(Arc::new(copy))
    }

    /// The LoRA a prompt's `<lora:NAME>` means (its file name without the extension, or its
    /// path under the LoRA folder).
    pub fn find_lora(&self, name: &str) -> Result<NamedFile> {
        let Some(dir) = &self.lora_dir else {
            return Err(Error::InvalidRequest(format!(
                "names <lora:{name}>; this server has no LoRA folder (start it with --models-dir or --lora-dir)"
            )));
        };
        let loras = read(&self.loras);
        let by_path = loras.iter().find(|l| l.name == name);
        let by_stem = || {
            loras
                .iter()
                .find(|l| Path::new(&l.name).file_name().and_then(|n| n.to_str()) == Some(name))
        };
        by_path.or_else(by_stem).cloned().ok_or_else(|| {
            Error::InvalidRequest(format!(
                "names <lora:{name}>; there is no {name}.safetensors in {} (added since the start? POST /sdapi/v1/refresh-loras)",
                dir.display()
            ))
        })
    }

    /// The loaded model if it is `checkpoint`; otherwise (in the worker) the old one is let
    /// go and `checkpoint` loaded in its place.
    pub fn load(&self, checkpoint: &Checkpoint) -> Result<Arc<Loaded>> {
        if let Some(loaded) = self.loaded() {
            if loaded.checkpoint == *checkpoint {
                return Ok(loaded);
            }
            if loaded.checkpoint.source == checkpoint.source {
                // The same model with another VAE: only the VAE changes.
                let mut pipeline = (*loaded.pipeline).clone();
                pipeline.vae = match &checkpoint.vae {
                    None => loaded.own_vae.clone(),
                    Some(vae) => replacement_vae(&loaded.own_vae, vae, &pipeline).map_err(|e| {
                        Error::InvalidRequest(format!(
                            "cannot load VAE {}: {}",
                            vae.display(),
                            e.message()
                        ))
                    })?,
                };
                let swapped = Arc::new(Loaded {
                    pipeline: Arc::new(pipeline),
                    cost: loaded.cost.clone(),
                    checkpoint: checkpoint.clone(),
                    own_vae: loaded.own_vae.clone(),
                });
                *self.lora_copy.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *write(&self.loaded) = Some(swapped.clone());
                return Ok(swapped);
            }
        }
        // Let the old model go first: two at once may not fit.
        *write(&self.loaded) = None;
        *self.lora_copy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.loaded_controlnets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        eprintln!("loading {} from {}", checkpoint.title, checkpoint.source);
        let started = std::time::Instant::now();
        let loaded = match (self.loader)(&checkpoint.source) {
            Ok(pipeline) => Arc::new(Self::measure(pipeline, checkpoint.clone())?),
            Err(e) => {
                // Back to the selected model (or, if that is the one that failed, the
                // startup model), so the server still answers.
                eprintln!("loading {} failed: {e}", checkpoint.title);
                let selected = self.selected();
                let fallback = if selected == *checkpoint {
                    self.startup.clone()
                } else {
                    selected
                };
                if fallback != *checkpoint {
                    self.select(fallback.clone());
                    if self.load(&fallback).is_err() && fallback != self.startup {
                        self.select(self.startup.clone());
                        let _ = self.load(&self.startup.clone());
                    }
                }
                return Err(Error::InvalidRequest(format!(
                    "cannot load checkpoint {}: {}",
                    checkpoint.title,
                    e.message()
                )));
            }
        };
        eprintln!(
            "loaded {} in {:.1} s",
            checkpoint.title,
            started.elapsed().as_secs_f64()
        );
        *write(&self.loaded) = Some(loaded.clone());
        Ok(loaded)
    }

    /// The loaded model with `loras` merged into a copy of the layers they change (the
    /// model itself if there are none), and warnings about modules that matched no layer.
    pub fn with_loras(
        &self,
        loaded: &Loaded,
        loras: &[LoraSpec],
    ) -> Result<(Arc<Pipeline>, Vec<String>)> {
        if loras.is_empty() {
            return Ok((loaded.pipeline.clone(), Vec::new()));
        }
        let key = LoraKey::of(&loaded.checkpoint.title, loras);
        let mut cached = self.lora_copy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, copy)) = cached.as_ref() {
            if *k == key {
                return Ok((copy.clone(), Vec::new()));
            }
        }
        // The previous copy goes before the next is made.
        *cached = None;
        let (copy, warnings) = loaded.pipeline.with_loras(loras)?;
        let copy = Arc::new(copy);
        *cached = Some((key, copy.clone()));
        Ok((copy, warnings))
    }
}

/// The VAE at `path` in place of `own` (which gives the config a single file lacks).
fn replacement_vae(own: &Vae, path: &Path, pipeline: &Pipeline) -> Result<Vae> {
    let Vae::Kl(kl) = own else {
        return Err(Error::InvalidRequest(
            "the model's own VAE is a tiny one: its full config is unknown".into(),
        ));
    };
    crate::vae::replacement::load(
        path,
        &kl.config,
        pipeline.unet.weight_dtype(),
        &candle_core::Device::Cpu,
    )
}

/// A1111 names a model by its title followed by a hash in brackets (`x.safetensors [6ce0161689]`).
fn without_hash(name: &str) -> &str {
    match name.rsplit_once(" [") {
        Some((title, hash)) if hash.ends_with(']') => title,
        _ => name,
    }
}

/// What one of `--models-dir`'s folders holds, and how its entries are named.
struct Scan {
    extensions: &'static [&'static str],
    /// Diffusers model folders (with a `config.json`) count, and are not walked into.
    folders: bool,
    /// The name keeps the file's extension (A1111 lists VAEs by file name).
    keep_extension: bool,
}

impl Scan {
    const LORAS: Scan = Scan {
        extensions: &["safetensors", "ckpt", "pt"],
        folders: false,
        keep_extension: false,
    };
    const CONTROLNETS: Scan = Scan {
        extensions: &WEIGHT_EXTENSIONS,
        folders: true,
        keep_extension: false,
    };
    const VAES: Scan = Scan {
        extensions: &WEIGHT_EXTENSIONS,
        folders: true,
        keep_extension: true,
    };
}

/// The files (and, where `scan` says, model folders) under `dir`, by name; none without a
/// folder.
fn named_files(dir: Option<&Path>, scan: &Scan) -> Result<Vec<NamedFile>> {
    let Some(dir) = dir else {
        return Ok(Vec::new());
    };
    let is_model: fn(&Path) -> bool = if scan.folders {
        model_folder
    } else {
        |_| false
    };
    let mut found = Vec::new();
    for (relative, path) in walk(dir, is_model)? {
        let file = path.is_file() && has_extension(&path, scan.extensions);
        let folder = scan.folders && path.is_dir() && model_folder(&path);
        if !(file || folder) {
            continue;
        }
        let name = if file && !scan.keep_extension {
            relative.with_extension("")
        } else {
            relative
        };
        found.push(NamedFile {
            name: slashes(&name),
            path,
        });
    }
    Ok(found)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Whether `path` is where `source` points (the startup model found again in the folder).
fn same_place(path: &Path, source: &str) -> bool {
    match (path.canonicalize(), Path::new(source).canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A relative path with `/` between its parts, as clients see names.
fn slashes(path: &Path) -> String {
    path.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// A diffusers pipeline folder (a checkpoint).
fn pipeline_folder(path: &Path) -> bool {
    path.join("model_index.json").is_file()
}

/// A diffusers model folder (a ControlNet).
fn model_folder(path: &Path) -> bool {
    path.join("config.json").is_file()
}

/// Every entry under `dir` (recursively, not into the folders `is_model` says are models),
/// sorted, with its path relative to `dir`. A missing folder has none.
fn walk(dir: &Path, is_model: fn(&Path) -> bool) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let here = dir.join(&relative);
        let entries = match std::fs::read_dir(&here) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&here, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&here, e))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let (relative, path) = (relative.join(&name), entry.path());
            if path.is_dir() && !is_model(&path) {
                pending.push(relative);
            } else {
                found.push((relative, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_as_a1111_clients_send_them() {
        let c = Checkpoint {
            title: "sd15/dreamy.safetensors".into(),
            model_name: "sd15/dreamy".into(),
            source: "/m/Stable-diffusion/sd15/dreamy.safetensors".into(),
            vae: None,
        };
        assert!(c.answers_to("sd15/dreamy.safetensors"));
        assert!(c.answers_to("sd15/dreamy"));
        assert!(c.answers_to("sd15/dreamy.safetensors [6ce0161689]"));
        assert!(!c.answers_to("dreamy"));
        assert!(!c.answers_to("sd15/dreamy.ckpt"));
    }

    #[test]
    fn walks_folders_but_not_into_diffusers_models() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("folder-model/unet")).unwrap();
        std::fs::write(root.join("folder-model/model_index.json"), "{}").unwrap();
        std::fs::write(root.join("a/b/x.safetensors"), "").unwrap();
        std::fs::write(root.join("y.ckpt"), "").unwrap();
        std::fs::write(root.join(".hidden.safetensors"), "").unwrap();
        let names: Vec<String> = walk(root, pipeline_folder)
            .unwrap()
            .iter()
            .map(|(r, _)| slashes(r))
            .collect();
        assert_eq!(names, ["a/b/x.safetensors", "folder-model", "y.ckpt"]);
        assert!(walk(&root.join("missing"), pipeline_folder)
            .unwrap()
            .is_empty());
    }
}
