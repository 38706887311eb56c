//! Benchmark baseline: the least a server can do to answer like a proxy hit.
//!
//! Serves the stored sample body (`src/demo/hashtag-detail-ufc324.json`) on
//! every path with the headers a hit carries (`content-type`, `etag`, `vary`,
//! `cache-status`, `age`, `cache-control`, `x-request-id`), all built once at
//! start-up, on the same axum/tokio stack as the proxy. `bench/run.sh` compares the proxy's
//! hit path against it: the ratio is the cost of the proxy's per-hit work.
//!
//! Usage: `bench-baseline [ADDR]` (default `127.0.0.1:0`); prints
//! `http://ADDR` on stdout once listening.

use std::{io::Write as _, net::SocketAddr, process::ExitCode};

use axum::{
    Router,
    body::Body,
    http::{HeaderName, HeaderValue, header},
    response::Response,
};
use bytes::Bytes;
use tokio::net::TcpListener;

static BODY: &[u8] = include_bytes!("../src/demo/hashtag-detail-ufc324.json");

/// Same names and same value lengths as a proxy hit one hour after storage.
const HEADERS: [(HeaderName, HeaderValue); 7] = [
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
        HeaderValue::from_static("public, max-age=3599"),
    ),
    (
        HeaderName::from_static("x-request-id"),
        HeaderValue::from_static("00000000-0000-4000-8000-000000000000"),
    ),
];

async fn answer() -> Response {
    let mut response = Response::new(Body::from(Bytes::from_static(BODY)));
    let headers = response.headers_mut();
    for (name, value) in HEADERS {
        headers.insert(name, value);
    }
    response
}

#[tokio::main]
async fn main() -> ExitCode {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:0".into());
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("bench-baseline: bad address {addr:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("bench-baseline: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(local) => println!("http://{local}"),
        Err(e) => {
            eprintln!("bench-baseline: {e}");
            return ExitCode::FAILURE;
        }
    }
    let _ = std::io::stdout().flush();
    let app = Router::new().fallback(answer);
    match axum::serve(listener, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-baseline: {e}");
            ExitCode::FAILURE
        }
    }
}
