//! What the benchmark reference servers (`bare_hyper.rs`, `baseline.rs`)
//! share: the stored sample body, the headers of a hit, and the listener.

use std::{io::Write as _, net::SocketAddr};

use axum::http::{HeaderName, HeaderValue, header};
use tokio::net::TcpListener;

/// The body a proxy hit serves for the sample question.
pub(crate) static BODY: &[u8] = include_bytes!("../src/demo/hashtag-detail-ufc324.json");

/// The headers of a proxy hit one hour after storage (same names, same value
/// lengths; the `x-request-id` and `etag` are constants).
pub(crate) const HEADERS: [(HeaderName, HeaderValue); 7] = [
    (
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    ),
    (
        header::ETAG,
        HeaderValue::from_static("\"00000000000000000000000000000000\""),
    ),
    (header::VARY, HeaderValue::from_static("accept-encoding")),
    (
        HeaderName::from_static("cache-status"),
        HeaderValue::from_static("keyapi-proxy; hit; ttl=3599"),
    ),
    (header::AGE, HeaderValue::from_static("1")),
    (
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=3600, stale-while-revalidate=600, stale-if-error=86400"),
    ),
    (
        HeaderName::from_static("x-request-id"),
        HeaderValue::from_static("00000000-0000-4000-8000-000000000000"),
    ),
];

/// Listens on the address given as the first argument (default
/// `127.0.0.1:0`) and prints `http://ADDR` on stdout; `None`, after saying
/// why on stderr as `name`, when it cannot.
pub(crate) async fn listen(name: &str) -> Option<TcpListener> {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:0".into());
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("{name}: bad address {addr:?}: {e}");
            return None;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("{name}: cannot listen on {addr}: {e}");
            return None;
        }
    };
    match listener.local_addr() {
        Ok(local) => println!("http://{local}"),
        Err(e) => {
            eprintln!("{name}: {e}");
            return None;
        }
    }
    let _ = std::io::stdout().flush();
    Some(listener)
}
