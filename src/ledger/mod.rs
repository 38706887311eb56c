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
//! With Redis, the counters live there, and every money operation carries an
//! id: the script that moves the counters also records the operation's
//! outcome in `<prefix>op:<id>` (kept as long as the counters), so running it
//! again changes nothing. A reply later than `cache.redis.ledger_timeout` is
//! not guessed at: Redis may still have applied the operation. A charge whose
//! outcome is unknown is cancelled by its id before the call falls back to the
//! outage allowance or is refused (so a refusal is never charged), and a
//! refund Redis did not confirm waits in a small queue and is sent again, with
//! the same id, before the next charge.
//!
//! While Redis is unreachable a replica must not start spending a whole
//! budget again from a local count near zero: it refuses new upstream
//! questions unless `credits.outage_allowance` lets it spend that much per
//! budget and outage day. Each such charge is queued too and recorded in Redis
//! (by its id, on its own day's counters) once Redis answers again.
//!
//! A charge reserves its credits until it is settled (a call may wait for an
//! upstream slot meanwhile). A refusal that only those reservations cause
//! says so and asks to retry shortly; `/stats` shows reservations apart from
//! settled spend.
//!
//! By idea: `budget` counts a budget's day on this replica, `shared` holds
//! the Redis scripts and the operations not yet confirmed, `refusal` says why
//! no attempt was made; this file holds the payers, the [`Ledger`] and its
//! [`Charge`].

mod budget;
mod refusal;
mod shared;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use self::{
    budget::Day,
    shared::{MAX_PENDING, Op, OpKind, Outcome, READ_COUNTER, counter_key, new_op_id, send_charge},
};
use crate::{
    clock::{self, SharedClock},
    metrics::{Metrics, Scope},
    redis_conn::{Applied, RedisConn},
    spend::{SpendHistory, Tally},
};

pub use budget::{Account, Budget, DaySpend};
pub use refusal::Refusal;

/// Who starts an upstream fetch, and so whose budgets it draws on.
#[derive(Debug, Clone)]
pub enum Payer {
    /// A client request whose miss started the fetch: its account (a
    /// configured client's, or a token subject's; none for an anonymous
    /// caller) and the global budget.
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
#[derive(Debug, Clone, PartialEq, Eq)]
enum Counted {
    /// No budget applies.
    Nowhere,
    /// This replica's own counters (no Redis configured).
    Local,
    /// Redis's counters, by the operation with this id.
    Shared(String),
    /// This replica's outage allowance (Redis configured but unreachable);
    /// queued for Redis as the operation with this id.
    Outage(String),
}

/// The proxy's books: the global budget and where counts live.
pub struct Ledger {
    /// What each payer spent and was refused, per day.
    spend: Arc<SpendHistory>,
    /// `credits.daily_budget` (limit 0: none); a reload may change its limit.
    global: Budget,
    redis: Option<Arc<RedisConn>>,
    outage_allowance: AtomicU64,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    /// Money operations Redis has not confirmed, oldest first (at most [`MAX_PENDING`]).
    pending: Mutex<VecDeque<Op>>,
}

impl Ledger {
    /// Books with a global budget of `global` credits a day (0: none),
    /// counted in `redis` when given; every call kept and every refusal
    /// also goes into `spend`.
    pub fn new(
        spend: Arc<SpendHistory>,
        global: u64,
        redis: Option<Arc<RedisConn>>,
        outage_allowance: u64,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            spend,
            global: Budget::with_limit(global, Scope::Global, "global".into()),
            redis,
            outage_allowance: AtomicU64::new(outage_allowance),
            clock,
            metrics,
            pending: Mutex::default(),
        }
    }

    /// The global daily budget, if configured.
    pub fn global(&self) -> Option<&Budget> {
        Some(&self.global).filter(|g| g.limit() > 0)
    }

    /// New `credits.daily_budget` and `credits.outage_allowance` (a reload):
    /// today's count carries on against the new limit. Calls in progress
    /// settle against the budgets they were charged to.
    pub fn set_limits(&self, global: u64, outage_allowance: u64) {
        self.global.limit.store(global, Ordering::Relaxed);
        self.outage_allowance
            .store(outage_allowance, Ordering::Relaxed);
    }

