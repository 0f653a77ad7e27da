//! `text2img serve`: the real server on a loopback port, called the way A1111 and OpenAI
//! clients call it, with every bad input, auth, a full queue, interrupts and SIGTERM.

mod parity;
mod server;

use std::io::Read;
use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use text2img::pipeline::{GenerateRequest, GuidanceInterval, LoadOptions, Pipeline};

use parity::{decode_png, model_dir};
use server::{answer, b64, Server};

/// A request that runs long enough to be interrupted, queued behind or cancelled.
fn long_job() -> Value {
    json!({"prompt": "slow", "steps": 150, "width": 128, "height": 128, "batch_size": 8, "sampler_name": "Euler"})
}

fn spawn_post(server: &Server, body: Value) -> JoinHandle<(u16, Value)> {
    let url = server.url("/sdapi/v1/txt2img");
    thread::spawn(move || answer(ureq::post(&url).send_string(&body.to_string())))
}

#[test]
fn txt2img_gives_the_pipelines_images_with_seed_plus_i() {
    let server = Server::start(&[]);
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({
            "prompt": "a red circle", "negative_prompt": "blue", "seed": 40, "steps": 3,
            "cfg_scale": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "batch_size": 2, "n_iter": 2, "width": 72, "height": 56,
            // Fields A1111 clients send that text2img does not use: ignored, not refused.
            "enable_hr": false, "override_settings": {"CLIP_stop_at_last_layers": 1}, "restore_faces": false
        }),
    );
    assert_eq!(status, 200, "{body}");
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 4);
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([40, 41, 42, 43]));
    for key in [
        "prompt",
        "seed",
        "sampler_name",
        "steps",
        "cfg_scale",
        "width",
        "height",
    ] {
        assert!(!info[key].is_null(), "info lacks {key}: {info}");
    }
    assert_eq!(info["sampler_name"], "DPM++ 2M Karras");
    assert_eq!(body["parameters"]["seed"], 40);
    assert_eq!(body["parameters"]["n_iter"], 2);

    // Image 3 (seed 42) is what the library makes alone from seed 42.
    let pipeline = Pipeline::load(
        model_dir("sd1-tiny").to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let alone = pipeline
        .generate(
            &GenerateRequest {
                prompts: vec!["a red circle".into()],
                negative_prompts: Some(vec!["blue".into()]),
                seed: Some(42),
                steps: Some(3),
                guidance_scale: Some(5.0),
                scheduler: Some(text2img::latent::schedulers::SchedulerKind::DpmPP2MKarras),
                width: Some(72),
                height: Some(56),
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
    let (rgb, w, h, texts) = decode_png(&b64(&images[2]));
    assert_eq!((w, h), (72, 56));
    assert_eq!(
        rgb, alone.images[0].rgb,
        "the served image differs from the library's"
    );
    let parameters = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        parameters.starts_with("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 42, Size: 72x56"),
        "{parameters}"
    );

    // The CLI's guidance options, as extension fields: the library's image, and recorded.
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({
            "prompt": "a red circle", "seed": 42, "steps": 4, "cfg_scale": 5,
            "sampler_name": "Euler", "guidance_rescale": 0.5, "guidance_interval": [0, 0.5],
            "autoguidance": 2
        }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["parameters"]["guidance_interval"], json!([0.0, 0.5]));
    assert_eq!(body["parameters"]["guidance_rescale"], 0.5);
    assert_eq!(body["parameters"]["autoguidance"], 2.0);
    let alone = pipeline
        .generate(
            &GenerateRequest {
                prompts: vec!["a red circle".into()],
                seed: Some(42),
                steps: Some(4),
                guidance_scale: Some(5.0),
                guidance_rescale: Some(0.5),
                guidance_interval: Some(GuidanceInterval::new(0.0, 0.5).unwrap()),
                autoguidance: Some(2.0),
                scheduler: Some(text2img::latent::schedulers::SchedulerKind::Euler),
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
    let (rgb, _, _, texts) = decode_png(&b64(&body["images"][0]));
    assert_eq!(rgb, alone.images[0].rgb);
    let parameters = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        parameters.ends_with(r#", CFG rescale: 0.5, CFG interval: "0,0.5", Autoguidance: 2"#),
        "{parameters}"
    );

    // A random seed (-1) is drawn, reported, and used.
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "seed": -1, "steps": 1}),
    );
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert!(info["seed"].as_u64().is_some() && info["all_seeds"][0] == info["seed"]);
    assert!(server.log().contains("POST /sdapi/v1/txt2img 200"));
}

