//! The AUTOMATIC1111 web UI's API (`/sdapi/v1/...`), the one most image clients speak.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use crate::latent::schedulers::SchedulerKind;
use crate::png_out::a1111_parameters;

use super::api_error::ApiError;
use super::plan::{a1111_aliases, a1111_sampler, plan, Asked};
use super::{encode_images, run_plan, AppState};

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let fields = super::request_fields(&app, &headers, body).await?;
    let sampler_name = match fields.string("sampler_name")? {
        Some(name) => Some(name),
        // Older clients name the sampler in `sampler_index`.
        None => fields.string("sampler_index")?,
    };
    let scheduler = a1111_sampler(
        sampler_name.as_deref(),
        fields.string("scheduler")?.as_deref(),
    )?;
    let asked = Asked {
        prompt: fields.string("prompt")?.unwrap_or_default(),
        negative_prompt: fields.string("negative_prompt")?.unwrap_or_default(),
        width: fields.integer("width")?,
        height: fields.integer("height")?,
        steps: fields.integer("steps")?,
        cfg_scale: fields.number("cfg_scale")?,
        guidance_rescale: fields.number("guidance_rescale")?,
        guidance_interval: fields.number_pair("guidance_interval")?,
        autoguidance: fields.number("autoguidance")?,
        seed: fields.integer("seed")?,
        scheduler,
        eta: fields.number("eta")?,
        batch_size: fields.integer("batch_size")?,
        n_iter: fields.integer("n_iter")?,
        count_field: "batch_size",
    };
    let plan = plan(&app.pipeline, &app.limits, &asked)?;
    let output = run_plan(&app, &plan).await?;
    let r = &plan.resolved;
    let seeds: Vec<u64> = output.images.iter().map(|(img, _, _)| img.seed).collect();
    let infotexts: Vec<String> = output
        .images
        .iter()
        .map(|(img, req, res)| a1111_parameters(req, res, img.seed, &app.model_name))
        .collect();
    let n = seeds.len();
    let parameters = json!({
        "prompt": asked.prompt,
        "negative_prompt": asked.negative_prompt,
        "width": r.width,
        "height": r.height,
        "steps": r.steps,
        "cfg_scale": r.guidance_scale,
        "guidance_rescale": r.guidance_rescale,
        "guidance_interval": [r.guidance_interval.start, r.guidance_interval.end],
        "autoguidance": r.autoguidance,
        "seed": plan.seed,
        "sampler_name": r.scheduler.a1111_name(),
        "scheduler": if r.scheduler == SchedulerKind::DpmPP2MKarras { "Karras" } else { "Automatic" },
        "batch_size": plan.batch_size,
        "n_iter": plan.n_iter,
        "eta": plan.batches[0].eta,
    });
    let info = json!({
        "prompt": asked.prompt,
        "all_prompts": vec![&asked.prompt; n],
        "negative_prompt": asked.negative_prompt,
        "all_negative_prompts": vec![&asked.negative_prompt; n],
        "seed": plan.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "sampler_name": r.scheduler.a1111_name(),
        "steps": r.steps,
        "cfg_scale": r.guidance_scale,
        "width": r.width,
        "height": r.height,
        "batch_size": plan.batch_size,
        "sd_model_name": app.model_name,
        "infotexts": infotexts,
        "interrupted": output.interrupted,
        "warnings": output.warnings,
        "version": concat!("text2img ", env!("CARGO_PKG_VERSION")),
    });
    Ok(Json(json!({
        "images": encode_images(&output, &app.model_name)?,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

/// `GET /sdapi/v1/progress`: the running job's progress and a step preview.
pub async fn progress(State(app): State<Arc<AppState>>) -> Json<Value> {
    let p = app.queue.progress();
    Json(json!({
        "progress": p.fraction,
        "eta_relative": p.eta_seconds(),
        "state": {
            "skipped": false,
            "interrupted": p.interrupted,
            "job": if p.started.is_some() { "txt2img" } else { "" },
            "job_count": p.job_count,
            "job_timestamp": p.job_timestamp,
            "job_no": 0,
            "sampling_step": p.sampling_step,
            "sampling_steps": p.sampling_steps,
        },
        "current_image": p.current_image,
        "textinfo": null,
    }))
}

/// `POST /sdapi/v1/interrupt`: the running job stops and returns what it has.
pub async fn interrupt(State(app): State<Arc<AppState>>) -> Json<Value> {
    let interrupted = app.queue.interrupt();
    Json(json!({ "interrupted": interrupted }))
}

/// `GET /sdapi/v1/samplers`.
pub async fn samplers() -> Json<Value> {
    let list: Vec<Value> = SchedulerKind::ALL
        .into_iter()
        .map(|k| {
            let mut aliases = vec![k.cli_name()];
            aliases.extend(a1111_aliases(k));
            json!({ "name": k.a1111_name(), "aliases": aliases, "options": {} })
        })
        .collect();
    Json(Value::Array(list))
}

/// `GET /sdapi/v1/schedulers`: the schedule types newer A1111 clients send as `scheduler`.
pub async fn schedulers() -> Json<Value> {
    Json(json!([
        { "name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false },
        { "name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false },
    ]))
}

/// `GET /sdapi/v1/sd-models`: the one model this server has loaded.
pub async fn sd_models(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!([{
        "title": app.model_name,
        "model_name": app.model_name,
        "hash": null,
        "sha256": null,
        "filename": app.model_source,
        "config": null,
    }]))
}

/// `GET /sdapi/v1/embeddings`: the textual-inversion embeddings prompts may name (the
/// server's `--embedding` and `--embeddings-dir`), as A1111 lists them.
pub async fn embeddings(State(app): State<Arc<AppState>>) -> Json<Value> {
    let loaded: serde_json::Map<String, Value> = app
        .pipeline
        .embeddings
        .iter()
        .map(|e| {
            let first = e.vectors.first();
            (
                e.name.clone(),
                json!({
                    "step": null,
                    "sd_checkpoint": null,
                    "sd_checkpoint_name": null,
                    "shape": first.and_then(|v| v.dim(1).ok()),
                    "vectors": first.and_then(|v| v.dim(0).ok()),
                }),
            )
        })
        .collect();
    Json(json!({ "loaded": loaded, "skipped": {} }))
}

/// `GET /sdapi/v1/options`: the few settings clients read before they generate.
pub async fn options(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": app.model_name,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
    }))
}
