//! The ledger: who pays for an upstream attempt, charged at the moment it is
//! sent, and the daily credit budgets that cap real spend.
//!
//! Money moves only here. A fetch calls [`Ledger::charge`] right before each
//! upstream attempt: every budget the [`Payer`] draws on is checked and
//! charged in one step (one Lua script with Redis, so replicas cannot
//! overspend together; one critical section without it). [`Charge::settle`]
//! then keeps the credits when the attempt reached KeyAPI (a timeout after
//! sending counts: KeyAPI may have billed it) and gives them back when it
//! never did (connect error). Hits, requests that join another request's
//! fetch, our own refusals and clients that leave before an attempt never
//! reach this module, so they cost nothing. Hence the invariant the tests
//! check: `credits_spent_total` = price × calls KeyAPI received, and each
//! budget's counter moves by exactly what its calls cost.
//!
//! With Redis, the counters live there. While Redis is unreachable a replica
//! must not start spending a whole budget again from a local count near zero:
//! it refuses new upstream questions unless `credits.outage_allowance` lets it
//! spend that much per budget and outage day; what it spends meanwhile is
//! added to Redis when Redis answers again.

use std::{
    sync::{Arc, LazyLock, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use redis::Script;

use crate::{
    cache::redis::RedisTier,
    clock::{self, SharedClock},
    metrics::{Metrics, Scope},
};

/// Adds to a per-day counter, setting its expiry when it is created.
static ADD_TO_COUNTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local v = redis.call("INCRBY", KEYS[1], ARGV[1]) if v == tonumber(ARGV[1]) then redis.call("EXPIRE", KEYS[1], ARGV[2]) end return v"#,
    )
});
/// Check-and-charge of one call on several per-day budget counters, all or
/// nothing. KEYS = counters; ARGV = cost, expiry (s), then each counter's
/// limit. Returns 0 when charged, else the 1-based index of the first counter
/// that cannot afford it.
static CHARGE_BUDGETS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local cost = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if tonumber(redis.call("GET", key) or "0") + cost > tonumber(ARGV[2 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call("INCRBY", key, cost) redis.call("EXPIRE", key, ARGV[2])
end
return 0"#,
    )
});
/// Per-day counters outlive their day a little, for late readers.
const COUNTER_TTL_SECS: u64 = 2 * 24 * 3600;

/// How long a client should wait while the shared ledger is unreachable.
const LEDGER_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why no upstream attempt was made for a payer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{} daily credit budget ({limit} credits) is spent; cached answers are still served, \
         new questions resume at 00:00 UTC (in {} s)",
        scope.possessive(),
        clock::ceil_secs(*retry_after)
    )]
    Spent {
        scope: Scope,
        limit: u64,
        retry_after: Duration,
    },
    #[error(
        "the shared credit ledger is unreachable, so new questions are paused; cached answers \
         are still served"
    )]
    LedgerUnavailable,
}

impl Refusal {
    /// Whole seconds to wait (at least 1), for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::Spent { retry_after, .. } => clock::ceil_secs(*retry_after),
            Self::LedgerUnavailable => LEDGER_RETRY_AFTER.as_secs(),
        }
    }

    /// Bounded label for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Spent {
                scope: Scope::Global,
                ..
            } => "global_budget",
            Self::Spent {
                scope: Scope::Client,
                ..
            } => "client_budget",
            Self::Spent {
                scope: Scope::Warmup,
                ..
            } => "warmup_allowance",
            Self::LedgerUnavailable => "ledger_unavailable",
        }
    }
}

/// One day of a budget as this replica sees it.
#[derive(Debug, Default, Clone, Copy)]
struct Day {
    day: u64,
    /// Credits spent today (the whole count without Redis).
    spent: u64,
    /// Fetches refused today.
    refused: u64,
    /// Credits spent today while Redis was unreachable (bounded by the allowance).
    outage_spent: u64,
    /// Credits counted here but not yet in Redis, and the day they belong to.
    unsynced: (u64, i64),
}

/// Credits that may be spent per UTC day, by the whole proxy or one client.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    scope: Scope,
    /// The counter's name in Redis (`global`, `client:<id>`).
    name: String,
    today: Mutex<Day>,
}

