//! The schedulers against diffusers 0.42.1 (tests/fixtures/schedulers, made by
//! scripts/fixtures/schedulers.py): resolved configs, timesteps, init_noise_sigma and whole
//! trajectories of a fake model, step by step, including the noise the noisy schedulers draw
//! from the generators.

mod common;

use candle_core::{Device, Tensor};
use serde_json::Value;
use text2img::latent::schedulers::*;
use text2img::rng::{BatchGenerator, NormalKernel};

/// Per-step tolerance: max |ours - reference| <= REL_TOL * max |reference|.
const REL_TOL: f64 = 1e-4;

fn kind_fixture(kind: SchedulerKind) -> Value {
    common::read_fixture(&format!("schedulers/{}.json", kind.cli_name()))
}

/// The fake model of the fixture maker: 0.3 * scaled + 0.1 * sin(t / 100 + arange), in f32.
fn fake_model(scaled: &Tensor, t: f64) -> Tensor {
    let values = scaled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let t = t as f32 / 100.0;
    let out: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(k, v)| 0.3f32 * v + 0.1f32 * (t + k as f32).sin())
        .collect();
    Tensor::from_vec(out, scaled.dims(), scaled.device()).unwrap()
}

fn kernel_of(fixture: &Value) -> NormalKernel {
    match fixture["torch_cpu_capability"].as_str() {
        Some("AVX2") => NormalKernel::Avx2,
        _ => NormalKernel::Scalar,
    }
}

/// Compares two JSON config values: numbers numerically, "inf"-strings as such.
fn same_value(ours: &Value, reference: &Value) -> bool {
    match (ours, reference) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_value(x, y))
        }
        _ => ours == reference,
    }
}

/// Integer timesteps must be equal; fractional ones (Euler's) may differ in the last bits of
/// the float32 value, because torch's float32 `sqrt` (MKL) is not correctly rounded and the
/// sigmas they are interpolated from differ by an ulp.
fn check_timesteps(ours: &[f64], reference: &[f64], what: &str) {
    assert_eq!(
        ours.len(),
        reference.len(),
        "{what}: timesteps {ours:?} vs {reference:?}"
    );
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        if b.fract() == 0.0 && a.fract() == 0.0 {
            assert_eq!(a, b, "{what}: timestep {i}: {ours:?} vs {reference:?}");
        } else {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: timestep {i}: {a} vs {b}"
            );
        }
    }
}

fn check_config(kind: SchedulerKind, case: &Value, init_keys: &[&str]) {
    let name = case["name"].as_str().unwrap();
    let reference = &case["resolved_config"];
    let ours = resolved_config(kind, &case["folder_config"])
        .unwrap_or_else(|e| panic!("{kind} {name}: resolved_config failed: {e}"));
    let ours_map = ours.as_object().unwrap();
    for key in init_keys {
        assert!(
            ours_map.contains_key(*key),
            "{kind} {name}: resolved config lacks `{key}`"
        );
    }
    for (key, value) in ours_map {
        let theirs = reference
            .get(key)
            .unwrap_or_else(|| panic!("{kind} {name}: diffusers' config has no `{key}`"));
        assert!(
            same_value(value, theirs),
            "{kind} {name}: `{key}` is {value}, diffusers has {theirs}"
        );
    }
    // The config diffusers holds after loading the folder (with its `_use_default_values`)
    // resolves to the same.
    let again = resolved_config(kind, &case["loaded_config"]).unwrap();
    assert_eq!(
        again, ours,
        "{kind} {name}: resolving the loaded config differs"
    );

    // Through a Stable Diffusion pipeline, which rewrites steps_offset and clip_sample.
    let reference = &case["pipeline_config"];
    let adjusted = stable_diffusion_pipeline_config(kind, &case["folder_config"]).unwrap();
    let ours = resolved_config(kind, &adjusted).unwrap();
    for (key, value) in ours.as_object().unwrap() {
        let theirs = reference
            .get(key)
            .unwrap_or_else(|| panic!("{kind} {name}: the pipeline's config has no `{key}`"));
        assert!(
            same_value(value, theirs),
            "{kind} {name}: through the pipeline `{key}` is {value}, diffusers has {theirs}"
        );
    }
}

