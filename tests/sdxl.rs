//! Stable Diffusion XL (two text encoders, text_time conditioning) and the few-step models
//! (SDXL-Turbo-style euler-a with trailing spacing, LCM with its guidance embedding) against
//! diffusers' tiny random SDXL pipeline (scripts/fixtures/sdxl.py): components within 1e-4 of
//! max|ref|, images >= 65 dB (parity::MATCH_DB).

mod parity;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use text2img::latent::schedulers::{SchedulerKind, TimestepSpacing};
use text2img::latent::unet::embeddings::guidance_scale_embedding;
use text2img::latent::unet::{ExtraConditions, UNet};
use text2img::pipeline::{
    load_local, Family, GenerateRequest, GuidanceInterval, Pipeline, StepControl,
};
use text2img::text::clip::ClipTextModel;

use parity::{assert_close, check_cases, copy_dir, fixtures, model_dir};

fn reference(name: &str) -> Tensor {
    let path = fixtures().join("reference/sdxl/components.safetensors");
    let all = candle_core::safetensors::load(&path, &Device::Cpu).expect("reference tensors load");
    all.get(name)
        .unwrap_or_else(|| panic!("no reference tensor {name}"))
        .clone()
}

fn ids(name: &str) -> Vec<Vec<u32>> {
    let t = reference(name).to_dtype(DType::I64).unwrap();
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

fn cases() -> &'static Vec<Value> {
    static CASES: OnceLock<Vec<Value>> = OnceLock::new();
    CASES.get_or_init(|| {
        let path = fixtures().join("reference/sdxl/cases.json");
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        meta["cases"].as_array().unwrap().clone()
    })
}

/// The LCM model: sdxl-tiny with the LCM U-Net and scheduler laid over it (as a user who
/// swaps them in diffusers and saves the pipeline gets).
fn lcm_folder() -> &'static Path {
    // In cargo's scratch folder inside target/ (a static TempDir would never be removed),
    // rebuilt once per run.
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdxl-lcm");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        copy_dir(&model_dir("sdxl-tiny"), &dir);
        for part in ["unet", "scheduler"] {
            std::fs::remove_dir_all(dir.join(part)).unwrap();
            copy_dir(&model_dir("sdxl-lcm-tiny-unet").join(part), &dir.join(part));
        }
        let index_path = dir.join("model_index.json");
        let mut index: Value =
            serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
        index["scheduler"] = serde_json::json!(["diffusers", "LCMScheduler"]);
        std::fs::write(&index_path, index.to_string()).unwrap();
        dir
    })
}

fn pipeline(model: &str) -> &'static Pipeline {
    static TINY: OnceLock<Pipeline> = OnceLock::new();
    static LCM: OnceLock<Pipeline> = OnceLock::new();
    match model {
        "sdxl-tiny" => {
            TINY.get_or_init(|| load_local(&model_dir("sdxl-tiny"), &Default::default()).unwrap())
        }
        "sdxl-lcm" => LCM.get_or_init(|| load_local(lcm_folder(), &Default::default()).unwrap()),
        other => panic!("unknown model {other}"),
    }
}

fn request(case: &Value) -> GenerateRequest {
    let s = |k: &str| case.get(k).and_then(Value::as_str).map(str::to_string);
    let mut prompts = vec![s("prompt").unwrap()];
    prompts.extend(s("prompt_2"));
    let negative_prompts = match (s("negative_prompt"), s("negative_prompt_2")) {
        (None, None) => None,
        (a, b) => Some(std::iter::once(a.unwrap_or_default()).chain(b).collect()),
    };
    GenerateRequest {
        prompts,
        negative_prompts,
        seed: Some(case["seed"].as_u64().unwrap()),
        steps: Some(case["steps"].as_u64().unwrap() as usize),
        guidance_scale: Some(case["guidance"].as_f64().unwrap()),
        scheduler: s("scheduler").map(|k| SchedulerKind::from_cli_name(&k).unwrap()),
        timestep_spacing: s("timestep_spacing").map(|t| TimestepSpacing::parse(&t).unwrap()),
        width: Some(case["width"].as_u64().unwrap() as usize),
        height: Some(case["height"].as_u64().unwrap() as usize),
        num_images: case.get("num_images").and_then(Value::as_u64).unwrap_or(1) as usize,
        ..Default::default()
    }
}

fn check(prefix: &str) {
    check_cases(
        cases(),
        prefix,
        &fixtures().join("reference/sdxl"),
        |case| {
            pipeline(case["model"].as_str().unwrap())
                .generate(&request(case), &mut |_| true)
                .unwrap()
                .images
        },
    );
}

#[test]
fn text_encoders_penultimate_states_and_pooled_projection() {
    let dir = model_dir("sdxl-tiny");
    for (i, folder) in [(1, "text_encoder"), (2, "text_encoder_2")] {
        let model = ClipTextModel::load(&dir.join(folder), None, &Device::Cpu).unwrap();
        let ids = ids(&format!("te{i}.ids"));
        let mut hidden = model.hidden_state_list(&ids, model.num_layers()).unwrap();
        let last = hidden.pop().unwrap();
        assert_close(
            &format!("te{i} hidden_states[-2]"),
            hidden.last().unwrap(),
            &reference(&format!("te{i}.penultimate")),
        );
        if i == 2 {
            let normed = model.final_layer_norm(&last).unwrap();
            let embeds = model.text_embeds(&ids, &normed).unwrap();
            assert_close("te2 text_embeds", &embeds, &reference("te2.text_embeds"));
        }
    }
}

