//! Shared helpers for the model parity tests: fixture paths, reference tensors, tolerances.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// The PSNR an image must reach against diffusers' to count as the same image. text2img
/// reaches 73-90 dB (or identity) on every case here (measured on AVX-512 CPUs; rounding
/// differences of other instruction sets cost a few dB), while each case's near miss (another
/// strength, step count, guidance, prompt, upscaler...) falls below 45 dB.
pub const MATCH_DB: f64 = 65.0;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The reference tensors diffusers/PyTorch produced (tests/fixtures/reference/components.safetensors).
pub fn reference(name: &str) -> Tensor {
    let path = fixtures().join("reference/components.safetensors");
    let all = candle_core::safetensors::load(&path, &Device::Cpu).expect("reference tensors load");
    all.get(name)
        .unwrap_or_else(|| panic!("no reference tensor {name}"))
        .clone()
}

/// Asserts max|ours - ref| <= 1e-4 * max|ref| (the project's parity tolerance).
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let flat = |t: &Tensor| -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (ours, refs) = (flat(ours), flat(reference));
    let scale = refs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(&refs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max err {err:e}, max|ref| {scale:e}");
    assert!(
        err <= 1e-4 * scale,
        "{what}: max|ours - ref| = {err:e} exceeds 1e-4 * max|ref| = {:e}",
        1e-4 * scale
    );
}

/// PSNR in dB of two 8-bit images (peak 255).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// The PSNR of each generated image against the reference PNG of the same index among
/// `files` (names in `dir`); as many images as files, each of the reference's size.
pub fn psnrs_against(
    images: &[text2img::pipeline::GeneratedImage],
    dir: &Path,
    files: &serde_json::Value,
) -> Vec<f64> {
    let files = files.as_array().expect("a list of reference files");
    assert_eq!(images.len(), files.len(), "images against references");
    images
        .iter()
        .zip(files)
        .map(|(image, file)| {
            let (rgb, w, h, _) = read_png(&dir.join(file.as_str().unwrap()));
            assert_eq!((image.width, image.height), (w, h), "size");
            psnr(&image.rgb, &rgb)
        })
        .collect()
}

/// Reads an 8-bit RGB PNG: (rgb, width, height, text chunks).
pub fn read_png(path: &Path) -> (Vec<u8>, usize, usize, Vec<(String, String)>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decode_png(&bytes)
}

/// Decodes 8-bit RGB PNG bytes: (rgb, width, height, text chunks).
pub fn decode_png(bytes: &[u8]) -> (Vec<u8>, usize, usize, Vec<(String, String)>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let mut texts: Vec<(String, String)> = meta
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &meta.utf8_text {
        texts.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    (buf, info.width as usize, info.height as usize, texts)
}

/// Copies a folder tree (test scratch copies of the fixture models).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs every reference case (from a `cases.json`) whose name starts with `prefix`, skipping
/// the probes, and asserts each image reaches [`MATCH_DB`] against diffusers' PNG in `dir`.
pub fn check_cases(
    cases: &[serde_json::Value],
    prefix: &str,
    dir: &Path,
    generate: impl Fn(&serde_json::Value) -> Vec<text2img::pipeline::GeneratedImage>,
) {
    let mut ran = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        if !name.starts_with(prefix) || name.contains("probe") {
            continue;
        }
        for db in psnrs_against(&generate(case), dir, &case["images"]) {
            eprintln!("{name}: {db:.1} dB");
            assert!(
                db >= MATCH_DB,
                "{name}: PSNR {db:.1} dB < {MATCH_DB} dB against diffusers"
            );
        }
        ran += 1;
    }
    assert!(ran > 0, "no reference case starts with {prefix}");
}

/// The image the embedding and LoRA fixture scripts render: `prompt`, an empty negative
/// prompt, seed 11, 4 Euler steps, guidance 7.5, 64x64.
pub fn render_fixture_case(pipeline: &text2img::Pipeline, prompt: &str) -> Vec<u8> {
    let request = text2img::GenerateRequest {
        prompts: vec![prompt.to_string()],
        negative_prompts: Some(vec![String::new()]),
        seed: Some(11),
        steps: Some(4),
        guidance_scale: Some(7.5),
        scheduler: Some(text2img::latent::schedulers::SchedulerKind::Euler),
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    pipeline.generate(&request, &mut |_| true).unwrap().images[0]
        .rgb
        .clone()
}

/// Every file under `dir`, at any depth.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
