//! The connection to Redis (or Valkey) behind everything replicas share: the
//! cache tier, its fetch locks, the ledger's budget counters, the spend
//! history, the rate limits and the warm-up leases. One type, [`RedisConn`], hides which of three
//! modes `[cache.redis]` chose:
//!
//! - **server**: one `url`;
//! - **sentinel**: the primary that a set of Sentinels names (`sentinels` +
//!   `master_name`), followed to the promoted replica after a failover;
//! - **cluster**: a Redis Cluster found from `cluster_nodes`, keys spread
//!   over its masters by hash slot (`MOVED`/`ASK` followed by the client).
//!
//! The `redis` crate speaks all three (its multiplexed connection, its
//! Sentinel client, its async cluster connection). What it does not do is
//! keep a Sentinel-found connection pointed at the current primary (its
//! `ConnectionManager` reconnects to one fixed address), nor drop a connection
//! whose replies stopped (a timeout never triggers its reconnect); `primary`
//! supervises that connection for the server and Sentinel modes.
//!
//! Redis is an optimisation, never a dependency: every call has a short
//! timeout, and a failure is reported as "no answer" so callers carry on with
//! memory and the upstream. Money operations ([`RedisConn::invoke_ledger`])
//! get a timeout of their own and tell "never sent" from "outcome unknown".
//!
//! # Key layout
//!
//! Every key starts with `prefix` (`keyapi-proxy:v1:` by default):
//!
//! | key | holds | written by |
//! |---|---|---|
//! | `<prefix>entry:<path?query>` | an encoded cache entry, TTL = its longest window | the cache tier |
//! | `<prefix>lock:<path?query>` | a fetch lock (owner token, `lock_ttl`) | the cache tier |
//! | `<prefix>lease:<warm-up>:<run>` | a warm-up run's lease | warm-up |
//! | `<prefix>rate:<name>` | a GCRA limit's next allowed time | rate limits |
//! | `<prefix>{ledger}:count:<budget>:<day>` | a budget's credits of one UTC day | the ledger |
//! | `<prefix>{ledger}:op:<id>` | what became of one money operation | the ledger |
//! | `<prefix>{ledger}:spend:<day>` | one UTC day's counts per payer (a hash) | the spend history |
//! | `<prefix>{ledger}:spendop:<id>` | a batch of counts already added | the spend history |
//! | `<prefix>purge` (channel) | purges published to every replica | the cache tier |
//!
//! Only the ledger's and the spend history's scripts touch several keys at
//! once (an operation's record and every budget it charges; a batch's record
//! and its days), so in cluster mode their keys carry the
//! hash tag `{ledger}`: one slot, never `CROSSSLOT`. In the other modes the
//! tag is left out, so an upgrade keeps the day's counters where they were.
//! Entries, locks, leases and limits are single-key operations and spread
//! over the slots. A `prefix` holding `{…}` would put every key in one slot.

mod cluster;
mod primary;
mod target;

pub use target::{Mode, Settings, Target, TargetError};

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{
    Cmd, FromRedisValue, RedisError, RedisFuture, ScriptInvocation, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster_async::ClusterConnection,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::time::Instant;
use tracing::{Instrument, field::Empty};

use crate::{metrics::Metrics, spans::TRACE_TARGET};

/// The ledger's hash tag in cluster mode (see the key layout above).
const LEDGER_TAG: &str = "{ledger}:";

/// What became of a money operation sent to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied<T> {
    /// Redis answered (the script ran).
    Answered(T),
    /// It never reached Redis (no connection): nothing changed.
    NotSent,
    /// No answer in time, or the connection broke after sending: Redis may
    /// have applied it or not; only the operation's own record can tell.
    Unknown,
}

impl<T> Applied<T> {
    /// The answer, if Redis gave one.
    pub fn answer(self) -> Option<T> {
        match self {
            Self::Answered(value) => Some(value),
            Self::NotSent | Self::Unknown => None,
        }
    }

