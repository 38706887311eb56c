//! Single flight: concurrent requests for one key share one fetch.
//!
//! The first caller (the leader) spawns the fetch as its own task, so a caller
//! that disconnects cancels nothing: the fetch finishes and every waiter gets
//! its result. The fetch can ask whether anyone still waits ([`Interest`]),
//! so it pays for no attempt once every caller has gone. The
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

/// The fetch ended without an answer: it panicked, the runtime is shutting
/// down, or it was withdrawn before its call because nobody waited for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the shared fetch ended without a result")]
pub struct Abandoned;

type Slot<V> = watch::Receiver<Option<V>>;

/// Whether anyone still waits for a fetch's result, for the fetch to ask
/// before it pays for an attempt: a fetch whose callers have all gone
/// (disconnected) has nobody to answer. A background fetch
/// ([`Coalescer::start`]) is always wanted.
pub struct Interest<K: Hash + Eq, V>(Option<Flight<K, V>>);

impl<K: Hash + Eq, V> Interest<K, V> {
    /// True if nobody waits for this fetch any more, and then it has given
    /// its key up: a caller from now on starts a fresh fetch rather than
    /// join one that is ending without an answer for it.
    pub fn withdraw_if_unwanted(&self) -> bool {
        let Some(flight) = &self.0 else {
            return false;
        };
        // Callers join under this lock, so none can join between the count
        // and the removal. The in-flight map holds one receiver of its own;
        // each waiting caller holds another until it gets the value or is
        // dropped.
        let mut inflight = flight.owner.lock();
        if flight.tx.receiver_count() > 1 {
            return false;
        }
        flight.forget(&mut inflight);
        true
    }
}

/// One running fetch: where it is filed and the channel of its result.
#[derive(Clone)]
struct Flight<K: Hash + Eq, V> {
    owner: Arc<Coalescer<K, V>>,
    key: K,
    tx: watch::Sender<Option<V>>,
}

impl<K: Hash + Eq, V> Flight<K, V> {
    /// Removes the key's slot if it is still this fetch's (a withdrawn
    /// fetch's key may have a new fetch by now).
    fn forget(&self, inflight: &mut HashMap<K, Slot<V>>) {
        let own = self.tx.subscribe();
        if inflight
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&own))
        {
            inflight.remove(&self.key);
        }
    }
}

/// Map of in-flight fetches, one per key.
pub struct Coalescer<K, V> {
    inflight: Mutex<HashMap<K, Slot<V>>>,
    /// Number of fetch tasks running (withdrawn ones included), so callers
    /// can await quiescence.
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
        F: FnOnce(Interest<K, V>) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (mut rx, role) = self.join_or_start(key, |flight| fetch(Interest(Some(flight))));
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
        F: FnOnce(Interest<K, V>) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        self.join_or_start(key, |_| fetch(Interest(None))).1
    }

    fn join_or_start<F, Fut>(self: &Arc<Self>, key: K, fetch: F) -> (Slot<V>, Role)
    where
        F: FnOnce(Flight<K, V>) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut inflight = self.lock();
        if let Some(rx) = inflight.get(&key) {
            return (rx.clone(), Role::Follower);
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key.clone(), rx.clone());
        self.count.send_modify(|n| *n += 1);
        let flight = Flight {
            owner: Arc::clone(self),
            key,
            tx,
        };
        let fut = fetch(flight.clone());
        let guard = SlotGuard(flight);
        tokio::spawn(async move {
            let value = fut.await;
            // Publish first, then free the slot (guard drop): nobody can start
            // a second fetch while waiters lack the value.
            guard.0.tx.send_replace(Some(value));
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
struct SlotGuard<K: Hash + Eq, V>(Flight<K, V>);

impl<K: Hash + Eq, V> Drop for SlotGuard<K, V> {
    fn drop(&mut self) {
        let flight = &self.0;
        flight.forget(&mut flight.owner.lock());
        flight.owner.count.send_modify(|n| *n -= 1);
    }
}
