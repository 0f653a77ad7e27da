//! AUTOMATIC1111's prompt syntax (weights, BREAK, long prompts in chunks, a negative prompt of
//! another length) against diffusers given the conditioning A1111's algorithm makes
//! (scripts/fixtures/prompt_syntax.py). Each case must match at the parity threshold, and the
//! same prompt read plainly must not.

mod parity;

use std::path::Path;

use parity::{copy_dir, fixtures, model_dir, psnr, read_png};
use serde_json::Value;
use text2img::latent::schedulers::SchedulerKind;
use text2img::pipeline::{load_local, GenerateRequest, LoadOptions, PromptSyntax};

/// The bias the fixture script gives the tiny SD 1.x/2.x text encoders' final layer norm
/// (theirs is zero, which makes the mean that A1111's emphasis preserves zero).
fn patch_layer_norm_bias(model: &Path) {
    let file = model.join("text_encoder/model.safetensors");
    let device = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(&file, &device).unwrap();
    let name = ["text_model.final_layer_norm.bias", "final_layer_norm.bias"]
        .into_iter()
        .find(|n| tensors.contains_key(*n))
        .unwrap();
    let old = &tensors[name];
    let values: Vec<f32> = (0..old.dim(0).unwrap())
        .map(|i| (i % 7) as f32 * 0.25 - 0.5)
        .collect();
    let bias = candle_core::Tensor::new(values, &device)
        .unwrap()
        .to_dtype(old.dtype())
        .unwrap();
    tensors.insert(name.to_string(), bias);
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

#[test]
fn a1111_prompt_syntax_matches_its_algorithm_in_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("reference/prompt_syntax.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let root = dir.path().join(name);
        copy_dir(&model_dir(model), &root);
        if model != "sdxl-tiny" {
            patch_layer_norm_bias(&root);
        }
        let pipeline = load_local(&root, &LoadOptions::default()).unwrap();
        let request = |syntax| GenerateRequest {
            prompts: vec![case["prompt"].as_str().unwrap().to_string()],
            negative_prompts: Some(vec![case["negative_prompt"].as_str().unwrap().to_string()]),
            seed: meta["seed"].as_u64(),
            steps: Some(meta["steps"].as_u64().unwrap() as usize),
            guidance_scale: meta["guidance"].as_f64(),
            scheduler: Some(SchedulerKind::Euler),
            width: Some(64),
            height: Some(64),
            prompt_syntax: syntax,
            ..Default::default()
        };
        let (reference, ..) = read_png(
            &fixtures()
                .join("reference")
                .join(case["image"].as_str().unwrap()),
        );
        let weighted = pipeline
            .generate(&request(PromptSyntax::A1111), &mut |_| true)
            .unwrap();
        let db = psnr(&weighted.images[0].rgb, &reference);
        let plain = pipeline
            .generate(&request(PromptSyntax::Plain), &mut |_| true)
            .unwrap();
        let plain_db = psnr(&plain.images[0].rgb, &reference);
        eprintln!("{name}: {db:.1} dB; read plainly {plain_db:.1} dB");
        assert!(db >= parity::MATCH_DB, "{name}: {db:.1} dB");
        assert!(
            plain_db < 45.0,
            "{name}: the plain reading matches too ({plain_db:.1} dB)"
        );
    }
}
