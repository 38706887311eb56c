//! The top-level sections (`[server]`, `[upstream]`, `[cache]` (its
//! `[cache.redis]` is in `redis_tier`), `[log]`, `[telemetry]`, `[credits]`, `[rate_limit]`,
//! `[visitors]`, `[cors]`), each a serde struct whose fields name their env var.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::RedisConfig;
use crate::{
    browser::AllowedHost,
    cache::FreshnessPolicy,
    caller::{ForwardedHeader, TrustedNet},
};

/// `[server]`: the listening socket and shutdown behaviour.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `KEYAPI_PROXY__SERVER__LISTEN`
    pub listen: SocketAddr,
    /// `KEYAPI_PROXY__SERVER__OPEN`: serve without `[[clients]]` on a non-loopback
    /// address (anyone who reaches the port spends credits); refused otherwise.
    pub open: bool,
    /// `KEYAPI_PROXY__SERVER__SHUTDOWN_GRACE`: drain time for in-flight requests
    /// (below Docker's 10 s stop timeout, so the final snapshot gets written).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// `KEYAPI_PROXY__SERVER__DRAIN_DELAY`: time between the stop signal and
    /// closing the listener, serving on while `/readyz` says 503, so load
    /// balancers stop sending new connections before they would be refused.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// `KEYAPI_PROXY__SERVER__HEADER_READ_TIMEOUT`: time a client has to send a request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// `KEYAPI_PROXY__SERVER__IDLE_TIMEOUT`: time a keep-alive connection may stay silent.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// `KEYAPI_PROXY__SERVER__SEND_TIMEOUT`: time an answer may take to be
    /// written; a connection whose client does not take it in time is closed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// `KEYAPI_PROXY__SERVER__HTTP2`: also serve cleartext HTTP/2 (h2c with prior
    /// knowledge); off, the port speaks HTTP/1.1 only.
    pub http2: bool,
    /// `KEYAPI_PROXY__SERVER__MAX_CONNECTIONS`: open connections at most; absent =
    /// derived from the descriptor limit (see `server::default_max_connections`).
    pub max_connections: Option<usize>,
    /// `KEYAPI_PROXY__SERVER__TRUSTED_PROXIES`, e.g. `["10.0.0.0/8"]`: peers
    /// whose `client_addr_header` is believed; empty = nobody's (the peer is the caller).
    #[serde(default)]
    pub trusted_proxies: Vec<TrustedNet>,
    /// `KEYAPI_PROXY__SERVER__CLIENT_ADDR_HEADER`: `x-forwarded-for` or
    /// `forwarded`, the one header trusted proxies report the caller in.
    #[serde(default)]
    pub client_addr_header: ForwardedHeader,
    /// `KEYAPI_PROXY__SERVER__ALLOWED_HOSTS`, e.g. `["proxy.example.com"]`
    /// (`["*"]`: any): other `Host`s get 421. Absent: loopback names when
    /// `listen` is loopback (against DNS rebinding), any host otherwise.
    pub allowed_hosts: Option<Vec<AllowedHost>>,
}

/// `[upstream]`: where KeyAPI is and how long we wait for it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `KEYAPI_PROXY__UPSTREAM__BASE_URL`: https, or http only to loopback.
    pub base_url: String,
    /// `KEYAPI_PROXY__UPSTREAM__CONNECT_TIMEOUT`
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `KEYAPI_PROXY__UPSTREAM__REQUEST_TIMEOUT`: bounds the whole call, body included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// `KEYAPI_PROXY__UPSTREAM__MAX_BODY_BYTES`: protects memory from a runaway answer.
    pub max_body_bytes: usize,
    /// `KEYAPI_PROXY__UPSTREAM__RETRIES`: extra attempts on connect errors and 502/503/504.
    pub retries: u32,
    /// `KEYAPI_PROXY__UPSTREAM__RETRY_BACKOFF`: base of the exponential backoff (full jitter).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// `KEYAPI_PROXY__UPSTREAM__MAX_IN_FLIGHT`: concurrent upstream calls at most.
    pub max_in_flight: usize,
    /// `KEYAPI_PROXY__UPSTREAM__MAX_CALLS_PER_MINUTE`: spend-rate cap; 0 = off.
    pub max_calls_per_minute: u32,
    /// `KEYAPI_PROXY__UPSTREAM__QUEUE_TIMEOUT`: how long a call may wait for the caps above.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// `KEYAPI_PROXY__UPSTREAM__BREAKER_FAILURES`: consecutive failures that open the circuit.
    pub breaker_failures: u32,
    /// `KEYAPI_PROXY__UPSTREAM__BREAKER_COOLDOWN`: how long the circuit stays open.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

