//! `text2img serve`: flags to server options; the server itself is `text2img::serve`.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use text2img::serve::models::{Checkpoint, Loader, Models};
use text2img::serve::{serve, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    models: ModelsArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Serve in front of a Redis queue (redis://HOST:PORT, unix:///PATH) instead of running
    /// jobs here: `text2img worker` processes run them. This process loads no model.
    #[arg(long, value_name = "URL", env = "TEXT2IMG_REDIS")]
    redis: Option<String>,
    /// The address to listen on; one that is not loopback needs --api-key (or --insecure).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed at start).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (or HTTP Basic with KEY as the password) on the
    /// API. Also read from the TEXT2IMG_API_KEY environment variable (kept out of `ps`).
    #[arg(long, env = "TEXT2IMG_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests that may wait behind the running one; more are answered 429.
    #[arg(long, default_value_t = 16)]
    max_queue: usize,
    /// Largest request body (e.g. 16MB, 512KB, 65536); more is answered 413. img2img's
    /// pictures come in the body: a 1024x1024 PNG is 2-3 MB in base64.
    #[arg(long, default_value = "16MB", value_parser = parse_bytes)]
    max_body: usize,
    /// Let pages from this origin call the API (e.g. https://example.org, or *).
    #[arg(long)]
    cors_origin: Option<String>,
    /// Allow listening on a non-loopback address without an API key.
    #[arg(long)]
    insecure: bool,
    /// Seconds the running request may go on after SIGTERM before it is cancelled.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Connections open at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (and an idle connection stays open).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body, and to start reading an answer.
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
}

/// The model a process runs on: what `serve` and `worker` load.
#[derive(Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    model: crate::assets::ModelArgs,
    /// A folder in A1111's layout: `Stable-diffusion/` holds checkpoints requests may switch
    /// to (`sd_model_checkpoint`), `Lora/` the LoRAs prompts name (`<lora:NAME:W>`, applied
    /// per request), `embeddings/` textual inversions.
    #[arg(long, value_name = "DIR")]
    models_dir: Option<std::path::PathBuf>,
    /// A tiny autoencoder (a TAESD folder for the model's latents) that draws the progress
    /// previews at full size instead of one pixel per latent.
    #[arg(long, value_name = "DIR")]
    preview_vae: Option<std::path::PathBuf>,
}

/// What one request may ask for.
#[derive(Args)]
pub struct LimitArgs {
    /// Largest width or height a request may ask for.
    #[arg(long, default_value_t = 1024)]
    max_size: usize,
    /// Most steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    max_steps: usize,
    /// Most images one request may ask for (batch_size x n_iter, or n).
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Refuse (413) a request estimated to take longer on this machine; 0: no limit.
    #[arg(long, default_value_t = 600.0)]
    max_job_seconds: f64,
}

