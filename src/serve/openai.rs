//! OpenAI's image API (`POST /v1/images/generations`, `POST /v1/images/edits`), for clients
//! written against it.

use std::time::SystemTime;

use axum::body::Body;
use axum::http::HeaderMap;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::api_error::ApiError;
use super::fields::Fields;
use super::plan::Asked;
use super::{encode_images, model_for, plan_on, run_plan, AppState};
use crate::image_in;
use crate::pipeline::InpaintOptions;

/// `POST /v1/images/generations`.
pub async fn generations(app: &AppState, fields: &Fields) -> Result<Value, ApiError> {
    let prompt = fields
        .string("prompt")?
        .ok_or_else(|| ApiError::field("prompt", "is required"))?;
    match fields.string("response_format")?.as_deref() {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(ApiError::field(
                "response_format",
                format!("`{other}` is not supported; use `b64_json`"),
            ))
        }
    }
    let (width, height) = match fields.string("size")? {
        None => (None, None),
        Some(size) if size.eq_ignore_ascii_case("auto") => (None, None),
        Some(size) => parse_size(&size)
            .map(|(w, h)| (Some(w), Some(h)))
            .ok_or_else(|| {
                ApiError::field("size", format!("must look like `512x512`, not `{size}`"))
            })?,
    };
    let asked = Asked {
        prompt,
        // Not in OpenAI's API; local servers commonly accept these.
        negative_prompt: fields.string("negative_prompt")?.unwrap_or_default(),
        seed: fields.integer("seed")?,
        steps: fields.integer("steps")?,
        width,
        height,
        batch_size: fields.integer("n")?,
        count_field: "n",
        ..Asked::default()
    };
    respond(app, &asked).await
}

/// Runs a request and answers in OpenAI's shape.
async fn respond(app: &AppState, asked: &Asked) -> Result<Value, ApiError> {
    let loaded = model_for(app, asked.checkpoint.as_deref(), asked.vae.as_deref()).await?;
    let plan = plan_on(app, &loaded, asked)?;
    let output = run_plan(app, &loaded, &plan).await?;
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let data: Vec<Value> = encode_images(&output, &loaded.pipeline.name)?
        .into_iter()
        .map(|b64| json!({ "b64_json": b64 }))
        .collect();
    Ok(json!({ "created": created, "data": data }))
}

/// `"WxH"` to (W, H) as the request's integer fields.
fn parse_size(size: &str) -> Option<(i64, i64)> {
    let (w, h) = crate::pipeline::size::parse_wxh(size)?;
    Some((i64::try_from(w).ok()?, i64::try_from(h).ok()?))
}

/// `POST /v1/images/edits`'s multipart form as fields: the pictures (`image`, `mask`) as
/// base64, the rest as the strings they came as. Fields are what a queued job carries, so
/// an edit reads the same in-process and from the queue.
pub async fn edit_form(headers: HeaderMap, bytes: Vec<u8>) -> Result<Fields, ApiError> {
    use axum::extract::FromRequest;
    let mut request = axum::http::Request::new(Body::from(bytes));
    *request.headers_mut() = headers;
    let mut form = axum::extract::Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request(format!("the body must be multipart/form-data: {e}")))?;
    let mut fields = serde_json::Map::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "malformed multipart body: {e}"
                )))
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::field(&name, format!("could not be read: {e}")))?;
        let (name, value) = match name.as_str() {
            "image" | "image[]" => {
                if fields.contains_key("image") {
                    return Err(ApiError::field("image", "takes one picture"));
                }
                ("image".to_string(), STANDARD.encode(&data))
            }
            "mask" => (name, STANDARD.encode(&data)),
            _ => {
                let value = String::from_utf8(data.to_vec())
                    .map_err(|_| ApiError::field(&name, "must be UTF-8 text"))?;
                (name, value)
            }
        };
        fields.insert(name, Value::String(value));
    }
    Ok(Fields::from_map(fields))
}

/// `POST /v1/images/edits` (multipart, read by [`edit_form`]): `image`, an optional `mask`
/// whose transparent pixels are the area to edit (without one, the image's own
/// transparency is), `prompt`, `n`, `size`. The edit is inpainting at full strength, the
/// rest of the picture kept.
pub async fn edits(app: &AppState, fields: &Fields) -> Result<Value, ApiError> {
    let max_side = app.limits.max_size;
    let image = fields.image("image", max_side)?;
    let mask = fields.image("mask", max_side)?;
    let mut text = std::collections::HashMap::new();
    for name in fields.names().filter(|n| !["image", "mask"].contains(n)) {
        let value = match fields.string(name)? {
            Some(v) => v,
            None => continue,
        };
        text.insert(name.to_string(), value);
    }
    let image = image.ok_or_else(|| ApiError::field("image", "is required"))?;
    let prompt = text
        .remove("prompt")
        .ok_or_else(|| ApiError::field("prompt", "is required"))?;
    match text.get("response_format").map(String::as_str) {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(ApiError::field(
                "response_format",
                format!("`{other}` is not supported; use `b64_json`"),
            ))
        }
    }
    let mask = match mask {
        Some(m) => {
            if (m.width(), m.height()) != (image.width(), image.height()) {
                return Err(ApiError::field(
                    "mask",
                    format!(
                        "is {}x{}; it must be the image's size, {}x{}",
                        m.width(),
                        m.height(),
                        image.width(),
                        image.height()
                    ),
                ));
            }
            image_in::transparency_mask(&m)
        }
        None if image.color().has_alpha() => image_in::transparency_mask(&image),
        None => {
            return Err(ApiError::field(
                "mask",
                "is required when the image has no transparent area to edit",
            ))
        }
    };
    let (width, height) = match text.get("size").map(String::as_str) {
        None | Some("auto") => (None, None),
        Some(size) => parse_size(size)
            .map(|(w, h)| (Some(w), Some(h)))
            .ok_or_else(|| {
                ApiError::field("size", format!("must look like `512x512`, not `{size}`"))
            })?,
    };
    let integer = |name: &str| -> Result<Option<i64>, ApiError> {
        text.get(name)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| ApiError::field(name, format!("must be an integer, not `{v}`")))
            })
            .transpose()
    };
    let asked = Asked {
        prompt,
        negative_prompt: text.get("negative_prompt").cloned().unwrap_or_default(),
        seed: integer("seed")?,
        steps: integer("steps")?,
        width,
        height,
        batch_size: integer("n")?,
        count_field: "n",
        init_image: Some(image_in::rgb(&image)),
        mask: Some(mask),
        inpaint: InpaintOptions {
            keep_original: true,
            ..InpaintOptions::default()
        },
        ..Asked::default()
    };
    respond(app, &asked).await
}
