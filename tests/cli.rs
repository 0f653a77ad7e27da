//! The `text2img` binary: a real generation with metadata, and clear errors with a non-zero
//! exit and no output file for bad input.

mod parity;

use std::path::Path;
use std::process::{Command, Output};

use parity::{copy_dir, fixtures, model_dir, psnr, read_png, walk};

fn text2img(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_text2img"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn model() -> String {
    model_dir("sd1-tiny").display().to_string()
}

/// The generation whose diffusers image is `reference/sd1-negative-0.png`, into `out`, with
/// `extra` flags.
fn generate_reference(out: &Path, extra: &[&str]) -> Output {
    let model = model();
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--prompt",
        "a red circle on a blue background",
        "--negative-prompt",
        "a green square",
        "--seed",
        "42",
        "--steps",
        "8",
        "--scheduler",
        "euler",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    text2img(&args, &[])
}

#[test]
fn generate_writes_the_diffusers_image_with_a1111_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let result = generate_reference(&out, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    let (rgb, w, h, texts) = read_png(&out);
    let (reference, ..) = read_png(&fixtures().join("reference/sd1-negative-0.png"));
    assert_eq!((w, h), (64, 64));
    assert!(psnr(&rgb, &reference) >= parity::MATCH_DB);
    let params = &texts
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    assert_eq!(
        params,
        "a red circle on a blue background\nNegative prompt: a green square\n\
         Steps: 8, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: sd1-tiny"
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("decode"), "timing summary: {stdout}");
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// The reference generation into `dir/name` with `extra` flags, asserted to succeed: its PNG's
/// parameters and its stderr.
fn reference_parameters(dir: &Path, name: &str, extra: &[&str]) -> (String, String) {
    let out = dir.join(name);
    let result = generate_reference(&out, extra);
    assert!(result.status.success(), "{}", stderr(&result));
    let (_, _, _, texts) = read_png(&out);
    (texts[0].1.clone(), stderr(&result))
}

/// A guidance interval is recorded (quoted, since A1111's parser splits on commas) only when
/// guidance runs; one that covers no step is run but warned about.
#[test]
fn a_guidance_interval_is_recorded_when_it_applies_and_warned_when_empty() {
    let dir = tempfile::tempdir().unwrap();
    let params = |name: &str, extra: &[&str]| reference_parameters(dir.path(), name, extra);
    let (guided, quiet) = params("a.png", &["--guidance-interval", "0,0.5"]);
    assert!(guided.ends_with(r#", CFG interval: "0,0.5""#), "{guided}");
    assert!(!quiet.contains("warning"), "{quiet}");
    let (unguided, _) = params(
        "b.png",
        &["--guidance-interval", "0,0.5", "--guidance-scale", "1"],
    );
    assert!(!unguided.contains("CFG interval"), "{unguided}");
    let (_, warned) = params("c.png", &["--guidance-interval", "0.5,0.6"]);
    assert!(
        warned.contains("warning: guidance interval 0.5,0.6 covers none of the 8 steps"),
        "{warned}"
    );
}

/// Autoguidance is recorded when it runs; a model with no guide U-Net refuses it, with no
/// output.
#[test]
fn autoguidance_is_recorded_and_needs_a_guide_unet() {
    let dir = tempfile::tempdir().unwrap();
    let params = |name: &str, extra: &[&str]| reference_parameters(dir.path(), name, extra).0;
    let guided = params("a.png", &["--autoguidance", "2.5"]);
    assert!(guided.ends_with(", Autoguidance: 2.5"), "{guided}");
    let off = params("b.png", &["--autoguidance", "1"]);
    assert!(!off.contains("Autoguidance"), "{off}");
    let out = dir.path().join("negative.png");
    let result = generate_reference(&out, &["--autoguidance=-2"]);
    assert!(!result.status.success());
    let err = stderr(&result);
    assert!(err.contains("autoguidance must be a number >= 0"), "{err}");
    assert!(!out.exists());

    let out = dir.path().join("c.png");
    let sd2 = model_dir("sd2-tiny").display().to_string();
    let result = text2img(
        &[
            "generate",
            "--model",
            &sd2,
            "--prompt",
            "a red circle",
            "--autoguidance",
            "2",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!result.status.success());
    let err = stderr(&result);
    assert!(err.contains("autoguidance 2 needs a guide U-Net"), "{err}");
    assert!(!out.exists());
}

#[test]
fn several_images_are_numbered_and_carry_their_own_seed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let model = model();
    let result = text2img(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "a red circle on a blue background",
            "--seed",
            "42",
            "--steps",
            "8",
            "--scheduler",
            "euler-a",
            "--num-images",
            "2",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    for (i, seed) in [(1, 42), (2, 43)] {
        let (rgb, _, _, texts) = read_png(&dir.path().join(format!("img-{i}.png")));
        let (reference, ..) =
            read_png(&fixtures().join(format!("reference/sd1-two-images-{}.png", i - 1)));
        assert!(psnr(&rgb, &reference) >= parity::MATCH_DB);
        assert!(
            texts[0].1.contains(&format!("Seed: {seed},")),
            "{}",
            texts[0].1
        );
    }
}

#[test]
fn without_a_seed_one_is_drawn_and_printed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = model();
    let result = text2img(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--steps",
            "1",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    let seed: u64 = stdout
        .split("(seed ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (_, _, _, texts) = read_png(&out);
    assert!(texts[0].1.contains(&format!("Seed: {seed},")));
}

/// `--dtype bf16 --compute bf16` makes the same picture as f32 up to bf16 rounding: with bf16
/// products where the CPU has them, else widened to f32 after a warning that says so.
#[test]
fn bf16_compute_makes_the_picture_or_says_it_computes_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16.png");
    let result = generate_reference(&out, &["--dtype", "bf16", "--compute", "bf16"]);
    assert!(result.status.success(), "{}", stderr(&result));
    let warned = stderr(&result).contains("no bf16 products");
    assert_eq!(warned, !text2img::kernels::matmul_bf16::supported());
    let (rgb, ..) = read_png(&out);
    let (reference, ..) = read_png(&fixtures().join("reference/sd1-negative-0.png"));
    let db = psnr(&rgb, &reference);
    assert!(db >= 30.0, "{db:.1} dB against f32");
}

/// Runs a command that must fail: non-zero exit, an error naming `needle`, no output file.
fn fails_with(args: &[&str], envs: &[(&str, &Path)], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let mut all: Vec<&str> = args.to_vec();
    let out_s = out.to_str().unwrap().to_string();
    all.extend(["--output", &out_s]);
    let result = text2img(&all, envs);
    let err = stderr(&result);
    assert!(!result.status.success(), "expected failure for {args:?}");
    assert!(
        err.contains(needle),
        "error for {args:?} should mention `{needle}`:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no partial output"
    );
}

#[test]
fn bad_requests_fail_clearly() {
    let model = model();
    let m = model.as_str();
    fails_with(
        &["generate", "--model", m, "--prompt", "x", "--width", "70"],
        &[],
        "width 70 is not a positive multiple of 8",
    );
    fails_with(
        &["generate", "--model", m, "--prompt", "x", "--height", "0"],
        &[],
        "height 0",
    );
    fails_with(
        &["generate", "--model", m, "--prompt", "x", "--steps", "0"],
        &[],
        "steps must be at least 1",
    );
    fails_with(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--guidance-rescale",
            "1.5",
        ],
        &[],
        "guidance rescale must be between 0 and 1, not 1.5",
    );
    fails_with(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--guidance-interval",
            "0.8,0.2",
        ],
        &[],
        "guidance interval must satisfy 0 <= start < end <= 1, not 0.8,0.2",
    );
    fails_with(
        &["generate", "--model", m, "--prompt", "x", "--scheduler", "lms"],
        &[],
        "unknown scheduler `lms`; known schedulers: pndm, ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras",
    );
    fails_with(
        &["generate", "--model", "/no/such/folder", "--prompt", "x"],
        &[],
        "/no/such/folder",
    );
    fails_with(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--compute",
            "bf16",
        ],
        &[],
        "--compute bf16 multiplies weights kept in bf16: add --dtype bf16",
    );
}

/// An I/O error names the file and its cause, once (the library's message already ends
/// with the cause that the error chain would repeat).
#[test]
fn an_io_error_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-vae");
    let out = dir.path().join("out");
    let result = text2img(
        &[
            "train-vae",
            "--data",
            "shapes",
            "--out",
            out.to_str().unwrap(),
            "--finetune-decoder",
            missing.to_str().unwrap(),
            "--steps",
            "1",
        ],
        &[],
    );
    let err = stderr(&result);
    assert!(!result.status.success());
    assert!(err.contains("no-vae/config.json"), "{err}");
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
}

