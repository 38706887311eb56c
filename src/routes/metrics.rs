//! `GET /metrics`: this proxy's own registry as Prometheus text 0.0.4 (the
//! default, and for `text/plain`) or OpenMetrics (when `Accept` prefers
//! `application/openmetrics-text`). Reading it touches neither the upstream
//! nor any cached answer.

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, header::ACCEPT, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};

use crate::{metrics::Format, negotiate, state::AppState};

pub(super) async fn metrics(State(state): State<AppState>, request: HeaderMap) -> Response {
    let format = format(&request);
    let cache = state.proxy().cache();
    cache.sync().await;
    let text = state
        .metrics()
        .render(format, cache.entry_count(), cache.weighted_size());
    let mut response = text.into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    response
}

/// OpenMetrics only when the scraper prefers it to plain text (Prometheus
/// itself sends both, OpenMetrics with the higher `q`); ties go to the default.
fn format(request: &HeaderMap) -> Format {
    let openmetrics = negotiate::quality(request, &ACCEPT, &["application/openmetrics-text"]);
    let text = negotiate::quality(request, &ACCEPT, &["text/plain"])
        .or_else(|| negotiate::quality(request, &ACCEPT, &["text/*"]))
        .or_else(|| negotiate::quality(request, &ACCEPT, &["*/*"]));
    match openmetrics {
        Some(q) if q > 0.0 && q > text.unwrap_or(0.0) => Format::OpenMetrics,
        _ => Format::Prometheus,
    }
}