#[test]
fn openai_generations_and_the_read_only_endpoints() {
    let server = Server::start(&[]);
    let (status, body) = server.post(
        "/v1/images/generations",
        &json!({"prompt": "a blue square", "n": 2, "size": "64x48", "response_format": "b64_json", "model": "whatever", "steps": 2}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for item in data {
        let (_, w, h, _) = decode_png(&b64(&item["b64_json"]));
        assert_eq!((w, h), (64, 48));
    }

    let (status, health) = server.get("/health");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (_, samplers) = server.get("/sdapi/v1/samplers");
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for name in [
        "PLMS",
        "DDIM",
        "DDPM",
        "Euler",
        "Euler a",
        "DPM++ 2M",
        "DPM++ 2M Karras",
    ] {
        assert!(names.contains(&name), "{names:?} lacks {name}");
    }
    let (_, models) = server.get("/sdapi/v1/sd-models");
    assert_eq!(models[0]["model_name"], "sd1-tiny");
    let (status, progress) = server.get("/sdapi/v1/progress");
    assert_eq!(status, 200);
    assert_eq!(progress["state"]["job_count"], 0);
    assert!(progress["current_image"].is_null());
    let (status, body) = server.get("/no/such/thing");
    assert_eq!(status, 404, "{body}");

    let page = ureq::get(&server.url("/")).call().unwrap();
    assert!(page.content_type().starts_with("text/html"));
    let html = page.into_string().unwrap();
    for needle in [
        "id=\"prompt\"",
        "id=\"generate\"",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/progress",
    ] {
        assert!(html.contains(needle), "the page lacks {needle}");
    }
}

#[test]
fn bad_input_is_a_4xx_that_names_the_field() {
    let server = Server::start(&[
        "--max-size",
        "256",
        "--max-steps",
        "50",
        "--max-images",
        "4",
        "--max-body",
        "2KB",
    ]);
    let cases: Vec<(&str, &str, u16, Option<&str>, &str)> = vec![
        (
            "/sdapi/v1/txt2img",
            "{\"prompt\": ",
            400,
            None,
            "malformed JSON",
        ),
        ("/sdapi/v1/txt2img", "[1, 2]", 400, None, "JSON object"),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": 5}"#,
            400,
            Some("prompt"),
            "must be a string",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"steps": "20"}"#,
            400,
            Some("steps"),
            "must be an integer",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "a cat <lora:style:0.8>"}"#,
            400,
            Some("prompt"),
            "has no LoRA folder (start it with --models-dir or --lora-dir)",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "nope.safetensors"}}"#,
            400,
            Some("sd_model_checkpoint"),
            "no checkpoint `nope.safetensors`; known: sd1-tiny",
        ),
        (
            "/sdapi/v1/options",
            r#"{"sd_model_checkpoint": "nope"}"#,
            400,
            Some("sd_model_checkpoint"),
            "no checkpoint `nope`",
        ),
        (
            "/sdapi/v1/options",
            r#"{"sd_vae": "x.safetensors"}"#,
            400,
            Some("sd_vae"),
            "no VAE `x.safetensors`; known: Automatic, None",
        ),
        (
            "/sdapi/v1/options",
            r#"{"samples_format": "jpg"}"#,
            400,
            Some("samples_format"),
            "only sd_model_checkpoint and sd_vae",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"cfg_scale": "high"}"#,
            400,
            Some("cfg_scale"),
            "must be a number",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"width": 100}"#,
            400,
            Some("width"),
            "multiple of 8",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"height": 512}"#,
            400,
            Some("height"),
            "limit of 256",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"guidance_interval": [0.8, 0.2]}"#,
            400,
            Some("guidance_interval"),
            "0 <= start < end <= 1",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"guidance_interval": "0,0.5"}"#,
            400,
            Some("guidance_interval"),
            "must be an array of two numbers",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"autoguidance": -1}"#,
            400,
            Some("autoguidance"),
            "must be a number >= 0",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"guidance_rescale": 2}"#,
            400,
            Some("guidance_rescale"),
            "between 0 and 1",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"steps": 0}"#,
            400,
            Some("steps"),
            "between 1 and 50",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"steps": 51}"#,
            400,
            Some("steps"),
            "between 1 and 50",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"batch_size": 3, "n_iter": 2}"#,
            400,
            Some("batch_size"),
            "at most 4",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"batch_size": 0}"#,
            400,
            Some("batch_size"),
            "at least 1",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"seed": -7}"#,
            400,
            Some("seed"),
            "-1 (random)",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"sampler_name": "Heun"}"#,
            400,
            Some("sampler_name"),
            "known: PLMS, DDIM, DDPM, Euler, Euler a, DPM++ 2M",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"sampler_name": "Euler", "scheduler": "Karras"}"#,
            400,
            Some("scheduler"),
            "DPM++ 2M",
        ),
        (
            "/v1/images/generations",
            r#"{"n": 1}"#,
            400,
            Some("prompt"),
            "required",
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "size": "big"}"#,
            400,
            Some("size"),
            "512x512",
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "response_format": "url"}"#,
            400,
            Some("response_format"),
            "b64_json",
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "n": 5}"#,
            400,
            Some("n"),
            "at most 4",
        ),
    ];
    for (path, body, status, field, needle) in cases {
        let (got, answer) = server.post_raw(path, body, None);
        assert_eq!(got, status, "{path} {body}: {answer}");
        let (message, named) = if path.starts_with("/v1/") {
            (&answer["error"]["message"], &answer["error"]["param"])
        } else {
            (&answer["detail"], &answer["field"])
        };
        let message = message.as_str().unwrap_or_else(|| panic!("{answer}"));
        assert!(message.contains(needle), "{body}: {message}");
        assert_eq!(named.as_str(), field, "{body}: {answer}");
    }
    let big = json!({"prompt": "x".repeat(3000)}).to_string();
    let (status, answer) = server.post_raw("/sdapi/v1/txt2img", &big, None);
    assert_eq!(status, 413, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("2048 bytes"));
    // The worker is fine after all that.
    let (status, _) = server.post("/sdapi/v1/txt2img", &json!({"steps": 1}));
    assert_eq!(status, 200);
}

