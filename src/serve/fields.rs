//! Reading a JSON request body field by field, so that every type error names its field
//! (serde's derive errors name a line and column instead). Unknown fields are ignored.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use image::DynamicImage;
use serde_json::{Map, Value};

use super::api_error::ApiError;

/// Reads at most `limit` bytes of body within `deadline`: 413 as soon as the body passes the
/// limit while it streams in (a declared length over it is refused before reading any),
/// 408 when the client has not sent it all in time.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the server's limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let Ok(read) = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:.0} s",
                deadline.as_secs_f64()
            ),
        ));
    };
    match read {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            // `to_bytes` reports the limit through its error chain.
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(err) = source {
                if err.to_string().contains("length limit exceeded") {
                    return Err(too_large());
                }
                source = err.source();
            }
            Err(ApiError::bad_request(format!(
                "could not read the request body: {e}"
            )))
        }
    }
}

/// The fields of a JSON object body.
#[derive(Clone, Debug)]
pub struct Fields(Map<String, Value>);

impl Fields {
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Self(map)),
            other => Err(ApiError::bad_request(format!(
                "the body must be a JSON object, not {}",
                type_name(&other)
            ))),
        }
    }

    /// The field, treating `null` as absent.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn from_map(map: Map<String, Value>) -> Self {
        Self(map)
    }

    /// The object itself (what a queued job carries).
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// Sets a field (the front end of a queue pins a random seed before it enqueues).
    pub fn set(&mut self, name: &str, value: Value) {
        self.0.insert(name.to_string(), value);
    }

    /// An array of objects (A1111's `alwayson_scripts.controlnet.args`), each as fields.
    pub fn objects(&self, name: &str) -> Result<Vec<Fields>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(map) => Ok(Self(map.clone())),
                    other => Err(wrong_type(&format!("{name}[{i}]"), "an object", other)),
                })
                .collect(),
            Some(other) => Err(wrong_type(name, "an array of objects", other)),
        }
    }

    /// A field of any type (one that clients send as a name or a number).
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }

    /// The names of the fields present.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// A field that holds an object (A1111's `override_settings`), as fields of its own.
    pub fn object(&self, name: &str) -> Result<Option<Fields>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Self(map.clone()))),
            Some(other) => Err(wrong_type(name, "an object", other)),
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(wrong_type(name, "a string", other)),
        }
    }

    /// An integer (a float with no fractional part, such as `512.0`, is accepted).
    pub fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    return Ok(Some(i));
                }
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                    _ => Err(ApiError::field(
                        name,
                        format!("must be an integer, not {n}"),
                    )),
                }
            }
            Some(other) => Err(wrong_type(name, "an integer", other)),
        }
    }

    /// An integer in `min..=max`.
    pub fn integer_in(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.integer(name)? {
            Some(v) if v < min || v > max => Err(ApiError::field(
                name,
                format!("must be between {min} and {max}, not {v}"),
            )),
            other => Ok(other),
        }
    }

    /// Two numbers, as a JSON array `[a, b]`.
    pub fn number_pair(&self, name: &str) -> Result<Option<(f64, f64)>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => match items.as_slice() {
                [Value::Number(a), Value::Number(b)] => Ok(a.as_f64().zip(b.as_f64())),
                _ => Err(ApiError::field(name, "must be an array of two numbers")),
            },
            Some(other) => Err(wrong_type(name, "an array of two numbers", other)),
        }
    }

    pub fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(wrong_type(name, "a number", other)),
        }
    }
}

impl Fields {
    /// A boolean (A1111 clients also send 0 and 1).
    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::Number(n)) if n.as_i64() == Some(0) => Ok(Some(false)),
            Some(Value::Number(n)) if n.as_i64() == Some(1) => Ok(Some(true)),
            Some(other) => Err(wrong_type(name, "a boolean", other)),
        }
    }

    /// A picture sent as base64 (a `data:image/...;base64,` prefix allowed), decoded with its
    /// size checked against `max_side` from its header.
    pub fn image(&self, name: &str, max_side: usize) -> Result<Option<DynamicImage>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => decode_image(name, s, max_side).map(Some),
            Some(other) => Err(wrong_type(name, "a base64 image string", other)),
        }
    }

    /// A list of pictures sent as base64 strings.
    pub fn images(&self, name: &str, max_side: usize) -> Result<Vec<DynamicImage>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let field = format!("{name}[{i}]");
                    match item {
                        Value::String(s) => decode_image(&field, s, max_side),
                        other => Err(wrong_type(&field, "a base64 image string", other)),
                    }
                })
                .collect(),
            Some(other) => Err(wrong_type(name, "an array of base64 images", other)),
        }
    }
}

/// Base64 (standard or URL-safe alphabet, padded or not, optionally a data URL) to a picture.
pub fn decode_image(field: &str, text: &str, max_side: usize) -> Result<DynamicImage, ApiError> {
    use base64::Engine;
    let payload = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text,
    };
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let trimmed = compact.trim_end_matches('=');
    let engines = [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let bytes = engines
        .iter()
        .find_map(|e| e.decode(trimmed).ok())
        .ok_or_else(|| ApiError::field(field, "is not base64"))?;
    image_bytes(field, &bytes, max_side)
}

/// An uploaded picture's bytes to a picture; errors name the field.
pub fn image_bytes(field: &str, bytes: &[u8], max_side: usize) -> Result<DynamicImage, ApiError> {
    crate::image_in::decode(bytes, "", max_side)
        .map_err(|e| ApiError::field(field, e.message().trim_start_matches(": ")))
}

fn wrong_type(name: &str, expected: &str, found: &Value) -> ApiError {
    ApiError::field(
        name,
        format!("must be {expected}, not {}", type_name(found)),
    )
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let f =
            Fields::parse(br#"{"steps": "20", "width": 512.0, "cfg_scale": 7, "x": [1]}"#).unwrap();
        let err = f.integer("steps").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("steps"));
        assert!(
            err.message.contains("must be an integer, not a string"),
            "{}",
            err.message
        );
        assert_eq!(f.integer("width").unwrap(), Some(512));
        assert_eq!(f.number("cfg_scale").unwrap(), Some(7.0));
        assert_eq!(f.integer("absent").unwrap(), None);
        let err = f.integer_in("width", 8, 256).unwrap_err();
        assert!(
            err.message.contains("between 8 and 256, not 512"),
            "{}",
            err.message
        );
        assert!(Fields::parse(b"{")
            .unwrap_err()
            .message
            .starts_with("malformed JSON"));
        assert!(Fields::parse(b"[]")
            .unwrap_err()
            .message
            .contains("not an array"));
    }
}
