//! `evaluate` and `grid`: how a model trained on `shapes` does, in numbers and in a picture.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use text2img::pipeline::{GenerateRequest, Pipeline};
use text2img::png_out::{encode_rgb_png, grid, write_atomic};
use text2img::train::evaluate::{evaluate, EvaluateOptions, ImageVerdict};

use crate::guidance_args::GuidanceArgs;

#[derive(Args)]
pub struct EvaluateArgs {
    /// The model folder (default: the built-in model).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 8)]
    pub seeds: usize,
    /// The first seed (the goals are measured from 1000; choose settings on another range, say
    /// 2000, so that the figures on 1000.. are not tuned to their own seeds).
    #[arg(long, default_value_t = text2img::train::evaluate::EVALUATION_FIRST_SEED)]
    pub first_seed: u64,
    /// Evaluate every k-th prompt of the fixed set only (of the --group ones; quick runs).
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Evaluate only this group of prompts: seen, held-out, two-shape or open (repeat the
    /// flag for several; default: all).
    #[arg(long = "group")]
    pub groups: Vec<text2img::train::evaluate::Group>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[command(flatten)]
    pub guidance: GuidanceArgs,
    /// How many of the data set's own images the checker scores (must be 100 %).
    #[arg(long, default_value_t = 500)]
    pub ground_truth: usize,
    /// Also write every verdict (prompt, seed, attribute, stated, seen, right) to this CSV.
    #[arg(long)]
    pub details: Option<PathBuf>,
}

pub fn load(model: Option<&str>) -> Result<Pipeline> {
    Ok(crate::assets::load_model(model, None, Default::default(), Vec::new(), None)?.0)
}

pub fn evaluate_cmd(a: EvaluateArgs) -> Result<()> {
    // Fail before minutes of generation, not after, when the details file cannot be written.
    if let Some(dir) = a.details.as_deref().and_then(|p| p.parent()) {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            anyhow::bail!("--details: folder {} does not exist", dir.display());
        }
    }
    let pipeline = load(a.model.as_deref())?;
    let options = EvaluateOptions {
        seeds: a.seeds,
        first_seed: a.first_seed,
        stride: a.stride,
        groups: a.groups,
        steps: a.steps,
        guidance_scale: a.guidance.guidance_scale,
        guidance_rescale: a.guidance.guidance_rescale,
        guidance_interval: a.guidance.guidance_interval,
        autoguidance: a.guidance.autoguidance,
        ground_truth_images: a.ground_truth,
        keep_verdicts: a.details.is_some(),
    };
    let bar = indicatif::ProgressBar::new(0);
    let report = evaluate(&pipeline, &options, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    print!("{}", report.print());
    if let Some(path) = &a.details {
        let mut csv = String::from(ImageVerdict::CSV_HEADER);
        csv.push('\n');
        for v in &report.verdicts {
            csv.push_str(&v.csv_line());
            csv.push('\n');
        }
        write_atomic(path, csv.as_bytes())?;
    }
    Ok(())
}

#[derive(Args)]
pub struct GridArgs {
    #[arg(long)]
    pub model: Option<String>,
    /// One row per prompt (repeat the flag).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Columns: seeds seed, seed+1, ...
    #[arg(long, default_value_t = 8)]
    pub seeds: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub steps: Option<usize>,
    #[command(flatten)]
    pub guidance: GuidanceArgs,
    #[arg(long)]
    pub output: PathBuf,
}

pub fn grid_cmd(a: GridArgs) -> Result<()> {
    let pipeline = load(a.model.as_deref())?;
    let mut rows = Vec::new();
    for prompt in &a.prompts {
        let request = GenerateRequest {
            prompts: vec![prompt.clone()],
            seed: Some(a.seed),
            num_images: a.seeds,
            steps: a.steps,
            guidance_scale: a.guidance.guidance_scale,
            guidance_rescale: a.guidance.guidance_rescale,
            guidance_interval: a.guidance.guidance_interval,
            autoguidance: a.guidance.autoguidance,
            ..Default::default()
        };
        rows.push(pipeline.generate(&request, &mut |_| true)?.images);
    }
    let (canvas, gw, gh) = grid(&rows, 2)?;
    let params = format!(
        "grid: {} prompts x seeds {}..{}",
        a.prompts.len(),
        a.seed,
        a.seed + a.seeds as u64 - 1
    );
    write_atomic(&a.output, &encode_rgb_png(&canvas, gw, gh, Some(&params))?)?;
    println!(
        "{} ({} x {} images)",
        a.output.display(),
        a.prompts.len(),
        a.seeds
    );
    Ok(())
}