#[test]
fn api_key_by_bearer_or_basic_and_never_logged() {
    let key = "s3cret-key";
    let server = Server::start(&["--api-key", key]);
    let body = json!({"prompt": "x", "steps": 1}).to_string();
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(ureq::get(&server.url("/")).call().unwrap().status(), 200);
    let (status, answer) = server.get("/sdapi/v1/samplers");
    assert_eq!(status, 401, "{answer}");
    let (status, _) = server.post_raw("/sdapi/v1/txt2img", &body, Some("Bearer wrong"));
    assert_eq!(status, 401);
    let (status, answer) = server.post_raw("/v1/images/generations", r#"{"prompt":"x"}"#, None);
    assert_eq!(status, 401);
    assert_eq!(answer["error"]["type"], "authentication_error");
    let (status, answer) =
        server.post_raw("/sdapi/v1/txt2img", &body, Some(&format!("Bearer {key}")));
    assert_eq!(status, 200, "{answer}");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{key}"));
    let (status, _) = server.post_raw("/sdapi/v1/txt2img", &body, Some(&format!("Basic {basic}")));
    assert_eq!(status, 200);
    let wrong = base64::engine::general_purpose::STANDARD.encode(format!("{key}:nope"));
    let (status, _) = server.post_raw("/sdapi/v1/txt2img", &body, Some(&format!("Basic {wrong}")));
    assert_eq!(status, 401);
    let log = server.log();
    assert!(
        log.contains("POST /sdapi/v1/txt2img 401") && log.contains("POST /sdapi/v1/txt2img 200")
    );
    assert!(!log.contains(key), "the key appears in the log:\n{log}");
}

#[test]
fn a_public_address_needs_a_key_and_cors_only_when_asked() {
    let out = Command::new(env!("CARGO_BIN_EXE_text2img"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without --api-key") && err.contains("--insecure"),
        "{err}"
    );

    let server = Server::start(&[]);
    let r = ureq::get(&server.url("/health"))
        .set("Origin", "http://evil.test")
        .call()
        .unwrap();
    assert!(r.header("access-control-allow-origin").is_none());
    // Another site's page may not make the server generate, and a keyless loopback server
    // does not answer to other host names (a DNS-rebinding page).
    let r = ureq::post(&server.url("/sdapi/v1/txt2img"))
        .set("Origin", "http://evil.test")
        .send_string("{}");
    assert!(matches!(r, Err(ureq::Error::Status(403, _))), "{r:?}");
    let r = ureq::get(&server.url("/sdapi/v1/sd-models"))
        .set("Host", "evil.test")
        .call();
    assert!(matches!(r, Err(ureq::Error::Status(403, _))), "{r:?}");

    let server = Server::start(&["--cors-origin", "http://app.test"]);
    let r = ureq::request("OPTIONS", &server.url("/sdapi/v1/txt2img"))
        .set("Origin", "http://app.test")
        .set("Access-Control-Request-Method", "POST")
        .call()
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://app.test")
    );
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("Authorization"));
    let r = ureq::get(&server.url("/health"))
        .set("Origin", "http://other.test")
        .call()
        .unwrap();
    assert!(r.header("access-control-allow-origin").is_none());
}

