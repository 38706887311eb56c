//! Circuit breaker: after `threshold` consecutive failures the circuit opens
//! for `cooldown`; then exactly one probe goes through (half-open). Its
//! success closes the circuit, its failure opens it again.
//!
//! While open, misses fail fast instead of piling up sockets on a dead
//! upstream (and spending credits on calls that fail).
//!
//! The cool-down is counted on the app's clock (read only while the circuit
//! is not closed), so tests move it by hand instead of waiting it out.

use std::{
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use crate::clock::SharedClock;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: SystemTime },
    HalfOpen,
}

/// Shared breaker state for one upstream.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
    clock: SharedClock,
}

/// The circuit is open; try again after `retry_after`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Open {
    pub(crate) retry_after: Duration,
}

/// Leave to make one call. Must be settled with [`Pass::record`]; dropping
/// it unsettled counts as a failure, so a lost probe cannot wedge half-open.
#[derive(Debug)]
pub(crate) struct Pass<'a> {
    breaker: &'a Breaker,
    settled: bool,
}

impl Breaker {
    /// A closed breaker counting its cool-down on `clock`.
    pub(crate) fn new(threshold: u32, cooldown: Duration, clock: SharedClock) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
            clock,
        }
    }

    /// Asks to make a call now.
    pub(crate) fn try_pass(&self) -> Result<Pass<'_>, Open> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => {}
            State::Open { until } => {
                if let Some(retry_after) = self.clock.left_until(until) {
                    return Err(Open { retry_after });
                }
                tracing::info!("circuit half-open: sending one probe");
                *state = State::HalfOpen;
            }
            // A probe is already out: everyone else waits for its verdict.
            State::HalfOpen => {
                return Err(Open {
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        Ok(Pass {
            breaker: self,
            settled: false,
        })
    }

    /// `closed`, `open` or `half_open`, for logs and status pages.
    pub(crate) fn state_str(&self) -> &'static str {
        match *self.lock() {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half_open",
        }
    }

    fn settle(&self, success: bool) {
        let mut state = self.lock();
        let next = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (State::Open { until }, false) => State::Open { until },
            (_, false) => {
                tracing::warn!(cooldown = ?self.cooldown, "circuit open: upstream keeps failing");
                State::Open {
                    until: self.clock.now() + self.cooldown,
                }
            }
        };
        if matches!((*state, next), (State::HalfOpen, State::Closed { .. })) {
            tracing::info!("circuit closed: probe succeeded");
        }
        *state = next;
    }

    /// A pass was not used: a half-open probe that was never sent leaves
    /// the next caller to probe.
    fn unused(&self) {
        let mut state = self.lock();
        if matches!(*state, State::HalfOpen) {
            *state = State::Open {
                until: self.clock.now(),
            };
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pass<'_> {
    /// Reports the call's outcome.
    pub(crate) fn record(mut self, success: bool) {
        self.settled = true;
        self.breaker.settle(success);
    }

    /// Gives the pass back unused: no call was made, so nothing is recorded.
    pub(crate) fn withdraw(mut self) {
        self.settled = true;
        self.breaker.unused();
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.settle(false);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{ManualClock, SystemClock};

    fn on_system_clock(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker::new(threshold, cooldown, SharedClock::new(Arc::new(SystemClock)))
    }

    #[test]
    fn opens_after_threshold_then_half_opens_with_one_probe() {
        let breaker = on_system_clock(2, Duration::ZERO);
        breaker.try_pass().unwrap().record(false);
        assert_eq!(breaker.state_str(), "closed");
        breaker.try_pass().unwrap().record(false);
        assert_eq!(breaker.state_str(), "open");
        // Cool-down of zero: the next caller is the probe, the one after waits.
        let probe = breaker.try_pass().unwrap();
        assert_eq!(breaker.state_str(), "half_open");
        assert!(breaker.try_pass().is_err());
        probe.record(true);
        assert_eq!(breaker.state_str(), "closed");
    }

    #[test]
    fn a_dropped_probe_counts_as_failure() {
        let breaker = on_system_clock(1, Duration::from_secs(60));
        breaker.try_pass().unwrap().record(false);
        assert!(breaker.try_pass().is_err());
        let breaker = on_system_clock(1, Duration::ZERO);
        breaker.try_pass().unwrap().record(false);
        drop(breaker.try_pass().unwrap());
        assert_eq!(breaker.state_str(), "open");
    }

    #[test]
    fn a_withdrawn_pass_records_nothing_and_leaves_the_probe_to_the_next_caller() {
        let breaker = on_system_clock(2, Duration::ZERO);
        breaker.try_pass().unwrap().record(false);
        breaker.try_pass().unwrap().withdraw();
        assert_eq!(breaker.state_str(), "closed", "one failure, not two");
        breaker.try_pass().unwrap().record(false);
        breaker.try_pass().unwrap().withdraw();
        assert_eq!(breaker.state_str(), "open");
        let probe = breaker.try_pass().expect("the next caller probes");
        probe.record(true);
        assert_eq!(breaker.state_str(), "closed");
    }

    #[test]
    fn the_cool_down_runs_on_the_app_clock() {
        let manual = Arc::new(ManualClock::new(SystemTime::now()));
        let breaker = Breaker::new(1, Duration::from_secs(30), SharedClock::new(manual.clone()));
        breaker.try_pass().unwrap().record(false);
        manual.advance(Duration::from_secs(20));
        let open = breaker.try_pass().expect_err("still cooling down");
        assert_eq!(open.retry_after, Duration::from_secs(10));
        manual.advance(Duration::from_secs(10));
        breaker.try_pass().expect("the probe").record(true);
        assert_eq!(breaker.state_str(), "closed");
    }
}
