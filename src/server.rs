//! The connection layer: accepts TCP connections and serves each with
//! hyper-util's HTTP/1.1 + h2c builder, keeping everything a client controls
//! bounded — time to send a request head (`server.header_read_timeout`), time
//! silent on a keep-alive connection (`server.idle_timeout`), header size and
//! count, and open connections (`server.max_connections`). Each request is
//! handed its connection's peer address, read once at accept. On HTTP/2 only the
//! first request's head is timed: later frames between requests (PINGs) are
//! idle traffic, and hyper's own HTTP/2 limits bound the rest.
//!
//! At the cap, the connection that has been silent longest (no request in
//! progress: idle keep-alive or head incomplete) is closed to admit the new
//! one, as nginx reuses keep-alive connections, so a flood of silent sockets
//! cannot lock real clients out nor exhaust descriptors. On shutdown, silent
//! connections close at once; busy ones are told to close after their
//! response (`Connection: close` / GOAWAY) and get at most the grace period.
//!
//! A request costs a few atomic loads and stores here, no timer and no clock
//! read: one reaper task ticks a coarse clock and sweeps all connections every
//! tenth of the shorter timeout, so a deadline is enforced within two tenths
//! (never early), and tells a connection's task to close through its own
//! small channel.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, http::Request, response::Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
    time::{Instant, MissedTickBehavior},
};

use crate::metrics::ConnectionMetrics;

/// Largest request head (HTTP/1 read buffer, HTTP/2 header list) in bytes;
/// larger heads get 431. Our longest legitimate head is well under 2 KiB.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Descriptors kept back from `server.max_connections` for the listener,
/// Redis, the snapshot file, logs and the runtime; upstream connections
/// (`upstream.max_in_flight`) are reserved on top.
const FD_RESERVE: u64 = 64;
/// Smallest derived connection cap, whatever the descriptor limit says.
const MIN_CONNECTIONS: u64 = 16;
/// Largest derived cap: eviction scans the open connections, so the scan stays short.
const MAX_DERIVED_CONNECTIONS: u64 = 65_536;
/// Shortest sweep period of the reaper, whatever the timeouts.
const MIN_REAP_PERIOD: Duration = Duration::from_millis(10);
/// Pause after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// What the connection layer serves: one answer per request, never an error.
///
/// An `async fn` rather than a tower `Service`, so each request's whole
/// future is one concrete type inside hyper's connection task: no box, no
/// clone of the service per request.
pub(crate) trait Handle: Send + Sync + 'static {
    /// The answer to `request` from the TCP peer `peer` (generic over the
    /// body so tests can build one). The peer is a parameter, read once per
    /// connection, rather than a request extension: no allocation per request.
    fn handle<B>(
        &self,
        peer: SocketAddr,
        request: Request<B>,
    ) -> impl Future<Output = Response> + Send
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>;
}

/// The bounds of the connection layer, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Time a client has to send a whole request head, counted from the
    /// connection's start or from the first byte after an idle pause.
    pub(crate) header_read_timeout: Duration,
    /// Time a keep-alive connection may stay silent between requests.
    pub(crate) idle_timeout: Duration,
    /// Open connections at most; the longest-silent one makes room.
    pub(crate) max_connections: usize,
    /// Drain time for busy connections after the shutdown signal.
    pub(crate) shutdown_grace: Duration,
}

/// Default `server.max_connections`: the soft descriptor limit minus
/// [`FD_RESERVE`] and the upstream connections, so accepting never runs the
/// process out of descriptors.
pub(crate) fn default_max_connections(upstream_in_flight: usize) -> usize {
    let limit = nofile_limit().unwrap_or(1024);
    let reserve = FD_RESERVE + upstream_in_flight as u64;
    let cap = limit
        .saturating_sub(reserve)
        .clamp(MIN_CONNECTIONS, MAX_DERIVED_CONNECTIONS);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// The process's soft `RLIMIT_NOFILE`, if it can be read (`RLIM_INFINITY`
/// is `u64::MAX`, so "unlimited" ends at [`MAX_DERIVED_CONNECTIONS`]).
fn nofile_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which outlives the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// Why the connection layer closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The request head did not arrive within `header_read_timeout`.
    HeaderTimeout,
    /// The keep-alive connection stayed silent for `idle_timeout`.
    IdleTimeout,
    /// Closed to admit a new connection at `max_connections`.
    Evicted,
    /// Silent when shutdown began, or still open when the grace period ended.
    Shutdown,
}