#[test]
fn progress_interrupt_full_queue_and_clients_that_leave() {
    let server = Server::start(&["--max-queue", "1"]);
    let running = spawn_post(&server, long_job());
    let progress = server.wait_until_sampling();
    assert_eq!(progress["state"]["sampling_steps"], 150);
    assert!(progress["progress"].as_f64().unwrap() > 0.0);
    let preview = decode_png(&b64(&progress["current_image"]));
    assert_eq!(
        (preview.1, preview.2),
        (16, 16),
        "one preview pixel per latent"
    );

    // One request may wait; the next is told to come back later.
    let queued = spawn_post(&server, json!({"prompt": "queued", "steps": 2}));
    server.wait_for_queue(1);
    let (status, answer) = server.post("/sdapi/v1/txt2img", &json!({"steps": 1}));
    assert_eq!(status, 429, "{answer}");
    let retry = ureq::post(&server.url("/sdapi/v1/txt2img")).send_string("{}");
    match retry {
        Err(ureq::Error::Status(429, r)) => {
            assert!(r.header("retry-after").unwrap().parse::<u32>().unwrap() >= 1)
        }
        other => panic!("expected 429, got {other:?}"),
    }

    // The interrupt stops the running job, which answers with the images it had.
    let (status, _) = server.post("/sdapi/v1/interrupt", &json!({}));
    assert_eq!(status, 200);
    let (status, body) = running.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 8);
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    let (status, body) = queued.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(
        info["interrupted"], false,
        "the interrupt touched the next job"
    );

    // A client that gives up frees its place in the queue (and a running job stops).
    let running = spawn_post(&server, long_job());
    server.wait_until_sampling();
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_millis(300))
        .build();
    let gave_up = agent
        .post(&server.url("/sdapi/v1/txt2img"))
        .send_string(r#"{"steps": 2}"#);
    assert!(
        matches!(gave_up, Err(ureq::Error::Transport(_))),
        "{gave_up:?}"
    );
    server.wait_for_queue(0);
    let (status, _) = server.post("/sdapi/v1/interrupt", &json!({}));
    assert_eq!(status, 200);
    assert_eq!(running.join().unwrap().0, 200);
    assert!(
        server.log().contains("POST /sdapi/v1/txt2img 499"),
        "{}",
        server.log()
    );
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn sigterm_lets_the_running_request_finish_and_turns_the_queue_away() {
    let mut server = Server::start(&["--shutdown-grace", "120"]);
    let running = spawn_post(&server, json!({"prompt": "finish me", "steps": 40}));
    server.wait_until_sampling();
    let queued = spawn_post(&server, json!({"prompt": "queued", "steps": 2}));
    server.wait_for_queue(1);
    server.terminate();
    let (status, body) = queued.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("shutting down"));
    let (status, body) = running.join().unwrap();
    assert_eq!(
        status, 200,
        "the running request was not allowed to finish: {body}"
    );
    assert_eq!(body["images"].as_array().unwrap().len(), 1);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
}

