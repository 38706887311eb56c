//! What the proxy produces: why a fetch was started, what one shared fetch
//! produced for its waiters, how a request was answered, what a warm-up's
//! prefetch did, and why no answer could be produced.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use reqwest::StatusCode;

use crate::{
    cache::{Entry, Freshness},
    coalesce::Abandoned,
    directives::Directives,
    ledger, protect,
    served::CacheState,
    upstream::UpstreamError,
};

/// Why a fetch was started; decides whether a cached entry makes it moot.
#[derive(Debug, Clone)]
pub(super) enum Trigger {
    /// No usable entry: a fresh one stored meanwhile answers it, if it
    /// meets the request's directives.
    Miss(Directives),
    /// The client asked for a new answer: always call.
    ClientRefresh,
    /// Revalidating this entry: moot if a newer one was stored meanwhile.
    Background(Arc<Entry>),
    /// A warm-up: moot if an entry stays fresh this much longer.
    Warm { fresh_for: Duration },
}

impl Trigger {
    /// Whether `candidate` (found in L1 or L2) answers this fetch.
    pub(super) fn satisfied_by(&self, candidate: &Entry, now: SystemTime) -> bool {
        match self {
            Trigger::Miss(directives) => {
                let freshness = candidate.freshness(now);
                matches!(freshness, Freshness::Fresh { .. })
                    && directives.accepts(candidate.ttl, freshness)
            }
            Trigger::ClientRefresh => false,
            Trigger::Background(old) => candidate.stored_at > old.stored_at,
            Trigger::Warm { fresh_for } => candidate.remaining_ttl(now) >= *fresh_for,
        }
    }
}

/// What one shared fetch produced; cloned to every waiter.
#[derive(Debug, Clone)]
pub(super) enum Fetched {
    /// Fetched and stored (a success, or a negative entry).
    Stored(Arc<Entry>),
    /// A usable entry was already there: stored by a fetch that finished
    /// between our lookup and taking the single-flight slot, or by another
    /// replica (Redis tier).
    AlreadyCached(Arc<Entry>),
    /// KeyAPI's own refusal, forwarded but not cached.
    Declined { status: StatusCode, body: Bytes },
}

pub(super) type FetchResult = Result<Fetched, ProxyError>;

/// How a request was answered.
#[derive(Debug)]
pub enum Outcome {
    /// An answer from the cache (possibly just stored, possibly stale), as
    /// of `now` on the app's clock.
    Cached {
        entry: Arc<Entry>,
        state: CacheState,
        now: SystemTime,
    },
    /// KeyAPI refused the question itself and it is not cacheable.
    Declined { status: StatusCode, body: Bytes },
    /// `only-if-cached`, and no kept copy meets the request: nothing was
    /// asked of KeyAPI.
    NotCached,
}

/// What a warm-up's prefetch of one question did.
#[derive(Debug)]
pub enum Prefetch {
    /// A stored answer stays fresh long enough (memory or Redis): no call.
    Fresh,
    /// Fetched and stored by this prefetch (a call was paid).
    Fetched,
    /// Answered by a fetch already in flight (a client's, or another warm-up's).
    Joined,
    /// KeyAPI refused the question itself (paid, not stored).
    Declined,
    /// No answer: upstream failure, our protection or a budget (see the error).
    Failed(ProxyError),
}

/// Why no answer could be produced, by cause: what KeyAPI did, or our own
/// decision not to ask it (protection, a budget), or an internal failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// KeyAPI was asked and gave no forwardable answer.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Our protection declined the call; none was made.
    #[error(transparent)]
    Protection(#[from] protect::Refusal),
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
    /// A credit budget could not afford the call; none was made.
    #[error(transparent)]
    Budget(#[from] ledger::Refusal),
}

impl ProxyError {
    /// The HTTP status KeyAPI answered with, when it was asked and answered.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            Self::Upstream(e) => e.upstream_status(),
            Self::Protection(_) | Self::Abandoned(_) | Self::Budget(_) => None,
        }
    }
}
