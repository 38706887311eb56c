//! The request's story, route-independent: cache → single flight → upstream →
//! cache. Given a normalized [`CacheKey`] and its TTL, returns the answer and
//! how it was obtained, applying the freshness model of [`crate::cache`]:
//! fresh hits, stale-while-revalidate, stale-if-error, negative entries and
//! refresh-ahead. Only the fetch task ever writes the cache, and it never
//! replaces a good entry with a bad answer.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use reqwest::StatusCode;

use crate::{
    cache::{
        CacheKey, Entry, Freshness, FreshnessPolicy, LocalCache,
        redis::{Claim, RedisTier},
    },
    cache_status::CacheState,
    coalesce::{Abandoned, Coalescer, Role},
    metrics::Metrics,
    protect::Protection,
    upstream::{Upstream, UpstreamAnswer, UpstreamError},
};

/// Why a fetch was started; decides whether a cached entry makes it moot.
#[derive(Debug, Clone)]
enum Trigger {
    /// No usable entry: a fresh one stored meanwhile answers it.
    Miss,
    /// The client asked for a new answer: always call.
    ClientRefresh,
    /// Revalidating this entry: moot if a newer one was stored meanwhile.
    Background(Arc<Entry>),
}

impl Trigger {
    /// Whether `candidate` (found in L1 or L2) answers this fetch.
    fn satisfied_by(&self, candidate: &Entry, now: SystemTime) -> bool {
        match self {
            Trigger::Miss => candidate.is_fresh(now),
            Trigger::ClientRefresh => false,
            Trigger::Background(old) => candidate.stored_at > old.stored_at,
        }
    }
}

/// What one shared fetch produced; cloned to every waiter.
#[derive(Debug, Clone)]
enum Fetched {
    /// Fetched and stored (a success, or a negative entry).
    Stored(Arc<Entry>),
    /// A usable entry was already there: stored by a fetch that finished
    /// between our lookup and taking the single-flight slot, or by another
    /// replica (Redis tier).
    AlreadyCached(Arc<Entry>),
    /// KeyAPI's own refusal, forwarded but not cached.
    Declined { status: StatusCode, body: Bytes },
}

type FetchResult = Result<Fetched, ProxyError>;

/// How a request was answered.
#[derive(Debug)]
pub enum Outcome {
    /// An answer from the cache (possibly just stored, possibly stale).
    Cached {
        entry: Arc<Entry>,
        state: CacheState,
    },
    /// KeyAPI refused the question itself and it is not cacheable.
    Declined { status: StatusCode, body: Bytes },
}

/// Why no answer could be produced.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
}

/// Everything a fetch task needs; cheap to clone into it.
#[derive(Clone)]
struct Fetcher {
    cache: LocalCache,
    upstream: Arc<Upstream>,
    protection: Arc<Protection>,
    policy: Arc<FreshnessPolicy>,
    redis: Option<Arc<RedisTier>>,
    metrics: Arc<Metrics>,
}

/// Ties the cache, the single-flight map and the upstream client together.
pub struct Proxy {
    fetcher: Fetcher,
    inflight: Arc<Coalescer<CacheKey, FetchResult>>,
}

