//! Each request's id and caller, its one access-log line, and request metrics.
//!
//! The id ([`RequestId`]) is assigned and the caller ([`ClientAddr`], from
//! the TCP peer and, behind trusted proxies, a forwarding header) resolved
//! here; both are kept, with the access-log record, in a task-local for the
//! request's lifetime. Every log line carries `client_addr`, and `peer_addr`
//! when a trusted proxy reported the caller. Handlers [`report`](AccessLog::report)
//! an [`AccessLog`] so the log line (and the request metrics) can name the
//! normalized key, cache state and upstream status without the middleware
//! knowing any route. The `route` metric label is the request path when it is
//! one of the router's (static) paths, else `unmatched`: bounded either way.
//! A handler that panics is answered 500 here, in the error envelope. A
//! request dropped before its answer (the client left, or its connection was
//! closed) is logged and counted with status 499, as nginx does.
//!
//! With `[telemetry]` on, each request of a proxied route is also a trace span
//! (entered while its handler runs, so the upstream and Redis spans nest under
//! it), its parent taken from a trusted `traceparent`. Off, no span is made.

use std::{
    any::Any,
    cell::Cell,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    panic::{self, AssertUnwindSafe},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use arc_swap::ArcSwap;
use axum::{
    BoxError,
    extract::FromRequestParts,
    http::{Request, request::Parts},
    response::Response,
};
use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::task::futures::TaskLocalFuture;
use tracing::{
    Level, Span,
    field::{Empty, display},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    cache::CacheKey,
    caller::{ClientAddr, Resolver},
    error::ApiError,
    metrics::{CLIENT_CLOSED_REQUEST, CachedCounter, Metrics},
    request_id::{RequestId, X_REQUEST_ID},
    served::{CacheState, Served},
    server::Handle,
    spans::TRACE_TARGET,
};

/// The `route` label of requests that matched no route.
pub(crate) const UNMATCHED: &str = "unmatched";

/// Longest method or path written to the access log, in bytes: the client
/// chooses them, and a 16 KiB path must not make a 16 KiB log line.
const MAX_LOGGED_LEN: usize = 256;

/// What a handler reports about its answer for the access log and the metrics.
#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    /// Who asked: a configured client's id, or a token subject's hashed name.
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
    /// an error, its caller, and the [`AccessLog`] its handler reports to [`Observe`].
    /// A task-local costs no allocation; a request extension costs three
    /// (the value's box, the map's box, its table).
    static CURRENT: Current;
}

/// What [`CURRENT`] holds for one request.
struct Current {
    id: RequestId,
    caller: ClientAddr,
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

impl ClientAddr {
    /// The caller of the request being served (none outside a request).
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|current| current.caller).ok()
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
    /// The `route` label values; a reload that changes the routes replaces them.
    labels: Arc<ArcSwap<RouteLabels>>,
    /// Who is calling, from the peer and `server.trusted_proxies`.
    callers: Resolver,
    /// Whether proxied requests are spans, and how they find their parent.
    traced: Traced,
}

/// Whether requests of proxied routes become trace spans (`[telemetry]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Traced {
    /// Tracing is off: no span is made.
    Off,
    /// A span per request, a root span whatever the client sends.
    Root,
    /// A span per request, the child of the client's `traceparent` if any.
    TrustTraceparent,
}

/// The values of the `route` label: the served (static) paths, the first
/// `proxied` of them the KeyAPI routes.
pub(crate) struct RouteLabels {
    paths: Arc<[&'static str]>,
    proxied: usize,
    /// Per KeyAPI route, its hits' `requests_total` counter.
    hits: Box<[CachedCounter]>,
}

impl RouteLabels {
    /// `paths`, the first `proxied` of them KeyAPI routes.
    pub(crate) fn new(paths: Arc<[&'static str]>, proxied: usize) -> Self {
        Self {
            paths,
            proxied,
            hits: (0..proxied).map(|_| CachedCounter::default()).collect(),
        }
    }
}

impl<H> Observe<H> {
    /// `inner`, counted into `metrics`, its requests labelled by the current
    /// `labels`; `callers` tells who is calling.
    pub(crate) fn new(
        inner: H,
        metrics: Arc<Metrics>,
        labels: Arc<ArcSwap<RouteLabels>>,
        callers: Resolver,
        traced: Traced,
    ) -> Self {
        Self {
            inner,
            metrics,
            labels,
            callers,
            traced,
        }
    }

