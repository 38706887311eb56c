//! Budgets and accounts: credits that may be spent per UTC day, by the whole
//! proxy or one payer, counted on this replica (and, with Redis, shared).

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use prometheus_client::metrics::counter::Counter;

use super::refusal::Refusal;
use crate::{
    clock,
    metrics::Scope,
    spend::{SpendHistory, Tally},
};

/// One day of a budget as this replica sees it.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Day {
    pub(super) day: u64,
    /// Credits spent today (the whole count without Redis).
    pub(super) spent: u64,
    /// Fetches refused today.
    pub(super) refused: u64,
    /// Credits spent today while Redis was unreachable (bounded by the allowance).
    pub(super) outage_spent: u64,
}

/// What a budget has counted: shared by the budgets a reload puts in each
/// other's place, so a call still in flight settles on the count the new
/// one reads.
#[derive(Debug, Default)]
struct Count {
    today: Mutex<Day>,
    /// Credits charged by this replica's calls not yet settled.
    reserved: AtomicU64,
}

/// Credits that may be spent per UTC day, by the whole proxy or one client.
#[derive(Debug)]
pub struct Budget {
    /// Credits per day; 0 = off (only the global budget, changed by a reload).
    pub(super) limit: AtomicU64,
    pub(super) scope: Scope,
    /// The counter's name in Redis (`global`, `client:<id>`).
    pub(super) name: String,
    count: Arc<Count>,
}

impl Budget {
    /// `None` when `limit` is 0 (no budget). `name` names its Redis counter.
    pub fn new(limit: u64, scope: Scope, name: String) -> Option<Self> {
        (limit > 0).then(|| Self::with_limit(limit, scope, name))
    }

    /// A budget of `limit` credits a day, 0 included (off until a reload sets one).
    pub(super) fn with_limit(limit: u64, scope: Scope, name: String) -> Self {
        Self {
            limit: AtomicU64::new(limit),
            scope,
            name,
            count: Arc::default(),
        }
    }

    /// Credits per day.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Goes on counting with `previous` (the budget of the client or
    /// warm-up a reload replaces): a new limit, not a new day.
    fn continuing(mut self, previous: &Budget) -> Self {
        self.count = Arc::clone(&previous.count);
        self
    }

    /// Credits this replica's calls in progress have been charged but not
    /// yet settled (kept, or given back).
    pub fn reserved(&self) -> u64 {
        self.count.reserved.load(Ordering::Relaxed)
    }

    /// A call of `cost` is charged and in progress.
    pub(super) fn reserve(&self, cost: u64) {
        self.count.reserved.fetch_add(cost, Ordering::Relaxed);
    }

    /// A call of `cost` has settled (kept, or given back).
    pub(super) fn release(&self, cost: u64) {
        self.count.reserved.fetch_sub(cost, Ordering::Relaxed);
    }

    /// The entry of UTC day `day`, started afresh when `day` is a new one.
    /// It never goes back: a clock stepped back keeps counting on the newer
    /// day (which only errs on the side of spending less).
    pub(super) fn day(&self, day: u64) -> MutexGuard<'_, Day> {
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
    pub(super) fn on_day(&self, day: u64) -> Option<MutexGuard<'_, Day>> {
        Some(self.lock_today()).filter(|today| today.day == day)
    }

    fn lock_today(&self) -> MutexGuard<'_, Day> {
        self.count.today.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why this budget refuses a call of `cost` while it holds `count`:
    /// spent, or taken up only by this replica's calls in progress.
    pub(super) fn refusal(&self, count: u64, cost: u64, now: SystemTime) -> Refusal {
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
    /// The spend-history line of a request paid by `account`: its own, or
    /// the visitors' as a whole for a caller without one.
    pub fn tally_of<'a>(account: Option<&'a Self>, spend: &'a SpendHistory) -> &'a Tally {
        account.map_or(spend.visitors(), |account| &account.tally)
    }

    /// Goes on from `previous`'s counts of today (the account a reload
    /// replaces): a new configuration, not a new day. Its budget shares the
    /// old one's count, so calls still in flight settle where it reads.
    pub fn continuing(mut self, previous: Option<&Account>) -> Self {
        if let Some(previous) = previous {
            self.budget = self.budget.map(|budget| match &previous.budget {
                Some(old) => budget.continuing(old),
                None => budget,
            });
            *self.spent.lock() = *previous.spent.lock();
        }
        self
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
    pub(super) fn add(&self, day: u64, cost: u64) {
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
