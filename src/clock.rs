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

/// UTC day `day` (days since 1970-01-01) as `YYYY-MM-DD`.
pub fn utc_date(day: u64) -> String {
    // Howard Hinnant's civil_from_days, for days on or after the epoch.
    let z = day + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD` (a real date, 1970 or later) as its UTC day; `None` otherwise.
pub fn parse_utc_date(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if y < 1970 || !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    // Days from civil (Hinnant), then checked by going back.
    let y_adj = if m <= 2 { y - 1 } else { y };
    let era = y_adj / 400;
    let yoe = y_adj - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let day = (era * 146_097 + doe).checked_sub(719_468)?;
    (utc_date(day) == text).then_some(day)
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
    fn utc_dates_round_trip_and_refuse_what_is_not_a_date() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(19_723), "2024-01-01");
        assert_eq!(utc_date(19_782), "2024-02-29");
        for day in [0, 59, 60, 365, 11_016, 19_782, 20_000, 60_000] {
            assert_eq!(parse_utc_date(&utc_date(day)), Some(day));
        }
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "1969-12-31",
            "2024-1-01",
            "2024-01-01x",
            "+024-01-01",
            "",
        ] {
            assert_eq!(parse_utc_date(bad), None, "{bad}");
        }
    }

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
