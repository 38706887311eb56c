//! The data of the operational endpoints (`/stats`, `/`), apart from how
//! they render it ([`super::page`], served by [`crate::routes`]). It is recomputed at most
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
    api_key::KeyStatus,
    cache::{CacheKey, Entry, LocalCache},
    clock::{self, SharedClock},
    ledger::{Budget, Ledger},
    live::ReloadStats,
    metrics::history::Minute,
    metrics::{Scope, Totals},
    payers::{Spender, TOP_SPENDERS},
    redis_conn,
    route::Route,
    state::AppState,
    warmup::WarmupStats,
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

/// `/stats` and `/` data, recomputed at most once a second (one per router).
pub(crate) type StatsCell = Throttled<Stats>;

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

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Stats {
    pub(crate) uptime_secs: u64,
    pub(crate) started_at: u64,
    pub(crate) hit_ratio: Option<f64>,
    #[serde(flatten)]
    pub(crate) totals: Totals,
    /// Each configured route and its price per call.
    pub(crate) routes: Vec<RouteStats>,
    pub(crate) daily_budget: Option<u64>,
    /// Settled spend of the global budget today (cluster-wide with Redis).
    pub(crate) credits_spent_today: Option<u64>,
    /// Credits of the global budget held by this replica's calls in progress.
    pub(crate) credits_reserved: Option<u64>,
    /// Fetches this replica refused today because the global budget was spent.
    pub(crate) budget_refused_today: Option<u64>,
    pub(crate) cache_entries: u64,
    pub(crate) cache_bytes: u64,
    pub(crate) upstream: Upstream,
    /// `up` / `down` when the Redis tier is configured, else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis: Option<&'static str>,
    /// The Redis mode (`server`, `sentinel`, `cluster`) and each node, as
    /// this replica last probed it (with the Redis tier).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_tier: Option<redis_conn::Status>,
    /// Money operations awaiting Redis's confirmation (with the Redis tier).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ledger_awaiting_redis: Option<usize>,
    pub(crate) clients: Vec<ClientStats>,
    pub(crate) warmups: Vec<WarmupStats>,
    /// Today's top spenders among visitors and token subjects held by this
    /// replica (at most [`TOP_SPENDERS`]), most first.
    pub(crate) top_spenders: Vec<TopSpender>,
    pub(crate) top_keys: Vec<TopKey>,
    pub(crate) last_hour: Vec<Minute>,
    /// Credits spent and saved on each of the last [`RECENT_DAYS`](crate::spend::RECENT_DAYS) UTC days
    /// (cluster-wide with Redis), oldest first; empty if unreadable just now.
    pub(crate) spend_last_30_days: Vec<SpendDay>,
    /// Configuration reloads so far, by outcome, and the last one.
    pub(crate) reloads: ReloadStats,
    /// The KeyAPI key in use (its generation), rotations and rejections.
    pub(crate) api_key: KeyStatus,
}

/// One UTC day of the spend history, all payers together.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SpendDay {
    /// `YYYY-MM-DD`.
    pub(crate) day: String,
    pub(crate) credits_spent: u64,
    pub(crate) credits_saved: u64,
}

