//! Benchmark reference: the machine's limit for answering like a proxy hit.
//!
//! hyper 1.x over `hyper-util`'s tokio glue on a current-thread runtime, HTTP/1
//! only, no router, no middleware: every request on any path gets the stored
//! sample body with the headers of a hit (`common.rs`), all built once.
//! `bench/run.sh` and `bench/profile.sh` measure the proxy against it
//! (issue 14: a hit within 10% of this).
//!
//! Usage: `bench-bare-hyper [ADDR] [COPIES]` (default `127.0.0.1:0`); prints
//! `http://ADDR` on stdout once listening, exits on SIGINT (so that a
//! profile-instrumented build writes its profile: `bench/pgo.sh`).
//!
//! With `COPIES`, it holds that many copies of the body, each in a buffer of
//! its own, and answers a request whose query ends in a number `n` (as
//! `hashtag_name=z123` does) with copy `n % COPIES`: the memory traffic of
//! serving that many distinct cached answers, still without a cache. The
//! Zipf scenario of `bench/run.sh` measures the proxy against both.

#[path = "common.rs"]
mod common;

use std::{convert::Infallible, process::ExitCode, sync::OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, Uri, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

/// The copies of the body, when `COPIES` was given (else empty).
static COPIES: OnceLock<Vec<Bytes>> = OnceLock::new();

/// The copy that a query ending in a number picks, if there are copies.
fn copy_for(uri: &Uri) -> Option<Bytes> {
    let copies = COPIES.get().filter(|c| !c.is_empty())?;
    let query = uri.query()?;
    let digits = &query[query.trim_end_matches(|c: char| c.is_ascii_digit()).len()..];
    let n: usize = digits.parse().ok()?;
    copies.get(n % copies.len()).cloned()
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Sized once: the least a server can allocate for a response's headers.
    let mut headers = hyper::HeaderMap::with_capacity(common::HEADERS.len());
    for (name, value) in common::HEADERS {
        headers.insert(name, value);
    }
    let body = copy_for(request.uri()).unwrap_or(Bytes::from_static(common::BODY));
    let mut response = Response::new(Full::new(body));
    *response.headers_mut() = headers;
    Ok(response)
}

fn main() -> ExitCode {
    let copies = match std::env::args().nth(2).map(|n| n.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("bench-bare-hyper: bad COPIES: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = COPIES.set(
        (0..copies)
            .map(|_| Bytes::copy_from_slice(common::BODY))
            .collect(),
    );
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