/// A request whose single step takes many seconds (the tiny model at 1024x1024, two images:
/// about 15 s a step in a release build, over a minute in the test build): a stop can only be
/// on time if it acts inside it. Servers that take it run with [`Server::start_unlimited`].
fn big_step_job() -> Value {
    json!({"prompt": "big", "steps": 2, "width": 1024, "height": 1024, "batch_size": 2, "sampler_name": "Euler"})
}

/// The same with one image (about 8 s a step), for the interrupt that decodes it.
fn big_step_image() -> Value {
    json!({"prompt": "big", "steps": 2, "width": 1024, "height": 1024, "sampler_name": "Euler"})
}

/// CPU time (user + system) the process has used, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Cores the process keeps busy on average over `window`.
fn busy_cores(pid: u32, window: Duration) -> f64 {
    let before = cpu_ticks(pid);
    thread::sleep(window);
    (cpu_ticks(pid) - before) as f64 / 100.0 / window.as_secs_f64()
}

impl Server {
    /// A server without the time limit on requests: the big-step jobs are estimated at
    /// minutes in the unoptimised test build, more on a loaded machine, and would be refused.
    fn start_unlimited(extra: &[&str]) -> Self {
        let mut args = vec!["--max-job-seconds", "0"];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// Waits until the worker has been inside the first step of a job for a while (the job
    /// runs, no step has finished, the cores are busy).
    fn wait_inside_first_step(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get("/health").1["running"] != true {
            assert!(Instant::now() < deadline, "no job started: {}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
        let busy = busy_cores(self.child.id(), Duration::from_millis(700));
        let (_, p) = self.get("/sdapi/v1/progress");
        assert_eq!(p["state"]["sampling_step"], 0, "{p}");
        assert!(busy > 0.5, "the job is not computing: {busy} cores");
    }

    /// Seconds from `since` until the worker is idle, then checks that the cores stay idle.
    fn seconds_until_idle(&self, since: Instant) -> f64 {
        let deadline = since + Duration::from_secs(30);
        while self.get("/health").1["running"] == true {
            assert!(Instant::now() < deadline, "the job never stopped");
            thread::sleep(Duration::from_millis(10));
        }
        let took = since.elapsed().as_secs_f64();
        let busy = busy_cores(self.child.id(), Duration::from_millis(500));
        assert!(
            busy < 0.2,
            "threads still busy after the job ended: {busy} cores"
        );
        took
    }
}

#[test]
fn a_client_that_leaves_or_an_interrupt_stops_the_job_inside_its_step() {
    let server = Server::start_unlimited(&[]);
    // The client gives up while the first step runs.
    let url = server.url("/sdapi/v1/txt2img");
    let client = thread::spawn(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(4))
            .build();
        let result = agent.post(&url).send_string(&big_step_job().to_string());
        (result.is_err(), Instant::now())
    });
    server.wait_inside_first_step();
    let (gave_up, left) = client.join().unwrap();
    assert!(gave_up);
    let took = server.seconds_until_idle(left);
    eprintln!("client left: worker idle {took:.2} s later");
    assert!(took < 3.0, "{took} s");
    assert!(
        server.log().contains("POST /sdapi/v1/txt2img 499"),
        "{}",
        server.log()
    );

    // An interrupt inside the first step: A1111's answer, the images of the latents so far.
    let running = spawn_post(&server, big_step_image());
    server.wait_inside_first_step();
    let asked = Instant::now();
    assert_eq!(server.post("/sdapi/v1/interrupt", &json!({})).0, 200);
    let (status, body) = running.join().unwrap();
    eprintln!(
        "interrupted: answered {:.2} s later",
        asked.elapsed().as_secs_f64()
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 1);
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
}

#[test]
fn sigterm_cancels_a_running_request_inside_its_step_after_the_grace_period() {
    let mut server = Server::start_unlimited(&["--shutdown-grace", "0.5"]);
    let running = spawn_post(&server, big_step_job());
    server.wait_inside_first_step();
    let started = Instant::now();
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(30));
    let took = started.elapsed().as_secs_f64();
    eprintln!("SIGTERM with a 0.5 s grace period: exited {took:.2} s later");
    assert!(status.success(), "{status:?}: {}", server.log());
    // 0.5 s of grace, then at most about 2 s (1 s to stop the job, 0.5 s to send answers).
    assert!(took < 4.0, "{took} s: {}", server.log());
    let (status, body) = running.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        server.log().contains("grace period over"),
        "{}",
        server.log()
    );
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let mut server = Server::start_unlimited(&["--shutdown-grace", "120"]);
    let url = server.url("/sdapi/v1/txt2img");
    // Its answer never comes: the process is gone.
    let running = thread::spawn(move || {
        ureq::post(&url)
            .send_string(&big_step_job().to_string())
            .is_err()
    });
    server.wait_inside_first_step();
    server.terminate();
    thread::sleep(Duration::from_millis(300));
    let second = Instant::now();
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(10));
    let took = second.elapsed().as_secs_f64();
    eprintln!("second SIGTERM: exited {took:.2} s later");
    assert!(took < 1.0, "{took} s");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(running.join().unwrap(), "the running request got an answer");
}

