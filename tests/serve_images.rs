//! The server's image inputs, called as A1111's and OpenAI's clients call them:
//! `/sdapi/v1/img2img` (img2img with diffusers' image, inpainting that keeps what is not
//! masked), txt2img's hires fix, `/v1/images/edits` (multipart), and each bad picture a 400
//! that names its field.

mod parity;
mod server;

use base64::Engine;
use serde_json::{json, Value};

use parity::{decode_png, fixtures, psnr, read_png};
use server::{answer, b64, Server};

fn base64_file(path: &str) -> String {
    let bytes = std::fs::read(fixtures().join(path)).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The first image of an A1111 answer: (rgb, width, height, parameters).
fn first_image(body: &Value) -> (Vec<u8>, usize, usize, String) {
    let (rgb, w, h, texts) = decode_png(&b64(&body["images"][0]));
    let parameters = texts
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v)
        .unwrap_or_default();
    (rgb, w, h, parameters)
}

#[test]
fn img2img_gives_diffusers_image_and_inpainting_keeps_the_rest() {
    let server = Server::start(&[]);
    // scripts/fixtures/image_inputs.py's img2img-ddim case, through the A1111 API.
    let (status, body) = server.post(
        "/sdapi/v1/img2img",
        &json!({
            "init_images": [format!("data:image/png;base64,{}", base64_file("image_inputs/picture.png"))],
            "prompt": "a red circle on a blue background",
            "seed": 7, "steps": 10, "cfg_scale": 7.5, "sampler_name": "DDIM",
            "denoising_strength": 0.6,
        }),
    );
    assert_eq!(status, 200, "{body}");
    let (rgb, w, h, parameters) = first_image(&body);
    let (reference, ..) = read_png(&fixtures().join("reference/image_inputs/img2img-ddim-0.png"));
    assert_eq!((w, h), (64, 64));
    let db = psnr(&rgb, &reference);
    assert!(db >= parity::MATCH_DB, "{db:.1} dB against diffusers");
    assert!(
        parameters.contains("Denoising strength: 0.6"),
        "{parameters}"
    );
    assert_eq!(body["parameters"]["denoising_strength"], 0.6);

    // Inpainting as A1111 clients send it (its defaults: blur 4, fill, only masked): what
    // lies outside the blurred mask is the original picture, pixel for pixel.
    let (picture, ..) = read_png(&fixtures().join("image_inputs/picture.png"));
    let mask = image::open(fixtures().join("image_inputs/mask.png"))
        .unwrap()
        .to_luma8();
    let (status, body) = server.post(
        "/sdapi/v1/img2img",
        &json!({
            "init_images": [base64_file("image_inputs/picture.png")],
            "mask": base64_file("image_inputs/mask.png"),
            "prompt": "a green square", "seed": 3, "steps": 8, "denoising_strength": 0.9,
        }),
    );
    assert_eq!(status, 200, "{body}");
    let (rgb, w, h, _) = first_image(&body);
    assert_eq!((w, h), (64, 64));
    let (mut kept_same, mut kept, mut painted_changed, mut painted) = (0, 0, 0, 0);
    for y in 0..64 {
        for x in 0..64 {
            let i = (y * 64 + x) * 3;
            // The mask is white in x 24..58, y 8..40; its blur (sigma 4) fades out within
            // 16 pixels.
            let far = x < 8 || y >= 56;
            let same = rgb[i..i + 3] == picture[i..i + 3];
            if far {
                kept += 1;
                kept_same += usize::from(same);
            } else if mask.get_pixel(x as u32, y as u32).0[0] == 255
                && (30..52).contains(&x)
                && (14..34).contains(&y)
            {
                painted += 1;
                painted_changed += usize::from(!same);
            }
        }
    }
    assert_eq!(kept_same, kept, "kept pixels changed");
    assert!(
        painted_changed * 10 > painted * 9,
        "{painted_changed} of {painted} repainted"
    );
}

#[test]
fn hires_fix_enlarges_and_names_its_upscalers() {
    let server = Server::start(&[]);
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red circle", "seed": 1, "steps": 4, "width": 64, "height": 64,
                "enable_hr": true, "hr_scale": 1.5, "hr_upscaler": "Latent (nearest)",
                "hr_second_pass_steps": 6, "denoising_strength": 0.5}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, w, h, parameters) = first_image(&body);
    assert_eq!((w, h), (96, 96));
    for expected in [
        "Size: 64x64",
        "Hires upscale: 1.5",
        "Hires steps: 6",
        "Hires upscaler: Latent (nearest)",
        "Denoising strength: 0.5",
    ] {
        assert!(parameters.contains(expected), "{expected}: {parameters}");
    }
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "enable_hr": true, "hr_upscaler": "R-ESRGAN 4x+"}),
    );
    assert_eq!(status, 400);
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("hr_upscaler") && detail.contains("Latent, Latent (nearest)"),
        "{detail}"
    );
    // The enlarged size counts against --max-size.
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "width": 512, "height": 512, "enable_hr": true, "hr_scale": 4}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, list) = server.get("/sdapi/v1/upscalers");
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Latent", "Latent (nearest)"]);
}

