//! The HTTP surface: one file per endpoint group, assembled into one router.
//! Every configured route is served by the one generic handler in [`proxied`].

mod admin;
mod health;
mod metrics;
mod openapi;
mod proxied;
mod status;

use std::sync::Arc;

use axum::{
    Extension, Router,
    extract::{Request, State},
    middleware::map_response,
    response::Response,
    routing::get,
};

use crate::{
    cache_status, error::ApiError, observe::RequestId, route::RouteTable, state::AppState,
};

/// `/stats` and `/` data, recomputed at most once a second (one per router).
pub(crate) type StatsCell = crate::summary::Throttled<crate::summary::Stats>;

const METRICS_PATH: &str = "/metrics";
const ADMIN_CACHE_PATH: &str = "/admin/cache";
const OPENAPI_PATH: &str = "/openapi.json";
const STATS_PATH: &str = "/stats";
const STATUS_PAGE_PATH: &str = "/";

/// The operational endpoints' paths (what `/openapi.json` documents besides the routes).
pub const OPERATIONAL_PATHS: [&str; 7] = [
    "/healthz",
    "/readyz",
    METRICS_PATH,
    ADMIN_CACHE_PATH,
    OPENAPI_PATH,
    STATS_PATH,
    STATUS_PAGE_PATH,
];

/// Every path the router serves: the configured routes, then the
/// operational endpoints. These are the values of the `route` metric label.
pub fn paths(table: &RouteTable) -> Arc<[&'static str]> {
    table
        .routes()
        .iter()
        .map(|r| r.path())
        .chain(OPERATIONAL_PATHS)
        .collect()
}

/// All routes. Layers (request ids, panics) are added by [`crate::app`].
pub fn router(state: AppState) -> Router {
    // Operational answers describe this moment of this process: no cache
    // (browser, CDN) may keep them.
    let operational = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(METRICS_PATH, get(metrics::metrics))
        .route(STATS_PATH, get(status::stats))
        .route(STATUS_PAGE_PATH, get(status::status_page))
        .layer(Extension(Arc::new(StatsCell::default())))
        .route(ADMIN_CACHE_PATH, get(admin::list).delete(admin::purge))
        .layer(map_response(no_store));
    let mut router = Router::new();
    for route in state.routes().routes() {
        let path = route.path();
        let route = Arc::clone(route);
        let handler = move |state: State<AppState>, id: Extension<RequestId>, request: Request| {
            proxied::answer(Arc::clone(&route), state, id, request)
        };
        router = router.route(path, get(handler));
    }
    router
        .route(OPENAPI_PATH, get(openapi::openapi_json))
        .merge(operational)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state)
}

async fn no_store(mut response: Response) -> Response {
    cache_status::set_no_store(response.headers_mut());
    response
}

async fn not_found(Extension(id): Extension<RequestId>) -> Response {
    ApiError::NotFound.to_response(&id)
}

async fn method_not_allowed(Extension(id): Extension<RequestId>) -> Response {
    ApiError::MethodNotAllowed.to_response(&id)
}
