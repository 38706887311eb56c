//! Memory and Redis behind one type, so the proxy tells only the request's
//! story: look in memory, consult the shared tier (or take this replica's
//! turn to fetch), store in both.
//!
//! The rules of storing live here: a refusal (negative entry) never replaces
//! a success it does not keep — in Redis it is written only where nothing is
//! unless it keeps the stale success there, and memory keeps its success
//! rather than take a refusal (read from Redis) that keeps another one.

use std::{sync::Arc, time::SystemTime};

use super::{
    CacheKey, Entry, LocalCache, local,
    redis::{Claim, LockToken, RedisTier},
};
use crate::clock::SharedClock;

/// What consulting the shared tier (Redis) said about a key this replica is
/// about to fetch.
#[derive(Debug)]
pub enum Consulted {
    /// A usable answer (now in memory too): no fetch.
    Usable(Arc<Entry>),
    /// This replica holds the key's fetch lock: fetch, then [`Tiers::release`].
    Locked(LockToken),
    /// No Redis, Redis unavailable, or the wait timed out: fetch without a lock.
    Alone,
}

/// The cache tiers of one replica.
#[derive(Clone)]
pub struct Tiers {
    memory: LocalCache,
    shared: Option<Arc<RedisTier>>,
    clock: SharedClock,
}

impl Tiers {
    /// `memory`, with `shared` behind it when configured; entries age by `clock`.
    pub fn new(memory: LocalCache, shared: Option<Arc<RedisTier>>, clock: SharedClock) -> Self {
        Self {
            memory,
            shared,
            clock,
        }
    }

    /// This replica's memory tier.
    pub fn memory(&self) -> &LocalCache {
        &self.memory
    }

    /// The shared tier, when configured.
    pub fn shared(&self) -> Option<&Arc<RedisTier>> {
        self.shared.as_ref()
    }

    /// The entry in memory (the hit path: one lookup, no Redis).
    pub fn get(&self, key: &CacheKey, now: SystemTime) -> Option<Arc<Entry>> {
        self.memory.get(key, now)
    }

    /// The entry any tier holds for `key` at `now` (memory first; Redis when
    /// memory has no success to offer), whatever its freshness: what a
    /// refusal must not lose. Off the hit path (after a paid refusal).
    pub async fn held(&self, key: &CacheKey, now: SystemTime) -> Option<Arc<Entry>> {
        let memory = self.memory.get(key, now);
        let has_success = |e: &Entry| !e.negative || e.kept().is_some();
        if memory.as_deref().is_some_and(has_success) {
            return memory;
        }
        let shared = match &self.shared {
            Some(redis) => redis.get(key).await.map(Arc::new),
            None => None,
        };
        shared.or(memory)
    }

    /// What Redis holds for `key` at `now`, when it is newer than what memory
    /// holds (then memory keeps it too), whatever its freshness: for a
    /// request that must not cause a call (`only-if-cached`) and found
    /// nothing in memory that would do. Read only: no fetch lock is taken.
    pub async fn shared_copy(&self, key: &CacheKey, now: SystemTime) -> Option<Arc<Entry>> {
        let found = self.shared.as_ref()?.get(key).await?;
        let held = self.memory.get(key, now);
        if held.is_some_and(|held| held.stored_at >= found.stored_at) {
            return None;
        }
        let entry = self.fill_memory(key, found).await;
        local::current(&entry, now).cloned()
    }

    /// Before fetching `key`: a `usable` answer another replica stored, or
    /// this replica's turn to fetch (the cluster-wide lock, waiting for its
    /// holder's answer for at most `lock_wait`).
    pub async fn consult_shared(
        &self,
        key: &CacheKey,
        usable: impl Fn(&Entry) -> bool,
    ) -> Consulted {
        let Some(redis) = &self.shared else {
            return Consulted::Alone;
        };
        let found = match redis.get(key).await.filter(|e| usable(e)) {
            Some(entry) => entry,
            None => match redis.claim(key, usable).await {
                Claim::Filled(entry) => *entry,
                Claim::Locked(token) => return Consulted::Locked(token),
                Claim::Alone => return Consulted::Alone,
            },
        };
        Consulted::Usable(self.fill_memory(key, found).await)
    }

    /// After fetching `key`: releases the lock [`Tiers::consult_shared`] gave.
    pub async fn release(&self, key: &CacheKey, turn: Consulted) {
        if let (Some(redis), Consulted::Locked(token)) = (&self.shared, turn) {
            redis.unlock(key, token).await;
        }
    }

    /// Stores a fetched entry in every tier; returns it as memory holds it.
    pub async fn store(&self, key: &CacheKey, entry: Entry) -> Arc<Entry> {
        if let Some(redis) = &self.shared {
            redis.put(key, &entry, self.clock.now()).await;
        }
        self.fill_memory(key, entry).await
    }

    /// Puts an entry into memory, unless it is a refusal and memory holds a
    /// success it does not keep (kept for stale answers); the entry is
    /// returned either way, to answer the request at hand.
    async fn fill_memory(&self, key: &CacheKey, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        if entry.negative
            && let Some(current) = self.memory.get(key, self.clock.now())
            && !current.negative
            && !entry
                .kept()
                .is_some_and(|kept| kept.is_same_answer(&current))
        {
            return entry;
        }
        self.memory.insert(key.clone(), Arc::clone(&entry));
        entry
    }

    /// Forgets `key` in every tier (and tells the other replicas); returns
    /// how many tiers held it.
    pub async fn purge(&self, key: &CacheKey) -> u64 {
        let local = u64::from(self.memory.remove(key));
        let shared = match &self.shared {
            Some(redis) => {
                let removed = redis.remove(key).await;
                redis.publish_purge(Some(key)).await;
                u64::from(removed)
            }
            None => 0,
        };
        local.max(shared)
    }

    /// Forgets every entry of the route at `path` in every tier (a reload
    /// removed the route); returns how many memory held.
    pub async fn purge_route(&self, path: &str) -> u64 {
        let mut dropped = 0;
        for (key, _) in self.memory.entries() {
            let key_path = key.path_and_query().split('?').next();
            let in_route = key_path == Some(path);
            if in_route && self.memory.remove(&key) {
                dropped += 1;
            }
        }
        if let Some(redis) = &self.shared {
            redis.clear_route(path).await;
        }
        dropped
    }

    /// Forgets every entry in every tier; returns the larger tier's count.
    pub async fn purge_all(&self) -> u64 {
        let local = self.memory.clear();
        let shared = match &self.shared {
            Some(redis) => {
                let removed = redis.clear().await;
                redis.publish_purge(None).await;
                removed
            }
            None => 0,
        };
        local.max(shared)
    }
}
