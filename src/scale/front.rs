//! `text2img serve --redis URL`: the same HTTP APIs as the in-process server, answered by
//! the workers behind a Redis queue. A front end keeps nothing a client depends on: a job's
//! progress, interrupt and answer are all in Redis, so any front end can serve any request
//! and several sit behind a load balancer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use redis::AsyncCommands;
use serde_json::{json, Value};

use super::client::{unavailable, QueueClient, Stop};
use super::inventory;
use super::job::{check_id, pin_seed, random_id, QueuedJob};
use super::keys;
use crate::error::{Error, Result};
use crate::serve::api_error::ApiError;
use crate::serve::fields::Fields;
use crate::serve::{a1111, controlnet, middleware, page, Endpoint, ServeOptions};

pub struct FrontState {
    queue: Arc<QueueClient>,
    options: ServeOptions,
    /// The jobs this front end's clients wait for, oldest first (what `progress` and
    /// `interrupt` without a job id mean, as A1111's "the running job").
    in_flight: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves the HTTP APIs in front of the queue until SIGTERM or Ctrl-C; then stops
/// accepting, gives the waiting clients the grace period for their answers, and cancels
/// the jobs of those still waiting (nobody will read their answers).
pub fn serve(url: &str, options: ServeOptions) -> Result<()> {
    crate::serve::check_bind(&options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidRequest(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let queue = QueueClient::new(url)?;
        // Starts without Redis too: requests get 503 until it is there.
        if let Err(e) = queue.wait_until_up(Some(Duration::from_secs(2))).await {
            eprintln!("{e}; answering 503 until it does");
        }
        let app = Arc::new(FrontState {
            queue,
            options: options.clone(),
            in_flight: Mutex::new(Vec::new()),
        });
        eprintln!(
            "front end for the queue at {}",
            super::connection::redacted(url)
        );
        crate::serve::listen(&options, router(app.clone()), drain(app)).await
    })
}

async fn drain(app: Arc<FrontState>) {
    let grace = app.options.shutdown_grace;
    let deadline = std::time::Instant::now() + grace;
    eprintln!(
        "shutting down: waiting for the answers of {} request(s) (at most {:.1} s)",
        lock(&app.in_flight).len(),
        grace.as_secs_f64()
    );
    while std::time::Instant::now() < deadline && !lock(&app.in_flight).is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<String> = lock(&app.in_flight).clone();
    for id in left {
        let _ = app.queue.stop(&id, Stop::Cancel).await;
    }
}

pub fn router(app: Arc<FrontState>) -> Router {
    let access = Arc::new(middleware::Access::new(&app.options));
    let generate = |endpoint: Endpoint| {
        post(
            move |State(app): State<Arc<FrontState>>, headers: HeaderMap, body: Body| async move {
                let fields = endpoint.read(&app.options, headers, body).await?;
                run(&app, endpoint, fields)
                    .await
                    .map_err(|e| e.flavor(endpoint.flavor()))
            },
        )
    };
    let routes = Router::new()
        .route("/", get(page::index))
        .route("/health", get(health))
        .route("/sdapi/v1/txt2img", generate(Endpoint::Txt2img))
        .route("/sdapi/v1/img2img", generate(Endpoint::Img2img))
        .route(
            "/v1/images/generations",
            generate(Endpoint::OpenAiGenerations),
        )
        .route("/v1/images/edits", generate(Endpoint::OpenAiEdits))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/upscalers", get(a1111::upscalers))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/controlnet/module_list", get(controlnet::module_list))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/sd-vae", get(sd_vae))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/controlnet/model_list", get(controlnet_models))
        .route("/sdapi/v1/options", get(options).post(set_options))
        .route("/sdapi/v1/refresh-checkpoints", post(refresh))
        .route("/sdapi/v1/refresh-loras", post(refresh))
        .route("/sdapi/v1/refresh-vae", post(refresh))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(app);
    middleware::wrap(routes, access)
}

/// Cancels its job if the client leaves before the answer (the handler is dropped).
struct CancelOnDrop {
    app: Arc<FrontState>,
    id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        lock(&self.app.in_flight).retain(|j| *j != self.id);
        if self.armed {
            let (queue, id) = (self.app.queue.clone(), self.id.clone());
            tokio::spawn(async move {
                let _ = queue.stop(&id, Stop::Cancel).await;
            });
        }
    }
}

