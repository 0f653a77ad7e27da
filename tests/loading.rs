//! Model folders that do not match their configs fail with errors that name the file, the
//! tensor and both shapes; the legacy names diffusers accepts still load.

mod parity;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use parity::{copy_dir, model_dir, walk};
use text2img::pipeline::{load_local, LoadOptions};
use text2img::vae::AutoencoderKl;
use text2img::weights::MatrixDtype;

fn scratch_model() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    copy_dir(&model_dir("sd1-tiny"), &root);
    (dir, root)
}

fn load_error(root: &Path) -> String {
    match load_local(root, &LoadOptions::default()) {
        Ok(_) => panic!("{} should not load", root.display()),
        Err(e) => e.to_string(),
    }
}

fn unet_file(root: &Path) -> PathBuf {
    root.join("unet/diffusion_pytorch_model.safetensors")
}

/// Sets one field of a JSON config file.
fn set_config(path: &Path, key: &str, value: serde_json::Value) {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(path, config.to_string()).unwrap();
}

fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

#[test]
fn the_fixture_folders_load_with_every_tensor_used() {
    for name in ["sd1-tiny", "sd2-tiny"] {
        load_local(&model_dir(name), &LoadOptions::default()).unwrap();
    }
}

#[test]
fn a_missing_file_is_named() {
    let (_tmp, root) = scratch_model();
    std::fs::remove_file(root.join("unet/config.json")).unwrap();
    let err = load_error(&root);
    assert!(
        err.contains("unet/config.json") && err.contains("missing"),
        "{err}"
    );

    let (_tmp, root) = scratch_model();
    std::fs::remove_file(unet_file(&root)).unwrap();
    let err = load_error(&root);
    assert!(
        err.contains("unet") && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let (_tmp, root) = scratch_model();
    let mut t = read_tensors(&unet_file(&root));
    t.remove("mid_block.attentions.0.proj_in.weight").unwrap();
    write_tensors(&unet_file(&root), &t);
    let err = load_error(&root);
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(
        err.contains("missing tensor `mid_block.attentions.0.proj_in.weight`"),
        "{err}"
    );
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes() {
    let (_tmp, root) = scratch_model();
    let mut t = read_tensors(&unet_file(&root));
    t.insert(
        "conv_in.weight".into(),
        Tensor::zeros((32, 4, 5, 5), candle_core::DType::F16, &Device::Cpu).unwrap(),
    );
    write_tensors(&unet_file(&root), &t);
    let err = load_error(&root);
    assert!(err.contains("`conv_in.weight`"), "{err}");
    assert!(
        err.contains("[32, 4, 5, 5]") && err.contains("[32, 4, 3, 3]"),
        "{err}"
    );
}

#[test]
fn an_unknown_tensor_is_an_error() {
    let (_tmp, root) = scratch_model();
    let mut t = read_tensors(&unet_file(&root));
    t.insert(
        "extra.weight".into(),
        Tensor::zeros(3, candle_core::DType::F16, &Device::Cpu).unwrap(),
    );
    write_tensors(&unet_file(&root), &t);
    let err = load_error(&root);
    assert!(
        err.contains("not use") && err.contains("extra.weight"),
        "{err}"
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_caught() {
    let (_tmp, root) = scratch_model();
    set_config(
        &root.join("unet/config.json"),
        "cross_attention_dim",
        48.into(),
    );
    let err = load_error(&root);
    assert!(
        err.contains("attn2.to_k.weight") && err.contains("[32, 48]") && err.contains("[32, 32]"),
        "{err}"
    );
}

#[test]
fn corrupt_and_truncated_safetensors_are_errors() {
    let (_tmp, root) = scratch_model();
    let bytes = std::fs::read(unet_file(&root)).unwrap();
    std::fs::write(unet_file(&root), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&root);
    assert!(err.contains("not a valid safetensors file"), "{err}");

    std::fs::write(unet_file(&root), b"this is not a safetensors file").unwrap();
    let err = load_error(&root);
    assert!(
        err.contains("diffusion_pytorch_model.safetensors: not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn malformed_json_names_the_file() {
    let (_tmp, root) = scratch_model();
    std::fs::write(root.join("vae/config.json"), "{ not json").unwrap();
    let err = load_error(&root);
    assert!(err.contains("vae/config.json: invalid JSON"), "{err}");
}

#[test]
fn a_legacy_named_vae_loads_and_decodes_the_same() {
    let (_tmp, root) = scratch_model();
    let vae_file = root.join("vae/diffusion_pytorch_model.safetensors");
    let original = read_tensors(&vae_file);
    let mut legacy = HashMap::new();
    for (name, t) in &original {
        let mut renamed = name.clone();
        for (new, old) in [
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ] {
            renamed = renamed.replace(
                &format!("attentions.0.{new}."),
                &format!("attentions.0.{old}."),
            );
        }
        // Old checkpoints also stored these projections as 1x1 convolutions.
        let t = if renamed != *name && t.rank() == 2 {
            t.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
        } else {
            t.clone()
        };
        legacy.insert(renamed, t);
    }
    assert!(legacy.contains_key("decoder.mid_block.attentions.0.query.weight"));
    write_tensors(&vae_file, &legacy);
    let z = Tensor::randn(0f32, 1f32, (1, 4, 4, 4), &Device::Cpu).unwrap();
    let a = AutoencoderKl::load(&model_dir("sd1-tiny").join("vae"), None, &Device::Cpu).unwrap();
    let b = AutoencoderKl::load(&root.join("vae"), None, &Device::Cpu).unwrap();
    let max_diff = |x: &AutoencoderKl, y: &AutoencoderKl| {
        let diff = (x.decode(&z).unwrap() - y.decode(&z).unwrap()).unwrap();
        let diff = diff.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap()
    };
    assert_eq!(max_diff(&a, &b), 0.0);

    // Converted to q8, the legacy 1x1 kernels are stored as int8 kernels and still serve as
    // matrices: the same decoder as the original quantized as it loads.
    let out = _tmp.path().join("q8");
    let options = LoadOptions {
        weight_dtype: MatrixDtype::Q8,
        ..Default::default()
    };
    text2img::pipeline::convert::convert_folder(&root, &options, Some(MatrixDtype::Q8), &out)
        .unwrap();
    let q8 = |dir: &std::path::Path| {
        AutoencoderKl::load_as(&dir.join("vae"), None, &Device::Cpu, MatrixDtype::Q8).unwrap()
    };
    let converted = AutoencoderKl::load(&out.join("vae"), None, &Device::Cpu).unwrap();
    assert_eq!(max_diff(&q8(&model_dir("sd1-tiny")), &converted), 0.0);
    assert!(max_diff(&a, &converted) > 0.0);
}

#[test]
fn sharded_weights_and_the_fp16_variant_load() {
    let (_tmp, root) = scratch_model();
    // Shard the U-Net in two, with an index, as large checkpoints are stored.
    let t = read_tensors(&unet_file(&root));
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("diffusion_pytorch_model-00001-of-00002.safetensors", first),
        ("diffusion_pytorch_model-00002-of-00002.safetensors", second),
    ] {
        let shard: HashMap<String, Tensor> =
            part.iter().map(|n| ((*n).clone(), t[*n].clone())).collect();
        write_tensors(&root.join("unet").join(file), &shard);
        for n in part {
            map.insert((*n).clone(), file.into());
        }
    }
    std::fs::remove_file(unet_file(&root)).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        root.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    load_local(&root, &LoadOptions::default()).unwrap();

    // An fp16-only folder: loads with the variant, and says how without it.
    let (_tmp2, root) = scratch_model();
    for comp in [
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ] {
        std::fs::rename(
            root.join(format!("{comp}.safetensors")),
            root.join(format!("{comp}.fp16.safetensors")),
        )
        .unwrap();
    }
    let err = load_error(&root);
    assert!(err.contains("--variant fp16"), "{err}");
    // The guide U-Net keeps its plain weights only: being optional, it falls back to them.
    let options = LoadOptions {
        variant: Some("fp16".into()),
        ..LoadOptions::default()
    };
    let pipeline = load_local(&root, &options).unwrap();
    assert!(pipeline.guide_unet.is_some());
}

/// Autoguidance's guide U-Net must fit the U-Net's inputs and conditioning, and a default
/// weight in text2img.json needs one; both are refused at load, naming the file.
#[test]
fn a_guide_unet_that_does_not_fit_or_is_missing_is_named() {
    let (_tmp, root) = scratch_model();
    set_config(
        &root.join("guide_unet/config.json"),
        "cross_attention_dim",
        16.into(),
    );
    // Weights that fit the edited config, so that the load reaches the check.
    let weights = root.join("guide_unet/diffusion_pytorch_model.safetensors");
    let narrowed = read_tensors(&weights)
        .into_iter()
        .map(|(name, t)| {
            let reads_text = name.contains("attn2.to_k.") || name.contains("attn2.to_v.");
            let t = if reads_text {
                t.narrow(1, 0, 16).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    write_tensors(&weights, &narrowed);
    let err = load_error(&root);
    assert!(
        err.contains("guide_unet/config.json") && err.contains("cross_attention_dim"),
        "{err}"
    );

    let (_tmp, root) = scratch_model();
    std::fs::remove_dir_all(root.join("guide_unet")).unwrap();
    std::fs::write(root.join("text2img.json"), r#"{"autoguidance": 2.0}"#).unwrap();
    let err = load_error(&root);
    assert!(
        err.contains("text2img.json") && err.contains("guide_unet"),
        "{err}"
    );
    // A guide folder without its config is named, not skipped.
    let (_tmp, root) = scratch_model();
    std::fs::remove_file(root.join("guide_unet/config.json")).unwrap();
    let err = load_error(&root);
    assert!(err.contains("guide_unet/config.json"), "{err}");

    let (_tmp, root) = scratch_model();
    std::fs::remove_dir_all(root.join("guide_unet")).unwrap();
    // A weight of 1 (off) needs none.
    std::fs::write(root.join("text2img.json"), r#"{"autoguidance": 1.0}"#).unwrap();
    load_local(&root, &LoadOptions::default()).unwrap();
}

/// `convert_folder` converts autoguidance's U-Net (`guide_unet/`) with the model's own: both
/// load from the converted folder as q8, and no file of the folder is left behind or lost.
/// An output folder inside the source is refused before anything is written.
#[test]
fn converting_a_folder_to_q8_quantizes_the_guide_unet_too() {
    let (tmp, root) = scratch_model();
    assert!(root.join("guide_unet").is_dir());
    let options = LoadOptions {
        weight_dtype: MatrixDtype::Q8,
        ..Default::default()
    };
    let convert = text2img::pipeline::convert::convert_folder;
    let inside = root.join("q8");
    let err = convert(&root, &options, Some(MatrixDtype::Q8), &inside).unwrap_err();
    assert!(err.to_string().contains("inside the folder"), "{err}");
    assert!(!inside.exists());
    let out = tmp.path().join("q8");
    convert(&root, &options, Some(MatrixDtype::Q8), &out).unwrap();
    let pipeline = load_local(&out, &LoadOptions::default()).unwrap();
    assert_eq!(pipeline.unet.weight_dtype(), MatrixDtype::Q8);
    let guide = pipeline.guide_unet.as_ref().expect("the guide U-Net loads");
    assert_eq!(guide.weight_dtype(), MatrixDtype::Q8);
    let files = |dir: &Path| {
        let mut names: Vec<String> = walk(dir)
            .into_iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(&out), files(&root));
}

/// A q8 folder whose int8 weight lacks its scales, or has scales of the wrong shape or dtype,
/// fails to load with an error naming the tensor and the file, not a panic.
#[test]
fn a_broken_int8_weight_is_a_clear_error() {
    use safetensors::tensor::{Dtype, TensorView};
    let (tmp, root) = scratch_model();
    let q8 = tmp.path().join("q8");
    let options = LoadOptions {
        weight_dtype: MatrixDtype::Q8,
        ..Default::default()
    };
    text2img::pipeline::convert::convert_folder(&root, &options, Some(MatrixDtype::Q8), &q8)
        .unwrap();
    let file = unet_file(&q8);
    let bytes = std::fs::read(&file).unwrap();
    let scale = "conv_in.weight_scale";
    let rewrite = |replace: Option<TensorView>| {
        let stored = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut views: Vec<(String, TensorView)> = stored
            .tensors()
            .into_iter()
            .filter(|(name, _)| name != scale)
            .collect();
        views.extend(replace.map(|v| (scale.to_string(), v)));
        std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
        load_error(&q8)
    };
    let err = rewrite(None);
    assert!(err.contains(scale), "{err}");
    let data = vec![0u8; 4 * 3];
    let err = rewrite(Some(TensorView::new(Dtype::F32, vec![3], &data).unwrap()));
    assert!(
        err.contains(scale) && err.contains("one scale per row"),
        "{err}"
    );
    let data = vec![0u8; 2 * 32];
    let err = rewrite(Some(TensorView::new(Dtype::F16, vec![32], &data).unwrap()));
    assert!(err.contains(scale) && err.contains("f32"), "{err}");
}