    /// Takes one attempt's `cost` from every budget `payer` draws on, or
    /// refuses if any of them cannot afford it (then nothing is taken).
    pub async fn charge(&self, payer: &Payer, cost: u64) -> Result<Charge<'_>, Refusal> {
        let now = self.clock.now();
        let day = clock::utc_day(now);
        let global = self.global().is_some();
        let budgets = self.budgets(payer, global);
        let counted = if budgets.iter().all(Option::is_none) {
            Ok(Counted::Nowhere)
        } else if let Some(redis) = &self.redis {
            self.charge_shared(redis, &budgets, day, now, cost).await
        } else {
            self.charge_local(&budgets, day, now, cost)
        };
        let counted = counted.inspect_err(|_| self.spend.refused(self.tally(payer)))?;
        for budget in budgets.iter().flatten() {
            budget.reserve(cost);
        }
        Ok(Charge {
            ledger: self,
            payer: payer.clone(),
            cost,
            day,
            global,
            counted,
        })
    }

    /// Credits spent today from `budget` (cluster-wide with Redis), calls in
    /// progress included (see [`Budget::reserved`]).
    pub async fn spent_today(&self, budget: &Budget) -> u64 {
        let day = clock::utc_day(self.clock.now());
        if let Some(redis) = &self.redis {
            self.flush(redis).await;
            let read = READ_COUNTER.key(counter_key(redis, &budget.name, day));
            let count: Option<Option<i64>> = redis.invoke(&read).await;
            if let Some(count) = count {
                return u64::try_from(count.unwrap_or(0)).unwrap_or(0);
            }
            return budget.day(day).outage_spent;
        }
        budget.day(day).spent
    }

    /// Money operations this replica holds for Redis to confirm (refunds,
    /// cancellations, outage spend); 0 once Redis has answered them all.
    pub fn awaiting_redis(&self) -> usize {
        self.lock_pending().len()
    }

    /// Fetches this replica refused today for want of `budget`.
    pub fn refused_today(&self, budget: &Budget) -> u64 {
        budget.day(clock::utc_day(self.clock.now())).refused
    }

    /// The spend history's line of `payer`.
    fn tally<'a>(&'a self, payer: &'a Payer) -> &'a Tally {
        match payer {
            Payer::Request(account) => Account::tally_of(account.as_deref(), &self.spend),
            Payer::Warmup(account) => &account.tally,
            Payer::Proxy(_) => self.spend.refresh(),
        }
    }

    /// The payer's client budget, then the global one when `global` (it
    /// was on when the charge was made).
    fn budgets<'a>(&'a self, payer: &'a Payer, global: bool) -> [Option<&'a Budget>; 2] {
        [
            payer.account().and_then(|a| a.budget.as_ref()),
            Some(&self.global).filter(|_| global),
        ]
    }

    /// Counts a refusal by `budget` (holding `count`) of a call of `cost`.
    fn refuse(&self, budget: Option<&Budget>, count: u64, cost: u64, now: SystemTime) -> Refusal {
        let Some(budget) = budget else {
            return Refusal::LedgerUnavailable;
        };
        budget.day(clock::utc_day(now)).refused += 1;
        self.metrics.budget_refused(budget.scope);
        budget.refusal(count, cost, now)
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
        if let Some(index) = days.iter().position(|(b, d)| d.spent + cost > b.limit()) {
            let (budget, count) = (days[index].0, days[index].1.spent);
            drop(days);
            return Err(self.refuse(Some(budget), count, cost, now));
        }
        for (_, d) in &mut days {
            d.spent += cost;
        }
        Ok(Counted::Local)
    }

    /// Check-and-charge in Redis under a new operation id; on the outage
    /// allowance when Redis does not answer (after cancelling the charge if
    /// it may have been applied).
    async fn charge_shared(
        &self,
        redis: &RedisConn,
        budgets: &[Option<&Budget>; 2],
        day: u64,
        now: SystemTime,
        cost: u64,
    ) -> Result<Counted, Refusal> {
        // Unconfirmed operations go first; while Redis cannot take them it
        // is treated as away rather than handed one more of unknown fate.
        if self.flush(redis).await {
            let id = new_op_id();
            let names = budgets.iter().flatten().map(|b| b.name.as_str());
            let limits: Vec<u64> = budgets.iter().flatten().map(|b| b.limit()).collect();
            match send_charge(redis, &id, names, Some(&limits), day, cost).await {
                Applied::Answered(Some(Outcome::Charged)) => return Ok(Counted::Shared(id)),
                Applied::Answered(Some(Outcome::Refused { index, count })) => {
                    let refused = budgets.iter().flatten().nth(index).copied();
                    return Err(self.refuse(refused, count, cost, now));
                }
                Applied::NotSent => {}
                // A late (or unreadable) answer: Redis may hold the charge.
                Applied::Answered(_) | Applied::Unknown => {
                    tracing::warn!(
                        "credit charge not confirmed by Redis in time; cancelling it by its id"
                    );
                    self.refund(redis, Op::new(id, OpKind::Refund, budgets, day, cost))
                        .await;
                }
            }
        }
        self.charge_outage(budgets, day, cost)
    }

    /// Check-and-charge against the outage allowance while Redis is away;
    /// the charge is queued for Redis.
    fn charge_outage(
        &self,
        budgets: &[Option<&Budget>; 2],
        day: u64,
        cost: u64,
    ) -> Result<Counted, Refusal> {
        let mut days: Vec<_> = budgets.iter().flatten().map(|b| (*b, b.day(day))).collect();
        let over = |(b, d): &(&Budget, MutexGuard<'_, Day>)| {
            d.outage_spent + cost > self.outage_allowance.load(Ordering::Relaxed).min(b.limit())
        };
        if days.iter().any(over) {
            drop(days);
            tracing::warn!(
                "credit ledger (Redis) unreachable and outage allowance spent: refusing an upstream call"
            );
            return Err(Refusal::LedgerUnavailable);
        }
        let id = new_op_id();
        let record = Op::new(id.clone(), OpKind::Record, budgets, day, cost);
        if !self.enqueue(record) {
            drop(days);
            tracing::warn!(
                "credit ledger (Redis) unreachable and too much spend awaits it: refusing an upstream call"
            );
            return Err(Refusal::LedgerUnavailable);
        }
        for (_, d) in &mut days {
            d.outage_spent += cost;
        }
        Ok(Counted::Outage(id))
    }

    /// Sends a refund (or cancellation) now; queues it for another try with
    /// the same id if Redis does not confirm it.
    async fn refund(&self, redis: &RedisConn, mut op: Op) {
        if op.send(redis).await {
            return;
        }
        self.enqueue_refund(op);
    }

    /// Queues a refund; a full queue gives it up, leaving its credits counted.
    fn enqueue_refund(&self, op: Op) {
        let (id, cost) = (op.id.clone(), op.cost);
        if !self.enqueue(op) {
            tracing::error!(
                op = %id,
                credits = cost,
                "credit refund given up: too many await Redis; its credits stay counted"
            );
        }
    }

    /// Adds `op` to the operations awaiting Redis; false when full.
    fn enqueue(&self, op: Op) -> bool {
        let mut pending = self.lock_pending();
        if pending.len() >= MAX_PENDING {
            return false;
        }
        pending.push_back(op);
        true
    }

    /// Gives back an outage charge: forgotten if it never left the queue,
    /// else refunded by its id.
    fn withdraw_outage(&self, id: &str, budgets: &[Option<&Budget>; 2], day: u64, cost: u64) {
        {
            let mut pending = self.lock_pending();
            if let Some(index) = pending.iter().position(|op| op.id == id && !op.sent) {
                pending.remove(index);
                return;
            }
        }
        self.enqueue_refund(Op::new(id.to_owned(), OpKind::Refund, budgets, day, cost));
    }

    /// Sends the operations Redis has not confirmed, oldest first, each with
    /// its own id (so one already applied changes nothing); true when none is
    /// left.
    async fn flush(&self, redis: &RedisConn) -> bool {
        loop {
            let Some(mut op) = self.lock_pending().pop_front() else {
                return true;
            };
            if op.send(redis).await {
                tracing::info!(op = %op.id, kind = op.kind.as_str(), credits = op.cost, day = op.day, "money operation confirmed by the shared ledger");
                continue;
            }
            self.lock_pending().push_front(op);
            return false;
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, VecDeque<Op>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Credits taken for one attempt; [`Charge::settle`] keeps or returns them.
/// Until then (or until dropped) they count as reserved.
pub struct Charge<'a> {
    ledger: &'a Ledger,
    payer: Payer,
    cost: u64,
    day: u64,
    /// The global budget was on, and charged.
    global: bool,
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
            ledger.spend.spent(ledger.tally(&self.payer), cost);
            if let Some(account) = self.payer.account() {
                account.charged.inc_by(cost);
                account.spent.add(self.day, cost);
            }
            return;
        }
        let budgets = ledger.budgets(&self.payer, self.global);
        match &self.counted {
            Counted::Nowhere => {}
            Counted::Local => {
                for budget in budgets.iter().flatten() {
                    if let Some(mut d) = budget.on_day(self.day) {
                        d.spent = d.spent.saturating_sub(cost);
                    }
                }
            }
            Counted::Outage(id) => {
                for budget in budgets.iter().flatten() {
                    if let Some(mut d) = budget.on_day(self.day) {
                        d.outage_spent = d.outage_spent.saturating_sub(cost);
                    }
                }
                ledger.withdraw_outage(id, &budgets, self.day, cost);
            }
            Counted::Shared(id) => {
                if let Some(redis) = &ledger.redis {
                    let op = Op::new(id.clone(), OpKind::Refund, &budgets, self.day, cost);
                    ledger.refund(redis, op).await;
                }
            }
        }
    }
}

