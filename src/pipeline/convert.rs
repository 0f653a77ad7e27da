//! `text2img convert`: a model written out again as a diffusers folder, with its weight
//! matrices in another dtype where asked (`--dtype q8`: a folder a quarter of f32's size that
//! loads as q8 with no quantizing). Single files are converted by
//! [`super::single_file::convert_single_file`]; this file holds the folder-to-folder
//! conversion and what both share: the folder written beside its place and renamed into it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{Family, LoadOptions, Pipeline, GUIDE_UNET};
use crate::error::{Error, Result};
use crate::latent::unet::{UNet, UNetConfig};
use crate::text::clip::{ClipTextConfig, ClipTextModel};
use crate::vae::config::VaeConfig;
use crate::vae::AutoencoderKl;
use crate::weights::folder::ModelFolder;
use crate::weights::store::has_weight_files;
use crate::weights::{MatrixDtype, Weights};

/// Writes a new folder `out` through `write(staging)`: into a hidden folder beside it, renamed
/// into place when all is written, removed on failure (a failed conversion leaves nothing).
pub(super) fn write_staged(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() {
        return Err(Error::config(out, "already exists; choose a new folder"));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .ok_or_else(|| Error::config(out, "not a folder name"))?
        .to_string_lossy();
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let written = std::fs::create_dir_all(&staging)
        .map_err(|e| Error::io(&staging, e))
        .and_then(|()| write(&staging));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::rename(&staging, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        Error::io(out, e)
    })
}

/// Writes one component's weights to `file`: the weight matrices (the tensors `model` asks
/// for as such, found by loading it) as `dtype` keeps them, the rest as stored; with `None`
/// everything as stored, without loading the model again.
pub(super) fn write_weights(
    mut weights: Weights,
    dtype: Option<MatrixDtype>,
    model: &LoadModel<'_>,
    file: &Path,
) -> Result<()> {
    let matrices = match dtype {
        None => HashSet::new(),
        Some(dtype) => {
            weights.store_matrices_as(dtype);
            model(&weights)?;
            weights.matrix_names()
        }
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::weights::writer::write_component(&weights, &matrices, dtype, file)
}

/// Builds a component's model from weights (to learn which tensors are its matrices).
type LoadModel<'a> = dyn Fn(&Weights) -> Result<()> + 'a;

/// Converts the diffusers folder `folder` into the new folder `out`: the U-Nets', VAE's and
/// text encoders' weights (of `options.variant`) written with their matrices as `matrices`
/// (`None`: as stored); every other file copied as it is. The folder is loaded first with
/// `options` (one that does not load is not converted).
pub fn convert_folder(
    folder: &Path,
    options: &LoadOptions,
    matrices: Option<MatrixDtype>,
    out: &Path,
) -> Result<()> {
    if out.exists() {
        return Err(Error::config(out, "already exists; choose a new folder"));
    }
    let model = ModelFolder::open(folder)?;
    // The folder must load as it is before anything is written.
    drop(Pipeline::load_folder(&model, options)?);
    refuse_inside(folder, out)?;
    let family = Family::detect(&model)?;
    let device = &options.device;
    // Autoguidance's U-Net too, which the pipeline loads beside the model's own.
    let converted: Vec<&str> = family
        .components()
        .iter()
        .map(|(name, _)| *name)
        .chain([GUIDE_UNET])
        .filter(|name| model.component(name).is_dir())
        .collect();
    write_staged(out, |staging| {
        copy_other_files(&model.root, staging, &converted)?;
        for &component in &converted {
            let dir = model.component(component);
            // As the pipeline loads it: the guide falls back to its plain weights where it
            // lacks the variant.
            let variant = options
                .variant
                .as_deref()
                .filter(|v| component != GUIDE_UNET || has_weight_files(&dir, Some(v)));
            let mut weights = Weights::open_component(&dir, variant, device)?;
            let config = dir.join("config.json");
            let (stem, load): (&str, Box<LoadModel<'static>>) = match component {
                "unet" | GUIDE_UNET => {
                    let config = UNetConfig::from_file(&config)?;
                    let load =
                        move |w: &Weights| UNet::from_weights(config.clone(), &w.root()).map(drop);
                    ("diffusion_pytorch_model", Box::new(load))
                }
                "vae" => {
                    let config = VaeConfig::from_file(&config)?;
                    let load = move |w: &Weights| {
                        AutoencoderKl::from_weights(config.clone(), &w.root()).map(drop)
                    };
                    ("diffusion_pytorch_model", Box::new(load))
                }
                _ => {
                    let config = ClipTextConfig::from_file(&config)?;
                    let load =
                        move |w: &Weights| ClipTextModel::from_weights(config.clone(), w).map(drop);
                    ("model", Box::new(load))
                }
            };
            if component == "vae" {
                AutoencoderKl::accept_legacy_names(&mut weights);
            }
            let file = staging.join(component).join(format!("{stem}.safetensors"));
            write_weights(weights, matrices, &*load, &file)?;
        }
        Ok(())
    })
}

/// Refuses an output folder inside the source (the copy would walk into itself).
fn refuse_inside(folder: &Path, out: &Path) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (Ok(source), Ok(parent)) = (folder.canonicalize(), parent.canonicalize()) else {
        return Ok(());
    };
    if parent.starts_with(&source) {
        return Err(Error::config(
            out,
            "is inside the folder it converts; choose a folder elsewhere",
        ));
    }
    Ok(())
}

/// Copies every file under `from` to `to` except the weight files of the `converted`
/// components (written anew, whichever variant) and hidden folders (`.git`, `.cache`).
/// Links to files are copied as the files they point to (a Hugging Face snapshot's links to
/// its blobs); links to folders are not followed.
fn copy_other_files(from: &Path, to: &Path, converted: &[&str]) -> Result<()> {
    let mut pending: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = from.join(&relative);
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        std::fs::create_dir_all(to.join(&relative)).map_err(|e| Error::io(to, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let path = entry.path();
            let name = relative.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
            if kind.is_dir() {
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    pending.push(name);
                }
                continue;
            }
            if kind.is_symlink() && path.is_dir() {
                continue;
            }
            let in_converted = relative
                .components()
                .next()
                .is_some_and(|c| converted.iter().any(|k| c.as_os_str() == *k));
            if in_converted && is_weight_file(&path) {
                continue;
            }
            let target = to.join(&name);
            std::fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// A file of weights a component folder may hold: safetensors (and their shard indexes) or
/// PyTorch's `.bin`.
fn is_weight_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin")
}
