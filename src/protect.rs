//! Upstream protection, checked before every paid call: a hold after KeyAPI
//! answered 429, a spend-rate cap, a concurrency cap, and the circuit breaker.
//! A burst of misses therefore never becomes a burst of credits or sockets;
//! callers that cannot get through in `queue_timeout` get a fast refusal with
//! a `Retry-After`. Such a refusal is a [`Refusal`], our own decision,
//! never confused with what KeyAPI did ([`UpstreamError`]).
//!
//! The hold and the breaker's cool-down count on the app's clock (read only
//! while one is set), so tests move time instead of waiting. The spend cap
//! stays on `governor`'s own clock: its queue sleeps on real timers.

use std::{
    num::NonZeroU32,
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::{
    breaker::{Breaker, Pass},
    clock::{SharedClock, ceil_secs},
    config::UpstreamConfig,
    upstream::{UpstreamAnswer, UpstreamError},
};

/// Why protection declined to call KeyAPI: no call was made, nothing was
/// charged. Each carries the seconds a client should wait.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("holding back upstream calls after a 429 for {retry_after_secs} s more")]
    HeldBack { retry_after_secs: u64 },
    #[error("circuit open after repeated upstream failures; retry after {retry_after_secs} s")]
    CircuitOpen { retry_after_secs: u64 },
    #[error("too many upstream calls in flight")]
    Overloaded { retry_after_secs: u64 },
    #[error("upstream spend-rate cap reached; retry after {retry_after_secs} s")]
    SpendCap { retry_after_secs: u64 },
}

impl Refusal {
    /// Seconds a client should wait before retrying.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::HeldBack { retry_after_secs }
            | Self::CircuitOpen { retry_after_secs }
            | Self::Overloaded { retry_after_secs }
            | Self::SpendCap { retry_after_secs } => *retry_after_secs,
        }
    }

    /// Short, bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::HeldBack { .. } => "held_back",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Overloaded { .. } => "overloaded",
            Self::SpendCap { .. } => "spend_cap",
        }
    }
}

/// Longest hold we accept from a KeyAPI `Retry-After`.
const MAX_HOLD: Duration = Duration::from_secs(3600);

/// Gatekeeper for upstream calls.
#[derive(Debug)]
pub(crate) struct Protection {
    breaker: Breaker,
    in_flight: Semaphore,
    spend: Option<DefaultDirectRateLimiter>,
    queue_timeout: Duration,
    hold_until: Mutex<Option<SystemTime>>,
    clock: SharedClock,
}

/// Leave to make one call: holds a concurrency slot and a breaker pass.
#[derive(Debug)]
pub(crate) struct Admission<'a> {
    _slot: SemaphorePermit<'a>,
    pass: Pass<'a>,
    protection: &'a Protection,
}

impl Protection {
    /// From the `[upstream]` section, counting holds and cool-downs on `clock`.
    pub(crate) fn from_config(config: &UpstreamConfig, clock: SharedClock) -> Self {
        let spend = NonZeroU32::new(config.max_calls_per_minute)
            .map(|n| RateLimiter::direct(Quota::per_minute(n)));
        Self {
            breaker: Breaker::new(
                config.breaker_failures,
                config.breaker_cooldown,
                clock.clone(),
            ),
            in_flight: Semaphore::new(config.max_in_flight),
            spend,
            queue_timeout: config.queue_timeout,
            hold_until: Mutex::new(None),
            clock,
        }
    }

    /// Waits (at most `queue_timeout`) for leave to call upstream.
    pub(crate) async fn admit(&self) -> Result<Admission<'_>, Refusal> {
        if let Some(wait) = self.held_for() {
            return Err(Refusal::HeldBack {
                retry_after_secs: ceil_secs(wait),
            });
        }
        let queue_deadline = tokio::time::Instant::now() + self.queue_timeout;
        if let Some(spend) = &self.spend
            && tokio::time::timeout_at(queue_deadline, spend.until_ready())
                .await
                .is_err()
        {
            let now = DefaultClock::default().now();
            let wait = spend
                .check()
                .err()
                .map_or(Duration::from_secs(1), |not_until| {
                    not_until.wait_time_from(now)
                });
            return Err(Refusal::SpendCap {
                retry_after_secs: ceil_secs(wait),
            });
        }
        let slot = tokio::time::timeout_at(queue_deadline, self.in_flight.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Refusal::Overloaded {
                retry_after_secs: 1,
            })?;
        let pass = self
            .breaker
            .try_pass()
            .map_err(|open| Refusal::CircuitOpen {
                retry_after_secs: ceil_secs(open.retry_after),
            })?;
        Ok(Admission {
            _slot: slot,
            pass,
            protection: self,
        })
    }

    /// `closed`, `open` or `half_open`.
    pub(crate) fn circuit(&self) -> &'static str {
        self.breaker.state_str()
    }

    fn held_for(&self) -> Option<Duration> {
        let hold = *self.lock_hold();
        hold.and_then(|until| self.clock.left_until(until))
    }

    fn hold(&self, wait: Duration) {
        let until = self.clock.now() + wait.min(MAX_HOLD);
        let mut hold = self.lock_hold();
        if hold.is_none_or(|current| current < until) {
            tracing::warn!(?wait, "upstream rate limit: holding back upstream calls");
            *hold = Some(until);
        }
    }

    fn lock_hold(&self) -> MutexGuard<'_, Option<SystemTime>> {
        self.hold_until.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Admission<'_> {
    /// Reports the call's result to the breaker (and the hold, on a 429).
    pub(crate) fn settle(self, result: &Result<UpstreamAnswer, UpstreamError>) {
        let healthy = match result {
            Ok(_) => true,
            Err(UpstreamError::RateLimited { retry_after_secs }) => {
                self.protection.hold(Duration::from_secs(*retry_after_secs));
                true
            }
            Err(e) => !e.is_upstream_failure(),
        };
        self.pass.record(healthy);
    }

    /// Gives the leave back unused (nobody waits for the call any more).
    pub(crate) fn withdraw(self) {
        self.pass.withdraw();
    }
}