/// Ends the reservation, settled or not (a fetch task may be dropped).
impl Drop for Charge<'_> {
    fn drop(&mut self) {
        for budget in self
            .ledger
            .budgets(&self.payer, self.global)
            .into_iter()
            .flatten()
        {
            budget.release(self.cost);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{clock::ManualClock, metrics::Scope};

    /// A manual clock `secs` seconds before a UTC midnight.
    fn before_midnight(secs: u64) -> (Arc<ManualClock>, SharedClock) {
        let day = 24 * 3600;
        let manual = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(101 * day - secs),
        ));
        (manual.clone(), SharedClock::new(manual))
    }

    fn ledger(global: u64, clock: &SharedClock) -> Ledger {
        let metrics = Arc::new(Metrics::new(clock.clone()));
        let spend = Arc::new(SpendHistory::new(90, clock.clone(), None));
        Ledger::new(spend, global, None, 0, clock.clone(), metrics)
    }

    #[tokio::test]
    async fn charges_until_the_budget_is_spent_refunds_and_resets_at_utc_midnight() {
        let (manual, clock) = before_midnight(10);
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

    #[tokio::test]
    async fn a_refund_settled_after_midnight_leaves_the_new_day_alone() {
        let (manual, clock) = before_midnight(1);
        let ledger = ledger(4, &clock);
        let payer = Payer::Proxy(Initiator::Revalidate);
        let late = ledger.charge(&payer, 2).await.unwrap();
        manual.advance(Duration::from_secs(1));
        ledger.charge(&payer, 2).await.unwrap().settle(true).await;
        // Yesterday's charge never reached KeyAPI: yesterday gets it back.
        late.settle(false).await;
        let global = ledger.global().unwrap();
        assert_eq!(
            ledger.spent_today(global).await,
            2,
            "the new day keeps its count"
        );
        ledger.charge(&payer, 2).await.unwrap().settle(true).await;
        assert!(matches!(
            ledger.charge(&payer, 2).await.err(),
            Some(Refusal::Spent { .. })
        ));
    }

    #[tokio::test]
    async fn a_budget_held_by_calls_in_progress_is_told_apart_from_spent_money() {
        let clock = SharedClock::new(Arc::new(ManualClock::new(UNIX_EPOCH)));
        let ledger = ledger(4, &clock);
        let payer = Payer::Proxy(Initiator::Revalidate);
        let first = ledger.charge(&payer, 2).await.unwrap();
        let second = ledger.charge(&payer, 2).await.unwrap();
        let global = ledger.global().unwrap();
        assert_eq!(global.reserved(), 4);
        let refusal = ledger.charge(&payer, 2).await.err().unwrap();
        assert_eq!(
            refusal,
            Refusal::Reserved {
                scope: Scope::Global,
                limit: 4,
                reserved: 4
            }
        );
        assert_eq!(refusal.retry_after_secs(), 5);
        assert!(
            refusal
                .to_string()
                .contains("4 credits are reserved by calls in progress")
        );
        // One is given back, so a new call fits; the other is kept.
        first.settle(false).await;
        second.settle(true).await;
        ledger.charge(&payer, 2).await.unwrap().settle(true).await;
        assert_eq!(global.reserved(), 0);
        let refusal = ledger.charge(&payer, 2).await.err().unwrap();
        assert!(matches!(refusal, Refusal::Spent { .. }), "{refusal}");
    }

    #[test]
    fn outcomes_read_back_from_redis() {
        assert_eq!(Outcome::parse("charged"), Some(Outcome::Charged));
        assert_eq!(
            Outcome::parse("refused 2 18"),
            Some(Outcome::Refused {
                index: 1,
                count: 18
            })
        );
        for bad in ["refused 0 1", "refused 1", "charged 1", "", "OK"] {
            assert_eq!(Outcome::parse(bad), None, "{bad}");
        }
    }
}
