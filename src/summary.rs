//! The cache's summary for `/stats` and the status page — entry count,
//! stored bytes and the top keys by hits — computed at most once per
//! [`REFRESH`] on a blocking thread. The scan is O(entries); callers in
//! between share its result, so a flood of operational requests costs
//! O(top-k) each and never stalls the async workers that serve hits.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::Mutex;

use crate::{
    cache::{CacheKey, Entry, LocalCache},
    clock::SharedClock,
    key::HashtagKey,
};

/// Oldest summary served; a newer one is computed on the next request after it.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Keys shown under "top keys".
pub const TOP_KEYS: usize = 10;

/// One of the most-hit cached questions.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopKey {
    pub hashtag_name: String,
    pub period: u32,
    pub region: String,
    pub hits: u64,
    pub bytes: usize,
    pub age_secs: u64,
}

/// What one scan of the cache found.
#[derive(Debug)]
pub struct Summary {
    /// When it was computed, by the app's clock.
    computed_at: SystemTime,
    pub entries: u64,
    pub bytes: u64,
    /// Most hits first; ties by hashtag name.
    pub top_keys: Vec<TopKey>,
}

/// The latest [`Summary`], recomputed at most once per [`REFRESH`].
#[derive(Debug, Default)]
pub struct Summaries {
    /// Held across the recomputation: concurrent callers wait for one scan.
    latest: Mutex<Option<Arc<Summary>>>,
}

impl Summaries {
    /// The summary of `cache`, at most [`REFRESH`] old (by `clock`).
    pub async fn get(&self, cache: &LocalCache, clock: &SharedClock) -> Arc<Summary> {
        let mut latest = self.latest.lock().await;
        let now = clock.now();
        let fresh = latest.as_ref().filter(|s| {
            now.duration_since(s.computed_at)
                .is_ok_and(|age| age < REFRESH)
        });
        if let Some(summary) = fresh {
            return Arc::clone(summary);
        }
        // Applies pending inserts so the counts are exact once per refresh.
        cache.sync().await;
        let scanned = cache.clone();
        let summary = tokio::task::spawn_blocking(move || scan(&scanned, now))
            .await
            .unwrap_or_else(|_| Summary {
                computed_at: now,
                entries: cache.entry_count(),
                bytes: cache.weighted_size(),
                top_keys: Vec::new(),
            });
        let summary = Arc::new(summary);
        *latest = Some(Arc::clone(&summary));
        summary
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
fn scan(cache: &LocalCache, now: SystemTime) -> Summary {
    let mut heap = BinaryHeap::with_capacity(TOP_KEYS + 1);
    for (key, entry) in cache.iter() {
        let hits = entry.hits();
        heap.push(Reverse(Ranked { hits, key, entry }));
        if heap.len() > TOP_KEYS {
            heap.pop();
        }
    }
    let wall_now = SystemTime::now();
    let mut top_keys: Vec<TopKey> = heap
        .into_iter()
        .filter_map(|Reverse(Ranked { key, entry, .. })| {
            let question = HashtagKey::from_cache_key(&key)?;
            Some(TopKey {
                region: question.region.as_str().to_owned(),
                hashtag_name: question.hashtag,
                period: question.period,
                hits: entry.hits(),
                bytes: entry.body.len(),
                age_secs: entry.age(wall_now).as_secs(),
            })
        })
        .collect();
    top_keys.sort_by(|a, b| {
        b.hits
            .cmp(&a.hits)
            .then_with(|| a.hashtag_name.cmp(&b.hashtag_name))
    });
    Summary {
        computed_at: now,
        entries: cache.entry_count(),
        bytes: cache.weighted_size(),
        top_keys,
    }
}