    /// What is known of `request` from `peer` before it is answered.
    fn begin<B>(&self, peer: SocketAddr, request: &Request<B>) -> (Current, Done<'_>) {
        let id = request
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(RequestId::from_client)
            .unwrap_or_else(RequestId::generate);
        // Every route is a static path, so the path itself is the template.
        let path = request.uri().path();
        let labels = self.labels.load_full();
        let (route, index) = match labels.paths.iter().position(|p| *p == path) {
            Some(i) => (labels.paths[i], Some(i)),
            None => (UNMATCHED, None),
        };
        let proxied = index.filter(|i| *i < labels.proxied);
        let caller = self.callers.resolve(peer.ip(), request.headers());
        // Log fields (and the clock) are only read when the line will be written.
        let log = tracing::enabled!(Level::INFO).then(|| Logged {
            started: Instant::now(),
            method: truncated(request.method().as_str()).to_owned(),
            path: truncated(request.uri().path()).to_owned(),
            caller,
        });
        let span = match (self.traced, proxied) {
            (Traced::Off, _) | (_, None) => None,
            (traced, Some(_)) => Some(request_span(route, request, traced)),
        };
        let current = Current {
            id,
            caller,
            reported: Cell::new(None),
        };
        let done = Done {
            route,
            proxied,
            log,
            span,
            metrics: &self.metrics,
            labels,
        };
        (current, done)
    }
}

/// The span of one request of a proxied route; what is known only at the
/// end (status, cache outcome, client, credits) is recorded then.
fn request_span<B>(route: &'static str, request: &Request<B>, traced: Traced) -> Span {
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "request",
        otel.name = route,
        otel.kind = "server",
        http.request.method = truncated(request.method().as_str()),
        http.route = route,
        http.response.status_code = Empty,
        keyapi.cache = Empty,
        keyapi.client = Empty,
        keyapi.credits = Empty,
        keyapi.upstream_status = Empty,
    );
    if traced == Traced::TrustTraceparent {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        // An absent or malformed traceparent leaves the span a root: nothing to report.
        let _ = span.set_parent(parent);
    }
    span
}

impl<H: Handle> Handle for Observe<H> {
    fn handle<B>(
        &self,
        peer: SocketAddr,
        request: Request<B>,
    ) -> impl Future<Output = Response> + Send
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (current, done) = self.begin(peer, &request);
        ObserveFuture {
            inner: CURRENT.scope(current, self.inner.handle(peer, request)),
            done: Some(done),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, finished with the id header, log line and
    /// metrics; dropped unfinished, it logs and counts a 499.
    struct ObserveFuture<'a, F> {
        #[pin]
        inner: TaskLocalFuture<Current, F>,
        done: Option<Done<'a>>,
    }

    impl<F> PinnedDrop for ObserveFuture<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // `done` is still here only when no answer was produced.
            if let Some(done) = this.done.take() {
                // What the handler reported so far, if anything.
                let current = this.inner.take_value();
                let id = current.as_ref().map(|c| &c.id);
                let access = current.as_ref().and_then(|c| c.reported.take());
                done.record(CLIENT_CLOSED_REQUEST, id, access.as_ref());
            }
        }
    }
}

/// What is needed once the response exists: borrowed from [`Observe`], but for
/// the labels the request began under (held, so a reload cannot change them).
struct Done<'a> {
    route: &'static str,
    /// The index of the KeyAPI route, if it is one.
    proxied: Option<usize>,
    /// The access log's fields, when it is written.
    log: Option<Logged>,
    /// The request's trace span, when traced; it ends with `Done`.
    span: Option<Span>,
    metrics: &'a Metrics,
    /// The labels the request was counted under (its hit counters).
    labels: Arc<RouteLabels>,
}

/// What the access log line needs from the request's start.
struct Logged {
    started: Instant,
    /// Method and path, truncated.
    method: String,
    path: String,
    caller: ClientAddr,
}

