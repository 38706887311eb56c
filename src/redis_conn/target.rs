//! Where Redis is ([`Target`], from `[cache.redis]`: one server, Sentinels or
//! a Cluster), which [`Mode`] that is, and the names and time limits
//! ([`Settings`]) every call shares.

use std::time::Duration;

use secrecy::SecretString;
use serde::Serialize;

use super::{cluster, primary};

/// Which kind of Redis deployment `[cache.redis]` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One server (`url`).
    Server,
    /// A primary found through Sentinels (`sentinels` + `master_name`).
    Sentinel,
    /// A Redis Cluster (`cluster_nodes`).
    Cluster,
}

/// Where Redis is, as configured (URLs may hold passwords: kept secret).
pub enum Target {
    /// One server.
    Server(SecretString),
    /// The primary the sentinels name `master_name`; `master_username` and
    /// `master_password` authenticate to it (and to replicas it becomes).
    Sentinel {
        sentinels: Vec<SecretString>,
        master_name: String,
        master_username: Option<String>,
        master_password: Option<SecretString>,
    },
    /// Seed nodes of a cluster (all with the same credentials).
    Cluster(Vec<SecretString>),
}

/// Why a [`Target`] cannot be used. Messages never contain a URL.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cache.redis.url is not a valid redis:// or rediss:// URL")]
    Url,
    #[error("cache.redis.sentinels[{0}] is not a valid redis:// or rediss:// URL")]
    Sentinel(usize),
    #[error(
        "cache.redis.cluster_nodes must be valid redis:// or rediss:// URLs with the same credentials"
    )]
    Cluster,
}

impl Target {
    /// The mode this target runs in.
    pub fn mode(&self) -> Mode {
        match self {
            Self::Server(_) => Mode::Server,
            Self::Sentinel { .. } => Mode::Sentinel,
            Self::Cluster(_) => Mode::Cluster,
        }
    }

    /// Parses every URL (connecting to nothing), for validation at start-up.
    pub fn check(&self) -> Result<(), TargetError> {
        match self {
            Self::Server(_) | Self::Sentinel { .. } => primary::Locator::new(self).map(drop),
            Self::Cluster(nodes) => cluster::client(nodes, &Settings::default()).map(drop),
        }
    }
}

/// Names and time limits shared by every use of the connection.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespace and format version of every key.
    pub prefix: String,
    /// Every call gets this long.
    pub op_timeout: Duration,
    /// The ledger's money operations get this long.
    pub ledger_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            op_timeout: Duration::from_millis(50),
            ledger_timeout: Duration::from_millis(500),
        }
    }
}

impl Settings {
    /// How long a connection attempt or a health probe may take: never
    /// shorter than a money operation (a slow Redis is not a dead one).
    pub(super) fn probe_timeout(&self) -> Duration {
        self.op_timeout
            .max(self.ledger_timeout)
            .max(Duration::from_secs(1))
    }
}
