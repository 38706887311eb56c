//! The shared second tier: entries in Redis (or Valkey) so several replicas
//! pay for each question once, plus a cluster-wide fetch lock. The
//! connection (one server, Sentinel or Cluster) is [`RedisConn`], shared with
//! the ledger, the rate limits and warm-up; the key layout is documented there.
//!
//! Keys: `<prefix>entry:<path?query>` holds an [`codec`]-encoded entry with a
//! Redis TTL equal to the end of its longest window; `<prefix>lock:<path?query>`
//! is the fetch lock, taken with `SET NX PX` and an owner token, and released
//! only by its owner (check-and-delete script). Waiters poll for the value up
//! to `lock_wait`, then fetch themselves — like nginx's `proxy_cache_lock_timeout`;
//! a crashed holder blocks a key no longer than `lock_ttl`. Any Redis failure
//! reads as "absent" or "unavailable": the caller carries on with memory and
//! the upstream.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use redis::Script;
use tokio::time::Instant;

use futures_util::StreamExt as _;

use super::{CacheKey, Entry, EntryCheck, LocalCache, Source, codec};
use crate::redis_conn::RedisConn;

/// Deletes the lock only if we still own it.
const UNLOCK: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;
/// Poll interval while waiting for another replica's fetch.
const POLL: Duration = Duration::from_millis(20);

/// How long the tier's fetch locks last and are waited for (from `[cache.redis]`).
#[derive(Debug, Clone, Copy)]
pub struct TierSettings {
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

/// The cache's keys in Redis, over the shared connection.
pub struct RedisTier {
    conn: Arc<RedisConn>,
    settings: TierSettings,
    unlock: Script,
    /// Whatever is read back is checked before use: anyone who can write
    /// to Redis could otherwise serve every replica's clients.
    check: Arc<EntryCheck>,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl RedisTier {
    /// The tier over `conn`; entries read back pass `check` or count as absent.
    pub fn new(conn: Arc<RedisConn>, settings: TierSettings, check: Arc<EntryCheck>) -> Self {
        Self {
            conn,
            settings,
            unlock: Script::new(UNLOCK),
            check,
        }
    }

    /// The connection (for status, leases and the other shared counters).
    pub fn conn(&self) -> &Arc<RedisConn> {
        &self.conn
    }

    /// The Redis key holding `key`'s entry.
    pub fn entry_key(&self, key: &CacheKey) -> String {
        self.conn.key(&format!("entry:{}", key.path_and_query()))
    }

    /// The Redis key holding `key`'s fetch lock.
    pub fn lock_key(&self, key: &CacheKey) -> String {
        self.conn.key(&format!("lock:{}", key.path_and_query()))
    }

    /// The stored entry for `key`; values that are not an entry this proxy
    /// could have stored (see [`EntryCheck`]) count as absent.
    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        let mut get = redis::cmd("GET");
        get.arg(self.entry_key(key));
        let raw: Vec<u8> = self
            .conn
            .query::<Option<Vec<u8>>>("GET", &get)
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
        let mut set = redis::cmd("SET");
        set.arg(self.entry_key(key))
            .arg(codec::encode(entry).as_ref())
            .arg("PX")
            .arg(millis);
        if entry.negative && entry.kept().is_none() {
            set.arg("NX");
        }
        let _: Option<Option<String>> = self.conn.query("SET", &set).await;
    }

    /// Tells every replica to drop `key` (or everything, with `None`) from memory.
    pub async fn publish_purge(&self, key: Option<&CacheKey>) {
        let payload = key.map_or("*", CacheKey::path_and_query);
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.purge_channel()).arg(payload);
        let _: Option<i64> = self.conn.query("PUBLISH", &publish).await;
    }

    /// Applies purges published by any replica to `cache` until aborted;
    /// resubscribes (to the current primary, or another cluster node) after
    /// a lost connection.
    pub async fn follow_purges(&self, cache: LocalCache) {
        loop {
            if let Some(client) = self.conn.pubsub_client()
                && let Ok(mut pubsub) = client.get_async_pubsub().await
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
        self.conn.key("purge")
    }

    /// Deletes `key`'s entry; true if there was one.
    pub async fn remove(&self, key: &CacheKey) -> bool {
        let mut del = redis::cmd("DEL");
        del.arg(self.entry_key(key));
        self.conn.query::<u64>("DEL", &del).await.unwrap_or(0) > 0
    }

    /// Deletes every entry under our prefix (on every master); returns how many.
    pub async fn clear(&self) -> u64 {
        let pattern = format!(
            "{}*",
            glob_escape(&self.entry_key(&CacheKey::new(String::new())))
        );
        self.conn.delete_matching(&pattern).await
    }

    /// Deletes every entry of the route at `path` (a reload removed it); returns how many.
    pub async fn clear_route(&self, path: &str) -> u64 {
        // The path alone (a route without parameters): one key, no scan.
        let alone = u64::from(self.remove(&CacheKey::copied(path)).await);
        // The path followed by a query.
        let key = glob_escape(&self.entry_key(&CacheKey::copied(path)));
        alone + self.conn.delete_matching(&format!("{key}\\?*")).await
    }

    /// Takes `key`'s fetch lock, or waits for its holder's answer (`usable`
    /// decides whether a stored entry answers us) for at most `lock_wait`.
    pub async fn claim(&self, key: &CacheKey, usable: impl Fn(&Entry) -> bool) -> Claim {
        let lock_wait = self.settings.lock_wait;
        let deadline = Instant::now() + lock_wait;
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
                tracing::info!(%key, wait = ?lock_wait, "lock wait over; fetching without the lock");
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
        let mut invocation = self.unlock.key(self.lock_key(key));
        invocation.arg(token.0);
        let _: Option<i64> = self.conn.invoke(&invocation).await;
    }

    /// `Some(true)` if taken, `Some(false)` if held by another, `None` if Redis failed.
    async fn try_lock(&self, key: &CacheKey, token: &str) -> Option<bool> {
        self.conn
            .set_nx(self.lock_key(key), token, self.settings.lock_ttl)
            .await
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
