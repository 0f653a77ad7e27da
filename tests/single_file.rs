//! Single-file checkpoints in the original layouts (made by scripts/fixtures/single_file.py
//! from the tiny folders, and checked there with diffusers' `from_single_file`): the same
//! images as the folders, bit for bit; the EMA copy only when asked; anything that is not such
//! a checkpoint refused with what it looks like.

mod parity;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use parity::model_dir;
use text2img::latent::schedulers::SchedulerKind;
use text2img::pipeline::{load_local, GenerateRequest, LoadOptions, Pipeline, SingleFileOptions};

fn checkpoint(name: &str) -> PathBuf {
    model_dir("single-file").join(format!("{name}.safetensors"))
}

fn checkpoint_file(file: &str) -> PathBuf {
    model_dir("single-file").join(file)
}

fn options(config: Option<&str>) -> SingleFileOptions {
    SingleFileOptions {
        config: config.map(model_dir),
        ..Default::default()
    }
}

fn image(pipeline: &Pipeline) -> Vec<u8> {
    let request = GenerateRequest {
        prompts: vec!["a red circle".into()],
        negative_prompts: Some(vec!["blurry".into()]),
        seed: Some(7),
        steps: Some(3),
        scheduler: Some(SchedulerKind::Euler),
        ..Default::default()
    };
    let generation = pipeline.generate(&request, &mut |_| true).unwrap();
    generation.images[0].rgb.clone()
}

