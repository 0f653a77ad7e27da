//! LoRAs in kohya's (LoRA, LoCon), LyCORIS' (LoHa, LoKr) and PEFT's formats, merged as they
//! load, against scripts/fixtures/lora.py's merge of the same files (for kohya's format
//! checked there to equal diffusers' load_lora_weights + fuse_lora): the same image, and at
//! weight 0 the plain model's.

mod parity;

use parity::{fixtures, model_dir, psnr, read_png};
use serde_json::Value;
use text2img::pipeline::{load_local, LoadOptions, LoraSpec, Pipeline};

fn render(pipeline: &Pipeline) -> Vec<u8> {
    parity::render_fixture_case(pipeline, "a red circle")
}

fn with_loras(model: &str, loras: Vec<LoraSpec>) -> text2img::Result<Pipeline> {
    load_local(
        &model_dir(model),
        &LoadOptions {
            loras,
            ..Default::default()
        },
    )
}

fn spec(file: &str, text_weight: f64, unet_weight: f64) -> LoraSpec {
    LoraSpec {
        path: fixtures().join("loras").join(file),
        text_weight,
        unet_weight,
    }
}

#[test]
fn loras_merge_to_the_reference_image() {
    let text = std::fs::read_to_string(fixtures().join("reference/loras.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let (reference, ..) = read_png(
            &fixtures()
                .join("reference")
                .join(case["image"].as_str().unwrap()),
        );
        let specs = |scale: f64| -> Vec<LoraSpec> {
            case["loras"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    let w = |i: usize| l[i].as_f64().unwrap() * scale;
                    spec(l[0].as_str().unwrap(), w(1), w(2))
                })
                .collect()
        };
        let pipeline = with_loras(model, specs(1.0)).unwrap();
        assert!(
            pipeline.load_warnings.is_empty(),
            "{:?}",
            pipeline.load_warnings
        );
        let db = psnr(&render(&pipeline), &reference);
        let off = psnr(&render(&with_loras(model, specs(0.0)).unwrap()), &reference);
        eprintln!("{name}: {db:.1} dB; at weight 0 {off:.1} dB");
        assert!(db >= parity::MATCH_DB, "{name}: {db:.1} dB");
        assert!(off < 45.0, "{name}: {off:.1} dB at weight 0");
    }
}