/// Queues a request and answers with what its worker stored.
async fn run(
    app: &Arc<FrontState>,
    endpoint: Endpoint,
    mut fields: Fields,
) -> Result<Response, ApiError> {
    let id = match fields.string("force_task_id")? {
        Some(id) => {
            check_id(&id).map_err(|e| ApiError::field("force_task_id", e))?;
            id
        }
        None => random_id(),
    };
    pin_seed(&mut fields, &id);
    let stream = app.queue.route(endpoint, &mut fields).await?;
    let waiting = app.queue.waiting().await.map_err(unavailable)?;
    if waiting >= app.options.max_queue {
        return Err(ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({waiting} waiting, at most {}); try again later",
                    app.options.max_queue
                ),
            )
        });
    }
    let job = QueuedJob {
        id: id.clone(),
        endpoint,
        body: fields.to_value(),
    };
    // The guard comes first: a client that leaves while the job is being added still
    // cancels it. The add either happens (and its answer comes) or the client gets a 503.
    lock(&app.in_flight).push(id.clone());
    let mut guard = CancelOnDrop {
        app: app.clone(),
        id: id.clone(),
        armed: true,
    };
    let entry = match app.queue.submit(&stream, &job).await {
        Ok(entry) => entry,
        Err(e) => {
            guard.armed = false;
            return Err(unavailable(e));
        }
    };
    let result = app.queue.wait(&id, Some((stream, entry))).await;
    guard.armed = false;
    drop(guard);
    let status = StatusCode::from_u16(result.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(result.body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        headers.insert("x-text2img-job", v);
    }
    // Where and how long: the time in the queue and running, for clients and load tests.
    let meta = &result.meta;
    if let Some(worker) = meta["worker"]
        .as_str()
        .and_then(|w| axum::http::HeaderValue::from_str(w).ok())
    {
        headers.insert("x-text2img-worker", worker);
    }
    if let (Some(q), Some(s), Some(f)) = (
        meta["queued_ms"].as_u64(),
        meta["started_ms"].as_u64(),
        meta["finished_ms"].as_u64(),
    ) {
        headers.insert("x-text2img-queue-ms", s.saturating_sub(q).into());
        headers.insert("x-text2img-run-ms", f.saturating_sub(s).into());
    }
    Ok(response)
}

/// The jobs `progress` and `interrupt` mean: the one `id_task` names, else those this front
/// end waits for, oldest first (A1111's "the running job").
fn meant_jobs(app: &FrontState, query: &HashMap<String, String>) -> Vec<String> {
    match query.get("id_task") {
        Some(id) => vec![id.clone()],
        None => lock(&app.in_flight).clone(),
    }
}

/// `GET /sdapi/v1/progress[?id_task=ID]`: a job's progress as its worker wrote it; without
/// an id, the oldest job this front end waits for that is running.
async fn progress(
    State(app): State<Arc<FrontState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let mut found = None;
    for id in meant_jobs(&app, &query) {
        if let Some(p) = app.queue.progress(&id).await.map_err(unavailable)? {
            found = Some(p);
            break;
        }
    }
    let waiting = app.queue.waiting().await.map_err(unavailable)?;
    let p = found.unwrap_or(Value::Null);
    Ok(Json(json!({
        "progress": p["progress"].as_f64().unwrap_or(0.0),
        "eta_relative": p["eta_relative"].as_f64().unwrap_or(0.0),
        "state": {
            "skipped": false,
            "interrupted": p["interrupted"].as_bool().unwrap_or(false),
            "job": if p.is_null() { "" } else { "txt2img" },
            "job_count": waiting + usize::from(!p.is_null()),
            "job_timestamp": p["job_timestamp"],
            "job_no": 0,
            "sampling_step": p["sampling_step"].as_u64().unwrap_or(0),
            "sampling_steps": p["sampling_steps"].as_u64().unwrap_or(0),
        },
        "current_image": p["current_image"],
        "textinfo": null,
        "id_task": p["job"],
        "worker": p["worker"],
    })))
}

/// `POST /sdapi/v1/interrupt[?id_task=ID]`: that job (or this front end's running jobs)
/// stops and answers with the images it has.
async fn interrupt(
    State(app): State<Arc<FrontState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let mut interrupted = false;
    for id in meant_jobs(&app, &query) {
        let running = app
            .queue
            .progress(&id)
            .await
            .map_err(unavailable)?
            .is_some();
        if running {
            app.queue
                .stop(&id, Stop::Interrupt)
                .await
                .map_err(unavailable)?;
            interrupted = true;
        }
    }
    Ok(Json(json!({ "interrupted": interrupted })))
}

