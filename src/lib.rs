//! keyapi-proxy: a caching, single-flight proxy in front of KeyAPI's paid
//! endpoints (by default TikTok hashtag detail), one route per `[[routes]]` entry.
//!
//! One request, top to bottom: `server` (connections, their timeouts and
//! cap) → `observe` ([`caller`]: the caller's address) → [`routes`] (HTTP;
//! [`browser`]: allowed `Host`s, cross-site refusals) → [`access`] (which
//! client token) or [`issuers`] (a signed visitor token) or [`visitors`]
//! (no token: known by address), each a payer ([`payers`]) → [`limits`]
//! (request-rate limits) → [`route`] (the route table: parameter kinds,
//! compiled from config, raw query → normalized key; bad input stops here) → [`directives`] (the client's
//! `Cache-Control`) → [`proxy`] → [`cache`] (a hit ends here) → [`coalesce`] (one fetch per key) → [`ledger`] (each attempt charged
//! to whoever started the fetch, within its budgets) → [`upstream`] (KeyAPI,
//! key injected, gated by [`protect`] (our own refusals) and its `breaker`; bodies checked by
//! [`envelope`]) → [`cache`] →
//! `negotiate` (304 or gzip, from what the entry precomputed) with headers
//! from `cache_status`; [`served`] names how it was answered. Errors are
//! rendered in one place, `error`. [`app`] wires it together; [`config`]
//! loads settings; `observe` logs and counts every request into
//! [`metrics`] (and, with `[telemetry]`, makes it a trace span, marked by
//! `spans`' target, that `telemetry` exports); `status` gathers `/stats` and draws the status
//! page from them; [`demo`] is a fake KeyAPI for `--demo` and the tests.
//! Running for months: [`reload`] reads the configuration and the key again
//! (`SIGHUP`, `POST /admin/reload`; the words shared with handlers are in
//! [`live`]) and swaps in the next generation of the `state`; [`api_key`]
//! holds the KeyAPI key and its rotation; [`spend`] keeps credits spent and
//! saved per day and payer.
//!
//! A module too large for one file is a directory whose `mod.rs` keeps its
//! public surface and names its parts: `route`, `config`, `ledger`, `proxy`,
//! `server`, `metrics`, `status`, `cache`, `issuers`, `routes`.

pub mod access;
pub mod api_key;
pub mod app;
pub(crate) mod breaker;
pub mod browser;
pub mod cache;
pub(crate) mod cache_status;
pub mod caller;
pub mod cli;
pub mod clock;
pub mod coalesce;
pub mod config;
pub(crate) mod cors;
pub mod demo;
pub mod digest;
pub mod directives;
pub mod envelope;
pub(crate) mod error;
pub mod issuers;
pub mod ledger;
pub mod limits;
pub mod live;
pub mod metrics;
pub(crate) mod negotiate;
pub(crate) mod observe;
pub mod openapi;
pub mod payers;
pub mod protect;
pub mod proxy;
pub mod redis_conn;
pub mod reload;
pub(crate) mod request_id;
pub mod route;
pub mod routes;
pub mod served;
pub(crate) mod server;
pub(crate) mod shutdown;
pub(crate) mod snapshot;
pub(crate) mod spans;
pub mod spend;
pub mod state;
pub(crate) mod status;
pub(crate) mod telemetry;
pub mod upstream;
pub mod visitors;
pub mod warmup;
