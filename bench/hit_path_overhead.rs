//! Measures what auth + rate limits + metrics add to one cache hit, in
//! process and without HTTP noise: run with
//! `cargo run --release --example hit_path_overhead`.
//!
//! Each step is the exact call a proxied route (or the request middleware)
//! makes per request; the loop runs it many times and prints ns per request.

use futures_util::FutureExt as _;
use std::{hint::black_box, sync::Arc, time::Instant};

use axum::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use keyapi_proxy::{
    access::Access,
    clock::{SharedClock, SystemClock},
    config::ClientConfig,
    digest,
    limits::RateLimit,
    metrics::{Metrics, Scope},
    route::HASHTAG_DETAIL_PATH,
    served::{CacheState, Served},
    spend::SpendHistory,
};

const N: u32 = 2_000_000;

fn time(label: &str, mut step: impl FnMut()) -> f64 {
    for _ in 0..N / 10 {
        step();
    }
    let started = Instant::now();
    for _ in 0..N {
        step();
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(N);
    println!("{label:<48} {ns:>8.1} ns/request");
    ns
}

fn main() {
    let clock = SharedClock::new(Arc::new(SystemClock));
    let metrics = Metrics::new(clock.clone());
    let clients: Vec<ClientConfig> = (0..10)
        .map(|i| ClientConfig {
            id: format!("client-{i}"),
            token_sha256: digest::hex(&digest::sha256(format!("kp_token-{i}").as_bytes())),
            refresh: false,
            admin: false,
            rate_per_minute: Some(u32::MAX),
            burst: Some(1_000_000),
            daily_budget: None,
        })
        .collect();
    let spend = SpendHistory::new(90, clock.clone(), None);
    let access = Access::new(&clients, &metrics, &clock, None, &spend, None);
    let global = RateLimit::new(u32::MAX, 1_000_000, Scope::Global, &clock);
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer kp_token-7"));

    println!("{N} iterations per step, 10 configured clients\n");
    let auth = time("auth (SHA-256 + constant-time scan of 10)", || {
        black_box(access.authenticate(black_box(&headers)).ok());
    });
    let Ok(Some(client)) = access.authenticate(&headers) else {
        return;
    };
    let limits = time("rate limits (client + global, governor)", || {
        if let Some(limit) = &client.rate {
            // Unshared limits resolve at once: no runtime needed.
            black_box(limit.check().now_or_never());
        }
        if let Some(limit) = &global {
            black_box(limit.check().now_or_never());
        }
    });
    let counters = time("metrics (request counters, history, client)", || {
        metrics.record_request(
            HASHTAG_DETAIL_PATH,
            true,
            200,
            Some((Served::Cached(CacheState::Hit), 2)),
        );
        client.requests.inc();
    });
    println!(
        "\ntotal added to a hit: {:.1} ns ({:.2} µs)",
        auth + limits + counters,
        (auth + limits + counters) / 1000.0
    );
}
