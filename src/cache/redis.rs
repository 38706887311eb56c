//! The shared second tier: entries in Redis (or Valkey) so several replicas
//! pay for each question once, plus a cluster-wide fetch lock and leases.
//! The connection is shared with the ledger's budget counters and the rate
//! limits, whose scripts live with them ([`RedisTier::invoke`]).
//!
//! Keys: `<prefix>entry:<path?query>` holds an [`codec`]-encoded entry with a
//! Redis TTL equal to the end of its longest window; `<prefix>lock:<path?query>`
//! is the fetch lock, taken with `SET NX PX` and an owner token, and released
//! only by its owner (check-and-delete script). Waiters poll for the value up
//! to `lock_wait`, then fetch themselves — like nginx's `proxy_cache_lock_timeout`;
//! a crashed holder blocks a key no longer than `lock_ttl`.
//!
//! Redis is an optimisation, never a dependency: every call has a short
//! timeout, and any error or timeout is reported as "unavailable" so the
//! caller carries on with memory and the upstream. The connection manager
//! reconnects in the background (it never sends a command twice); state
//! changes are logged once. Money operations ([`RedisTier::invoke_ledger`])
//! get a timeout of their own and tell "never sent" from "outcome unknown":
//! a script whose reply is late may still have been applied.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use redis::{AsyncCommands, Client, Script, aio::ConnectionManager, aio::ConnectionManagerConfig};
use tokio::time::Instant;
use tracing::{Instrument, field::Empty};

use futures_util::StreamExt as _;

use super::{CacheKey, Entry, EntryCheck, LocalCache, Source, codec};
use crate::{metrics::Metrics, telemetry::TRACE_TARGET};

/// Deletes the lock only if we still own it.
const UNLOCK: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;
/// Poll interval while waiting for another replica's fetch.
const POLL: Duration = Duration::from_millis(20);

/// How the tier names its keys and how long it waits (from `[cache.redis]`).
#[derive(Debug, Clone)]
pub struct TierSettings {
    /// Namespace and format version of every key.
    pub prefix: String,
    /// Every Redis call gets this long.
    pub op_timeout: Duration,
    /// The ledger's money operations get this long.
    pub ledger_timeout: Duration,
    /// A fetch lock expires after this (a crashed holder blocks no longer).
    pub lock_ttl: Duration,
    /// How long other replicas wait for the lock holder's answer.
    pub lock_wait: Duration,
}

/// Proof of holding a key's fetch lock.
#[derive(Debug)]
pub struct LockToken(String);

/// What waiting for a key produced.
#[derive(Debug)]
pub enum Claim {
    /// Another replica stored a usable entry.
    Filled(Box<Entry>),
    /// We hold the lock: fetch, store, then [`RedisTier::unlock`].
    Locked(LockToken),
    /// Redis is unavailable or the wait timed out: fetch without a lock.
    Alone,
}

/// What became of a money operation sent to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied<T> {
    /// Redis answered (the script ran).
    Answered(T),
    /// It never reached Redis (the connection was refused): nothing changed.
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

/// Connection and naming for the Redis tier.
pub struct RedisTier {
    /// For the purge subscription (a pub/sub connection of its own).
    client: Client,
    conn: ConnectionManager,
    prefix: String,
    op_timeout: Duration,
    ledger_timeout: Duration,
    lock_ttl: Duration,
    lock_wait: Duration,
    up: AtomicBool,
    unlock: Script,
    metrics: Arc<Metrics>,
    /// Whatever is read back is checked before use: anyone who can write
    /// to Redis could otherwise serve every replica's clients.
    check: Arc<EntryCheck>,
}

