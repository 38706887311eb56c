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
//!
//! By idea: `limits` holds every bound, `conn` one connection's state and
//! clock, `socket` its watched I/O and protocol sniffing, `registry` the open
//! connections; this file accepts and serves them.

mod conn;
mod limits;
mod registry;
mod socket;

use std::{convert::Infallible, future::Future, io, net::SocketAddr, sync::Arc};

use axum::{http::Request, response::Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use self::{
    conn::{Conn, Cut, Signal, TrackedBody},
    limits::{
        ACCEPT_BACKOFF, H2_LOCAL_RESETS, H2_MAX_STREAMS, H2_PENDING_RESETS, H2_RECEIVE_WINDOW,
        H2_SEND_BUFFER,
    },
    registry::{Registered, Registry},
    socket::{Speaks, Watched},
};
use crate::metrics::ConnectionMetrics;

pub(crate) use limits::{Limits, MAX_HEADER_BYTES, default_max_connections};

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
