//! Request ids, the one access-log line per request, and request metrics.
//!
//! A sane client `X-Request-Id` is kept (so ids can be followed across
//! services), otherwise one is generated. Handlers attach an [`AccessLog`] to
//! their response so the log line (and the request metrics) can name the
//! normalized key, cache state and upstream status without the middleware
//! knowing any route. The `route` metric label is the request path when it is
//! one of the router's (static) paths, else `unmatched`: bounded either way.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use axum::{
    extract::Request,
    http::{HeaderName, HeaderValue},
    response::Response,
};
use tower::{Layer, Service};
use tracing::Level;

use crate::{cache::CacheKey, metrics::Metrics, served::Served};

/// The `route` label of requests that matched no route.
pub(crate) const UNMATCHED: &str = "unmatched";

/// `X-Request-Id`, on every response.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const MAX_ID_LEN: usize = 128;
/// Longest method or path written to the access log, in bytes: the client
/// chooses them, and a 16 KiB path must not make a 16 KiB log line.
const MAX_LOGGED_LEN: usize = 256;

/// The id of the request being served (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct RequestId(HeaderValue);

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

    /// A new random id (for requests that sent none, or no usable one).
    pub(crate) fn generate() -> Self {
        let mut buf = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        Self(HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown")))
    }

    /// The id as text (always ASCII by construction).
    pub(crate) fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

/// What a handler reports about its answer for the access log (a response extension).
#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    /// The configured client's id, when clients are configured.
    pub(crate) client: Option<Arc<str>>,
    pub(crate) key: CacheKey,
    /// How the request was answered (the `cache` log field).
    pub(crate) served: Served,
    /// The route's price per call (what a hit saves).
    pub(crate) credits: u64,
    pub(crate) upstream_status: Option<u16>,
}

/// Tower layer that wraps the whole router: assigns the request id, echoes
/// it, logs one line per request and counts it in the metrics. A plain
/// `Service` (not `axum::middleware::from_fn`) so a request costs no boxed
/// future and no clone of the inner service.
#[derive(Clone)]
pub(crate) struct ObserveLayer {
    metrics: Arc<Metrics>,
    paths: Arc<[&'static str]>,
    proxied: usize,
}

impl ObserveLayer {
    /// Counting into `metrics`; `paths` are the router's (static) paths, the
    /// values of the `route` label, the first `proxied` of them the KeyAPI routes.
    pub(crate) fn new(metrics: Arc<Metrics>, paths: Arc<[&'static str]>, proxied: usize) -> Self {
        Self {
            metrics,
            paths,
            proxied,
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: Arc::clone(&self.metrics),
            paths: Arc::clone(&self.paths),
            proxied: self.proxied,
        }
    }
}

/// The service made by [`ObserveLayer`].
#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
    paths: Arc<[&'static str]>,
    proxied: usize,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let id = request
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(RequestId::from_client)
            .unwrap_or_else(RequestId::generate);
        request.extensions_mut().insert(id.clone());
        // Every route is a static path, so the path itself is the template.
        let path = request.uri().path();
        let (route, proxied) = match self.paths.iter().position(|p| *p == path) {
            Some(i) => (self.paths[i], i < self.proxied),
            None => (UNMATCHED, false),
        };
        // Log fields are only gathered when the line will be written.
        let log = tracing::enabled!(Level::INFO).then(|| {
            (
                truncated(request.method().as_str()).to_owned(),
                truncated(request.uri().path()).to_owned(),
            )
        });
        ObserveFuture {
            inner: self.inner.call(request),
            done: Some(Done {
                started,
                id,
                route,
                proxied,
                log,
                metrics: Arc::clone(&self.metrics),
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, finished with the id header, log line and metrics.
    pub(crate) struct ObserveFuture<F> {
        #[pin]
        inner: F,
        done: Option<Done>,
    }
}

/// What is needed once the response exists.
struct Done {
    started: Instant,
    id: RequestId,
    route: &'static str,
    proxied: bool,
    /// Method and path, already truncated for the log.
    log: Option<(String, String)>,
    metrics: Arc<Metrics>,
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some(done) = this.done.take() {
            done.finish(&mut response);
        }
        Poll::Ready(Ok(response))
    }
}

impl Done {
    fn finish(self, response: &mut Response) {
        let status = response.status().as_u16();
        let access = response.extensions().get::<AccessLog>();
        self.metrics.record_request(
            self.route,
            self.proxied,
            status,
            access.map(|log| (log.served, log.credits)),
        );
        if let Some((method, path)) = &self.log {
            let latency_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let request_id = self.id.as_str();
            match access {
                Some(log) => tracing::info!(
                    request_id,
                    method,
                    path,
                    status,
                    client = log.client.as_deref(),
                    key = %log.key,
                    cache = log.served.as_str(),
                    upstream_status = log.upstream_status,
                    latency_us,
                    "request"
                ),
                None => tracing::info!(request_id, method, path, status, latency_us, "request"),
            }
        }
        response.headers_mut().insert(X_REQUEST_ID, self.id.0);
    }
}

/// `text` cut to at most [`MAX_LOGGED_LEN`] bytes, on a character boundary.
fn truncated(text: &str) -> &str {
    let mut end = text.len().min(MAX_LOGGED_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
