//! Liveness and readiness. Neither touches the cache, Redis or the upstream,
//! so probes never spend credits nor wait.

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::json;

use crate::state::AppState;

/// `GET /healthz`: the process is alive and serving HTTP.
pub(super) async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: configuration loaded and listener up; 503 while draining.
/// The body says which KeyAPI key is in use (its generation, never the
/// key), when it last changed, and when KeyAPI last rejected a key — just
/// after a rotation (the old key, retried with the new one) or not. With
/// Redis, it also says its mode and which nodes answered this replica's
/// last probe (from memory: Redis down never fails readiness, since every
/// replica serves on without it).
pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (status, word) = if state.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    };
    let api_key = state.proxy().upstream().api_key().status();
    let mut body = json!({ "status": word, "apiKey": api_key });
    if let Some(redis) = state.proxy().redis() {
        body["redis"] = json!(redis.conn().status());
    }
    (status, Json(body))
}