impl Cut {
    /// The `reason` label of `connections_closed_total`.
    fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_read_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Evicted => "evicted",
            Self::Shutdown => "shutdown",
        }
    }
}

/// What the connection layer tells one connection's task.
#[derive(Debug, Clone, Copy)]
enum Signal {
    /// Finish the requests in progress, then close (`Connection: close` / GOAWAY).
    Drain,
    /// Close now.
    Close(Cut),
}

/// The connection layer's clock: milliseconds since the registry's start as
/// of the reaper's last tick, so a request records when it starts and ends
/// with one atomic load rather than a clock read. It lags real time by up to
/// one reap period, so a reading is rounded up by one period: a deadline is
/// never early, and late by at most two periods.
struct Ticks {
    epoch: Instant,
    period: Duration,
    elapsed_ms: AtomicU64,
}

impl Ticks {
    fn new(period: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            period,
            elapsed_ms: AtomicU64::new(0),
        }
    }

    /// The reaper's tick: reads the real clock.
    fn tick(&self) {
        let elapsed = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.elapsed_ms.store(elapsed, Ordering::Release);
    }

    /// Now, in milliseconds after the epoch, rounded up to the next tick.
    fn now_ms(&self) -> u64 {
        let period = u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX);
        self.elapsed_ms
            .load(Ordering::Acquire)
            .saturating_add(period)
    }

    /// The instant `ms` milliseconds after the epoch.
    fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

/// What one connection is doing, shared by its task, its I/O, its requests
/// and the registry. Atomics, so a hit pays a few loads and stores, no lock.
struct Conn {
    ticks: Arc<Ticks>,
    /// Requests whose response is not finished yet (HTTP/2 may have several).
    busy: AtomicU32,
    /// Silent phase: true while a request head is being read (or awaited on a
    /// fresh connection), false while idle between keep-alive requests.
    reading_head: AtomicBool,
    /// Milliseconds after the ticks' epoch when the current silent phase began.
    silent_since: AtomicU64,
    /// To the connection's task; room for a drain and a close.
    signals: mpsc::Sender<Signal>,
}

impl Conn {
    fn new(ticks: Arc<Ticks>) -> (Self, mpsc::Receiver<Signal>) {
        let (signals, receiver) = mpsc::channel(2);
        let conn = Self {
            ticks,
            busy: AtomicU32::new(0),
            reading_head: AtomicBool::new(true),
            silent_since: AtomicU64::new(0),
            signals,
        };
        conn.silent_since.store(conn.now_ms(), Ordering::Release);
        (conn, receiver)
    }

    fn now_ms(&self) -> u64 {
        self.ticks.now_ms()
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    /// A request head is complete: the connection is busy until the response ends.
    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        RequestGuard(Arc::clone(self))
    }

    /// Bytes arrived: on an idle connection a new request head has begun.
    fn on_read(&self) {
        if !self.is_busy() && !self.reading_head.load(Ordering::Acquire) {
            self.silent_since.store(self.now_ms(), Ordering::Release);
            self.reading_head.store(true, Ordering::Release);
        }
    }

    /// Tells the connection's task; a full channel already holds a close.
    fn signal(&self, signal: Signal) {
        let _ = self.signals.try_send(signal);
    }

    /// When the current silent phase ends the connection, and why; `None` while busy.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Cut)> {
        if self.is_busy() {
            return None;
        }
        let since = self
            .ticks
            .instant(self.silent_since.load(Ordering::Acquire));
        Some(if self.reading_head.load(Ordering::Acquire) {
            (since + limits.header_read_timeout, Cut::HeaderTimeout)
        } else {
            (since + limits.idle_timeout, Cut::IdleTimeout)
        })
    }
}

