//! The AUTOMATIC1111 web UI's API (`/sdapi/v1/...`), the one most image clients speak.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use crate::image_in;
use crate::latent::schedulers::SchedulerKind;
use crate::pipeline::{HiresFix, InpaintOptions, LatentUpscaler, MaskedContent, ResizeMode};
use crate::png_out::a1111_parameters;

use super::api_error::ApiError;
use super::fields::Fields;
use super::plan::{a1111_aliases, a1111_sampler, Asked};
use super::{encode_images, model_for, plan_on, run_plan, AppState};

/// `POST /sdapi/v1/txt2img` (with hires fix).
pub async fn txt2img(app: &AppState, fields: &Fields) -> Result<Value, ApiError> {
    let mut asked = common_fields(fields)?;
    asked.hires = hires_fix(fields, app.limits.max_steps)?;
    // As A1111, which ignores the switch point without a refiner to switch to.
    asked.refiner_start = fields.number("refiner_switch_at")?;
    (asked.controls, asked.controlnets) = super::controlnet::units(app, fields, None)?;
    respond(app, &asked).await
}

/// `POST /sdapi/v1/img2img`: img2img, and inpainting with a `mask`, with A1111's options.
pub async fn img2img(app: &AppState, fields: &Fields) -> Result<Value, ApiError> {
    let mut asked = common_fields(fields)?;
    let max_side = app.limits.max_size;
    let mut pictures = fields.images("init_images", max_side)?;
    let picture = match pictures.len() {
        0 => return Err(ApiError::field("init_images", "needs one picture")),
        1 => pictures.remove(0),
        n => {
            return Err(ApiError::field(
                "init_images",
                format!("has {n} pictures; text2img takes one per request"),
            ))
        }
    };
    asked.init_image = Some(image_in::rgb(&picture));
    (asked.controls, asked.controlnets) =
        super::controlnet::units(app, fields, asked.init_image.as_ref())?;
    asked.strength = Some(fields.number("denoising_strength")?.unwrap_or(0.75));
    asked.resize_mode = match fields.integer_in("resize_mode", 0, 3)?.unwrap_or(0) {
        0 => ResizeMode::Stretch,
        1 => ResizeMode::Crop,
        2 => ResizeMode::Fill,
        _ => {
            return Err(ApiError::field(
                "resize_mode",
                "3 (latent upscale) is not supported; use 0 (just resize), 1 (crop and resize) or 2 (resize and fill)",
            ))
        }
    };
    if let Some(mask) = fields.image("mask", max_side)? {
        let mut mask = a1111_mask(&mask);
        if fields.integer_in("inpainting_mask_invert", 0, 1)? == Some(1) {
            image::imageops::invert(&mut mask);
        }
        asked.mask = Some(mask);
        // A1111's API defaults: blur 4, masked content "fill", only masked with no padding;
        // the original always pasted back over the kept area.
        asked.inpaint = InpaintOptions {
            mask_blur: fields.number("mask_blur")?.unwrap_or(4.0) as f32,
            only_masked_padding: if fields.boolean("inpaint_full_res")?.unwrap_or(true) {
                Some(
                    fields
                        .integer_in("inpaint_full_res_padding", 0, 4096)?
                        .unwrap_or(0) as u32,
                )
            } else {
                None
            },
            masked_content: match fields.integer_in("inpainting_fill", 0, 3)?.unwrap_or(0) {
                0 => MaskedContent::Fill,
                1 => MaskedContent::Original,
                2 => MaskedContent::LatentNoise,
                _ => MaskedContent::LatentNothing,
            },
            keep_original: true,
        };
    }
    respond(app, &asked).await
}

/// A1111's mask: a picture with transparency masks by its alpha (opaque repaints), any
/// other by its grey level.
fn a1111_mask(mask: &image::DynamicImage) -> image::GrayImage {
    if mask.color().has_alpha() {
        let rgba = mask.to_rgba8();
        if rgba.pixels().any(|p| p.0[3] != 255) {
            return image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([if rgba.get_pixel(x, y).0[3] > 128 {
                    255
                } else {
                    0
                }])
            });
        }
    }
    image_in::luma(mask)
}

/// The fields txt2img and img2img share.
fn common_fields(fields: &Fields) -> Result<Asked, ApiError> {
    let sampler_name = match fields.string("sampler_name")? {
        Some(name) => Some(name),
        // Older clients name the sampler in `sampler_index`.
        None => fields.string("sampler_index")?,
    };
    let scheduler = a1111_sampler(
        sampler_name.as_deref(),
        fields.string("scheduler")?.as_deref(),
    )?;
    let overrides = fields.object("override_settings")?;
    Ok(Asked {
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
        checkpoint: match &overrides {
            Some(settings) => settings
                .string("sd_model_checkpoint")
                .map_err(|e| e.within("override_settings"))?,
            None => None,
        },
        vae: match &overrides {
            Some(settings) => settings
                .string("sd_vae")
                .map_err(|e| e.within("override_settings"))?,
            None => None,
        },
        ..Asked::default()
    })
}

