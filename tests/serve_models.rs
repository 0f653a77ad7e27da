//! `text2img serve --models-dir`: checkpoints a client switches between, LoRAs a prompt
//! names per request, both through the A1111 API, checked against the library's images.

mod parity;
mod server;

use serde_json::{json, Value};
use text2img::pipeline::{load_local, GenerateRequest, LoadOptions, LoraSpec, Pipeline};

use parity::{decode_png, fixtures, model_dir};
use server::{b64, Server};

/// A models folder in A1111's layout: a diffusers folder, a LoRA, and a single file of a
/// tiny architecture that cannot load without its configs.
fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("Stable-diffusion")).unwrap();
    std::fs::create_dir_all(root.join("Lora")).unwrap();
    std::fs::copy(
        model_dir("single-file").join("sd1-tiny.safetensors"),
        root.join("Stable-diffusion/sd1-file.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(model_dir("sd2-tiny"), root.join("Stable-diffusion/sd2")).unwrap();
    std::fs::copy(
        fixtures().join("loras/kohya-sd1.safetensors"),
        root.join("Lora/style.safetensors"),
    )
    .unwrap();
    dir
}

const PROMPT: &str = "a red circle";

fn request(prompt: &str) -> Value {
    json!({"prompt": prompt, "seed": 5, "steps": 3, "width": 64, "height": 64})
}

/// The served image's pixels, and the model its info names.
fn txt2img(server: &Server, body: &Value) -> (Vec<u8>, String) {
    let (status, answer) = server.post("/sdapi/v1/txt2img", body);
    assert_eq!(status, 200, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    let (rgb, ..) = decode_png(&b64(&answer["images"][0]));
    (rgb, info["sd_model_name"].as_str().unwrap().to_string())
}

/// The library's image of `request(prompt)`.
fn library_image(pipeline: &Pipeline, prompt: &str) -> Vec<u8> {
    let (prompt, _) = text2img::text::extra_networks::take_lora_tags(prompt).unwrap();
    let generation = pipeline
        .generate(
            &GenerateRequest {
                prompts: vec![prompt],
                seed: Some(5),
                steps: Some(3),
                width: Some(64),
                height: Some(64),
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
    generation.images[0].rgb.clone()
}

#[test]
fn per_request_loras_and_checkpoint_switches() {
    let dir = models_dir();
    let server = Server::start(&["--models-dir", dir.path().to_str().unwrap()]);

    let (_, models) = server.get("/sdapi/v1/sd-models");
    let titles: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["sd1-tiny", "sd1-file.safetensors", "sd2"]);
    assert_eq!(models[1]["model_name"], "sd1-file");
    let (_, loras) = server.get("/sdapi/v1/loras");
    assert_eq!(loras[0]["name"], "style", "{loras}");

    // A LoRA for one request: the image of the model with it merged at load...
    let sd1 = load_local(&model_dir("sd1-tiny"), &LoadOptions::default()).unwrap();
    let sd1_style = load_local(
        &model_dir("sd1-tiny"),
        &LoadOptions {
            loras: vec![LoraSpec {
                path: dir.path().join("Lora/style.safetensors"),
                text_weight: 0.8,
                unet_weight: 0.8,
            }],
            ..Default::default()
        },
    )
    .unwrap();
    let styled = format!("{PROMPT} <lora:style:0.8>");
    let (plain, model) = txt2img(&server, &request(PROMPT));
    assert_eq!(model, "sd1-tiny");
    assert!(plain == library_image(&sd1, PROMPT));
    let (with_lora, _) = txt2img(&server, &request(&styled));
    assert!(
        with_lora == library_image(&sd1_style, &styled),
        "the per-request LoRA's image differs from the LoRA merged at load"
    );
    assert!(with_lora != plain, "the LoRA changed nothing");
    // ...and the next request without it gets the plain model's image, bit for bit.
    assert!(txt2img(&server, &request(PROMPT)).0 == plain);
    assert!(txt2img(&server, &request(&styled)).0 == with_lora);

    // A switch of checkpoint: later requests run on it, with its image.
    let (status, body) = server.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "sd2 [0123456789]"}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, options) = server.get("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], "sd2");
    let sd2 = load_local(&model_dir("sd2-tiny"), &LoadOptions::default()).unwrap();
    let (on_sd2, model) = txt2img(&server, &request(PROMPT));
    assert_eq!(model, sd2.name);
    assert!(on_sd2 == library_image(&sd2, PROMPT));
    assert!(on_sd2 != plain);

    // One request on another checkpoint: that checkpoint's image; the selection stays.
    let mut once = request(PROMPT);
    once["override_settings"] = json!({"sd_model_checkpoint": "sd1-tiny"});
    assert!(txt2img(&server, &once).0 == plain);
    let (_, options) = server.get("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], "sd2");
    assert!(txt2img(&server, &request(PROMPT)).0 == on_sd2);
    // A checkpoint that fails to load: a clear error, and the server goes back to the
    // selected model.
    let mut file = request(PROMPT);
    file["override_settings"] = json!({"sd_model_checkpoint": "sd1-file"});
    let (status, body) = server.post("/sdapi/v1/txt2img", &file);
    assert_eq!(status, 500, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("cannot load checkpoint sd1-file.safetensors"),
        "{body}"
    );
    let (_, options) = server.get("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], "sd2");
    assert!(txt2img(&server, &request(PROMPT)).0 == on_sd2);
    // Selecting it: the same error, and the server back on --model.
    let (status, _) = server.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "sd1-file.safetensors"}),
    );
    assert_eq!(status, 500);
    let (_, options) = server.get("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], "sd1-tiny");
    assert!(txt2img(&server, &request(PROMPT)).0 == plain);

    // A LoRA added while the server runs is found after a refresh.
    std::fs::create_dir_all(dir.path().join("Lora/more")).unwrap();
    std::fs::copy(
        fixtures().join("loras/peft-sd1.safetensors"),
        dir.path().join("Lora/more/peft.safetensors"),
    )
    .unwrap();
    let mut later = request(&format!("{PROMPT} <lora:peft:0.5>"));
    later["override_settings"] = json!({"sd_model_checkpoint": "sd1-tiny"});
    let (status, body) = server.post("/sdapi/v1/txt2img", &later);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("refresh-loras"),
        "{body}"
    );
    assert_eq!(server.post("/sdapi/v1/refresh-loras", &json!({})).0, 200);
    let (status, body) = server.post("/sdapi/v1/txt2img", &later);
    assert_eq!(status, 200, "{body}");
    let log = server.log();
    assert!(log.contains("loading sd2 from"), "{log}");
}

fn b64_file(path: &std::path::Path) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

/// The A1111 ControlNet extension's API: two units (a single file and a folder from
/// `ControlNet/`) give diffusers' two-ControlNet image; the list, module and detect
/// endpoints; bad units are 400s naming the unit's field.
#[test]
fn controlnet_units_through_the_a1111_api() {
    let dir = tempfile::tempdir().unwrap();
    let nets = dir.path().join("ControlNet");
    std::fs::create_dir_all(&nets).unwrap();
    std::fs::copy(
        model_dir("single-file").join("controlnet-sd1-tiny.safetensors"),
        nets.join("canny-sd1.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(model_dir("controlnet-sd1-tiny-b"), nets.join("second")).unwrap();
    let server = Server::start(&["--models-dir", dir.path().to_str().unwrap()]);

    let (_, list) = server.get("/controlnet/model_list");
    assert_eq!(list["model_list"], json!(["canny-sd1", "second"]));
    let (_, modules) = server.get("/controlnet/module_list");
    assert_eq!(modules["module_list"], json!(["none", "canny"]));

    let images = fixtures().join("controlnet");
    let unit = |image: &str, model: &str, weight: f64, start: f64, end: f64| {
        json!({
            "enabled": true, "image": b64_file(&images.join(image)), "module": "none",
            "model": model, "weight": weight, "guidance_start": start, "guidance_end": end,
            "resize_mode": "Just Resize", "control_mode": "Balanced", "pixel_perfect": false,
            "mask": null
        })
    };
    let mut body = json!({
        "prompt": "a red circle on a blue background", "negative_prompt": "", "seed": 7,
        "steps": 8, "cfg_scale": 7.5, "sampler_name": "Euler", "width": 64, "height": 64,
        "alwayson_scripts": {"controlnet": {"args": [
            unit("edges.png", "canny-sd1 [a1b2c3d4]", 0.7, 0.0, 1.0),
            unit("blocks.png", "second", 0.5, 0.1, 0.9),
            {"enabled": false, "model": "no-such-model"}
        ]}}
    });
    let (rgb, _) = txt2img(&server, &body);
    let (reference, ..) = parity::read_png(&fixtures().join("reference/controlnet/sd1-two-0.png"));
    let db = parity::psnr(&rgb, &reference);
    assert!(db >= parity::MATCH_DB, "{db:.1} dB against diffusers");
    // Without the units: another image.
    let plain = txt2img(
        &server,
        &json!({
            "prompt": "a red circle on a blue background", "seed": 7, "steps": 8, "cfg_scale": 7.5,
            "sampler_name": "Euler", "width": 64, "height": 64
        }),
    );
    assert!(parity::psnr(&plain.0, &reference) < 45.0);

    // detect: OpenCV's edge map.
    let (status, detected) = server.post(
        "/controlnet/detect",
        &json!({"controlnet_module": "canny", "controlnet_threshold_a": 50,
                "controlnet_threshold_b": 150,
                "controlnet_input_images": [b64_file(&fixtures().join("canny/photo-a.png"))]}),
    );
    assert_eq!(status, 200, "{detected}");
    let (edges, w, h, _) = decode_png(&b64(&detected["images"][0]));
    assert_eq!((w, h), (96, 80));
    let opencv = image::open(fixtures().join("canny/photo-a-50-150.png"))
        .unwrap()
        .to_luma8()
        .into_raw();
    assert_eq!(edges.chunks(3).map(|p| p[0]).collect::<Vec<u8>>(), opencv);

    // Bad units: 400s that name the unit's field.
    for (change, field, says) in [
        (
            json!({"model": "nope"}),
            "alwayson_scripts.controlnet.args[0].model",
            "no ControlNet `nope`",
        ),
        (
            json!({"module": "openpose"}),
            "alwayson_scripts.controlnet.args[0].module",
            "available: none, canny",
        ),
        (
            json!({"image": null}),
            "alwayson_scripts.controlnet.args[0].image",
            "needs a control image",
        ),
        (
            json!({"control_mode": "Loud"}),
            "alwayson_scripts.controlnet.args[0].control_mode",
            "Balanced",
        ),
        (
            json!({"guidance_start": 0.9, "guidance_end": 0.2}),
            "alwayson_scripts.controlnet.args[0].guidance_start",
            "start before it ends",
        ),
    ] {
        let mut bad = body.clone();
        let first = &mut bad["alwayson_scripts"]["controlnet"]["args"][0];
        for (k, v) in change.as_object().unwrap() {
            first[k] = v.clone();
        }
        let (status, answer) = server.post("/sdapi/v1/txt2img", &bad);
        assert_eq!(status, 400, "{change}: {answer}");
        assert_eq!(answer["field"], field, "{answer}");
        assert!(
            answer["detail"].as_str().unwrap().contains(says),
            "{answer}"
        );
    }
    body["alwayson_scripts"]["controlnet"]["args"] = json!([]);
    assert_eq!(txt2img(&server, &body).0, plain.0);
}

/// `VAE/` and `sd_vae`: a request (or the selection) with another VAE gets diffusers' image
/// with that VAE; "Automatic" gives the checkpoint's own back, bit for bit, without a reload.
#[test]
fn vae_choice_per_request_and_selected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("VAE")).unwrap();
    std::fs::copy(
        fixtures().join("image_inputs/other-vae.safetensors"),
        dir.path().join("VAE/other-vae.safetensors"),
    )
    .unwrap();
    let server = Server::start(&["--models-dir", dir.path().to_str().unwrap()]);
    let (_, vaes) = server.get("/sdapi/v1/sd-vae");
    assert_eq!(vaes[0]["model_name"], "other-vae.safetensors", "{vaes}");
    // The image_inputs fixture's `other-vae` case: diffusers with that VAE.
    let body = json!({"prompt": "a red circle on a blue background", "seed": 7, "steps": 6,
                      "cfg_scale": 7.5, "sampler_name": "DDIM", "width": 64, "height": 64});
    let (own, _) = txt2img(&server, &body);
    let mut with_vae = body.clone();
    with_vae["override_settings"] = json!({"sd_vae": "other-vae"});
    let (other, _) = txt2img(&server, &with_vae);
    let (reference, ..) =
        parity::read_png(&fixtures().join("reference/image_inputs/other-vae-0.png"));
    let db = parity::psnr(&other, &reference);
    assert!(db >= parity::MATCH_DB, "{db:.1} dB against diffusers");
    assert!(parity::psnr(&own, &reference) < 45.0);
    assert!(
        txt2img(&server, &body).0 == own,
        "the VAE stayed after its request"
    );

    let (status, answer) = server.post(
        "/sdapi/v1/options",
        &json!({"sd_vae": "other-vae.safetensors"}),
    );
    assert_eq!(status, 200, "{answer}");
    let (_, options) = server.get("/sdapi/v1/options");
    assert_eq!(options["sd_vae"], "other-vae.safetensors");
    assert!(txt2img(&server, &body).0 == other);
    server.post("/sdapi/v1/options", &json!({"sd_vae": "Automatic"}));
    assert!(txt2img(&server, &body).0 == own);
    assert!(
        !server.log().contains("loading sd1-tiny"),
        "a VAE switch reloaded the model"
    );
}