/// A raw connection to the server, for the clients that no library would make.
fn raw_connection(server: &Server) -> std::net::TcpStream {
    let addr = server.base.trim_start_matches("http://");
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection (or the read times out); what was read.
fn read_to_close(stream: &mut std::net::TcpStream) -> String {
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

#[test]
fn slow_and_hostile_clients_are_cut_off() {
    use std::io::Write;
    let server = Server::start(&[
        "--max-connections",
        "3",
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-body",
        "4KB",
    ]);
    // Slowloris: headers sent a piece at a time, never finished. Two of them fill two of the
    // three places...
    let started = Instant::now();
    let mut slow: Vec<_> = (0..2)
        .map(|_| {
            let mut s = raw_connection(&server);
            s.write_all(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\n")
                .unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    // ...a third place is still free, and a fourth connection is turned away at once.
    let mut held = raw_connection(&server);
    held.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    thread::sleep(Duration::from_millis(100));
    let mut over = raw_connection(&server);
    let answer = read_to_close(&mut over);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("limit of 3 open connections"), "{answer}");
    // The slow ones are closed once the header timeout passes, with nothing run.
    for s in slow.iter_mut().chain([&mut held]) {
        let _ = s.write_all(b"X-Slow: 1\r\n");
        let rest = read_to_close(s);
        assert!(!rest.contains("200 OK"), "{rest}");
    }
    let cut = started.elapsed();
    eprintln!("slowloris connections closed {cut:?} after opening");
    assert!(cut < Duration::from_secs(5), "{cut:?}");
    // The places are free again.
    assert_eq!(server.get("/health").0, 200);

    // A body that stops arriving: 408 once the body timeout passes.
    let mut s = raw_connection(&server);
    s.write_all(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
    )
    .unwrap();
    let answer = read_to_close(&mut s);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive"), "{answer}");

    // A chunked body streamed past the 4 KB limit is refused while it streams: the 413 comes
    // back after the first few chunks of a body meant to be 1 MB.
    let mut s = raw_connection(&server);
    s.write_all(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let chunk = format!("400\r\n{}\r\n", " ".repeat(0x400));
    let mut sent = 0;
    let mut answer = Vec::new();
    while sent < (1 << 20) {
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
        sent += 0x400;
        let mut buf = [0u8; 4096];
        if let Ok(n) = s.read(&mut buf) {
            answer.extend_from_slice(&buf[..n]);
            if n > 0 {
                break;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    eprintln!("413 after {sent} bytes of a 1 MB body");
    assert!(sent < 64 << 10, "{sent} bytes sent before the 413");
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn embeddings_are_listed_and_used_in_prompts() {
    // The fixtures in a subfolder, beside one 48 wide (for another model).
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sd15");
    std::fs::create_dir(&sub).unwrap();
    for entry in std::fs::read_dir(parity::fixtures().join("embeddings")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, sub.join(path.file_name().unwrap())).unwrap();
    }
    let wide =
        candle_core::Tensor::zeros((3, 48), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    candle_core::safetensors::save(
        &[("emb_params".to_string(), wide)].into(),
        dir.path().join("other48.safetensors"),
    )
    .unwrap();
    let server = Server::start(&["--embeddings-dir", dir.path().to_str().unwrap()]);
    let (status, body) = server.get("/sdapi/v1/embeddings");
    assert_eq!(status, 200, "{body}");
    let loaded = body["loaded"].as_object().unwrap();
    assert_eq!(loaded["shinyemb"]["vectors"], 2, "{body}");
    assert_eq!(loaded["wideemb"]["shape"], 32, "{body}");
    let skipped = body["skipped"].as_object().unwrap();
    assert_eq!(skipped.len(), 1, "{body}");
    assert_eq!(
        (&skipped["other48"]["shape"], &skipped["other48"]["vectors"]),
        (&json!(48), &json!(3)),
        "{body}"
    );
    // A prompt naming an embedding gives another image than on a server without it, and the
    // same image where the prompt does not name it.
    let plain = Server::start(&[]);
    let image = |server: &Server, prompt: &str| {
        let (status, body) = server.post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": prompt, "steps": 3, "seed": 5, "sampler_name": "Euler"}),
        );
        assert_eq!(status, 200, "{body}");
        decode_png(&b64(&body["images"][0])).0
    };
    let named = "a photo of shinyemb";
    assert_ne!(image(&server, named), image(&plain, named));
    assert_eq!(image(&server, "a photo"), image(&plain, "a photo"));
}

#[test]
fn a_request_over_the_time_limit_is_refused_with_its_estimate() {
    let server = Server::start(&["--max-job-seconds", "2"]);
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "big", "steps": 150, "width": 1024, "height": 1024, "batch_size": 4}),
    );
    assert_eq!(status, 413, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("would take about") && detail.contains("limit of 2 s"),
        "{detail}"
    );
    // A small one still runs.
    let (status, body) = server.post("/sdapi/v1/txt2img", &json!({"prompt": "small", "steps": 2}));
    assert_eq!(status, 200, "{body}");
    assert!(
        server.log().contains("measured what requests cost"),
        "{}",
        server.log()
    );
}

/// A job past its deadline is cancelled by the queue's watchdog and says so.
#[test]
fn a_job_that_overruns_its_deadline_is_cancelled() {
    use text2img::serve::models::{Checkpoint, Models};
    use text2img::serve::worker::{JobError, JobSpec, Queue};
    let source = model_dir("sd1-tiny").to_str().unwrap().to_string();
    let pipeline = Pipeline::load(&source, &LoadOptions::default()).unwrap();
    let startup = Checkpoint {
        title: "sd1-tiny".into(),
        model_name: "sd1-tiny".into(),
        source,
        vae: None,
    };
    let loader = Box::new(|s: &str| Pipeline::load(s, &LoadOptions::default()));
    let models = Models::new(loader, pipeline, startup, None, None).unwrap();
    let queue = Queue::new(4);
    queue.start_watchdog();
    let worker = {
        let queue = queue.clone();
        thread::spawn(move || queue.run_worker(&models))
    };
    let request = GenerateRequest {
        prompts: vec!["long".into()],
        steps: Some(150),
        width: Some(512),
        height: Some(512),
        ..Default::default()
    };
    let ticket = queue
        .submit(JobSpec {
            batches: vec![request],
            model: None,
            loras: Vec::new(),
            controlnets: Vec::new(),
            deadline: Some(Duration::from_millis(300)),
            estimate_seconds: 0.1,
        })
        .unwrap();
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let result = runtime.block_on(ticket.wait());
    let took = started.elapsed();
    match result {
        Err(JobError::Overrun { ran, estimate }) => {
            assert!(ran >= 0.3 && estimate == 0.1, "{ran} {estimate}")
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("the job finished"),
    }
    assert!(took < Duration::from_secs(5), "{took:?}");
    queue.close();
    worker.join().unwrap();
}