fn load_error(path: &Path, options: &SingleFileOptions) -> String {
    match Pipeline::load_single_file(path, options) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn each_layout_gives_the_folders_image_bit_for_bit() {
    for (name, arch) in [
        ("sd1-tiny", "Sd1"),
        ("sd2-tiny", "Sd2"),
        ("sdxl-tiny", "Sdxl"),
        ("sdxl-refiner-tiny", "SdxlRefiner"),
    ] {
        let single = Pipeline::load_single_file(&checkpoint(name), &options(Some(name))).unwrap();
        let folder = load_local(&model_dir(name), &LoadOptions::default()).unwrap();
        assert_eq!(single.family, folder.family, "{name}");
        assert!(
            image(&single) == image(&folder),
            "{name}: the images differ"
        );
        let opened = text2img::weights::single_file::Checkpoint::open(
            &checkpoint(name),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(format!("{:?}", opened.architecture), arch);
        assert!(!opened.inpainting);
    }
}

#[test]
fn the_ema_copy_loads_only_when_asked() {
    // The fixture's EMA copy is the U-Net's weights halved: a different image.
    let plain = Pipeline::load_single_file(&checkpoint("sd1-tiny"), &options(Some("sd1-tiny")));
    let ema = Pipeline::load_single_file(
        &checkpoint("sd1-tiny"),
        &SingleFileOptions {
            ema: true,
            ..options(Some("sd1-tiny"))
        },
    );
    let folder = load_local(&model_dir("sd1-tiny"), &LoadOptions::default()).unwrap();
    assert!(image(&plain.unwrap()) == image(&folder));
    assert!(image(&ema.unwrap()) != image(&folder));
    let no_ema = load_error(
        &checkpoint("sd2-tiny"),
        &SingleFileOptions {
            ema: true,
            ..options(Some("sd2-tiny"))
        },
    );
    assert!(no_ema.contains("no EMA copy"), "{no_ema}");
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn write(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

#[test]
fn what_is_not_a_checkpoint_is_refused_with_what_it_looks_like() {
    let dir = tempfile::tempdir().unwrap();
    let full = read(&checkpoint("sd1-tiny"));
    let cases: Vec<(&str, HashMap<String, Tensor>, &str)> = vec![
        (
            "lora.safetensors",
            [(
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
                Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            )]
            .into(),
            "a LoRA",
        ),
        (
            "unet-alone.safetensors",
            read(&model_dir("sd1-tiny").join("unet/diffusion_pytorch_model.safetensors")),
            "a diffusers-layout U-Net alone",
        ),
        (
            "no-vae.safetensors",
            full.iter()
                .filter(|(k, _)| !k.starts_with("first_stage_model."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            "has no VAE",
        ),
        (
            "extra.safetensors",
            full.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([(
                    "model.diffusion_model.extra_head.weight".to_string(),
                    Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
                )])
                .collect(),
            "model.diffusion_model.extra_head.weight",
        ),
        (
            "missing.safetensors",
            full.iter()
                .filter(|(k, _)| !k.ends_with("middle_block.1.proj_out.weight"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            "mid_block.attentions.0.proj_out.weight",
        ),
    ];
    for (file, tensors, expected) in cases {
        let path = write(dir.path(), file, &tensors);
        let err = load_error(&path, &options(Some("sd1-tiny")));
        assert!(err.contains(expected), "{file}: {err}");
    }
    // Without --config, a file that is not the released architecture says so.
    let err = load_error(&checkpoint("sd1-tiny"), &options(None));
    assert!(err.contains("--config"), "{err}");
    // A pickle that is no zip (PyTorch's legacy format), a truncated archive; not checkpoints.
    let legacy = dir.path().join("legacy.ckpt");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    assert!(load_error(&legacy, &options(None)).contains("legacy"));
    let truncated = dir.path().join("truncated.ckpt");
    let bytes = std::fs::read(checkpoint_file("sd1-tiny.ckpt")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_error(&truncated, &options(None)).contains("zip"));
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"hello").unwrap();
    assert!(load_error(&text, &options(None)).contains("not a checkpoint"));
}

/// A PyTorch checkpoint (a zip holding a pickled `state_dict`) loads without running its
/// pickle, to the same image; one whose pickle would run a command is refused before any
/// tensor is read, naming the global, and the command does not run.
#[test]
fn pickled_checkpoints_are_read_and_never_run() {
    let ckpt = Pipeline::load_single_file(
        &checkpoint_file("sd1-tiny.ckpt"),
        &options(Some("sd1-tiny")),
    )
    .unwrap();
    let folder = load_local(&model_dir("sd1-tiny"), &LoadOptions::default()).unwrap();
    assert!(
        image(&ckpt) == image(&folder),
        "the .ckpt gives another image"
    );

    let marker = Path::new("text2img-pickle-ran");
    let err = load_error(&checkpoint_file("evil.ckpt"), &options(Some("sd1-tiny")));
    assert!(err.contains("system`") && err.contains("refused"), "{err}");
    assert!(!marker.exists(), "the pickle's command ran");
}

/// `convert` writes a diffusers folder that loads to the same image (scripts/check-convert
/// checks the same folders with diffusers); a failed conversion leaves nothing behind.
#[test]
fn convert_writes_a_folder_with_the_same_image() {
    use text2img::pipeline::single_file::convert_single_file;
    let dir = tempfile::tempdir().unwrap();
    for name in ["sd2-tiny", "sdxl-tiny"] {
        let out = dir.path().join(name);
        convert_single_file(&checkpoint(name), &options(Some(name)), &out).unwrap();
        let converted = load_local(&out, &LoadOptions::default()).unwrap();
        let folder = load_local(&model_dir(name), &LoadOptions::default()).unwrap();
        assert!(image(&converted) == image(&folder), "{name}");
    }
    let taken = dir.path().join("sd2-tiny");
    let err = convert_single_file(&checkpoint("sd2-tiny"), &options(Some("sd2-tiny")), &taken);
    assert!(err.unwrap_err().to_string().contains("already exists"));
    let out = dir.path().join("evil");
    let err = convert_single_file(
        &checkpoint_file("evil.ckpt"),
        &options(Some("sd1-tiny")),
        &out,
    );
    assert!(err.is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// The original yaml beside a checkpoint (A1111's NAME.yaml) or named by --original-config:
/// its `parameterization: "v"` makes the file v-prediction (the image of
/// `--prediction-type v_prediction`, not the epsilon one); a yaml for another model is refused.
#[test]
fn the_original_yaml_sets_the_prediction_type() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sd2-fine-tune.safetensors");
    std::fs::copy(checkpoint("sd2-tiny"), &file).unwrap();
    let yaml = |parameterization: &str, channels: usize| {
        format!(
            "model:\n  params:\n    parameterization: \"{parameterization}\"\n    unet_config:\n      params:\n        model_channels: {channels}\n        context_dim: 32\n"
        )
    };
    let with = |prediction: &str| {
        let options = SingleFileOptions {
            prediction_type: Some(prediction.into()),
            ..options(Some("sd2-tiny"))
        };
        image(&Pipeline::load_single_file(&file, &options).unwrap())
    };
    let (v, eps) = (with("v_prediction"), with("epsilon"));
    assert!(v != eps);
    // Beside the file.
    std::fs::write(file.with_extension("yaml"), yaml("v", 32)).unwrap();
    let beside = Pipeline::load_single_file(&file, &options(Some("sd2-tiny"))).unwrap();
    assert!(
        image(&beside) == v,
        "NAME.yaml's v-prediction was not applied"
    );
    std::fs::write(file.with_extension("yaml"), yaml("eps", 32)).unwrap();
    let beside = Pipeline::load_single_file(&file, &options(Some("sd2-tiny"))).unwrap();
    assert!(image(&beside) == eps);
    // Named, over the one beside.
    let named = dir.path().join("other.yaml");
    std::fs::write(&named, yaml("v", 32)).unwrap();
    let options_named = SingleFileOptions {
        original_config: Some(named.clone()),
        ..options(Some("sd2-tiny"))
    };
    assert!(image(&Pipeline::load_single_file(&file, &options_named).unwrap()) == v);
    // For another model: refused, naming both widths.
    std::fs::write(&named, yaml("v", 320)).unwrap();
    let err = load_error(&file, &options_named);
    assert!(
        err.contains("320 wide") && err.contains("another model"),
        "{err}"
    );
}