impl Proxy {
    /// A proxy over `cache`, with an optional shared Redis tier.
    pub fn new(
        cache: LocalCache,
        redis: Option<Arc<RedisTier>>,
        upstream: Upstream,
        protection: Protection,
        policy: FreshnessPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            fetcher: Fetcher {
                cache,
                upstream: Arc::new(upstream),
                protection: Arc::new(protection),
                policy: Arc::new(policy),
                redis,
                metrics,
            },
            inflight: Arc::default(),
        }
    }

    /// The cache (for operational endpoints).
    pub fn cache(&self) -> &LocalCache {
        &self.fetcher.cache
    }

    /// The Redis tier, when configured (operational endpoints, background tasks).
    pub fn redis(&self) -> Option<&Arc<RedisTier>> {
        self.fetcher.redis.as_ref()
    }

    /// Upstream protection state (for operational endpoints).
    pub fn protection(&self) -> &Protection {
        &self.fetcher.protection
    }

    /// Whether `key` can be answered without an upstream call: it is in L1, or
    /// a fresh copy is in the Redis tier (which is then copied into L1). Lets
    /// credit budgets refuse only requests that would really spend.
    pub async fn answerable_locally(&self, key: &CacheKey) -> bool {
        if self.cache().contains(key) {
            return true;
        }
        let Some(redis) = self.redis() else {
            return false;
        };
        let usable = |e: &Entry| Trigger::Miss.satisfied_by(e, SystemTime::now());
        match redis.get(key).await.filter(usable) {
            Some(entry) => {
                self.fetcher.fill_memory(key, entry).await;
                true
            }
            None => false,
        }
    }

    /// Forgets `key` in every tier; returns how many tiers held it.
    pub async fn purge(&self, key: &CacheKey) -> u64 {
        let local = u64::from(self.cache().remove(key).await);
        let shared = match self.redis() {
            Some(redis) => {
                let removed = redis.remove(key).await;
                redis.publish_purge(Some(key)).await;
                u64::from(removed)
            }
            None => 0,
        };
        local.max(shared)
    }

    /// Forgets every entry in every tier; returns the larger tier's count.
    pub async fn purge_all(&self) -> u64 {
        let local = self.cache().clear().await;
        let shared = match self.redis() {
            Some(redis) => {
                let removed = redis.clear().await;
                redis.publish_purge(None).await;
                removed
            }
            None => 0,
        };
        local.max(shared)
    }

    /// Resolves when no fetch (foreground or background) is in flight.
    pub async fn idle(&self) {
        self.inflight.idle().await;
    }

    /// Answers `key`. With `refresh`, skips the cache lookup (still single flight).
    pub async fn serve(
        &self,
        key: &CacheKey,
        ttl: Duration,
        refresh: bool,
    ) -> Result<Outcome, ProxyError> {
        let mut fallback = None;
        if !refresh && let Some(entry) = self.cache().get(key).await {
            let now = SystemTime::now();
            match entry.freshness(now) {
                Freshness::Fresh { .. } => {
                    let hits = entry.record_hit();
                    self.maybe_refresh_ahead(key, ttl, &entry, hits, now);
                    return Ok(cached(entry, CacheState::Hit));
                }
                Freshness::StaleWhileRevalidate { .. } => {
                    entry.record_hit();
                    self.revalidate(key, ttl, &entry);
                    return Ok(cached(entry, CacheState::Stale));
                }
                Freshness::StaleIfError { .. } => fallback = Some(entry),
                Freshness::Expired => {}
            }
        }
        let trigger = if refresh {
            Trigger::ClientRefresh
        } else {
            Trigger::Miss
        };
        let result = self
            .inflight
            .run(key.clone(), || {
                self.fetcher.clone().fetch(key.clone(), ttl, trigger)
            })
            .await;
        let (fetched, role) = match result {
            Ok((fetched, role)) => (fetched, role),
            Err(abandoned) => (Err(abandoned.into()), Role::Follower),
        };
        match (fetched, fallback) {
            (Ok(Fetched::Stored(entry)), _) => {
                let state = match (role, refresh) {
                    (Role::Follower, _) => CacheState::Collapsed,
                    (Role::Leader, true) => CacheState::Refreshed,
                    (Role::Leader, false) => CacheState::Stored,
                };
                Ok(cached(entry, state))
            }
            (Ok(Fetched::AlreadyCached(entry)), _) => Ok(cached(entry, CacheState::Hit)),
            (Ok(Fetched::Declined { status, body }), _) => Ok(Outcome::Declined { status, body }),
            (Err(error), Some(stale)) => {
                tracing::warn!(%key, error = %error, "serving stale answer because the upstream failed");
                let fwd_status = match &error {
                    ProxyError::Upstream(e) => e.upstream_status(),
                    ProxyError::Abandoned(_) => None,
                };
                Ok(cached(stale, CacheState::StaleIfError { fwd_status }))
            }
            (Err(error), None) => Err(error),
        }
    }

    /// Refresh-ahead: a hot entry late in its fresh life is refreshed in the
    /// background so it never goes stale.
    fn maybe_refresh_ahead(
        &self,
        key: &CacheKey,
        ttl: Duration,
        entry: &Arc<Entry>,
        hits: u64,
        now: SystemTime,
    ) {
        let policy = &self.fetcher.policy;
        let Some(fraction) = policy.refresh_ahead else {
            return;
        };
        if entry.negative {
            return;
        }
        if hits >= u64::from(policy.refresh_ahead_min_hits)
            && entry.age(now) >= entry.ttl.mul_f64(fraction)
        {
            self.revalidate(key, ttl, entry);
        }
    }

    /// Starts one background refresh of `entry` (none if a fetch is running).
    fn revalidate(&self, key: &CacheKey, ttl: Duration, entry: &Arc<Entry>) {
        let trigger = Trigger::Background(Arc::clone(entry));
        let role = self.inflight.start(key.clone(), || {
            self.fetcher.clone().fetch(key.clone(), ttl, trigger)
        });
        if role == Role::Leader {
            tracing::debug!(%key, "background refresh started");
        }
    }
}

