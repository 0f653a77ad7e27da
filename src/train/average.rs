//! Weight averaging ("model soup", Wortsman et al. 2022): the element-wise mean of the U-Net
//! and text-encoder weights of several fine-tunes of one model. Fine-tunes from a common
//! ancestor sit in one basin of the loss, so their mean is a model too, and it averages away
//! the noise each run's last batches left in its weights.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::checkpoint::{load_tensors, save_tensors_atomic};
use crate::error::{Error, Result};

/// The weight files averaged, by component folder.
const PARTS: [(&str, &str); 2] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
];

/// Writes into `out` the `unet` and `text_encoder` of the mean of `models` (diffusers-layout
/// folders of one architecture): each weight the mean of its copies, computed in f32 and
/// stored in the first model's dtype, with the first model's `config.json`. Files are
/// written atomically; nothing is written unless every input is read and agrees in names
/// and shapes.
pub fn average_models(models: &[&Path], out: &Path) -> Result<()> {
    if models.len() < 2 {
        return Err(Error::InvalidRequest(format!(
            "averaging needs at least two models, got {}",
            models.len()
        )));
    }
    let mut averaged = Vec::new();
    for (part, file) in PARTS {
        let paths: Vec<_> = models.iter().map(|m| m.join(part).join(file)).collect();
        averaged.push((part, file, average_files(&paths)?));
    }
    for (part, file, tensors) in averaged {
        let dir = out.join(part);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let config = models[0].join(part).join("config.json");
        let bytes = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
        crate::png_out::write_atomic(&dir.join("config.json"), &bytes)?;
        save_tensors_atomic(&tensors, &dir.join(file))?;
    }
    Ok(())
}

/// The mean of the same-named tensors of several safetensors files.
fn average_files(paths: &[std::path::PathBuf]) -> Result<BTreeMap<String, Tensor>> {
    let load = |p: &Path| {
        if !p.is_file() {
            return Err(Error::config(p, "no such weight file"));
        }
        load_tensors(p)
    };
    let first = load(&paths[0])?;
    let mut sums: BTreeMap<String, Tensor> = first
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    for path in &paths[1..] {
        let other = load(path)?;
        if other.len() != first.len() {
            return Err(Error::config(
                path,
                format!(
                    "{} tensors, but {} has {}",
                    other.len(),
                    paths[0].display(),
                    first.len()
                ),
            ));
        }
        for (name, sum) in sums.iter_mut() {
            let t = other.get(name).ok_or_else(|| Error::MissingTensor {
                path: path.clone(),
                name: name.clone(),
            })?;
            if t.dims() != sum.dims() {
                return Err(Error::config(
                    path,
                    format!(
                        "{name} has shape {:?}, but {:?} in {}",
                        t.dims(),
                        sum.dims(),
                        paths[0].display()
                    ),
                ));
            }
            *sum = (&*sum + t.to_dtype(DType::F32)?)?;
        }
    }
    let n = paths.len() as f64;
    sums.into_iter()
        .map(|(k, s)| {
            let dtype = first[&k].dtype();
            Ok((k, (s / n)?.to_dtype(dtype)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    fn model(dir: &Path, values: &[f32], dtype: DType) {
        for (part, file) in PARTS {
            std::fs::create_dir_all(dir.join(part)).unwrap();
            std::fs::write(
                dir.join(part).join("config.json"),
                format!("{{\"part\": \"{part}\"}}"),
            )
            .unwrap();
            let t = Tensor::from_slice(values, (2, 2), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let map = HashMap::from([("w".to_string(), t)]);
            candle_core::safetensors::save(&map, dir.join(part).join(file)).unwrap();
        }
    }

    #[test]
    fn averages_every_weight_and_keeps_the_dtype() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c, out) = (
            d.path().join("a"),
            d.path().join("b"),
            d.path().join("c"),
            d.path().join("out"),
        );
        model(&a, &[1.0, 2.0, 3.0, 4.0], DType::F16);
        model(&b, &[3.0, 2.0, -3.0, 0.5], DType::F16);
        model(&c, &[2.0, 5.0, 0.0, 0.0], DType::F16);
        average_models(&[&a, &b, &c], &out).unwrap();
        for (part, file) in PARTS {
            let got =
                candle_core::safetensors::load(out.join(part).join(file), &Device::Cpu).unwrap();
            let w = &got["w"];
            assert_eq!(w.dtype(), DType::F16);
            let v: Vec<f32> = w
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(v, vec![2.0, 3.0, 0.0, 1.5]);
            let config = std::fs::read_to_string(out.join(part).join("config.json")).unwrap();
            assert!(config.contains(part));
        }
    }

    #[test]
    fn refuses_mismatched_models_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, out) = (d.path().join("a"), d.path().join("b"), d.path().join("out"));
        model(&a, &[1.0, 2.0, 3.0, 4.0], DType::F32);
        model(&b, &[1.0, 2.0, 3.0, 4.0], DType::F32);
        let t = Tensor::zeros((4,), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("w".to_string(), t)]),
            b.join("text_encoder/model.safetensors"),
        )
        .unwrap();
        let err = average_models(&[&a, &b], &out).unwrap_err().to_string();
        assert!(err.contains("w has shape [4]"), "{err}");
        assert!(!out.exists());
        let err = average_models(&[&a, &d.path().join("missing")], &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such weight file"), "{err}");
        assert!(average_models(&[&a], &out).is_err());
    }
}
