//! keyapi-proxy: a caching, single-flight proxy in front of KeyAPI's paid
//! TikTok hashtag-detail endpoint.
//!
//! One request, top to bottom: [`server`] (connections, their timeouts and
//! cap) → [`routes`] (HTTP) → [`access`] (who is
//! calling) → [`limits`] (rate limits; credit budgets for misses) → [`key`] (raw query →
//! normalized key, bad input stops here) → [`proxy`] → [`cache`] (a hit ends
//! here) → [`coalesce`] (one fetch per key) → [`upstream`] (KeyAPI, key
//! injected, gated by [`protect`] and its [`breaker`]) → [`cache`] →
//! [`negotiate`] (304 or gzip, from what the entry precomputed) with headers
//! from [`cache_status`]. Errors are rendered in one place, [`error`]. [`app`]
//! wires it together; [`config`] loads settings; [`observe`] logs and counts
//! every request into [`metrics`]; [`demo`] is a fake KeyAPI for `--demo` and
//! the tests.

pub mod access;
pub mod app;
pub mod breaker;
pub mod cache;
pub mod cache_status;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod cors;
pub mod demo;
pub mod digest;
pub mod error;
pub mod key;
pub mod limits;
pub mod metrics;
pub mod negotiate;
pub mod observe;
pub mod openapi;
pub mod protect;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod snapshot;
pub mod stats;
pub mod summary;
pub mod telemetry;
pub mod upstream;