impl Budget {
    /// `None` when `limit` is 0 (no budget). `name` names its Redis counter.
    pub fn new(limit: u64, scope: Scope, name: String) -> Option<Self> {
        (limit > 0).then(|| Self {
            limit,
            scope,
            name,
            today: Mutex::new(Day::default()),
        })
    }

    /// Credits per day.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Today's entry, reset when the UTC day changed (unsynced counts are kept).
    fn day(&self, day: u64) -> MutexGuard<'_, Day> {
        let mut today = self.today.lock().unwrap_or_else(|e| e.into_inner());
        if today.day != day {
            *today = Day {
                day,
                unsynced: today.unsynced,
                ..Day::default()
            };
        }
        today
    }

    fn refusal(&self, now: SystemTime) -> Refusal {
        Refusal::Spent {
            scope: self.scope,
            limit: self.limit,
            retry_after: clock::until_utc_midnight(now),
        }
    }
}

/// A configured client's (or warm-up's) account: its budget and what it has been charged.
#[derive(Debug)]
pub struct Account {
    /// The client's configured id.
    pub id: Arc<str>,
    /// Its daily budget, if any.
    pub budget: Option<Budget>,
    /// `client_credits_spent_total{client}`: credits of calls it started.
    pub charged: Counter,
}

/// Who starts an upstream fetch, and so whose budgets it draws on.
#[derive(Debug, Clone)]
pub enum Payer {
    /// A client request whose miss started the fetch: its account (if
    /// clients are configured) and the global budget.
    Request(Option<Arc<Account>>),
    /// The proxy itself: the global budget only.
    Proxy(Initiator),
    /// A configured warm-up: its own allowance and the global budget.
    Warmup(Arc<Account>),
}

/// Why the proxy itself called KeyAPI; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// A stale-while-revalidate background refresh.
    Revalidate,
    /// Refresh-ahead of a hot entry late in its fresh life.
    RefreshAhead,
}

impl Payer {
    /// Bounded label for the `credits_spent_by_total{payer}` metric.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Request(_) => "request",
            Self::Proxy(Initiator::Revalidate) => "revalidate",
            Self::Proxy(Initiator::RefreshAhead) => "refresh_ahead",
            Self::Warmup(_) => "warmup",
        }
    }

    fn account(&self) -> Option<&Account> {
        match self {
            Self::Request(account) => account.as_deref(),
            Self::Warmup(account) => Some(account),
            Self::Proxy(_) => None,
        }
    }
}

/// Where a charge was counted, so a refund goes back to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// No budget applies.
    Nowhere,
    /// This replica's own counters (no Redis configured).
    Local,
    /// Redis's counters.
    Shared,
    /// This replica's outage allowance (Redis configured but unreachable).
    Outage,
}

/// The proxy's books: the global budget and where counts live.
pub struct Ledger {
    global: Option<Budget>,
    redis: Option<Arc<RedisTier>>,
    outage_allowance: u64,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl Ledger {
    /// Books with an optional global budget, counted in `redis` when given.
    pub fn new(
        global: Option<Budget>,
        redis: Option<Arc<RedisTier>>,
        outage_allowance: u64,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            global,
            redis,
            outage_allowance,
            clock,
            metrics,
        }
    }

    /// The global daily budget, if configured.
    pub fn global(&self) -> Option<&Budget> {
        self.global.as_ref()
    }