#[test]
fn unet_with_text_time_and_guidance_embedding() {
    let unet = UNet::load(&model_dir("sdxl-tiny/unet"), None, &Device::Cpu).unwrap();
    for size in ["8x8", "9x7"] {
        let key = format!("unet.{size}");
        let text_embeds = reference(&format!("{key}.text_embeds"));
        let time_ids = reference(&format!("{key}.time_ids"));
        let extra = ExtraConditions {
            text_time: Some((&text_embeds, &time_ids)),
            timestep_cond: None,
            control: None,
        };
        let out = unet
            .forward_conditioned(
                &reference(&format!("{key}.sample")),
                &[421.0, 421.0],
                &reference(&format!("{key}.context")),
                &extra,
            )
            .unwrap();
        assert_close(&key, &out, &reference(&format!("{key}.out")));
    }
    // Without the added conditioning the SDXL U-Net refuses, naming what is missing.
    let err = unet
        .forward(
            &reference("unet.8x8.sample"),
            421.0,
            &reference("unet.8x8.context"),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("pooled text embedding"), "{err}");

    let embedding = guidance_scale_embedding(&[7.5, 2.0], 16, &Device::Cpu).unwrap();
    assert_close(
        "guidance embedding",
        &embedding,
        &reference("lcm.guidance_embedding"),
    );
    let lcm = UNet::load(&model_dir("sdxl-lcm-tiny-unet/unet"), None, &Device::Cpu).unwrap();
    let (text_embeds, time_ids) = (
        reference("unet.8x8.text_embeds"),
        reference("unet.8x8.time_ids"),
    );
    let out = lcm
        .forward_conditioned(
            &reference("unet.8x8.sample"),
            &[421.0, 421.0],
            &reference("unet.8x8.context"),
            &ExtraConditions {
                text_time: Some((&text_embeds, &time_ids)),
                timestep_cond: Some(&embedding),
                control: None,
            },
        )
        .unwrap();
    assert_close("lcm unet", &out, &reference("lcm.unet.out"));
}

#[test]
fn the_family_is_read_from_the_folder() {
    assert_eq!(pipeline("sdxl-tiny").family, Family::StableDiffusionXl);
    assert_eq!(pipeline("sdxl-tiny").vae.scaling_factor(), 0.13025);
    // A layout text2img does not run yet is refused by name.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sd3");
    copy_dir(&model_dir("sdxl-tiny"), &dir);
    let index = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("StableDiffusionXLPipeline", "StableDiffusion3Pipeline");
    std::fs::write(&index, text).unwrap();
    let err = load_local(&dir, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("StableDiffusion3Pipeline") && err.contains("not supported yet"),
        "{err}"
    );
}

#[test]
fn sdxl_one_prompt_zero_negative() {
    check("sdxl-euler");
}
#[test]
fn sdxl_two_prompts_and_negative_prompts() {
    check("sdxl-two-prompts");
    check("sdxl-negative-2");
    check("sdxl-empty-negative");
}
#[test]
fn sdxl_non_square() {
    check("sdxl-72x56");
}
#[test]
fn sdxl_ddim_and_two_images() {
    check("sdxl-ddim");
    check("sdxl-two-images");
}
#[test]
fn sdxl_turbo_style_trailing_euler_a_one_and_four_steps() {
    check("sdxl-turbo");
}
#[test]
fn lcm_unet_with_guidance_embedding_and_lcm_scheduler() {
    check("sdxl-lcm");
}

/// Guidance confined to the first half of the steps: the later steps run the conditional half
/// of the batch alone, its text embeddings and time ids included. Stopped after the guided
/// steps, such a run equals a fully guided one stopped there; run to the end, it differs.
#[test]
fn sdxl_guidance_interval_runs_the_conditional_half_alone_late() {
    let pipe = pipeline("sdxl-tiny");
    let full = GenerateRequest {
        prompts: vec!["a red circle on a blue background".into()],
        seed: Some(42),
        steps: Some(4),
        guidance_scale: Some(5.0),
        scheduler: Some(SchedulerKind::Euler),
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    let early = GenerateRequest {
        guidance_interval: Some(GuidanceInterval::new(0.0, 0.5).unwrap()),
        ..full.clone()
    };
    let run = |req: &GenerateRequest, steps: usize| {
        let generation = pipe
            .generate_controlled(req, &mut |p| {
                if p.step >= steps {
                    StepControl::Finish
                } else {
                    StepControl::Continue
                }
            })
            .unwrap();
        assert_eq!(generation.completed_steps, steps);
        generation.images[0].rgb.clone()
    };
    assert_eq!(run(&full, 2), run(&early, 2));
    assert_ne!(run(&full, 4), run(&early, 4));
}

/// The SDXL probes (sdxl-euler with the second prompt or the guidance nudged) run through
/// text2img fall below 45 dB of sdxl-euler's diffusers image, which the true settings reach.
#[test]
fn sdxl_probes_fall_below_the_threshold() {
    let truth = cases().iter().find(|c| c["name"] == "sdxl-euler").unwrap();
    let dir = fixtures().join("reference/sdxl");
    let (reference, ..) = parity::read_png(&dir.join(truth["images"][0].as_str().unwrap()));
    let render = |case: &Value| {
        pipeline("sdxl-tiny")
            .generate(&request(case), &mut |_| true)
            .unwrap()
            .images[0]
            .rgb
            .clone()
    };
    assert!(parity::psnr(&render(truth), &reference) >= parity::MATCH_DB);
    let probes: Vec<&Value> = cases()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("sdxl-probe-"))
        .collect();
    assert_eq!(probes.len(), 2, "the probe cases are missing");
    for probe in probes {
        let db = parity::psnr(&render(probe), &reference);
        eprintln!("{}: {db:.1} dB against sdxl-euler", probe["name"]);
        assert!(db < 45.0, "{}: {db:.1} dB", probe["name"]);
    }
}
