//! The web page in a real browser: headless Chromium driven through chromedriver's WebDriver
//! protocol. The page asks for the API key once, keeps it, and a typed prompt with a click on
//! Generate gives the API's PNG for the same seed in the gallery; "send to img2img", a mask
//! painted with the mouse and Generate again repaint the painted area and keep the rest.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`;
//! CI installs them). Without them the test says so and passes, unless
//! TEXT2IMG_REQUIRE_BROWSER=1 (set by CI), when it fails.

mod parity;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use parity::{decode_png, fixtures, model_dir};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    names
        .iter()
        .map(|n| PathBuf::from("/usr/bin").join(n))
        .find(|p| p.is_file())
}

/// A thin WebDriver client: one session, JSON in and out.
struct Driver {
    base: String,
}

impl Driver {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = ureq::request(method, &format!("{}{path}", self.base))
            .timeout(Duration::from_secs(120));
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let r = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("webdriver {method} {path}: {e}"),
        };
        let status = r.status();
        (status, r.into_json().unwrap_or(Value::Null))
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert_eq!(status, 200, "webdriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn element(&self, session: &str, css: &str) -> String {
        let v = self.ok(
            "POST",
            &format!("/session/{session}/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn type_into(&self, session: &str, css: &str, text: &str) {
        let id = self.element(session, css);
        self.ok(
            "POST",
            &format!("/session/{session}/element/{id}/clear"),
            Some(json!({})),
        );
        self.ok(
            "POST",
            &format!("/session/{session}/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn script(&self, session: &str, script: &str) -> Value {
        self.ok(
            "POST",
            &format!("/session/{session}/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Waits for a `prompt()` dialog and returns its text.
    fn wait_for_alert(&self, session: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, v) = self.call("GET", &format!("/session/{session}/alert/text"), None);
            if status == 200 {
                return v["value"].as_str().unwrap_or_default().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "the page never asked for the key"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_page_asks_for_the_key_once_and_generates_a_png() {
    let required = std::env::var("TEXT2IMG_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    let (Some(chromium), Some(chromedriver)) = (
        find(
            "CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        ),
        find("CHROMEDRIVER", &["chromedriver"]),
    ) else {
        assert!(
            !required,
            "TEXT2IMG_REQUIRE_BROWSER=1 but chromium/chromedriver are missing"
        );
        eprintln!("skipped: chromium and chromedriver are not installed");
        return;
    };

    let key = "page-key-123";
    // A models folder with one LoRA, for the page's list of them.
    let models = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(models.path().join("Lora")).unwrap();
    std::fs::copy(
        fixtures().join("loras/kohya-sd1.safetensors"),
        models.path().join("Lora/style.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(models.path().join("ControlNet")).unwrap();
    std::fs::copy(
        model_dir("single-file").join("controlnet-sd1-tiny.safetensors"),
        models.path().join("ControlNet/edges.safetensors"),
    )
    .unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_text2img"))
        .args(["serve", "--port", "0", "--api-key", key, "--models-dir"])
        .arg(models.path())
        .arg("--model")
        .arg(model_dir("sd1-tiny"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Killed(server);
    let site = line
        .trim()
        .strip_prefix("listening on ")
        .expect("server started")
        .to_string();

    let port = free_port();
    let _driver = Killed(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver = Driver {
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{}/status", driver.base))
        .call()
        .is_err()
    {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        thread::sleep(Duration::from_millis(100));
    }
    let session = driver.ok(
        "POST",
        "/session",
        Some(json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"]
            }
        }}})),
    );
    let session = session["sessionId"].as_str().unwrap().to_string();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        driver.ok(
            "POST",
            &format!("/session/{session}/url"),
            Some(json!({ "url": site })),
        );
        // The API needs the key: the page asks for it.
        let question = driver.wait_for_alert(&session);
        assert!(question.contains("API key"), "{question}");
        driver.ok(
            "POST",
            &format!("/session/{session}/alert/text"),
            Some(json!({ "text": key })),
        );
        driver.ok(
            "POST",
            &format!("/session/{session}/alert/accept"),
            Some(json!({})),
        );

        // The model picker shows the loaded model; a LoRA's button adds its tag to the prompt.
        let deadline = Instant::now() + Duration::from_secs(30);
        let lora = loop {
            let found = driver.script(
                &session,
                "const b = document.querySelector('#loras button'); return b ? b.textContent : null;",
            );
            if let Some(text) = found.as_str() {
                break text.to_string();
            }
            assert!(Instant::now() < deadline, "the page listed no LoRA");
            thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(lora, "LoRA style");
        let picked = driver.script(
            &session,
            "return document.getElementById('checkpoint').value;",
        );
        assert_eq!(picked.as_str(), Some("sd1-tiny"));
        driver.script(
            &session,
            "document.querySelector('#loras button').click(); return null;",
        );
        let prompt = driver.script(&session, "return document.getElementById('prompt').value;");
        assert_eq!(prompt.as_str(), Some("<lora:style:1>"));

        driver.type_into(&session, "#prompt", "a red circle on a blue background");
        driver.type_into(&session, "#width", "64");
        driver.type_into(&session, "#height", "48");
        driver.type_into(&session, "#steps", "3");
        driver.type_into(&session, "#seed", "7");
        // An extension field (the fixture model has a guide U-Net).
        driver.type_into(&session, "#autoguidance", "2");
        let button = driver.element(&session, "#generate");
        driver.ok(
            "POST",
            &format!("/session/{session}/element/{button}/click"),
            Some(json!({})),
        );

        let png = wait_for_result(&driver, &session, 1, "no image appeared");
        let (rgb, w, h, texts) = decode_png(&png);
        assert_eq!((w, h), (64, 48));
        assert_eq!(rgb.len(), 64 * 48 * 3);
        // The API's image for the same request and seed.
        let api = api_image(&site, key, json!({}));
        assert_eq!(api, rgb, "the page's image is not the API's");
        assert!(
            texts.iter().any(|(k, v)| k == "parameters"
                && v.contains("Seed: 7")
                && v.contains("Autoguidance: 2")),
            "{texts:?}"
        );
        // The key was asked once and kept in the browser; no second dialog came up.
        let kept = driver.script(&session, "return localStorage.getItem('text2img.apiKey');");
        assert_eq!(kept.as_str(), Some(key));
        let (status, _) = driver.call("GET", &format!("/session/{session}/alert/text"), None);
        assert_ne!(status, 200, "the page asked for the key again");

        inpaint_through_the_page(&driver, &session, &rgb);
        controlnet_through_the_page(&driver, &session, &site, key);
    }));
    driver.call("DELETE", &format!("/session/{session}"), None);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A picture file chosen in the upload field reaches the canvas at its own size; then
/// "send to img2img" on the result, a stroke painted across the picture with the mouse, a
/// strength on the slider, Generate: the painted area is repainted, the rest kept exactly.
fn inpaint_through_the_page(driver: &Driver, session: &str, first: &[u8]) {
    let upload = driver.element(session, "#init-file");
    let picture = parity::fixtures().join("image_inputs/picture-128x96.png");
    driver.ok(
        "POST",
        &format!("/session/{session}/element/{upload}/value"),
        Some(json!({ "text": picture.to_str().unwrap() })),
    );
    wait_for_canvas(driver, session, 128, "the uploaded picture");
    let send = driver.element(session, "#gallery .card button.send");
    driver.ok(
        "POST",
        &format!("/session/{session}/element/{send}/click"),
        Some(json!({})),
    );
    wait_for_canvas(driver, session, 64, "the sent result");
    driver.script(session, "document.getElementById('brush-size').value = 80;");
    let canvas = driver.element(session, "#mask-canvas");
    let origin = json!({ "element-6066-11e4-a52e-4f735466cecf": canvas });
    driver.ok(
        "POST",
        &format!("/session/{session}/actions"),
        Some(json!({"actions": [{"type": "pointer", "id": "mouse",
        "parameters": {"pointerType": "mouse"},
        "actions": [
            {"type": "pointerMove", "duration": 0, "origin": origin, "x": -60, "y": 0},
            {"type": "pointerDown", "button": 0},
            {"type": "pointerMove", "duration": 150, "origin": origin, "x": 60, "y": 0},
            {"type": "pointerUp", "button": 0}
        ]}]})),
    );
    driver.type_into(session, "#mask-blur", "0");
    driver.script(
        session,
        "const s = document.getElementById('strength'); s.value = 0.9; s.dispatchEvent(new Event('input'));",
    );
    assert_eq!(
        driver.script(
            session,
            "return document.getElementById('strength-value').textContent;"
        ),
        json!("0.90")
    );
    // The mask the page will send.
    let mask_url = driver.script(session, "return maskDataUrl() || null;");
    let mask_png = base64::engine::general_purpose::STANDARD
        .decode(
            mask_url
                .as_str()
                .expect("a painted mask")
                .strip_prefix("data:image/png;base64,")
                .unwrap(),
        )
        .unwrap();
    let mask = image::load_from_memory(&mask_png).unwrap().to_luma8();
    let button = driver.element(session, "#generate");
    driver.ok(
        "POST",
        &format!("/session/{session}/element/{button}/click"),
        Some(json!({})),
    );
    let png = wait_for_result(driver, session, 2, "no inpainted image");
    let (rgb, w, h, texts) = decode_png(&png);
    assert_eq!((w, h), (64, 48));
    assert!(
        texts
            .iter()
            .any(|(k, v)| k == "parameters" && v.contains("Denoising strength: 0.9")),
        "{texts:?}"
    );
    let (mut kept, mut kept_same, mut painted, mut repainted) = (0, 0, 0, 0);
    for (i, m) in mask.pixels().enumerate() {
        let same = rgb[i * 3..i * 3 + 3] == first[i * 3..i * 3 + 3];
        match m.0[0] {
            0 => {
                kept += 1;
                kept_same += usize::from(same);
            }
            255 => {
                painted += 1;
                repainted += usize::from(!same);
            }
            _ => {}
        }
    }
    assert!(
        painted > 200 && kept > 200,
        "painted {painted}, kept {kept}"
    );
    assert_eq!(kept_same, kept, "pixels outside the mask changed");
    assert!(
        repainted * 10 > painted * 9,
        "{repainted} of {painted} repainted"
    );
}

/// A control image chosen in the ControlNet panel, a model, weight and interval picked:
/// Generate gives the API's image for the same request with that unit.
fn controlnet_through_the_page(driver: &Driver, session: &str, site: &str, key: &str) {
    let remove = driver.element(session, "#remove-picture");
    driver.ok(
        "POST",
        &format!("/session/{session}/element/{remove}/click"),
        Some(json!({})),
    );
    driver.script(
        session,
        "document.getElementById('control-panel').open = true; return null;",
    );
    let control = parity::fixtures().join("controlnet/edges.png");
    let upload = driver.element(session, "#control-file");
    driver.ok(
        "POST",
        &format!("/session/{session}/element/{upload}/value"),
        Some(json!({ "text": control.to_str().unwrap() })),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while driver.script(session, "return controlImage !== null;") != json!(true) {
        assert!(Instant::now() < deadline, "the control image never loaded");
        thread::sleep(Duration::from_millis(100));
    }
    let options = driver.script(
        session,
        "return [...document.querySelectorAll('#control-model option')].map(o => o.value);",
    );
    assert_eq!(options, json!(["", "edges"]));
    driver.script(
        session,
        "document.getElementById('control-model').value = 'edges'; return null;",
    );
    driver.type_into(session, "#control-weight", "0.8");
    driver.type_into(session, "#control-end", "0.7");
    let button = driver.element(session, "#generate");
    driver.ok(
        "POST",
        &format!("/session/{session}/element/{button}/click"),
        Some(json!({})),
    );
    let png = wait_for_result(driver, session, 3, "no controlled image");
    let (rgb, ..) = decode_png(&png);
    let unit = json!({
        "enabled": true, "model": "edges", "module": "none", "weight": 0.8,
        "guidance_start": 0, "guidance_end": 0.7, "control_mode": "Balanced",
        "image": base64::engine::general_purpose::STANDARD.encode(std::fs::read(&control).unwrap()),
    });
    let api = api_image(
        site,
        key,
        json!({"alwayson_scripts": {"controlnet": {"args": [unit]}}}),
    );
    assert_eq!(api, rgb, "the page's image is not the API's");
}

/// The API's image (its pixels) for the page's request (the prompt, 64x48, 3 steps, seed 7,
/// autoguidance 2) with `extra` fields added.
fn api_image(site: &str, key: &str, extra: Value) -> Vec<u8> {
    let mut body = json!({"prompt": "a red circle on a blue background", "width": 64,
                          "height": 48, "steps": 3, "seed": 7, "autoguidance": 2});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let api = ureq::post(&format!("{site}/sdapi/v1/txt2img"))
        .set("Authorization", &format!("Bearer {key}"))
        .send_json(body)
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(api["images"][0].as_str().unwrap())
        .unwrap();
    decode_png(&png).0
}

/// Waits for the gallery's `count`-th result and returns its PNG (the newest is first).
fn wait_for_result(driver: &Driver, session: &str, count: usize, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let script = format!(
        "const i = document.querySelectorAll('#gallery img.result'); return i.length >= {count} ? i[0].src : null;"
    );
    let src = loop {
        if let Some(src) = driver.script(session, &script).as_str() {
            break src.to_string();
        }
        let status = driver.script(
            session,
            "return document.getElementById('status').textContent;",
        );
        assert!(Instant::now() < deadline, "{what}; status: {status}");
        thread::sleep(Duration::from_millis(200));
    };
    let b64 = src
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// Waits until the mask canvas has the width of the picture just given to the page.
fn wait_for_canvas(driver: &Driver, session: &str, width: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while driver.script(
        session,
        "return document.getElementById('mask-canvas').width;",
    ) != json!(width)
    {
        assert!(Instant::now() < deadline, "{what} never reached the canvas");
        thread::sleep(Duration::from_millis(100));
    }
}
