//! The text2img command line: parses flags into a request, shows progress, writes files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use text2img::latent::schedulers::{SchedulerKind, TimestepSpacing};
use text2img::pipeline::GenerateRequest;

use guidance_args::GuidanceArgs;
use text2img::png_out::{a1111_parameters, encode_png, numbered_path, write_atomic};

mod assets;
mod batch;
mod bench;
mod control_args;
mod eval;
mod guidance_args;
mod image_args;
mod serve;
mod train;

#[derive(Parser)]
#[command(
    name = "text2img",
    version,
    about = "Text-to-image diffusion (Stable Diffusion 1.x/2.x/XL) on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Generate(Box<GenerateArgs>),
    /// Write a data set to disk (images with same-named .txt captions).
    Dataset(train::DatasetArgs),
    /// Train the autoencoder (first stage of the Latent Diffusion recipe).
    TrainVae(train::TrainVaeArgs),
    /// Train the U-Net (and a joint text encoder) on the autoencoder's latents.
    Train(train::TrainArgs),
    /// Average the U-Net and text-encoder weights of fine-tunes of one model (a model soup).
    AverageWeights(train::AverageArgs),
    /// Score a model trained on `shapes`: prompt adherence and diversity.
    Evaluate(eval::EvaluateArgs),
    /// Render prompts x seeds as one PNG.
    Grid(eval::GridArgs),
    /// Serve an HTTP API (A1111- and OpenAI-compatible) and a web page.
    Serve(serve::ServeArgs),
    /// Run one txt2img request per line of a JSON-lines file, here or through a Redis queue.
    Batch(batch::BatchArgs),
    /// Run the jobs of a Redis queue that `serve --redis` front ends fill.
    Worker(serve::WorkerArgs),
    /// Time the parts of a generation (load, text, U-Net step, VAE decode) and sgemm.
    Bench(bench::BenchArgs),
    /// Write a single-file checkpoint (.safetensors, .ckpt) or a diffusers folder as a
    /// diffusers folder, its weight matrices in another dtype if asked (--dtype q8).
    Convert(ConvertArgs),
    /// Write the control image a ControlNet preprocessor makes (canny edges).
    Preprocess(control_args::PreprocessArgs),
}

#[derive(Args)]
struct ConvertArgs {
    /// The checkpoint file, or a diffusers folder.
    file: std::path::PathBuf,
    /// The diffusers folder to write (must not exist).
    #[arg(long)]
    out: std::path::PathBuf,
    /// A diffusers folder whose configs describe the file (other than the released
    /// architectures).
    #[arg(long, value_name = "DIR")]
    config: Option<std::path::PathBuf>,
    /// What the U-Net predicts (default: the config's; SD 2.x files are probed).
    #[arg(long, value_parser = ["epsilon", "v_prediction"])]
    prediction_type: Option<String>,
    /// Write the U-Net's EMA weights (`model_ema.*`) instead of its weights.
    #[arg(long)]
    ema: bool,
    /// Write the weight matrices and convolution kernels as this (q8: int8 with a scale per
    /// output channel, which then loads as q8 with no quantizing); default: as stored.
    #[arg(long, value_enum)]
    dtype: Option<assets::WeightDtype>,
    /// A diffusers folder's weights of this variant (`fp16`: `*.fp16.safetensors`); the
    /// folder written has them as its plain weights.
    #[arg(long)]
    variant: Option<String>,
}

