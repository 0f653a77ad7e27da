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
    image_sized(pipeline, None)
}

/// The test image at `size` x `size` (`None`: the model's default size).
fn image_sized(pipeline: &Pipeline, size: Option<usize>) -> Vec<u8> {
    let request = GenerateRequest {
        prompts: vec!["a red circle".into()],
        negative_prompts: Some(vec!["blurry".into()]),
        seed: Some(7),
        steps: Some(3),
        width: size,
        height: size,
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

/// `convert` writes a diffusers folder that loads to the same image (the SDXL refiner's one
/// encoder in its own slot, `text_encoder_2`; scripts/check-convert
/// checks the same folders with diffusers); a failed conversion leaves nothing behind.
#[test]
fn convert_writes_a_folder_with_the_same_image() {
    use text2img::pipeline::single_file::convert_single_file;
    let dir = tempfile::tempdir().unwrap();
    for name in ["sd2-tiny", "sdxl-tiny", "sdxl-refiner-tiny"] {
        let out = dir.path().join(name);
        convert_single_file(&checkpoint(name), &options(Some(name)), None, &out).unwrap();
        let converted = load_local(&out, &LoadOptions::default()).unwrap();
        let folder = load_local(&model_dir(name), &LoadOptions::default()).unwrap();
        assert!(image(&converted) == image(&folder), "{name}");
    }
    let taken = dir.path().join("sd2-tiny");
    let err = convert_single_file(
        &checkpoint("sd2-tiny"),
        &options(Some("sd2-tiny")),
        None,
        &taken,
    );
    assert!(err.unwrap_err().to_string().contains("already exists"));
    let out = dir.path().join("evil");
    let err = convert_single_file(
        &checkpoint_file("evil.ckpt"),
        &options(Some("sd1-tiny")),
        None,
        &out,
    );
    assert!(err.is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
}

/// `convert --dtype q8` stores the weight matrices and kernels as int8 with a scale per output
/// channel (the other tensors stay as stored): the folder loads (with no `--dtype`) to the
/// image of the checkpoint loaded with `--dtype q8`, bit for bit, with a U-Net file of little
/// more than half the bf16 one; `--dtype bf16` likewise gives `--dtype bf16`'s image. Neither
/// is the image of the checkpoint's own f16 weights.
#[test]
fn convert_to_q8_writes_int8_weights_that_load_as_they_were_quantized() {
    use text2img::pipeline::single_file::convert_single_file;
    use text2img::weights::MatrixDtype;
    let dir = tempfile::tempdir().unwrap();
    let name = "sdxl-tiny";
    let as_dtype = |dtype| {
        let mut o = options(Some(name));
        o.load.weight_dtype = dtype;
        o
    };
    let unet_file = |dir: &Path| dir.join("unet/diffusion_pytorch_model.safetensors");
    let f32_image =
        image(&Pipeline::load_single_file(&checkpoint(name), &options(Some(name))).unwrap());
    for dtype in [MatrixDtype::Q8, MatrixDtype::Bf16] {
        let out = dir.path().join(dtype.name());
        convert_single_file(&checkpoint(name), &as_dtype(dtype), Some(dtype), &out).unwrap();
        let converted = image(&load_local(&out, &LoadOptions::default()).unwrap());
        let quantized =
            image(&Pipeline::load_single_file(&checkpoint(name), &as_dtype(dtype)).unwrap());
        assert!(
            converted == quantized,
            "{dtype:?}: the converted folder's image differs"
        );
        assert!(
            converted != f32_image,
            "{dtype:?}: the checkpoint's own image"
        );
        let bytes = std::fs::read(unet_file(&out)).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().clone().unwrap_or_default();
        assert_eq!(
            metadata.get("text2img.matrices").map(String::as_str),
            Some(dtype.name()),
            "the header names the matrices' dtype"
        );
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let conv = file.tensor("conv_in.weight").unwrap();
        let scale = file.tensor("conv_in.weight_scale");
        let norm = file.tensor("conv_norm_out.weight").unwrap();
        assert_eq!(
            norm.dtype(),
            safetensors::Dtype::F16,
            "norms stay as stored (f16)"
        );
        if dtype == MatrixDtype::Q8 {
            assert_eq!(conv.dtype(), safetensors::Dtype::I8);
            assert_eq!(scale.unwrap().shape(), &conv.shape()[..1]);
        } else {
            assert_eq!(conv.dtype(), safetensors::Dtype::BF16);
            assert!(scale.is_err());
        }
    }
    let size = |dtype: MatrixDtype| {
        std::fs::metadata(unet_file(&dir.path().join(dtype.name())))
            .unwrap()
            .len() as f64
    };
    let ratio = size(MatrixDtype::Q8) / size(MatrixDtype::Bf16);
    eprintln!("q8 / bf16 U-Net file: {ratio:.3}");
    assert!(ratio < 0.6, "{ratio}");
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

fn yaml_fixture(name: &str) -> PathBuf {
    model_dir("single-file").join("yamls").join(name)
}

/// diffusers' configs for each released yaml (and the tiny one), written by
/// scripts/fixtures/original_yaml.py with `create_unet_diffusers_config_from_ldm` and friends.
fn diffusers_configs() -> serde_json::Value {
    let text = std::fs::read_to_string(yaml_fixture("diffusers-configs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every key diffusers derives from a yaml (but the sample size, which it takes from the
/// checkpoint's type), text2img derives alike; and 32 groups in every norm, the original
/// code's constant. The released yamls describe exactly the built-in configs.
#[test]
fn the_released_yamls_describe_what_diffusers_derives() {
    use text2img::weights::single_file::original_config::OriginalConfig;
    let configs = diffusers_configs();
    for (name, built_in) in [
        ("v1-inference", "sd1"),
        ("v2-inference-v", "sd2"),
        ("sd_xl_base", "sdxl"),
        ("sd_xl_refiner", "sdxl-refiner"),
        ("yaml-sd1-tiny", ""),
    ] {
        let path = match built_in {
            "" => checkpoint_file("yaml-sd1-tiny.yaml"),
            _ => yaml_fixture(&format!("{name}.yaml")),
        };
        let yaml = OriginalConfig::read(&path).unwrap().architecture;
        for (part, derived) in [
            ("unet", yaml.unet.as_ref()),
            ("vae", yaml.vae.as_ref()),
            ("scheduler", yaml.scheduler.as_ref()),
        ] {
            let derived = derived.unwrap_or_else(|| panic!("{name}: no {part} read"));
            let want = configs[name][part].as_object().unwrap();
            for (key, value) in want {
                if key == "sample_size" {
                    continue;
                }
                assert_eq!(derived.get(key), Some(value), "{name} {part}.{key}");
            }
            if part != "scheduler" {
                assert_eq!(derived["norm_num_groups"], 32, "{name} {part}");
            }
            if built_in.is_empty() {
                continue;
            }
            let file = match part {
                "scheduler" => "scheduler/scheduler_config.json".to_string(),
                _ => format!("{part}/config.json"),
            };
            let text = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("assets/configs")
                    .join(built_in)
                    .join(&file),
            )
            .unwrap();
            let released: serde_json::Value = serde_json::from_str(&text).unwrap();
            for (key, value) in derived {
                // A key the released file leaves out has diffusers' default.
                let default = match key.as_str() {
                    "transformer_layers_per_block" => serde_json::json!(1),
                    "use_linear_projection" => serde_json::json!(false),
                    _ => serde_json::Value::Null,
                };
                let is = released.get(key).unwrap_or(&default);
                assert_eq!(is, value, "{name}: built-in {built_in}/{file} {key}");
            }
        }
    }
}

/// A checkpoint whose architecture no built-in config has (two attention levels of two
/// transformer layers, one resnet per level, its own schedule and latent scale) loads with its
/// yaml: the image of the same file loaded through the configs diffusers derives from that
/// yaml. Without the yaml it does not load; with a yaml saying another head count it loads
/// to another image. `--config` gives only what a yaml does not describe (the text encoder
/// and tokenizer of the tiny model).
#[test]
fn a_yaml_describes_an_architecture_no_built_in_config_has() {
    let file = checkpoint("yaml-sd1-tiny");
    let yaml = checkpoint_file("yaml-sd1-tiny.yaml");
    // The size is given: diffusers' derived configs default to 512x512.
    let small = |pipeline: &Pipeline| image_sized(pipeline, Some(64));
    let with_yaml = |yaml: &Path| SingleFileOptions {
        original_config: Some(yaml.to_path_buf()),
        ..options(Some("sd1-tiny"))
    };
    let from_yaml = small(&Pipeline::load_single_file(&file, &with_yaml(&yaml)).unwrap());

    // The same weights through diffusers' configs of the yaml.
    let dir = tempfile::tempdir().unwrap();
    let configs = diffusers_configs();
    let tiny = model_dir("sd1-tiny");
    for part in ["text_encoder", "tokenizer"] {
        std::fs::create_dir_all(dir.path().join(part)).unwrap();
        for entry in std::fs::read_dir(tiny.join(part)).unwrap() {
            let entry = entry.unwrap().path();
            if entry.extension().is_some_and(|e| e == "json" || e == "txt") {
                std::fs::copy(
                    &entry,
                    dir.path().join(part).join(entry.file_name().unwrap()),
                )
                .unwrap();
            }
        }
    }
    std::fs::copy(
        tiny.join("model_index.json"),
        dir.path().join("model_index.json"),
    )
    .unwrap();
    for (part, file) in [
        ("unet", "unet/config.json"),
        ("vae", "vae/config.json"),
        ("scheduler", "scheduler/scheduler_config.json"),
    ] {
        // diffusers' keys over the tiny folder's file, as text2img sets the yaml's; groups
        // are diffusers' default (32) where the yaml has no say.
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tiny.join(file)).unwrap()).unwrap();
        for (key, value) in configs["yaml-sd1-tiny"][part].as_object().unwrap() {
            config[key] = value.clone();
        }
        if part != "scheduler" {
            config["norm_num_groups"] = 32.into();
        }
        let path = dir.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, config.to_string()).unwrap();
    }
    let through_diffusers = SingleFileOptions {
        config: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let reference = small(&Pipeline::load_single_file(&file, &through_diffusers).unwrap());
    assert!(
        from_yaml == reference,
        "the yaml's image differs from diffusers' configs'"
    );

    // Converted with the yaml: a folder that loads to the same image.
    let out = dir.path().join("converted");
    text2img::pipeline::single_file::convert_single_file(&file, &with_yaml(&yaml), None, &out)
        .unwrap();
    let converted = load_local(&out, &LoadOptions::default()).unwrap();
    assert!(
        small(&converted) == from_yaml,
        "the converted folder differs"
    );

    // The yaml beside the file (A1111's NAME.yaml) is read without being named.
    let beside = small(&Pipeline::load_single_file(&file, &options(Some("sd1-tiny"))).unwrap());
    assert!(
        beside == from_yaml,
        "NAME.yaml beside the file was not read"
    );

    // Near misses: no yaml (the released sizes do not fit), and another head count.
    let alone = dir.path().join("alone.safetensors");
    std::fs::copy(&file, &alone).unwrap();
    let err = load_error(&alone, &options(Some("sd1-tiny")));
    assert!(err.contains("--original-config"), "{err}");
    let two_heads = dir.path().join("one-head.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    assert!(text.contains("num_heads: 2"));
    std::fs::write(&two_heads, text.replace("num_heads: 2", "num_heads: 1")).unwrap();
    let other = small(&Pipeline::load_single_file(&file, &with_yaml(&two_heads)).unwrap());
    assert!(
        other != from_yaml,
        "the yaml's head count made no difference"
    );
    // A yaml whose layers do not fit the file: refused, naming the yaml.
    let wide = dir.path().join("wide.yaml");
    std::fs::write(
        &wide,
        text.replace("channel_mult: [ 1, 2, 2 ]", "channel_mult: [ 1, 2, 4 ]"),
    )
    .unwrap();
    let err = load_error(&file, &with_yaml(&wide));
    assert!(
        err.contains("wide.yaml") && err.contains("does not describe"),
        "{err}"
    );
}
