//! CORS for browser frontends: an explicit origin allowlist, GET/HEAD only,
//! the client-token headers allowed in, and the cache headers readable by
//! scripts. Preflights are answered here, before any route, so they never
//! reach the cache or KeyAPI.
//!
//! CORS alone only stops a browser from *reading* an answer: a simple
//! cross-origin GET would still reach KeyAPI and spend credits. So with an
//! allowlist, a request whose `Origin` is not on it is refused (403) before
//! any route runs. Requests without `Origin` (servers, same-origin pages)
//! are unaffected.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Request, State},
    http::{
        HeaderMap, HeaderName, HeaderValue, Method,
        header::{
            AGE, AUTHORIZATION, CACHE_CONTROL, ETAG, IF_NONE_MATCH, ORIGIN, RETRY_AFTER, VARY,
        },
    },
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    access::X_API_KEY, cache_status::CACHE_STATUS, config::CorsConfig, error::ApiError,
    request_id::X_REQUEST_ID,
};

/// `router` behind the CORS layer and the origin check for `config`, and
/// whether they are on (not when no origin is allowed): an answer that
/// skips them must then carry [`vary_by_origin`]'s header itself.
pub(crate) fn apply(router: Router, config: &CorsConfig) -> (Router, bool) {
    let origins: Arc<[HeaderValue]> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return (router, false);
    }
    let layer = CorsLayer::new()
        .vary([ORIGIN])
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([Method::GET, Method::HEAD])
        .allow_headers([
            AUTHORIZATION,
            X_API_KEY,
            IF_NONE_MATCH,
            CACHE_CONTROL,
            X_REQUEST_ID,
        ])
        .expose_headers([
            HeaderName::from_static(CACHE_STATUS),
            AGE,
            ETAG,
            RETRY_AFTER,
            X_REQUEST_ID,
        ])
        .max_age(config.max_age);
    // Inside the CORS layer: preflights are answered before the check, and
    // a refusal still gets (no) CORS headers from the layer.
    let router = router
        .layer(middleware::from_fn_with_state(
            origins,
            refuse_other_origins,
        ))
        .layer(layer);
    (router, true)
}

/// What the CORS layer adds to every answer, `Vary: origin` (an answer to a
/// request without `Origin` must not be handed to one with it), for the
/// answers that do not pass through the layer.
pub(crate) fn vary_by_origin(headers: &mut HeaderMap) {
    headers.append(VARY, HeaderValue::from(ORIGIN));
}

async fn refuse_other_origins(
    State(allowed): State<Arc<[HeaderValue]>>,
    request: Request,
    next: Next,
) -> Response {
    match request.headers().get(ORIGIN) {
        Some(origin) if !allowed.contains(origin) => ApiError::OriginRefused.into_response(),
        _ => next.run(request).await,
    }
}