/// Marks one request finished when the response body is done (or dropped).
struct RequestGuard(Arc<Conn>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.silent_since.store(conn.now_ms(), Ordering::Release);
        conn.reading_head.store(false, Ordering::Release);
        conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its request's busy phase when dropped.
    struct TrackedBody {
        #[pin]
        body: Body,
        guard: RequestGuard,
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// Nothing read yet.
    Unknown,
    Http1,
    /// The client preface (`PRI * HTTP/2.0`), as hyper-util's builder detects it.
    Http2,
}

/// The socket, reporting reads so a new request head starts its timer.
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
    speaks: Speaks,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().get(before..).unwrap_or_default();
        if !read.is_empty() {
            if self.speaks == Speaks::Unknown {
                self.speaks = if read.starts_with(b"PRI ") {
                    Speaks::Http2
                } else {
                    Speaks::Http1
                };
            }
            // HTTP/2 sends frames between requests (PING, SETTINGS,
            // WINDOW_UPDATE) that begin no request: its silences are idle ones.
            if self.speaks == Speaks::Http1 {
                self.conn.on_read();
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Every open connection, for the cap, eviction and the drain.
struct Registry {
    ticks: Arc<Ticks>,
    conns: Mutex<Connections>,
    /// Signalled when the last connection closes.
    emptied: Notify,
    metrics: ConnectionMetrics,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
}

impl Connections {
    /// Closes the connection silent the longest (a linear scan, only at the
    /// cap); false when every connection is busy.
    fn evict_longest_silent(&mut self) -> bool {
        let victim = self
            .open
            .iter()
            .filter(|(_, c)| !c.is_busy())
            // Milliseconds tie often under a flood; the older id is the older connection.
            .min_by_key(|(id, c)| (c.silent_since.load(Ordering::Acquire), **id))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.open.remove(&id)) {
            Some(conn) => {
                conn.signal(Signal::Close(Cut::Evicted));
                true
            }
            None => false,
        }
    }

    /// Closes every silent connection whose phase outlived its timeout.
    fn reap(&mut self, limits: &Limits) {
        let now = Instant::now();
        self.open.retain(|_, conn| match conn.deadline(limits) {
            Some((deadline, why)) if deadline <= now => {
                conn.signal(Signal::Close(why));
                false
            }
            _ => true,
        });
    }

    /// Shutdown: silent connections close now, busy ones after their answer.
    fn drain(&mut self) {
        self.open.retain(|_, conn| {
            if conn.is_busy() {
                conn.signal(Signal::Drain);
                true
            } else {
                conn.signal(Signal::Close(Cut::Shutdown));
                false
            }
        });
    }
}

impl Registry {
    /// A registry whose reaper sweeps every `limits`' tenth of the shorter timeout.
    fn new(limits: &Limits, metrics: ConnectionMetrics) -> Self {
        let period =
            (limits.header_read_timeout.min(limits.idle_timeout) / 10).max(MIN_REAP_PERIOD);
        Self {
            ticks: Arc::new(Ticks::new(period)),
            conns: Mutex::new(Connections::default()),
            emptied: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        // A panic elsewhere cannot leave the map half-updated: every change is one call.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection; at `max`, evicts the longest-silent one to
    /// make room. `None` when every open connection is busy.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Conn>, mpsc::Receiver<Signal>)> {
        let mut conns = self.lock();
        if conns.open.len() >= max && !conns.evict_longest_silent() {
            self.metrics.refused();
            return None;
        }
        self.metrics.opened();
        let id = conns.next_id;
        conns.next_id += 1;
        let (conn, signals) = Conn::new(Arc::clone(&self.ticks));
        let conn = Arc::new(conn);
        conns.open.insert(id, Arc::clone(&conn));
        Some((id, conn, signals))
    }

    /// Every period, advances the clock and closes the connections past their deadline.
    async fn reap_forever(&self, limits: Limits) {
        let mut ticks = tokio::time::interval(self.ticks.period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.ticks.tick();
            self.lock().reap(&limits);
        }
    }

    fn remove(&self, id: u64) {
        let mut conns = self.lock();
        conns.open.remove(&id);
        if conns.open.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Closes every remaining connection (the grace period is over).
    fn close_all(&self) {
        for (_, conn) in self.lock().open.drain() {
            conn.signal(Signal::Close(Cut::Shutdown));
        }
        self.emptied.notify_waiters();
    }

    async fn all_closed(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.lock().open.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

/// Deregisters a connection however its task ends, counting why it ended.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
    /// Who ended the connection; the client unless the proxy cut it.
    cut: Option<Cut>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
        let reason = self.cut.map_or("client", Cut::as_str);
        self.registry.metrics.closed(reason);
    }
}

/// hyper-util's auto (HTTP/1.1 or h2c by preface) builder with our limits.
/// hyper's own HTTP/1 header timer is off: it would also end idle keep-alive
/// connections after `header_read_timeout`; the reaper times both phases.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // At most 100 header fields (more gets 431): hyper's default, parsed on
        // the stack; an explicit `max_headers` would initialise that array per request.
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    builder
}

/// Serves `service` on `listener` until `shutdown` resolves, then closes the
/// listener, closes silent connections at once and lets busy ones finish
/// within `limits.shutdown_grace`.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: F,
) where
    H: Handle,
    F: Future<Output = ()>,
{
    let registry = Arc::new(Registry::new(&limits, metrics));
    let builder = Arc::new(builder());
    let handler = Arc::new(handler);
    let reaper = tokio::spawn({
        let registry = Arc::clone(&registry);
        async move { registry.reap_forever(limits).await }
    });
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            // Shutdown first: a flood of connections must not starve it.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                on_accept_error(&e, &registry).await;
                continue;
            }
        };
        let Some((id, conn, signals)) = registry.admit(limits.max_connections) else {
            tracing::debug!("every connection is busy; refusing a new one");
            continue;
        };
        let registered = Registered {
            registry: Arc::clone(&registry),
            id,
            cut: None,
        };
        tokio::spawn(serve_connection(
            stream,
            peer,
            conn,
            signals,
            registered,
            Arc::clone(&builder),
            Arc::clone(&handler),
        ));
    }
    drop(listener);
    registry.lock().drain();
    if tokio::time::timeout(limits.shutdown_grace, registry.all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            shutdown_grace = ?limits.shutdown_grace,
            "grace period over; dropping remaining connections"
        );
        registry.close_all();
    }
    reaper.abort();
}