#[test]
fn bad_pictures_are_a_400_that_names_the_field() {
    let server = Server::start(&["--max-size", "256"]);
    let picture = base64_file("image_inputs/picture.png");
    let bytes = std::fs::read(fixtures().join("image_inputs/picture.png")).unwrap();
    let truncated = base64::engine::general_purpose::STANDARD.encode(&bytes[..bytes.len() / 2]);
    let big = {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(300, 8)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    let black = {
        let mut png = Vec::new();
        image::DynamicImage::new_luma8(64, 64)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    let text = base64::engine::general_purpose::STANDARD.encode("just some text");
    for (body, field, needle) in [
        (json!({"prompt": "x"}), "init_images", "needs one picture"),
        (
            json!({"init_images": ["%%% not base64 %%%"]}),
            "init_images[0]",
            "is not base64",
        ),
        (
            json!({"init_images": [text]}),
            "init_images[0]",
            "not a PNG, JPEG or WebP",
        ),
        (
            json!({"init_images": [truncated]}),
            "init_images[0]",
            "decode",
        ),
        (
            json!({"init_images": [big]}),
            "init_images[0]",
            "300x8 is larger than the limit of 256",
        ),
        (
            json!({"init_images": [picture], "mask": black}),
            "",
            "the mask is empty",
        ),
        (
            json!({"init_images": [picture], "denoising_strength": 1.5}),
            "",
            "strength must be in (0, 1]",
        ),
        (
            json!({"init_images": [picture], "resize_mode": 3}),
            "resize_mode",
            "latent upscale",
        ),
        (
            json!({"init_images": picture}),
            "init_images",
            "must be an array",
        ),
    ] {
        let mut body = body;
        body["steps"] = json!(2);
        let (status, answer) = server.post("/sdapi/v1/img2img", &body);
        assert_eq!(status, 400, "{body}: {answer}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(
            detail.contains(field) && detail.contains(needle),
            "{field} / {needle}: {detail}"
        );
    }
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// A multipart body as OpenAI's Python client sends it: files with names and types, text
/// fields beside them.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----text2imgtestboundary7MA4YWxk";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
            ),
            None => body.extend(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend(*data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn png_bytes(image: &image::DynamicImage) -> Vec<u8> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

#[test]
fn openai_edits_repaint_the_transparent_area() {
    let server = Server::start(&[]);
    let picture = image::open(fixtures().join("image_inputs/picture.png")).unwrap();
    // OpenAI's mask: transparent where the image is to be edited (the right half).
    let mask = image::RgbaImage::from_fn(64, 64, |x, _| {
        image::Rgba([0, 0, 0, if x >= 32 { 0 } else { 255 }])
    });
    let (content_type, body) = multipart(&[
        ("image", Some("picture.png"), &png_bytes(&picture)),
        (
            "mask",
            Some("mask.png"),
            &png_bytes(&image::DynamicImage::ImageRgba8(mask)),
        ),
        ("prompt", None, b"a yellow square"),
        ("n", None, b"2"),
        ("model", None, b"dall-e-2"),
        ("response_format", None, b"b64_json"),
    ]);
    let (status, answer_body) = answer(
        ureq::post(&server.url("/v1/images/edits"))
            .set("Content-Type", &content_type)
            .send_bytes(&body),
    );
    assert_eq!(status, 200, "{answer_body}");
    let data = answer_body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let original = picture.to_rgb8();
    for item in data {
        let (rgb, w, h, _) = decode_png(&b64(&item["b64_json"]));
        assert_eq!((w, h), (64, 64));
        let out = image::RgbImage::from_raw(64, 64, rgb).unwrap();
        let kept =
            (0..64).all(|y| (0..32).all(|x| out.get_pixel(x, y) == original.get_pixel(x, y)));
        assert!(kept, "the opaque half changed");
        let changed = (0..64)
            .flat_map(|y| (32..64).map(move |x| (x, y)))
            .filter(|&(x, y)| out.get_pixel(x, y) != original.get_pixel(x, y))
            .count();
        assert!(
            changed > 64 * 32 * 9 / 10,
            "only {changed} pixels repainted"
        );
    }

    // A mask of another size, and no mask on an opaque image: OpenAI-style 400s.
    let small = image::DynamicImage::new_rgba8(32, 32);
    for (parts, needle) in [
        (
            vec![
                ("image", Some("p.png"), png_bytes(&picture)),
                ("mask", Some("m.png"), png_bytes(&small)),
                ("prompt", None, b"x".to_vec()),
            ],
            "it must be the image's size",
        ),
        (
            vec![
                ("image", Some("p.png"), png_bytes(&picture)),
                ("prompt", None, b"x".to_vec()),
            ],
            "no transparent area",
        ),
        (vec![("prompt", None, b"x".to_vec())], "`image` is required"),
    ] {
        let parts: Vec<(&str, Option<&str>, &[u8])> = parts
            .iter()
            .map(|(n, f, d)| (*n, *f, d.as_slice()))
            .collect();
        let (content_type, body) = multipart(&parts);
        let (status, answer_body) = answer(
            ureq::post(&server.url("/v1/images/edits"))
                .set("Content-Type", &content_type)
                .send_bytes(&body),
        );
        assert_eq!(status, 400, "{answer_body}");
        let message = answer_body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle}: {message}");
    }
}

#[test]
fn a_preview_vae_draws_full_size_progress_images() {
    let taesd = fixtures().join("image_inputs/taesd");
    let server = Server::start(&["--preview-vae", taesd.to_str().unwrap()]);
    let url = server.url("/sdapi/v1/txt2img");
    let running = std::thread::spawn(move || {
        answer(ureq::post(&url).send_string(
            &json!({"prompt": "slow", "steps": 150, "width": 128, "height": 96}).to_string(),
        ))
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let preview = loop {
        let (_, p) = server.get("/sdapi/v1/progress");
        if let Some(image) = p["current_image"].as_str() {
            break image.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no preview: {p}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (_, w, h, _) = decode_png(&b64(&json!(preview)));
    assert_eq!((w, h), (128, 96), "the preview is not full size");
    assert_eq!(server.post("/sdapi/v1/interrupt", &json!({})).0, 200);
    assert_eq!(running.join().unwrap().0, 200);
}

/// The built-in default model through both image APIs, as a first-time user meets them: a
/// txt2img picture sent back to img2img, then an OpenAI edit of its left half.
#[test]
fn the_default_model_serves_img2img_and_edits() {
    let server = Server::start_default(&[]);
    let (status, body) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red circle on a blue background", "seed": 5}),
    );
    assert_eq!(status, 200, "{body}");
    let first = body["images"][0].as_str().unwrap().to_string();
    let (status, body) = server.post(
        "/sdapi/v1/img2img",
        &json!({"init_images": [first], "prompt": "a green square on a yellow background",
                "seed": 5, "denoising_strength": 0.6}),
    );
    assert_eq!(status, 200, "{body}");
    let (rgb, w, h, parameters) = first_image(&body);
    assert!(
        parameters.contains("Denoising strength: 0.6"),
        "{parameters}"
    );
    let picture = image::RgbImage::from_raw(w as u32, h as u32, rgb).unwrap();
    // An OpenAI edit: the left half transparent, to be repainted.
    let mut rgba = image::DynamicImage::ImageRgb8(picture.clone()).to_rgba8();
    for (x, _, p) in rgba.enumerate_pixels_mut() {
        if x < w as u32 / 2 {
            p.0[3] = 0;
        }
    }
    let (content_type, body) = multipart(&[
        (
            "image",
            Some("picture.png"),
            &png_bytes(&image::DynamicImage::ImageRgba8(rgba)),
        ),
        ("prompt", None, b"a red triangle"),
    ]);
    let (status, answer_body) = answer(
        ureq::post(&server.url("/v1/images/edits"))
            .set("Content-Type", &content_type)
            .send_bytes(&body),
    );
    assert_eq!(status, 200, "{answer_body}");
    let (rgb, ew, eh, _) = decode_png(&b64(&answer_body["data"][0]["b64_json"]));
    assert_eq!((ew, eh), (w, h));
    let edited = image::RgbImage::from_raw(ew as u32, eh as u32, rgb).unwrap();
    for (x, y, p) in edited.enumerate_pixels() {
        if x >= w as u32 / 2 {
            assert_eq!(
                p,
                picture.get_pixel(x, y),
                "the opaque half changed at {x},{y}"
            );
        }
    }
}
