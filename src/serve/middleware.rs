//! What wraps every request: the access log line, CORS, and the API key check.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::api_error::{ApiError, Flavor};
use super::ServeOptions;

/// Who may call the server: what the middleware checks, shared by the in-process server and
/// the front end of a Redis queue.
#[derive(Clone, Debug)]
pub struct Access {
    pub api_key: Option<String>,
    pub cors_origin: Option<String>,
    /// Bound to a loopback address (then, without a key, only loopback host names answer).
    pub loopback: bool,
}

impl Access {
    pub fn new(options: &ServeOptions) -> Self {
        Self {
            api_key: options.api_key.clone(),
            cors_origin: options.cors_origin.clone(),
            loopback: super::is_loopback_bind(options),
        }
    }
}

/// Wraps a router in the layers every request passes, outside-in: the log line, CORS, the
/// origin and host check, the API key.
pub fn wrap(router: axum::Router, access: Arc<Access>) -> axum::Router {
    router
        .layer(axum::middleware::from_fn_with_state(access.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(
            access.clone(),
            guard_origin,
        ))
        .layer(axum::middleware::from_fn_with_state(access, cors))
        .layer(axum::middleware::from_fn(log))
}

/// One line per request: method, path, status, time. Never headers (they carry the key),
/// never the query string. A request whose client went away before the answer is logged
/// with status 499 (nginx's "client closed request").
pub async fn log(request: Request, next: Next) -> Response {
    let mut line = LogLine {
        method: request.method().clone(),
        path: request.uri().path().to_string(),
        started: Instant::now(),
        status: None,
    };
    let response = next.run(request).await;
    line.status = Some(response.status().as_u16());
    response
}

struct LogLine {
    method: Method,
    path: String,
    started: Instant,
    status: Option<u16>,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        eprintln!(
            "{} {} {} {:.3}s",
            self.method,
            self.path,
            self.status.unwrap_or(499),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// With `--cors-origin`, lets pages from that origin call the API (and answers their
/// preflight requests); without it, browsers keep other origins out.
pub async fn cors(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let Some(allowed) = access.cors_origin.as_deref() else {
        return next.run(request).await;
    };
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let matches = origin
        .as_deref()
        .is_some_and(|o| allowed == "*" || o == allowed);
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    if matches {
        let h = response.headers_mut();
        let value = HeaderValue::from_str(origin.as_deref().unwrap_or(allowed))
            .unwrap_or(HeaderValue::from_static("null"));
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Authorization, Content-Type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    response
}

/// Keeps other web sites out of a server on this machine: a browser page from another origin
/// may not send state-changing requests (POST) unless `--cors-origin` names it, and a server
/// bound to loopback without a key answers only to loopback host names, so a DNS-rebinding
/// page cannot reach it under its own name.
pub async fn guard_origin(
    State(access): State<Arc<Access>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    if access.api_key.is_none() && access.loopback && !is_loopback_host(&host) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!("host `{host}` is not allowed: this server answers to localhost names only"),
        )
        .into_response();
    }
    let state_changing = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if state_changing {
        if let Some(origin) = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
        {
            let same = origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(&host));
            let allowed = access
                .cors_origin
                .as_deref()
                .is_some_and(|o| o == "*" || o == origin);
            if !same && !allowed {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from pages at `{origin}` are not allowed (see --cors-origin)"
                    ),
                )
                .into_response();
            }
        }
    }
    next.run(request).await
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// With `--api-key`, every `/sdapi` and `/v1` call needs the key: `Authorization: Bearer KEY`,
/// or HTTP Basic with KEY as the password (what A1111 clients send). `/` and `/health` stay
/// open so the page can load and ask for the key.
pub async fn auth(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let Some(key) = access.api_key.as_deref() else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    let guarded = path.starts_with("/sdapi/") || path.starts_with("/v1/");
    if !guarded || request.method() == Method::OPTIONS || authorized(request.headers(), key) {
        return next.run(request).await;
    }
    let flavor = if path.starts_with("/v1/") {
        Flavor::OpenAi
    } else {
        Flavor::A1111
    };
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "this server needs an API key: send `Authorization: Bearer KEY` (or HTTP Basic with the key as the password)",
    )
    .flavor(flavor)
    .into_response()
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        constant_time_eq(credentials.as_bytes(), key.as_bytes())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        let password = match decoded.iter().position(|&b| b == b':') {
            Some(i) => &decoded[i + 1..],
            None => &decoded[..],
        };
        constant_time_eq(password, key.as_bytes())
    } else {
        false
    }
}

/// Equality whose time depends only on the length of `given`, never on where it first
/// differs from `key` (so timing does not leak the key byte by byte).
fn constant_time_eq(given: &[u8], key: &[u8]) -> bool {
    if key.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != key.len());
    for (i, &b) in given.iter().enumerate() {
        diff |= b ^ key[i % key.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:7860",
            "127.0.0.1:80",
            "[::1]:7860",
            "127.3.4.5",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.test",
            "evil.test:7860",
            "10.0.0.1:7860",
            "",
            "localhost.evil.test",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer k1".parse().unwrap());
        assert!(authorized(&h, "k1"));
        assert!(!authorized(&h, "k2"));
        let basic = base64::engine::general_purpose::STANDARD.encode("user:k1");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert!(authorized(&h, "k1"));
        assert!(!authorized(&h, "user"));
    }
}
