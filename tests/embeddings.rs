//! Textual-inversion embeddings in A1111's, SDXL's and diffusers' formats against diffusers'
//! own `load_textual_inversion` (scripts/fixtures/embeddings.py): the same image with the
//! embedding, another without it; embeddings of the wrong width refused or left out.

mod parity;

use parity::{fixtures, model_dir, psnr, read_png};
use serde_json::Value;
use text2img::pipeline::{load_local, LoadOptions, Pipeline};
use text2img::text::embeddings::Embedding;

fn render(pipeline: &Pipeline, prompt: &str) -> Vec<u8> {
    parity::render_fixture_case(pipeline, prompt)
}

#[test]
fn embeddings_give_diffusers_image() {
    let text = std::fs::read_to_string(fixtures().join("reference/embeddings.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut pipeline = load_local(
            &model_dir(case["model"].as_str().unwrap()),
            &LoadOptions::default(),
        )
        .unwrap();
        let (reference, ..) = read_png(
            &fixtures()
                .join("reference")
                .join(case["image"].as_str().unwrap()),
        );
        let prompt = case["prompt"].as_str().unwrap();
        let without = psnr(&render(&pipeline, prompt), &reference);
        let file = fixtures()
            .join("embeddings")
            .join(case["embedding"].as_str().unwrap());
        let embedding = Embedding::load(&file).unwrap();
        pipeline.add_embeddings(vec![embedding], true).unwrap();
        let with = psnr(&render(&pipeline, prompt), &reference);
        eprintln!("{name}: {with:.1} dB with the embedding, {without:.1} dB without");
        assert!(with >= parity::MATCH_DB, "{name}: {with:.1} dB");
        assert!(
            without < 45.0,
            "{name}: {without:.1} dB without the embedding"
        );
    }
}

#[test]
fn an_embedding_of_another_width_is_refused_or_left_out() {
    let mut sd1 = load_local(&model_dir("sd1-tiny"), &LoadOptions::default()).unwrap();
    // A shared folder as people keep one: sorted into subfolders by model, with a file that
    // is not an embedding and a hidden folder.
    let dir = tempfile::tempdir().unwrap();
    for sub in ["sd15", "sdxl", ".trash"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    for entry in std::fs::read_dir(fixtures().join("embeddings")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(
            &path,
            dir.path().join("sd15").join(path.file_name().unwrap()),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("broken.safetensors"), b"not a file").unwrap();
    std::fs::write(dir.path().join(".trash/old.pt"), b"not a file").unwrap();
    // An embedding 48 wide, for an SD 1.x model whose text encoder is 32 wide.
    let wide =
        candle_core::Tensor::zeros((2, 48), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let wide_file = dir.path().join("sdxl/wide48.safetensors");
    candle_core::safetensors::save(&[("emb_params".to_string(), wide)].into(), &wide_file).unwrap();
    let err = sd1
        .add_embeddings(vec![Embedding::load(&wide_file).unwrap()], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("wide48") && err.contains("takes 32"), "{err}");
    // From a folder and its subfolders: the broken file and the one of another width left
    // out with warnings, the hidden folder not read, the rest kept.
    let (all, unread) = Embedding::load_dir(dir.path()).unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(unread.len(), 1, "{unread:?}");
    assert!(unread[0].contains("broken.safetensors"), "{unread:?}");
    let warnings = sd1.add_embeddings(all, false).unwrap();
    let kept: Vec<&str> = sd1.embeddings.iter().map(|e| e.name.as_str()).collect();
    // (An SDXL embedding's clip_l vectors fit a CLIP ViT-L text encoder: kept.)
    assert_eq!(
        kept,
        ["shinyemb", "toyemb", "wideemb", "xlemb"],
        "{warnings:?}"
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        sd1.skipped_embeddings,
        [text2img::pipeline::SkippedEmbedding {
            name: "wide48".into(),
            vectors: Some(2),
            width: Some(48)
        }]
    );
    // Not an embedding at all.
    let err =
        Embedding::load(&model_dir("sd1-tiny").join("vae/diffusion_pytorch_model.safetensors"))
            .unwrap_err()
            .to_string();
    assert!(err.contains("not a textual-inversion embedding"), "{err}");
}
