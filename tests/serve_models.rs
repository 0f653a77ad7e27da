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
