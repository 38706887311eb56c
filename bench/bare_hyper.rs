//! Benchmark reference: the machine's limit for answering like a proxy hit.
//!
//! hyper 1.x over `hyper-util`'s tokio glue on a current-thread runtime, HTTP/1
//! only, no router, no middleware: every request on any path gets the stored
//! sample body (`src/demo/hashtag-detail-ufc324.json`) with the same header
//! names and value lengths as a proxy hit, all built once. `bench/run.sh` and
//! `bench/profile.sh` measure the proxy against it (issue 14: a hit within
//! 10% of this).
//!
//! Usage: `bench-bare-hyper [ADDR]` (default `127.0.0.1:0`); prints
//! `http://ADDR` on stdout once listening.

use std::{convert::Infallible, io::Write as _, net::SocketAddr, process::ExitCode};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

static BODY: &[u8] = include_bytes!("../src/demo/hashtag-detail-ufc324.json");

/// The headers of a proxy hit one hour after storage (same names, same lengths).
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
        HeaderValue::from_static("max-age=3600, stale-while-revalidate=600, stale-if-error=86400"),
    ),
    (
        HeaderName::from_static("x-request-id"),
        HeaderValue::from_static("00000000-0000-4000-8000-000000000000"),
    ),
];

async fn answer(_request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Sized once: the least a server can allocate for a response's headers.
    let mut headers = hyper::HeaderMap::with_capacity(HEADERS.len());
    for (name, value) in HEADERS {
        headers.insert(name, value);
    }
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    *response.headers_mut() = headers;
    Ok(response)
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench-bare-hyper: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve())
}

async fn serve() -> ExitCode {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:0".into());
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("bench-bare-hyper: bad address {addr:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("bench-bare-hyper: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(local) => println!("http://{local}"),
        Err(e) => {
            eprintln!("bench-bare-hyper: {e}");
            return ExitCode::FAILURE;
        }
    }
    let _ = std::io::stdout().flush();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors and the like: keep serving the others.
            Err(e) => {
                eprintln!("bench-bare-hyper: accept: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
