//! `text2img bench`: times the parts of a generation on this machine (load, text encoding,
//! one U-Net step with classifier-free guidance, VAE decode) and a large matrix product, so
//! speed work can be measured. `scripts/bench` puts these beside PyTorch's figures.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use text2img::latent::unet::ExtraConditions;
use text2img::pipeline::GenerateRequest;
use text2img::rng::BatchGenerator;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: crate::assets::ModelArgs,
    /// Image size (square) for the U-Net step and the decode.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Timed repetitions of each part (the best is reported).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time each kind of layer (convolutions, linear layers, attention, norms) in the
    /// U-Net step and the decode, and print their shares.
    #[arg(long)]
    profile: bool,
    /// Time the VAE decode alone (of a random latent of --size), with its peak heap: for
    /// large sizes, where a U-Net step would take too long.
    #[arg(long)]
    decode_only: bool,
    /// Decode in overlapping tiles (diffusers' `enable_tiling()`).
    #[arg(long)]
    vae_tiling: bool,
    /// Also time a U-Net step steered by this ControlNet (a folder or file; the ControlNet's
    /// pass plus the U-Net's, guidance batch 2).
    #[arg(long, value_name = "DIR|FILE")]
    controlnet: Option<std::path::PathBuf>,
    /// Also time applying these LoRAs to the loaded model as a server does for one request
    /// (a patched copy of the layers they change), FILE or FILE:WEIGHT, repeatable.
    #[arg(long = "request-lora", value_name = "FILE[:WEIGHT]", value_parser = crate::assets::parse_lora)]
    request_loras: Vec<text2img::pipeline::LoraSpec>,
}

/// The layers' shares of one timed part, recorded over `repeat` runs of it: the step's wall
/// time `seconds`, and per kind of layer its seconds per run and share of the layers' sum.
struct LayerProfile {
    seconds: f64,
    rows: Vec<ProfileRow>,
}

/// One kind of layer's seconds, calls and floating-point operations per run.
struct ProfileRow {
    name: &'static str,
    seconds: f64,
    calls: u64,
    flops: f64,
}

impl ProfileRow {
    /// Operations per second of span time (for shards side by side, per shard), where counted:
    /// an effective rate, the operations a direct computation does (Winograd's convolutions,
    /// which do fewer, can exceed the machine's peak).
    fn gflops(&self) -> Option<f64> {
        (self.flops > 0.0 && self.seconds > 0.0).then(|| self.flops / self.seconds / 1e9)
    }
}

impl LayerProfile {
    fn take(seconds: f64, repeat: usize) -> Self {
        let runs = repeat.max(1) as f64;
        let mut rows: Vec<_> = text2img::profile::totals()
            .into_iter()
            .map(|(name, t)| ProfileRow {
                name,
                seconds: t.seconds / runs,
                calls: t.calls / runs as u64,
                flops: t.flops / runs,
            })
            .collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        text2img::profile::reset();
        Self { seconds, rows }
    }

    fn layer_sum(&self) -> f64 {
        self.rows.iter().map(|r| r.seconds).sum()
    }

    fn json(&self) -> serde_json::Value {
        let sum = self.layer_sum();
        let layers: serde_json::Map<_, _> = self
            .rows
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    json!({"s": r.seconds, "share": r.seconds / sum, "calls": r.calls,
                           "gflops": r.gflops()}),
                )
            })
            .collect();
        json!({"wall_s": self.seconds, "layers_s": sum, "layers": layers})
    }

    fn print(&self, title: &str) {
        let sum = self.layer_sum();
        println!(
            "  {title}: {:.3} s; its layers, summed over shards, {sum:.3} s",
            self.seconds
        );
        for r in &self.rows {
            let rate = r
                .gflops()
                .map_or(String::new(), |g| format!("  {g:6.1} GFLOP/s effective"));
            println!(
                "    {:<30} {:8.3} s {:5.1} %  {:5} calls{rate}",
                r.name,
                r.seconds,
                100.0 * r.seconds / sum,
                r.calls
            );
        }
    }
}

