//! Request ids, the one access-log line per request, and request metrics.
//!
//! A sane client `X-Request-Id` is kept (so ids can be followed across
//! services), otherwise one is generated. Handlers [`report`](AccessLog::report)
//! an [`AccessLog`] so the log line (and the request metrics) can name the
//! normalized key, cache state and upstream status without the middleware
//! knowing any route. The `route` metric label is the request path when it is
//! one of the router's (static) paths, else `unmatched`: bounded either way.
//! A handler that panics is answered 500 here, like any other request.

use std::{
    any::Any,
    cell::Cell,
    convert::Infallible,
    future::Future,
    panic::{self, AssertUnwindSafe},
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    BoxError,
    body::Body,
    extract::FromRequestParts,
    http::{HeaderName, HeaderValue, Request, StatusCode, header::CONTENT_TYPE, request::Parts},
    response::Response,
};
use bytes::Bytes;
use tokio::task::futures::TaskLocalFuture;
use tracing::Level;

use crate::{
    cache::CacheKey,
    metrics::{CachedCounter, Metrics},
    served::{CacheState, Served},
    server::Handle,
};

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
pub(crate) struct RequestId(Id);

#[derive(Debug, Clone)]
enum Id {
    /// The client's, echoed: shares the request's buffer.
    Client(HeaderValue),
    /// Ours, kept as text on the stack until it becomes a header.
    Generated([u8; GENERATED_LEN]),
}

/// Length of a generated id: the layout of a UUID.
const GENERATED_LEN: usize = 36;
/// Length of its per-process part, `xxxxxxxx-xxxx-xxxx-`.
const PREFIX_LEN: usize = 19;

/// Writes the low `out.len()` nibbles of `value` into `out` as lowercase
/// hex, most significant first.
fn hex_into(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b"0123456789abcdef"[(value & 0xf) as usize];
        value >>= 4;
    }
}

impl RequestId {
    /// The client's id if it is 1–128 visible characters from `[A-Za-z0-9._:-]`.
    fn from_client(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let sane = (1..=MAX_ID_LEN).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        sane.then(|| Self(Id::Client(value.clone())))
    }

    /// A new id (for requests that sent none, or no usable one): a random
    /// per-process prefix and a counter, in a UUID's layout. Unique without
    /// asking an RNG per request, and sortable within one process.
    pub(crate) fn generate() -> Self {
        /// `xxxxxxxx-xxxx-xxxx-`: 64 random bits, formatted once.
        static PREFIX: OnceLock<[u8; PREFIX_LEN]> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix = PREFIX.get_or_init(|| {
            let bits = fastrand::u64(..);
            let mut text = [b'-'; PREFIX_LEN];
            hex_into(&mut text[0..8], bits >> 32);
            hex_into(&mut text[9..13], bits >> 16);
            hex_into(&mut text[14..18], bits);
            text
        });
        // `xxxx-xxxxxxxxxxxx`: the counter's 64 bits.
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut text = [b'-'; GENERATED_LEN];
        text[..PREFIX_LEN].copy_from_slice(prefix);
        hex_into(&mut text[PREFIX_LEN..PREFIX_LEN + 4], next >> 48);
        hex_into(&mut text[PREFIX_LEN + 5..], next);
        Self(Id::Generated(text))
    }

    /// The id as text (always ASCII by construction).
    pub(crate) fn as_str(&self) -> &str {
        match &self.0 {
            Id::Client(value) => value.to_str().unwrap_or(""),
            Id::Generated(text) => std::str::from_utf8(text).unwrap_or(""),
        }
    }

    /// The id as the `X-Request-Id` header value.
    fn into_header(self) -> HeaderValue {
        match self.0 {
            Id::Client(value) => value,
            Id::Generated(text) => {
                HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("unknown"))
            }
        }
    }
}

/// What a handler reports about its answer for the access log and the metrics.
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

tokio::task_local! {
    /// The request being served: its id, read by handlers that answer with
    /// an error, and the [`AccessLog`] its handler reports to [`Observe`].
    /// A task-local costs no allocation; a request extension costs three
    /// (the value's box, the map's box, its table).
    static CURRENT: Current;
}

/// What [`CURRENT`] holds for one request.
struct Current {
    id: RequestId,
    reported: Cell<Option<AccessLog>>,
}

impl RequestId {
    /// The id of the request being served (a fresh one outside a request).
    pub(crate) fn current() -> Self {
        CURRENT
            .try_with(|current| current.id.clone())
            .unwrap_or_else(|_| Self::generate())
    }
}

/// Handlers take the id as an argument: it is the current request's.
impl<S: Sync> FromRequestParts<S> for RequestId {
    type Rejection = Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self::current())
    }
}

impl AccessLog {
    /// Hands this record to the [`Observe`] layer serving the current request
    /// (nothing happens outside one).
    pub(crate) fn report(self) {
        let _ = CURRENT.try_with(|current| current.reported.set(Some(self)));
    }
}

