//! The CLIP tokenizer against transformers' `CLIPTokenizer` (tests/fixtures/tokenizer, made by
//! `scripts/make-fixtures tokenizer`).
//!
//! Fixture folders: `clip/` holds vocab.json, merges.txt and SD 1.x configs; `clip-pad-bang/`
//! (SD 2.x configs, pad token `!`) and `clip-added-decoder/` (newer configs with
//! `added_tokens_decoder`) hold only the two config files and share clip/'s vocabulary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use text2img::text::tokenizer::*;

#[derive(Deserialize)]
struct Reference {
    transformers: String,
    tokenizers: String,
    variants: std::collections::BTreeMap<String, Variant>,
}

#[derive(Deserialize)]
struct Variant {
    model_max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    padded: Vec<u32>,
    untruncated: Vec<u32>,
    decoded: String,
    removed_text: Option<String>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read(dir: &str, name: &str) -> String {
    std::fs::read_to_string(fixtures().join(dir).join(name)).unwrap()
}

/// A complete `tokenizer/` folder for a variant: clip/'s vocabulary with the variant's configs.
fn variant_folder(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("clip").join(f), dir.path().join(f)).unwrap();
    }
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(fixtures().join(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load_variant(name: &str) -> ClipTokenizer {
    if name == "clip" {
        ClipTokenizer::from_folder(&fixtures().join("clip")).unwrap()
    } else {
        let dir = variant_folder(name);
        ClipTokenizer::from_folder(dir.path()).unwrap()
    }
}

fn check_variant(name: &str, tok: &ClipTokenizer, v: &Variant) -> Vec<String> {
    let mut failures = Vec::new();
    if tok.model_max_length() != v.model_max_length {
        failures.push(format!(
            "{name}: model_max_length {}",
            tok.model_max_length()
        ));
    }
    if (tok.bos_id(), tok.eos_id(), tok.pad_id()) != (v.bos_id, v.eos_id, v.pad_id) {
        failures.push(format!(
            "{name}: bos/eos/pad {:?}, expected {:?}",
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (v.bos_id, v.eos_id, v.pad_id)
        ));
    }
    for case in &v.cases {
        let p = &case.prompt;
        let full = tok.encode(p);
        if full != case.untruncated {
            failures.push(format!(
                "{name}: encode({p:?})\n   got {full:?}\n  want {:?}",
                case.untruncated
            ));
        }
        let padded = tok.encode_padded(p);
        if padded.ids != case.padded {
            failures.push(format!(
                "{name}: encode_padded({p:?})\n   got {:?}\n  want {:?}",
                padded.ids, case.padded
            ));
        }
        if padded.truncated != case.removed_text {
            failures.push(format!(
                "{name}: truncated({p:?}) = {:?}, want {:?}",
                padded.truncated, case.removed_text
            ));
        }
        let content = &case.untruncated[1..case.untruncated.len() - 1];
        let decoded = tok.decode(content);
        if decoded != case.decoded {
            failures.push(format!(
                "{name}: decode({p:?}) = {decoded:?}, want {:?}",
                case.decoded
            ));
        }
    }
    failures
}

#[test]
fn matches_transformers_on_every_reference_prompt() {
    let r = reference();
    assert!(!r.transformers.is_empty() && !r.tokenizers.is_empty());
    assert_eq!(r.variants.len(), 3);
    let mut failures = Vec::new();
    let mut cases = 0;
    for (name, v) in &r.variants {
        assert!(v.cases.len() >= 60, "{name}: only {} cases", v.cases.len());
        let tok = load_variant(name);
        failures.extend(check_variant(name, &tok, v));
        cases += v.cases.len();
    }
    assert!(
        failures.is_empty(),
        "{} mismatches over {cases} cases (transformers {}, tokenizers {}):\n{}",
        failures.len(),
        r.transformers,
        r.tokenizers,
        failures.join("\n")
    );
}

#[test]
fn from_parts_gives_the_same_tokenizer() {
    let r = reference();
    let vocab = read("clip", "vocab.json");
    let merges = read("clip", "merges.txt");
    for (name, v) in &r.variants {
        let cfg = read(name, "tokenizer_config.json");
        let smap = read(name, "special_tokens_map.json");
        let tok = ClipTokenizer::from_parts(&vocab, &merges, Some(&cfg), Some(&smap)).unwrap();
        let failures = check_variant(name, &tok, v);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn sd2_pad_token_is_bang() {
    let tok = load_variant("clip-pad-bang");
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.eos_id(), 49407);
    let e = tok.encode_padded("a photo of a cat");
    assert_eq!(e.ids.len(), 77);
    assert_eq!(e.truncated, None);
    let eos_at = e.ids.iter().position(|&i| i == 49407).unwrap();
    assert_eq!(&e.ids[..eos_at], &[49406, 320, 1125, 539, 320, 2368]);
    assert!(e.ids[eos_at + 1..].iter().all(|&i| i == 0));
    // the pad token is an added token: a `!` in the prompt is id 0 too, not "!</w>" (256)
    assert_eq!(tok.encode("hello!"), vec![49406, 3306, 0, 49407]);
    // SD 1.x pads with eos, and `!` is a normal word there
    let sd1 = load_variant("clip");
    assert_eq!(sd1.pad_id(), 49407);
    assert_eq!(sd1.encode("hello!"), vec![49406, 3306, 256, 49407]);
    assert!(sd1.encode_padded("hello!").ids[4..]
        .iter()
        .all(|&i| i == 49407));
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("clip/merges.txt"),
        dir.path().join("merges.txt"),
    )
    .unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab.json"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("clip/vocab.json"),
        dir.path().join("vocab.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("merges.txt"), "{err}");

    let err = ClipTokenizer::from_folder(&dir.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab.json"), "{err}");
}

#[test]
fn invalid_config_is_named() {
    let dir = variant_folder("clip");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{ not json").unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
}

#[test]
fn configs_are_optional() {
    // without the two config files: CLIPTokenizer's defaults (pad = eos, 77 positions)
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("clip").join(f), dir.path().join(f)).unwrap();
    }
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(tok.model_max_length(), 77);
    assert_eq!(
        tok.encode("a photograph of an astronaut riding a horse"),
        vec![49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    );
}

#[test]
fn fast_enough() {
    let dir = fixtures().join("clip");
    let t0 = Instant::now();
    let tok = ClipTokenizer::from_folder(&dir).unwrap();
    let load = t0.elapsed();
    let phrase = "with some extra descriptive words like beautiful and intricate";
    let prompt = "a very long prompt: ".to_string()
        + &(0..20)
            .map(|i| format!("detail number {i} {phrase}"))
            .collect::<Vec<_>>()
            .join(", ");
    let first = Instant::now();
    let e = tok.encode_padded(&prompt);
    let first = first.elapsed();
    assert!(e.truncated.is_some());
    let n = 200;
    let t1 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(tok.encode_padded(std::hint::black_box(
            "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k",
        )));
    }
    let per = t1.elapsed() / n;
    eprintln!("load {load:?}, first long encode {first:?}, encode {per:?}");
    // generous bounds: this runs unoptimized on shared machines
    assert!(load.as_secs_f64() < 5.0, "load took {load:?}");
    assert!(per.as_secs_f64() < 0.01, "encode took {per:?}");
}