fn best<T>(repeat: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let started = Instant::now();
        f()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

pub fn bench_cmd(a: BenchArgs) -> Result<()> {
    let started = Instant::now();
    // A folder's VAE alone, so the process holds what a decode needs and nothing more.
    let vae_dir = a
        .model
        .model
        .as_deref()
        .map(|m| std::path::Path::new(m).join("vae"))
        .filter(|d| d.is_dir());
    if let (true, Some(dir)) = (a.decode_only, vae_dir) {
        let vae = text2img::vae::AutoencoderKl::load_as(
            &dir,
            None,
            &candle_core::Device::Cpu,
            a.model.dtype.dtype(),
        )?;
        return decode_only(
            &text2img::vae::Vae::Kl(vae),
            &a,
            started.elapsed().as_secs_f64(),
        );
    }
    let (mut pipeline, source) = a.model.load()?;
    if let Some(dir) = &a.controlnet {
        pipeline.add_controlnet(dir, a.model.dtype.dtype())?;
    }
    let load_s = started.elapsed().as_secs_f64();
    let device = candle_core::Device::Cpu;
    let f = pipeline.vae_scale_factor();
    if a.size == 0 || !a.size.is_multiple_of(f) {
        anyhow::bail!("--size {} is not a positive multiple of {f}", a.size);
    }
    if a.decode_only {
        return decode_only(&pipeline.vae, &a, load_s);
    }
    let request = GenerateRequest::new("a photograph of an astronaut riding a horse");
    let mut warnings = Vec::new();
    let text_s = best(a.repeat, || {
        Ok(pipeline.encode_prompts(&request.prompts, 0, Default::default(), &mut warnings)?)
    })?;
    let cond = pipeline.encode_prompts(&request.prompts, 0, Default::default(), &mut warnings)?;
    let uncond = pipeline.encode_prompts(&[String::new()], 0, Default::default(), &mut warnings)?;
    let batch = text2img::pipeline::conditioning::Conditioning::batch(&[&uncond, &cond], 1)?;
    let latent = [2, pipeline.unet.config.in_channels, a.size / f, a.size / f];
    let sample = BatchGenerator::consecutive(0, 2).randn(&latent, &device)?;
    let time_ids = text2img::pipeline::conditioning::time_ids(
        (a.size, a.size),
        (0, 0),
        (a.size, a.size),
        2,
        &device,
    )?;
    let guidance = pipeline
        .unet
        .config
        .time_cond_proj_dim
        .map(|d| {
            text2img::latent::unet::embeddings::guidance_scale_embedding(&[7.5, 7.5], d, &device)
        })
        .transpose()?;
    let extra = ExtraConditions {
        text_time: batch.text_embeds.as_ref().map(|t| (t, &time_ids)),
        timestep_cond: guidance.as_ref(),
        control: None,
    };
    // The pipeline's own call: the guidance pair split over the threads. The profile, when
    // asked, records the timed runs only (the text encoder's layers ran before it).
    text2img::profile::enable(a.profile);
    text2img::profile::reset();
    let unet_s = best(a.repeat, || {
        Ok(pipeline
            .unet
            .forward_sharded(&sample, &[500.0, 500.0], &batch.context, &extra)?)
    })?;
    let unet_profile = LayerProfile::take(unet_s, a.repeat);
    // A ControlNet-steered step: the ControlNet on the guidance batch, then the U-Net with
    // its residuals.
    let controlnet_s = match pipeline.controlnets.first() {
        None => None,
        Some(net) => {
            let image = BatchGenerator::consecutive(2, 2)
                .randn(&[2, 3, a.size, a.size], &device)?
                .abs()?
                .clamp(0.0, 1.0)?;
            Some(best(a.repeat, || {
                let residuals =
                    net.forward_sharded(&sample, &[500.0, 500.0], &batch.context, &extra, &image)?;
                let steered = ExtraConditions {
                    control: Some(&residuals),
                    ..extra
                };
                Ok(pipeline.unet.forward_sharded(
                    &sample,
                    &[500.0, 500.0],
                    &batch.context,
                    &steered,
                )?)
            })?)
        }
    };
    let z = sample.narrow(0, 0, 1)?;
    let decode_s = best(a.repeat, || Ok(pipeline.vae.decode(&z)?))?;
    let decode_profile = LayerProfile::take(decode_s, a.repeat);
    text2img::profile::enable(false);
    let n = 2048;
    let x = BatchGenerator::consecutive(1, 1)
        .randn(&[1, n, n], &device)?
        .squeeze(0)?;
    let sgemm_s = best(a.repeat.max(3), || Ok(x.matmul(&x)?))?;
    let gflops = 2.0 * (n as f64).powi(3) / sgemm_s / 1e9;
    // The bf16 product a `--dtype bf16 --compute bf16` layer runs, where the CPU has it (f32
    // activations times a bf16 weight), on the same matrices.
    let bf16_gflops = if text2img::kernels::matmul_bf16::supported() {
        let w = x.to_dtype(candle_core::DType::BF16)?;
        let s = best(a.repeat.max(3), || {
            Ok(text2img::kernels::matmul_bf16::linear(&x, &w)?)
        })?;
        Some(2.0 * (n as f64).powi(3) / s / 1e9)
    } else {
        None
    };
    // A server's per-request LoRAs: the copy with them merged, made and dropped each time.
    let lora_s = if a.request_loras.is_empty() {
        None
    } else {
        Some(best(a.repeat, || {
            Ok(pipeline.with_loras(&a.request_loras)?.0)
        })?)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if a.json {
        let mut out = json!({
                "model": source, "size": a.size, "threads": threads, "load_s": load_s,
                "text_s": text_s, "unet_step_cfg_s": unet_s, "vae_decode_s": decode_s,
                "sgemm_2048_gflops": gflops, "bf16_gemm_2048_gflops": bf16_gflops,
                "dtype": a.model.dtype.dtype().name(),
                "bf16_products": text2img::kernels::matmul_bf16::available(),
                "request_loras_s": lora_s,
                "controlnet_step_cfg_s": controlnet_s,
        });
        if a.profile {
            out["profile_unet_step"] = unet_profile.json();
            out["profile_vae_decode"] = decode_profile.json();
        }
        println!("{out}");
    } else {
        println!("model {} ({source})", pipeline.name);
        println!("  size {}x{}, {threads} threads", a.size, a.size);
        println!("  load                      {load_s:8.2} s");
        println!("  text encoding (1 prompt)  {text_s:8.3} s");
        println!("  U-Net step, CFG batch 2   {unet_s:8.3} s");
        println!("  VAE decode (1 image)      {decode_s:8.3} s");
        println!("  sgemm 2048^3              {gflops:8.1} GFLOP/s");
        if let Some(g) = bf16_gflops {
            println!("  bf16 GEMM 2048^3          {g:8.1} GFLOP/s");
        }
        if let Some(s) = controlnet_s {
            println!("  ControlNet + U-Net step    {s:8.3} s");
        }
        if let Some(s) = lora_s {
            println!("  LoRAs for one request     {s:8.3} s");
        }
        if a.profile {
            unet_profile.print("U-Net step by layer");
            decode_profile.print("VAE decode by layer");
        }
    }
    Ok(())
}

/// `--decode-only`: the decode of one random latent, its time and the heap it needed.
fn decode_only(vae: &text2img::vae::Vae, a: &BenchArgs, load_s: f64) -> Result<()> {
    let f = vae.downsampling_factor();
    let shape = [1, vae.latent_channels(), a.size / f, a.size / f];
    let z = BatchGenerator::consecutive(0, 1).randn(&shape, &candle_core::Device::Cpu)?;
    let before = text2img::alloc_count::live();
    text2img::alloc_count::reset_peak();
    let decode_s = best(a.repeat, || {
        Ok(if a.vae_tiling {
            vae.decode_tiled(&z)?
        } else {
            vae.decode(&z)?
        })
    })?;
    let peak = text2img::alloc_count::peak()
        .zip(before)
        .map(|(p, b)| p.saturating_sub(b) as f64 / 1e6);
    let out = json!({
        "size": a.size, "vae_tiling": a.vae_tiling, "load_s": load_s, "vae_decode_s": decode_s,
        "decode_peak_heap_mb": peak,
    });
    println!("{out}");
    Ok(())
}
