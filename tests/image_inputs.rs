//! Generations that start from a picture against diffusers (scripts/fixtures/image_inputs.py):
//! img2img with a deterministic and an ancestral scheduler, inpainting with a 4-channel and a
//! 9-channel U-Net, hires fix with both latent upscalers, SDXL img2img. Each case must come
//! within 65 dB (parity::MATCH_DB) of diffusers' image, and a near miss of it (another strength, no mask, the
//! other upscaler) must fall below 45 dB, so the threshold separates right from almost right.

mod parity;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use parity::{fixtures, model_dir, psnr, read_png};
use serde_json::Value;
use text2img::latent::schedulers::SchedulerKind;
use text2img::pipeline::{load_local, GenerateRequest, HiresFix, LatentUpscaler, Pipeline};

fn cases() -> Vec<Value> {
    let path = fixtures().join("reference/image_inputs/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn case(name: &str) -> Value {
    cases()
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// Each tiny model once for the whole file. "sdxl-refined" is sdxl-tiny with the tiny
/// refiner set.
fn pipeline(name: &str) -> &'static Pipeline {
    static LOADED: OnceLock<Mutex<HashMap<String, &'static Pipeline>>> = OnceLock::new();
    let mut map = LOADED.get_or_init(Default::default).lock().unwrap();
    map.entry(name.to_string()).or_insert_with(|| {
        let load = |n: &str| load_local(&model_dir(n), &Default::default()).unwrap();
        let pipeline = if name == "sdxl-refined" {
            let mut base = load("sdxl-tiny");
            base.set_refiner(load("sdxl-refiner-tiny")).unwrap();
            base
        } else {
            load(name)
        };
        Box::leak(Box::new(pipeline))
    })
}

fn input(name: &str) -> image::DynamicImage {
    image::open(fixtures().join("image_inputs").join(name)).unwrap()
}

/// The request a case describes.
fn request(case: &Value) -> GenerateRequest {
    let scheduler = match case["scheduler"].as_str().unwrap() {
        "ddim" => SchedulerKind::Ddim,
        "euler" => SchedulerKind::Euler,
        "euler-a" => SchedulerKind::EulerAncestral,
        "pndm" => SchedulerKind::Pndm,
        "dpm++2m" => SchedulerKind::DpmPP2M,
        other => panic!("scheduler {other}"),
    };
    let sdxl = case["model"].as_str().unwrap().starts_with("sdxl");
    let mut req = GenerateRequest {
        prompts: vec![case["prompt"].as_str().unwrap().to_string()],
        negative_prompts: (!sdxl).then(|| vec![String::new()]),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().map(|s| s as usize),
        guidance_scale: case["guidance"].as_f64(),
        scheduler: Some(scheduler),
        num_images: case["num_images"].as_u64().unwrap_or(1) as usize,
        vae_tiling: case["vae_tiling"].as_bool().unwrap_or(false),
        ..Default::default()
    };
    let picture = case["picture"].as_str().unwrap_or("picture.png");
    match case["kind"].as_str().unwrap() {
        "txt2img" => {
            req.width = case["width"].as_u64().map(|v| v as usize);
            req.height = case["height"].as_u64().map(|v| v as usize);
        }
        "img2img" => {
            req.init_image = Some(input(picture).to_rgb8());
            req.strength = case["strength"].as_f64();
        }
        "inpaint" => {
            req.init_image = Some(input("picture.png").to_rgb8());
            req.mask = Some(input("mask.png").to_luma8());
            req.strength = case["strength"].as_f64();
        }
        "hires" => {
            req.width = Some(64);
            req.height = Some(64);
            req.hires = Some(HiresFix {
                scale: 1.0,
                width: case["hires_width"].as_u64().map(|v| v as usize),
                height: case["hires_height"].as_u64().map(|v| v as usize),
                steps: None,
                strength: case["hires_strength"].as_f64().unwrap(),
                upscaler: if case["upscaler"] == "latent" {
                    LatentUpscaler::Bilinear
                } else {
                    LatentUpscaler::Nearest
                },
            });
        }
        "refiner" => req.refiner_start = case["refiner_start"].as_f64(),
        other => panic!("kind {other}"),
    }
    req
}

/// The PSNR of each image of `req` against the case's reference images.
fn psnrs(case: &Value, req: &GenerateRequest) -> Vec<f64> {
    let model = match case["kind"].as_str() {
        Some("refiner") => "sdxl-refined",
        _ => case["model"].as_str().unwrap(),
    };
    let pipeline = pipeline(model);
    let generation = pipeline.generate(req, &mut |_| true).unwrap();
    let dir = fixtures().join("reference/image_inputs");
    parity::psnrs_against(&generation.images, &dir, &case["images"])
}

/// The case matches diffusers (>= MATCH_DB) and the near miss does not (< 45 dB).
fn check(name: &str, near_miss: impl FnOnce(&mut GenerateRequest)) {
    let case = case(name);
    let req = request(&case);
    let dbs = psnrs(&case, &req);
    eprintln!("{name}: {dbs:.1?} dB");
    for db in &dbs {
        assert!(
            *db >= parity::MATCH_DB,
            "{name}: {db:.1} dB against diffusers"
        );
    }
    let mut missed = req.clone();
    near_miss(&mut missed);
    let dbs = psnrs(&case, &missed);
    eprintln!("{name}, near miss: {dbs:.1?} dB");
    assert!(
        dbs.iter().all(|db| *db < 45.0),
        "{name}: the near miss still reaches {dbs:.1?} dB"
    );
}

#[test]
fn img2img_deterministic_scheduler() {
    check("img2img-ddim", |r| r.strength = Some(0.5));
}

#[test]
fn img2img_ancestral_scheduler_two_images() {
    check("img2img-euler-a-two", |r| r.strength = Some(0.65));
}

/// PNDM (the SD 1.x folders' own scheduler) counts its steps from the first one run.
#[test]
fn img2img_pndm() {
    check("img2img-pndm", |r| r.strength = Some(0.5));
}

/// DPM-Solver++ takes its multistep history from the first step run.
#[test]
fn img2img_dpm_solver() {
    check("img2img-dpm", |r| r.strength = Some(0.75));
}

#[test]
fn inpainting_dpm_solver() {
    check("inpaint-4ch-dpm", |r| r.strength = Some(0.6));
}

#[test]
fn inpainting_with_a_plain_unet_blends_the_known_region() {
    check("inpaint-4ch-euler-a", |r| r.mask = None);
}

#[test]
fn inpainting_below_full_strength() {
    check("inpaint-4ch-ddim-strength", |r| r.strength = Some(0.6));
}

#[test]
fn inpainting_unet_takes_mask_and_masked_picture() {
    // The near miss: the mask inverted (the other region repainted).
    check("inpaint-9ch-euler-a", |r| {
        let mut mask = r.mask.take().unwrap();
        image::imageops::invert(&mut mask);
        r.mask = Some(mask);
    });
}

/// The inpainting model as one file in the original layout (as `sd-v1-5-inpainting.ckpt` is
/// shared), described by the plain model's configs: the 9 input channels come from the file.
#[test]
fn an_inpainting_single_file_checkpoint_inpaints() {
    let options = text2img::pipeline::SingleFileOptions {
        load: Default::default(),
        config: Some(model_dir("sd1-tiny")),
        prediction_type: None,
        ema: false,
        original_config: None,
    };
    let file = model_dir("single-file").join("sd1-inpaint-tiny.safetensors");
    let single = Pipeline::load_single_file(&file, &options).unwrap();
    assert_eq!(single.unet.config.in_channels, 9);
    let case = case("inpaint-9ch-euler-a");
    let images = single
        .generate(&request(&case), &mut |_| true)
        .unwrap()
        .images;
    for (image, file) in images.iter().zip(case["images"].as_array().unwrap()) {
        let dir = fixtures().join("reference/image_inputs");
        let (reference, ..) = read_png(&dir.join(file.as_str().unwrap()));
        let db = psnr(&image.rgb, &reference);
        eprintln!("inpainting single file: {db:.1} dB");
        assert!(db >= parity::MATCH_DB, "{db:.1} dB");
    }
}

#[test]
fn inpainting_unet_below_full_strength() {
    check("inpaint-9ch-ddim-strength", |r| r.strength = Some(0.7));
}

#[test]
fn hires_fix_bilinear_latents() {
    check("hires-latent", |r| {
        r.hires.as_mut().unwrap().upscaler = LatentUpscaler::Nearest;
    });
}

#[test]
fn hires_fix_nearest_latents() {
    check("hires-nearest", |r| {
        r.hires.as_mut().unwrap().strength = 0.7;
    });
}

#[test]
fn sdxl_inpainting() {
    check("sdxl-inpaint", |r| r.mask = None);
}

#[test]
fn sdxl_inpainting_below_full_strength() {
    check("sdxl-inpaint-strength", |r| r.strength = Some(0.5));
}

#[test]
fn sdxl_refiner_finishes_the_base_steps() {
    // The near miss: the base alone, all the way.
    check("sdxl-refiner", |r| r.refiner_start = Some(1.0));
}

#[test]
fn sdxl_refiner_with_another_handover() {
    check("sdxl-refiner-ddim", |r| r.refiner_start = Some(0.8));
}

/// A model with a refiner still runs img2img (without the refiner, which finishes txt2img
/// only) unless the request asks for the refiner by name.
#[test]
fn a_refined_model_runs_img2img_without_its_refiner() {
    let case = case("sdxl-img2img");
    let mut req = request(&case);
    let refined = pipeline("sdxl-refined");
    let image = &refined.generate(&req, &mut |_| true).unwrap().images[0];
    let dir = fixtures().join("reference/image_inputs");
    let (reference, ..) = read_png(&dir.join(case["images"][0].as_str().unwrap()));
    assert!(psnr(&image.rgb, &reference) >= parity::MATCH_DB);
    req.refiner_start = Some(0.8);
    let err = refined
        .generate(&req, &mut |_| true)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("the refiner finishes a txt2img run"), "{err}");
}

