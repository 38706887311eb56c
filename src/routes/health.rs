//! Liveness and readiness. Neither touches the cache or the upstream, so
//! probes never spend credits.

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::json;

use crate::state::AppState;

/// `GET /healthz`: the process is alive and serving HTTP.
pub(super) async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: configuration loaded and listener up; 503 while draining.
/// The detail says which KeyAPI key is in use (its generation, never the
/// key), when it last changed, and when KeyAPI last rejected a key — just
/// after a rotation (the old key, retried with the new one) or not.
pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let api_key = state.proxy().upstream().api_key().status();
    if state.is_ready() {
        let ready = json!({ "status": "ready", "apiKey": api_key });
        (StatusCode::OK, Json(ready))
    } else {
        let draining = json!({ "status": "draining", "apiKey": api_key });
        (StatusCode::SERVICE_UNAVAILABLE, Json(draining))
    }
}
