//! OpenAI's image API (`POST /v1/images/generations`), for clients written against it.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use super::api_error::{ApiError, Flavor};
use super::plan::{plan, Asked};
use super::{encode_images, run_plan, AppState};

pub async fn generations(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    handle(app, headers, body)
        .await
        .map_err(|e| e.flavor(Flavor::OpenAi))
}

async fn handle(
    app: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let fields = super::request_fields(&app, &headers, body).await?;
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
    let plan = plan(&app.pipeline, &app.limits, &asked)?;
    let output = run_plan(&app, &plan).await?;
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let data: Vec<Value> = encode_images(&output, &app.model_name)?
        .into_iter()
        .map(|b64| json!({ "b64_json": b64 }))
        .collect();
    Ok(Json(json!({ "created": created, "data": data })))
}

/// `"WxH"` to (W, H) as the request's integer fields.
fn parse_size(size: &str) -> Option<(i64, i64)> {
    let (w, h) = crate::pipeline::size::parse_wxh(size)?;
    Some((i64::try_from(w).ok()?, i64::try_from(h).ok()?))
}