/// `1MB` -> 1048576; binary units, as people mean them for request sizes.
fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim().to_ascii_uppercase();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = t[digits.len()..].trim();
    let scale: usize = match unit {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("`{text}`: unknown unit (use B, KB, MB or GB)")),
    };
    let n: usize = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 1MB"))?;
    n.checked_mul(scale)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{text}` is not a usable size"))
}

impl LimitArgs {
    pub fn check(&self) -> Result<()> {
        if !(self.max_job_seconds.is_finite() && self.max_job_seconds >= 0.0) {
            bail!("--max-job-seconds must be a number of seconds >= 0 (0: no limit)");
        }
        for (flag, v) in [
            ("--max-size", self.max_size),
            ("--max-steps", self.max_steps),
            ("--max-images", self.max_images),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        Ok(())
    }

    pub fn apply(&self, options: &mut ServeOptions) {
        options.max_size = self.max_size;
        options.max_steps = self.max_steps;
        options.max_images = self.max_images;
        options.max_job_seconds = (self.max_job_seconds > 0.0).then_some(self.max_job_seconds);
    }
}

fn seconds(flag: &str, v: f64, zero_ok: bool) -> Result<Duration> {
    let ok = v.is_finite() && v <= 86_400.0 && (v > 0.0 || (zero_ok && v == 0.0));
    if !ok {
        let low = if zero_ok { "from 0" } else { "above 0" };
        bail!("{flag} must be a number of seconds {low} to 86400");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn serve_cmd(a: ServeArgs) -> Result<()> {
    a.limits.check()?;
    for (flag, v) in [
        ("--max-queue", a.max_queue),
        ("--max-connections", a.max_connections),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let mut options = ServeOptions {
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        max_queue: a.max_queue,
        max_body: a.max_body,
        cors_origin: a.cors_origin,
        insecure: a.insecure,
        shutdown_grace: seconds("--shutdown-grace", a.shutdown_grace, true)?,
        max_connections: a.max_connections,
        header_timeout: seconds("--header-timeout", a.header_timeout, false)?,
        body_timeout: seconds("--body-timeout", a.body_timeout, false)?,
        ..ServeOptions::default()
    };
    a.limits.apply(&mut options);
    // Refuse a bad address before the (slow) model load.
    text2img::serve::check_bind(&options)?;
    if let Some(url) = &a.redis {
        if a.models.names_a_model() {
            bail!(
                "with --redis this process only answers HTTP and loads no model: give \
                 --model and --models-dir to the `text2img worker` processes"
            );
        }
        text2img::scale::front::serve(url, options)?;
        return Ok(());
    }
    serve(a.models.load()?, options)?;
    Ok(())
}

impl ModelsArgs {
    /// Whether a model or models folder was named (the built-in model is the default).
    pub fn names_a_model(&self) -> bool {
        self.model.model.is_some() || self.models_dir.is_some()
    }

    /// Loads the model and scans `--models-dir`.
    pub fn load(self) -> Result<Models> {
        let mut model = self.model;
        if let Some(dir) = &self.models_dir {
            if !dir.is_dir() {
                bail!("--models-dir {}: no such folder", dir.display());
            }
            let embeddings = dir.join("embeddings");
            if model.embeddings_dir.is_none() && embeddings.is_dir() {
                model.embeddings_dir = Some(embeddings);
            }
        }
        let preview_vae = self.preview_vae;
        let load = move |model: &crate::assets::ModelArgs| -> Result<text2img::Pipeline> {
            let (mut pipeline, _) = model.load()?;
            if let Some(dir) = &preview_vae {
                pipeline.set_preview_vae(dir)?;
            }
            Ok(pipeline)
        };
        let source = model.source()?;
        let pipeline = load(&model)?;
        eprintln!("model {} loaded from {source}", pipeline.name);
        let startup = Checkpoint {
            title: pipeline.name.clone(),
            model_name: pipeline.name.clone(),
            source,
            vae: None,
        };
        let lora_dir = model.lora_dir.clone();
        let startup_source = startup.source.clone();
        let loader: Loader = Box::new(move |source: &str| {
            let mut args = model.clone();
            // The startup model loads as it did at the start (the built-in one by its name).
            if source != startup_source {
                args.model = Some(source.to_string());
            }
            load(&args).map_err(|e| text2img::Error::InvalidRequest(format!("{e:#}")))
        });
        Ok(Models::new(
            loader,
            pipeline,
            startup,
            self.models_dir,
            lora_dir,
        )?)
    }
}

/// `text2img worker`: runs the jobs of a Redis queue.
#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    models: ModelsArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// The queue's Redis (redis://HOST:PORT/DB, redis://:PASSWORD@HOST, unix:///PATH).
    #[arg(long, value_name = "URL", env = "TEXT2IMG_REDIS")]
    redis: String,
    /// This worker's name in the consumer group (default: host name and process id); a
    /// worker restarted under the same name takes back its unfinished entry at once.
    #[arg(long)]
    name: Option<String>,
    /// Seconds after which a job whose worker stopped heartbeating is taken over by another.
    #[arg(long, default_value_t = 60.0)]
    claim_idle: f64,
    /// Deliveries after which a failing job goes to the dead-letter stream `text2img:dead`.
    #[arg(long, default_value_t = 3)]
    max_deliveries: u64,
    /// Seconds the running job may go on after SIGTERM before it is handed back to the queue.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
}

pub fn worker_cmd(a: WorkerArgs) -> Result<()> {
    a.limits.check()?;
    if a.max_deliveries == 0 {
        bail!("--max-deliveries must be at least 1");
    }
    let claim_idle = seconds("--claim-idle", a.claim_idle, false)?;
    if claim_idle < Duration::from_secs(1) {
        bail!("--claim-idle must be at least 1 second (running jobs heartbeat at a quarter of it)");
    }
    let name = match a.name {
        Some(name) if !name.is_empty() && !name.chars().any(char::is_whitespace) => name,
        Some(name) => bail!("--name `{name}` must be a non-empty word"),
        None => format!("{}-{}", host_name(), std::process::id()),
    };
    let mut options = ServeOptions {
        // One job at a time: a model switch and the job behind it.
        max_queue: 2,
        ..ServeOptions::default()
    };
    a.limits.apply(&mut options);
    // Refuse a bad address before the (slow) model load.
    text2img::scale::connection::client(&a.redis)?;
    let models = a.models.load()?;
    text2img::scale::worker::run(
        models,
        options,
        &a.redis,
        text2img::scale::worker::WorkerOptions {
            name,
            claim_idle,
            max_deliveries: a.max_deliveries,
            shutdown_grace: seconds("--shutdown-grace", a.shutdown_grace, true)?,
        },
    )?;
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_sizes() {
        assert_eq!(super::parse_bytes("1MB"), Ok(1 << 20));
        assert_eq!(super::parse_bytes("512kb"), Ok(512 << 10));
        assert_eq!(super::parse_bytes("65536"), Ok(65536));
        assert!(super::parse_bytes("1XB").is_err());
        assert!(super::parse_bytes("0").is_err());
    }
}
