//! The A1111 ControlNet extension's API, which clients already send: units in
//! `alwayson_scripts.controlnet.args` on txt2img and img2img, and `/controlnet/model_list`,
//! `/controlnet/module_list`, `/controlnet/detect`. Models come from `--models-dir`'s
//! `ControlNet/`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use base64::Engine;
use image::RgbImage;
use serde_json::{json, Value};

use crate::image_in;
use crate::pipeline::{ControlMode, ControlUnit, ResizeMode};

use super::api_error::ApiError;
use super::fields::{decode_image, Fields};
use super::AppState;

/// The preprocessors (`module`) a unit may name.
const MODULES: [&str; 2] = ["none", "canny"];

/// The enabled units of a request, and the ControlNet file each names (`net` indexes it).
/// A unit without an image takes `init_image` (img2img), as A1111 does.
pub fn units(
    app: &AppState,
    fields: &Fields,
    init_image: Option<&RgbImage>,
) -> Result<(Vec<ControlUnit>, Vec<PathBuf>), ApiError> {
    let Some(scripts) = fields.object("alwayson_scripts")? else {
        return Ok((Vec::new(), Vec::new()));
    };
    let Some(controlnet) = scripts
        .object("controlnet")
        .map_err(|e| e.within("alwayson_scripts"))?
    else {
        return Ok((Vec::new(), Vec::new()));
    };
    let prefix = "alwayson_scripts.controlnet";
    let args = controlnet.objects("args").map_err(|e| e.within(prefix))?;
    let mut units = Vec::new();
    let mut files = Vec::new();
    for (i, unit) in args.iter().enumerate() {
        let at = format!("{prefix}.args[{i}]");
        let parsed = one_unit(app, unit, init_image, files.len()).map_err(|e| e.within(&at))?;
        if let Some((unit, file)) = parsed {
            units.push(unit);
            files.push(file);
        }
    }
    Ok((units, files))
}

/// One unit, or `None` when it is disabled.
fn one_unit(
    app: &AppState,
    unit: &Fields,
    init_image: Option<&RgbImage>,
    net: usize,
) -> Result<Option<(ControlUnit, PathBuf)>, ApiError> {
    if !unit.boolean("enabled")?.unwrap_or(true) {
        return Ok(None);
    }
    let max = app.limits.max_size.max(image_in::DEFAULT_MAX_SIDE);
    let image = match unit.value("image").or(unit.value("input_image")) {
        // Older clients send {"image": ..., "mask": ...}.
        Some(Value::Object(map)) => match map.get("image") {
            Some(Value::String(s)) => Some(decode_image("image.image", s, max)?),
            _ => return Err(ApiError::field("image", "has no `image` string")),
        },
        Some(Value::String(s)) => Some(decode_image("image", s, max)?),
        Some(_) => return Err(ApiError::field("image", "must be a base64 image")),
        None => None,
    };
    let image = match (image, init_image) {
        (Some(image), _) => image_in::rgb(&image),
        (None, Some(init)) => init.clone(),
        (None, None) => {
            return Err(ApiError::field(
                "image",
                "is missing: txt2img needs a control image per unit",
            ))
        }
    };
    if unit.value("mask").is_some() {
        return Err(ApiError::field(
            "mask",
            "is not supported (ControlNet inpainting masks); leave it out",
        ));
    }
    let module = unit.string("module")?.unwrap_or_else(|| "none".into());
    let number = |name: &str, default: f64| -> Result<f64, ApiError> {
        Ok(unit.number(name)?.unwrap_or(default))
    };
    let image = match module.as_str() {
        "none" => image,
        "canny" => {
            let low = number("threshold_a", 100.0)?;
            let high = number("threshold_b", 200.0)?;
            crate::canny::canny_rgb(&image, low, high)
        }
        other => {
            return Err(ApiError::field(
                "module",
                format!(
                    "`{other}` is not available; available: {}",
                    MODULES.join(", ")
                ),
            ))
        }
    };
    let model = unit
        .string("model")?
        .ok_or_else(|| ApiError::field("model", "is missing: name a ControlNet"))?;
    let file = app
        .models
        .find_controlnet(&model)
        .map_err(|e| ApiError::field("model", e.message()))?;
    let mode = match unit.value("control_mode") {
        None => ControlMode::Balanced,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => ControlMode::Balanced,
        Some(Value::Number(n)) if n.as_u64() == Some(1) => ControlMode::Prompt,
        Some(Value::Number(n)) if n.as_u64() == Some(2) => ControlMode::Control,
        Some(Value::String(s)) if s == "Balanced" => ControlMode::Balanced,
        Some(Value::String(s)) if s == "My prompt is more important" => ControlMode::Prompt,
        Some(Value::String(s)) if s == "ControlNet is more important" => ControlMode::Control,
        Some(other) => {
            return Err(ApiError::field(
                "control_mode",
                format!("`{other}` is not one of Balanced, My prompt is more important, ControlNet is more important (or 0, 1, 2)"),
            ))
        }
    };
    // The extension's default is "Crop and Resize".
    let resize = match unit.value("resize_mode") {
        None => ResizeMode::Crop,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => ResizeMode::Stretch,
        Some(Value::Number(n)) if n.as_u64() == Some(1) => ResizeMode::Crop,
        Some(Value::Number(n)) if n.as_u64() == Some(2) => ResizeMode::Fill,
        Some(Value::String(s)) if s == "Just Resize" => ResizeMode::Stretch,
        Some(Value::String(s)) if s == "Crop and Resize" || s == "Scale to Fit (Inner Fit)" => {
            ResizeMode::Crop
        }
        Some(Value::String(s)) if s == "Resize and Fill" || s == "Envelope (Outer Fit)" => {
            ResizeMode::Fill
        }
        Some(other) => {
            return Err(ApiError::field(
                "resize_mode",
                format!("`{other}` is not one of Just Resize, Crop and Resize, Resize and Fill (or 0, 1, 2)"),
            ))
        }
    };
    let unit = ControlUnit {
        scale: number("weight", 1.0)?,
        start: number("guidance_start", 0.0)?,
        end: number("guidance_end", 1.0)?,
        mode,
        resize,
        ..ControlUnit::new(net, image)
    };
    unit.check_values()
        .map_err(|e| ApiError::field("guidance_start", e.message()))?;
    Ok(Some((unit, file.path)))
}