/// txt2img's hires fix fields (`enable_hr`, `hr_scale`, `hr_upscaler`,
/// `hr_second_pass_steps`, `hr_resize_x/y`, `denoising_strength`).
fn hires_fix(fields: &Fields, max_steps: usize) -> Result<Option<HiresFix>, ApiError> {
    if !fields.boolean("enable_hr")?.unwrap_or(false) {
        return Ok(None);
    }
    let upscaler = match fields.string("hr_upscaler")? {
        None => LatentUpscaler::Bilinear,
        Some(name) => LatentUpscaler::NAMES
            .iter()
            .find(|(a1111, cli, _)| {
                name.eq_ignore_ascii_case(a1111) || name.eq_ignore_ascii_case(cli)
            })
            .map(|(_, _, u)| *u)
            .ok_or_else(|| {
                ApiError::field(
                    "hr_upscaler",
                    format!("`{name}` is not available; available: Latent, Latent (nearest)"),
                )
            })?,
    };
    let scale = fields.number("hr_scale")?.unwrap_or(2.0);
    if !(scale.is_finite() && scale > 0.0 && scale <= 8.0) {
        return Err(ApiError::field(
            "hr_scale",
            format!("must be in (0, 8], not {scale}"),
        ));
    }
    let size = |name: &str| -> Result<Option<usize>, ApiError> {
        Ok(fields
            .integer_in(name, 0, 1 << 16)?
            .filter(|&v| v > 0)
            .map(|v| v as usize))
    };
    let strength = fields.number("denoising_strength")?.unwrap_or(0.7);
    Ok(Some(HiresFix {
        scale,
        width: size("hr_resize_x")?,
        height: size("hr_resize_y")?,
        steps: fields
            .integer_in("hr_second_pass_steps", 0, max_steps as i64)?
            .filter(|&s| s > 0)
            .map(|s| s as usize),
        strength,
        upscaler,
    }))
}

/// Runs a request and answers as A1111 does: the images, the parameters, the info.
async fn respond(app: &AppState, asked: &Asked) -> Result<Value, ApiError> {
    let loaded = model_for(app, asked.checkpoint.as_deref(), asked.vae.as_deref()).await?;
    let mut asked = asked.clone();
    // As A1111, which ignores the switch point without a refiner to switch to.
    if loaded.pipeline.refiner.is_none() {
        asked.refiner_start = None;
    }
    let asked = &asked;
    let plan = plan_on(app, &loaded, asked)?;
    let output = run_plan(app, &loaded, &plan).await?;
    let model_name = &loaded.pipeline.name;
    let r = &plan.resolved;
    let seeds: Vec<u64> = output.images.iter().map(|(img, _, _)| img.seed).collect();
    let infotexts: Vec<String> = output
        .images
        .iter()
        .map(|(img, req, res)| a1111_parameters(req, res, img.seed, model_name))
        .collect();
    let n = seeds.len();
    let mut parameters = json!({
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
    if let Some(strength) = r.strength {
        parameters["denoising_strength"] = json!(strength);
    }
    if let Some(h) = &r.hires {
        parameters["enable_hr"] = json!(true);
        parameters["hr_scale"] = json!(h.scale);
        parameters["hr_upscaler"] = json!(h.upscaler.a1111_name());
        parameters["hr_second_pass_steps"] = json!(h.steps);
        parameters["hr_resize_x"] = json!(h.width);
        parameters["hr_resize_y"] = json!(h.height);
        parameters["denoising_strength"] = json!(h.strength);
    }
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
        "denoising_strength": r.strength.or(r.hires.as_ref().map(|h| h.strength)),
        "batch_size": plan.batch_size,
        "sd_model_name": model_name,
        "infotexts": infotexts,
        "interrupted": output.interrupted,
        "warnings": output.warnings,
        "version": concat!("text2img ", env!("CARGO_PKG_VERSION")),
    });
    Ok(json!({
        "images": encode_images(&output, model_name)?,
        "parameters": parameters,
        "info": info.to_string(),
    }))
}

