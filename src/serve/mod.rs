//! `text2img serve`: load the model once and answer many requests over HTTP, in the APIs
//! existing clients speak (A1111's `/sdapi/v1`, OpenAI's `/v1/images`), plus a web page.
//!
//! Requests queue in arrival order in front of one worker thread that owns the model
//! ([`worker`]); HTTP runs on a small async runtime beside it.

pub mod a1111;
pub mod api_error;
pub mod controlnet;
pub mod fields;
pub mod listener;
pub mod middleware;
pub mod models;
pub mod openai;
pub mod page;
pub mod plan;
pub mod shutdown;
pub mod worker;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::png_out::{a1111_parameters, encode_png};
use models::{Loaded, Models};

use api_error::ApiError;
use plan::{Limits, Plan};
use worker::{JobError, JobOutput, JobSpec, Queue, SubmitError};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    pub api_key: Option<String>,
    /// Requests that may wait behind the running one; more get 429.
    pub max_queue: usize,
    /// Largest request body in bytes; more gets 413.
    pub max_body: usize,
    pub max_size: usize,
    pub max_steps: usize,
    pub max_images: usize,
    pub cors_origin: Option<String>,
    /// Allow a non-loopback address without an API key.
    pub insecure: bool,
    /// How long a running job may go on after SIGTERM before it is cancelled.
    pub shutdown_grace: Duration,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A request's headers must arrive within this (slow clients are cut off).
    pub header_timeout: Duration,
    /// A request's body must arrive within this, and an answer that the client does not read
    /// for this long ends its connection.
    pub body_timeout: Duration,
    /// A request estimated to take longer (at this machine's measured speed) is refused
    /// before it is queued; `None`: no limit.
    pub max_job_seconds: Option<f64>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 7860,
            api_key: None,
            max_queue: 16,
            max_body: 16 << 20,
            max_size: 1024,
            max_steps: 150,
            max_images: 8,
            cors_origin: None,
            insecure: false,
            shutdown_grace: Duration::from_secs(30),
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_job_seconds: Some(600.0),
        }
    }
}

pub struct AppState {
    /// The loaded model, the ones the server may switch to, and the LoRAs.
    pub models: Arc<Models>,
    pub queue: Arc<Queue>,
    pub options: ServeOptions,
    pub limits: Limits,
}

/// A request's JSON object, read within the server's body limits.
pub(crate) async fn request_fields(
    options: &ServeOptions,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<fields::Fields, ApiError> {
    let bytes = fields::read_body(headers, body, options.max_body, options.body_timeout).await?;
    fields::Fields::parse(&bytes)
}

/// The model a request runs on, loaded: the checkpoint it names
/// (`override_settings.sd_model_checkpoint`), or the selected one. When another is loaded,
/// the switch is queued behind the jobs before it (as A1111 does) and awaited.
pub(crate) async fn model_for(
    app: &AppState,
    named: Option<&str>,
    named_vae: Option<&str>,
) -> Result<Arc<Loaded>, ApiError> {
    let checkpoint = match named {
        Some(name) => app
            .models
            .find(name)
            .map_err(|e| ApiError::field("sd_model_checkpoint", e.message()))?,
        None => app.models.selected(),
    };
    let vae = match named_vae {
        Some(name) => app
            .models
            .find_vae(name)
            .map_err(|e| ApiError::field("sd_vae", e.message()))?,
        None => app.models.selected_vae(),
    };
    let checkpoint = models::Checkpoint {
        vae: vae.map(|v| v.path),
        ..checkpoint
    };
    // Another request's switch may come between the load and this request's plan: try
    // again (its job then names this checkpoint, and the worker loads it back).
    for _ in 0..3 {
        if let Some(loaded) = app.models.loaded() {
            if loaded.checkpoint == checkpoint {
                return Ok(loaded);
            }
        }
        let spec = JobSpec {
            batches: Vec::new(),
            model: Some(checkpoint.clone()),
            loras: Vec::new(),
            controlnets: Vec::new(),
            deadline: None,
            estimate_seconds: 0.0,
        };
        let ticket = app.queue.submit(spec).map_err(|e| submit_error(app, e))?;
        ticket.wait().await.map_err(job_error)?;
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the model changed three times while this request waited; try again",
    ))
}