/// Shows the namespace and state only: the URL may hold a password.
impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl RedisTier {
    /// Prepares a lazily connecting, self-reconnecting client; never blocks
    /// on Redis. Entries read back pass `check` or count as absent.
    pub fn new(
        url: &str,
        settings: TierSettings,
        metrics: Arc<Metrics>,
        check: Arc<EntryCheck>,
    ) -> Result<Self, redis::RedisError> {
        let client = Client::open(url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.op_timeout.max(Duration::from_millis(100))))
            // Our own timeouts cut each call short; the connection's must not
            // cut a money operation shorter than its own.
            .set_response_timeout(Some(settings.op_timeout.max(settings.ledger_timeout)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        Ok(Self {
            client,
            conn,
            prefix: settings.prefix,
            op_timeout: settings.op_timeout,
            ledger_timeout: settings.ledger_timeout,
            lock_ttl: settings.lock_ttl,
            lock_wait: settings.lock_wait,
            up: AtomicBool::new(true),
            unlock: Script::new(UNLOCK),
            metrics,
            check,
        })
    }

    /// Whether the last Redis call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The Redis key holding `key`'s entry.
    pub fn entry_key(&self, key: &CacheKey) -> String {
        format!("{}entry:{}", self.prefix, key.path_and_query())
    }

    /// The Redis key holding `key`'s fetch lock.
    pub fn lock_key(&self, key: &CacheKey) -> String {
        format!("{}lock:{}", self.prefix, key.path_and_query())
    }

    /// The stored entry for `key`; values that are not an entry this proxy
    /// could have stored (see [`EntryCheck`]) count as absent.
    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        let redis_key = self.entry_key(key);
        let mut conn = self.conn.clone();
        let raw: Vec<u8> = self
            .call("GET", conn.get::<_, Option<Vec<u8>>>(&redis_key))
            .await
            .flatten()?;
        self.check.admit(Source::Redis, key, &Bytes::from(raw))
    }

    /// Stores `entry` until neither it nor the success it keeps can be
    /// served (as of `now`). A refusal that keeps nothing is stored only
    /// where nothing is: whatever is there is a success still usable as a
    /// stale answer, or the same refusal. One that keeps a stale success
    /// replaces it (it carries it along); the key's fetch lock, held while
    /// fetching and storing, keeps other replicas from storing meanwhile.
    pub async fn put(&self, key: &CacheKey, entry: &Entry, now: SystemTime) {
        let remaining = entry.remaining_retention(now);
        let millis = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
        if millis == 0 {
            return;
        }
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(self.entry_key(key))
            .arg(codec::encode(entry).as_ref())
            .arg("PX")
            .arg(millis);
        if entry.negative && entry.kept().is_none() {
            set.arg("NX");
        }
        let _ = self
            .call("SET", set.query_async::<Option<String>>(&mut conn))
            .await;
    }

    /// `<prefix><suffix>`: a key in our namespace (for the ledger's and the
    /// rate limits' own scripts).
    pub fn namespaced(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// Runs a prepared Lua script (its keys namespaced) under the op
    /// timeout; `None` if Redis failed.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.conn.clone();
        self.call("EVALSHA", invocation.invoke_async(&mut conn))
            .await
    }

    /// Runs one of the ledger's money scripts under the ledger timeout. The
    /// script must be idempotent: after [`Applied::Unknown`] the caller
    /// resolves the outcome by running it (or its undo) again with the same id.
    pub async fn invoke_ledger<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Applied<T> {
        let mut conn = self.conn.clone();
        self.call_within(
            "EVALSHA",
            self.ledger_timeout,
            invocation.invoke_async(&mut conn),
        )
        .await
    }

    /// Tells every replica to drop `key` (or everything, with `None`) from memory.
    pub async fn publish_purge(&self, key: Option<&CacheKey>) {
        let payload = key.map_or("*", CacheKey::path_and_query);
        let mut conn = self.conn.clone();
        let _ = self
            .call(
                "PUBLISH",
                conn.publish::<_, _, i64>(self.purge_channel(), payload),
            )
            .await;
    }

    /// Applies purges published by any replica to `cache` until aborted;
    /// resubscribes after a lost connection.
    pub async fn follow_purges(&self, cache: LocalCache) {
        loop {
            if let Ok(mut pubsub) = self.client.get_async_pubsub().await
                && pubsub.subscribe(self.purge_channel()).await.is_ok()
            {
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    match message.get_payload::<String>() {
                        Ok(all) if all == "*" => {
                            cache.clear();
                        }
                        Ok(key) => {
                            cache.remove(&CacheKey::new(key));
                        }
                        Err(_) => {}
                    }
                }
            }
            // Redis is away: memory keeps serving; try again shortly.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn purge_channel(&self) -> String {
        format!("{}purge", self.prefix)
    }

    /// Deletes `key`'s entry; true if there was one.
    pub async fn remove(&self, key: &CacheKey) -> bool {
        let mut conn = self.conn.clone();
        let deleted = self
            .call("DEL", conn.del::<_, u64>(self.entry_key(key)))
            .await;
        deleted.unwrap_or(0) > 0
    }

    /// Deletes every entry under our prefix (SCAN + DEL, in batches); returns how many.
    pub async fn clear(&self) -> u64 {
        self.delete_matching(&format!("{}entry:*", glob_escape(&self.prefix)))
            .await
    }

    /// Deletes every entry of the route at `path` (a reload removed it); returns how many.
    pub async fn clear_route(&self, path: &str) -> u64 {
        let key = format!("{}entry:{}", glob_escape(&self.prefix), glob_escape(path));
        // The path alone (a route without parameters), or followed by its query.
        self.delete_matching(&key).await + self.delete_matching(&format!("{key}\\?*")).await
    }

    /// Deletes every key matching the glob `pattern` (SCAN + DEL, in batches).
    async fn delete_matching(&self, pattern: &str) -> u64 {
        let mut conn = self.conn.clone();
        let mut cursor = 0u64;
        let mut deleted = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500);
            let Some((next, keys)) = self
                .call("SCAN", scan.query_async::<(u64, Vec<String>)>(&mut conn))
                .await
            else {
                return deleted;
            };
            if !keys.is_empty() {
                deleted += self
                    .call("DEL", conn.del::<_, u64>(keys))
                    .await
                    .unwrap_or(0);
            }
            if next == 0 {
                return deleted;
            }
            cursor = next;
        }
    }

    /// Takes `key`'s fetch lock, or waits for its holder's answer (`usable`
    /// decides whether a stored entry answers us) for at most `lock_wait`.
    pub async fn claim(&self, key: &CacheKey, usable: impl Fn(&Entry) -> bool) -> Claim {
        let deadline = Instant::now() + self.lock_wait;
        let token = uuid::Uuid::new_v4().to_string();
        loop {
            match self.try_lock(key, &token).await {
                None => return Claim::Alone,
                Some(true) => {
                    // The previous holder may have stored and released just
                    // before we took the lock: look once more before paying.
                    let token = LockToken(token);
                    if let Some(entry) = self.get(key).await.filter(|e| usable(e)) {
                        self.unlock(key, token).await;
                        return Claim::Filled(Box::new(entry));
                    }
                    return Claim::Locked(token);
                }
                Some(false) => {}
            }
            if Instant::now() + POLL >= deadline {
                tracing::info!(%key, wait = ?self.lock_wait, "lock wait over; fetching without the lock");
                return Claim::Alone;
            }
            tokio::time::sleep(POLL).await;
            if let Some(entry) = self.get(key).await.filter(|e| usable(e)) {
                return Claim::Filled(Box::new(entry));
            }
        }
    }

    /// Releases a lock we hold (a no-op if it expired and someone else took it).
    pub async fn unlock(&self, key: &CacheKey, token: LockToken) {
        let mut conn = self.conn.clone();
        let mut invocation = self.unlock.key(self.lock_key(key));
        invocation.arg(token.0);
        let _ = self
            .call("EVALSHA", invocation.invoke_async::<i64>(&mut conn))
            .await;
    }

    /// `Some(true)` if taken, `Some(false)` if held by another, `None` if Redis failed.
    async fn try_lock(&self, key: &CacheKey, token: &str) -> Option<bool> {
        self.set_nx(self.lock_key(key), token, self.lock_ttl).await
    }

    /// Takes the cluster-wide lease `name` (`<prefix>lease:<name>`) for `ttl`
    /// unless another replica holds it: `Some(true)` if taken, `Some(false)`
    /// if held, `None` if Redis failed. Never released early: a lease covers
    /// one scheduled run.
    pub async fn take_lease(&self, name: &str, ttl: Duration) -> Option<bool> {
        let token = uuid::Uuid::new_v4().to_string();
        let key = format!("{}lease:{name}", self.prefix);
        self.set_nx(key, &token, ttl).await
    }

    /// `SET key value NX PX ttl`: whether it was set.
    async fn set_nx(&self, key: String, value: &str, ttl: Duration) -> Option<bool> {
        let mut conn = self.conn.clone();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut set = redis::cmd("SET");
        set.arg(key).arg(value).arg("NX").arg("PX").arg(millis);
        let reply = self
            .call("SET", set.query_async::<Option<String>>(&mut conn))
            .await;
        reply.map(|taken| taken.is_some())
    }

    /// Runs one Redis call (the command `op`) under the op timeout; `None` on any failure.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        self.call_within(op, self.op_timeout, fut).await.answer()
    }

    /// Runs one Redis call for at most `limit`, noting Redis's state; with
    /// tracing on, a span (the command's name, never its keys or values).
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
        let (applied, error) = match outcome {
            Ok(Ok(value)) => (Applied::Answered(value), None),
            // Refused at connect: the command was never written.
            Ok(Err(e)) if e.is_connection_refusal() => (Applied::NotSent, Some(e.to_string())),
            Ok(Err(e)) => (Applied::Unknown, Some(e.to_string())),
            Err(_) => (Applied::Unknown, Some("timed out".to_owned())),
        };
        if error.is_some() {
            span.record(
                "error.type",
                if matches!(applied, Applied::NotSent) {
                    "refused"
                } else {
                    "unknown"
                },
            );
        }
        match error {
            None => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis tier available again");
                }
            }
            Some(error) => {
                self.metrics.redis_error();
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%error, "Redis tier unavailable; serving from memory and upstream");
                }
            }
        }
        applied
    }
}

/// Escapes Redis glob metacharacters so a configured prefix matches literally.
fn glob_escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
