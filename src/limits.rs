//! Rate limits (`governor`, GCRA) and daily credit budgets, global and per
//! client. Both answer 429 with `Retry-After`; a budget only refuses requests
//! that would go upstream, so cached answers keep flowing after it is spent.
//! Budgets are counted per UTC day of the app's [`SharedClock`]; with the
//! Redis tier they are counted in Redis so they hold across replicas (and
//! fall back to this replica's own count while Redis is unavailable).

use std::{
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed},
};

use crate::{
    cache::redis::RedisTier,
    clock::{self, SharedClock},
    metrics::Scope,
};

/// Why a request was refused with 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{} rate limit exceeded; retry in {} s", scope_text(*scope), secs(*retry_after))]
    Rate { scope: Scope, retry_after: Duration },
    #[error(
        "{} daily credit budget ({limit} credits) is spent; cached answers are still served, \
         new questions resume at 00:00 UTC (in {} s)",
        scope_text(*scope),
        secs(*retry_after)
    )]
    Budget {
        scope: Scope,
        limit: u64,
        retry_after: Duration,
    },
}

impl Refusal {
    /// Whole seconds to wait (at least 1), for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::Rate { retry_after, .. } | Self::Budget { retry_after, .. } => secs(*retry_after),
        }
    }
}

fn scope_text(scope: Scope) -> &'static str {
    match scope {
        Scope::Global => "the proxy's",
        Scope::Client => "this client's",
    }
}

fn secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// A request-rate limit: `per_minute` sustained, bursts of `burst`.
#[derive(Debug)]
pub struct RateLimit {
    limiter:
        RateLimiter<NotKeyed, InMemoryState, SharedClock, NoOpMiddleware<std::time::SystemTime>>,
    clock: SharedClock,
    scope: Scope,
    /// GCRA parameters for the cluster-wide check in Redis: (interval, burst).
    gcra: (Duration, u32),
    /// The Redis tier and this limit's name in it, when shared.
    shared: Option<(Arc<RedisTier>, String)>,
}

impl RateLimit {
    /// `None` when `per_minute` is 0 (no limit). `burst` 0 means `per_minute`.
    pub fn new(per_minute: u32, burst: u32, scope: Scope, clock: &SharedClock) -> Option<Self> {
        let per_minute = NonZeroU32::new(per_minute)?;
        let burst = NonZeroU32::new(burst).unwrap_or(per_minute);
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Some(Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock: clock.clone(),
            scope,
            gcra: (quota.replenish_interval(), burst.get()),
            shared: None,
        })
    }

    /// Counts this limit in the Redis tier under `name` (e.g. `global`, `client:<id>`),
    /// so it holds for the whole cluster. Costs one Redis round trip per request.
    pub fn shared(mut self, redis: Option<&Arc<RedisTier>>, name: &str) -> Self {
        self.shared = redis.map(|r| (Arc::clone(r), name.to_owned()));
        self
    }

    /// Takes one request's cell, or says how long to wait. Shared limits are
    /// checked in Redis; while it is unavailable, this replica's own limiter decides.
    pub async fn check(&self) -> Result<(), Refusal> {
        if let Some((redis, name)) = &self.shared {
            let (interval, burst) = self.gcra;
            if let Some(wait) = redis.gcra(name, self.clock.now(), interval, burst).await {
                return match wait {
                    None => Ok(()),
                    Some(retry_after) => Err(Refusal::Rate {
                        scope: self.scope,
                        retry_after,
                    }),
                };
            }
        }
        self.limiter.check().map_err(|not_until| Refusal::Rate {
            scope: self.scope,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }
}

/// Credits that may be spent per UTC day.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    scope: Scope,
    /// (UTC day, credits spent that day) on this replica.
    spent: Mutex<(u64, u64)>,
    /// The cluster-wide counter (Redis tier) and this budget's name in it.
    shared: Option<(Arc<RedisTier>, String)>,
}

/// Where a reservation was counted, so it is given back to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Shared,
    Local,
}

impl Budget {
    /// `None` when `limit` is 0 (no budget).
    pub fn new(limit: u64, scope: Scope) -> Option<Self> {
        (limit > 0).then(|| Self {
            limit,
            scope,
            spent: Mutex::new((0, 0)),
            shared: None,
        })
    }

    /// Counts this budget in the Redis tier under `name` (e.g. `global`, `client:<id>`).
    pub fn shared(mut self, redis: Option<&Arc<RedisTier>>, name: &str) -> Self {
        self.shared = redis.map(|r| (Arc::clone(r), name.to_owned()));
        self
    }

    /// Credits per day.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Credits spent on the UTC day of `clock` (cluster-wide with Redis).
    pub async fn spent_today(&self, clock: &SharedClock) -> u64 {
        let day = clock::utc_day(clock.now());
        if let Some((redis, name)) = &self.shared
            && let Some(total) = redis.add_to_counter(name, day, 0).await
        {
            return u64::try_from(total).unwrap_or(0);
        }
        let spent = self.lock();
        if spent.0 == day { spent.1 } else { 0 }
    }

