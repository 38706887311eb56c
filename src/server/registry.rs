//! Every open connection, for the cap, eviction of the longest silent one,
//! the reaper's sweeps and the drain on shutdown.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::{
    sync::{Notify, mpsc},
    time::{Instant, MissedTickBehavior},
};

use super::{
    conn::{Conn, Cut, Signal, Ticks},
    limits::{Limits, MIN_REAP_PERIOD},
};
use crate::metrics::ConnectionMetrics;

/// Every open connection, for the cap, eviction and the drain.
pub(super) struct Registry {
    ticks: Arc<Ticks>,
    conns: Mutex<Connections>,
    /// Signalled when the last connection closes.
    emptied: Notify,
    metrics: ConnectionMetrics,
}

#[derive(Default)]
pub(super) struct Connections {
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
    /// Shutdown has begun: connections close as soon as they fall silent.
    draining: bool,
}

impl Connections {
    /// Closes the connection silent the longest (a linear scan, only at the
    /// cap); false when every connection is working.
    pub(super) fn evict_longest_silent(&mut self) -> bool {
        let victim = self
            .open
            .iter()
            .filter_map(|(id, c)| Some((c.quiet_since()?, *id)))
            // Milliseconds tie often under a flood; the older id is the older connection.
            .min()
            .map(|(_, id)| id);
        match victim.and_then(|id| self.open.remove(&id)) {
            Some(conn) => {
                conn.signal(Signal::Close(Cut::Evicted));
                true
            }
            None => false,
        }
    }

    /// Closes every connection past a deadline (see [`Conn::overdue`]) and,
    /// while draining, every one whose answers are stuck. One that finished
    /// its answers is left to hyper, which closes it once they are flushed.
    fn reap(&mut self, limits: &Limits, overdue_slot: Option<usize>) {
        let now = Instant::now();
        let draining = self.draining;
        self.open.retain(|_, conn| {
            let cut = conn
                .overdue(limits, now, overdue_slot)
                .or_else(|| (draining && conn.stuck_since().is_some()).then_some(Cut::Shutdown));
            match cut {
                Some(cut) => {
                    conn.signal(Signal::Close(cut));
                    false
                }
                None => true,
            }
        });
    }

    /// Shutdown: silent connections close now, working ones after their answer.
    pub(super) fn drain(&mut self) {
        self.draining = true;
        self.open.retain(|_, conn| {
            if conn.quiet_since().is_some() {
                conn.signal(Signal::Close(Cut::Shutdown));
                false
            } else {
                conn.signal(Signal::Drain);
                true
            }
        });
    }
}

impl Registry {
    /// A registry whose reaper sweeps every `limits`' tenth of the shortest timeout.
    pub(super) fn new(limits: &Limits, metrics: ConnectionMetrics) -> Self {
        let shortest = limits
            .header_read_timeout
            .min(limits.idle_timeout)
            .min(limits.send_timeout);
        let period = (shortest / 10).max(MIN_REAP_PERIOD);
        Self {
            ticks: Arc::new(Ticks::new(period, limits.send_timeout)),
            conns: Mutex::new(Connections::default()),
            emptied: Notify::new(),
            metrics,
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        // A panic elsewhere cannot leave the map half-updated: every change is one call.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection; at `max`, evicts the longest-silent one to
    /// make room. `None` when every open connection is busy.
    pub(super) fn admit(&self, max: usize) -> Option<(u64, Arc<Conn>, mpsc::Receiver<Signal>)> {
        let mut conns = self.lock();
        if conns.open.len() >= max && !conns.evict_longest_silent() {
            self.metrics.refused();
            return None;
        }
        self.metrics.opened();
        let id = conns.next_id;
        conns.next_id += 1;
        let (conn, signals) = Conn::new(Arc::clone(&self.ticks));
        let conn = Arc::new(conn);
        conns.open.insert(id, Arc::clone(&conn));
        Some((id, conn, signals))
    }

    /// Every period, advances the clock and closes the connections past their deadline.
    pub(super) async fn reap_forever(&self, limits: Limits) {
        let mut ticks = tokio::time::interval(self.ticks.period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.ticks.tick();
            let overdue_slot = self.ticks.overdue_slot();
            self.lock().reap(&limits, overdue_slot);
        }
    }

    fn remove(&self, id: u64) {
        let mut conns = self.lock();
        conns.open.remove(&id);
        if conns.open.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Closes every remaining connection (the grace period is over).
    pub(super) fn close_all(&self) {
        for (_, conn) in self.lock().open.drain() {
            conn.signal(Signal::Close(Cut::Shutdown));
        }
        self.emptied.notify_waiters();
    }

    pub(super) async fn all_closed(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.lock().open.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

/// Deregisters a connection however its task ends, counting why it ended.
pub(super) struct Registered {
    pub(super) registry: Arc<Registry>,
    pub(super) id: u64,
    /// Who ended the connection; the client unless the proxy cut it.
    pub(super) cut: Option<Cut>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
        let reason = self.cut.map_or("client", Cut::as_str);
        self.registry.metrics.closed(reason);
    }
}
