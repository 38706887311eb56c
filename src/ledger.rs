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

use std::{
    collections::VecDeque,
    sync::{
        Arc, LazyLock, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use redis::Script;

use crate::{
    cache::redis::{Applied, RedisTier},
    clock::{self, SharedClock},
    metrics::{Metrics, Scope},
    spend::{SpendHistory, Tally},
};

/// Charges one money operation on several per-day counters, once. KEYS = the
/// operation's record, then the counters; ARGV = cost, expiry (s), mode:
/// `check` (all or nothing, within each counter's limit, ARGV[4..]) or
/// `record` (spend already made during an outage: no limit). An operation
/// already recorded returns its outcome and changes nothing. Outcomes:
/// `charged`, `refused <i> <count>` (the i-th counter, 1-based, held
/// `count`), or `cancelled` / `refunded` (a refund of this id came first).
static CHARGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local done = redis.call("GET", KEYS[1])
if done then return done end
local cost = tonumber(ARGV[1])
if ARGV[3] == "check" then
  for i = 2, #KEYS do
    local count = tonumber(redis.call("GET", KEYS[i]) or "0")
    if count + cost > tonumber(ARGV[2 + i]) then
      local refused = "refused " .. (i - 1) .. " " .. count
      redis.call("SET", KEYS[1], refused, "EX", ARGV[2])
      return refused
    end
  end
end
for i = 2, #KEYS do
  redis.call("INCRBY", KEYS[i], cost) redis.call("EXPIRE", KEYS[i], ARGV[2])
end
redis.call("SET", KEYS[1], "charged", "EX", ARGV[2])
return "charged""#,
    )
});
/// Gives a charge back, once. KEYS = the operation's record, then the
/// counters; ARGV = cost, expiry (s). A charge not (yet) made is recorded
/// `cancelled`, so a late copy of it does nothing; a refused, cancelled or
/// refunded one is left as it is. Returns the outcome.
static REFUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local done = redis.call("GET", KEYS[1])
if done == "charged" then
  for i = 2, #KEYS do redis.call("DECRBY", KEYS[i], ARGV[1]) end
  redis.call("SET", KEYS[1], "refunded", "EX", ARGV[2])
  return "refunded"
end
if done then return done end
redis.call("SET", KEYS[1], "cancelled", "EX", ARGV[2])
return "cancelled""#,
    )
});
/// One counter's value (nil when absent).
static READ_COUNTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(r#"return redis.call("GET", KEYS[1])"#));
/// Per-day counters outlive their day a little, for late readers; operation
/// records live as long, so no late copy of an operation outlives its record.
const COUNTER_TTL_SECS: u64 = 2 * 24 * 3600;
/// Money operations Redis has not confirmed, kept for another try. Outage
/// spend never overflows it (a full queue refuses the call); a refund that
/// does not fit is given up (its credits stay counted: the safe side).
const MAX_PENDING: usize = 1024;

/// How long a client should wait while the shared ledger is unreachable.
const LEDGER_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a client should wait when calls in progress hold the budget:
/// they settle within a fetch's time, often giving credits back.
const RESERVED_RETRY_AFTER: Duration = Duration::from_secs(5);

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
    /// The budget is taken up only because calls in progress reserved part
    /// of it; they may give it back.
    #[error(
        "{} daily credit budget ({limit} credits) is taken up for now: {reserved} credits are \
         reserved by calls in progress and may be given back; try again in a few seconds",
        scope.possessive()
    )]
    Reserved {
        scope: Scope,
        limit: u64,
        reserved: u64,
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
            Self::Reserved { .. } => RESERVED_RETRY_AFTER.as_secs(),
            Self::LedgerUnavailable => LEDGER_RETRY_AFTER.as_secs(),
        }
    }

    /// Whose budget refused (none when the ledger itself is unreachable).
    pub fn scope(&self) -> Option<Scope> {
        match self {
            Self::Spent { scope, .. } | Self::Reserved { scope, .. } => Some(*scope),
            Self::LedgerUnavailable => None,
        }
    }

    /// Bounded label for logs.
    pub fn as_str(&self) -> &'static str {
        match self.scope() {
            Some(Scope::Global) => "global_budget",
            Some(Scope::Client) => "client_budget",
            Some(Scope::Warmup) => "warmup_allowance",
            Some(Scope::Subject) => "subject_budget",
            Some(Scope::Visitor) => "visitor_budget",
            None => "ledger_unavailable",
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
}

/// Credits that may be spent per UTC day, by the whole proxy or one client.
#[derive(Debug)]
pub struct Budget {
    /// Credits per day; 0 = off (only the global budget, changed by a reload).
    limit: AtomicU64,
    scope: Scope,
    /// The counter's name in Redis (`global`, `client:<id>`).
    name: String,
    today: Mutex<Day>,
    /// Credits charged by this replica's calls not yet settled.
    reserved: AtomicU64,
}

