//! Errors as HTTP answers: a status and a JSON body that names the problem (and the field).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// Which API's error shape to answer with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flavor {
    /// `{"error": ..., "detail": ..., "field": ...}` (A1111 answers `error` + `detail`).
    #[default]
    A1111,
    /// `{"error": {"message", "type", "param", "code"}}`, as OpenAI's clients expect.
    OpenAi,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
    pub flavor: Flavor,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
            flavor: Flavor::A1111,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 500: the server failed at something that is not the request's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// A 400 about one field; the message starts with the field's name.
    pub fn field(field: &str, message: impl AsRef<str>) -> Self {
        Self {
            field: Some(field.to_string()),
            ..Self::bad_request(format!("`{field}` {}", message.as_ref()))
        }
    }

    /// The same error about a field inside `prefix` (`alwayson_scripts.controlnet.args[0]`).
    pub fn within(mut self, prefix: &str) -> Self {
        if let Some(field) = &self.field {
            let full = format!("{prefix}.{field}");
            self.message = self
                .message
                .replacen(&format!("`{field}`"), &format!("`{full}`"), 1);
            self.field = Some(full);
        }
        self
    }

    pub fn flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "queue_full",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            StatusCode::NOT_FOUND => "not_found",
            _ => "server_error",
        }
    }

    pub fn body(&self) -> Value {
        match self.flavor {
            Flavor::A1111 => json!({
                "error": self.kind(),
                "detail": self.message,
                "field": self.field,
            }),
            Flavor::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": self.kind(),
                    "param": self.field,
                    "code": null,
                }
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // Bearer, not Basic: a Basic challenge would make browsers pop up a login box
            // over the web page, which asks for the key itself.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"text2img\""),
            );
        }
        response
    }
}
