//! One single-flight fetch, in its own task: the kept copy (moot?), another
//! replica's answer or lock, then KeyAPI, each attempt charged to its payer
//! and traced as a span; only this task writes the cache.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use reqwest::StatusCode;
use tokio::time::Instant;
use tracing::{Instrument, Span, field::Empty};

use super::outcome::{FetchResult, Fetched, Trigger};
use crate::{
    cache::{CacheKey, Consulted, Entry, FreshnessPolicy, Tiers, is_cacheable_refusal},
    clock::SharedClock,
    coalesce::{Abandoned, Interest},
    ledger::{Charge, Ledger, Payer},
    metrics::Metrics,
    protect::Protection,
    route::Route,
    spans::TRACE_TARGET,
    upstream::{Upstream, UpstreamAnswer, UpstreamError},
};

/// Everything a fetch task needs; cheap to clone into it.
#[derive(Clone)]
pub(super) struct Fetcher {
    pub(super) tiers: Tiers,
    /// Replaced by a reload ([`super::Proxy::reconfigure`]); each fetch
    /// takes the current one once, so a call in flight keeps its settings.
    pub(super) upstream: Arc<ArcSwap<Upstream>>,
    pub(super) protection: Arc<ArcSwap<Protection>>,
    pub(super) clock: SharedClock,
    pub(super) ledger: Arc<Ledger>,
    pub(super) metrics: Arc<Metrics>,
}

/// The span of upstream attempt number `attempt` (0 = the first call).
pub(super) fn attempt_span(attempt: u32) -> Span {
    tracing::info_span!(
        target: TRACE_TARGET,
        "upstream",
        otel.name = "GET KeyAPI",
        otel.kind = "client",
        keyapi.attempt = i64::from(attempt) + 1,
        keyapi.retry = attempt > 0,
        keyapi.credits = Empty,
        keyapi.outcome = Empty,
        http.response.status_code = Empty,
    )
}

/// Writes an attempt's outcome on its span: KeyAPI's status when it answered,
/// and the credits the attempt was charged (numbers as `i64`: OpenTelemetry
/// has no unsigned attribute).
pub(super) fn record_attempt(
    span: &Span,
    result: &Result<UpstreamAnswer, UpstreamError>,
    credits: u64,
) {
    span.record("keyapi.credits", i64::try_from(credits).unwrap_or(i64::MAX));
    let (outcome, status) = match result {
        Ok(UpstreamAnswer::Success(_)) => ("success", Some(200)),
        Ok(answer @ UpstreamAnswer::Declined { status, .. }) => {
            (answer.as_str(), Some(status.as_u16()))
        }
        Err(error) => (error.as_str(), error.upstream_status()),
    };
    span.record("keyapi.outcome", outcome);
    if let Some(status) = status {
        span.record("http.response.status_code", i64::from(status));
    }
}

impl Fetcher {
    /// The body of one single-flight fetch; runs in its own task.
    /// Order: L1 (moot?) → L2 (another replica's answer, or its lock) → KeyAPI.
    pub(super) async fn fetch(
        self,
        key: CacheKey,
        route: Arc<Route>,
        trigger: Trigger,
        payer: Payer,
        interest: Interest<CacheKey, FetchResult>,
    ) -> FetchResult {
        if let Some(entry) = self.moot(&key, &trigger) {
            return Ok(Fetched::AlreadyCached(entry));
        }
        let usable = |e: &Entry| trigger.satisfied_by(e, self.clock.now());
        let turn = match self.tiers.consult_shared(&key, usable).await {
            Consulted::Usable(entry) => return Ok(Fetched::AlreadyCached(entry)),
            turn => turn,
        };
        let result = self.call_upstream(&key, &route, &payer, &interest).await;
        self.tiers.release(&key, turn).await;
        result
    }

    /// One guarded upstream call (with its retries); stores what deserves
    /// storing. The first attempt's credits are taken before protection may
    /// queue it, so concurrent fetches cannot overspend a budget together,
    /// and given back if every client has gone by the time it may be sent.
    async fn call_upstream(
        &self,
        key: &CacheKey,
        route: &Route,
        payer: &Payer,
        interest: &Interest<CacheKey, FetchResult>,
    ) -> FetchResult {
        let cost = route.credits();
        let charge = self.ledger.charge(payer, cost).await.inspect_err(|refusal| {
            tracing::info!(%key, reason = refusal.as_str(), "upstream call refused by a credit budget");
        })?;
        let (upstream, protection) = (self.upstream.load_full(), self.protection.load_full());
        let admission = match protection.admit().await {
            Ok(admission) => admission,
            Err(error) => {
                charge.settle(false).await;
                self.metrics.upstream_refused(error.as_str());
                tracing::warn!(%key, error = %error, "upstream call refused by protection");
                return Err(error.into());
            }
        };
        if interest.withdraw_if_unwanted() {
            admission.withdraw();
            charge.settle(false).await;
            tracing::info!(%key, "upstream call not made: every client of this fetch has gone");
            return Err(Abandoned.into());
        }
        let result = (self.attempts(&upstream, key, payer, cost, charge, interest)).await;
        admission.settle(&result);
        match result {
            Ok(UpstreamAnswer::Success(body)) => {
                let now = self.clock.now();
                let entry = Entry::success(body, route.ttl(key, now), route.policy(), now);
                Ok(Fetched::Stored(self.tiers.store(key, entry).await))
            }
            Ok(UpstreamAnswer::Declined { status, code, body }) => {
                self.declined(key, route.policy(), status, code, body).await
            }
            Err(error) => {
                tracing::warn!(%key, error = %error, kind = error.as_str(), "upstream call failed; not cached");
                Err(error.into())
            }
        }
    }