#[test]
fn a_lora_for_another_model_is_refused_and_stray_modules_are_reported() {
    // An SDXL LoRA on an SD 1.x model: its layers have other shapes.
    let err = with_loras("sd1-tiny", vec![spec("loha-sdxl.safetensors", 1.0, 1.0)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another model"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let zeros = |s: &[usize]| {
        candle_core::Tensor::zeros(s, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap()
    };
    // One none of whose modules is a layer of the model.
    let foreign = dir.path().join("foreign.safetensors");
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = [
        (
            "lora_unet_input_blocks_99_1_proj_in.lora_down.weight".to_string(),
            zeros(&[4, 8]),
        ),
        (
            "lora_unet_input_blocks_99_1_proj_in.lora_up.weight".to_string(),
            zeros(&[8, 4]),
        ),
    ]
    .into();
    candle_core::safetensors::save(&tensors, &foreign).unwrap();
    let err = with_loras(
        "sd1-tiny",
        vec![LoraSpec {
            path: foreign,
            text_weight: 1.0,
            unet_weight: 1.0,
        }],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("none of the LoRA's"), "{err}");
    // A LoRA with one module the model lacks: loaded, with a warning that names it.
    let path = dir.path().join("stray.safetensors");
    let mut tensors = candle_core::safetensors::load(
        fixtures().join("loras/kohya-sd1.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    tensors.insert(
        "lora_unet_no_such_layer.lora_down.weight".into(),
        zeros(&[4, 8]),
    );
    tensors.insert(
        "lora_unet_no_such_layer.lora_up.weight".into(),
        zeros(&[8, 4]),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let pipeline = with_loras(
        "sd1-tiny",
        vec![LoraSpec {
            path,
            text_weight: 1.0,
            unet_weight: 1.0,
        }],
    )
    .unwrap();
    assert_eq!(pipeline.load_warnings.len(), 1);
    assert!(
        pipeline.load_warnings[0].contains("1 of its")
            && pipeline.load_warnings[0].contains("lora_unet_no_such_layer"),
        "{:?}",
        pipeline.load_warnings
    );
    // Not a LoRA.
    let err = with_loras(
        "sd1-tiny",
        vec![LoraSpec {
            path: model_dir("sd1-tiny").join("vae/diffusion_pytorch_model.safetensors"),
            text_weight: 1.0,
            unet_weight: 1.0,
        }],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("not a LoRA"), "{err}");
}

/// A server's per-request LoRAs: merged into a copy of the loaded model, they give the image
/// the same LoRAs merged at load give, pixel for pixel, and the loaded model keeps giving its
/// own image (no request's LoRA leaks into the next).
#[test]
fn loras_applied_to_a_loaded_model_equal_loras_merged_at_load() {
    let text = std::fs::read_to_string(fixtures().join("reference/loras.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    let mut plain = std::collections::HashMap::new();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let specs: Vec<LoraSpec> = case["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                spec(
                    l[0].as_str().unwrap(),
                    l[1].as_f64().unwrap(),
                    l[2].as_f64().unwrap(),
                )
            })
            .collect();
        let (loaded, before) = plain.entry(model.to_string()).or_insert_with(|| {
            let loaded = with_loras(model, Vec::new()).unwrap();
            let before = render(&loaded);
            (loaded, before)
        });
        let merged_at_load = render(&with_loras(model, specs.clone()).unwrap());
        let (copy, warnings) = loaded.with_loras(&specs).unwrap();
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        assert!(
            render(&copy) == merged_at_load,
            "{name}: the per-request LoRA image differs from the one merged at load"
        );
        drop(copy);
        assert!(
            render(loaded) == *before,
            "{name}: the loaded model changed after a per-request LoRA"
        );
        assert!(
            merged_at_load != *before,
            "{name}: the LoRA changed nothing"
        );
    }
    // For another architecture: refused, as at load.
    let (loaded, _) = &plain["sd1-tiny"];
    let err = loaded
        .with_loras(&[spec("loha-sdxl.safetensors", 1.0, 1.0)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another model"), "{err}");
}

/// A DoRA LoRA without its decomposition (its `dora_scale` or `lora_magnitude_vector`
/// tensors dropped) is a plain LoRA, and misses the reference: the scales are applied, not
/// skipped. PEFT's magnitudes under their newer name (`lora_magnitude_vector.weight`) give
/// the same image.
#[test]
fn dora_without_its_scales_misses_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    for (file, image, scale_suffix, weight) in [
        (
            "dora-sd1.safetensors",
            "lora-sd1-dora.png",
            ".dora_scale",
            0.8,
        ),
        (
            "peft-dora-sd1.safetensors",
            "lora-sd1-peft-dora.png",
            ".lora_magnitude_vector",
            0.7,
        ),
    ] {
        let tensors = candle_core::safetensors::load(
            fixtures().join("loras").join(file),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (reference, ..) = read_png(&fixtures().join("reference").join(image));
        let render_file = |tensors: &std::collections::HashMap<String, candle_core::Tensor>| {
            let path = dir.path().join(file);
            candle_core::safetensors::save(tensors, &path).unwrap();
            let pipeline = with_loras(
                "sd1-tiny",
                vec![LoraSpec {
                    path,
                    text_weight: weight,
                    unet_weight: weight,
                }],
            )
            .unwrap();
            psnr(&render(&pipeline), &reference)
        };
        let mut plain = tensors.clone();
        plain.retain(|k, _| !k.ends_with(scale_suffix));
        assert!(plain.len() < tensors.len());
        let db = render_file(&plain);
        eprintln!("{file} without {scale_suffix}: {db:.1} dB");
        assert!(db < 45.0, "{file}: {db:.1} dB");
        if scale_suffix == ".lora_magnitude_vector" {
            let renamed: std::collections::HashMap<_, _> = tensors
                .into_iter()
                .map(|(k, v)| match k.strip_suffix(scale_suffix) {
                    Some(stem) => (format!("{stem}{scale_suffix}.weight"), v),
                    None => (k, v),
                })
                .collect();
            let db = render_file(&renamed);
            assert!(db >= parity::MATCH_DB, "{file} renamed: {db:.1} dB");
        }
    }
}
