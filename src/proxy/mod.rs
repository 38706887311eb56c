//! The request's story, route-independent: cache → single flight → upstream →
//! cache. Given a normalized [`CacheKey`] and its TTL, returns the answer and
//! how it was obtained, applying the freshness model of [`crate::cache`]:
//! fresh hits, stale-while-revalidate, stale-if-error, negative entries and
//! refresh-ahead, bent by the client's freshness directives
//! ([`crate::directives`]) only where the proxy's policy allows. Only the
//! fetch task ever writes the cache, and it never
//! replaces a good entry with a bad answer: a refusal after a stale success
//! is remembered for `negative_ttl` keeping that success, a refusal while a
//! success is fresh is forwarded and forgotten. The fetch charges the
//! [`Ledger`] for each upstream attempt as it is sent, on the account of the
//! [`Payer`] that started it; requests that join it pay nothing.
//!
//! `serve` does one cache lookup; a hit returns from there.
//!
//! The client's directives, decided per kept copy in `Proxy::judge`:
//! a copy they refuse (`max-age`, `min-fresh`, `max-stale`) is not served
//! without a call; a stale one still stands in if the call fails or no budget
//! can afford it, like any stale copy. A call for a key whose copy is
//! *fresh* is made only for a client that may refresh (as `no-cache`); for
//! others the fresh copy answers. `max-stale` and `only-if-cached` take
//! stale copies kept only for stale-if-error, without a call; nothing is
//! served past the windows. `only-if-cached` never causes a call, neither
//! its own nor a background refresh: the copy, or [`Outcome::NotCached`].
//!
//! `outcome` names what a request and a fetch produce; `fetch` is the fetch
//! task; this file decides, per request, what to serve and when to fetch.

mod fetch;
mod outcome;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use tracing::{Instrument, Span};

use self::{
    fetch::Fetcher,
    outcome::{FetchResult, Fetched, Trigger},
};
use crate::{
    cache::{CacheKey, Entry, Freshness, LocalCache, Tiers, redis::RedisTier},
    clock::SharedClock,
    coalesce::{Coalescer, Role},
    directives::Ask,
    ledger::{Initiator, Ledger, Payer},
    metrics::{Metrics, Scope},
    protect::Protection,
    route::Route,
    served::{Accepted, CacheState},
    upstream::Upstream,
};

pub use outcome::{Outcome, Prefetch, ProxyError};

/// How many times a follower handed its leader's own budget refusal joins
/// or leads again. Each time, a refused leader has left; a follower meeting
/// several in a row (a crowd of spent clients) stops rather than wait on.
const MAX_REJOINS: usize = 3;

/// What a kept copy does for one request ([`Proxy::judge`]).
enum Verdict {
    /// It answers (its hit counted, a background refresh started if due).
    Serve(Outcome),
    /// It does not: a call is needed. `fallback` is the copy when it may
    /// stand in should the call fail (a stale one); `fresh` says it was
    /// fresh (the call is then a refresh the client asked for).
    Call {
        fallback: Option<Arc<Entry>>,
        fresh: bool,
    },
}

/// Ties the cache, the single-flight map and the upstream client together.
pub struct Proxy {
    fetcher: Fetcher,
    inflight: Arc<Coalescer<CacheKey, FetchResult>>,
}