impl Budget {
    /// `None` when `limit` is 0 (no budget). `name` names its Redis counter.
    pub fn new(limit: u64, scope: Scope, name: String) -> Option<Self> {
        (limit > 0).then(|| Self::with_limit(limit, scope, name))
    }

    fn with_limit(limit: u64, scope: Scope, name: String) -> Self {
        Self {
            limit: AtomicU64::new(limit),
            scope,
            name,
            today: Mutex::new(Day::default()),
            reserved: AtomicU64::new(0),
        }
    }

    /// Credits per day.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Starts from `previous`'s count of today (a reload replacing a
    /// client's or warm-up's account): a new limit, not a new day.
    pub fn carry_over(&self, previous: &Budget) {
        *self.lock_today() = *previous.lock_today();
    }

    /// Credits this replica's calls in progress have been charged but not
    /// yet settled (kept, or given back).
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// The entry of UTC day `day`, started afresh when `day` is a new one.
    /// It never goes back: a clock stepped back keeps counting on the newer
    /// day (which only errs on the side of spending less).
    fn day(&self, day: u64) -> MutexGuard<'_, Day> {
        let mut today = self.lock_today();
        if day > today.day {
            *today = Day {
                day,
                ..Day::default()
            };
        }
        today
    }

    /// The entry of `day` if it is still the current one: settling a charge
    /// of a day that has ended must not touch the new day's counts.
    fn on_day(&self, day: u64) -> Option<MutexGuard<'_, Day>> {
        Some(self.lock_today()).filter(|today| today.day == day)
    }

    fn lock_today(&self) -> MutexGuard<'_, Day> {
        self.today.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why this budget refuses a call of `cost` while it holds `count`:
    /// spent, or taken up only by this replica's calls in progress.
    fn refusal(&self, count: u64, cost: u64, now: SystemTime) -> Refusal {
        let reserved = self.reserved();
        let limit = self.limit();
        if reserved > 0 && count.saturating_sub(reserved) + cost <= limit {
            return Refusal::Reserved {
                scope: self.scope,
                limit,
                reserved,
            };
        }
        Refusal::Spent {
            scope: self.scope,
            limit,
            retry_after: clock::until_utc_midnight(now),
        }
    }
}

/// A configured client's (or warm-up's, or token subject's) account: its
/// budget and what it has been charged.
#[derive(Debug)]
pub struct Account {
    /// The client's configured id (a subject's ledger name).
    pub id: Arc<str>,
    /// Its daily budget, if any.
    pub budget: Option<Budget>,
    /// `client_credits_spent_total{client}` (for a subject, its issuer's
    /// `issuer_credits_spent_total{issuer}`): credits of calls it started.
    pub charged: Counter,
    /// Credits of its calls that reached KeyAPI today, on this replica
    /// (`/stats`'s top spenders; kept whether or not it has a budget).
    pub spent: DaySpend,
    /// Its payer's line in the spend history (a client's own; every
    /// subject of an issuer shares one, as every visitor does).
    pub tally: Arc<Tally>,
}

impl Account {
    /// Starts from `previous`'s counts of today: a reload replacing its
    /// configuration (a new limit) does not make a new day.
    pub fn carry_over(&self, previous: &Account) {
        if let (Some(budget), Some(old)) = (&self.budget, &previous.budget) {
            budget.carry_over(old);
        }
        *self.spent.lock() = *previous.spent.lock();
    }
}

/// Credits spent on one UTC day, started afresh on the next.
#[derive(Debug, Default)]
pub struct DaySpend(Mutex<(u64, u64)>);

impl DaySpend {
    /// Credits spent on `day` (0 if the tally is of another day).
    pub fn on(&self, day: u64) -> u64 {
        let (tally_day, credits) = *self.lock();
        if tally_day == day { credits } else { 0 }
    }

    /// Adds `cost` to `day`'s tally; an older day's is dropped first, and a
    /// charge of a day that has ended does not count on the new one.
    fn add(&self, day: u64, cost: u64) {
        let mut tally = self.lock();
        if day > tally.0 {
            *tally = (day, 0);
        }
        if day == tally.0 {
            tally.1 += cost;
        }
    }

    fn lock(&self) -> MutexGuard<'_, (u64, u64)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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

/// What a money operation does in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    /// Adds spend made during an outage (no limit: the call was made).
    Record,
    /// Gives a charge back, or cancels it if it was never made.
    Refund,
}

impl OpKind {
    /// Bounded label for logs.
    fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Refund => "refund",
        }
    }
}

