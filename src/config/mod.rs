//! Configuration: the compiled-in `config/default.toml`, then an optional `--config`
//! file, then `KEYAPI_PROXY__<SECTION>__<KEY>` environment variables, merged by
//! `figment` into one typed tree, validated when loaded (and again by `App::build`, which
//! may be given a configuration made in code).
//!
//! The KeyAPI key is deliberately *not* part of this tree: it comes only from
//! `KEYAPI_API_KEY` / `KEYAPI_API_KEY_FILE` and lives in a [`secrecy::SecretString`], so
//! printing or logging a [`Config`] can never reveal it.
//!
//! By section: `sections` holds the top-level tables, `callers` clients and
//! issuers, `routes` routes and warm-ups; `validate` checks what serde cannot,
//! `key` reads the KeyAPI key and `error` says what went wrong.
//!
//! An optional value needs no serde attribute: absent, it reads as `None`,
//! and `check-config`'s TOML leaves a `None` out (TOML has no null). Only
//! durations name their format (`humantime_serde`, which then needs `default`).

mod callers;
mod error;
mod key;
mod redis_tier;
mod routes;
mod sections;
mod validate;

use std::{path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::{Deserialize, Serialize};

pub use callers::{ClientConfig, IssuerConfig};
pub use error::{API_KEY_ENV, API_KEY_FILE_ENV, ConfigError};
pub use key::{api_key_file_from_env, api_key_from_env, is_valid_api_key, read_api_key_file};
pub use redis_tier::{Redacted, RedisConfig, RedisUrl};
pub use routes::{
    ParamConfig, ParamKind, QuestionValue, RouteConfig, RouteFreshness, TtlByConfig, WarmupConfig,
};
pub use sections::{
    CacheConfig, CorsConfig, CreditsConfig, LogConfig, LogFormat, RateLimitConfig, ServerConfig,
    TelemetryConfig, UpstreamConfig, VisitorsConfig,
};

/// The documented defaults, compiled in so the binary runs without any file.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");
/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "KEYAPI_PROXY__";
/// Shortest `cache.snapshot_interval` accepted (zero would spin the saver).
pub const MIN_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

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
}