impl Proxy {
    /// A proxy over `cache`, with an optional shared Redis tier.
    pub(crate) fn new(
        tiers: Tiers,
        upstream: Upstream,
        protection: Protection,
        ledger: Ledger,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            fetcher: Fetcher {
                tiers,
                upstream: Arc::new(ArcSwap::from_pointee(upstream)),
                protection: Arc::new(ArcSwap::from_pointee(protection)),
                clock,
                ledger: Arc::new(ledger),
                metrics,
            },
            inflight: Arc::default(),
        }
    }

    /// This replica's memory tier (for operational endpoints).
    pub fn cache(&self) -> &LocalCache {
        self.fetcher.tiers.memory()
    }

    /// The Redis tier, when configured (operational endpoints, background tasks).
    pub fn redis(&self) -> Option<&Arc<RedisTier>> {
        self.fetcher.tiers.shared()
    }

    /// The books: budgets and what they spent (for operational endpoints).
    pub fn ledger(&self) -> &Ledger {
        &self.fetcher.ledger
    }

    /// Upstream protection state (for operational endpoints).
    pub(crate) fn protection(&self) -> Arc<Protection> {
        self.fetcher.protection.load_full()
    }

    /// The KeyAPI client new fetches use.
    pub fn upstream(&self) -> Arc<Upstream> {
        self.fetcher.upstream.load_full()
    }

    /// New `[upstream]` settings (a reload): fetches started from now on use
    /// `upstream`, and `protection` when given (new caps and breaker
    /// settings start with a closed circuit); fetches in flight finish with
    /// what they started with.
    pub(crate) fn reconfigure(&self, upstream: Upstream, protection: Option<Protection>) {
        self.fetcher.upstream.store(Arc::new(upstream));
        if let Some(protection) = protection {
            self.fetcher.protection.store(Arc::new(protection));
        }
    }

    /// Forgets `key` in every tier; returns how many tiers held it.
    pub async fn purge(&self, key: &CacheKey) -> u64 {
        self.fetcher.tiers.purge(key).await
    }

    /// Forgets every entry of the route at `path` (a reload removed it);
    /// returns how many memory held.
    pub async fn purge_route(&self, path: &str) -> u64 {
        self.fetcher.tiers.purge_route(path).await
    }

    /// Forgets every entry in every tier; returns the larger tier's count.
    pub async fn purge_all(&self) -> u64 {
        self.fetcher.tiers.purge_all().await
    }

    /// Resolves when no fetch (foreground or background) is in flight.
    pub async fn idle(&self) {
        self.inflight.idle().await;
    }

    /// Answers `key` as `ask` asks (its directives, its refresh
    /// permission). A fetch this request starts is charged to `payer`.
    pub async fn serve(
        &self,
        key: &CacheKey,
        route: &Arc<Route>,
        ask: &Ask,
        payer: Payer,
    ) -> Result<Outcome, ProxyError> {
        let refresh = ask.refresh();
        let (mut fallback, mut refused_fresh) = (None, refresh);
        let now = self.fetcher.clock.now();
        if !refresh && let Some(entry) = self.cache().get(key, now) {
            match self.judge(key, route, entry, ask, now) {
                Verdict::Serve(outcome) => return Ok(outcome),
                Verdict::Call { fallback: f, fresh } => (fallback, refused_fresh) = (f, fresh),
            }
        }
        if ask.directives.only_if_cached {
            return Ok(Box::pin(self.only_if_cached(key, route, ask, now)).await);
        }
        let trigger = if refresh {
            Trigger::ClientRefresh
        } else {
            Trigger::Miss(ask.directives)
        };
        // Boxed: the fetch's state would otherwise make every hit's future
        // (moved several times on its way into hyper's task) as large as a miss's.
        let (fetched, role) = Box::pin(self.fetch_shared(key, route, trigger, payer)).await;
        let now = self.fetcher.clock.now();
        match (fetched, fallback) {
            (Ok(Fetched::Stored(entry)), _) => {
                let state = match (role, refused_fresh) {
                    (Role::Follower, _) => CacheState::Collapsed,
                    (Role::Leader, true) => CacheState::Refreshed,
                    (Role::Leader, false) => CacheState::Stored,
                };
                Ok(cached(entry, state, now))
            }
            (Ok(Fetched::AlreadyCached(entry)), _) => Ok(cached(entry, CacheState::Hit, now)),
            (Ok(Fetched::Declined { status, body }), _) => Ok(Outcome::Declined { status, body }),
            (Err(ProxyError::Budget(refusal)), Some(stale)) => {
                tracing::info!(%key, reason = refusal.as_str(), "serving stale answer: no budget can afford a call");
                Ok(cached(stale, CacheState::StaleOverBudget, now))
            }
            (Err(error), Some(stale)) => {
                tracing::warn!(%key, error = %error, "serving stale answer because the upstream failed");
                let fwd_status = error.upstream_status();
                Ok(cached(stale, CacheState::StaleIfError { fwd_status }, now))
            }
            (Err(error), None) => Err(error),
        }
    }

    /// Whether the kept copy `entry` answers this request at `now`; if so,
    /// counts its hit and starts what the proxy's policy starts on such a
    /// hit (refresh-ahead, stale-while-revalidate), except for
    /// `only-if-cached`, which causes no call.
    fn judge(
        &self,
        key: &CacheKey,
        route: &Arc<Route>,
        entry: Arc<Entry>,
        ask: &Ask,
        now: SystemTime,
    ) -> Verdict {
        let directives = &ask.directives;
        let freshness = entry.freshness(now);
        let only_if_cached = directives.only_if_cached;
        match freshness {
            // A fresh copy the directives refuse still answers a client that
            // may not make the proxy call for it (and does not say it would
            // rather have no answer: only-if-cached).
            Freshness::Fresh { .. }
                if directives.accepts(entry.ttl, freshness)
                    || !(ask.may_refresh || only_if_cached) =>
            {
                let hits = entry.record_hit();
                if !only_if_cached {
                    self.maybe_refresh_ahead(key, route, &entry, hits, now);
                }
                Verdict::Serve(cached(entry, CacheState::Hit, now))
            }
            Freshness::Fresh { .. } => Verdict::Call {
                fallback: None,
                fresh: true,
            },
            Freshness::StaleWhileRevalidate { .. } if directives.accepts(entry.ttl, freshness) => {
                entry.record_hit();
                if only_if_cached {
                    let state = CacheState::StaleAccepted(Accepted::OnlyIfCached);
                    return Verdict::Serve(cached(entry, state, now));
                }
                self.revalidate(key, route, &entry, Initiator::Revalidate);
                Verdict::Serve(cached(entry, CacheState::Stale, now))
            }
            Freshness::StaleIfError { .. }
                if directives.takes_stale_if_error_copies()
                    && directives.accepts(entry.ttl, freshness) =>
            {
                entry.record_hit();
                let by = if only_if_cached {
                    Accepted::OnlyIfCached
                } else {
                    Accepted::MaxStale
                };
                Verdict::Serve(cached(entry, CacheState::StaleAccepted(by), now))
            }
            Freshness::StaleWhileRevalidate { .. } | Freshness::StaleIfError { .. } => {
                Verdict::Call {
                    fallback: Some(entry),
                    fresh: false,
                }
            }
            Freshness::Expired => Verdict::Call {
                fallback: None,
                fresh: false,
            },
        }
    }

    /// `only-if-cached` when memory had no copy that would do: another
    /// replica's copy in Redis may; nothing else may (no call, no charge).
    async fn only_if_cached(
        &self,
        key: &CacheKey,
        route: &Arc<Route>,
        ask: &Ask,
        now: SystemTime,
    ) -> Outcome {
        // `no-cache`, when honoured, refuses every kept copy.
        if !ask.refresh()
            && let Some(entry) = self.fetcher.tiers.shared_copy(key, now).await
            && let Verdict::Serve(outcome) = self.judge(key, route, entry, ask, now)
        {
            return outcome;
        }
        tracing::debug!(%key, "only-if-cached: no kept copy meets the request; not called");
        Outcome::NotCached
    }

    /// Runs or joins the one fetch of `key`. Joining is free and never refused
    /// by a budget: a follower whose leader's own budget (a client's, a token
    /// subject's, or a warm-up's allowance) refused tries again on its own account (it may
    /// lead this time, or join another). The global budget and an
    /// unreachable ledger refuse everyone alike: no second try.
    async fn fetch_shared(
        &self,
        key: &CacheKey,
        route: &Arc<Route>,
        trigger: Trigger,
        payer: Payer,
    ) -> (FetchResult, Role) {
        let mut rejoins = 0;
        loop {
            let result = self
                .inflight
                .run(key.clone(), |interest| {
                    let fetcher = self.fetcher.clone();
                    let route = Arc::clone(route);
                    // The fetch runs in its own task: its spans (upstream, Redis)
                    // nest under the request that leads it (none when not traced).
                    fetcher
                        .fetch(key.clone(), route, trigger.clone(), payer.clone(), interest)
                        .instrument(Span::current())
                })
                .await;
            let (fetched, role) = match result {
                Ok((fetched, role)) => (fetched, role),
                Err(abandoned) => (Err(abandoned.into()), Role::Follower),
            };
            let leaders_own_budget = matches!(
                &fetched,
                Err(ProxyError::Budget(refusal))
                    if matches!(refusal.scope(), Some(Scope::Client | Scope::Subject | Scope::Visitor | Scope::Warmup))
            );
            if role == Role::Follower && leaders_own_budget && rejoins < MAX_REJOINS {
                rejoins += 1;
                continue;
            }
            return (fetched, role);
        }
    }

    /// Makes sure `key` stays fresh for `fresh_for` from now, fetching it
    /// (through the same single flight as client requests, charged to
    /// `payer`) unless a stored answer already does.
    pub async fn prefetch(
        &self,
        key: &CacheKey,
        route: &Arc<Route>,
        fresh_for: Duration,
        payer: Payer,
    ) -> Prefetch {
        let trigger = Trigger::Warm { fresh_for };
        let now = self.fetcher.clock.now();
        if let Some(entry) = self.cache().get(key, now)
            && trigger.satisfied_by(&entry, now)
        {
            return Prefetch::Fresh;
        }
        match self.fetch_shared(key, route, trigger, payer).await {
            (Ok(Fetched::Stored(_)), Role::Leader) => Prefetch::Fetched,
            (Ok(Fetched::Stored(_)), Role::Follower) => Prefetch::Joined,
            (Ok(Fetched::AlreadyCached(_)), _) => Prefetch::Fresh,
            (Ok(Fetched::Declined { .. }), _) => Prefetch::Declined,
            (Err(error), _) => Prefetch::Failed(error),
        }
    }

    /// Refresh-ahead: a hot entry late in its fresh life is refreshed in the
    /// background so it never goes stale.
    fn maybe_refresh_ahead(
        &self,
        key: &CacheKey,
        route: &Arc<Route>,
        entry: &Arc<Entry>,
        hits: u64,
        now: SystemTime,
    ) {
        let policy = route.policy();
        let Some(fraction) = policy.refresh_ahead else {
            return;
        };
        if entry.negative {
            return;
        }
        if hits >= u64::from(policy.refresh_ahead_min_hits)
            && entry.age(now) >= entry.ttl.mul_f64(fraction)
        {
            self.revalidate(key, route, entry, Initiator::RefreshAhead);
        }
    }

    /// Starts one background refresh of `entry` (none if a fetch is running),
    /// charged to the global budget as the proxy's own call.
    fn revalidate(&self, key: &CacheKey, route: &Arc<Route>, entry: &Arc<Entry>, why: Initiator) {
        let trigger = Trigger::Background(Arc::clone(entry));
        let role = self.inflight.start(key.clone(), |interest| {
            let route = Arc::clone(route);
            self.fetcher
                .clone()
                .fetch(key.clone(), route, trigger, Payer::Proxy(why), interest)
        });
        if role == Role::Leader {
            tracing::debug!(%key, "background refresh started");
        }
    }
}

fn cached(entry: Arc<Entry>, state: CacheState, now: SystemTime) -> Outcome {
    Outcome::Cached { entry, state, now }
}
