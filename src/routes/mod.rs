//! The HTTP surface: one file per endpoint group, assembled into one router.

mod admin;
mod hashtag;
mod health;
mod metrics;
mod openapi;
mod status;

use axum::{Extension, Router, response::Response, routing::get};

use crate::{app::AppState, error::ApiError, key::HASHTAG_DETAIL_PATH, observe::RequestId};

/// `/stats` and `/` data, recomputed at most once a second (held in [`AppState`]).
pub(crate) type StatsCell = crate::summary::Throttled<status::Stats>;

const METRICS_PATH: &str = "/metrics";
const ADMIN_CACHE_PATH: &str = "/admin/cache";
const OPENAPI_PATH: &str = "/openapi.json";
const STATS_PATH: &str = "/stats";
const STATUS_PAGE_PATH: &str = "/";

/// Every route template: the values of the `route` metric label (and what
/// `/openapi.json` must document).
pub const PATHS: [&str; 8] = [
    HASHTAG_DETAIL_PATH,
    "/healthz",
    "/readyz",
    METRICS_PATH,
    ADMIN_CACHE_PATH,
    OPENAPI_PATH,
    STATS_PATH,
    STATUS_PAGE_PATH,
];

/// The `route` label of requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// The `route` label of a request path: the path itself when it is one of
/// ours (every route is a static path), else [`UNMATCHED`]. A route with path
/// parameters would need axum's `MatchedPath` here instead.
pub fn label(path: &str) -> &'static str {
    PATHS
        .iter()
        .find(|p| **p == path)
        .copied()
        .unwrap_or(UNMATCHED)
}

/// All routes. Layers (request ids, panics) are added by [`crate::app`].
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            HASHTAG_DETAIL_PATH,
            get(hashtag::hashtag_detail).fallback(method_not_allowed),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(METRICS_PATH, get(metrics::metrics))
        .route(OPENAPI_PATH, get(openapi::openapi_json))
        .route(STATS_PATH, get(status::stats))
        .route(STATUS_PAGE_PATH, get(status::status_page))
        .route(
            ADMIN_CACHE_PATH,
            get(admin::list)
                .delete(admin::purge)
                .fallback(method_not_allowed),
        )
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(Extension(id): Extension<RequestId>) -> Response {
    ApiError::NotFound.to_response(&id)
}

async fn method_not_allowed(Extension(id): Extension<RequestId>) -> Response {
    ApiError::MethodNotAllowed.to_response(&id)
}
