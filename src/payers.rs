//! Keyed payers: callers the proxy knows only by a key it derives per
//! request (a signed token's subject, a visitor's address prefix), each a
//! payer of its own with the same three limits: a request rate (and burst)
//! and a daily credit budget, drawn on together with the global budget (see
//! [`crate::ledger`]). Both [`crate::issuers`] and [`crate::visitors`] keep
//! theirs here.
//!
//! Their state is kept in a bounded cache (`quick_cache`, S3-FIFO): when it
//! is full, payers not seen again lately are forgotten first, and a flood of
//! new keys seen once displaces mostly its own kind, not the payers that keep
//! coming back. With Redis, their counters live there under the payer's
//! (hashed) name and expire with their window, so forgetting loses nothing;
//! without it, a forgotten payer's rate and day count start afresh when it
//! comes back.

use std::{convert::Infallible, hash::Hash, sync::Arc};

use prometheus_client::metrics::counter::Counter;

use crate::{
    clock::{self, SharedClock},
    ledger::{Account, Budget, DaySpend},
    limits::RateLimit,
    metrics::{ClientCounters, Scope},
    redis_conn::RedisConn,
    spend::Tally,
};

/// Spenders shown by `/stats`, at most.
pub const TOP_SPENDERS: usize = 10;

/// The limits every payer of one kind gets (0 = none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Requests per minute.
    pub rate_per_minute: u32,
    /// Requests allowed at once (0 = `rate_per_minute`).
    pub burst: u32,
    /// Credits its misses may spend per UTC day.
    pub daily_budget: u64,
}

/// One keyed payer: its limits' state and its account.
#[derive(Debug)]
pub struct KeyedPayer {
    /// Its name on the ledger, in Redis and in the access log, e.g.
    /// `subject:<issuer>:<hash>` or `visitor:<hash>`: never a raw subject or address.
    pub id: Arc<str>,
    /// What `/stats` shows for it: the id, or a visitor's address prefix.
    pub label: Arc<str>,
    /// Its request rate limit, if its kind sets one.
    pub rate: Option<RateLimit>,
    /// What its requests' fetches are charged to: its budget, its kind's spend.
    pub account: Arc<Account>,
    /// Its kind's request counter (`issuer_requests_total{issuer}`, `visitor_requests_total`).
    pub requests: Counter,
}

/// One of today's top spenders, as `/stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spender {
    /// A visitor's address prefix, or a subject's hashed name.
    pub label: Arc<str>,
    /// Credits its calls that reached KeyAPI cost today (on this replica).
    pub credits: u64,
}

/// The payers of one kind seen lately, by key, at most `capacity`.
pub struct KeyedPayers<K> {
    limits: Limits,
    scope: Scope,
    tracked: quick_cache::sync::Cache<K, Arc<KeyedPayer>>,
    counters: ClientCounters,
    /// Their kind's line in the spend history (one for all of them).
    tally: Arc<Tally>,
    clock: SharedClock,
    redis: Option<Arc<RedisConn>>,
}

impl<K: Eq + Hash + Clone> KeyedPayers<K> {
    /// An empty set whose payers get `limits`, refusals counted under
    /// `scope`, their spend history all in `tally`.
    pub fn new(
        limits: Limits,
        capacity: usize,
        scope: Scope,
        counters: ClientCounters,
        tally: Arc<Tally>,
        clock: &SharedClock,
        redis: Option<&Arc<RedisConn>>,
    ) -> Self {
        Self {
            limits,
            scope,
            tracked: quick_cache::sync::Cache::new(capacity),
            counters,
            tally,
            clock: clock.clone(),
            redis: redis.cloned(),
        }
    }

    /// Payers this replica holds state for (at most its capacity).
    pub fn len(&self) -> usize {
        self.tracked.len()
    }

    /// True when no payer is held.
    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }

    /// The payer of `key`, if it is still held (not counted as a sighting).
    pub fn peek(&self, key: &K) -> Option<Arc<KeyedPayer>> {
        self.tracked.peek(key)
    }

    /// The payer of `key`, created (named by `names`: its id and label) when
    /// seen for the first time or again after being forgotten.
    pub fn get(&self, key: &K, names: impl FnOnce() -> (String, String)) -> Arc<KeyedPayer> {
        let payer = self
            .tracked
            .get_or_insert_with(key, || Ok::<_, Infallible>(self.create(names)));
        match payer {
            Ok(payer) => payer,
            Err(never) => match never {},
        }
    }

    /// Today's top spenders held by this replica, most first, at most `n`.
    pub fn top_spenders(&self, n: usize) -> Vec<Spender> {
        let today = clock::utc_day(self.clock.now());
        let mut top: Vec<Spender> = self
            .tracked
            .iter()
            .filter_map(|(_, payer)| {
                let credits = payer.account.spent.on(today);
                (credits > 0).then(|| Spender {
                    label: Arc::clone(&payer.label),
                    credits,
                })
            })
            .collect();
        top.sort_by(|a, b| b.credits.cmp(&a.credits).then(a.label.cmp(&b.label)));
        top.truncate(n);
        top
    }

    fn create(&self, names: impl FnOnce() -> (String, String)) -> Arc<KeyedPayer> {
        let (name, label) = names();
        let id = Arc::<str>::from(name.as_str());
        let Limits {
            rate_per_minute,
            burst,
            daily_budget,
        } = self.limits;
        let rate = RateLimit::new(rate_per_minute, burst, self.scope, &self.clock)
            .map(|l| l.shared(self.redis.as_ref(), &name));
        Arc::new(KeyedPayer {
            rate,
            account: Arc::new(Account {
                budget: Budget::new(daily_budget, self.scope, name),
                charged: self.counters.credits_spent.clone(),
                spent: DaySpend::default(),
                tally: Arc::clone(&self.tally),
            }),
            requests: self.counters.requests.clone(),
            label: Arc::from(label),
            id,
        })
    }
}
