//! In-memory history for `/stats` and the status page: a ring of 60
//! one-minute buckets (requests, hits, upstream calls, credits) and the
//! upstream's recent health. Fed by [`super::Metrics`]; bounded in
//! size whatever the traffic.

use std::{
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use serde::Serialize;

use crate::clock::{self, SharedClock};

/// Minutes kept.
pub(crate) const MINUTES: usize = 60;

/// One minute of traffic.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Minute {
    /// Minutes since the Unix epoch (UTC).
    pub(crate) minute: u64,
    /// Requests of the proxied route answered.
    pub(crate) requests: u64,
    /// Of those, answered from the cache.
    pub(crate) hits: u64,
    /// Upstream calls finished.
    pub(crate) upstream_calls: u64,
    /// Credits those calls cost.
    pub(crate) credits_spent: u64,
}

/// What we last saw of KeyAPI.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpstreamHealth {
    pub(crate) last_success: Option<SystemTime>,
    pub(crate) last_error: Option<(SystemTime, &'static str)>,
    pub(crate) consecutive_failures: u64,
}

#[derive(Debug)]
struct Inner {
    ring: [Minute; MINUTES],
    health: UpstreamHealth,
}

/// The history of one running proxy.
#[derive(Debug)]
pub(crate) struct History {
    clock: SharedClock,
    started: SystemTime,
    inner: Mutex<Inner>,
}

impl History {
    /// Empty history starting now.
    pub(crate) fn new(clock: SharedClock) -> Self {
        Self {
            started: clock.now(),
            clock,
            inner: Mutex::new(Inner {
                ring: [Minute::default(); MINUTES],
                health: UpstreamHealth::default(),
            }),
        }
    }

    /// The clock this history counts with.
    pub(crate) fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// When the proxy started.
    pub(crate) fn started(&self) -> SystemTime {
        self.started
    }

    /// Counts one answered request of the proxied route.
    pub(crate) fn request(&self, hit: bool) {
        let now = self.clock.now();
        let mut inner = self.lock();
        let minute = bucket(&mut inner.ring, now);
        minute.requests += 1;
        minute.hits += u64::from(hit);
    }

    /// Counts credits spent on upstream calls (the ledger's charges).
    pub(crate) fn credits_spent(&self, credits: u64) {
        let now = self.clock.now();
        bucket(&mut self.lock().ring, now).credits_spent += credits;
    }

    /// Counts one finished upstream call; `error` is its error kind, if any.
    pub(crate) fn upstream_call(&self, error: Option<&'static str>) {
        let now = self.clock.now();
        let mut inner = self.lock();
        let minute = bucket(&mut inner.ring, now);
        minute.upstream_calls += 1;
        let health = &mut inner.health;
        match error {
            None => {
                health.last_success = Some(now);
                health.consecutive_failures = 0;
            }
            Some(kind) => {
                health.last_error = Some((now, kind));
                health.consecutive_failures += 1;
            }
        }
    }

    /// The last hour, oldest minute first (minutes without traffic included).
    pub(crate) fn last_hour(&self) -> Vec<Minute> {
        let current = clock::unix_secs(self.clock.now()) / 60;
        let inner = self.lock();
        (0..MINUTES as u64)
            .rev()
            .map(|ago| {
                let minute = current.saturating_sub(ago);
                let slot = inner.ring[(minute % MINUTES as u64) as usize];
                if slot.minute == minute {
                    slot
                } else {
                    Minute {
                        minute,
                        ..Minute::default()
                    }
                }
            })
            .collect()
    }

    /// The upstream's recent health.
    pub(crate) fn health(&self) -> UpstreamHealth {
        self.lock().health.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The bucket of `now`, reset if it still holds an older minute.
fn bucket(ring: &mut [Minute; MINUTES], now: SystemTime) -> &mut Minute {
    let minute = clock::unix_secs(now) / 60;
    let slot = &mut ring[(minute % MINUTES as u64) as usize];
    if slot.minute != minute {
        *slot = Minute {
            minute,
            ..Minute::default()
        };
    }
    slot
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn ring_keeps_one_hour_and_forgets_older_minutes() {
        let manual = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(600_000 * 60),
        ));
        let history = History::new(SharedClock::new(manual.clone()));
        history.request(true);
        history.request(false);
        history.upstream_call(None);
        history.credits_spent(2);
        manual.advance(Duration::from_secs(60));
        history.request(true);
        let hour = history.last_hour();
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(hour[MINUTES - 2].requests, 2);
        assert_eq!(hour[MINUTES - 2].credits_spent, 2);
        assert_eq!(hour[MINUTES - 1].hits, 1);
        manual.advance(Duration::from_secs(60 * 60));
        history.upstream_call(Some("timeout"));
        let hour = history.last_hour();
        assert_eq!(hour.iter().map(|m| m.requests).sum::<u64>(), 0);
        assert_eq!(hour[MINUTES - 1].upstream_calls, 1);
        assert_eq!(history.health().consecutive_failures, 1);
        assert!(history.health().last_success.is_some());
    }
}