#[test]
fn a_repo_id_offline_without_cache_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    fails_with(
        &["generate", "--model", "someone/some-model", "--prompt", "x"],
        &[
            ("HF_HUB_CACHE", cache.path()),
            ("HF_HUB_OFFLINE", Path::new("1")),
        ],
        "someone/some-model",
    );
}

/// A hub cache holding the tiny SD 1.x folder as the snapshot of `someone/NAME` (its
/// weights left out where `weights` is false, as a config-only download leaves it).
fn hub_cache_with(name: &str, weights: bool) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join(format!("models--someone--{name}"));
    let snapshot = repo.join("snapshots").join("0123abcd");
    copy_dir(&model_dir("sd1-tiny"), &snapshot);
    if !weights {
        for entry in walk(&snapshot) {
            if entry
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "bin")
            {
                std::fs::remove_file(entry).unwrap();
            }
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    cache
}

/// A one-step generation offline against the hub cache `cache`, with `model` and `extra`.
fn generate_offline(cache: &Path, model: &str, extra: &[&str], out: &Path) -> Output {
    let mut args = vec![
        "generate", "--model", model, "--prompt", "x", "--steps", "1",
    ];
    args.extend_from_slice(extra);
    args.extend(["--seed", "1", "--output", out.to_str().unwrap()]);
    text2img(
        &args,
        &[("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", Path::new("1"))],
    )
}

