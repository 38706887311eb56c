//! Benchmark baseline: the least a server can do to answer like a proxy hit
//! on the proxy's own stack.
//!
//! Serves the stored sample body on every path with the headers a hit
//! carries, all built once at start-up (`common.rs`), on the same axum/tokio
//! stack as the proxy. `bench/profile.sh` counts its instructions and
//! allocations per request next to the proxy's and bare hyper's: the
//! difference to the proxy is the cost of the proxy's per-hit work, the
//! difference to bare hyper the cost of axum.
//!
//! Usage: `bench-baseline [ADDR]` (default `127.0.0.1:0`); prints
//! `http://ADDR` on stdout once listening.

#[path = "common.rs"]
mod common;

use std::process::ExitCode;

use axum::{Router, body::Body, response::Response};
use bytes::Bytes;

async fn answer() -> Response {
    let mut response = Response::new(Body::from(Bytes::from_static(common::BODY)));
    let headers = response.headers_mut();
    for (name, value) in common::HEADERS {
        headers.insert(name, value);
    }
    response
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(listener) = common::listen("bench-baseline").await else {
        return ExitCode::FAILURE;
    };
    let app = Router::new().fallback(answer);
    match axum::serve(listener, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-baseline: {e}");
            ExitCode::FAILURE
        }
    }
}
