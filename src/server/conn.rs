//! One connection's state, shared by its task, its I/O, its requests and the
//! registry, in atomics: the coarse clock ([`Ticks`]) it reads, why the layer
//! may cut it, and the guard and body that mark a request's answer written.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Body;
use tokio::{sync::mpsc, time::Instant};

use super::limits::{Limits, OVERDUE_GENERATIONS, SENDING_SLOTS, STALL_PERIODS};

/// Why the connection layer closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
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
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) enum Signal {
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
pub(super) struct Ticks {
    epoch: Instant,
    pub(super) period: Duration,
    /// `period` in milliseconds.
    period_ms: u64,
    /// Milliseconds in one generation of the ring of answers being written:
    /// half the send timeout, and at least one period.
    generation_ms: u64,
    elapsed_ms: AtomicU64,
}

impl Ticks {
    pub(super) fn new(period: Duration, send_timeout: Duration) -> Self {
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
    pub(super) fn tick(&self) {
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
    pub(super) fn overdue_slot(&self) -> Option<usize> {
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
pub(super) fn ring_slot(generation: u64) -> usize {
    // The remainder is below SENDING_SLOTS, so it fits.
    (generation % SENDING_SLOTS as u64) as usize
}

/// What one connection is doing, shared by its task, its I/O, its requests
/// and the registry. Atomics, so a hit pays a few loads and stores, no lock.
pub(super) struct Conn {
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
    pub(super) fn new(ticks: Arc<Ticks>) -> (Self, mpsc::Receiver<Signal>) {
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
    pub(super) fn begin_request(self: &Arc<Self>) -> RequestGuard {
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
    pub(super) fn on_write(&self, blocked: bool) {
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
    pub(super) fn quiet_since(&self) -> Option<u64> {
        if self.is_busy() {
            self.stuck_since()
        } else {
            Some(self.silent_since.load(Ordering::Acquire))
        }
    }

    /// Since when the answers of a busy connection have been stuck: every
    /// request's handler has returned and nothing moved for [`STALL_PERIODS`].
    pub(super) fn stuck_since(&self) -> Option<u64> {
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
    pub(super) fn on_read(&self) {
        if !self.is_busy() && !self.reading_head.load(Ordering::Acquire) {
            self.silent_since.store(self.now_ms(), Ordering::Release);
            self.reading_head.store(true, Ordering::Release);
        }
    }

    /// Tells the connection's task; a full channel already holds a close.
    pub(super) fn signal(&self, signal: Signal) {
        let _ = self.signals.try_send(signal);
    }

    /// Why the connection must close as of `now`, if it must: an answer
    /// overdue (in `overdue_slot`, or its socket writes blocked for the send
    /// timeout), or the silent phase past its timeout.
    pub(super) fn overdue(
        &self,
        limits: &Limits,
        now: Instant,
        overdue_slot: Option<usize>,
    ) -> Option<Cut> {
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
pub(super) struct RequestGuard {
    conn: Arc<Conn>,
    /// The ring slot counting this answer, once it is being written.
    sending: Option<usize>,
}

impl RequestGuard {
    /// The handler returned: the answer is being written from now on.
    pub(super) fn begin_sending(&mut self) {
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
    pub(super) struct TrackedBody {
        #[pin]
        pub(super) body: Body,
        pub(super) guard: RequestGuard,
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