async fn live_lists(app: &FrontState) -> Result<Vec<Value>, ApiError> {
    let workers = inventory::live(&mut app.queue.connection())
        .await
        .map_err(unavailable)?;
    Ok(workers.into_iter().map(|w| w["lists"].clone()).collect())
}

/// A model list: the union of the live workers' lists (without repeats by `key`).
async fn union_of(app: &FrontState, name: &str, key: &str) -> Result<Json<Value>, ApiError> {
    let lists = live_lists(app).await?;
    Ok(Json(inventory::union(&lists, name, Some(key))))
}

async fn sd_models(State(app): State<Arc<FrontState>>) -> Result<Json<Value>, ApiError> {
    union_of(&app, "sd-models", "title").await
}

async fn loras(State(app): State<Arc<FrontState>>) -> Result<Json<Value>, ApiError> {
    union_of(&app, "loras", "name").await
}

async fn sd_vae(State(app): State<Arc<FrontState>>) -> Result<Json<Value>, ApiError> {
    union_of(&app, "sd-vae", "model_name").await
}

async fn embeddings(State(app): State<Arc<FrontState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(inventory::embeddings(&live_lists(&app).await?)))
}

async fn controlnet_models(State(app): State<Arc<FrontState>>) -> Result<Json<Value>, ApiError> {
    let lists = live_lists(&app).await?;
    Ok(Json(
        json!({ "model_list": inventory::union(&lists, "controlnet-models", None) }),
    ))
}

/// `GET /sdapi/v1/options`: the checkpoint requests run on: the one selected for all front
/// ends, else the first live worker's.
async fn options(State(app): State<Arc<FrontState>>) -> Result<Json<Value>, ApiError> {
    let selected: HashMap<String, String> = app
        .queue
        .connection()
        .hgetall(keys::OPTIONS)
        .await
        .map_err(unavailable)?;
    let checkpoint = match selected.get("sd_model_checkpoint") {
        Some(c) => json!(c),
        None => live_lists(&app)
            .await?
            .first()
            .map_or(Value::Null, |l| l["default"].clone()),
    };
    Ok(Json(json!({
        "sd_model_checkpoint": checkpoint,
        "sd_vae": selected.get("sd_vae").map_or("Automatic", String::as_str),
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
    })))
}

/// `POST /sdapi/v1/options`: selects the checkpoint (and VAE) for the A1111 requests of
/// every front end that name none; the workers that have it run them.
async fn set_options(
    State(app): State<Arc<FrontState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let fields = crate::serve::request_fields(&app.options, &headers, body).await?;
    a1111::only_model_settings(&fields)?;
    let lists = live_lists(&app).await?;
    let mut settings: Vec<(&str, String)> = Vec::new();
    if let Some(name) = fields.string("sd_model_checkpoint")? {
        let (title, _) = inventory::find_checkpoint(&lists, &name).ok_or_else(|| {
            ApiError::field(
                "sd_model_checkpoint",
                format!("`{name}` is on no live worker"),
            )
        })?;
        settings.push(("sd_model_checkpoint", title));
    }
    if let Some(vae) = fields.string("sd_vae")? {
        settings.push(("sd_vae", vae));
    }
    if !settings.is_empty() {
        let _: () = app
            .queue
            .connection()
            .hset_multiple(keys::OPTIONS, &settings)
            .await
            .map_err(unavailable)?;
    }
    Ok(Json(Value::Null))
}

/// `refresh-checkpoints`, `refresh-loras`, `refresh-vae`: every worker rescans its folders
/// at its next heartbeat.
async fn refresh(State(app): State<Arc<FrontState>>) -> Result<Json<Value>, ApiError> {
    let _: i64 = app
        .queue
        .connection()
        .incr(keys::REFRESH, 1)
        .await
        .map_err(unavailable)?;
    Ok(Json(Value::Null))
}

async fn health(State(app): State<Arc<FrontState>>) -> Response {
    let mut conn = app.queue.connection();
    let workers = inventory::live(&mut conn).await;
    let waiting = app.queue.waiting().await;
    match (workers, waiting) {
        (Ok(workers), Ok(waiting)) => Json(json!({
            "status": "ok",
            "redis": "up",
            "workers": workers.len(),
            "busy": workers.iter().filter(|w| w["running"] == json!(true)).count(),
            "queue": waiting,
            "waiting_here": lock(&app.in_flight).len(),
        }))
        .into_response(),
        (Err(e), _) | (_, Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "redis": e.to_string() })),
        )
            .into_response(),
    }
}
