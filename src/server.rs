//! The connection layer: accepts TCP connections and serves each with
//! hyper-util's builder — HTTP/1.1, plus h2c when `server.http2` is on —
//! keeping everything a client controls bounded: time to send a request head
//! (`server.header_read_timeout`), time silent on a keep-alive connection
//! (`server.idle_timeout`), time an answer takes to be written
//! (`server.send_timeout`), header size and count, HTTP/2 streams and windows,
//! and open connections (`server.max_connections`). Each request is handed
//! its connection's peer address, read once at accept. On HTTP/2 only the
//! first request's head is timed: later frames between requests (PINGs) are
//! idle traffic.
//!
//! An answer the client does not take — socket writes blocked because it does
//! not read, or an HTTP/2 stream held at a zero flow-control window — closes
//! its connection after the send timeout, so no connection stays open without
//! making progress. A connection whose every request is such a stuck answer
//! counts as silent.
//!
//! At the cap, the connection that has been silent longest (no request in
//! progress: idle keep-alive or head incomplete; or every answer stuck) is
//! closed to admit the new one, as nginx reuses keep-alive connections, so a
//! flood of silent sockets cannot lock real clients out nor exhaust
//! descriptors. On shutdown, silent connections close at once; busy ones are
//! told to close after their response (`Connection: close` / GOAWAY) and get
//! at most the grace period, unless their answers get stuck meanwhile.
//!
//! A request costs a few atomic loads and stores here, no timer and no clock
//! read: one reaper task ticks a coarse clock and sweeps all connections every
//! tenth of the shortest timeout, so a deadline is enforced within two tenths
//! (never early), and tells a connection's task to close through its own
//! small channel. Answers being written are counted in a small ring indexed
//! by coarse time (generations of half a send timeout): beginning and ending
//! one is an atomic add, and the reaper closes a connection holding answers
//! three generations old.

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
/// Reap periods without progress after which every answer of a connection
/// counts as stuck (for eviction and shutdown): one period is the clock's grain.
const STALL_PERIODS: u32 = 2;
/// Generations (half a send timeout each) an answer may stay unwritten: it is
/// found three generations after its own, between 1 and 1.5 send timeouts.
const OVERDUE_GENERATIONS: u64 = 3;
/// Slots of the ring of answers being written. The reaper reads the clock one
/// period late, so a writer may be one generation ahead of it: generations
/// g-2..g+1 are written to while g-3 is checked, five slots in all.
const SENDING_SLOTS: usize = 5;
/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Concurrent streams per HTTP/2 connection: RFC 9113 advises no fewer than
/// 100 (hyper's default is 200). With the send timeout, it bounds what one
/// connection can hold: 100 answers at most, each for at most 1.5 send timeouts.
const H2_MAX_STREAMS: u32 = 100;
/// HTTP/2 receive windows, per stream and per connection: the protocol's
/// initial 64 KiB (hyper's default is 1 MiB). No endpoint reads a request
/// body, so nothing more is worth buffering.
const H2_RECEIVE_WINDOW: u32 = 65_535;
/// Data queued per HTTP/2 stream ahead of the client's window (hyper: 400 KiB).
const H2_SEND_BUFFER: usize = 64 * 1024;
/// Streams a client may open and reset before they are accepted, before the
/// connection gets GOAWAY (h2's default; the "rapid reset" bound).
const H2_PENDING_RESETS: usize = 20;
/// Streams we may reset for a client's protocol errors before GOAWAY (hyper's default).
const H2_LOCAL_RESETS: usize = 1024;

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
    /// Time an answer may take to be written before its connection is closed.
    pub(crate) send_timeout: Duration,
    /// Serve h2c (HTTP/2 with prior knowledge) besides HTTP/1.1.
    pub(crate) http2: bool,
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
    /// An answer was not taken by the client within `send_timeout`.
    SendTimeout,
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
            Self::SendTimeout => "send_timeout",
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
    /// `period` in milliseconds.
    period_ms: u64,
    /// Milliseconds in one generation of the ring of answers being written:
    /// half the send timeout, and at least one period.
    generation_ms: u64,
    elapsed_ms: AtomicU64,
}

