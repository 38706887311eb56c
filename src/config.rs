//! Configuration: the compiled-in `config/default.toml`, then an optional `--config`
//! file, then `KEYAPI_PROXY__<SECTION>__<KEY>` environment variables, merged by
//! `figment` into one typed tree that is validated once at start-up.
//!
//! The KeyAPI key is deliberately *not* part of this tree: it comes only from
//! `KEYAPI_API_KEY` / `KEYAPI_API_KEY_FILE` and lives in a [`SecretString`], so
//! printing or logging a [`Config`] can never reveal it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::{
    browser::AllowedHost,
    cache::{FreshnessPolicy, redis::TierSettings},
    caller::{ForwardedHeader, TrustedNet},
};

/// The documented defaults, compiled in so the binary runs without any file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "KEYAPI_PROXY__";
/// Shortest `cache.snapshot_interval` accepted (zero would spin the saver).
pub const MIN_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);
/// Environment variable holding the KeyAPI key itself.
pub const API_KEY_ENV: &str = "KEYAPI_API_KEY";
/// Environment variable naming a file that holds the KeyAPI key (Docker secret).
pub const API_KEY_FILE_ENV: &str = "KEYAPI_API_KEY_FILE";

/// Why configuration could not be loaded. Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("no KeyAPI key: set {API_KEY_ENV} or {API_KEY_FILE_ENV} (or run with --demo)")]
    MissingApiKey,
    #[error("both {API_KEY_ENV} and {API_KEY_FILE_ENV} are set; set only one")]
    AmbiguousApiKey,
    #[error("cannot read the KeyAPI key from {API_KEY_FILE_ENV}={path}: {source}")]
    ApiKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the KeyAPI key (from {0}) is empty or contains characters not allowed in an HTTP header"
    )]
    BadApiKey(&'static str),
}

/// The whole configuration tree. Every field is documented in `config/default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub credits: CreditsConfig,
    pub rate_limit: RateLimitConfig,
    pub visitors: VisitorsConfig,
    pub cors: CorsConfig,
    /// `[[clients]]`, or `KEYAPI_PROXY__CLIENTS` as inline TOML. Empty: the proxy is
    /// open to anyone who can reach it (refused off loopback unless `server.open`).
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// `[[issuers]]`, or `KEYAPI_PROXY__ISSUERS` as inline TOML: who may mint
    /// signed visitor tokens (JWTs). Empty: a bearer token is a client token only.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// `[[routes]]` (file only): the proxied KeyAPI endpoints. A file that
    /// gives any replaces the compiled-in hashtag-detail route.
    pub routes: Vec<RouteConfig>,
    /// `[[warmup]]` (file only): questions answered before anyone asks.
    #[serde(default)]
    pub warmup: Vec<WarmupConfig>,
}

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// `[cache.redis]`: a Redis (or Valkey) tier shared by several replicas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `KEYAPI_PROXY__CACHE__REDIS__URL`, e.g. `redis://127.0.0.1:6379` or
    /// `rediss://:password@host:6380`; absent = off. Never printed.
    #[serde(default)]
    pub url: Option<RedisUrl>,
    /// `KEYAPI_PROXY__CACHE__REDIS__PREFIX`: namespace and format version of our keys.
    pub prefix: String,
    /// `KEYAPI_PROXY__CACHE__REDIS__OP_TIMEOUT`: after this, a Redis call counts as failed.
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
    /// `KEYAPI_PROXY__CACHE__REDIS__LEDGER_TIMEOUT`: how long a money
    /// operation (a budget charge or refund) may take before its outcome is
    /// resolved by its id and the replica falls back to its outage allowance.
    #[serde(with = "humantime_serde")]
    pub ledger_timeout: Duration,
    /// `KEYAPI_PROXY__CACHE__REDIS__LOCK_TTL`: expiry of a fetch lock (a
    /// crashed holder blocks no longer). Absent: the worst-case fetch time + 5 s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub lock_ttl: Option<Duration>,
    /// `KEYAPI_PROXY__CACHE__REDIS__LOCK_WAIT`: how long to wait for another
    /// replica's fetch before fetching anyway. Absent: `lock_ttl`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub lock_wait: Option<Duration>,
}

/// A Redis URL. It may carry a password, so it prints as `[redacted]`
/// everywhere (`Debug`, `check-config`); only the Redis client sees it.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct RedisUrl(SecretString);