/// `GET /sdapi/v1/upscalers`: hires fix's latent upscalers.
pub async fn upscalers() -> Json<Value> {
    let list: Vec<Value> = LatentUpscaler::NAMES
        .iter()
        .map(|(name, _, _)| json!({ "name": name, "model_name": null, "model_path": null, "model_url": null, "scale": 2 }))
        .collect();
    Json(Value::Array(list))
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

/// `GET /sdapi/v1/sd-models`: the checkpoints the server may run (its `--model` and those
/// in `--models-dir`'s `Stable-diffusion/`).
pub async fn sd_models(State(app): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = app
        .models
        .checkpoints()
        .iter()
        .map(|c| {
            json!({
                "title": c.title,
                "model_name": c.model_name,
                "hash": null,
                "sha256": null,
                "filename": c.source,
                "config": null,
            })
        })
        .collect();
    Json(Value::Array(list))
}

/// `GET /sdapi/v1/sd-vae`: the VAEs in `--models-dir`'s `VAE/` (besides "Automatic", the
/// checkpoint's own).
pub async fn sd_vae(State(app): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = app
        .models
        .vaes()
        .iter()
        .map(|v| json!({ "model_name": v.name, "filename": v.path }))
        .collect();
    Json(Value::Array(list))
}

pub async fn refresh_vae(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    app.models
        .refresh_vaes()
        .map_err(|e| ApiError::internal(e.message()))?;
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/loras`: the LoRAs prompts may name as `<lora:NAME:WEIGHT>`.
pub async fn loras(State(app): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = app
        .models
        .loras()
        .iter()
        .map(|l| json!({ "name": l.name, "alias": l.name, "path": l.path, "metadata": {} }))
        .collect();
    Json(Value::Array(list))
}

/// `POST /sdapi/v1/refresh-checkpoints` and `refresh-loras`: look at the folders again.
pub async fn refresh_checkpoints(
    State(app): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    app.models
        .refresh_checkpoints()
        .map_err(|e| ApiError::internal(e.message()))?;
    Ok(Json(Value::Null))
}

pub async fn refresh_loras(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    app.models
        .refresh_loras()
        .map_err(|e| ApiError::internal(e.message()))?;
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/embeddings`: the textual-inversion embeddings prompts may name (the
/// server's `--embedding` and `--embeddings-dir`), and those of the folder that do not fit
/// the loaded model (`skipped`), as A1111 lists them.
pub async fn embeddings(State(app): State<Arc<AppState>>) -> Json<Value> {
    let Some(model) = app.models.loaded() else {
        return Json(json!({ "loaded": {}, "skipped": {} }));
    };
    let entry = |vectors: Option<usize>, width: Option<usize>| {
        json!({
            "step": null,
            "sd_checkpoint": null,
            "sd_checkpoint_name": null,
            "shape": width,
            "vectors": vectors,
        })
    };
    let pipeline = &model.pipeline;
    let loaded: serde_json::Map<String, Value> = pipeline
        .embeddings
        .iter()
        .map(|e| {
            let (vectors, width) = e.shape();
            (e.name.clone(), entry(vectors, width))
        })
        .collect();
    let skipped: serde_json::Map<String, Value> = pipeline
        .skipped_embeddings
        .iter()
        .map(|e| (e.name.clone(), entry(e.vectors, e.width)))
        .collect();
    Json(json!({ "loaded": loaded, "skipped": skipped }))
}

/// `GET /sdapi/v1/options`: the few settings clients read before they generate.
pub async fn options(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": app.models.selected().title,
        "sd_vae": app.models.selected_vae().map_or("Automatic".to_string(), |v| v.name),
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
    }))
}

/// The settings `POST /sdapi/v1/options` changes, in-process or through a queue; naming any
/// other is an error rather than silence.
pub(crate) fn only_model_settings(fields: &Fields) -> Result<(), ApiError> {
    match fields
        .names()
        .find(|n| !["sd_model_checkpoint", "sd_vae"].contains(n))
    {
        Some(other) => Err(ApiError::field(
            other,
            "is not a setting this server changes (only sd_model_checkpoint and sd_vae)",
        )),
        None => Ok(()),
    }
}

/// `POST /sdapi/v1/options`: `sd_model_checkpoint` switches the model requests run on (the
/// load waits behind the jobs queued before it, and the answer waits for the load). Other
/// settings are not kept; naming them is an error rather than silence.
pub async fn set_options(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let fields = super::request_fields(&app.options, &headers, body).await?;
    only_model_settings(&fields)?;
    // Both checked before either changes.
    let checkpoint = fields
        .string("sd_model_checkpoint")?
        .map(|name| {
            app.models
                .find(&name)
                .map_err(|e| ApiError::field("sd_model_checkpoint", e.message()))
        })
        .transpose()?;
    let vae = fields
        .string("sd_vae")?
        .map(|name| {
            app.models
                .find_vae(&name)
                .map_err(|e| ApiError::field("sd_vae", e.message()))
        })
        .transpose()?;
    if let Some(checkpoint) = checkpoint {
        app.models.select(checkpoint);
    }
    if let Some(vae) = vae {
        app.models.select_vae(vae);
    }
    model_for(&app, None, None).await?;
    Ok(Json(Value::Null))
}
