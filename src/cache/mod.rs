//! What a cached answer is ([`Entry`]) and what it is filed under ([`CacheKey`]).
//!
//! The cache knows nothing about hashtags: a key is the canonical upstream
//! request (path and query) that a route derived from the client's request, so
//! new routes can reuse the cache and single-flight machinery unchanged.

mod encoding;
mod local;

use std::{
    fmt,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use axum::http::HeaderValue;
use bytes::Bytes;

pub use local::LocalCache;

/// Normalized identity of an answer: the exact upstream path and query that
/// produces it. Equal keys mean byte-identical upstream requests.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Arc<str>);

impl CacheKey {
    /// Wraps a canonical upstream path-and-query (starting with `/`).
    pub fn new(path_and_query: String) -> Self {
        Self(path_and_query.into())
    }

    /// The upstream path and query this key stands for.
    pub fn path_and_query(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One successful upstream answer, kept as the exact bytes received so a hit
/// never parses or re-serializes JSON. Everything a hit needs besides the
/// body (validator, compressed form) is computed once, here, at store time.
#[derive(Debug)]
pub struct Entry {
    /// Raw upstream body, validated once when it was fetched.
    pub body: Bytes,
    /// Strong `ETag` of `body` (a quoted SHA-256 prefix), ready to send.
    pub etag: HeaderValue,
    /// `body` gzip-compressed, when that is smaller.
    pub gzip: Option<Bytes>,
    /// Cache hits served from this entry (the status page's top keys).
    pub hits: AtomicU64,
    /// Wall-clock time of storage; wall clock (not `Instant`) so `Age` stays
    /// meaningful if entries are ever shared between processes.
    pub stored_at: SystemTime,
    /// Freshness lifetime chosen by the route at store time.
    pub ttl: Duration,
}

impl Entry {
    /// A new entry stored now.
    pub fn new(body: Bytes, ttl: Duration) -> Self {
        Self {
            etag: encoding::strong_etag(&body),
            gzip: encoding::gzip(&body),
            hits: AtomicU64::new(0),
            body,
            stored_at: SystemTime::now(),
            ttl,
        }
    }

    /// Time since storage (zero if the clock stepped back).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stored_at).unwrap_or_default()
    }

    /// Freshness left at `now` (zero once expired).
    pub fn remaining_ttl(&self, now: SystemTime) -> Duration {
        self.ttl.saturating_sub(self.age(now))
    }
}