impl RedisUrl {
    /// The URL itself, for the Redis client only.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl From<String> for RedisUrl {
    fn from(url: String) -> Self {
        Self(SecretString::from(url))
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
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

impl RedisConfig {
    /// What the Redis tier needs, with lock times derived from `worst_fetch`.
    pub fn tier_settings(&self, worst_fetch: Duration) -> TierSettings {
        let (lock_ttl, lock_wait) = self.lock_times(worst_fetch);
        TierSettings {
            prefix: self.prefix.clone(),
            op_timeout: self.op_timeout,
            ledger_timeout: self.ledger_timeout,
            lock_ttl,
            lock_wait,
        }
    }

    /// `(lock_ttl, lock_wait)`, derived from `worst_fetch` where not set.
    pub fn lock_times(&self, worst_fetch: Duration) -> (Duration, Duration) {
        let ttl = self
            .lock_ttl
            .unwrap_or(worst_fetch + Duration::from_secs(5));
        (ttl, self.lock_wait.unwrap_or(ttl))
    }
}

/// `[log]`: output format; the filter comes from `RUST_LOG`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `KEYAPI_PROXY__LOG__FORMAT`: `pretty` or `json`.
    pub format: LogFormat,
}

/// `[telemetry]`: OpenTelemetry traces over OTLP/HTTP; off while `otlp_endpoint` is unset.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `KEYAPI_PROXY__TELEMETRY__OTLP_ENDPOINT`: the collector's full traces URL
    /// (`http://collector:4318/v1/traces`), protobuf over HTTP. Unset: no spans at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// `KEYAPI_PROXY__CREDITS__PER_CALL`: credits one upstream call costs.
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

/// One `[[clients]]` entry: a caller allowed to use the proxy. The token itself
/// is never configured, only its SHA-256 (`keyapi-proxy hash-token` makes both).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Shown in logs, metrics (`client` label) and `/stats`: 1-64 of `[A-Za-z0-9._-]`.
    pub id: String,
    /// Lower-case hex SHA-256 of the client's token (64 digits).
    pub token_sha256: String,
    /// May force a refetch with `Cache-Control: no-cache`, or `max-age` /
    /// `min-fresh` refusing a fresh copy (spends credits).
    #[serde(default)]
    pub refresh: bool,
    /// May use every `/admin` endpoint (cache, reload, spend); `purge` is
    /// accepted as its older name.
    #[serde(default, alias = "purge")]
    pub admin: bool,
    /// This client's requests per minute (absent or 0 = no client limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
    /// This client's burst (absent or 0 = `rate_per_minute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Credits this client's misses may spend per UTC day (absent or 0 = no budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget: Option<u64>,
}

/// One `[[issuers]]` entry: a site backend or identity provider whose signed
/// tokens (`Authorization: Bearer <jwt>`) let its visitors in, each subject
/// (`sub`) with its own limits. Exactly one of `jwks_url` and
/// `hs256_secret_file` names the key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Shown in logs, metrics (`issuer` label) and ledger names: 1-64 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// The `iss` claim its tokens carry, exactly.
    pub issuer: String,
    /// A value its tokens' `aud` claim must hold (this proxy's name at the issuer).
    pub audience: String,
    /// Where its public keys are (a JWKS: RS256, ES256, EdDSA); `https://`, or
    /// `http://` to a loopback host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// A file holding its HS256 secret (at least 32 bytes; a final newline is
    /// ignored), read once at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_file: Option<PathBuf>,
    /// Each subject's requests per minute (absent or 0 = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
    /// Each subject's burst (absent or 0 = `rate_per_minute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Credits each subject's misses may spend per UTC day (absent or 0 = no budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget: Option<u64>,
    /// Subjects whose limits this replica keeps in memory; when full, those
    /// not seen again lately are forgotten first.
    #[serde(default = "default_max_subjects")]
    pub max_subjects: usize,
}

/// Largest `max_subjects`: its memory is sized at start-up.
const MAX_SUBJECTS: usize = 10_000_000;

/// `max_subjects` when absent: a few tens of megabytes at most.
fn default_max_subjects() -> usize {
    100_000
}

/// One `[[routes]]` entry as written in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path, identical on the proxy and on KeyAPI, e.g. `/v1/tiktok/trending/hashtag/detail`.
    pub path: String,
    /// KeyAPI's price per call; absent: `credits.per_call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<u64>,
    /// Freshness lifetime; absent: `cache.ttl`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// TTL by the value of one parameter, e.g. `{ param = "period", values = { "365" = "12h" } }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_by: Option<TtlByConfig>,
    /// `daily`: fresh until the next 00:00 UTC + `daily_offset` (capped by the TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<String>,
    /// With `freshness = "daily"`: how long after 00:00 UTC the day's data is complete.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub daily_offset: Option<Duration>,
    /// Absent: `cache.stale_while_revalidate`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stale_while_revalidate: Option<Duration>,
    /// Absent: `cache.stale_if_error`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stale_if_error: Option<Duration>,
    /// Absent: `cache.negative_ttl`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub negative_ttl: Option<Duration>,
    /// The query parameters, in the order the upstream query is built.
    #[serde(default)]
    pub params: Vec<ParamConfig>,
}

