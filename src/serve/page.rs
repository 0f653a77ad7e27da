//! The web page at `/`: plain HTML, CSS and JavaScript embedded in the binary (no build
//! step, nothing fetched from elsewhere).

use axum::http::header;
use axum::response::IntoResponse;

const INDEX_HTML: &str = include_str!("page/index.html");

pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
            ),
        ],
        INDEX_HTML,
    )
}