/// `[cache]`: capacity and freshness of stored answers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `KEYAPI_PROXY__CACHE__MAX_BYTES`: bound on stored body bytes.
    pub max_bytes: u64,
    /// `KEYAPI_PROXY__CACHE__TTL`: default freshness lifetime.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// `KEYAPI_PROXY__CACHE__ALLOW_CLIENT_REFRESH`: honour `Cache-Control: no-cache`, and
    /// `max-age` / `min-fresh` refusing a fresh copy (both refetch, spending credits).
    pub allow_client_refresh: bool,
    /// `KEYAPI_PROXY__CACHE__STALE_WHILE_REVALIDATE`: after the TTL, serve stale and refresh in the background.
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// `KEYAPI_PROXY__CACHE__STALE_IF_ERROR`: after the TTL, serve stale when the upstream fails.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// `KEYAPI_PROXY__CACHE__NEGATIVE_TTL`: lifetime of cached deterministic refusals.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// `KEYAPI_PROXY__CACHE__NEGATIVE_CODES`: KeyAPI `code` values cached as refusals, e.g. `[10001]`.
    pub negative_codes: Vec<i64>,
    /// `KEYAPI_PROXY__CACHE__REFRESH_AHEAD`: fraction of the TTL after which a hit refreshes; 0 = off.
    pub refresh_ahead: f64,
    /// `KEYAPI_PROXY__CACHE__REFRESH_AHEAD_MIN_HITS`: hits an entry needs before refresh-ahead applies.
    pub refresh_ahead_min_hits: u32,
    /// `KEYAPI_PROXY__CACHE__SNAPSHOT_PATH`: file the in-memory cache is saved to and loaded from.
    #[serde(default)]
    pub snapshot_path: Option<PathBuf>,
    /// `KEYAPI_PROXY__CACHE__SNAPSHOT_INTERVAL`: how often the snapshot is rewritten while running.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// `[cache.redis]`: the shared second tier.
    pub redis: RedisConfig,
}

impl CacheConfig {
    /// The freshness rules every route starts from.
    pub fn freshness_policy(&self) -> FreshnessPolicy {
        FreshnessPolicy {
            stale_while_revalidate: self.stale_while_revalidate,
            stale_if_error: self.stale_if_error,
            negative_ttl: self.negative_ttl,
            negative_codes: self.negative_codes.clone(),
            refresh_ahead: (self.refresh_ahead > 0.0).then_some(self.refresh_ahead),
            refresh_ahead_min_hits: self.refresh_ahead_min_hits,
        }
    }
}

/// `[log]`: output format and filter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `KEYAPI_PROXY__LOG__FORMAT`: `pretty` or `json`.
    pub format: LogFormat,
    /// `KEYAPI_PROXY__LOG__LEVEL`: the filter, in `RUST_LOG`'s syntax (`info`,
    /// `warn,keyapi_proxy=debug`); unset, `RUST_LOG` decides (default `info`).
    /// Changes on a reload.
    pub level: Option<String>,
}