    /// Takes one attempt's `cost` from every budget `payer` draws on, or
    /// refuses if any of them cannot afford it (then nothing is taken).
    pub async fn charge(&self, payer: &Payer, cost: u64) -> Result<Charge<'_>, Refusal> {
        let now = self.clock.now();
        let day = clock::utc_day(now);
        let budgets = self.budgets(payer);
        let counted = if budgets.iter().all(Option::is_none) {
            Counted::Nowhere
        } else if let Some(redis) = &self.redis {
            self.sync(redis, &budgets).await;
            let limits = budgets.iter().flatten().map(|b| (b.name.as_str(), b.limit));
            match charge_budgets(redis, limits, day, cost).await {
                Some(None) => Counted::Shared,
                Some(Some(index)) => {
                    let refused = budgets.iter().flatten().nth(index);
                    return Err(self.refuse(refused.copied(), now));
                }
                None => self.charge_outage(&budgets, day, cost)?,
            }
        } else {
            self.charge_local(&budgets, day, now, cost)?
        };
        Ok(Charge {
            ledger: self,
            payer: payer.clone(),
            cost,
            day,
            counted,
        })
    }

    /// Credits spent today from `budget` (cluster-wide with Redis).
    pub async fn spent_today(&self, budget: &Budget) -> u64 {
        let day = clock::utc_day(self.clock.now());
        if let Some(redis) = &self.redis {
            self.sync(redis, &[Some(budget), None]).await;
            if let Some(total) = add_to_counter(redis, &budget.name, day, 0).await {
                return u64::try_from(total).unwrap_or(0);
            }
            return budget.day(day).outage_spent;
        }
        budget.day(day).spent
    }

    /// Fetches this replica refused today for want of `budget`.
    pub fn refused_today(&self, budget: &Budget) -> u64 {
        budget.day(clock::utc_day(self.clock.now())).refused
    }

    /// The payer's client budget, then the global one.
    fn budgets<'a>(&'a self, payer: &'a Payer) -> [Option<&'a Budget>; 2] {
        [
            payer.account().and_then(|a| a.budget.as_ref()),
            self.global.as_ref(),
        ]
    }

    fn refuse(&self, budget: Option<&Budget>, now: SystemTime) -> Refusal {
        let Some(budget) = budget else {
            return Refusal::LedgerUnavailable;
        };
        budget.day(clock::utc_day(now)).refused += 1;
        self.metrics.budget_refused(budget.scope);
        budget.refusal(now)
    }

    /// Check-and-charge on this replica's counters (no Redis): all or nothing.
    fn charge_local(
        &self,
        budgets: &[Option<&Budget>; 2],
        day: u64,
        now: SystemTime,
        cost: u64,
    ) -> Result<Counted, Refusal> {
        // Always client before global, so two charges never lock in opposite orders.
        let mut days: Vec<_> = budgets.iter().flatten().map(|b| (*b, b.day(day))).collect();
        if let Some(index) = days.iter().position(|(b, d)| d.spent + cost > b.limit) {
            let budget = days[index].0;
            drop(days);
            return Err(self.refuse(Some(budget), now));
        }
        for (_, d) in &mut days {
            d.spent += cost;
        }
        Ok(Counted::Local)
    }

    /// Check-and-charge against the outage allowance while Redis is away.
    fn charge_outage(
        &self,
        budgets: &[Option<&Budget>; 2],
        day: u64,
        cost: u64,
    ) -> Result<Counted, Refusal> {
        let mut days: Vec<_> = budgets.iter().flatten().map(|b| (*b, b.day(day))).collect();
        let over = |(b, d): &(&Budget, MutexGuard<'_, Day>)| {
            d.outage_spent + cost > self.outage_allowance.min(b.limit)
        };
        if days.iter().any(over) {
            drop(days);
            tracing::warn!(
                "credit ledger (Redis) unreachable and outage allowance spent: refusing an upstream call"
            );
            return Err(Refusal::LedgerUnavailable);
        }
        for (_, d) in &mut days {
            d.outage_spent += cost;
            add_unsynced(d, day, i64::try_from(cost).unwrap_or(i64::MAX));
        }
        Ok(Counted::Outage)
    }

    /// Adds what was counted here during an outage to Redis, once it answers.
    async fn sync(&self, redis: &RedisTier, budgets: &[Option<&Budget>; 2]) {
        for budget in budgets.iter().flatten() {
            let (day, delta) = {
                let mut today = budget.today.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::take(&mut today.unsynced)
            };
            if delta == 0 {
                continue;
            }
            if add_to_counter(redis, &budget.name, day, delta)
                .await
                .is_some()
            {
                tracing::info!(budget = %budget.name, credits = delta, "outage spend added to the shared ledger");
            } else {
                let mut today = budget.today.lock().unwrap_or_else(|e| e.into_inner());
                add_unsynced(&mut today, day, delta);
            }
        }
    }
}

/// `<prefix>count:<name>:<day>`: a budget's cluster-wide count of one UTC day.
fn counter_key(redis: &RedisTier, name: &str, day: u64) -> String {
    redis.namespaced(&format!("count:{name}:{day}"))
}

/// Adds `delta` to the counter `name` of UTC day `day`; returns the new
/// total, `None` if Redis failed.
async fn add_to_counter(redis: &RedisTier, name: &str, day: u64, delta: i64) -> Option<i64> {
    let mut invocation = ADD_TO_COUNTER.key(counter_key(redis, name, day));
    invocation.arg(delta).arg(COUNTER_TTL_SECS);
    redis.invoke(&invocation).await
}