/// The plan of a request on the model it runs on, with the LoRAs its prompt names found in
/// the server's LoRA folder.
pub(crate) fn plan_on(
    app: &AppState,
    loaded: &Loaded,
    asked: &plan::Asked,
) -> Result<Plan, ApiError> {
    plan::plan(&loaded.pipeline, &app.limits, asked, &|name| {
        app.models
            .find_lora(name)
            .map(|l| l.path)
            .map_err(|e| e.message())
    })
}

/// Queues a plan and waits for its images, turning queue and job failures into HTTP errors.
pub(crate) async fn run_plan(
    app: &AppState,
    loaded: &Loaded,
    plan: &Plan,
) -> Result<JobOutput, ApiError> {
    let estimate = admit(app, loaded, plan)?;
    let spec = JobSpec {
        batches: plan.batches.clone(),
        model: Some(loaded.checkpoint.clone()),
        loras: plan.loras.clone(),
        controlnets: plan.controlnets.clone(),
        // A job that runs far past its estimate is stuck or starved: cancel it.
        deadline: Some(Duration::from_secs_f64(
            (estimate.seconds * OVERRUN_FACTOR).max(MIN_DEADLINE_SECONDS),
        )),
        estimate_seconds: estimate.seconds,
    };
    let ticket = app.queue.submit(spec).map_err(|e| submit_error(app, e))?;
    ticket.wait().await.map_err(job_error)
}

fn submit_error(app: &AppState, e: SubmitError) -> ApiError {
    match e {
        SubmitError::Full => ApiError {
            retry_after: Some(retry_after_seconds(app)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({} waiting); try again later",
                    app.options.max_queue
                ),
            )
        },
        SubmitError::ShuttingDown => shutting_down(),
    }
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::ShuttingDown => shutting_down(),
        JobError::Cancelled => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled"),
        JobError::Invalid(m) => ApiError::bad_request(m),
        JobError::Overrun { ran, estimate } => ApiError::internal(format!(
            "cancelled after {ran:.0} s: more than {OVERRUN_FACTOR}x its estimate of {estimate:.1} s (the server may be overloaded)"
        )),
        JobError::Failed(m) => ApiError::internal(format!("generation failed: {m}")),
    }
}

/// How many times its estimate a job may run before it is cancelled.
const OVERRUN_FACTOR: f64 = 4.0;
/// Estimates under this are not held to the factor (small jobs vary most).
const MIN_DEADLINE_SECONDS: f64 = 30.0;

/// The plan's estimated cost, or a 413 that states it when it is over the server's time limit
/// or the memory this machine has free.
fn admit(
    app: &AppState,
    loaded: &Loaded,
    plan: &Plan,
) -> Result<crate::pipeline::cost::Estimate, ApiError> {
    let pipeline = &loaded.pipeline;
    let r = &plan.resolved;
    let cfg = r.guidance_scale > 1.0 && !pipeline.embeds_guidance();
    let guide = r.autoguidance > 1.0;
    let mut total = crate::pipeline::cost::Estimate {
        seconds: 0.0,
        peak_bytes: None,
        flops: 0.0,
    };
    for batch in &plan.batches {
        let e = loaded.cost.estimate(r, batch.num_images, cfg, guide);
        total.seconds += e.seconds;
        total.flops += e.flops;
        total.peak_bytes = match (total.peak_bytes, e.peak_bytes) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let too_much = |what: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what}; ask for fewer steps, a smaller size or fewer images"),
        )
    };
    if let Some(limit) = app.options.max_job_seconds {
        if total.seconds > limit {
            return Err(too_much(format!(
                "this request would take about {:.0} s on this server ({:.0} GFLOP), over its limit of {limit:.0} s",
                total.seconds,
                total.flops / 1e9
            )));
        }
    }
    if let (Some(peak), Some(free)) = (total.peak_bytes, available_memory()) {
        if peak > free as f64 {
            return Err(too_much(format!(
                "this request would need about {:.1} GB of memory; {:.1} GB is free",
                peak / 1e9,
                free as f64 / 1e9
            )));
        }
    }
    Ok(total)
}

/// The memory the system can still give (Linux's MemAvailable), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is shutting down",
    )
}

/// A guess at when a place frees up: the running job's remaining time, at least 1 s. The
/// queue advances by one when the running job ends, so that is when the next place opens,
/// however many wait behind it.
fn retry_after_seconds(app: &AppState) -> u32 {
    app.queue.progress().eta_seconds().ceil().clamp(1.0, 3600.0) as u32
}

