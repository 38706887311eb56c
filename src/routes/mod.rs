//! The HTTP surface: one file per endpoint group, assembled into one router.
//! Every configured route is served by the one generic handler in `proxied`.
//!
//! `Front` is what the server runs. It takes the current `Generation` (one
//! configuration's state and router, replaced whole by a reload) once per
//! request, then runs the browser-safety checks (a
//! foreign `Host`, a cross-site request; see [`crate::browser`]) for every
//! request, then a plain `GET` of a configured route (the hit path) goes
//! straight to that handler; everything else — the operational endpoints,
//! other methods, `HEAD`, CORS requests, 404s — goes through axum's
//! `Router`, which serves the configured routes too, so both ways give the
//! same answer.

mod admin;
mod health;
mod metrics;
mod openapi;
mod proxied;
mod reload;
mod spend;
mod status;

use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use axum::{
    BoxError, Extension, Router,
    body::Body,
    extract::{Request, State},
    http::{self, Method, header::ORIGIN},
    middleware::map_response,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use tower::ServiceExt as _;

use crate::{
    browser::{AllowedHost, BrowserGuard, PROBE_PATHS, Target},
    cache_status,
    config::CorsConfig,
    cors,
    error::ApiError,
    route::{Route, RouteTable},
    server::Handle,
    state::AppState,
    status::StatsCell,
};

const HEALTHZ_PATH: &str = PROBE_PATHS[0];
const READYZ_PATH: &str = PROBE_PATHS[1];
const METRICS_PATH: &str = "/metrics";
const ADMIN_CACHE_PATH: &str = "/admin/cache";
const ADMIN_RELOAD_PATH: &str = "/admin/reload";
const ADMIN_SPEND_PATH: &str = "/admin/spend";
const OPENAPI_PATH: &str = "/openapi.json";
const STATS_PATH: &str = "/stats";
const STATUS_PAGE_PATH: &str = "/";

/// The operational endpoints' paths (what `/openapi.json` documents besides the routes).
pub const OPERATIONAL_PATHS: [&str; 9] = [
    HEALTHZ_PATH,
    READYZ_PATH,
    METRICS_PATH,
    ADMIN_CACHE_PATH,
    ADMIN_RELOAD_PATH,
    ADMIN_SPEND_PATH,
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
        .route(HEALTHZ_PATH, get(health::healthz))
        .route(READYZ_PATH, get(health::readyz))
        .route(METRICS_PATH, get(metrics::metrics))
        .route(STATS_PATH, get(status::stats))
        .route(STATUS_PAGE_PATH, get(status::status_page))
        .layer(Extension(Arc::new(StatsCell::default())))
        .route(ADMIN_CACHE_PATH, get(admin::list).delete(admin::purge))
        .route(ADMIN_RELOAD_PATH, post(reload::reload))
        .route(ADMIN_SPEND_PATH, get(spend::spend))
        .layer(map_response(no_store));
    let mut router = Router::new();
    for route in state.routes().routes() {
        let path = route.path();
        let route = Arc::clone(route);
        let handler = move |State(state): State<AppState>, request: Request| {
            let route = Arc::clone(&route);
            async move { proxied::answer(&route, &state, request.into_parts().0).await }
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

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// One generation of the served surface: the state and router of one
/// configuration. A reload builds the next and [`Front`] swaps it in.
pub(crate) struct Generation {
    state: AppState,
    /// [`router`], behind the CORS layer when origins are configured.
    router: Router,
    /// The CORS layer is on: a request with `Origin` takes the router's way,
    /// through it and its origin check; one without is answered directly,
    /// with the `Vary` the layer would have added ([`cors::vary_by_origin`]).
    cors: bool,
    /// Allowed hosts and cross-site refusals, checked before anything else.
    guard: BrowserGuard,
}

impl Generation {
    /// The surface of `state` with `cors_config`, behind the browser checks
    /// for `allowed_hosts` and `listen`.
    pub(crate) fn new(
        state: AppState,
        cors_config: &CorsConfig,
        allowed_hosts: Option<&[AllowedHost]>,
        listen: SocketAddr,
    ) -> Self {
        let (router, cors) = cors::apply(router(state.clone()), cors_config);
        let guard = BrowserGuard::new(allowed_hosts, listen, cors);
        Self {
            state,
            router,
            cors,
            guard,
        }
    }

    /// Its state.
    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }

    /// The configured route `route` of `request`, when it can skip the
    /// router: a `GET` (axum answers `HEAD` by dropping the body) outside CORS.
    fn direct<'r, B>(
        &self,
        request: &http::Request<B>,
        route: Option<&'r Arc<Route>>,
    ) -> Option<&'r Arc<Route>> {
        if request.method() != Method::GET || (self.cors && request.headers().contains_key(ORIGIN))
        {
            return None;
        }
        route
    }
}

/// The served surface: the hit path dispatched directly, the rest by the
/// generation's router.
pub(crate) struct Front {
    /// The configuration in use; each request takes it once.
    current: Arc<ArcSwap<Generation>>,
}

impl Front {
    /// Serves whatever generation `current` holds when a request arrives.
    pub(crate) fn new(current: Arc<ArcSwap<Generation>>) -> Self {
        Self { current }
    }
}

/// What browser safety makes of a request for `path` (`route` its configured route, if any).
fn target(route: Option<&Arc<Route>>, path: &str) -> Target {
    match route {
        Some(_) => Target::Proxied,
        None if PROBE_PATHS.contains(&path) => Target::Probe,
        None => Target::Other,
    }
}

impl Handle for Front {
    /// `_peer` is not needed here: `Observe` has resolved the caller from it
    /// ([`crate::caller::ClientAddr::current`]).
    async fn handle<B>(&self, _peer: SocketAddr, request: http::Request<B>) -> Response
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Over HTTP/2, hyper takes the preface itself: a `PRI` here is HTTP/1
        // misused: malformed, so refused before anything else looks at it.
        if request.method().as_str() == "PRI" {
            return ApiError::PrefaceOverHttp1.into_response();
        }
        let generation = self.current.load_full();
        let route = generation.state.routes().get(request.uri().path());
        let target = target(route, request.uri().path());
        if let Err(refusal) = generation
            .guard
            .check(target, request.uri(), request.headers())
        {
            tracing::debug!(reason = refusal.as_str(), "refused before any route");
            return ApiError::from(refusal).into_response();
        }
        if let Some(route) = generation.direct(&request, route) {
            let state = &generation.state;
            let mut response = proxied::answer(route, state, request.into_parts().0)
                .await
                .into_response();
            if generation.cors {
                cors::vary_by_origin(response.headers_mut());
            }
            return response;
        }
        // Boxed: the router's future would otherwise make every hit's future
        // (moved on its way into hyper's task) as large as its own.
        let routed = Box::pin(generation.router.clone().oneshot(request.map(Body::new)));
        let Ok(response) = routed.await;
        response
    }
}