/// SDXL's second pass tells the U-Net the larger size in its time ids.
#[test]
fn sdxl_hires_fix() {
    check("sdxl-hires", |r| r.hires.as_mut().unwrap().strength = 0.4);
}

#[test]
fn sdxl_img2img() {
    // 8 x 0.6 runs 4 steps; 8 x 0.4 runs 3.
    check("sdxl-img2img", |r| r.strength = Some(0.4));
}

#[test]
fn vae_tiling_decodes_as_diffusers_tiles() {
    check("tiling-txt2img", |r| r.vae_tiling = false);
}

#[test]
fn vae_tiling_encodes_as_diffusers_tiles() {
    check("tiling-img2img", |r| r.vae_tiling = false);
}

/// The tiled decode and encode alone, against diffusers' tensors; the untiled ones are
/// farther from them than the tolerance.
#[test]
fn tiled_vae_tensors_match_diffusers() {
    let path = fixtures().join("reference/image_inputs/tiling.safetensors");
    let t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let vae = pipeline("sd1-tiny").vae.kl().unwrap();
    let decoded = vae.decode_tiled(&t["latents"]).unwrap();
    parity::assert_close("tiled decode", &decoded, &t["decoded_tiled"]);
    let plain = vae.decode(&t["latents"]).unwrap();
    parity::assert_close("plain decode", &plain, &t["decoded_plain"]);
    let gap = (plain - &t["decoded_tiled"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        gap.to_scalar::<f32>().unwrap() > 0.1,
        "tiling changes nothing here"
    );
    let (mean, logvar) = vae.encode_tiled(&t["picture"]).unwrap();
    let moments = candle_core::Tensor::cat(&[&mean, &logvar], 1).unwrap();
    // diffusers' moments before the log-variance is clamped (the clamp does not bite here).
    parity::assert_close("tiled encode", &moments, &t["moments_tiled"]);
}

/// `--vae`: another autoencoder, as a diffusers folder and as one file in the original
/// layout, gives diffusers' image with that VAE; the model's own VAE does not.
#[test]
fn a_replacement_vae_decodes_the_image() {
    let case = case("other-vae");
    let req = request(&case);
    for source in ["other-vae", "other-vae.safetensors"] {
        let options = text2img::LoadOptions {
            vae: Some(fixtures().join("image_inputs").join(source)),
            ..Default::default()
        };
        let swapped = load_local(&model_dir("sd1-tiny"), &options).unwrap();
        let image = swapped
            .generate(&req, &mut |_| true)
            .unwrap()
            .images
            .remove(0);
        let (reference, ..) = read_png(&fixtures().join("reference/image_inputs/other-vae-0.png"));
        let db = psnr(&image.rgb, &reference);
        eprintln!("--vae {source}: {db:.1} dB");
        assert!(db >= parity::MATCH_DB, "{source}: {db:.1} dB");
    }
    let own = psnrs(&case, &req);
    eprintln!("the model's own VAE: {own:.1?} dB");
    assert!(own[0] < 45.0);
    // A file that is no VAE, and a path that is nothing, are refused with what they are.
    let options = |path: std::path::PathBuf| text2img::LoadOptions {
        vae: Some(path),
        ..Default::default()
    };
    let err = load_local(&model_dir("sd1-tiny"), &options("/nonexistent/vae".into()))
        .err()
        .expect("a missing VAE is refused")
        .to_string();
    assert!(err.contains("no such file or folder"), "{err}");
    let err = load_local(
        &model_dir("sd1-tiny"),
        &options(fixtures().join("embeddings/xlemb.safetensors")),
    )
    .err()
    .expect("an embedding is no VAE")
    .to_string();
    assert!(err.contains("does not look like a VAE"), "{err}");
}

/// TAESD (`AutoencoderTiny`) as `--vae`: txt2img's decode and img2img's encode (which draws
/// nothing from the generators) give diffusers' images; the model's own VAE does not.
#[test]
fn a_tiny_autoencoder_decodes_and_encodes() {
    let options = text2img::LoadOptions {
        vae: Some(fixtures().join("image_inputs/taesd")),
        ..Default::default()
    };
    let tiny = load_local(&model_dir("sd1-tiny"), &options).unwrap();
    assert!(tiny.vae.kl().is_none());
    for name in ["taesd-txt2img", "taesd-img2img"] {
        let case = case(name);
        let req = request(&case);
        let images = tiny.generate(&req, &mut |_| true).unwrap().images;
        for (image, file) in images.iter().zip(case["images"].as_array().unwrap()) {
            let dir = fixtures().join("reference/image_inputs");
            let (reference, ..) = read_png(&dir.join(file.as_str().unwrap()));
            let db = psnr(&image.rgb, &reference);
            eprintln!("{name}: {db:.1} dB");
            assert!(db >= parity::MATCH_DB, "{name}: {db:.1} dB");
        }
        let own = psnrs(&case, &req);
        eprintln!("{name} with the model's own VAE: {own:.1?} dB");
        assert!(own.iter().all(|db| *db < 45.0));
    }
}

#[test]
fn bad_image_requests_are_refused_with_what_is_wrong() {
    let tiny = pipeline("sd1-tiny");
    let picture = input("picture.png").to_rgb8();
    let refused = |req: GenerateRequest| -> String {
        match tiny.generate(&req, &mut |_| true) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };
    let base = GenerateRequest {
        steps: Some(4),
        init_image: Some(picture.clone()),
        ..GenerateRequest::new("x")
    };
    for bad in [0.0, 1.5, -0.2] {
        let e = refused(GenerateRequest {
            strength: Some(bad),
            ..base.clone()
        });
        assert!(e.contains("strength must be in (0, 1]"), "{e}");
    }
    let e = refused(GenerateRequest {
        strength: Some(0.2),
        ..base.clone()
    });
    assert!(e.contains("leaves no step to run"), "{e}");
    let e = refused(GenerateRequest {
        mask: Some(image::GrayImage::new(64, 64)),
        ..base.clone()
    });
    assert!(e.contains("the mask is empty"), "{e}");
    let e = refused(GenerateRequest {
        init_image: None,
        mask: Some(image::GrayImage::new(64, 64)),
        ..base.clone()
    });
    assert!(e.contains("a mask needs the picture"), "{e}");
    let e = refused(GenerateRequest {
        init_image: None,
        strength: Some(0.5),
        ..base.clone()
    });
    assert!(e.contains("strength needs an init image"), "{e}");
    let e = refused(GenerateRequest {
        hires: Some(HiresFix::default()),
        ..base.clone()
    });
    assert!(e.contains("hires fix is a second pass of txt2img"), "{e}");
    // An inpainting model without a mask.
    let e = match pipeline("sd1-inpaint-tiny").generate(&base, &mut |_| true) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("this is an inpainting model"), "{e}");
}

#[test]
fn the_picture_sets_the_size_and_width_height_resize_it() {
    let tiny = pipeline("sd1-tiny");
    // 70x45 rounds down to 64x40, as diffusers' image processor does.
    let picture = image::imageops::resize(
        &input("picture.png").to_rgb8(),
        70,
        45,
        image::imageops::FilterType::Triangle,
    );
    let req = GenerateRequest {
        steps: Some(2),
        init_image: Some(picture),
        strength: Some(1.0),
        ..GenerateRequest::new("x")
    };
    let out = tiny.generate(&req, &mut |_| true).unwrap();
    assert_eq!((out.images[0].width, out.images[0].height), (64, 40));
    let out = tiny
        .generate(
            &GenerateRequest {
                width: Some(48),
                height: Some(32),
                ..req
            },
            &mut |_| true,
        )
        .unwrap();
    assert_eq!((out.images[0].width, out.images[0].height), (48, 32));
}