/// Base64 PNGs, each with its A1111 `parameters` text. Called from request handlers on the
/// server's multi-threaded runtime: the encoding (tens of ms per large image) runs in
/// `block_in_place`, so the runtime moves its other tasks (progress polls, the web page) to
/// another thread meanwhile.
pub(crate) fn encode_images(output: &JobOutput, model: &str) -> Result<Vec<String>, ApiError> {
    tokio::task::block_in_place(|| {
        output
            .images
            .iter()
            .map(|(image, req, resolved)| {
                let parameters = a1111_parameters(req, resolved, image.seed, model);
                let png = encode_png(image, &parameters)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                Ok(base64::engine::general_purpose::STANDARD.encode(png))
            })
            .collect()
    })
}

async fn health(axum::extract::State(app): axum::extract::State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": app.models.selected().title,
        "queue": app.queue.waiting(),
        "running": app.queue.is_running(),
    }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

pub fn router(app: Arc<AppState>) -> Router {
    let access = Arc::new(middleware::Access::new(&app.options));
    let generate = |endpoint: Endpoint| {
        post(
            move |axum::extract::State(app): axum::extract::State<Arc<AppState>>,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Body| async move {
                let fields = endpoint.read(&app.options, headers, body).await?;
                answer(&app, endpoint, fields).await.map(Json)
            },
        )
    };
    let routes = Router::new()
        .route("/", get(page::index))
        .route("/health", get(health))
        .route("/sdapi/v1/txt2img", generate(Endpoint::Txt2img))
        .route("/sdapi/v1/img2img", generate(Endpoint::Img2img))
        .route("/sdapi/v1/upscalers", get(a1111::upscalers))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route(
            "/sdapi/v1/options",
            get(a1111::options).post(a1111::set_options),
        )
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route(
            "/sdapi/v1/refresh-checkpoints",
            post(a1111::refresh_checkpoints),
        )
        .route("/sdapi/v1/refresh-loras", post(a1111::refresh_loras))
        .route("/sdapi/v1/sd-vae", get(a1111::sd_vae))
        .route("/sdapi/v1/refresh-vae", post(a1111::refresh_vae))
        .route("/controlnet/model_list", get(controlnet::model_list))
        .route("/controlnet/module_list", get(controlnet::module_list))
        .route("/controlnet/detect", post(controlnet::detect))
        .route("/sdapi/v1/embeddings", get(a1111::embeddings))
        .route(
            "/v1/images/generations",
            generate(Endpoint::OpenAiGenerations),
        )
        .route("/v1/images/edits", generate(Endpoint::OpenAiEdits))
        .fallback(not_found)
        .with_state(app);
    middleware::wrap(routes, access)
}

/// The requests that make images. In-process they run on this server's worker; behind a
/// Redis queue the front end reads them and a worker process answers them
/// ([`crate::scale`]), through the same [`answer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Txt2img,
    Img2img,
    OpenAiGenerations,
    OpenAiEdits,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Txt2img,
        Endpoint::Img2img,
        Endpoint::OpenAiGenerations,
        Endpoint::OpenAiEdits,
    ];

    /// The name a queued job carries.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Txt2img => "txt2img",
            Endpoint::Img2img => "img2img",
            Endpoint::OpenAiGenerations => "openai-generations",
            Endpoint::OpenAiEdits => "openai-edits",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }

    /// OpenAI's clients expect its error shape.
    pub fn flavor(self) -> api_error::Flavor {
        match self {
            Endpoint::OpenAiGenerations | Endpoint::OpenAiEdits => api_error::Flavor::OpenAi,
            _ => api_error::Flavor::A1111,
        }
    }

    /// The request's fields, read within the server's body limits: a JSON object, or for
    /// OpenAI's edits a multipart form turned into one (pictures as base64).
    pub async fn read(
        self,
        options: &ServeOptions,
        headers: axum::http::HeaderMap,
        body: axum::body::Body,
    ) -> Result<fields::Fields, ApiError> {
        let bytes = fields::read_body(&headers, body, options.max_body, options.body_timeout)
            .await
            .map_err(|e| e.flavor(self.flavor()))?;
        match self {
            Endpoint::OpenAiEdits => openai::edit_form(headers, bytes).await,
            _ => fields::Fields::parse(&bytes),
        }
        .map_err(|e| e.flavor(self.flavor()))
    }
}

