//! CORS for browser frontends: an explicit origin allowlist, GET/HEAD only,
//! the client-token headers allowed in, and the cache headers readable by
//! scripts. Preflights are answered here, before any route, so they never
//! reach the cache or KeyAPI.

use axum::http::{
    HeaderName, HeaderValue, Method,
    header::{AGE, AUTHORIZATION, CACHE_CONTROL, ETAG, IF_NONE_MATCH, RETRY_AFTER},
};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    access::X_API_KEY, cache_status::CACHE_STATUS, config::CorsConfig, observe::X_REQUEST_ID,
};

/// The layer for `config`, or `None` when no origin is allowed.
pub fn layer(config: &CorsConfig) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
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
            .max_age(config.max_age),
    )
}
