//! Wall-clock time for everything that counts per period — rate limits,
//! daily credit budgets (which reset at 00:00 UTC), the status page's
//! per-minute history — behind one trait so tests can move time by hand
//! instead of sleeping.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

const DAY: u64 = 24 * 60 * 60;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Mutex::new(start))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A cheaply cloned handle to the app's clock; also drives `governor`.
#[derive(Debug, Clone)]
pub struct SharedClock(Arc<dyn Clock>);

impl SharedClock {
    /// Wraps `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self(clock)
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        self.0.now()
    }

    /// Time left until `t`; `None` once `t` has come.
    pub fn left_until(&self, t: SystemTime) -> Option<Duration> {
        t.duration_since(self.now()).ok().filter(|d| !d.is_zero())
    }
}

impl governor::clock::Clock for SharedClock {
    type Instant = SystemTime;

    fn now(&self) -> SystemTime {
        self.0.now()
    }
}

/// Days since 1970-01-01 UTC: budgets are kept per such day.
pub fn utc_day(t: SystemTime) -> u64 {
    unix_secs(t) / DAY
}

/// Time left until the next 00:00 UTC.
pub fn until_utc_midnight(t: SystemTime) -> Duration {
    let secs = unix_secs(t);
    Duration::from_secs(DAY - secs % DAY)
}

/// Whole seconds to wait, rounded up and at least 1: a `Retry-After` value.
pub fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_turn_at_utc_midnight() {
        let before = UNIX_EPOCH + Duration::from_secs(20_000 * DAY - 1);
        assert_eq!(utc_day(before), 19_999);
        assert_eq!(until_utc_midnight(before), Duration::from_secs(1));
        let after = before + Duration::from_secs(1);
        assert_eq!(utc_day(after), 20_000);
        assert_eq!(until_utc_midnight(after), Duration::from_secs(DAY));
    }
}