#[test]
fn a_repo_id_resolves_in_the_hub_cache() {
    let cache = hub_cache_with("tiny", true);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hub.png");
    let result = generate_offline(cache.path(), "someone/tiny", &[], &out);
    assert!(result.status.success(), "{}", stderr(&result));
    let (_, _, _, texts) = read_png(&out);
    assert!(
        texts[0].1.ends_with("Model: someone/tiny"),
        "{}",
        texts[0].1
    );
}

/// `--config ORG/NAME` for a single file, as diffusers' `from_single_file(config=...)`: the
/// repo's configs from the hub cache (a snapshot of configs only, as a config download
/// leaves it), the same image as `--config DIR`; offline and not cached, a clear error.
#[test]
fn a_single_files_config_may_be_a_repo_id() {
    let cache = hub_cache_with("tiny-configs", false);
    let dir = tempfile::tempdir().unwrap();
    let file = model_dir("single-file").join("sd1-tiny.safetensors");
    let run = |config: &str, out: &Path| {
        generate_offline(
            cache.path(),
            file.to_str().unwrap(),
            &["--config", config],
            out,
        )
    };
    let (by_id, by_dir) = (dir.path().join("id.png"), dir.path().join("dir.png"));
    let result = run("someone/tiny-configs", &by_id);
    assert!(result.status.success(), "{}", stderr(&result));
    let result = run(model_dir("sd1-tiny").to_str().unwrap(), &by_dir);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        read_png(&by_id).0 == read_png(&by_dir).0,
        "the images differ"
    );
    let missing = dir.path().join("missing.png");
    let result = run("someone/not-cached", &missing);
    assert!(!result.status.success() && !missing.exists());
    assert!(
        stderr(&result).contains("someone/not-cached"),
        "{}",
        stderr(&result)
    );
}