    /// Maps the answer, keeping what is known about an unanswered operation.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Applied<U> {
        match self {
            Self::Answered(value) => Applied::Answered(f(value)),
            Self::NotSent => Applied::NotSent,
            Self::Unknown => Applied::Unknown,
        }
    }
}

/// One node as this replica last saw it (for readiness and `/stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// `host:port` (never credentials).
    pub addr: String,
    pub role: NodeRole,
    /// Whether it answered this replica's last probe.
    pub answers: bool,
}

/// A node's part in the deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// The one server, or the primary a Sentinel named.
    Primary,
    /// A Sentinel.
    Sentinel,
    /// A cluster master (it owns slots).
    Master,
    /// A cluster replica.
    Replica,
}

/// The mode and the nodes, as last probed.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub mode: Mode,
    /// Whether Redis answers (see [`RedisConn::is_up`]).
    pub up: bool,
    pub nodes: Vec<NodeStatus>,
}

/// Why a call got no answer; the metrics count these by [`Failure::kind`].
enum Failure {
    /// No connection to send it on (never sent).
    NotConnected,
    /// Our own time limit passed.
    TimedOut,
    /// The client or the server reported an error.
    Redis(RedisError),
}

impl Failure {
    /// A bounded label for `keyapi_proxy_redis_errors_total{kind}`.
    fn kind(&self) -> &'static str {
        use redis::{ErrorKind, ServerErrorKind};
        match self {
            Self::NotConnected => "not_connected",
            Self::TimedOut => "timeout",
            Self::Redis(e) if e.is_connection_refusal() => "refused",
            Self::Redis(e) if e.is_timeout() => "timeout",
            Self::Redis(e) if e.is_io_error() || e.is_connection_dropped() => "connection",
            Self::Redis(e) if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) => {
                "readonly"
            }
            Self::Redis(e)
                if e.is_cluster_error() || e.kind() == ErrorKind::ClusterConnectionNotFound =>
            {
                "cluster"
            }
            Self::Redis(e) if matches!(e.kind(), ErrorKind::Server(_)) => "server",
            Self::Redis(_) => "other",
        }
    }

    /// Whether the connection itself is in doubt (its supervisor should look):
    /// no answer, a broken connection, or a primary demoted to a replica.
    fn suspects_connection(&self) -> bool {
        match self {
            Self::NotConnected | Self::TimedOut => true,
            Self::Redis(e) => {
                e.is_io_error()
                    || e.is_unrecoverable_error()
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
            }
        }
    }
}

/// One call: a command or a script.
enum Request<'a> {
    Cmd(&'a Cmd),
    Script(&'a ScriptInvocation<'a>),
}

