//! The in-process tier: a `quick_cache` (S3-FIFO) bounded by stored bytes,
//! whose entries stop being served at the end of their own lifetime.
//!
//! A lookup is a hash and a read lock on one shard: no per-read bookkeeping
//! queue, no timer wheel. Expiry is checked on read against the app's clock;
//! expired entries are dropped by [`LocalCache::sync`] (run before the cache
//! is counted: `/metrics`, `/stats`; at most once a second, off the async
//! threads) or, sooner, by eviction when room is needed. A refusal that
//! keeps a stale success ([`Entry::kept`]) gives way to that success when it
//! expires, without a write.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use quick_cache::{Weighter, sync::Cache};

use super::{CacheKey, Entry};
use crate::clock::SharedClock;

/// Bytes an entry costs beyond its key, body and gzip form (ETag, timestamps,
/// `Arc`s, the header memo of a hot entry, the cache's slot), so
/// `cache.max_bytes` bounds what the process holds.
const ENTRY_OVERHEAD: usize = 1024;

/// The gzip form's share of the weight, as a fraction of the body: it is
/// made on the first gzip request, after the entry is weighed, so it is
/// weighed at what JSON compresses to (about a third) from the start.
const GZIP_SHARE: usize = 3;

/// The weight of an entry the cache is first sized for (a typical KeyAPI
/// answer, its gzip form and overhead); only sizes the table, not a limit.
const TYPICAL_ENTRY_BYTES: u64 = 5 * 1024;

/// What an entry weighs against `cache.max_bytes`.
#[derive(Debug, Clone, Copy)]
struct StoredBytes;

impl Weighter<CacheKey, Arc<Entry>> for StoredBytes {
    fn weight(&self, key: &CacheKey, entry: &Arc<Entry>) -> u64 {
        let answer = |e: &Entry| e.body.len() + e.body.len() / GZIP_SHARE + ENTRY_OVERHEAD;
        let kept = entry.kept().map_or(0, |kept| answer(kept));
        let bytes = key.path_and_query().len() + answer(entry) + kept;
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
}

/// Whether `entry` is still within its longest window at `now` (servable).
fn live(entry: &Entry, now: SystemTime) -> bool {
    !entry.remaining_lifetime(now).is_zero()
}

/// What a stored entry answers with at `now`: itself while live, then the
/// success it keeps while that is.
pub(super) fn current(entry: &Arc<Entry>, now: SystemTime) -> Option<&Arc<Entry>> {
    if live(entry, now) {
        return Some(entry);
    }
    entry.kept().filter(|kept| live(kept, now))
}

type Store = Cache<CacheKey, Arc<Entry>, StoredBytes, foldhash::fast::RandomState>;

/// In-memory cache of stored answers. Cloning shares the same store.
#[derive(Clone)]
pub struct LocalCache {
    inner: Arc<Store>,
    clock: SharedClock,
    /// The second (on `clock`) of the last sweep of expired entries.
    swept: Arc<AtomicU64>,
}

impl LocalCache {
    /// A cache holding at most `max_bytes` of keys, bodies and per-entry
    /// overhead, whose entries age by `clock`.
    pub fn new(max_bytes: u64, clock: SharedClock) -> Self {
        let items = usize::try_from((max_bytes / TYPICAL_ENTRY_BYTES).max(16)).unwrap_or(16);
        // Keys are canonical already; a fast non-cryptographic hash is enough.
        let inner = Cache::with(
            items,
            max_bytes,
            StoredBytes,
            foldhash::fast::RandomState::default(),
            Default::default(),
        );
        Self {
            inner: Arc::new(inner),
            clock,
            swept: Arc::default(),
        }
    }

    /// The entry for `key`, fresh or stale at `now`, if any.
    pub fn get(&self, key: &CacheKey, now: SystemTime) -> Option<Arc<Entry>> {
        let entry = self.inner.get(key)?;
        if live(&entry, now) {
            return Some(entry);
        }
        current(&entry, now).cloned()
    }

    /// Removes the entry for `key`; true if there was a live one.
    pub fn remove(&self, key: &CacheKey) -> bool {
        self.inner
            .remove(key)
            .is_some_and(|(_, entry)| current(&entry, self.clock.now()).is_some())
    }

    /// Removes every entry; returns how many live ones there were.
    pub fn clear(&self) -> u64 {
        let count = self.iter().count();
        self.inner.clear();
        u64::try_from(count).unwrap_or(u64::MAX)
    }

    /// A point-in-time copy of every live entry (admin listing, status page).
    pub fn entries(&self) -> Vec<(CacheKey, Arc<Entry>)> {
        self.iter().collect()
    }

    /// Every live entry (as [`LocalCache::get`] would answer), one at a
    /// time, copying nothing but the pointers (snapshots stream this to disk
    /// in bounded memory). Each item takes one shard's read lock briefly;
    /// none is held between items.
    pub fn iter(&self) -> impl Iterator<Item = (CacheKey, Arc<Entry>)> + '_ {
        let now = self.clock.now();
        self.inner
            .iter()
            .filter_map(move |(key, entry)| Some((key, Arc::clone(current(&entry, now)?))))
    }

    /// Stores (or replaces) the entry for `key`.
    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.inner.insert(key, entry);
    }

    /// Number of entries (expired ones included until the next [`Self::sync`]).
    pub fn entry_count(&self) -> u64 {
        u64::try_from(self.inner.len()).unwrap_or(u64::MAX)
    }

    /// Stored bytes, as weighed against `cache.max_bytes` (expired entries
    /// included until the next [`Self::sync`]).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weight()
    }

    /// Drops expired entries, so the counts above are exact (to the second:
    /// a sweep visits every entry, so it runs at most once a second, on a
    /// blocking thread).
    pub async fn sync(&self) {
        let now = self.clock.now();
        let second = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if self.swept.swap(second, Ordering::AcqRel) == second {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let sweep = move || inner.retain(|_, entry| current(entry, now).is_some());
        // A panicking sweep only leaves expired entries for the next one.
        let _ = tokio::task::spawn_blocking(sweep).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;

    use super::*;
    use crate::{clock::ManualClock, config::Config};

    #[tokio::test]
    async fn expired_entries_are_not_served_listed_or_counted_after_a_sweep() {
        let manual = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(1 << 30)));
        let clock = SharedClock::new(manual.clone());
        let cache = LocalCache::new(1 << 20, clock.clone());
        let policy = Config::defaults().unwrap().cache.freshness_policy();
        let (key, ttl) = (CacheKey::new("/v1/x?a=1".into()), Duration::from_secs(60));
        let entry = Entry::success(Bytes::from_static(b"{}"), ttl, &policy, clock.now());
        let lifetime = entry.lifetime();
        cache.insert(key.clone(), Arc::new(entry));

        manual.advance(lifetime - Duration::from_secs(1));
        assert!(
            cache.get(&key, clock.now()).is_some(),
            "stale but within its windows"
        );
        manual.advance(Duration::from_secs(1));
        assert!(cache.get(&key, clock.now()).is_none());
        assert_eq!(cache.iter().count(), 0);
        assert_eq!(cache.entry_count(), 1, "counted until swept");
        cache.sync().await;
        assert_eq!((cache.entry_count(), cache.weighted_size()), (0, 0));
    }
}