impl<F: Future<Output = Response>> Future for ObserveFuture<'_, F> {
    type Output = Response;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let mut this = self.project();
        // The request's span (if traced) is current while its handler runs.
        let entered = this
            .done
            .as_ref()
            .and_then(|done| done.span.as_ref())
            .map(Span::enter);
        // A panicking handler gets a 500 instead of a dropped connection;
        // caught here, around the whole surface, rather than by a layer on
        // every route, which would box each request's future once more.
        let polled = panic::catch_unwind(AssertUnwindSafe(|| this.inner.as_mut().poll(cx)));
        let answered = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(response)) => Ok(response),
            Err(panic) => Err(panic),
        };
        drop(entered);
        // The scope hands its value back once the inner future is done (or unwound).
        let (id, reported) = match this.inner.take_value() {
            Some(Current { id, reported, .. }) => (id, reported.into_inner()),
            None => (RequestId::generate(), None),
        };
        let mut response = answered.unwrap_or_else(|panic| panicked(&*panic, &id));
        if let Some(done) = this.done.take() {
            done.finish(&mut response, id, reported);
        }
        Poll::Ready(response)
    }
}

/// The answer to a request whose handler panicked (logged, detail not sent).
fn panicked(panic: &(dyn Any + Send), id: &RequestId) -> Response {
    let message = match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => message,
        (None, Some(message)) => message.as_str(),
        (None, None) => "(no message)",
    };
    tracing::error!(panic = message, "request handler panicked");
    ApiError::Panicked.to_response(id)
}

impl Done<'_> {
    fn finish(self, response: &mut Response, id: RequestId, access: Option<AccessLog>) {
        self.record(response.status().as_u16(), Some(&id), access.as_ref());
        response
            .headers_mut()
            .insert(X_REQUEST_ID, id.into_header());
    }

    /// Counts the request with `status` and writes its access-log line with
    /// what its handler reported (`id` is `None` if the request's scope is gone).
    fn record(self, status: u16, id: Option<&RequestId>, access: Option<&AccessLog>) {
        let served = access.map(|log| (log.served, log.credits));
        // A route's hits all share one label set: count them without a lookup.
        let cached = match (self.proxied, served) {
            (Some(i), Some((Served::Cached(CacheState::Hit), _))) if status == 200 => {
                self.labels.hits.get(i)
            }
            _ => None,
        };
        let proxied = self.proxied.is_some();
        (self.metrics).record_request_in(cached, self.route, proxied, status, served);
        if let Some(span) = &self.span {
            record_outcome(span, status, access);
        }
        if let Some(Logged {
            started,
            method,
            path,
            caller,
        }) = &self.log
        {
            let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let request_id = id.map(RequestId::as_str);
            let client_addr = display(caller.ip());
            let peer_addr = caller.is_forwarded().then(|| display(caller.peer()));
            // One line either way: fields the handler did not report are left out.
            tracing::info!(
                request_id,
                %method,
                path,
                status,
                client_addr,
                peer_addr,
                client = access.and_then(|log| log.client.as_deref()),
                key = access.map(|log| display(&log.key)),
                cache = access.map(|log| log.served.as_str()),
                upstream_status = access.and_then(|log| log.upstream_status),
                latency_us,
                "request"
            );
        }
    }
}