/// `ttl_by`: a TTL per value of one parameter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TtlByConfig {
    pub param: String,
    pub values: BTreeMap<String, humantime_serde::Serde<Duration>>,
}

/// One `[[routes.params]]` entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParamConfig {
    pub name: String,
    /// `one_of`, `int`, `region`, `hashtag` or `text`; absent: `one_of` when
    /// `one_of` is given, else `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A request without it is a 400 "is required" (then it has no `default`).
    #[serde(default)]
    pub required: bool,
    /// Normalized like a value; used when the parameter is absent (and, for
    /// `one_of`, `int` and `region`, when it is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// A value shown in the "is required" message; absent: the default or the first allowed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// `text`: a regular expression the whole (normalized) value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `text`: longest value in characters (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// `text`: lower-case the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowercase: Option<bool>,
    /// `text`: drop this prefix once (e.g. `@`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<String>,
}

/// One `[[warmup]]` entry as written in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// Shown in `/stats` and on the ledger as `warmup:<name>`; default: the route's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The route's path, as in `[[routes]]`.
    pub route: String,
    /// Run at this interval (the first run shortly after start-up).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub every: Option<Duration>,
    /// Or run daily at this UTC time, `HH:MM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// This warm-up's own credits per UTC day (the global budget applies too).
    pub max_credits_per_day: u64,
    /// With `every`: the first run, this long after start-up (default 1 s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub start_delay: Option<Duration>,
    /// Pause between two calls of a run (default 1 s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub pace: Option<Duration>,
    /// Parameter → value, or → a list of values (every combination is asked).
    #[serde(default)]
    pub questions: Vec<BTreeMap<String, QuestionValue>>,
    /// A CSV file: a header of parameter names, then one question per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub questions_file: Option<PathBuf>,
}

/// A parameter's value in `[[warmup.questions]]`: text, a number, or a list.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum QuestionValue {
    Text(String),
    Number(i64),
    List(Vec<QuestionValue>),
}

