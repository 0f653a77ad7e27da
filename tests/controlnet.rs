//! ControlNets against diffusers' StableDiffusion(XL)ControlNetPipeline
//! (scripts/fixtures/controlnet.py): one ControlNet, an interval of steps, two at once, guess
//! mode, img2img, inpainting, SD 2.x, SDXL. Each case must reach parity::MATCH_DB, and its near misses (scale 0, another
//! control image, the interval or guess mode left out) must fall below 45 dB.

mod parity;

use parity::{fixtures, model_dir, psnr};
use serde_json::Value;
use text2img::latent::schedulers::SchedulerKind;
use text2img::pipeline::{load_local, ControlMode, ControlUnit, GenerateRequest, Pipeline};

fn case(name: &str) -> Value {
    let path = fixtures().join("reference/controlnet/cases.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cases
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn control_image(name: &str) -> image::RgbImage {
    image::open(fixtures().join("controlnet").join(name))
        .unwrap()
        .to_rgb8()
}

/// The case's model with its ControlNets loaded, in the order of its units.
fn pipeline(case: &Value) -> Pipeline {
    let mut pipeline = load_local(
        &model_dir(case["model"].as_str().unwrap()),
        &Default::default(),
    )
    .unwrap();
    for unit in case["controls"].as_array().unwrap() {
        pipeline
            .add_controlnet(
                &model_dir(unit["net"].as_str().unwrap()),
                text2img::weights::MatrixDtype::F32,
            )
            .unwrap();
    }
    pipeline
}

fn request(case: &Value) -> GenerateRequest {
    let scheduler = match case["scheduler"].as_str().unwrap() {
        "ddim" => SchedulerKind::Ddim,
        "euler" => SchedulerKind::Euler,
        "euler-a" => SchedulerKind::EulerAncestral,
        other => panic!("scheduler {other}"),
    };
    let sdxl = case["model"].as_str().unwrap().starts_with("sdxl");
    let controls = case["controls"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(net, u)| ControlUnit {
            scale: u["scale"].as_f64().unwrap(),
            start: u["start"].as_f64().unwrap(),
            end: u["end"].as_f64().unwrap(),
            mode: if case["guess_mode"].as_bool().unwrap_or(false) {
                ControlMode::Control
            } else {
                ControlMode::Balanced
            },
            ..ControlUnit::new(net, control_image(u["image"].as_str().unwrap()))
        })
        .collect();
    let picture = |name: &str| image::open(fixtures().join("image_inputs").join(name)).unwrap();
    let kind = case["kind"].as_str().unwrap_or("txt2img");
    let (init_image, mask) = match kind {
        "img2img" => (Some(picture("picture.png").to_rgb8()), None),
        "inpaint" => (
            Some(picture("picture.png").to_rgb8()),
            Some(picture("mask.png").to_luma8()),
        ),
        _ => (None, None),
    };
    GenerateRequest {
        init_image,
        mask,
        strength: case["strength"].as_f64(),
        prompts: vec![case["prompt"].as_str().unwrap().to_string()],
        negative_prompts: (!sdxl).then(|| vec![String::new()]),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().map(|s| s as usize),
        guidance_scale: case["guidance"].as_f64(),
        scheduler: Some(scheduler),
        num_images: case["num_images"].as_u64().unwrap_or(1) as usize,
        width: Some(64),
        height: Some(64),
        controls,
        ..Default::default()
    }
}

fn psnrs(pipeline: &Pipeline, case: &Value, req: &GenerateRequest) -> Vec<f64> {
    let generation = pipeline.generate(req, &mut |_| true).unwrap();
    let dir = fixtures().join("reference/controlnet");
    parity::psnrs_against(&generation.images, &dir, &case["images"])
}

/// A near miss: what it changes, and the change.
type NearMiss<'a> = (&'a str, &'a dyn Fn(&mut GenerateRequest));

/// The case matches diffusers, and each near miss falls below 45 dB.
fn check(name: &str, near_misses: &[NearMiss]) {
    let case = case(name);
    let pipeline = pipeline(&case);
    let req = request(&case);
    let dbs = psnrs(&pipeline, &case, &req);
    eprintln!("{name}: {dbs:.1?} dB");
    assert!(
        dbs.iter().all(|db| *db >= parity::MATCH_DB),
        "{name}: {dbs:.1?} dB against diffusers"
    );
    for (what, change) in near_misses {
        let mut missed = req.clone();
        change(&mut missed);
        let dbs = psnrs(&pipeline, &case, &missed);
        eprintln!("{name}, {what}: {dbs:.1?} dB");
        assert!(
            dbs.iter().all(|db| *db < 45.0),
            "{name}, {what}: still {dbs:.1?} dB"
        );
    }
}

fn scale_zero(r: &mut GenerateRequest) {
    for unit in &mut r.controls {
        unit.scale = 0.0;
    }
}

fn other_image(r: &mut GenerateRequest) {
    for unit in &mut r.controls {
        unit.image = image::imageops::flip_horizontal(&unit.image);
    }
}

#[test]
fn one_controlnet() {
    check(
        "sd1-one",
        &[("scale 0", &scale_zero), ("other image", &other_image)],
    );
}

#[test]
fn a_controlnet_on_an_interval_of_the_steps() {
    check(
        "sd1-interval",
        &[
            ("scale 0", &scale_zero),
            ("whole schedule", &|r| {
                r.controls[0].start = 0.0;
                r.controls[0].end = 1.0;
            }),
        ],
    );
}

#[test]
fn two_controlnets_add_up() {
    check(
        "sd1-two",
        &[
            ("first only", &|r| r.controls.truncate(1)),
            ("second only", &|r| {
                r.controls.remove(0);
            }),
        ],
    );
}

#[test]
fn guess_mode() {
    check(
        "sd1-guess",
        &[
            ("scale 0", &scale_zero),
            ("balanced", &|r| r.controls[0].mode = ControlMode::Balanced),
            ("prompt more important", &|r| {
                r.controls[0].mode = ControlMode::Prompt
            }),
        ],
    );
}

/// img2img counts the ControlNet's interval over the steps that run, as diffusers'
/// ControlNet img2img pipeline.
#[test]
fn controlnet_with_img2img() {
    check(
        "sd1-img2img",
        &[
            ("scale 0", &scale_zero),
            ("other image", &other_image),
            ("whole schedule", &|r| r.controls[0].end = 1.0),
        ],
    );
}

#[test]
fn controlnet_with_inpainting() {
    check(
        "sd1-inpaint",
        &[("scale 0", &scale_zero), ("other image", &other_image)],
    );
}

/// SD 2.x: v-prediction, linear projections, 1024-wide text.
#[test]
fn sd2_controlnet() {
    check(
        "sd2-one",
        &[("scale 0", &scale_zero), ("other image", &other_image)],
    );
}

/// Hires fix runs with a ControlNet (its second pass steered by the control image at the
/// larger size; diffusers has no such pipeline to compare with): the image is the larger
/// size and differs from the unsteered one.
#[test]
fn controlnet_with_hires_fix() {
    let case = case("sd1-one");
    let pipeline = pipeline(&case);
    let mut req = request(&case);
    req.hires = Some(text2img::pipeline::HiresFix {
        scale: 1.5,
        width: None,
        height: None,
        steps: Some(3),
        strength: 0.6,
        upscaler: text2img::pipeline::LatentUpscaler::Bilinear,
    });
    let steered = pipeline.generate(&req, &mut |_| true).unwrap();
    assert_eq!(
        (steered.images[0].width, steered.images[0].height),
        (96, 96)
    );
    let mut unsteered = req.clone();
    unsteered.controls.clear();
    let without = pipeline.generate(&unsteered, &mut |_| true).unwrap();
    assert!(psnr(&steered.images[0].rgb, &without.images[0].rgb) < 45.0);
}

#[test]
fn sdxl_controlnet() {
    check(
        "sdxl-one",
        &[("scale 0", &scale_zero), ("other image", &other_image)],
    );
}

#[test]
fn a_controlnet_for_another_base_model_is_refused() {
    let mut sd1 = load_local(&model_dir("sd1-tiny"), &Default::default()).unwrap();
    let err = sd1
        .add_controlnet(
            &model_dir("controlnet-sdxl-tiny"),
            text2img::weights::MatrixDtype::F32,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("made for another base model"), "{err}");
    // A unit that names no loaded ControlNet, or a bad interval: an error, not a panic.
    let mut req = GenerateRequest::new("x");
    req.steps = Some(2);
    req.controls = vec![ControlUnit::new(0, image::RgbImage::new(64, 64))];
    let err = sd1.generate(&req, &mut |_| true).err().unwrap().to_string();
    assert!(err.contains("ControlNet 0 asked for; 0 loaded"), "{err}");
    sd1.add_controlnet(
        &model_dir("controlnet-sd1-tiny"),
        text2img::weights::MatrixDtype::F32,
    )
    .unwrap();
    req.controls[0].start = 0.8;
    req.controls[0].end = 0.2;
    let err = sd1.generate(&req, &mut |_| true).err().unwrap().to_string();
    assert!(err.contains("start before it ends"), "{err}");
}

/// The single files people download: the original layout (`control_model.*`, fp16, written by
/// the fixture script and checked there against diffusers' `from_single_file`) and the
/// diffusers layout in one file load to the folder's weights, so they give its image.
#[test]
fn single_file_controlnets_equal_their_folder() {
    let case = case("sd1-one");
    let req = request(&case);
    let folder = pipeline(&case).generate(&req, &mut |_| true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let diffusers_file = dir.path().join("diffusers-layout.safetensors");
    std::fs::copy(
        model_dir("controlnet-sd1-tiny").join("diffusion_pytorch_model.safetensors"),
        &diffusers_file,
    )
    .unwrap();
    for file in [
        model_dir("single-file").join("controlnet-sd1-tiny.safetensors"),
        diffusers_file,
    ] {
        let mut pipeline = load_local(&model_dir("sd1-tiny"), &Default::default()).unwrap();
        pipeline
            .add_controlnet(&file, text2img::weights::MatrixDtype::F32)
            .unwrap();
        let single = pipeline.generate(&req, &mut |_| true).unwrap();
        assert!(
            single.images[0].rgb == folder.images[0].rgb,
            "{}: another image than the folder's",
            file.display()
        );
    }
    // For another base model: refused, naming a tensor whose shape differs.
    let mut sdxl = load_local(&model_dir("sdxl-tiny"), &Default::default()).unwrap();
    let err = sdxl
        .add_controlnet(
            &model_dir("single-file").join("controlnet-sd1-tiny.safetensors"),
            text2img::weights::MatrixDtype::F32,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("another base model"), "{err}");
    // A file that is no ControlNet.
    let mut sd1 = load_local(&model_dir("sd1-tiny"), &Default::default()).unwrap();
    let err = sd1
        .add_controlnet(
            &fixtures().join("loras/kohya-sd1.safetensors"),
            text2img::weights::MatrixDtype::F32,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a ControlNet"), "{err}");
}
