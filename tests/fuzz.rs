//! Fuzzing the parsers that see untrusted bytes, on stable Rust: each target gets its seed
//! corpus, then random mutations of it (byte flips, insertions, deletions, splices) and random
//! bytes, and must answer every input with a value or an error: never a panic, a hang or a
//! runaway allocation. CI runs a few thousand inputs per target; `scripts/fuzz` runs each for
//! longer (TEXT2IMG_FUZZ_SECONDS) and prints executions per target.
//!
//! Targets: A1111's prompt syntax and `<lora:...>` tags, the pickle reader, PyTorch zip
//! checkpoints, safetensors files (as checkpoints, LoRAs and embeddings), the CLIP tokenizer,
//! and the server's JSON request fields.

mod parity;

use std::time::{Duration, Instant};

use parity::{fixtures, model_dir};

/// xorshift64*: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A mutation of one of the seeds (or random bytes).
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(10) == 0 {
        let len = rng.below(64);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut input = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(5) {
            0 if !input.is_empty() => {
                let i = at.min(input.len() - 1);
                input[i] ^= 1 << rng.below(8);
            }
            1 => input.insert(at, rng.next() as u8),
            2 if at < input.len() => {
                input.remove(at);
            }
            3 => {
                // Interesting values: lengths and opcodes at their edges.
                let v = [0u8, 0x7f, 0x80, 0xff, b'(', b')', b':', b'<', b'>', b'\\'][rng.below(10)];
                input.insert(at, v);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                let take = rng.below(32).min(other.len() - from);
                input.splice(at..at, other[from..from + take].iter().copied());
            }
        }
    }
    input
}

/// How long each target runs: a few thousand inputs in CI, longer from scripts/fuzz.
fn budget() -> (usize, Duration) {
    match std::env::var("TEXT2IMG_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        Some(s) => (usize::MAX, Duration::from_secs_f64(s)),
        None => (5_000, Duration::from_secs(20)),
    }
}