/// Out of descriptors (or memory): free the longest-silent connection's and
/// pause; a client that gave up before we accepted is no error at all.
async fn on_accept_error(error: &io::Error, registry: &Registry) {
    use io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %error, "accept failed; closing the longest-silent connection");
    registry.lock().evict_longest_silent();
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

async fn serve_connection<H: Handle>(
    stream: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
    mut signals: mpsc::Receiver<Signal>,
    mut registered: Registered,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: Arc<H>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Watched {
        stream,
        conn: Arc::clone(&conn),
        speaks: Speaks::Unknown,
    });
    let hyper_service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let guard = conn.begin_request();
        let handler = Arc::clone(&handler);
        async move {
            let response = handler.handle(peer, request).await;
            // Served as is (not boxed into another `Body`): no allocation per answer.
            Ok::<_, Infallible>(response.map(|body| TrackedBody { body, guard }))
        }
    });
    let connection = builder.serve_connection(io, hyper_service);
    tokio::pin!(connection);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            signal = signals.recv() => match signal {
                Some(Signal::Drain) => {
                    registered.cut = Some(Cut::Shutdown);
                    connection.as_mut().graceful_shutdown();
                }
                Some(Signal::Close(cut)) => {
                    tracing::debug!(reason = cut.as_str(), "connection closed by the proxy");
                    registered.cut = Some(cut);
                    return;
                }
                // The registry let go of this connection without a word: cannot happen.
                None => return,
            },
        }
    }
}
