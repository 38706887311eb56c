//! Request-rate limits (`governor`, GCRA), global and per client: over the
//! limit, 429 with `Retry-After`. They count with the app's [`SharedClock`];
//! with the Redis tier they are counted in Redis so they hold across replicas
//! (and fall back to this replica's own limiter while Redis is unavailable).
//! Credit budgets are the ledger's ([`crate::ledger`]).

use std::{
    num::NonZeroU32,
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use governor::{
    Quota, RateLimiter,
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed},
};
use redis::Script;

use crate::{
    clock::{SharedClock, ceil_secs},
    metrics::Scope,
    redis_conn::RedisConn,
};

/// A request refused with 429 by a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} rate limit exceeded; retry in {} s", scope.possessive(), ceil_secs(*retry_after))]
pub struct RateLimited {
    pub scope: Scope,
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds to wait (at least 1), for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after)
    }
}

/// GCRA rate limit: ARGV = now, interval, burst (microseconds, count). Returns
/// 0 when the request may pass (and records it), else microseconds to wait.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local now = tonumber(ARGV[1]) local t = tonumber(ARGV[2]) local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call("GET", KEYS[1]) or "0") if tat < now then tat = now end
local new_tat = tat + t local allow_at = new_tat - burst * t
if allow_at > now then return allow_at - now end
redis.call("SET", KEYS[1], new_tat, "PX", math.ceil((new_tat - now) / 1000) + 1000) return 0"#,
    )
});

/// One request against the cluster-wide GCRA limit `name`
/// (`<prefix>rate:<name>`): `Some(None)` to pass, `Some(Some(wait))` to
/// refuse, `None` if Redis failed.
async fn gcra(
    redis: &RedisConn,
    name: &str,
    now: SystemTime,
    interval: Duration,
    burst: u32,
) -> Option<Option<Duration>> {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let now = micros(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    let mut invocation = GCRA.key(redis.key(&format!("rate:{name}")));
    invocation.arg(now).arg(micros(interval)).arg(burst);
    let wait: i64 = redis.invoke(&invocation).await?;
    Some((wait > 0).then(|| Duration::from_micros(wait.unsigned_abs())))
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
    shared: Option<(Arc<RedisConn>, String)>,
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
    pub fn shared(mut self, redis: Option<&Arc<RedisConn>>, name: &str) -> Self {
        self.shared = redis.map(|r| (Arc::clone(r), name.to_owned()));
        self
    }

    /// Takes one request's cell, or says how long to wait. Shared limits are
    /// checked in Redis; while it is unavailable, this replica's own limiter decides.
    pub async fn check(&self) -> Result<(), RateLimited> {
        if let Some((redis, name)) = &self.shared {
            let (interval, burst) = self.gcra;
            // Boxed: a Redis call's future would enlarge every request's
            // future, shared limit or not; next to a round trip a box is free.
            let shared = Box::pin(gcra(redis, name, self.clock.now(), interval, burst));
            if let Some(wait) = shared.await {
                return match wait {
                    None => Ok(()),
                    Some(retry_after) => Err(RateLimited {
                        scope: self.scope,
                        retry_after,
                    }),
                };
            }
        }
        self.limiter.check().map_err(|not_until| RateLimited {
            scope: self.scope,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
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
}