fn fuzz(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    let (most, time) = budget();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let started = Instant::now();
    let mut execs = 0usize;
    for seed in &seeds {
        target(seed);
        execs += 1;
    }
    while execs < most && started.elapsed() < time {
        let input = mutate(&mut rng, &seeds);
        let one = Instant::now();
        target(&input);
        // A single input that takes seconds is a hang in the making.
        assert!(
            one.elapsed() < Duration::from_secs(5),
            "{name}: slow input {input:?}"
        );
        execs += 1;
    }
    eprintln!(
        "fuzz {name}: {execs} executions in {:.1} s, no failure",
        started.elapsed().as_secs_f64()
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn fuzz_prompt_syntax_and_lora_tags() {
    let seeds = [
        "a (red:1.5) circle on a [[blue]] background, ((bright))",
        "\\(literal\\] (unbalanced [x BREAK y) :1.2) (x:1.2.3)",
        "a <lora:style:0.8> cat <lora:eyes:0.5:1.2> <lora:",
        "BREAKFAST BREAK (((((((((a)))))))))",
    ];
    let seeds: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    let tokens = text2img::text::prompt_syntax::ChunkTokens {
        bos: 1,
        eos: 2,
        comma: Some(44),
        per_chunk: 75,
    };
    fuzz("prompt syntax", seeds, |bytes| {
        let prompt = text(bytes);
        let pieces = text2img::text::prompt_syntax::parse(&prompt);
        let chunks = text2img::text::prompt_syntax::chunks(
            &pieces,
            |s| s.bytes().map(u32::from).collect(),
            &tokens,
            &[],
        );
        assert!(chunks
            .iter()
            .all(|c| c.ids.len() == 77 && c.weights.len() == 77));
        let _ = text2img::text::extra_networks::take_lora_tags(&prompt);
    });
}

#[test]
fn fuzz_pickles() {
    let mut seeds = vec![
        b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.".to_vec(),
        b"\x80\x02cos\nsystem\nq\x00X\x08\x00\x00\x00touch xxq\x01\x85q\x02Rq\x03.".to_vec(),
    ];
    // The pickle of a real checkpoint: data.pkl inside the fixture's zip.
    let ckpt = std::fs::read(model_dir("single-file").join("sd1-tiny.ckpt")).unwrap();
    if let Some(start) = ckpt.windows(2).position(|w| w == [0x80, 0x02]) {
        seeds.push(ckpt[start..(start + 4096).min(ckpt.len())].to_vec());
    }
    fuzz("pickle", seeds, |bytes| {
        let _ = text2img::weights::pickle::read(bytes);
    });
}

#[test]
fn fuzz_checkpoint_and_adapter_files() {
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<Vec<u8>> = [
        fixtures().join("embeddings/wideemb.safetensors"),
        fixtures().join("embeddings/xlemb.safetensors"),
        fixtures().join("embeddings/shinyemb.pt"),
        model_dir("single-file").join("evil.ckpt"),
    ]
    .iter()
    .map(|p| std::fs::read(p).unwrap())
    .collect();
    let device = candle_core::Device::Cpu;
    fuzz("safetensors, zip and pickle files", seeds, |bytes| {
        for (name, is_zip) in [("x.safetensors", false), ("x.pt", true)] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let _ = text2img::text::embeddings::Embedding::load(&path);
            let _ = text2img::weights::lora::Lora::load(&path);
            if is_zip {
                let _ = text2img::weights::torch_file::read_tensors(&path);
            } else {
                let _ = text2img::weights::single_file::Checkpoint::open(&path, &device);
            }
        }
    });
}

#[test]
fn fuzz_tokenizer_and_request_fields() {
    let tokenizer = text2img::text::tokenizer::ClipTokenizer::from_folder(
        &model_dir("sd1-tiny").join("tokenizer"),
    )
    .unwrap();
    let seeds: Vec<Vec<u8>> = [
        r#"{"prompt": "a cat", "steps": 20, "width": 512, "cfg_scale": 7.5, "seed": -1}"#,
        r#"{"guidance_interval": [0.1, 0.9], "sampler_name": "Euler a", "n_iter": 2}"#,
        "naïve café — 東京 🚀 <|endoftext|> 'll 's",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("tokenizer and JSON fields", seeds, |bytes| {
        let s = text(bytes);
        let ids = tokenizer.encode(&s);
        assert!(ids.len() >= 2);
        let _ = tokenizer.encode_padded(&s);
        if let Ok(fields) = text2img::serve::fields::Fields::parse(bytes) {
            for name in [
                "prompt",
                "steps",
                "width",
                "cfg_scale",
                "seed",
                "guidance_interval",
            ] {
                let _ = fields.string(name);
                let _ = fields.integer(name);
                let _ = fields.number(name);
                let _ = fields.number_pair(name);
            }
        }
    });
}

#[test]
fn fuzz_model_configs() {
    use std::path::Path;
    let seeds: Vec<Vec<u8>> = ["unet", "vae", "text_encoder"]
        .iter()
        .map(|c| std::fs::read(model_dir("sdxl-tiny").join(c).join("config.json")).unwrap())
                .chain([std::fs::read(model_dir("sd1-tiny").join("unet/config.json")).unwrap()])
        // Found by scripts/fuzz: zero norm groups divided by zero (U-Net and VAE).
        .chain([
            br#"{"block_out_channels": [32], "norm_num_groups": 0, "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 1, "attention_head_dim": 8, "cross_attention_dim": 32, "sample_size": 8}"#.to_vec(),
            br#"{"block_out_channels": [16], "norm_num_groups": 0, "latent_channels": 4}"#.to_vec(),
        ])
        .collect();
    let origin = Path::new("config.json");
    // The regressions are errors that say why, not panics.
    let unet = text2img::latent::unet::UNetConfig::from_json(&text(&seeds[4]), origin);
    let vae = text2img::vae::config::VaeConfig::from_json(&text(&seeds[5]), origin);
    for e in [
        unet.err().unwrap().to_string(),
        vae.err().unwrap().to_string(),
    ] {
        assert!(e.contains("norm_num_groups"), "{e}");
    }
    fuzz("model configs", seeds, |bytes| {
        let s = text(bytes);
        let _ = text2img::latent::unet::UNetConfig::from_json(&s, origin);
        let _ = text2img::vae::config::VaeConfig::from_json(&s, origin);
        let _ = text2img::text::clip::ClipTextConfig::from_json(&s, origin);
    });
}

/// Uploaded pictures: PNG, JPEG and WebP bytes mutated, through the decoder with its size
/// limit, and as base64 request fields (data URLs, both alphabets). Each either decodes to
/// a picture within the limit or is refused; nothing panics, nothing decodes past the limit.
#[test]
fn fuzz_pictures_and_base64_fields() {
    use base64::Engine;
    let picture = std::fs::read(fixtures().join("image_inputs/picture.png")).unwrap();
    let encode = |format: image::ImageFormat| {
        let mut out = Vec::new();
        image::DynamicImage::new_rgba8(9, 7)
            .write_to(&mut std::io::Cursor::new(&mut out), format)
            .unwrap();
        out
    };
    let jpeg = {
        let mut out = Vec::new();
        image::DynamicImage::new_rgb8(12, 8)
            .write_to(
                &mut std::io::Cursor::new(&mut out),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        out
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&picture);
    let seeds = vec![
        picture.clone(),
        encode(image::ImageFormat::Png),
        encode(image::ImageFormat::WebP),
        jpeg,
        format!(r#"{{"init_images": ["data:image/png;base64,{b64}"], "mask": "{b64}"}}"#)
            .into_bytes(),
    ];
    fuzz("pictures and base64 fields", seeds, |bytes| {
        if let Ok(image) = text2img::image_in::decode(bytes, "fuzz", 256) {
            assert!(image.width() <= 256 && image.height() <= 256);
            let _ = text2img::image_in::luma(&image);
            let _ = text2img::image_in::transparency_mask(&image);
        }
        if let Ok(fields) = text2img::serve::fields::Fields::parse(bytes) {
            if let Ok(images) = fields.images("init_images", 256) {
                assert!(images.iter().all(|i| i.width() <= 256 && i.height() <= 256));
            }
            let _ = fields.image("mask", 256);
        }
        let text = text(bytes);
        let _ = text2img::serve::fields::decode_image("f", &text, 256);
    });
}

/// Multipart bodies as `/v1/images/edits` reads them (axum's multipart parser over a body
/// already held within the size limit): mutated forms are parsed field by field; each part
/// either reads or is an error, and nothing panics.
#[test]
fn fuzz_multipart_forms() {
    use axum::extract::FromRequest;
    let boundary = "----fuzzboundary";
    let picture = std::fs::read(fixtures().join("image_inputs/picture.png")).unwrap();
    let mut form = Vec::new();
    for (name, file, data) in [
        ("image", Some("p.png"), picture.as_slice()),
        ("prompt", None, b"a red circle".as_slice()),
        ("n", None, b"2".as_slice()),
    ] {
        form.extend(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => form.extend(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n")
                    .as_bytes(),
            ),
            None => form.extend(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        form.extend(data);
        form.extend(b"\r\n");
    }
    form.extend(format!("--{boundary}--\r\n").as_bytes());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    fuzz("multipart forms", vec![form], |bytes| {
        runtime.block_on(async {
            let mut request = axum::http::Request::new(axum::body::Body::from(bytes.to_vec()));
            request.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}")
                    .parse()
                    .unwrap(),
            );
            let Ok(mut multipart) = axum::extract::Multipart::from_request(request, &()).await
            else {
                return;
            };
            while let Ok(Some(field)) = multipart.next_field().await {
                let name = field.name().unwrap_or_default().to_string();
                if let Ok(data) = field.bytes().await {
                    if name == "image" {
                        let _ = text2img::serve::fields::image_bytes("image", &data, 256);
                    }
                }
            }
        });
    });
}