fn cached(entry: Arc<Entry>, state: CacheState) -> Outcome {
    Outcome::Cached { entry, state }
}

impl Fetcher {
    /// The body of one single-flight fetch; runs in its own task.
    /// Order: L1 (moot?) → L2 (another replica's answer, or its lock) → KeyAPI.
    async fn fetch(self, key: CacheKey, ttl: Duration, trigger: Trigger) -> FetchResult {
        if let Some(entry) = self.moot(&key, &trigger).await {
            return Ok(Fetched::AlreadyCached(entry));
        }
        let mut lock = None;
        if let Some(redis) = &self.redis {
            let usable = |e: &Entry| trigger.satisfied_by(e, SystemTime::now());
            let shared = match redis.get(&key).await.filter(|e| usable(e)) {
                Some(entry) => Some(entry),
                None => match redis.claim(&key, usable).await {
                    Claim::Filled(entry) => Some(*entry),
                    Claim::Locked(token) => {
                        lock = Some(token);
                        None
                    }
                    Claim::Alone => None,
                },
            };
            if let Some(entry) = shared {
                return Ok(Fetched::AlreadyCached(self.fill_memory(&key, entry).await));
            }
        }
        let result = self.call_upstream(&key, ttl).await;
        if let (Some(redis), Some(token)) = (&self.redis, lock) {
            redis.unlock(&key, token).await;
        }
        result
    }

    /// One guarded upstream call; stores what deserves storing.
    async fn call_upstream(&self, key: &CacheKey, ttl: Duration) -> FetchResult {
        let admission = self.protection.admit().await.inspect_err(|error| {
            self.metrics.upstream_refused(error.as_str());
            tracing::warn!(%key, error = %error, "upstream call refused by protection");
        })?;
        let result = self.upstream.fetch(key).await;
        admission.settle(&result);
        match result {
            Ok(UpstreamAnswer::Success(body)) => {
                let entry = Entry::success(body, ttl, &self.policy);
                Ok(Fetched::Stored(self.store(key, entry).await))
            }
            Ok(UpstreamAnswer::Declined { status, code, body }) => {
                self.declined(key, status, code, body).await
            }
            Err(error) => {
                tracing::warn!(%key, error = %error, kind = error.as_str(), "upstream call failed; not cached");
                Err(error.into())
            }
        }
    }

    /// Writes an entry to every tier.
    async fn store(&self, key: &CacheKey, entry: Entry) -> Arc<Entry> {
        if let Some(redis) = &self.redis {
            redis.put(key, &entry).await;
        }
        self.fill_memory(key, entry).await
    }

    /// Puts an entry into this replica's memory tier.
    async fn fill_memory(&self, key: &CacheKey, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        self.cache.insert(key.clone(), Arc::clone(&entry)).await;
        entry
    }

    /// A usable L1 entry that makes this fetch unnecessary, if any. Closes the
    /// race where another fetch stored the key after our caller looked but
    /// before we took the slot: without it, that key would be paid twice.
    async fn moot(&self, key: &CacheKey, trigger: &Trigger) -> Option<Arc<Entry>> {
        let current = self.cache.get(key).await?;
        trigger
            .satisfied_by(&current, SystemTime::now())
            .then_some(current)
    }

    /// Caches deterministic refusals as negative entries — unless a good
    /// entry exists, which a refusal never replaces.
    async fn declined(
        &self,
        key: &CacheKey,
        status: StatusCode,
        code: i64,
        body: Bytes,
    ) -> FetchResult {
        let deterministic = matches!(status.as_u16(), 400 | 404 | 422)
            || (status == StatusCode::OK && self.policy.negative_codes.contains(&code));
        let keeps_good_entry = match self.cache.get(key).await {
            Some(current) => !current.negative,
            None => false,
        };
        if deterministic && !keeps_good_entry && !self.policy.negative_ttl.is_zero() {
            tracing::info!(%key, status = status.as_u16(), code, "upstream refusal cached as negative entry");
            let entry = Entry::negative(status, body, &self.policy);
            return Ok(Fetched::Stored(self.store(key, entry).await));
        }
        tracing::info!(%key, status = status.as_u16(), code, "upstream refusal forwarded; not cached");
        Ok(Fetched::Declined { status, body })
    }
}