impl Config {
    /// Only the compiled-in defaults: what tests start from.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::extract(Figment::from(Toml::string(DEFAULT_TOML)))
    }

    /// Defaults → optional file → `KEYAPI_PROXY__*` environment, then validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.to_owned()));
            }
            figment = figment.merge(Toml::file(path));
        }
        Self::extract(figment.merge(Env::prefixed(ENV_PREFIX).split("__")))
    }

    fn extract(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// The longest one fetch can take: waiting for upstream protection, then
    /// every attempt (retries share `request_timeout`).
    pub fn worst_fetch(&self) -> Duration {
        self.upstream.queue_timeout + self.upstream.request_timeout
    }

    /// Checks the rules that serde types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        validate_url("upstream.base_url", &self.upstream.base_url)?;
        validate_telemetry(&self.telemetry)?;
        let listen = self.server.listen;
        if self.clients.is_empty() && !self.server.open && !listen.ip().is_loopback() {
            return invalid(format!(
                "server.listen {listen} is not loopback and no [[clients]] are configured: \
                 add a [[clients]] entry (see `keyapi-proxy hash-token`), or set \
                 server.open = true (KEYAPI_PROXY__SERVER__OPEN=true) to let anyone who \
                 reaches the port spend your credits"
            ));
        }
        if self.upstream.max_body_bytes == 0 || self.upstream.max_body_bytes > u32::MAX as usize {
            return invalid("upstream.max_body_bytes must be between 1 and 4294967295".into());
        }
        if self.upstream.request_timeout.is_zero() || self.upstream.connect_timeout.is_zero() {
            return invalid("upstream timeouts must be greater than zero".into());
        }
        if self.cache.snapshot_interval < MIN_SNAPSHOT_INTERVAL {
            return invalid(format!(
                "cache.snapshot_interval must be at least {}s: each snapshot rewrites the whole cache",
                MIN_SNAPSHOT_INTERVAL.as_secs()
            ));
        }
        if self.server.header_read_timeout.is_zero()
            || self.server.idle_timeout.is_zero()
            || self.server.send_timeout.is_zero()
        {
            return invalid(
                "server.header_read_timeout, server.idle_timeout and server.send_timeout \
                 must be greater than zero"
                    .into(),
            );
        }
        if self.server.max_connections == Some(0) {
            return invalid("server.max_connections must be at least 1 (or absent: derived from the descriptor limit)".into());
        }
        if self.upstream.max_in_flight == 0 || self.upstream.breaker_failures == 0 {
            return invalid(
                "upstream.max_in_flight and upstream.breaker_failures must be at least 1".into(),
            );
        }
        if self.cache.redis.op_timeout.is_zero() || self.cache.redis.ledger_timeout.is_zero() {
            return invalid(
                "cache.redis.op_timeout and cache.redis.ledger_timeout must be greater than zero"
                    .into(),
            );
        }
        if let Some(url) = &self.cache.redis.url {
            // Parse only: the URL may hold a password, so it is never echoed.
            if redis::Client::open(url.expose()).is_err() {
                return invalid("cache.redis.url is not a valid redis:// or rediss:// URL".into());
            }
        }
        let worst_fetch = self.worst_fetch();
        let (lock_ttl, lock_wait) = self.cache.redis.lock_times(worst_fetch);
        if self.cache.redis.url.is_some() && lock_ttl.min(lock_wait) <= worst_fetch {
            return invalid(format!(
                "cache.redis.lock_ttl and lock_wait must be longer than the worst-case fetch \
                 (upstream.queue_timeout + upstream.request_timeout = {}), so that no replica \
                 pays again for a question another one is still fetching",
                humantime_serde::re::humantime::format_duration(worst_fetch)
            ));
        }
        if !(0.0..1.0).contains(&self.cache.refresh_ahead) {
            return invalid("cache.refresh_ahead must be 0 (off) or a fraction below 1".into());
        }
        if self.credits.per_call == 0 {
            return invalid("credits.per_call must be at least 1".into());
        }
        if !(1..=crate::spend::MAX_HISTORY_DAYS).contains(&self.credits.history_days) {
            return invalid(format!(
                "credits.history_days must be between 1 and {}",
                crate::spend::MAX_HISTORY_DAYS
            ));
        }
        for origin in &self.cors.allowed_origins {
            let url = reqwest::Url::parse(origin).ok();
            let exact = url.as_ref().is_some_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.origin().ascii_serialization() == *origin
            });
            if !exact {
                return invalid(format!(
                    "cors.allowed_origins: {origin:?} is not an origin like \"https://app.example.com\" (scheme, host, optional port; no path, no `*`)"
                ));
            }
        }
        validate_clients(&self.clients)?;
        validate_visitors(&self.visitors)?;
        validate_issuers(&self.issuers)
    }
}

/// Client ids become metric labels and log fields; hashes must be usable.
fn validate_telemetry(telemetry: &TelemetryConfig) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&telemetry.sample_ratio) {
        return Err(ConfigError::Invalid(format!(
            "telemetry.sample_ratio {} must be between 0 and 1",
            telemetry.sample_ratio
        )));
    }
    if let Some(endpoint) = &telemetry.otlp_endpoint {
        let parsed = url::Url::parse(endpoint).map_err(|e| {
            ConfigError::Invalid(format!("telemetry.otlp_endpoint {endpoint:?}: {e}"))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid(format!(
                "telemetry.otlp_endpoint {endpoint:?} must be an http:// or https:// URL"
            )));
        }
    }
    Ok(())
}