/// `convert FOLDER --dtype q8` writes a folder whose weight matrices are int8: it generates
/// (with no `--dtype`) the image of the source folder with `--dtype q8`, pixel for pixel,
/// within 30 dB of the f32 image but not it; its U-Net file is little more than half the
/// source's (which is f16), and its other files are the source's. A folder that exists already is refused, as is a
/// single-file option for a folder.
#[test]
fn convert_writes_a_q8_folder_that_generates_the_q8_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8");
    let source = model_dir("sd1-tiny");
    let result = text2img(
        &[
            "convert",
            source.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "q8",
        ],
        &[],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let image = |model: &Path, extra: &[&str], name: &str| {
        let png = dir.path().join(name);
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--seed",
            "5",
            "--steps",
            "4",
            "--output",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let result = text2img(&args, &[]);
        assert!(result.status.success(), "{}", stderr(&result));
        read_png(&png).0
    };
    let converted = image(&out, &[], "converted.png");
    let quantized = image(&source, &["--dtype", "q8"], "quantized.png");
    let f32_image = image(&source, &[], "f32.png");
    assert!(
        converted == quantized,
        "the converted folder's image differs"
    );
    assert!(converted != f32_image);
    let db = psnr(&converted, &f32_image);
    assert!(db >= 30.0, "{db:.1} dB");
    let size = |root: &Path| {
        std::fs::metadata(root.join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&out) * 100 < size(&source) * 55,
        "{} of {}",
        size(&out),
        size(&source)
    );
    for file in [
        "model_index.json",
        "unet/config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(source.join(file)).unwrap(),
            "{file}"
        );
    }
    let again = text2img(
        &[
            "convert",
            source.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!again.status.success() && stderr(&again).contains("already exists"));
    let other = dir.path().join("other");
    let ema = text2img(
        &[
            "convert",
            source.to_str().unwrap(),
            "--out",
            other.to_str().unwrap(),
            "--ema",
        ],
        &[],
    );
    assert!(!ema.status.success() && !other.exists(), "{}", stderr(&ema));
}