/// Runs a whole trajectory; returns the worst relative error, or the first error.
fn replay(
    kind: SchedulerKind,
    folder: &Value,
    run: &Value,
    kernel: NormalKernel,
    what: &str,
) -> text2img::Result<f64> {
    let steps = run["steps"].as_u64().unwrap() as usize;
    let eta = run["eta"].as_f64().unwrap();
    let seed = run["seed"].as_u64().unwrap();
    let mut scheduler = build(
        kind,
        folder,
        steps,
        &SchedulerOptions {
            eta,
            ..Default::default()
        },
    )?;

    if run.get("error").is_none() {
        let timesteps = common::f64_array(&run["timesteps"]);
        check_timesteps(scheduler.timesteps(), &timesteps, what);
        let sigma = run["init_noise_sigma"].as_f64().unwrap();
        let ours = scheduler.init_noise_sigma();
        assert!(
            (ours - sigma).abs() <= 4.0 * f32::EPSILON as f64 * sigma.abs(),
            "{what}: init_noise_sigma {ours} vs {sigma}"
        );
    }

    let device = Device::Cpu;
    let mut generator = BatchGenerator::consecutive_with_kernel(seed, 2, kernel);
    let latents = generator.randn(&[2, 4, 3, 5], &device)?;
    let mut latents = latents.affine(scheduler.init_noise_sigma() as f32 as f64, 0.0)?;
    let timesteps = scheduler.timesteps().to_vec();
    if run.get("error").is_none() {
        // Every step has diffusers' latents to be compared with: none is skipped.
        let recorded = run["trajectory"].as_array().map_or(0, Vec::len);
        assert_eq!(recorded, timesteps.len(), "{what}: steps with a reference");
    }
    let mut worst = 0.0f64;
    for (i, &t) in timesteps.iter().enumerate() {
        let scaled = scheduler.scale_model_input(&latents, i)?;
        let output = fake_model(&scaled, t);
        latents = scheduler.step(&output, i, &latents, &mut generator)?;
        if let Some(reference) = run["trajectory"].get(i) {
            let reference = common::f32_base64(reference.as_str().unwrap());
            let ours = latents.flatten_all()?.to_vec1::<f32>()?;
            let max_ref = reference.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            let max_diff = ours
                .iter()
                .zip(&reference)
                .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
            let rel = if max_ref > 0.0 {
                max_diff / max_ref
            } else {
                max_diff
            };
            assert!(
                max_diff <= REL_TOL * max_ref,
                "{what}: step {i} (t = {t}) differs by {max_diff:e} (max |ref| {max_ref:e})"
            );
            worst = worst.max(rel);
        }
    }
    Ok(worst)
}

fn check_kind(kind: SchedulerKind) {
    let fixture = kind_fixture(kind);
    assert_eq!(fixture["kind"], kind.cli_name());
    assert_eq!(fixture["class_name"], kind.diffusers_class());
    let kernel = kernel_of(&fixture);
    let init_keys: Vec<&str> = fixture["init_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let mut worst = 0.0f64;
    let mut runs = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let folder = &case["folder_config"];
        if let Some(error) = case.get("error") {
            let ours = build(kind, folder, 4, &SchedulerOptions::default());
            assert!(
                ours.is_err(),
                "{kind} {name}: diffusers fails ({error}), we do not"
            );
            continue;
        }
        check_config(kind, case, &init_keys);
        for run in case["runs"].as_array().unwrap() {
            let what = format!("{kind} {name} steps={} eta={}", run["steps"], run["eta"]);
            match (replay(kind, folder, run, kernel, &what), run.get("error")) {
                (Ok(w), None) => {
                    if std::env::var_os("SCHEDULER_TEST_VERBOSE").is_some() {
                        eprintln!("{what}: worst step error {w:.2e}");
                    }
                    worst = worst.max(w);
                    runs += 1;
                }
                (Err(e), None) => panic!("{what}: failed: {e}"),
                (Ok(_), Some(error)) => panic!("{what}: diffusers fails ({error}), we do not"),
                (Err(_), Some(_)) => {}
            }
        }
    }
    assert!(runs > 0, "{kind}: no trajectory was compared");
    eprintln!("{kind}: {runs} trajectories, worst step error {worst:.2e} of max |ref|");
}