fn validate_clients(clients: &[ClientConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashSet::new();
    let mut hashes = std::collections::HashSet::new();
    for client in clients {
        let id = &client.id;
        if !is_label(id) {
            return Err(ConfigError::Invalid(format!(
                "clients: id {id:?} must be 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        if !ids.insert(id.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "clients: id {id:?} is used twice"
            )));
        }
        let Some(hash) = crate::digest::parse_sha256_hex(&client.token_sha256) else {
            return Err(ConfigError::Invalid(format!(
                "clients: token_sha256 of {id:?} must be 64 hex digits (run `keyapi-proxy hash-token`)"
            )));
        };
        if !hashes.insert(hash) {
            return Err(ConfigError::Invalid(format!(
                "clients: token_sha256 of {id:?} is used by another client"
            )));
        }
    }
    Ok(())
}

/// A name usable as a metric label and log field: 1-64 of `[A-Za-z0-9._-]`.
fn is_label(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Issuer names become metric labels and ledger names; each names one key.
fn validate_visitors(visitors: &VisitorsConfig) -> Result<(), ConfigError> {
    if !(1..=32).contains(&visitors.ipv4_prefix) || !(1..=128).contains(&visitors.ipv6_prefix) {
        return Err(ConfigError::Invalid(
            "visitors.ipv4_prefix must be 1-32 and visitors.ipv6_prefix 1-128".into(),
        ));
    }
    if !(1..=MAX_SUBJECTS).contains(&visitors.max_tracked) {
        return Err(ConfigError::Invalid(format!(
            "visitors.max_tracked must be between 1 and {MAX_SUBJECTS}"
        )));
    }
    Ok(())
}

fn validate_issuers(issuers: &[IssuerConfig]) -> Result<(), ConfigError> {
    let invalid = |msg: String| Err(ConfigError::Invalid(msg));
    let mut names = std::collections::HashSet::new();
    let mut iss = std::collections::HashSet::new();
    for issuer in issuers {
        let name = &issuer.name;
        if !is_label(name) {
            return invalid(format!(
                "issuers: name {name:?} must be 1-64 characters of [A-Za-z0-9._-]"
            ));
        }
        if !names.insert(name.as_str()) {
            return invalid(format!("issuers: name {name:?} is used twice"));
        }
        if issuer.issuer.is_empty() || issuer.audience.is_empty() {
            return invalid(format!(
                "issuers: {name:?} needs a non-empty issuer and audience"
            ));
        }
        // A token's `iss` picks the entry that verifies it.
        if !iss.insert(issuer.issuer.as_str()) {
            return invalid(format!(
                "issuers: issuer {:?} of {name:?} is used by another entry",
                issuer.issuer
            ));
        }
        match (&issuer.jwks_url, &issuer.hs256_secret_file) {
            (Some(url), None) => validate_url(&format!("issuers: jwks_url of {name:?}"), url)?,
            (None, Some(_)) => {}
            _ => {
                return invalid(format!(
                    "issuers: {name:?} needs exactly one of jwks_url and hs256_secret_file"
                ));
            }
        }
        if !(1..=MAX_SUBJECTS).contains(&issuer.max_subjects) {
            return invalid(format!(
                "issuers: max_subjects of {name:?} must be between 1 and {MAX_SUBJECTS}"
            ));
        }
    }
    Ok(())
}

/// `what` (a configured URL) is https, or plain http to a loopback host, and
/// carries no query, fragment or credentials. Plain http is only accepted to
/// loopback: anywhere else the KeyAPI key (or a JWKS) would cross the network
/// in clear text, open to reading (or forging).
fn validate_url(what: &str, raw: &str) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(raw)
        .map_err(|e| ConfigError::Invalid(format!("{what} {raw:?}: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(ConfigError::Invalid(format!(
                "{what} {raw:?}: plain http is only allowed to a loopback host; use https"
            )));
        }
        other => {
            return Err(ConfigError::Invalid(format!(
                "{what} {raw:?}: unsupported scheme {other:?}"
            )));
        }
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{what} {raw:?} must not carry a query, fragment or credentials"
        )));
    }
    Ok(())
}

/// Reads the KeyAPI key from `KEYAPI_API_KEY` or the file named by `KEYAPI_API_KEY_FILE`.
pub fn api_key_from_env() -> Result<SecretString, ConfigError> {
    let direct = std::env::var(API_KEY_ENV).ok().filter(|v| !v.is_empty());
    let file = api_key_file_from_env();
    match (direct, file) {
        (Some(_), Some(_)) => Err(ConfigError::AmbiguousApiKey),
        (None, None) => Err(ConfigError::MissingApiKey),
        (Some(key), None) => {
            let key = SecretString::from(key);
            match is_valid_api_key(&key) {
                true => Ok(key),
                false => Err(ConfigError::BadApiKey(API_KEY_ENV)),
            }
        }
        (None, Some(path)) => read_api_key_file(&path),
    }
}

/// The file `KEYAPI_API_KEY_FILE` names, if set (the key is read again from
/// it on every reload and when it changes: see [`crate::api_key`]).
pub fn api_key_file_from_env() -> Option<PathBuf> {
    std::env::var_os(API_KEY_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Reads and checks the KeyAPI key held in `path` (surrounding whitespace ignored).
pub fn read_api_key_file(path: &Path) -> Result<SecretString, ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::ApiKeyFile {
        path: path.to_owned(),
        source,
    })?;
    let key = SecretString::from(raw.trim());
    if !is_valid_api_key(&key) {
        return Err(ConfigError::BadApiKey(API_KEY_FILE_ENV));
    }
    Ok(key)
}

/// A key must be usable in `Authorization: Bearer <key>`: visible ASCII, no spaces.
pub fn is_valid_api_key(key: &SecretString) -> bool {
    let k = key.expose_secret();
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic())
}