/// A money operation Redis has not confirmed: on some budgets' counters of
/// one day, under its own id.
#[derive(Debug, Clone)]
struct Op {
    id: String,
    kind: OpKind,
    /// The counters' names (client budget first, then global).
    budgets: Vec<String>,
    day: u64,
    cost: u64,
    /// Sent at least once, so Redis may have applied it.
    sent: bool,
}

impl Op {
    fn new(id: String, kind: OpKind, budgets: &[Option<&Budget>; 2], day: u64, cost: u64) -> Self {
        Self {
            id,
            kind,
            budgets: budgets.iter().flatten().map(|b| b.name.clone()).collect(),
            day,
            cost,
            sent: false,
        }
    }

    /// Runs the operation (again: it is idempotent); true once Redis answered.
    async fn send(&mut self, redis: &RedisTier) -> bool {
        let names = self.budgets.iter().map(String::as_str);
        let applied = match self.kind {
            OpKind::Record => send_charge(redis, &self.id, names, None, self.day, self.cost).await,
            OpKind::Refund => send_refund(redis, &self.id, names, self.day, self.cost).await,
        };
        self.sent |= applied != Applied::NotSent;
        matches!(applied, Applied::Answered(_))
    }
}

/// What Redis recorded for a money operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Charged,
    /// The `index`-th counter (0-based) held `count`: too much for the cost.
    Refused {
        index: usize,
        count: u64,
    },
    Cancelled,
    Refunded,
}

impl Outcome {
    /// Reads a script's answer; `None` for anything else.
    fn parse(raw: &str) -> Option<Self> {
        let mut words = raw.split(' ');
        let outcome = match words.next()? {
            "charged" => Self::Charged,
            "cancelled" => Self::Cancelled,
            "refunded" => Self::Refunded,
            "refused" => Self::Refused {
                index: words.next()?.parse::<usize>().ok()?.checked_sub(1)?,
                count: words.next()?.parse().ok()?,
            },
            _ => return None,
        };
        words.next().is_none().then_some(outcome)
    }
}

/// The proxy's books: the global budget and where counts live.
pub struct Ledger {
    /// What each payer spent and was refused, per day.
    spend: Arc<SpendHistory>,
    /// `credits.daily_budget` (limit 0: none); a reload may change its limit.
    global: Budget,
    redis: Option<Arc<RedisTier>>,
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
        redis: Option<Arc<RedisTier>>,
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
            budget.reserved.fetch_add(cost, Ordering::Relaxed);
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
            Payer::Request(Some(account)) | Payer::Warmup(account) => &account.tally,
            Payer::Request(None) => self.spend.visitors(),
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
        redis: &RedisTier,
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
    async fn refund(&self, redis: &RedisTier, mut op: Op) {
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
    async fn flush(&self, redis: &RedisTier) -> bool {
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

/// A fresh money operation id.
fn new_op_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `<prefix>count:<name>:<day>`: a budget's cluster-wide count of one UTC day.
fn counter_key(redis: &RedisTier, name: &str, day: u64) -> String {
    redis.namespaced(&format!("count:{name}:{day}"))
}

/// `<prefix>op:<id>`: what became of one money operation.
fn op_key(redis: &RedisTier, id: &str) -> String {
    redis.namespaced(&format!("op:{id}"))
}

/// Runs [`CHARGE`] for operation `id` on the counters `names` of `day`:
/// checked against `limits` (one per counter) when given, else recorded.
async fn send_charge<'a>(
    redis: &RedisTier,
    id: &str,
    names: impl Iterator<Item = &'a str>,
    limits: Option<&[u64]>,
    day: u64,
    cost: u64,
) -> Applied<Option<Outcome>> {
    let mut invocation = CHARGE.key(op_key(redis, id));
    let mode = if limits.is_some() { "check" } else { "record" };
    invocation.arg(cost).arg(COUNTER_TTL_SECS).arg(mode);
    for name in names {
        invocation.key(counter_key(redis, name, day));
    }
    for limit in limits.unwrap_or_default() {
        invocation.arg(*limit);
    }
    let applied: Applied<String> = redis.invoke_ledger(&invocation).await;
    applied.map(|raw| Outcome::parse(&raw))
}

/// Runs [`REFUND`] for operation `id` on the counters `names` of `day`.
async fn send_refund<'a>(
    redis: &RedisTier,
    id: &str,
    names: impl Iterator<Item = &'a str>,
    day: u64,
    cost: u64,
) -> Applied<Option<Outcome>> {
    let mut invocation = REFUND.key(op_key(redis, id));
    invocation.arg(cost).arg(COUNTER_TTL_SECS);
    for name in names {
        invocation.key(counter_key(redis, name, day));
    }
    let applied: Applied<String> = redis.invoke_ledger(&invocation).await;
    applied.map(|raw| Outcome::parse(&raw))
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
            budget.reserved.fetch_sub(self.cost, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::clock::ManualClock;

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
