//! Every bound of the connection layer: header size, HTTP/2 streams and
//! windows, the reaper's grain, and `[server]`'s timeouts and connection cap
//! (derived from the descriptor limit when not configured).

use std::time::Duration;

/// Largest request head (HTTP/1 read buffer, HTTP/2 header list) in bytes;
/// larger heads get 431. Our longest legitimate head is well under 2 KiB.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Descriptors kept back from `server.max_connections` for the listener,
/// Redis, the snapshot file, logs and the runtime; upstream connections
/// (`upstream.max_in_flight`) are reserved on top.
pub(super) const FD_RESERVE: u64 = 64;
/// Smallest derived connection cap, whatever the descriptor limit says.
pub(super) const MIN_CONNECTIONS: u64 = 16;
/// Largest derived cap: eviction scans the open connections, so the scan stays short.
pub(super) const MAX_DERIVED_CONNECTIONS: u64 = 65_536;
/// Shortest sweep period of the reaper, whatever the timeouts.
pub(super) const MIN_REAP_PERIOD: Duration = Duration::from_millis(10);
/// Pause after an accept error such as EMFILE, so the loop does not spin.
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// Reap periods without progress after which every answer of a connection
/// counts as stuck (for eviction and shutdown): one period is the clock's grain.
pub(super) const STALL_PERIODS: u32 = 2;
/// Generations (half a send timeout each) an answer may stay unwritten: it is
/// found three generations after its own, between 1 and 1.5 send timeouts.
pub(super) const OVERDUE_GENERATIONS: u64 = 3;
/// Slots of the ring of answers being written. The reaper reads the clock one
/// period late, so a writer may be one generation ahead of it: generations
/// g-2..g+1 are written to while g-3 is checked, five slots in all.
pub(super) const SENDING_SLOTS: usize = 5;
/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Concurrent streams per HTTP/2 connection: RFC 9113 advises no fewer than
/// 100 (hyper's default is 200). With the send timeout, it bounds what one
/// connection can hold: 100 answers at most, each for at most 1.5 send timeouts.
pub(super) const H2_MAX_STREAMS: u32 = 100;
/// HTTP/2 receive windows, per stream and per connection: the protocol's
/// initial 64 KiB (hyper's default is 1 MiB). No endpoint reads a request
/// body, so nothing more is worth buffering.
pub(super) const H2_RECEIVE_WINDOW: u32 = 65_535;
/// Data queued per HTTP/2 stream ahead of the client's window (hyper: 400 KiB).
pub(super) const H2_SEND_BUFFER: usize = 64 * 1024;
/// Streams a client may open and reset before they are accepted, before the
/// connection gets GOAWAY (h2's default; the "rapid reset" bound).
pub(super) const H2_PENDING_RESETS: usize = 20;
/// Streams we may reset for a client's protocol errors before GOAWAY (hyper's default).
pub(super) const H2_LOCAL_RESETS: usize = 1024;

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
pub(super) fn nofile_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which outlives the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}
