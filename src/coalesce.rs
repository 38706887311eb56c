//! Single flight: concurrent requests for one key share one fetch.
//!
//! The first caller (the leader) spawns the fetch as its own task, so a caller
//! that disconnects cancels nothing: the fetch finishes and every waiter gets
//! its result. The fetch can ask whether anyone still waits ([`Interest`]),
//! so it pays for no further attempt once every caller has gone. The
//! in-flight slot is removed when the task ends, even if it panics (a drop
//! guard, as in pingora-cache's `lock.rs`), so a failed fetch is shared only
//! with the waiters of that moment and the next request tries again.
//! Background refreshes use the same slots, so a key never has two fetches.
//!
//! Note: a cache's own loader (moka's `try_get_with`, quick_cache's guards)
//! hands the fetch to another waiter when the first caller is dropped — a
//! second paid call — hence this module.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

/// Whether this caller started the fetch or joined one already running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// The fetch task ended without producing a value (it panicked or the runtime
/// is shutting down).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the shared fetch ended without a result")]
pub struct Abandoned;

type Slot<V> = watch::Receiver<Option<V>>;

/// Whether anyone still waits for a fetch's result, for the fetch to ask
/// before it pays for another attempt: a fetch started by callers who have
/// all gone (disconnected) has nobody to answer. A background fetch
/// ([`Coalescer::start`]) is always wanted.
pub struct Interest<V>(Option<watch::Sender<Option<V>>>);

impl<V> Interest<V> {
    /// True while a caller waits (or for a background fetch).
    pub fn wanted(&self) -> bool {
        // The in-flight map holds one receiver of its own; each waiting
        // caller holds another until it gets the value or is dropped.
        self.0.as_ref().is_none_or(|tx| tx.receiver_count() > 1)
    }
}

/// Map of in-flight fetches, one per key.
pub struct Coalescer<K, V> {
    inflight: Mutex<HashMap<K, Slot<V>>>,
    /// Number of fetches in flight, so callers can await quiescence.
    count: watch::Sender<usize>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Self {
            inflight: Mutex::new(HashMap::new()),
            count: watch::Sender::new(0),
        }
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Returns the result of the one fetch for `key`, starting it with `fetch`
    /// if none is running. `fetch` is only called by the leader, with the
    /// [`Interest`] of the callers waiting for it.
    pub async fn run<F, Fut>(self: &Arc<Self>, key: K, fetch: F) -> Result<(V, Role), Abandoned>
    where
        F: FnOnce(Interest<V>) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (mut rx, role) = self.join_or_start(key, |tx| fetch(Interest(Some(tx.clone()))));
        let value = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Abandoned)?
            .clone();
        value.map(|v| (v, role)).ok_or(Abandoned)
    }

    /// Starts a fetch for `key` unless one is running, without waiting for
    /// it; `fetch` gets an [`Interest`] that is always wanted.
    pub fn start<F, Fut>(self: &Arc<Self>, key: K, fetch: F) -> Role
    where
        F: FnOnce(Interest<V>) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        self.join_or_start(key, |_| fetch(Interest(None))).1
    }

    fn join_or_start<F, Fut>(self: &Arc<Self>, key: K, fetch: F) -> (Slot<V>, Role)
    where
        F: FnOnce(&watch::Sender<Option<V>>) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut inflight = self.lock();
        if let Some(rx) = inflight.get(&key) {
            return (rx.clone(), Role::Follower);
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key.clone(), rx.clone());
        self.count.send_replace(inflight.len());
        let guard = SlotGuard {
            owner: Arc::clone(self),
            key,
        };
        let fut = fetch(&tx);
        tokio::spawn(async move {
            let value = fut.await;
            // Publish first, then free the slot (guard drop): nobody can start
            // a second fetch while waiters lack the value.
            tx.send_replace(Some(value));
            drop(guard);
        });
        (rx, Role::Leader)
    }
}

impl<K, V> Coalescer<K, V> {
    /// Resolves when no fetch is in flight (e.g. after background refreshes).
    pub async fn idle(&self) {
        let mut rx = self.count.subscribe();
        // `self` owns the sender, so it outlives this wait.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Slot<V>>> {
        // The map stays consistent even if a holder panicked: every operation
        // on it is a single insert/remove.
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Frees a key's slot when its fetch task ends, however it ends.
struct SlotGuard<K: Hash + Eq, V> {
    owner: Arc<Coalescer<K, V>>,
    key: K,
}

impl<K: Hash + Eq, V> Drop for SlotGuard<K, V> {
    fn drop(&mut self) {
        let mut inflight = self.owner.lock();
        inflight.remove(&self.key);
        self.owner.count.send_replace(inflight.len());
    }
}
