//! The request's story, route-independent: cache → single flight → upstream →
//! cache. Given a normalized [`CacheKey`] and its TTL, returns the answer and
//! how it was obtained.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use reqwest::StatusCode;

use crate::{
    cache::{CacheKey, Entry, LocalCache},
    cache_status::CacheState,
    coalesce::{Abandoned, Coalescer, Role},
    upstream::{Upstream, UpstreamAnswer, UpstreamError},
};

/// What one shared fetch produced; cloned to every waiter.
#[derive(Debug, Clone)]
enum Fetched {
    /// Fetched and stored by this fetch.
    Stored(Arc<Entry>),
    /// Found in the cache by the fetch task itself: another fetch stored it
    /// between our cache miss and taking the single-flight slot.
    AlreadyCached(Arc<Entry>),
    /// KeyAPI's own refusal, forwarded but not cached.
    Declined { status: StatusCode, body: Bytes },
}

type FetchResult = Result<Fetched, UpstreamError>;

/// How a request was answered.
#[derive(Debug)]
pub enum Outcome {
    /// An answer that is in the cache.
    Cached {
        entry: Arc<Entry>,
        state: CacheState,
    },
    /// KeyAPI refused the question itself (4xx or `code != 0`); not cached.
    Declined { status: StatusCode, body: Bytes },
}

/// Why no answer could be produced.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
}

/// Ties the cache, the single-flight map and the upstream client together.
pub struct Proxy {
    cache: LocalCache,
    inflight: Arc<Coalescer<CacheKey, FetchResult>>,
    upstream: Arc<Upstream>,
}

impl Proxy {
    /// A proxy over an empty cache.
    pub fn new(cache: LocalCache, upstream: Upstream) -> Self {
        Self {
            cache,
            inflight: Arc::default(),
            upstream: Arc::new(upstream),
        }
    }

    /// The cache (for operational endpoints).
    pub fn cache(&self) -> &LocalCache {
        &self.cache
    }

    /// Answers `key`. With `refresh`, skips the cache lookup (still single flight).
    pub async fn serve(
        &self,
        key: &CacheKey,
        ttl: Duration,
        refresh: bool,
    ) -> Result<Outcome, ProxyError> {
        if !refresh && let Some(entry) = self.cache.get(key).await {
            return Ok(Outcome::Cached {
                entry,
                state: CacheState::Hit,
            });
        }
        let (fetched, role) = self
            .inflight
            .run(key.clone(), || {
                fetch_and_store(
                    self.cache.clone(),
                    Arc::clone(&self.upstream),
                    key.clone(),
                    ttl,
                    refresh,
                )
            })
            .await?;
        Ok(match fetched? {
            Fetched::Stored(entry) => {
                let state = match (role, refresh) {
                    (Role::Follower, _) => CacheState::Collapsed,
                    (Role::Leader, true) => CacheState::Refreshed,
                    (Role::Leader, false) => CacheState::Stored,
                };
                Outcome::Cached { entry, state }
            }
            Fetched::AlreadyCached(entry) => Outcome::Cached {
                entry,
                state: CacheState::Hit,
            },
            Fetched::Declined { status, body } => Outcome::Declined { status, body },
        })
    }
}

/// The body of one single-flight fetch; runs in its own task.
async fn fetch_and_store(
    cache: LocalCache,
    upstream: Arc<Upstream>,
    key: CacheKey,
    ttl: Duration,
    refresh: bool,
) -> FetchResult {
    // Closes the race where another fetch stored the key after our caller's
    // miss but before we took the slot: without it, that key is paid twice.
    if !refresh && let Some(entry) = cache.get(&key).await {
        return Ok(Fetched::AlreadyCached(entry));
    }
    match upstream.fetch(&key).await {
        Ok(UpstreamAnswer::Success(body)) => {
            let entry = Arc::new(Entry::new(body, ttl));
            cache.insert(key, Arc::clone(&entry)).await;
            Ok(Fetched::Stored(entry))
        }
        Ok(UpstreamAnswer::Declined { status, body }) => {
            tracing::info!(%key, status = status.as_u16(), "upstream declined; not cached");
            Ok(Fetched::Declined { status, body })
        }
        Err(error) => {
            tracing::warn!(%key, error = %error, kind = error.as_str(), "upstream call failed; not cached");
            Err(error)
        }
    }
}