/// Wraps the whole HTTP surface: assigns the request id, echoes it, logs one
/// line per request and counts it in the metrics.
pub(crate) struct Observe<H> {
    inner: H,
    metrics: Arc<Metrics>,
    paths: Arc<[&'static str]>,
    proxied: usize,
    /// Per KeyAPI route, its hits' `requests_total` counter.
    hits: Arc<[CachedCounter]>,
}

impl<H> Observe<H> {
    /// `inner`, counted into `metrics`; `paths` are the served (static) paths,
    /// the values of the `route` label, the first `proxied` of them the KeyAPI routes.
    pub(crate) fn new(
        inner: H,
        metrics: Arc<Metrics>,
        paths: Arc<[&'static str]>,
        proxied: usize,
    ) -> Self {
        Self {
            inner,
            metrics,
            paths,
            proxied,
            hits: (0..proxied).map(|_| CachedCounter::default()).collect(),
        }
    }

    /// What is known of `request` before it is answered.
    fn begin<B>(&self, request: &Request<B>) -> (Current, Done<'_>) {
        let id = request
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(RequestId::from_client)
            .unwrap_or_else(RequestId::generate);
        // Every route is a static path, so the path itself is the template.
        let path = request.uri().path();
        let (route, index) = match self.paths.iter().position(|p| *p == path) {
            Some(i) => (self.paths[i], Some(i)),
            None => (UNMATCHED, None),
        };
        let proxied = index.filter(|i| *i < self.proxied);
        // Log fields (and the clock) are only read when the line will be written.
        let log = tracing::enabled!(Level::INFO).then(|| Logged {
            started: Instant::now(),
            method: truncated(request.method().as_str()).to_owned(),
            path: truncated(request.uri().path()).to_owned(),
        });
        let current = Current {
            id,
            reported: Cell::new(None),
        };
        let done = Done {
            route,
            proxied,
            log,
            metrics: &self.metrics,
            hits: &self.hits,
        };
        (current, done)
    }
}

impl<H: Handle> Handle for Observe<H> {
    fn handle<B>(&self, request: Request<B>) -> impl Future<Output = Response> + Send
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (current, done) = self.begin(&request);
        ObserveFuture {
            inner: CURRENT.scope(current, self.inner.handle(request)),
            done: Some(done),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, finished with the id header, log line and metrics.
    struct ObserveFuture<'a, F> {
        #[pin]
        inner: TaskLocalFuture<Current, F>,
        done: Option<Done<'a>>,
    }
}

/// What is needed once the response exists (borrowed from [`Observe`]:
/// no reference count moves per request).
struct Done<'a> {
    route: &'static str,
    /// The index of the KeyAPI route, if it is one.
    proxied: Option<usize>,
    /// The access log's fields, when it is written.
    log: Option<Logged>,
    metrics: &'a Metrics,
    hits: &'a [CachedCounter],
}

/// What the access log line needs from the request's start.
struct Logged {
    started: Instant,
    /// Method and path, truncated.
    method: String,
    path: String,
}

impl<F: Future<Output = Response>> Future for ObserveFuture<'_, F> {
    type Output = Response;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let mut this = self.project();
        // A panicking handler gets a 500 instead of a dropped connection;
        // caught here, around the whole surface, rather than by a layer on
        // every route, which would box each request's future once more.
        let polled = panic::catch_unwind(AssertUnwindSafe(|| this.inner.as_mut().poll(cx)));
        let mut response = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(response)) => response,
            Err(panic) => panicked(&*panic),
        };
        if let (Some(current), Some(done)) = (this.inner.take_value(), this.done.take()) {
            done.finish(&mut response, current);
        }
        Poll::Ready(response)
    }
}

/// The answer to a request whose handler panicked (logged, detail not sent).
fn panicked(panic: &(dyn Any + Send)) -> Response {
    let message = match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => message,
        (None, Some(message)) => message.as_str(),
        (None, None) => "(no message)",
    };
    tracing::error!(panic = message, "request handler panicked");
    let mut response = Response::new(Body::from("Service panicked"));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl Done<'_> {
    fn finish(self, response: &mut Response, current: Current) {
        let access = current.reported.into_inner();
        let access = access.as_ref();
        let status = response.status().as_u16();
        let served = access.map(|log| (log.served, log.credits));
        // A route's hits all share one label set: count them without a lookup.
        let cached = match (self.proxied, served) {
            (Some(i), Some((Served::Cached(CacheState::Hit), _))) if status == 200 => {
                self.hits.get(i)
            }
            _ => None,
        };
        let proxied = self.proxied.is_some();
        (self.metrics).record_request_in(cached, self.route, proxied, status, served);
        if let Some(Logged {
            started,
            method,
            path,
        }) = &self.log
        {
            let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let request_id = current.id.as_str();
            match access {
                Some(log) => tracing::info!(
                    request_id,
                    %method,
                    path,
                    status,
                    client = log.client.as_deref(),
                    key = %log.key,
                    cache = log.served.as_str(),
                    upstream_status = log.upstream_status,
                    latency_us,
                    "request"
                ),
                None => tracing::info!(request_id, %method, path, status, latency_us, "request"),
            }
        }
        response
            .headers_mut()
            .insert(X_REQUEST_ID, current.id.into_header());
    }
}

/// At most [`MAX_LOGGED_LEN`] bytes of a client-chosen string (cut at a
/// character boundary), so a huge path cannot make a huge log line.
fn truncated(text: &str) -> &str {
    let mut end = text.len().min(MAX_LOGGED_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_and_uuid_shaped() {
        let (a, b) = (RequestId::generate(), RequestId::generate());
        assert_ne!(a.as_str(), b.as_str());
        for id in [a.as_str(), b.as_str()] {
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert!(
                id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()),
                "{id}"
            );
        }
        assert_eq!(a.into_header().as_bytes().len(), GENERATED_LEN);
    }

    /// A handler that always panics.
    struct Panics;

    impl Handle for Panics {
        #[allow(clippy::manual_async_fn)]
        fn handle<B>(&self, _: Request<B>) -> impl Future<Output = Response> + Send {
            async { panic!("boom") }
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_500_with_an_id() {
        use crate::clock::{SharedClock, SystemClock};

        let metrics = Arc::new(Metrics::new(SharedClock::new(Arc::new(SystemClock))));
        let observed = Observe::new(Panics, metrics, Arc::from(["/"]), 0);
        let response = observed.handle(Request::new(Body::empty())).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().contains_key(X_REQUEST_ID));
    }
}