/// Writes what the request's span learns at its end. Credits: the route's
/// price when this request's own fetch called KeyAPI for its answer (each
/// attempt's exact charge is on its upstream span), else 0.
/// Numbers go in as `i64`: OpenTelemetry has no unsigned attribute (a `u64`
/// would arrive as text).
fn record_outcome(span: &Span, status: u16, access: Option<&AccessLog>) {
    span.record("http.response.status_code", i64::from(status));
    let Some(log) = access else { return };
    let paid = matches!(
        log.served,
        Served::Cached(CacheState::Stored | CacheState::Refreshed) | Served::Declined
    );
    span.record("keyapi.cache", log.served.as_str());
    span.record(
        "keyapi.client",
        log.client.as_deref().unwrap_or("anonymous"),
    );
    let credits = if paid { log.credits } else { 0 };
    span.record("keyapi.credits", i64::try_from(credits).unwrap_or(i64::MAX));
    if let Some(upstream) = log.upstream_status {
        span.record("keyapi.upstream_status", i64::from(upstream));
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
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::{body::Body, http::StatusCode};

    use super::*;
    use crate::{
        caller::{ForwardedHeader, X_FORWARDED_FOR},
        clock::{SharedClock, SystemClock},
    };

    /// A handler that always panics.
    struct Panics;

    impl Handle for Panics {
        #[allow(clippy::manual_async_fn)]
        fn handle<B>(&self, _: SocketAddr, _: Request<B>) -> impl Future<Output = Response> + Send {
            async { panic!("boom") }
        }
    }

    /// A handler that never answers.
    struct Never;

    impl Handle for Never {
        #[allow(clippy::manual_async_fn)]
        fn handle<B>(&self, _: SocketAddr, _: Request<B>) -> impl Future<Output = Response> + Send {
            std::future::pending()
        }
    }

    /// A handler that answers with the caller it is told of, in a header.
    struct EchoCaller;

    impl Handle for EchoCaller {
        #[allow(clippy::manual_async_fn)]
        fn handle<B>(&self, _: SocketAddr, _: Request<B>) -> impl Future<Output = Response> + Send {
            async {
                let caller = ClientAddr::current().map(|c| c.to_string());
                let mut response = Response::new(axum::body::Body::empty());
                let value = caller.unwrap_or_default().parse().unwrap();
                response.headers_mut().insert("caller", value);
                response
            }
        }
    }

    fn labels(paths: &[&'static str], proxied: usize) -> Arc<ArcSwap<RouteLabels>> {
        let labels = RouteLabels::new(Arc::from(paths), proxied);
        Arc::new(ArcSwap::from_pointee(labels))
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(SharedClock::new(Arc::new(SystemClock))))
    }

    #[test]
    fn a_request_dropped_before_its_answer_is_counted_as_499() {
        let metrics = metrics();
        // A proxied route: its 4xx answers count as refusals, a 499 must not.
        let observed = Observe::new(
            Never,
            Arc::clone(&metrics),
            labels(&["/v1/route"], 1),
            Resolver::default(),
            Traced::Off,
        );
        let request = Request::get("/v1/route").body(Body::empty()).unwrap();
        let peer = "127.0.0.1:1".parse().unwrap();
        let mut answer = Box::pin(observed.handle(peer, request));
        let polled = answer
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()));
        assert!(polled.is_pending());
        drop(answer); // the client left: hyper drops the request's future

        let text = metrics.render(crate::metrics::Format::Prometheus, 0, 0);
        let series =
            r#"keyapi_proxy_requests_total{route="/v1/route",status="499",cache="none"} 1"#;
        assert!(text.contains(series), "{text}");
        assert_eq!(
            metrics.totals().rejected,
            0,
            "a client that left was not refused"
        );
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_500_with_an_id() {
        let observed = Observe::new(
            Panics,
            metrics(),
            labels(&["/"], 0),
            Resolver::default(),
            Traced::Off,
        );
        let peer = "127.0.0.1:1".parse().unwrap();
        let response = observed.handle(peer, Request::new(Body::empty())).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let id = response.headers()[X_REQUEST_ID]
            .to_str()
            .unwrap()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope["code"], 500);
        assert_eq!(envelope["requestId"], id.as_str());
    }

    #[tokio::test]
    async fn handlers_see_the_resolved_caller() {
        let trusted = ["127.0.0.0/8".parse().unwrap()];
        let resolver = Resolver::new(&trusted, ForwardedHeader::XForwardedFor);
        let observed = Observe::new(
            EchoCaller,
            metrics(),
            labels(&["/"], 0),
            resolver,
            Traced::Off,
        );
        let caller = |peer: &str| {
            let request = Request::builder()
                .header(X_FORWARDED_FOR, "203.0.113.9")
                .body(Body::empty())
                .unwrap();
            let answered = observed.handle(peer.parse().unwrap(), request);
            async move {
                answered.await.headers()["caller"]
                    .to_str()
                    .unwrap()
                    .to_owned()
            }
        };
        assert_eq!(caller("127.0.0.1:4000").await, "203.0.113.9");
        assert_eq!(caller("192.0.2.1:4000").await, "192.0.2.1");
        assert_eq!(ClientAddr::current(), None, "outside a request");
    }
}