    /// Reserves `cost` credits today, or refuses until midnight.
    async fn reserve(&self, cost: u64, clock: &SharedClock) -> Result<Counted, Refusal> {
        let now = clock.now();
        let day = clock::utc_day(now);
        let refusal = Refusal::Budget {
            scope: self.scope,
            limit: self.limit,
            retry_after: clock::until_utc_midnight(now),
        };
        let signed = i64::try_from(cost).unwrap_or(i64::MAX);
        if let Some((redis, name)) = &self.shared
            && let Some(total) = redis.add_to_counter(name, day, signed).await
        {
            if u64::try_from(total).unwrap_or(0) > self.limit {
                redis.add_to_counter(name, day, -signed).await;
                return Err(refusal);
            }
            return Ok(Counted::Shared);
        }
        self.reserve_local(cost, day).map_err(|()| refusal)?;
        Ok(Counted::Local)
    }

    /// Gives back a reservation that was not spent (same day only).
    async fn release(&self, cost: u64, counted: Counted, clock: &SharedClock) {
        let day = clock::utc_day(clock.now());
        match (counted, &self.shared) {
            (Counted::Shared, Some((redis, name))) => {
                let signed = i64::try_from(cost).unwrap_or(i64::MAX);
                redis.add_to_counter(name, day, -signed).await;
            }
            _ => self.release_local(cost, day),
        }
    }

    fn reserve_local(&self, cost: u64, day: u64) -> Result<(), ()> {
        let mut spent = self.lock();
        if spent.0 != day {
            *spent = (day, 0);
        }
        if spent.1 + cost > self.limit {
            return Err(());
        }
        spent.1 += cost;
        Ok(())
    }

    fn release_local(&self, cost: u64, day: u64) {
        let mut spent = self.lock();
        if spent.0 == day {
            spent.1 = spent.1.saturating_sub(cost);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, u64)> {
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Credits reserved for one miss in up to two budgets; [`Reservation::settle`]
/// keeps them when the request made an upstream call, else gives them back.
#[derive(Debug)]
pub struct Reservation<'a> {
    cost: u64,
    budgets: Vec<(&'a Budget, Counted)>,
}

impl<'a> Reservation<'a> {
    /// Reserves `cost` in the client's budget, then the global one.
    pub async fn reserve(
        client: Option<&'a Budget>,
        global: Option<&'a Budget>,
        cost: u64,
        clock: &SharedClock,
    ) -> Result<Self, Refusal> {
        let mut reservation = Self {
            cost,
            budgets: Vec::with_capacity(2),
        };
        for budget in [client, global].into_iter().flatten() {
            match budget.reserve(cost, clock).await {
                Ok(counted) => reservation.budgets.push((budget, counted)),
                Err(refusal) => {
                    reservation.settle(false, clock).await;
                    return Err(refusal);
                }
            }
        }
        Ok(reservation)
    }

    /// Keeps the credits when `paid`, else returns them.
    pub async fn settle(self, paid: bool, clock: &SharedClock) {
        if !paid {
            for (budget, counted) in self.budgets {
                budget.release(self.cost, counted, clock).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{sync::Arc, time::UNIX_EPOCH};

    use super::*;
    use crate::clock::ManualClock;

    fn clock_at(secs: u64) -> (Arc<ManualClock>, SharedClock) {
        let manual = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(secs)));
        let shared = SharedClock::new(manual.clone());
        (manual, shared)
    }

    #[test]
    fn rate_limit_trips_after_the_burst_and_refills() {
        let (manual, clock) = clock_at(1_000_000);
        let limit = RateLimit::new(3, 0, Scope::Global, &clock).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let check = || rt.block_on(limit.check());
        for _ in 0..3 {
            assert!(check().is_ok());
        }
        let refusal = check().unwrap_err();
        assert_eq!(refusal.retry_after_secs(), 20);
        manual.advance(Duration::from_secs(20));
        assert!(check().is_ok());
        assert!(check().is_err());
        assert!(RateLimit::new(0, 5, Scope::Global, &clock).is_none());
    }

    #[test]
    fn budgets_reset_at_utc_midnight_and_can_be_released() {
        let day = 24 * 3600;
        let (manual, clock) = clock_at(100 * day + day - 10);
        let budget = Budget::new(4, Scope::Client).unwrap();
        let reserve = |cost| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(Reservation::reserve(Some(&budget), None, cost, &clock))
                .map(|r| rt.block_on(r.settle(true, &clock)))
        };
        assert!(reserve(2).is_ok());
        assert!(reserve(2).is_ok());
        let refusal = reserve(2).unwrap_err();
        assert_eq!(refusal.retry_after_secs(), 10);
        budget.release_local(2, clock::utc_day(clock.now()));
        assert_eq!(budget.lock().1, 2);
        manual.advance(Duration::from_secs(10));
        assert!(reserve(4).is_ok(), "a new UTC day");
    }
}