/// Charges `cost` to every counter of `budgets` (name, limit) of `day` at
/// once, unless one of them would exceed its limit. `Some(None)` when
/// charged, `Some(Some(i))` when the `i`-th budget refused, `None` if Redis failed.
async fn charge_budgets<'a>(
    redis: &RedisTier,
    budgets: impl Iterator<Item = (&'a str, u64)>,
    day: u64,
    cost: u64,
) -> Option<Option<usize>> {
    let mut invocation = CHARGE_BUDGETS.prepare_invoke();
    invocation.arg(cost).arg(COUNTER_TTL_SECS);
    for (name, limit) in budgets {
        invocation.key(counter_key(redis, name, day)).arg(limit);
    }
    let refused: usize = redis.invoke(&invocation).await?;
    Some(refused.checked_sub(1))
}

/// Adds `delta` to the credits owed to Redis for `day` (an older day's debt
/// is overwritten only if it was already paid).
fn add_unsynced(d: &mut Day, day: u64, delta: i64) {
    if d.unsynced.1 == 0 || d.unsynced.0 == day {
        d.unsynced = (day, d.unsynced.1 + delta);
    }
}

/// Credits taken for one attempt; [`Charge::settle`] keeps or returns them.
pub struct Charge<'a> {
    ledger: &'a Ledger,
    payer: Payer,
    cost: u64,
    day: u64,
    counted: Counted,
}

impl Charge<'_> {
    /// Keeps the credits when the attempt `reached` KeyAPI (and books them on
    /// the metrics), else gives them back to every budget.
    pub async fn settle(self, reached: bool) {
        let ledger = self.ledger;
        let cost = self.cost;
        if reached {
            ledger.metrics.credits_spent(self.payer.as_str(), cost);
            if let Some(account) = self.payer.account() {
                account.charged.inc_by(cost);
            }
            return;
        }
        let signed = i64::try_from(cost).unwrap_or(i64::MAX);
        for budget in ledger.budgets(&self.payer).into_iter().flatten() {
            match self.counted {
                Counted::Nowhere => {}
                Counted::Local => {
                    let mut d = budget.day(self.day);
                    d.spent = d.spent.saturating_sub(cost);
                }
                Counted::Outage => {
                    let mut d = budget.day(self.day);
                    d.outage_spent = d.outage_spent.saturating_sub(cost);
                    add_unsynced(&mut d, self.day, -signed);
                }
                Counted::Shared => {
                    let refunded = match &ledger.redis {
                        Some(redis) => add_to_counter(redis, &budget.name, self.day, -signed).await,
                        None => None,
                    };
                    if refunded.is_none() {
                        add_unsynced(&mut budget.day(self.day), self.day, -signed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::clock::ManualClock;

    fn ledger(global: u64, clock: &SharedClock) -> Ledger {
        let metrics = Arc::new(Metrics::new(clock.clone()));
        let budget = Budget::new(global, Scope::Global, "global".into());
        Ledger::new(budget, None, 0, clock.clone(), metrics)
    }

    #[tokio::test]
    async fn charges_until_the_budget_is_spent_refunds_and_resets_at_utc_midnight() {
        let day = 24 * 3600;
        let manual = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(100 * day + day - 10),
        ));
        let clock = SharedClock::new(manual.clone());
        let ledger = ledger(4, &clock);
        let payer = Payer::Proxy(Initiator::Revalidate);
        ledger.charge(&payer, 2).await.unwrap().settle(true).await;
        // Never reached KeyAPI: given back.
        ledger.charge(&payer, 2).await.unwrap().settle(false).await;
        ledger.charge(&payer, 2).await.unwrap().settle(true).await;
        let refusal = ledger.charge(&payer, 2).await.err().unwrap();
        assert_eq!(refusal.retry_after_secs(), 10);
        let global = ledger.global().unwrap();
        assert_eq!(ledger.spent_today(global).await, 4);
        assert_eq!(ledger.refused_today(global), 1);
        manual.advance(Duration::from_secs(10));
        assert_eq!(ledger.spent_today(global).await, 0, "a new UTC day");
        assert!(ledger.charge(&payer, 2).await.is_ok());
    }
}