/// What a call is sent on: the supervised primary's connection or the cluster's.
#[derive(Clone)]
enum Handle {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::One(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::One(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The supervised connection of one mode.
enum Link {
    Primary(primary::Primary),
    Cluster(cluster::Cluster),
}

/// The Redis connection of this replica (see the module docs).
pub struct RedisConn {
    link: Link,
    mode: Mode,
    settings: Settings,
    up: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Shows the mode and state only: URLs may hold a password.
impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("mode", &self.mode)
            .field("prefix", &self.settings.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// Starts connecting in the background (never blocks on Redis); must run
    /// inside the Tokio runtime.
    pub fn new(
        target: &Target,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TargetError> {
        let link = match target {
            Target::Server(_) | Target::Sentinel { .. } => Link::Primary(primary::Primary::start(
                primary::Locator::new(target)?,
                &settings,
            )),
            Target::Cluster(nodes) => Link::Cluster(cluster::Cluster::start(nodes, &settings)?),
        };
        Ok(Self {
            link,
            mode: target.mode(),
            settings,
            up: AtomicBool::new(true),
            metrics,
        })
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the last call succeeded and, with one server or Sentinel, the
    /// supervisor's last probe found the primary: with no traffic, calls say
    /// nothing, so a primary that went away is known from the probes.
    pub fn is_up(&self) -> bool {
        let linked = match &self.link {
            Link::Primary(p) => p.connected(),
            Link::Cluster(_) => true,
        };
        linked && self.up.load(Ordering::Relaxed)
    }

    /// The mode and each node as last probed (no Redis call: for probes).
    pub fn status(&self) -> Status {
        let nodes = match &self.link {
            Link::Primary(p) => p.nodes(),
            Link::Cluster(c) => c.nodes(),
        };
        Status {
            mode: self.mode,
            up: self.is_up(),
            nodes,
        }
    }

    /// `<prefix><suffix>`: a key in our namespace.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.settings.prefix)
    }

    /// A ledger key: `<prefix>{ledger}:<suffix>` in cluster mode (one slot
    /// for every money script), `<prefix><suffix>` otherwise.
    pub fn ledger_key(&self, suffix: &str) -> String {
        let tag = if self.mode == Mode::Cluster {
            LEDGER_TAG
        } else {
            ""
        };
        format!("{}{tag}{suffix}", self.settings.prefix)
    }

    /// Sends `cmd` (named `op` in traces) under the op timeout; `None` on any failure.
    pub async fn query<T: FromRedisValue>(&self, op: &'static str, cmd: &Cmd) -> Option<T> {
        self.send(op, self.settings.op_timeout, Request::Cmd(cmd))
            .await
            .answer()
    }

    /// Runs a prepared Lua script (its keys namespaced) under the op
    /// timeout; `None` if Redis failed.
    pub async fn invoke<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Option<T> {
        self.send(
            "EVALSHA",
            self.settings.op_timeout,
            Request::Script(invocation),
        )
        .await
        .answer()
    }

    /// Runs one of the ledger's money scripts under the ledger timeout. The
    /// script must be idempotent: after [`Applied::Unknown`] the caller
    /// resolves the outcome by running it (or its undo) again with the same id.
    pub async fn invoke_ledger<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Applied<T> {
        self.send(
            "EVALSHA",
            self.settings.ledger_timeout,
            Request::Script(invocation),
        )
        .await
    }

    /// Sends `request` within `limit`, waiting for a connection being made
    /// (never longer than `limit` in all).
    async fn send<T: FromRedisValue>(
        &self,
        op: &'static str,
        limit: Duration,
        request: Request<'_>,
    ) -> Applied<T> {
        let started = Instant::now();
        let handle = match &self.link {
            Link::Primary(p) => p.connection(limit).await.map(Handle::One),
            Link::Cluster(c) => Some(Handle::Cluster(c.connection())),
        };
        let Some(mut handle) = handle else {
            return self.failed(op, Failure::NotConnected);
        };
        let limit = limit.saturating_sub(started.elapsed());
        match request {
            Request::Cmd(cmd) => {
                self.call_within(op, limit, cmd.query_async(&mut handle))
                    .await
            }
            Request::Script(invocation) => {
                self.call_within(op, limit, invocation.invoke_async(&mut handle))
                    .await
            }
        }
    }

    /// `SET key value NX PX ttl`: `Some(true)` if set, `Some(false)` if the
    /// key was there, `None` if Redis failed.
    pub async fn set_nx(&self, key: String, value: &str, ttl: Duration) -> Option<bool> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut set = redis::cmd("SET");
        set.arg(key).arg(value).arg("NX").arg("PX").arg(millis);
        let reply: Option<Option<String>> = self.query("SET", &set).await;
        reply.map(|taken| taken.is_some())
    }

    /// Takes the cluster-wide lease `name` (`<prefix>lease:<name>`) for `ttl`
    /// unless another replica holds it: `Some(true)` if taken, `Some(false)`
    /// if held, `None` if Redis failed. Never released early: a lease covers
    /// one scheduled run.
    pub async fn take_lease(&self, name: &str, ttl: Duration) -> Option<bool> {
        let token = uuid::Uuid::new_v4().to_string();
        self.set_nx(self.key(&format!("lease:{name}")), &token, ttl)
            .await
    }

    /// A client for a node that receives every message published (the
    /// primary; in a cluster, where `PUBLISH` reaches every node, any seed
    /// node, a different one each time).
    pub(crate) fn pubsub_client(&self) -> Option<redis::Client> {
        match &self.link {
            Link::Primary(p) => p.client(),
            Link::Cluster(c) => Some(c.next_seed()),
        }
    }

    /// Deletes every key matching `pattern` (SCAN + DEL in batches, on every
    /// master in a cluster); returns how many.
    pub async fn delete_matching(&self, pattern: &str) -> u64 {
        let nodes = match &self.link {
            Link::Primary(_) => vec![None],
            Link::Cluster(c) => c.masters().into_iter().map(Some).collect(),
        };
        let mut deleted = 0;
        for node in nodes {
            deleted += self.delete_matching_on(node, pattern).await;
        }
        deleted
    }

    async fn delete_matching_on(&self, node: Option<(String, u16)>, pattern: &str) -> u64 {
        let mut cursor = 0u64;
        let mut deleted = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500);
            let page = match &node {
                None => self.query::<(u64, Vec<String>)>("SCAN", &scan).await,
                Some(addr) => self.scan_on(addr, scan).await,
            };
            let Some((next, keys)) = page else {
                return deleted;
            };
            if !keys.is_empty() {
                let mut del = redis::cmd("DEL");
                del.arg(keys);
                deleted += self.query::<u64>("DEL", &del).await.unwrap_or(0);
            }
            if next == 0 {
                return deleted;
            }
            cursor = next;
        }
    }

    /// One SCAN page from the cluster node at `addr`.
    async fn scan_on(&self, addr: &(String, u16), scan: Cmd) -> Option<(u64, Vec<String>)> {
        let Link::Cluster(c) = &self.link else {
            return None;
        };
        let value = self
            .call_within("SCAN", self.settings.op_timeout, c.on_node(addr, scan))
            .await
            .answer()?;
        FromRedisValue::from_redis_value(value).ok()
    }

    /// Runs one call for at most `limit`, noting Redis's state; with tracing
    /// on, a span (the command's name, never its keys or values).
    async fn call_within<T>(
        &self,
        op: &'static str,
        limit: Duration,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Applied<T> {
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            "redis",
            otel.name = op,
            otel.kind = "client",
            db.system.name = "redis",
            db.operation.name = op,
            error.type = Empty,
        );
        let outcome = tokio::time::timeout(limit, fut)
            .instrument(span.clone())
            .await;
        let failure = match outcome {
            Ok(Ok(value)) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(mode = ?self.mode, "Redis available again");
                }
                return Applied::Answered(value);
            }
            Ok(Err(e)) => Failure::Redis(e),
            Err(_) => Failure::TimedOut,
        };
        span.record("error.type", failure.kind());
        self.failed(op, failure)
    }

    /// Books a failed call: metrics, state, a word to the supervisor; what
    /// is known of the command's fate.
    fn failed<T>(&self, op: &'static str, failure: Failure) -> Applied<T> {
        self.metrics.redis_error(failure.kind());
        if let (Link::Primary(p), true) = (&self.link, failure.suspects_connection()) {
            p.suspect();
        }
        let applied = match &failure {
            Failure::NotConnected => Applied::NotSent,
            // A cluster client may have sent it before a retry was refused.
            Failure::Redis(e) if e.is_connection_refusal() && self.mode != Mode::Cluster => {
                Applied::NotSent
            }
            _ => Applied::Unknown,
        };
        if self.up.swap(false, Ordering::Relaxed) {
            let error = match &failure {
                Failure::Redis(e) => e.to_string(),
                other => other.kind().to_owned(),
            };
            tracing::warn!(op, %error, mode = ?self.mode, "Redis unavailable; serving from memory and upstream");
        }
        applied
    }
}

/// Builds a client for one configured URL (parsing only).
fn open(url: &SecretString) -> Option<redis::Client> {
    redis::Client::open(url.expose_secret()).ok()
}

/// `host:port` of a client's node, for status (never its credentials).
fn addr_of(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}
