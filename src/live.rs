//! The words of live reload, shared by the handlers and the reloader
//! (`reload`, which runs in `app`): [`Reloads`] is how a handler asks for a
//! reload and what the last ones did; [`ReloadReport`] is what one did.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Reload requests waiting for the reloader at most (each waits its turn).
const QUEUED: usize = 8;

/// What one reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// The new configuration is in use.
    Applied,
    /// Read and valid, and the same as the one in use (key included).
    Unchanged,
    /// Invalid (or unreadable): nothing changed.
    Rejected,
}

impl ReloadOutcome {
    /// Bounded label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Rejected => "rejected",
        }
    }
}

/// Who asked for a reload.
#[derive(Debug, Clone)]
pub enum ReloadTrigger {
    /// `SIGHUP`.
    Signal,
    /// `POST /admin/reload`, by this client.
    Admin(Arc<str>),
}

/// What one reload did, as `POST /admin/reload` answers and `/stats` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    pub outcome: ReloadOutcome,
    /// Unix seconds (the app's clock).
    pub at: u64,
    /// The configuration keys that changed and apply now (`clients`,
    /// `upstream.retries`, …).
    pub applied: Vec<String>,
    /// Changed keys that take a restart: they keep their running value.
    pub restart_needed: Vec<String>,
    /// A new KeyAPI key was read and is in use for new calls.
    pub key_rotated: bool,
    /// Why nothing changed (a rejected reload), on one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reloads so far, by outcome, and the last one.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStats {
    pub applied: u64,
    pub unchanged: u64,
    pub rejected: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<ReloadReport>,
}

/// A reload asked for by a handler, answered with its report.
#[derive(Debug)]
pub struct ReloadRequest {
    pub trigger: ReloadTrigger,
    pub reply: oneshot::Sender<ReloadReport>,
}

/// How handlers ask for a reload, and what the reloads did.
#[derive(Debug)]
pub struct Reloads {
    requests: mpsc::Sender<ReloadRequest>,
    stats: Mutex<ReloadStats>,
}

impl Reloads {
    /// The handle, and the requests for the reloader to answer.
    pub fn new() -> (Self, mpsc::Receiver<ReloadRequest>) {
        let (requests, received) = mpsc::channel(QUEUED);
        let reloads = Self {
            requests,
            stats: Mutex::default(),
        };
        (reloads, received)
    }

    /// Asks for a reload and waits for its report; `None` when no reloader
    /// runs (the service is stopping).
    pub async fn request(&self, trigger: ReloadTrigger) -> Option<ReloadReport> {
        let (reply, report) = oneshot::channel();
        self.requests
            .send(ReloadRequest { trigger, reply })
            .await
            .ok()?;
        report.await.ok()
    }

    /// Counts `report` (the reloader, once per reload).
    pub fn record(&self, report: &ReloadReport) {
        let mut stats = self.lock();
        match report.outcome {
            ReloadOutcome::Applied => stats.applied += 1,
            ReloadOutcome::Unchanged => stats.unchanged += 1,
            ReloadOutcome::Rejected => stats.rejected += 1,
        }
        stats.last = Some(report.clone());
    }

    /// Reloads so far.
    pub fn stats(&self) -> ReloadStats {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, ReloadStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}
