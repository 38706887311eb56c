//! `GET /stats` (JSON) and `GET /` (the self-contained HTML status page,
//! [`crate::status::page`]) of the data [`crate::status::Stats`] collects:
//! uptime, hit ratio, credits spent vs saved, top keys, upstream health,
//! per-client spending and the last hour.

use std::sync::Arc;

use axum::{
    Extension, Json,
    extract::State,
    http::{HeaderValue, header::CONTENT_SECURITY_POLICY, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};

use crate::{
    state::AppState,
    status::{
        Stats, StatsCell,
        page::{content_security_policy, render},
    },
};

/// `GET /stats`.
pub(super) async fn stats(
    State(state): State<AppState>,
    Extension(cell): Extension<Arc<StatsCell>>,
) -> Response {
    Json(&*latest(&state, &cell).await).into_response()
}

/// The stats at most [`crate::status::stats::REFRESH`] old, shared by `/stats` and `/`.
async fn latest(state: &AppState, cell: &StatsCell) -> Arc<Stats> {
    let clock = state.metrics().history().clock();
    cell.get(clock, || Stats::collect(state)).await
}

/// `GET /`: the status page.
pub(super) async fn status_page(
    State(state): State<AppState>,
    Extension(cell): Extension<Arc<StatsCell>>,
) -> Response {
    let stats = latest(&state, &cell).await;
    let mut response = render(&stats).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CONTENT_SECURITY_POLICY, content_security_policy());
    response
}
