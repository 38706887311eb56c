//! `[cache.redis]`: where the shared Redis tier is (one server, Sentinels or
//! a Cluster: exactly one) and its names and time limits. URLs and passwords
//! are [`Redacted`]: printed nowhere.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::{
    cache::redis::TierSettings,
    redis_conn::{Settings, Target},
};

/// `[cache.redis]`: a Redis (or Valkey) tier shared by several replicas:
/// exactly one of `url`, `sentinels` (with `master_name`) or `cluster_nodes`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `KEYAPI_PROXY__CACHE__REDIS__URL`, e.g. `redis://127.0.0.1:6379` or
    /// `rediss://:password@host:6380`: one server (empty: unset). Never printed.
    #[serde(default)]
    pub url: Option<RedisUrl>,
    /// `KEYAPI_PROXY__CACHE__REDIS__SENTINELS`, e.g. `["redis://sentinel-a:26379"]`:
    /// the primary is whichever these name `master_name`. Never printed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sentinels: Vec<RedisUrl>,
    /// `KEYAPI_PROXY__CACHE__REDIS__MASTER_NAME`: the name the sentinels monitor.
    #[serde(default)]
    pub master_name: Option<String>,
    /// `KEYAPI_PROXY__CACHE__REDIS__MASTER_USERNAME`: ACL user on the primary (Sentinel mode).
    #[serde(default)]
    pub master_username: Option<String>,
    /// `KEYAPI_PROXY__CACHE__REDIS__MASTER_PASSWORD`: password of the primary
    /// (Sentinel mode; the sentinels' own goes in their URLs). Never printed.
    #[serde(default)]
    pub master_password: Option<Redacted>,
    /// `KEYAPI_PROXY__CACHE__REDIS__CLUSTER_NODES`, e.g. `["redis://node-a:6379"]`:
    /// seed nodes of a Redis Cluster. Never printed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_nodes: Vec<RedisUrl>,
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
    #[serde(default, with = "humantime_serde")]
    pub lock_ttl: Option<Duration>,
    /// `KEYAPI_PROXY__CACHE__REDIS__LOCK_WAIT`: how long to wait for another
    /// replica's fetch before fetching anyway. Absent: `lock_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub lock_wait: Option<Duration>,
}

/// A configured secret (a Redis URL may carry a password). It prints as
/// `[redacted]` everywhere (`Debug`, `check-config`); only the Redis client sees it.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct Redacted(SecretString);

/// A Redis URL (see [`Redacted`]).
pub type RedisUrl = Redacted;

impl Redacted {
    /// The secret itself, for the Redis client only.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl From<String> for Redacted {
    fn from(url: String) -> Self {
        Self(SecretString::from(url))
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Redacted {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

impl RedisConfig {
    /// Where Redis is, or `None` when the tier is off; one line saying why
    /// when the keys name no single mode (or a mode's URL does not parse).
    pub fn target(&self) -> Result<Option<Target>, ConfigError> {
        let invalid = |msg: &str| Err(ConfigError::Invalid(msg.to_owned()));
        let secret = |url: &RedisUrl| SecretString::from(url.expose());
        let sentinel_keys = self.master_name.is_some()
            || self.master_username.is_some()
            || self.master_password.is_some();
        // Empty counts as unset, so an overlay can switch an inherited `url` off.
        let url = self.url.as_ref().filter(|url| !url.expose().is_empty());
        let target = match (url, &self.sentinels[..], &self.cluster_nodes[..]) {
            (None, [], [])
                if sentinel_keys || self.lock_ttl.is_some() || self.lock_wait.is_some() =>
            {
                return invalid(
                    "cache.redis: other keys are set but no Redis is: set url, sentinels (with master_name) or cluster_nodes",
                );
            }
            (None, [], []) => return Ok(None),
            (Some(url), [], []) if !sentinel_keys => Target::Server(secret(url)),
            (None, sentinels @ [_, ..], []) => Target::Sentinel {
                sentinels: sentinels.iter().map(secret).collect(),
                master_name: match &self.master_name {
                    Some(name) if !name.is_empty() => name.clone(),
                    _ => {
                        return invalid(
                            "cache.redis.sentinels needs cache.redis.master_name (the name the sentinels monitor)",
                        );
                    }
                },
                master_username: self.master_username.clone(),
                master_password: self.master_password.as_ref().map(secret),
            },
            (None, [], nodes @ [_, ..]) if !sentinel_keys => {
                Target::Cluster(nodes.iter().map(secret).collect())
            }
            (_, [], []) | (None, [], _) => {
                return invalid(
                    "cache.redis.master_name, master_username and master_password apply only with cache.redis.sentinels",
                );
            }
            _ => {
                return invalid(
                    "cache.redis: set exactly one of url, sentinels (with master_name) or cluster_nodes",
                );
            }
        };
        // Parse only: the URLs may hold passwords, so they are never echoed.
        target
            .check()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(Some(target))
    }

    /// Names and time limits of every Redis call.
    pub fn settings(&self) -> Settings {
        Settings {
            prefix: self.prefix.clone(),
            op_timeout: self.op_timeout,
            ledger_timeout: self.ledger_timeout,
        }
    }

    /// What the Redis tier needs, with lock times derived from `worst_fetch`.
    pub fn tier_settings(&self, worst_fetch: Duration) -> TierSettings {
        let (lock_ttl, lock_wait) = self.lock_times(worst_fetch);
        TierSettings {
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
