//! How far apart a text encoder keeps two captions, word by word: the figure behind
//! docs/default-model.md's "position words" findings. A U-Net's cross-attention can only tell
//! "top left" from "bottom right" if the encoder's states for the two captions differ.
//!
//!     cargo run --release --example position_words -- MODEL_DIR ["caption A" "caption B"]
//!
//! Prints, per token, the L2 distance between the two captions' final states and the norm of
//! the first's. Without captions it compares the position pair and, for scale, a color pair.

use std::path::{Path, PathBuf};

use candle_core::Device;
use text2img::text::clip::ClipTextModel;
use text2img::text::tokenizer::ClipTokenizer;

fn main() -> text2img::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first().map(PathBuf::from) else {
        eprintln!("usage: position_words MODEL_DIR [\"caption A\" \"caption B\"]");
        std::process::exit(2);
    };
    let pairs: Vec<(String, String)> = match &args[1..] {
        [a, b] => vec![(a.clone(), b.clone())],
        [] => vec![
            (
                "a large red circle in the top left on a blue background".into(),
                "a large red circle in the bottom right on a blue background".into(),
            ),
            (
                "a large red circle in the top left on a blue background".into(),
                "a large green circle in the top left on a blue background".into(),
            ),
        ],
        _ => {
            eprintln!("give two captions or none");
            std::process::exit(2);
        }
    };
    let tokenizer = load_tokenizer(&model)?;
    let encoder = ClipTextModel::load(&model.join("text_encoder"), None, &Device::Cpu)?;
    for (a, b) in pairs {
        let ids = vec![
            tokenizer.encode_padded(&a).ids,
            tokenizer.encode_padded(&b).ids,
        ];
        let states = encoder.forward(&ids, 0)?.to_vec3::<f32>()?;
        println!("{a:?} vs {b:?}");
        // Up to the longer caption's end token.
        let eos = tokenizer.eos_id();
        let last = ids
            .iter()
            .map(|t| t.iter().position(|&i| i == eos).unwrap_or(t.len() - 1))
            .max()
            .unwrap_or(0);
        for pos in 0..=last {
            let (x, y) = (&states[0][pos], &states[1][pos]);
            let dist = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).powi(2))
                .sum::<f32>()
                .sqrt();
            let norm = x.iter().map(|p| p * p).sum::<f32>().sqrt();
            let word = |t: &[u32]| tokenizer.decode(&t[pos..=pos]);
            println!(
                "  {pos:2} {:>12} {:>12}  apart {dist:6.2}  norm {norm:6.2}",
                word(&ids[0]),
                word(&ids[1])
            );
        }
    }
    Ok(())
}

/// The model's own tokenizer folder, or, when it holds only its config (as the embedded default
/// model's does), that config with the shared CLIP vocabulary.
fn load_tokenizer(model: &Path) -> text2img::Result<ClipTokenizer> {
    let own = model.join("tokenizer");
    if own.join("vocab.json").is_file() {
        return ClipTokenizer::from_folder(&own);
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/clip-tokenizer");
    let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| text2img::Error::io(p, e));
    ClipTokenizer::from_parts(
        &read(shared.join("vocab.json"))?,
        &read(shared.join("merges.txt"))?,
        Some(&read(own.join("tokenizer_config.json"))?),
        Some(&read(shared.join("special_tokens_map.json"))?),
    )
}