    /// Attempts until one answers or must not be retried, all within the
    /// request timeout. Each attempt is charged as it is sent (`charge` pays
    /// for the first) and kept only if it reached KeyAPI; a retry the budgets
    /// cannot afford is not made, nor one that nobody waits for any more
    /// (every client of the fetch has gone; background fetches always retry).
    /// A key KeyAPI rejects after it was replaced (a rotation) is tried once
    /// more, at once, with the current key.
    async fn attempts(
        &self,
        upstream: &Upstream,
        key: &CacheKey,
        payer: &Payer,
        cost: u64,
        mut charge: Charge<'_>,
        interest: &Interest<CacheKey, FetchResult>,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        let deadline = Instant::now() + upstream.request_timeout();
        let (mut attempt, mut api_key, mut rekeyed) = (0, upstream.api_key().current(), false);
        loop {
            let call = self.metrics.upstream_call();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let span = attempt_span(attempt);
            let result = upstream
                .attempt(key.path_and_query(), &api_key, remaining)
                .instrument(span.clone())
                .await;
            call.finish(
                result
                    .as_ref()
                    .map(UpstreamAnswer::as_str)
                    .map_err(UpstreamError::as_str),
            );
            let reached = result
                .as_ref()
                .err()
                .is_none_or(UpstreamError::reached_upstream);
            record_attempt(&span, &result, if reached { cost } else { 0 });
            charge.settle(reached).await;
            let Err(error) = &result else { return result };
            let newer_key = match error {
                UpstreamError::KeyRejected(_) if !rekeyed => upstream.api_key().rejected(&api_key),
                _ => None,
            };
            let backoff = match newer_key {
                Some(newer) => {
                    (api_key, rekeyed) = (newer, true);
                    Some(Duration::ZERO)
                }
                None => upstream.backoff(attempt, error, deadline),
            };
            let Some(backoff) = backoff else {
                return result;
            };
            attempt += 1;
            tokio::time::sleep(backoff).await;
            if interest.withdraw_if_unwanted() {
                tracing::info!(%key, error = %error, "retry not made: every client of this fetch has gone");
                return result;
            }
            charge = match self.ledger.charge(payer, cost).await {
                Ok(charge) => charge,
                Err(refusal) => {
                    tracing::info!(%key, reason = refusal.as_str(), "retry refused by a credit budget");
                    return result;
                }
            };
            tracing::info!(%key, error = %error, attempt, ?backoff, "retrying upstream call");
            self.metrics.upstream_retry();
        }
    }

    /// A usable L1 entry that makes this fetch unnecessary, if any. Closes the
    /// race where another fetch stored the key after our caller looked but
    /// before we took the slot: without it, that key would be paid twice.
    fn moot(&self, key: &CacheKey, trigger: &Trigger) -> Option<Arc<Entry>> {
        let now = self.clock.now();
        let current = self.tiers.get(key, now)?;
        trigger.satisfied_by(&current, now).then_some(current)
    }

    /// Caches deterministic refusals as negative entries — unless a fresh
    /// success exists, which a refusal never replaces. A stale success (in
    /// any tier, or kept by the refusal it follows) is kept by the new
    /// refusal: it serves again once the refusal expires, so N requests
    /// within `negative_ttl` pay once and stale-if-error still works after.
    async fn declined(
        &self,
        key: &CacheKey,
        policy: &FreshnessPolicy,
        status: StatusCode,
        code: i64,
        body: Bytes,
    ) -> FetchResult {
        let deterministic = is_cacheable_refusal(status, code, &policy.negative_codes);
        if !deterministic || policy.negative_ttl.is_zero() {
            tracing::info!(%key, status = status.as_u16(), code, "upstream refusal forwarded; not cached");
            return Ok(Fetched::Declined { status, body });
        }
        let now = self.clock.now();
        let success = self.tiers.held(key, now).await.and_then(|current| {
            if current.negative {
                current.kept().cloned()
            } else {
                Some(current)
            }
        });
        let success = success.filter(|s| !s.remaining_lifetime(now).is_zero());
        if success.as_ref().is_some_and(|s| s.is_fresh(now)) {
            tracing::info!(%key, status = status.as_u16(), code, "upstream refusal forwarded; a fresh answer is kept");
            return Ok(Fetched::Declined { status, body });
        }
        tracing::info!(%key, status = status.as_u16(), code, keeps_stale = success.is_some(), "upstream refusal cached as negative entry");
        let entry = Entry::negative(status, body, policy, now).keeping(success);
        Ok(Fetched::Stored(self.tiers.store(key, entry).await))
    }
}