impl Ticks {
    fn new(period: Duration, send_timeout: Duration) -> Self {
        let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
        let half_send = u64::try_from((send_timeout / 2).as_millis()).unwrap_or(u64::MAX);
        Self {
            epoch: Instant::now(),
            period,
            period_ms,
            generation_ms: half_send.max(period_ms),
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
        self.elapsed_ms
            .load(Ordering::Acquire)
            .saturating_add(self.period_ms)
    }

    /// The ring slot of the current generation, as of the last tick.
    fn sending_slot(&self) -> usize {
        ring_slot(self.elapsed_ms.load(Ordering::Acquire) / self.generation_ms)
    }

    /// The ring slot of answers that began writing [`OVERDUE_GENERATIONS`]
    /// before the current generation, seen one period late so that no writer
    /// (reading the newest tick) is in it; `None` early after the start.
    fn overdue_slot(&self) -> Option<usize> {
        let lagged = self
            .elapsed_ms
            .load(Ordering::Acquire)
            .saturating_sub(self.period_ms)
            / self.generation_ms;
        lagged.checked_sub(OVERDUE_GENERATIONS).map(ring_slot)
    }

    /// Milliseconds without progress after which a connection's answers count as stuck.
    fn stall_ms(&self) -> u64 {
        self.period_ms.saturating_mul(u64::from(STALL_PERIODS))
    }

    /// The instant `ms` milliseconds after the epoch.
    fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

/// The slot of `generation` in the ring of answers being written.
fn ring_slot(generation: u64) -> usize {
    // The remainder is below SENDING_SLOTS, so it fits.
    (generation % SENDING_SLOTS as u64) as usize
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
    /// Answers being written (handler done, body not finished), counted in
    /// the slot of the generation in which writing began.
    sending: [AtomicU32; SENDING_SLOTS],
    /// When a socket write returned `Pending` with nothing written since
    /// (milliseconds after the epoch; 0: writes are not blocked).
    blocked_since: AtomicU64,
    /// When an answer last moved: it began, hyper took a frame of it, or
    /// bytes reached the socket.
    progress_at: AtomicU64,
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
            sending: Default::default(),
            blocked_since: AtomicU64::new(0),
            progress_at: AtomicU64::new(0),
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
        RequestGuard {
            conn: Arc::clone(self),
            sending: None,
        }
    }

    /// An answer moved; stored only when the coarse clock moved too.
    fn progressed(&self) {
        let now = self.now_ms();
        if self.progress_at.load(Ordering::Relaxed) != now {
            self.progress_at.store(now, Ordering::Relaxed);
        }
    }

    /// A socket write returned: `blocked` when it could write nothing (the
    /// client is not reading), which starts the send timer unless running.
    fn on_write(&self, blocked: bool) {
        if blocked {
            if self.blocked_since.load(Ordering::Relaxed) == 0 {
                self.blocked_since.store(self.now_ms(), Ordering::Relaxed);
            }
        } else {
            if self.blocked_since.load(Ordering::Relaxed) != 0 {
                self.blocked_since.store(0, Ordering::Relaxed);
            }
            self.progressed();
        }
    }

    /// Since when the connection has been silent, in milliseconds after the
    /// epoch: no request in progress, or every answer stuck (see
    /// [`Conn::stuck_since`]). `None` while it works.
    fn quiet_since(&self) -> Option<u64> {
        if self.is_busy() {
            self.stuck_since()
        } else {
            Some(self.silent_since.load(Ordering::Acquire))
        }
    }

    /// Since when the answers of a busy connection have been stuck: every
    /// request's handler has returned and nothing moved for [`STALL_PERIODS`].
    fn stuck_since(&self) -> Option<u64> {
        let busy = self.busy.load(Ordering::Acquire);
        let sending: u32 = self
            .sending
            .iter()
            .map(|slot| slot.load(Ordering::Acquire))
            .sum();
        let progress_at = self.progress_at.load(Ordering::Relaxed);
        let stuck = self.now_ms() >= progress_at.saturating_add(self.ticks.stall_ms());
        (busy > 0 && sending >= busy && stuck).then_some(progress_at)
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

    /// Why the connection must close as of `now`, if it must: an answer
    /// overdue (in `overdue_slot`, or its socket writes blocked for the send
    /// timeout), or the silent phase past its timeout.
    fn overdue(&self, limits: &Limits, now: Instant, overdue_slot: Option<usize>) -> Option<Cut> {
        let unwritten = overdue_slot
            .and_then(|slot| self.sending.get(slot))
            .is_some_and(|slot| slot.load(Ordering::Acquire) > 0);
        let blocked = self.blocked_since.load(Ordering::Relaxed);
        if unwritten || (blocked != 0 && self.ticks.instant(blocked) + limits.send_timeout <= now) {
            return Some(Cut::SendTimeout);
        }
        if self.is_busy() {
            return None;
        }
        let since = self
            .ticks
            .instant(self.silent_since.load(Ordering::Acquire));
        let (deadline, cut) = if self.reading_head.load(Ordering::Acquire) {
            (since + limits.header_read_timeout, Cut::HeaderTimeout)
        } else {
            (since + limits.idle_timeout, Cut::IdleTimeout)
        };
        (deadline <= now).then_some(cut)
    }
}

/// One request in progress: marks it finished when the response body is done
/// (or dropped), and counts its answer among those being written once the
/// handler has returned.
struct RequestGuard {
    conn: Arc<Conn>,
    /// The ring slot counting this answer, once it is being written.
    sending: Option<usize>,
}

impl RequestGuard {
    /// The handler returned: the answer is being written from now on.
    fn begin_sending(&mut self) {
        let slot = self.conn.ticks.sending_slot();
        if let Some(count) = self.conn.sending.get(slot) {
            count.fetch_add(1, Ordering::AcqRel);
            self.sending = Some(slot);
        }
        self.conn.progressed();
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let conn = &self.conn;
        if let Some(count) = self.sending.and_then(|slot| conn.sending.get(slot)) {
            count.fetch_sub(1, Ordering::AcqRel);
        }
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
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.guard.conn.progressed();
        }
        polled
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
    /// The bytes read so far are this many first bytes of the HTTP/2
    /// preface (0: nothing read yet).
    Undecided(usize),
    Http1,
    /// The whole client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`), as
    /// hyper-util's builder detects it; never when `server.http2` is off.
    Http2,
}

impl Speaks {
    /// What a connection speaks from its start: undecided when h2c is served.
    fn at_start(http2: bool) -> Self {
        if http2 {
            Self::Undecided(0)
        } else {
            Self::Http1
        }
    }

    /// What it speaks once `read` follows the bytes read so far. An HTTP/1
    /// request with method `PRI` (`PRI / HTTP/1.1`, `PRI * HTTP/1.1`) differs
    /// from the preface within its request line, so it stays HTTP/1 and its
    /// later heads stay timed.
    fn after(self, read: &[u8]) -> Self {
        let Self::Undecided(matched) = self else {
            return self;
        };
        let rest = H2_PREFACE.get(matched..).unwrap_or_default();
        let n = read.len().min(rest.len());
        if read.get(..n) != rest.get(..n) {
            Self::Http1
        } else if matched + n == H2_PREFACE.len() {
            Self::Http2
        } else {
            Self::Undecided(matched + n)
        }
    }
}

/// The socket, reporting reads so a new request head starts its timer, and
/// writes so an answer the client does not take is noticed.
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
            let speaks = self.speaks.after(read);
            self.speaks = speaks;
            // HTTP/2 sends frames between requests (PING, SETTINGS,
            // WINDOW_UPDATE) that begin no request: its silences are idle ones.
            if speaks != Speaks::Http2 {
                self.conn.on_read();
            }
        }
        polled
    }
}