fn convert(a: ConvertArgs) -> Result<()> {
    // The matrices as written (`None`: as stored), and as the test load before keeps them.
    let matrices = a.dtype.map(assets::WeightDtype::dtype);
    let weight_dtype = matrices.unwrap_or_default();
    if a.file.is_dir() {
        if a.config.is_some() || a.prediction_type.is_some() || a.ema {
            bail!("--config, --prediction-type and --ema apply to a single-file checkpoint");
        }
        let options = text2img::LoadOptions {
            weight_dtype,
            variant: a.variant,
            ..Default::default()
        };
        text2img::pipeline::convert::convert_folder(&a.file, &options, matrices, &a.out)
            .with_context(|| format!("converting {}", a.file.display()))?;
        println!("{}", a.out.display());
        return Ok(());
    }
    if a.variant.is_some() {
        bail!("--variant applies to a diffusers folder");
    }
    let options = text2img::pipeline::SingleFileOptions {
        config: a.config,
        prediction_type: a.prediction_type,
        ema: a.ema,
        load: text2img::LoadOptions {
            weight_dtype,
            ..Default::default()
        },
        ..Default::default()
    };
    text2img::pipeline::single_file::convert_single_file(&a.file, &options, matrices, &a.out)
        .with_context(|| format!("converting {}", a.file.display()))?;
    println!("{}", a.out.display());
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: crate::assets::ModelArgs,
    #[arg(long)]
    prompt: String,
    /// The second text encoder's prompt (SDXL); default: --prompt.
    #[arg(long)]
    prompt_2: Option<String>,
    /// Without it: "" for SD 1.x/2.x, zero embeddings for SDXL (as diffusers).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// The second text encoder's negative prompt (SDXL); default: --negative-prompt.
    #[arg(long)]
    negative_prompt_2: Option<String>,
    /// Image i uses seed + i; without it a seed is drawn and printed.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    steps: Option<usize>,
    #[command(flatten)]
    guidance: GuidanceArgs,
    #[command(flatten)]
    images: image_args::ImageInputArgs,
    #[command(flatten)]
    control: control_args::ControlArgs,
    /// pndm, ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras, lcm (default: the model's
    /// own).
    #[arg(long)]
    scheduler: Option<String>,
    /// Override the scheduler's timestep spacing: linspace, leading, trailing (SD-Turbo and
    /// few-step sampling use trailing).
    #[arg(long)]
    timestep_spacing: Option<String>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// DDIM's eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Use the output of the text encoder's layer N from the end (1 = penultimate).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// How prompts are read: a1111 ((word:1.3) weights, BREAK, no 77-token limit) or plain
    /// (as diffusers: no weights, cut at 77 tokens).
    #[arg(long, value_parser = ["a1111", "plain"], default_value = "a1111")]
    prompt_syntax: String,
    /// Decode (and encode) in overlapping tiles, as diffusers' `vae.enable_tiling()`: large
    /// images in the memory of one tile.
    #[arg(long)]
    vae_tiling: bool,
    /// Print the estimated time and memory (as `serve` estimates them to admit a request)
    /// before generating, and the measured ones after.
    #[arg(long)]
    estimate: bool,
    /// SDXL: the original image size the model is told, WxH (default: the output size).
    #[arg(long, value_parser = parse_size)]
    original_size: Option<(usize, usize)>,
    /// SDXL: the crop's top-left corner the model is told, TOP,LEFT (default 0,0).
    #[arg(long, value_parser = parse_pair)]
    crop_top_left: Option<(usize, usize)>,
    /// SDXL: the target size the model is told, WxH (default: the output size).
    #[arg(long, value_parser = parse_size)]
    target_size: Option<(usize, usize)>,
    /// The PNG to write; with several images, `NAME-1.png`, `NAME-2.png`, ...
    #[arg(long)]
    output: PathBuf,
}

/// `WxH` to (height, width), the order diffusers' size arguments use.
fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let (w, h) = text2img::pipeline::size::parse_wxh(text)
        .ok_or_else(|| format!("`{text}` is not a size such as 1024x1024"))?;
    Ok((h, w))
}

