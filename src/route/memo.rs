//! The keys of recently parsed queries, per route: a repeated question — the
//! hit path's common case — is looked up instead of parsed again.
//!
//! Direct-mapped by the raw query's hash, so bounded whatever the traffic:
//! [`SLOTS`] queries of at most [`MAX_QUERY_BYTES`] bytes per route. A slot
//! keeps the last query that hashed to it; only successful parses are kept.
//! Parsing is a pure function of the query, so a remembered key is the key.

use std::{
    fmt,
    hash::BuildHasher,
    sync::{Mutex, TryLockError},
};

use crate::cache::CacheKey;

/// Slots per route.
const SLOTS: usize = 1024;
/// Longest query remembered; longer ones are always parsed.
const MAX_QUERY_BYTES: usize = 256;

/// One slot: a raw query and its key.
type Slot = Mutex<Option<(Box<str>, CacheKey)>>;

/// A route's memo of parsed queries.
pub(super) struct Memo {
    hasher: foldhash::fast::RandomState,
    slots: Box<[Slot]>,
}

impl Memo {
    pub(super) fn new() -> Self {
        Self {
            hasher: foldhash::fast::RandomState::default(),
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// The slot `query` belongs to, if it may be remembered at all.
    pub(super) fn slot(&self, query: &str) -> Option<&Slot> {
        if query.len() > MAX_QUERY_BYTES {
            return None;
        }
        let hash = self.hasher.hash_one(query);
        // The slot count is a power of two: the low bits pick it.
        let index = usize::try_from(hash).unwrap_or_default() & (SLOTS - 1);
        self.slots.get(index)
    }
}

/// The key remembered for `query` in `slot`, if that is the query it holds.
/// A slot another thread holds at this moment counts as a miss: never wait.
pub(super) fn recall(slot: &Slot, query: &str) -> Option<CacheKey> {
    let held = match slot.try_lock() {
        Ok(held) => held,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    match &*held {
        Some((remembered, key)) if **remembered == *query => Some(key.clone()),
        _ => None,
    }
}

/// Remembers `key` as the parse of `query` in `slot` (unless it is busy).
pub(super) fn remember(slot: &Slot, query: &str, key: &CacheKey) {
    let mut held = match slot.try_lock() {
        Ok(held) => held,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return,
    };
    *held = Some((query.into(), key.clone()));
}

impl fmt::Debug for Memo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memo")
            .field("slots", &self.slots.len())
            .finish()
    }
}