/// Runs a generation request on this process's models and answers in its API's shape.
pub async fn answer(
    app: &AppState,
    endpoint: Endpoint,
    fields: fields::Fields,
) -> Result<Value, ApiError> {
    match endpoint {
        Endpoint::Txt2img => a1111::txt2img(app, &fields).await,
        Endpoint::Img2img => a1111::img2img(app, &fields).await,
        Endpoint::OpenAiGenerations => openai::generations(app, &fields).await,
        Endpoint::OpenAiEdits => openai::edits(app, &fields).await,
    }
    .map_err(|e| e.flavor(endpoint.flavor()))
}

/// Checks the address before binding: a non-loopback one needs an API key (or `--insecure`).
pub(crate) fn is_loopback_bind(options: &ServeOptions) -> bool {
    options.host == "localhost"
        || options
            .host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn check_bind(options: &ServeOptions) -> Result<()> {
    let loopback = is_loopback_bind(options);
    if !loopback && options.api_key.is_none() && !options.insecure {
        return Err(Error::InvalidRequest(format!(
            "refusing to listen on {} without --api-key: anyone who can reach it could use \
             the server; give --api-key KEY, or --insecure to allow it anyway",
            options.host
        )));
    }
    if options.api_key.as_deref() == Some("") {
        return Err(Error::InvalidRequest("--api-key must not be empty".into()));
    }
    Ok(())
}

/// Binds the server's address and serves `router` until SIGTERM or Ctrl-C; then stops
/// accepting, runs `drain` (what the process owes the requests it took), lets the answers
/// reach their clients, and returns, whichever connections are still open. A second signal
/// exits at once.
pub(crate) async fn listen(
    options: &ServeOptions,
    router: Router,
    drain: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let host = if options.host == "localhost" {
        "127.0.0.1"
    } else {
        options.host.as_str()
    };
    let ip: IpAddr = host.parse().map_err(|_| {
        Error::InvalidRequest(format!("--host `{}` is not an IP address", options.host))
    })?;
    let addr = SocketAddr::new(ip, options.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
    println!("listening on http://{bound}");
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let stopping = async move {
        let _ = stopping_rx.wait_for(|&stopping| stopping).await;
    };
    let limits = listener::ConnectionLimits {
        max_connections: options.max_connections,
        header_timeout: options.header_timeout,
        write_timeout: options.body_timeout,
    };
    let server = listener::serve(listener, router, limits, stopping);
    // The server ends when its last connection closes; the shutdown sequence ends when
    // the process must exit, whichever connections are still open.
    let sequence = shutdown::sequence(drain, stopping_tx);
    tokio::select! {
        () = server => Ok(()),
        () = sequence => {
            eprintln!("some connections did not close; exiting anyway");
            Ok(())
        }
    }
}

/// The models and the one thread that runs their jobs, without HTTP: what `serve`, a queue
/// worker and a local batch run on.
pub struct Local {
    pub app: Arc<AppState>,
    worker: std::thread::JoinHandle<()>,
}

impl Local {
    pub fn start(models: Models, options: ServeOptions) -> Result<Self> {
        let models = Arc::new(models);
        let queue = Queue::new(options.max_queue);
        queue.start_watchdog();
        let worker = {
            let (queue, models) = (queue.clone(), models.clone());
            std::thread::Builder::new()
                .name("text2img-worker".into())
                .spawn(move || queue.run_worker(&models))
                .map_err(|e| Error::InvalidRequest(format!("cannot start the worker: {e}")))?
        };
        let app = Arc::new(AppState {
            models,
            queue,
            limits: Limits {
                max_size: options.max_size,
                max_steps: options.max_steps,
                max_images: options.max_images,
            },
            options,
        });
        Ok(Self { app, worker })
    }

    /// Closes the queue and gives a busy worker a second to notice its cancel flag (the
    /// process exits without it otherwise).
    pub fn stop(self) {
        self.app.queue.close();
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while !self.worker.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Serves until SIGTERM or Ctrl-C, then stops as promised ([`shutdown`]): no new connections,
/// queued requests answered 503, the running one given `shutdown_grace` to finish, then
/// cancelled; a second signal exits at once.
pub fn serve(models: Models, options: ServeOptions) -> Result<()> {
    check_bind(&options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // HTTP needs little; the cores belong to the model's kernels.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidRequest(format!("cannot start the runtime: {e}")))?;
    let local = Local::start(models, options.clone())?;
    let app = local.app.clone();
    let queue = app.queue.clone();
    let grace = options.shutdown_grace;
    let result = runtime.block_on(listen(
        &options,
        router(app),
        shutdown::drain_queue(queue, grace),
    ));
    local.stop();
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}