#[test]
fn sdxl_from_the_command_line_with_two_prompts_and_turbo_settings() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl = model_dir("sdxl-tiny").display().to_string();
    // Two prompts and a negative prompt give diffusers' image.
    let out = dir.path().join("two.png");
    let result = text2img(
        &[
            "generate",
            "--model",
            &sdxl,
            "--prompt",
            "a red circle on a blue background",
            "--prompt-2",
            "a green triangle",
            "--negative-prompt",
            "a blue square",
            "--seed",
            "42",
            "--steps",
            "8",
            "--guidance-scale",
            "5",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let (rgb, ..) = read_png(&out);
    let (reference, ..) = read_png(&fixtures().join("reference/sdxl/sdxl-two-prompts-0.png"));
    assert!(psnr(&rgb, &reference) >= parity::MATCH_DB);
    // SDXL-Turbo settings: euler-a, trailing spacing, no guidance, one step.
    let out = dir.path().join("turbo.png");
    let result = text2img(
        &[
            "generate",
            "--model",
            &sdxl,
            "--prompt",
            "a red circle on a blue background",
            "--scheduler",
            "euler-a",
            "--timestep-spacing",
            "trailing",
            "--guidance-scale",
            "0",
            "--steps",
            "1",
            "--seed",
            "42",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let (rgb, ..) = read_png(&out);
    let (reference, ..) = read_png(&fixtures().join("reference/sdxl/sdxl-turbo-1-step-0.png"));
    assert!(psnr(&rgb, &reference) >= parity::MATCH_DB);
    fails_with(
        &[
            "generate",
            "--model",
            &sdxl,
            "--prompt",
            "x",
            "--timestep-spacing",
            "sideways",
        ],
        &[],
        "unknown timestep spacing `sideways`",
    );
}

#[test]
fn bench_profile_splits_the_unet_step_and_the_decode_by_layer() {
    let model = model();
    let out = text2img(
        &[
            "bench",
            "--model",
            &model,
            "--size",
            "64",
            "--repeat",
            "1",
            "--json",
            "--profile",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for (part, expected) in [
        (
            "profile_unet_step",
            &[
                "conv 3x3, im2col",
                "attention, self",
                "attention, cross",
                "linear",
                "group norm",
            ][..],
        ),
        (
            "profile_vae_decode",
            &["group norm", "conv 3x3, Winograd"][..],
        ),
    ] {
        let p = &report[part];
        let layers = p["layers"]
            .as_object()
            .unwrap_or_else(|| panic!("{part}: {p}"));
        for name in expected {
            let layer = &layers[*name];
            assert!(
                layer["calls"].as_u64().unwrap() > 0,
                "{part} {name}: {layer}"
            );
            assert!(layer["s"].as_f64().unwrap() > 0.0, "{part} {name}: {layer}");
        }
        let shares: f64 = layers.values().map(|l| l["share"].as_f64().unwrap()).sum();
        assert!(
            (shares - 1.0).abs() < 1e-9,
            "{part}: shares sum to {shares}"
        );
        assert!(p["layers_s"].as_f64().unwrap() > 0.0);
        assert!(p["wall_s"].as_f64().unwrap() > 0.0);
    }
    // The decode is not sharded: its layers fit inside its wall time.
    let d = &report["profile_vae_decode"];
    assert!(d["layers_s"].as_f64().unwrap() <= d["wall_s"].as_f64().unwrap());
}

/// The img2img case of scripts/fixtures/image_inputs.py from the command line: diffusers'
/// image, and the strength in the PNG's parameters as A1111 records it.
#[test]
fn img2img_from_the_command_line_and_bad_pictures_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("i2i.png");
    let picture = fixtures().join("image_inputs/picture.png");
    let model = model();
    let common = [
        "generate",
        "--model",
        &model,
        "--prompt",
        "a red circle on a blue background",
        "--negative-prompt",
        "",
        "--seed",
        "7",
        "--steps",
        "10",
        "--scheduler",
        "ddim",
    ];
    let mut args = common.to_vec();
    args.extend([
        "--init-image",
        picture.to_str().unwrap(),
        "--strength",
        "0.6",
        "--output",
        out.to_str().unwrap(),
    ]);
    let result = text2img(&args, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    let (rgb, w, h, texts) = read_png(&out);
    let (reference, ..) = read_png(&fixtures().join("reference/image_inputs/img2img-ddim-0.png"));
    assert_eq!((w, h), (64, 64));
    let db = psnr(&rgb, &reference);
    assert!(db >= parity::MATCH_DB, "{db:.1} dB against diffusers");
    let parameters = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        parameters.contains("Denoising strength: 0.6"),
        "{parameters}"
    );

    // Not a picture, a truncated one, a missing one, a mask without a picture.
    let text_file = dir.path().join("notes.png");
    std::fs::write(&text_file, "hello").unwrap();
    let bytes = std::fs::read(&picture).unwrap();
    let truncated = dir.path().join("cut.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mask = fixtures().join("image_inputs/mask.png");
    for (extra, needle) in [
        (
            vec!["--init-image", text_file.to_str().unwrap()],
            "not a PNG, JPEG or WebP",
        ),
        (
            vec!["--init-image", truncated.to_str().unwrap()],
            "--init-image",
        ),
        (
            vec!["--init-image", "/nonexistent/p.png"],
            "/nonexistent/p.png",
        ),
        (
            vec!["--mask", mask.to_str().unwrap()],
            "--mask needs --init-image",
        ),
        (
            vec![
                "--init-image",
                picture.to_str().unwrap(),
                "--strength",
                "1.5",
            ],
            "strength must be in (0, 1]",
        ),
        (vec!["--hires-steps", "4"], "need --hires-scale"),
    ] {
        let mut args = common.to_vec();
        args.extend(extra);
        fails_with(&args, &[], needle);
    }
}

/// `--refiner`: the SDXL base hands over to the refiner at --refiner-start, with diffusers'
/// image (scripts/fixtures/image_inputs.py's sdxl-refiner-ddim case) and A1111's infotext.
#[test]
fn an_sdxl_refiner_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("refined.png");
    let base = model_dir("sdxl-tiny").display().to_string();
    let refiner = model_dir("sdxl-refiner-tiny").display().to_string();
    let result = text2img(
        &[
            "generate",
            "--model",
            &base,
            "--refiner",
            &refiner,
            "--refiner-start",
            "0.6",
            "--prompt",
            "a red circle on a blue background",
            "--seed",
            "42",
            "--steps",
            "10",
            "--scheduler",
            "ddim",
            "--guidance-scale",
            "5",
            "--width",
            "64",
            "--height",
            "64",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let (rgb, _, _, texts) = read_png(&out);
    let (reference, ..) =
        read_png(&fixtures().join("reference/image_inputs/sdxl-refiner-ddim-0.png"));
    let db = psnr(&rgb, &reference);
    assert!(db >= parity::MATCH_DB, "{db:.1} dB against diffusers");
    let parameters = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        parameters.contains("Refiner switch at: 0.6"),
        "{parameters}"
    );
    // A refiner for another kind of model is refused.
    fails_with(
        &[
            "generate",
            "--model",
            &model(),
            "--refiner",
            &refiner,
            "--prompt",
            "x",
        ],
        &[],
        "a refiner is an SDXL model",
    );
}

/// `--controlnet` with `--control-image`: diffusers' image of the `sd1-two` case (two
/// ControlNets, their own scales and intervals); mismatched flags are errors before loading.
#[test]
fn generate_with_two_controlnets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("controlled.png");
    let (model, a, b) = (
        model(),
        model_dir("controlnet-sd1-tiny"),
        model_dir("controlnet-sd1-tiny-b"),
    );
    let image = |name: &str| fixtures().join("controlnet").join(name);
    let (edges, blocks) = (image("edges.png"), image("blocks.png"));
    let mut args: Vec<&str> = vec![
        "generate",
        "--model",
        &model,
        "--prompt",
        "a red circle on a blue background",
        "--negative-prompt",
        "",
        "--seed",
        "7",
        "--steps",
        "8",
        "--scheduler",
        "euler",
        "--width",
        "64",
        "--height",
        "64",
        "--controlnet",
        a.to_str().unwrap(),
        "--control-image",
        edges.to_str().unwrap(),
        "--controlnet",
        b.to_str().unwrap(),
        "--control-image",
        blocks.to_str().unwrap(),
        "--control-scale",
        "0.7",
        "--control-scale",
        "0.5",
        "--control-start",
        "0",
        "--control-start",
        "0.1",
        "--control-end",
        "1",
        "--control-end",
        "0.9",
        "--output",
        out.to_str().unwrap(),
    ];
    let result = text2img(&args, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    let (rgb, ..) = read_png(&out);
    let (reference, ..) = read_png(&fixtures().join("reference/controlnet/sd1-two-0.png"));
    let db = psnr(&rgb, &reference);
    assert!(db >= parity::MATCH_DB, "{db:.1} dB against diffusers");

    // An image short: refused, nothing written.
    let bad = dir.path().join("bad.png");
    let last = args.len() - 1;
    args[last] = bad.to_str().unwrap();
    let at = args.iter().rposition(|a| *a == "--control-image").unwrap();
    args.drain(at..at + 2);
    let result = text2img(&args, &[]);
    assert!(!result.status.success());
    assert!(
        stderr(&result).contains("2 --controlnet and 1 --control-image"),
        "{}",
        stderr(&result)
    );
    assert!(!bad.exists());
}

/// `text2img preprocess canny` writes OpenCV's edge map; `--control-preprocess canny` makes
/// the same map from the picture, so it gives the image of that map given as is.
#[test]
fn canny_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let photo = fixtures().join("canny/photo-a.png");
    let edges = dir.path().join("edges.png");
    let result = text2img(
        &[
            "preprocess",
            "canny",
            photo.to_str().unwrap(),
            edges.to_str().unwrap(),
            "--low",
            "50",
            "--high",
            "150",
        ],
        &[],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let (ours, w, h, _) = read_png(&edges);
    let opencv = image::open(fixtures().join("canny/photo-a-50-150.png"))
        .unwrap()
        .to_luma8()
        .into_raw();
    assert_eq!((w, h), (96, 80));
    // Ours is RGB, OpenCV's grey: each grey value three times.
    let grey: Vec<u8> = ours.chunks(3).map(|p| p[0]).collect();
    assert_eq!(grey, opencv);

    let (model, net) = (model(), model_dir("controlnet-sd1-tiny"));
    let generate = |image: &Path, extra: &[&str], out: &Path| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "a red circle",
            "--seed",
            "3",
            "--steps",
            "3",
            "--width",
            "96",
            "--height",
            "80",
            "--controlnet",
            net.to_str().unwrap(),
            "--control-image",
            image.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let result = text2img(&args, &[]);
        assert!(result.status.success(), "{}", stderr(&result));
        read_png(out).0
    };
    let preprocessed = generate(
        &photo,
        &[
            "--control-preprocess",
            "canny",
            "--canny-low",
            "50",
            "--canny-high",
            "150",
        ],
        &dir.path().join("a.png"),
    );
    let given = generate(&edges, &[], &dir.path().join("b.png"));
    let raw = generate(&photo, &[], &dir.path().join("c.png"));
    assert!(preprocessed == given);
    assert!(preprocessed != raw, "the preprocessor changed nothing");
}