/// `[telemetry]`: OpenTelemetry traces over OTLP/HTTP; off while `otlp_endpoint` is unset.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `KEYAPI_PROXY__TELEMETRY__OTLP_ENDPOINT`: the collector's full traces URL
    /// (`http://collector:4318/v1/traces`), protobuf over HTTP. Unset: no spans at all.
    pub otlp_endpoint: Option<String>,
    /// `KEYAPI_PROXY__TELEMETRY__SAMPLE_RATIO`: share of new traces kept, 0 to 1; a trusted
    /// incoming `traceparent` decides for its own trace.
    pub sample_ratio: f64,
    /// `KEYAPI_PROXY__TELEMETRY__TRUST_TRACEPARENT`: a client's W3C `traceparent` becomes
    /// the parent of its request's span.
    pub trust_traceparent: bool,
    /// `KEYAPI_PROXY__TELEMETRY__PROPAGATE_UPSTREAM`: send a `traceparent` to KeyAPI (off:
    /// the upstream request stays a pure function of the normalized key).
    pub propagate_upstream: bool,
}

impl TelemetryConfig {
    /// Whether spans are made and exported at all.
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some()
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// `[credits]`: what KeyAPI charges, for metrics and budgets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsConfig {
    /// `KEYAPI_PROXY__CREDITS__PER_CALL`: credits one upstream call costs on
    /// a route that does not give its own `credits`.
    pub per_call: u64,
    /// `KEYAPI_PROXY__CREDITS__DAILY_BUDGET`: credits all upstream calls may
    /// spend per UTC day; 0 = no budget.
    pub daily_budget: u64,
    /// `KEYAPI_PROXY__CREDITS__OUTAGE_ALLOWANCE`: credits one replica may
    /// spend per budget and UTC day while the shared ledger (Redis) is
    /// unreachable; 0 = refuse upstream calls that a budget would pay for.
    pub outage_allowance: u64,
    /// `KEYAPI_PROXY__CREDITS__HISTORY_DAYS`: UTC days of spend history kept
    /// (`GET /admin/spend`), 1-3650.
    pub history_days: u64,
}

/// `[rate_limit]`: requests per minute over all callers together.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `KEYAPI_PROXY__RATE_LIMIT__PER_MINUTE`: 0 = no global limit.
    pub per_minute: u32,
    /// `KEYAPI_PROXY__RATE_LIMIT__BURST`: requests allowed at once; 0 = `per_minute`.
    pub burst: u32,
}

/// `[visitors]`: limits for each caller without a token (a visitor), known
/// by its address cut to a prefix. Every limit 0 = visitors share only the
/// global limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VisitorsConfig {
    /// `KEYAPI_PROXY__VISITORS__ALLOW`: with `[[clients]]`, let callers
    /// without a token in as visitors (mixed mode) instead of 401.
    pub allow: bool,
    /// `KEYAPI_PROXY__VISITORS__IPV4_PREFIX`: leading bits of an IPv4 address naming a visitor.
    pub ipv4_prefix: u8,
    /// `KEYAPI_PROXY__VISITORS__IPV6_PREFIX`: leading bits of an IPv6 address
    /// naming a visitor (64: one host cannot rotate through its /64).
    pub ipv6_prefix: u8,
    /// `KEYAPI_PROXY__VISITORS__RATE_PER_MINUTE`: each visitor's requests per minute; 0 = no limit.
    pub rate_per_minute: u32,
    /// `KEYAPI_PROXY__VISITORS__BURST`: each visitor's requests at once; 0 = `rate_per_minute`.
    pub burst: u32,
    /// `KEYAPI_PROXY__VISITORS__DAILY_BUDGET`: credits each visitor's misses
    /// may spend per UTC day; 0 = no budget of its own.
    pub daily_budget: u64,
    /// `KEYAPI_PROXY__VISITORS__MAX_TRACKED`: visitors whose limits this
    /// replica keeps in memory; when full, those not seen lately are forgotten first.
    pub max_tracked: usize,
}

/// `[cors]`: which browser origins may call the proxy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// `KEYAPI_PROXY__CORS__ALLOWED_ORIGINS`, e.g. `["https://app.example.com"]`;
    /// empty = no CORS headers at all.
    pub allowed_origins: Vec<String>,
    /// `KEYAPI_PROXY__CORS__MAX_AGE`: how long browsers may cache a preflight answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}
