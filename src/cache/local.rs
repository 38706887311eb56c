//! The in-process tier: a moka cache bounded by stored body bytes, with each
//! entry expiring after its own TTL.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use moka::{Expiry, future::Cache};

use super::{CacheKey, Entry};
use crate::clock::SharedClock;

/// Bytes an entry costs beyond its key, body and gzip form (ETag, timestamps,
/// `Arc`s, moka's node and indexes), so `cache.max_bytes` bounds what the
/// process holds: bench scenario 5 measured 4,961 B of RSS per entry whose
/// key, body and gzip form add up to ~4.1 KB.
const ENTRY_OVERHEAD: usize = 1024;

/// In-memory cache of successful answers. Cloning shares the same store.
#[derive(Clone)]
pub struct LocalCache {
    inner: Cache<CacheKey, Arc<Entry>, foldhash::fast::RandomState>,
}

/// Per-entry expiry: each entry lives until the end of its longest stale
/// window, counted from when it was first stored (which may predate this
/// process: Redis, snapshots) on the app's clock. Routes choose TTLs per key,
/// e.g. per period.
struct EntryTtl(SharedClock);

impl Expiry<CacheKey, Arc<Entry>> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.remaining_lifetime(self.0.now()))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.remaining_lifetime(self.0.now()))
    }
}

impl LocalCache {
    /// A cache holding at most `max_bytes` of keys, bodies and per-entry
    /// overhead, whose entries age by `clock`.
    pub fn new(max_bytes: u64, clock: SharedClock) -> Self {
        let inner = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &CacheKey, entry: &Arc<Entry>| {
                let gzip = entry.gzip.as_ref().map_or(0, Bytes::len);
                let bytes = key.path_and_query().len() + entry.body.len() + gzip + ENTRY_OVERHEAD;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(EntryTtl(clock))
            // Keys are canonical already; a fast non-cryptographic hash is
            // enough (moka's default SipHash is ~600 instructions per lookup).
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self { inner }
    }

    /// The entry for `key`, fresh or stale, if any.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.inner.get(key).await
    }

    /// Whether a fresh entry for `key` exists (not counted as a read).
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.inner.contains_key(key)
    }

    /// Removes the entry for `key`; true if there was one.
    pub async fn remove(&self, key: &CacheKey) -> bool {
        self.inner.remove(key).await.is_some()
    }

    /// Removes every entry; returns how many there were.
    pub async fn clear(&self) -> u64 {
        self.sync().await;
        let count = self.inner.entry_count();
        self.inner.invalidate_all();
        self.sync().await;
        count
    }

    /// A point-in-time copy of every entry (admin listing, status page).
    pub fn entries(&self) -> Vec<(CacheKey, Arc<Entry>)> {
        self.iter().collect()
    }

    /// Every entry, one at a time, copying nothing but the pointers
    /// (snapshots stream this to disk in bounded memory).
    pub fn iter(&self) -> impl Iterator<Item = (CacheKey, Arc<Entry>)> + '_ {
        self.inner
            .iter()
            .map(|(key, entry)| (CacheKey::clone(&key), entry))
    }

    /// Stores (or replaces) the entry for `key`.
    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.inner.insert(key, entry).await;
    }

    /// Number of entries (approximate until pending maintenance runs).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Stored bytes (approximate until pending maintenance runs).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Applies pending inserts and evictions so the counts above are exact.
    pub async fn sync(&self) {
        self.inner.run_pending_tasks().await;
    }
}