/// The last [`RECENT_DAYS`](crate::spend::RECENT_DAYS) days of `state`'s spend history.
async fn spend_days(state: &AppState) -> Vec<SpendDay> {
    let spend = state.spend();
    let today = spend.today();
    let from = spend.recent_from(today);
    let days = spend.days(from, today).await.unwrap_or_default();
    days.iter()
        .map(|day| {
            let total = day.total();
            SpendDay {
                day: clock::utc_date(day.day),
                credits_spent: total.credits_spent,
                credits_saved: total.credits_saved,
            }
        })
        .collect()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Upstream {
    /// `ok`, `failing` (the last call failed) or `unknown` (no call yet).
    pub(crate) status: &'static str,
    pub(crate) in_flight: u64,
    pub(crate) consecutive_failures: u64,
    pub(crate) last_success_secs_ago: Option<u64>,
    pub(crate) last_error_secs_ago: Option<u64>,
    pub(crate) last_error: Option<&'static str>,
    pub(crate) calls_last_hour: u64,
    /// Circuit breaker: `closed`, `open` or `half_open`.
    pub(crate) circuit: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RouteStats {
    pub(crate) path: &'static str,
    pub(crate) credits: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClientStats {
    pub(crate) id: String,
    pub(crate) requests: u64,
    pub(crate) credits_spent: u64,
    pub(crate) daily_budget: Option<u64>,
    /// Settled spend of this client's budget today (cluster-wide with Redis).
    pub(crate) credits_spent_today: Option<u64>,
    /// Credits of this client's budget held by this replica's calls in progress.
    pub(crate) credits_reserved: Option<u64>,
    /// Fetches this replica refused today because this client's budget was spent.
    pub(crate) budget_refused_today: Option<u64>,
}

/// One of today's top spenders among keyed payers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TopSpender {
    /// `visitor` or `subject`.
    pub(crate) kind: &'static str,
    /// A visitor's address prefix, or a subject's hashed name.
    pub(crate) label: String,
    /// Credits of its calls that reached KeyAPI today, on this replica.
    pub(crate) credits_spent_today: u64,
}

/// Today's top spenders among visitors and every issuer's subjects.
fn top_spenders(state: &AppState) -> Vec<TopSpender> {
    let mut all: Vec<(Spender, &'static str)> = state
        .visitors()
        .top_spenders(TOP_SPENDERS)
        .into_iter()
        .map(|s| (s, Scope::Visitor.as_str()))
        .collect();
    for issuer in state.issuers().issuers() {
        let subjects = issuer.top_spenders(TOP_SPENDERS).into_iter();
        all.extend(subjects.map(|s| (s, Scope::Subject.as_str())));
    }
    all.sort_by(|(a, _), (b, _)| b.credits.cmp(&a.credits).then(a.label.cmp(&b.label)));
    all.truncate(TOP_SPENDERS);
    all.into_iter()
        .map(|(s, kind)| TopSpender {
            kind,
            label: s.label.to_string(),
            credits_spent_today: s.credits,
        })
        .collect()
}

impl Stats {
    /// Everything `/stats` and `/` show, collected now.
    pub(crate) async fn collect(state: &AppState) -> Self {
        let metrics = state.metrics();
        let history = metrics.history();
        let clock = history.clock();
        let now = clock.now();
        let cache = state.proxy().cache();
        let ledger = state.proxy().ledger();
        let totals = metrics.totals();
        let answered = totals.hits + totals.misses;
        let last_hour = history.last_hour();
        let health = history.health();
        let ago = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs();
        let upstream = Upstream {
            status: match (&health.last_success, &health.last_error) {
                (None, None) => "unknown",
                _ if health.consecutive_failures > 0 => "failing",
                _ => "ok",
            },
            in_flight: totals.upstream_in_flight,
            consecutive_failures: health.consecutive_failures,
            last_success_secs_ago: health.last_success.map(ago),
            last_error_secs_ago: health.last_error.map(|(t, _)| ago(t)),
            last_error: health.last_error.map(|(_, kind)| kind),
            calls_last_hour: last_hour.iter().map(|m| m.upstream_calls).sum(),
            circuit: state.proxy().protection().circuit(),
        };
        let mut clients = Vec::new();
        for c in state.access().clients() {
            let budget = c.account.budget.as_ref();
            let (credits_spent_today, credits_reserved) = spent_today(ledger, budget).await;
            clients.push(ClientStats {
                id: c.id.to_string(),
                requests: c.requests.get(),
                credits_spent: c.account.charged.get(),
                daily_budget: budget.map(Budget::limit),
                credits_spent_today,
                credits_reserved,
                budget_refused_today: refused_today(ledger, budget),
            });
        }
        let (credits_spent_today, credits_reserved) = spent_today(ledger, ledger.global()).await;
        let mut warmups = Vec::new();
        for warmup in state.warmups() {
            warmups.push(warmup.stats(state.proxy()).await);
        }
        let summary = CacheSummary::of(cache, now).await;
        Self {
            uptime_secs: ago(history.started()),
            started_at: clock::unix_secs(history.started()),
            hit_ratio: (answered > 0).then(|| totals.hits as f64 / answered as f64),
            totals,
            routes: state
                .routes()
                .routes()
                .iter()
                .map(|r| RouteStats {
                    path: r.path(),
                    credits: r.credits(),
                })
                .collect(),
            daily_budget: ledger.global().map(Budget::limit),
            credits_spent_today,
            credits_reserved,
            budget_refused_today: refused_today(ledger, ledger.global()),
            cache_entries: summary.entries,
            cache_bytes: summary.bytes,
            upstream,
            redis: state
                .proxy()
                .redis()
                .map(|r| if r.conn().is_up() { "up" } else { "down" }),
            redis_tier: state.proxy().redis().map(|r| r.conn().status()),
            ledger_awaiting_redis: state.proxy().redis().map(|_| ledger.awaiting_redis()),
            clients,
            warmups,
            top_spenders: top_spenders(state),
            top_keys: summary.top_keys,
            last_hour,
            spend_last_30_days: spend_days(state).await,
            reloads: state.reloads().stats(),
            api_key: state.proxy().upstream().api_key().status(),
        }
    }
}

/// `budget`'s settled spend today and what calls in progress reserve of it:
/// a reservation may still be given back, so it is not shown as spent.
async fn spent_today(ledger: &Ledger, budget: Option<&Budget>) -> (Option<u64>, Option<u64>) {
    match budget {
        Some(budget) => {
            let charged = ledger.spent_today(budget).await;
            let reserved = budget.reserved();
            (Some(charged.saturating_sub(reserved)), Some(reserved))
        }
        None => (None, None),
    }
}

fn refused_today(ledger: &Ledger, budget: Option<&Budget>) -> Option<u64> {
    budget.map(|b| ledger.refused_today(b))
}
