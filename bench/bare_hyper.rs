//! Benchmark reference: the machine's limit for answering like a proxy hit.
//!
//! hyper 1.x over `hyper-util`'s tokio glue on a current-thread runtime, HTTP/1
//! only, no router, no middleware: every request on any path gets the stored
//! sample body with the headers of a hit (`common.rs`), all built once.
//! `bench/run.sh` and `bench/profile.sh` measure the proxy against it
//! (issue 14: a hit within 10% of this).
//!
//! Usage: `bench-bare-hyper [ADDR]` (default `127.0.0.1:0`); prints
//! `http://ADDR` on stdout once listening, exits on SIGINT (so that a
//! profile-instrumented build writes its profile: `bench/pgo.sh`).

#[path = "common.rs"]
mod common;

use std::{convert::Infallible, process::ExitCode};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

async fn answer(_request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Sized once: the least a server can allocate for a response's headers.
    let mut headers = hyper::HeaderMap::with_capacity(common::HEADERS.len());
    for (name, value) in common::HEADERS {
        headers.insert(name, value);
    }
    let mut response = Response::new(Full::new(Bytes::from_static(common::BODY)));
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
    runtime.block_on(async {
        tokio::select! {
            code = serve() => code,
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        }
    })
}

async fn serve() -> ExitCode {
    let Some(listener) = common::listen("bench-bare-hyper").await else {
        return ExitCode::FAILURE;
    };
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