/// `GET /controlnet/model_list`: the ControlNets in `--models-dir`'s `ControlNet/`.
pub async fn model_list(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    app.models
        .refresh_controlnets()
        .map_err(|e| ApiError::internal(e.message()))?;
    let names: Vec<String> = app
        .models
        .controlnets()
        .into_iter()
        .map(|c| c.name)
        .collect();
    Ok(Json(json!({ "model_list": names })))
}

/// `GET /controlnet/module_list`: the preprocessors.
pub async fn module_list() -> Json<Value> {
    Json(json!({ "module_list": MODULES, "module_detail": {} }))
}

/// `POST /controlnet/detect`: a preprocessor's output for each picture
/// (`controlnet_module`, `controlnet_input_images`, `controlnet_threshold_a/b`).
pub async fn detect(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let fields = super::request_fields(&app.options, &headers, body).await?;
    let module = fields
        .string("controlnet_module")?
        .unwrap_or_else(|| "none".into());
    if !MODULES.contains(&module.as_str()) {
        return Err(ApiError::field(
            "controlnet_module",
            format!(
                "`{module}` is not available; available: {}",
                MODULES.join(", ")
            ),
        ));
    }
    let max = app.limits.max_size.max(image_in::DEFAULT_MAX_SIDE);
    let pictures = fields.images("controlnet_input_images", max)?;
    if pictures.is_empty() {
        return Err(ApiError::field(
            "controlnet_input_images",
            "needs at least one picture",
        ));
    }
    let low = fields.number("controlnet_threshold_a")?.unwrap_or(100.0);
    let high = fields.number("controlnet_threshold_b")?.unwrap_or(200.0);
    let images = tokio::task::block_in_place(|| {
        pictures
            .iter()
            .map(|p| {
                let rgb = image_in::rgb(p);
                let out = if module == "canny" {
                    crate::canny::canny_rgb(&rgb, low, high)
                } else {
                    rgb
                };
                let png = crate::png_out::encode_rgb_png(
                    out.as_raw(),
                    out.width() as usize,
                    out.height() as usize,
                    None,
                )
                .map_err(|e| ApiError::internal(e.to_string()))?;
                Ok(base64::engine::general_purpose::STANDARD.encode(png))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })?;
    Ok(Json(json!({ "images": images, "info": "Success" })))
}
