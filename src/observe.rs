//! Request ids, the one access-log line per request, and request metrics.
//!
//! A sane client `X-Request-Id` is kept (so ids can be followed across
//! services), otherwise one is generated. Handlers attach an [`AccessLog`] to
//! their response so the log line (and the request metrics) can name the
//! normalized key, cache state and upstream status without the middleware
//! knowing any route. The `route` metric label is the request path when it is
//! one of the router's (static) paths, else `unmatched`: bounded either way.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Request, State},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};

use crate::{cache::CacheKey, metrics::Metrics, routes};

/// `X-Request-Id`, on every response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const MAX_ID_LEN: usize = 128;

/// The id of the request being served (a request extension).
#[derive(Debug, Clone)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's id if it is 1–128 visible characters from `[A-Za-z0-9._:-]`.
    fn from_client(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let sane = (1..=MAX_ID_LEN).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        sane.then(|| Self(value.clone()))
    }

    fn generate() -> Self {
        let mut buf = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        Self(HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown")))
    }

    /// The id as text (always ASCII by construction).
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

/// What a handler reports about its answer for the access log (a response extension).
#[derive(Debug, Clone)]
pub struct AccessLog {
    /// The configured client's id, when clients are configured.
    pub client: Option<Arc<str>>,
    pub key: CacheKey,
    /// `hit`, `stored`, `collapsed`, `refreshed`, `declined` or `error`.
    pub cache: &'static str,
    pub upstream_status: Option<u16>,
}

/// Middleware: assigns the request id, echoes it, logs one line per request
/// and counts it in the metrics.
pub async fn request_context(
    State(metrics): State<Arc<Metrics>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(RequestId::from_client)
        .unwrap_or_else(RequestId::generate);
    request.extensions_mut().insert(id.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = routes::label(&path);

    let mut response = next.run(request).await;

    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let status = response.status().as_u16();
    let access = response.extensions().get::<AccessLog>();
    metrics.record_request(route, status, access.map(|log| log.cache));
    match access {
        Some(log) => tracing::info!(
            request_id = id.as_str(),
            %method,
            path,
            status,
            client = log.client.as_deref(),
            key = %log.key,
            cache = log.cache,
            upstream_status = log.upstream_status,
            latency_us,
            "request"
        ),
        None => {
            tracing::info!(request_id = id.as_str(), %method, path, status, latency_us, "request")
        }
    }
    response.headers_mut().insert(X_REQUEST_ID, id.0);
    response
}