/// `A,B` to (A, B).
fn parse_pair(text: &str) -> Result<(usize, usize), String> {
    let (a, b) = text
        .split_once(',')
        .ok_or_else(|| format!("`{text}` is not a pair such as 0,0"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{text}` is not a pair such as 0,0"))
    };
    Ok((parse(a)?, parse(b)?))
}

/// Counts heap bytes, so the server can measure what a generation needs.
#[global_allocator]
static ALLOCATOR: text2img::alloc_count::CountingAllocator =
    text2img::alloc_count::CountingAllocator;

fn main() -> ExitCode {
    // First thing, before any other thread exists.
    text2img::process::configure();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(*args),
        Command::Dataset(args) => train::dataset(args),
        Command::TrainVae(args) => train::train_vae_cmd(args),
        Command::Train(args) => train::train_cmd(args),
        Command::AverageWeights(args) => train::average_cmd(args),
        Command::Evaluate(args) => eval::evaluate_cmd(args),
        Command::Grid(args) => eval::grid_cmd(args),
        Command::Serve(args) => serve::serve_cmd(args),
        Command::Worker(args) => serve::worker_cmd(args),
        Command::Batch(args) => batch::batch_cmd(args),
        Command::Bench(args) => bench::bench_cmd(args),
        Command::Convert(args) => convert(args),
        Command::Preprocess(args) => control_args::preprocess_cmd(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: the library's messages already end with their
/// source's text (`path: No such file or directory`), which anyhow's `{:#}` would repeat.
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if message.is_empty() {
            message = text;
        } else if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
    }
    message
}

fn generate(args: GenerateArgs) -> Result<()> {
    let scheduler = args
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_cli_name)
        .transpose()?;
    if args
        .output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        != Some("png".into())
    {
        bail!("--output {} must be a .png file", args.output.display());
    }
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("--output: folder {} does not exist", dir.display());
        }
    }
    // A1111's `<lora:NAME:W>` tags ask for LoRAs and leave the text.
    let written_prompt = args.prompt.clone();
    let (prompt, lora_tags) =
        text2img::text::extra_networks::take_lora_tags(&args.prompt).map_err(anyhow::Error::msg)?;
    let mut request = GenerateRequest {
        prompts: std::iter::once(prompt).chain(args.prompt_2).collect(),
        negative_prompts: match (args.negative_prompt, args.negative_prompt_2) {
            (None, None) => None,
            (first, second) => Some(
                std::iter::once(first.unwrap_or_default())
                    .chain(second)
                    .collect(),
            ),
        },
        timestep_spacing: args
            .timestep_spacing
            .as_deref()
            .map(TimestepSpacing::parse)
            .transpose()?,
        original_size: args.original_size,
        crop_top_left: args.crop_top_left.unwrap_or((0, 0)),
        target_size: args.target_size,
        seed: args.seed,
        steps: args.steps,
        guidance_scale: args.guidance.guidance_scale,
        guidance_rescale: args.guidance.guidance_rescale,
        guidance_interval: args.guidance.guidance_interval,
        autoguidance: args.guidance.autoguidance,
        scheduler,
        width: args.width,
        height: args.height,
        num_images: args.num_images,
        eta: args.eta,
        clip_skip: args.clip_skip,
        prompt_syntax: if args.prompt_syntax == "plain" {
            text2img::pipeline::PromptSyntax::Plain
        } else {
            text2img::pipeline::PromptSyntax::A1111
        },
        vae_tiling: args.vae_tiling,
        ..GenerateRequest::default()
    };
    args.images.apply(&mut request)?;
    args.control.apply(&mut request)?;
    let started = Instant::now();
    let (mut pipeline, _) = args.model.load_with(&lora_tags)?;
    args.control.load(&mut pipeline, args.model.dtype.dtype())?;
    let load_time = started.elapsed();
    // Check the request before the long work, so a bad size fails at once.
    let resolved = pipeline.resolve(&request)?;
    if args.estimate {
        let probed = Instant::now();
        let model = text2img::pipeline::cost::CostModel::measure(&pipeline)?;
        let cfg = resolved.guidance_scale > 1.0 && !pipeline.embeds_guidance();
        let e = model.estimate(
            &resolved,
            request.num_images,
            cfg,
            resolved.autoguidance > 1.0,
        );
        println!(
            "estimate: {:.2} s, peak {} beyond the model ({:.1} GFLOP; probes took {:.2} s)",
            e.seconds,
            e.peak_bytes
                .map_or("unknown".into(), |b| format!("{:.0} MB", b / 1e6)),
            e.flops / 1e9,
            probed.elapsed().as_secs_f64()
        );
        text2img::alloc_count::reset_peak();
    }
    let before_generation = text2img::alloc_count::live();
    let generating = Instant::now();

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let model_name = pipeline.name.clone();
    let mut on_step = |p: &text2img::pipeline::StepProgress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    };
    // With --estimate the models stay loaded through the decode, as a server keeps them, so
    // the measured peak compares with the estimate; otherwise the decode reuses their memory.
    let generation = if args.estimate {
        pipeline.generate(&request, &mut on_step)?
    } else {
        pipeline.generate_once(&request, &mut on_step)?
    };
    bar.finish_and_clear();
    if args.estimate {
        let peak = text2img::alloc_count::peak()
            .zip(before_generation)
            .map(|(p, b)| p.saturating_sub(b));
        println!(
            "measured: {:.2} s, peak {} beyond the model",
            generating.elapsed().as_secs_f64(),
            peak.map_or("unknown".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
        );
    }
    for warning in &generation.warnings {
        eprintln!("warning: {warning}");
    }
    let count = generation.images.len();
    for (i, image) in generation.images.iter().enumerate() {
        let path = numbered_path(&args.output, i, count);
        // The prompt as written, `<lora:...>` tags included, as A1111 records it.
        let mut recorded = request.clone();
        recorded.prompts[0] = written_prompt.clone();
        let parameters = a1111_parameters(&recorded, &resolved, image.seed, &model_name);
        write_atomic(&path, &encode_png(image, &parameters)?)?;
        println!("{} (seed {})", path.display(), image.seed);
    }
    let t = &generation.timings;
    // PNDM runs one more U-Net evaluation than its step count: time per evaluation.
    let evaluations = generation.completed_steps.max(1);
    let steps = if evaluations == resolved.steps {
        format!("{} steps", resolved.steps)
    } else {
        format!("{} steps ({evaluations} evaluations)", resolved.steps)
    };
    println!(
        "load {:.2}s, text {:.2}s, {steps} {:.2}s ({:.3}s/evaluation), decode {:.2}s",
        load_time.as_secs_f64(),
        t.text.as_secs_f64(),
        t.steps.as_secs_f64(),
        t.steps.as_secs_f64() / evaluations as f64,
        t.decode.as_secs_f64()
    );
    Ok(())
}