#[test]
fn pndm_matches_diffusers() {
    check_kind(SchedulerKind::Pndm);
}

#[test]
fn ddim_matches_diffusers() {
    check_kind(SchedulerKind::Ddim);
}

#[test]
fn ddpm_matches_diffusers() {
    check_kind(SchedulerKind::Ddpm);
}

#[test]
fn euler_matches_diffusers() {
    check_kind(SchedulerKind::Euler);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_kind(SchedulerKind::EulerAncestral);
}

#[test]
fn dpm_pp_2m_matches_diffusers() {
    check_kind(SchedulerKind::DpmPP2M);
}

/// LCM: noise drawn at every step but the last, from the same generators.
#[test]
fn lcm_matches_diffusers() {
    check_kind(SchedulerKind::Lcm);
}

#[test]
fn dpm_pp_2m_karras_matches_diffusers() {
    check_kind(SchedulerKind::DpmPP2MKarras);
}

#[test]
fn alphas_cumprod_match_torch() {
    let fixture = common::read_fixture("schedulers/alphas_cumprod.json");
    for (name, case) in fixture.as_object().unwrap() {
        let c = &case["config"];
        let trained: Option<Vec<f64>> = c
            .get("trained_betas")
            .filter(|v| !v.is_null())
            .map(common::f64_array);
        let ours = alphas_cumprod_for(
            c.get("num_train_timesteps")
                .and_then(Value::as_u64)
                .unwrap_or(1000) as usize,
            c.get("beta_start")
                .and_then(Value::as_f64)
                .unwrap_or(0.0001),
            c.get("beta_end").and_then(Value::as_f64).unwrap_or(0.02),
            c.get("beta_schedule")
                .and_then(Value::as_str)
                .unwrap_or("linear"),
            trained.as_deref(),
            c.get("rescale_betas_zero_snr")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        )
        .unwrap();
        let reference = common::f32_base64(case["alphas_cumprod"].as_str().unwrap());
        assert_eq!(ours.len(), reference.len(), "{name}");
        // Zero-SNR rescaling takes float32 square roots, which torch computes with MKL (not
        // correctly rounded): a few ulp of difference there; everything else is exact.
        let rescaled = c
            .get("rescale_betas_zero_snr")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let allowed = if rescaled { 64 } else { 0 };
        let worst = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| common::ulp_distance(*a, *b))
            .max()
            .unwrap();
        assert!(
            worst <= allowed,
            "{name}: alphas_cumprod differ by up to {worst} ulp"
        );
    }
}

#[test]
fn kinds_have_their_names() {
    let names: Vec<(&str, &str)> = SchedulerKind::ALL
        .iter()
        .map(|k| (k.cli_name(), k.a1111_name()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("pndm", "PLMS"),
            ("ddim", "DDIM"),
            ("ddpm", "DDPM"),
            ("euler", "Euler"),
            ("euler-a", "Euler a"),
            ("dpm++2m", "DPM++ 2M"),
            ("dpm++2m-karras", "DPM++ 2M Karras"),
            ("lcm", "LCM"),
        ]
    );
    assert!(matches!(
        SchedulerKind::from_cli_name("heun"),
        Err(text2img::Error::UnknownScheduler { .. })
    ));
}

#[test]
fn steps_must_be_positive() {
    let folder = serde_json::json!({"_class_name": "PNDMScheduler"});
    for kind in SchedulerKind::ALL {
        assert!(matches!(
            build(kind, &folder, 0, &SchedulerOptions::default()),
            Err(text2img::Error::InvalidRequest(_))
        ));
    }
}
