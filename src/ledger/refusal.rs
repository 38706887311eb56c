//! Why the ledger made no upstream attempt for a payer, and when the client
//! may try again.

use std::time::Duration;

use crate::{clock, metrics::Scope};

/// How long a client should wait while the shared ledger is unreachable.
pub(super) const LEDGER_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a client should wait when calls in progress hold the budget:
/// they settle within a fetch's time, often giving credits back.
pub(super) const RESERVED_RETRY_AFTER: Duration = Duration::from_secs(5);

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