impl Watched {
    /// Reports a write's outcome to the connection (`Pending`: blocked).
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.conn.on_write(true),
            Poll::Ready(Ok(n)) if *n > 0 => self.conn.on_write(false),
            Poll::Ready(_) => {}
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
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
    /// Shutdown has begun: connections close as soon as they fall silent.
    draining: bool,
}

impl Connections {
    /// Closes the connection silent the longest (a linear scan, only at the
    /// cap); false when every connection is working.
    fn evict_longest_silent(&mut self) -> bool {
        let victim = self
            .open
            .iter()
            .filter_map(|(id, c)| Some((c.quiet_since()?, *id)))
            // Milliseconds tie often under a flood; the older id is the older connection.
            .min()
            .map(|(_, id)| id);
        match victim.and_then(|id| self.open.remove(&id)) {
            Some(conn) => {
                conn.signal(Signal::Close(Cut::Evicted));
                true
            }
            None => false,
        }
    }

    /// Closes every connection past a deadline (see [`Conn::overdue`]) and,
    /// while draining, every one whose answers are stuck. One that finished
    /// its answers is left to hyper, which closes it once they are flushed.
    fn reap(&mut self, limits: &Limits, overdue_slot: Option<usize>) {
        let now = Instant::now();
        let draining = self.draining;
        self.open.retain(|_, conn| {
            let cut = conn
                .overdue(limits, now, overdue_slot)
                .or_else(|| (draining && conn.stuck_since().is_some()).then_some(Cut::Shutdown));
            match cut {
                Some(cut) => {
                    conn.signal(Signal::Close(cut));
                    false
                }
                None => true,
            }
        });
    }

