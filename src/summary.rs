//! What the operational endpoints (`/stats`, `/`) show is recomputed at most
//! once per [`REFRESH`] (by the app's clock) and shared by every request in
//! between, so a flood of them costs a lock and a clone each. The one O(n)
//! part — the cache's entry count, bytes and top keys — runs on a blocking
//! thread, off the async workers that serve hits.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::Mutex;

use crate::{
    cache::{CacheKey, Entry, LocalCache},
    clock::SharedClock,
    route::Route,
};

/// Oldest value served; a newer one is computed on the next request after it.
pub(crate) const REFRESH: Duration = Duration::from_secs(1);
/// Keys shown under "top keys".
pub(crate) const TOP_KEYS: usize = 10;
/// Entries scanned between two yields of the scanning thread.
const YIELD_EVERY: usize = 1024;

/// A value recomputed at most once per [`REFRESH`]; concurrent callers wait
/// for one computation instead of each running their own.
#[derive(Debug)]
pub(crate) struct Throttled<T> {
    latest: Mutex<Option<(SystemTime, Arc<T>)>>,
}

impl<T> Default for Throttled<T> {
    fn default() -> Self {
        Self {
            latest: Mutex::new(None),
        }
    }
}

impl<T> Throttled<T> {
    /// The latest value if it is younger than [`REFRESH`] by `clock`, else a new one from `compute`.
    pub(crate) async fn get<F, Fut>(&self, clock: &SharedClock, compute: F) -> Arc<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut latest = self.latest.lock().await;
        let now = clock.now();
        let fresh = latest
            .as_ref()
            .filter(|(at, _)| now.duration_since(*at).is_ok_and(|age| age < REFRESH));
        if let Some((_, value)) = fresh {
            return Arc::clone(value);
        }
        let value = Arc::new(compute().await);
        *latest = Some((now, Arc::clone(&value)));
        value
    }
}

/// One of the most-hit cached questions.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TopKey {
    /// The route (its path).
    pub(crate) route: String,
    /// The normalized parameters.
    pub(crate) params: BTreeMap<String, String>,
    pub(crate) hits: u64,
    pub(crate) bytes: usize,
    pub(crate) age_secs: u64,
}

/// What one scan of the cache found.
#[derive(Debug, Default)]
pub(crate) struct CacheSummary {
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
    /// Most hits first; ties by parameters.
    pub(crate) top_keys: Vec<TopKey>,
}

impl CacheSummary {
    /// Scans `cache` on a blocking thread (exact counts: pending inserts
    /// applied first); ages are as of `now`.
    pub(crate) async fn of(cache: &LocalCache, now: SystemTime) -> Self {
        cache.sync().await;
        let scanned = cache.clone();
        tokio::task::spawn_blocking(move || scan(&scanned, now))
            .await
            .unwrap_or_default()
    }
}

/// A cache entry ranked by hits (then key, so the order is total).
struct Ranked {
    hits: u64,
    key: CacheKey,
    entry: Arc<Entry>,
}

impl Ranked {
    fn rank(&self) -> (u64, &str) {
        (self.hits, self.key.path_and_query())
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.rank() == other.rank()
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// One pass over the cache: a bounded min-heap keeps the [`TOP_KEYS`]
/// most-hit entries; only those are parsed.
fn scan(cache: &LocalCache, now: SystemTime) -> CacheSummary {
    let mut heap: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(TOP_KEYS + 1);
    for (i, (key, entry)) in cache.iter().enumerate() {
        let hits = entry.hits();
        // Most entries lose to the current tenth place on hits alone: no push, no string compare.
        let contender = heap.len() < TOP_KEYS || heap.peek().is_some_and(|min| hits >= min.0.hits);
        if contender {
            heap.push(Reverse(Ranked { hits, key, entry }));
            if heap.len() > TOP_KEYS {
                heap.pop();
            }
        }
        if i % YIELD_EVERY == YIELD_EVERY - 1 {
            // Let the workers serving hits in first when the CPU is contended.
            std::thread::yield_now();
        }
    }
    let mut top_keys: Vec<TopKey> = heap
        .into_iter()
        .map(|Reverse(Ranked { key, entry, .. })| TopKey {
            route: key
                .path_and_query()
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned(),
            params: Route::params_of(&key).into_iter().collect(),
            hits: entry.hits(),
            bytes: entry.body.len(),
            age_secs: entry.age(now).as_secs(),
        })
        .collect();
    top_keys.sort_by(|a, b| b.hits.cmp(&a.hits).then_with(|| a.params.cmp(&b.params)));
    CacheSummary {
        entries: cache.entry_count(),
        bytes: cache.weighted_size(),
        top_keys,
    }
}
