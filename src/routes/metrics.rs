//! `GET /metrics`: Prometheus (OpenMetrics) text of this proxy's own registry.
//! Reading it touches neither the upstream nor any cached answer.

use axum::{
    extract::State,
    http::{HeaderValue, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};

use crate::{metrics, state::AppState};

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let cache = state.proxy().cache();
    cache.sync().await;
    let text = state
        .metrics()
        .render(cache.entry_count(), cache.weighted_size());
    let mut response = text.into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    response
}