    /// Shutdown: silent connections close now, working ones after their answer.
    fn drain(&mut self) {
        self.draining = true;
        self.open.retain(|_, conn| {
            if conn.quiet_since().is_some() {
                conn.signal(Signal::Close(Cut::Shutdown));
                false
            } else {
                conn.signal(Signal::Drain);
                true
            }
        });
    }
}

impl Registry {
    /// A registry whose reaper sweeps every `limits`' tenth of the shortest timeout.
    fn new(limits: &Limits, metrics: ConnectionMetrics) -> Self {
        let shortest = limits
            .header_read_timeout
            .min(limits.idle_timeout)
            .min(limits.send_timeout);
        let period = (shortest / 10).max(MIN_REAP_PERIOD);
        Self {
            ticks: Arc::new(Ticks::new(period, limits.send_timeout)),
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
            let overdue_slot = self.ticks.overdue_slot();
            self.lock().reap(&limits, overdue_slot);
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

/// hyper-util's builder with our limits: HTTP/1.1 only, or with `http2`
/// HTTP/1.1 or h2c by preface. hyper's own HTTP/1 header timer is off: it
/// would also end idle keep-alive connections after `header_read_timeout`;
/// the reaper times both phases. Without h2c, hyper's HTTP/1 parser closes a
/// connection that opens with the HTTP/2 preface, answering nothing.
fn builder(http2: bool) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if !http2 {
        builder = builder.http1_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // At most 100 header fields (more gets 431): hyper's default, parsed on
        // the stack; an explicit `max_headers` would initialise that array per request.
        .max_buf_size(MAX_HEADER_BYTES);
    if http2 {
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
            .max_concurrent_streams(H2_MAX_STREAMS)
            .initial_stream_window_size(H2_RECEIVE_WINDOW)
            .initial_connection_window_size(H2_RECEIVE_WINDOW)
            .max_send_buf_size(H2_SEND_BUFFER)
            .max_pending_accept_reset_streams(H2_PENDING_RESETS)
            .max_local_error_reset_streams(H2_LOCAL_RESETS);
    }
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
    let builder = Arc::new(builder(limits.http2));
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
        speaks: Speaks::at_start(builder.is_http2_available()),
    });
    let hyper_service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut guard = conn.begin_request();
        let handler = Arc::clone(&handler);
        async move {
            let response = handler.handle(peer, request).await;
            guard.begin_sending();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_http2_preface_makes_a_connection_http2() {
        let h2c = Speaks::at_start(true);
        assert_eq!(h2c.after(H2_PREFACE), Speaks::Http2);
        // In pieces, and followed by the first frame in the same read.
        let (head, tail) = H2_PREFACE.split_at(4);
        assert_eq!(h2c.after(head), Speaks::Undecided(4));
        assert_eq!(h2c.after(head).after(tail), Speaks::Http2);
        assert_eq!(
            h2c.after(&[H2_PREFACE.as_slice(), b"\0\0\0\x04"].concat()),
            Speaks::Http2
        );
        // An HTTP/1 request with method PRI is HTTP/1, whatever its target.
        assert_eq!(h2c.after(b"PRI / HTTP/1.1\r\n"), Speaks::Http1);
        assert_eq!(h2c.after(b"PRI ").after(b"* HTTP/1.1\r\n"), Speaks::Http1);
        assert_eq!(h2c.after(b"GET / HTTP/1.1\r\n"), Speaks::Http1);
        // Without h2c, everything is HTTP/1 (hyper's parser refuses the preface).
        assert_eq!(Speaks::at_start(false).after(H2_PREFACE), Speaks::Http1);
    }
}
