//! What a cached answer is ([`Entry`]), what it is filed under ([`CacheKey`]),
//! and how its age decides what we may do with it ([`Freshness`]).
//!
//! The cache knows nothing about hashtags: a key is the canonical upstream
//! request (path and query) that a route derived from the client's request, so
//! new routes can reuse the cache and single-flight machinery unchanged.
//!
//! Timeline of one entry (ttl = fresh lifetime, swr / sie = stale windows):
//!
//! ```text
//! stored_at        +ttl                +ttl+swr              +ttl+sie
//!    |---- fresh ----|-- stale: serve, ---|-- stale: only if  ---|  gone
//!    |  serve as hit |  refresh in the    |  upstream fails     |
//!    |               |  background        |  (stale-if-error)   |
//! ```
//!
//! A deterministic refusal of a key whose success has gone stale is stored
//! as a negative entry that *keeps* that success ([`Entry::kept`]): the
//! refusal answers for its negative TTL, then the success serves again for
//! what is left of its stale windows. A fresh success is never replaced.

mod check;
pub mod codec;
mod encoding;
mod local;
pub mod redis;
mod tiers;

use std::{
    fmt,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;

pub use check::{EntryCheck, EntryLimits, MAX_CLOCK_SKEW, Rejection, Source};
pub use local::LocalCache;
pub use tiers::{Consulted, Tiers};

/// Normalized identity of an answer: the exact upstream path and query that
/// produces it. Equal keys mean byte-identical upstream requests.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Arc<str>);

impl CacheKey {
    /// Wraps a canonical upstream path-and-query (starting with `/`).
    pub fn new(path_and_query: String) -> Self {
        Self(path_and_query.into())
    }

    /// [`CacheKey::new`] from a borrowed path and query (one allocation).
    pub fn copied(path_and_query: &str) -> Self {
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

/// The freshness rules that apply to every entry (the TTL itself is chosen
/// per key by the route).
#[derive(Debug, Clone)]
pub struct FreshnessPolicy {
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub negative_ttl: Duration,
    /// KeyAPI `code` values (with HTTP 200) that are cached as negative answers.
    pub negative_codes: Vec<i64>,
    /// Fraction of the TTL after which a hit triggers a background refresh.
    pub refresh_ahead: Option<f64>,
    pub refresh_ahead_min_hits: u32,
}

/// Whether KeyAPI's refusal (`status`, envelope `code`) is deterministic and
/// so stored as a negative entry: 400, 404 and 422, and HTTP 200 with one of
/// the configured `negative_codes`. The same rule decides which negative
/// entries read back from a tier are ours.
pub fn is_cacheable_refusal(status: StatusCode, code: i64, negative_codes: &[i64]) -> bool {
    matches!(status.as_u16(), 400 | 404 | 422)
        || (status == StatusCode::OK && negative_codes.contains(&code))
}

/// What an entry's age allows at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it; `remaining` is the freshness left.
    Fresh { remaining: Duration },
    /// Serve it and refresh in the background; `past` is the time since expiry.
    StaleWhileRevalidate { past: Duration },
    /// Serve it only if the upstream fails.
    StaleIfError { past: Duration },
    /// Useless: no longer served (the memory tier drops it).
    Expired,
}

/// One stored upstream answer, kept as the exact bytes received so a hit
/// never parses or re-serializes JSON. Everything a hit needs besides the
/// body is computed once: the validator at store time, the compressed form
/// on the first request that takes it.
#[derive(Debug)]
pub struct Entry {
    /// Raw upstream body, validated once when it was fetched.
    pub body: Bytes,
    /// HTTP status to answer with: 200, or KeyAPI's status for a negative entry.
    pub status: StatusCode,
    /// True for a cached refusal (e.g. unknown hashtag): no stale windows.
    pub negative: bool,
    /// Strong `ETag` of `body` (a quoted SHA-256 prefix), ready to send.
    pub etag: HeaderValue,
    /// The gzip representation, made on first demand (most API clients never
    /// ask for it, and an entry would keep it for its whole life) or given
    /// when restored; `None` inside when it would not be smaller.
    gzip: OnceLock<Option<Gzip>>,
    /// `Cache-Control` of every answer from this entry: its whole freshness
    /// lifetime and stale windows never change, so the value is built once.
    pub cache_control: HeaderValue,
    /// For a refusal of a key whose success had gone stale: that success,
    /// served again (stale windows) once the refusal is over.
    kept: Option<Arc<Entry>>,
    /// Wall-clock time of storage; wall clock (not `Instant`) so `Age` stays
    /// meaningful if entries are ever shared between processes.
    pub stored_at: SystemTime,
    /// Freshness lifetime.
    pub ttl: Duration,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    /// Hits served from this entry: refresh-ahead's "hot key" rule and the
    /// status page's top keys.
    hits: AtomicU64,
    /// The whole second of age of the last hits and how many there were in
    /// it (`second << HIT_COUNT_BITS | count`): [`HOT_HITS_PER_SECOND`]
    /// within one second make the entry hot enough to keep [`Self::hit_heads`].
    hits_this_second: AtomicU64,
    /// The response heads of a hit, built for the last whole second of age
    /// they were asked for: a hot entry builds them once a second, and each
    /// hit clones one (boxed: most entries are never that hot).
    hit_heads: Mutex<Option<Box<HitHeads>>>,
}

/// An entry's gzip representation.
#[derive(Debug)]
pub struct Gzip {
    /// The body, gzip-compressed.
    pub body: Bytes,
    /// Its strong `ETag`: a different representation needs a different
    /// strong tag (RFC 9110 §8.8.3), so the entry's with a `-gzip` suffix.
    pub etag: HeaderValue,
}

impl Gzip {
    /// The gzip form `body` of an entry tagged `etag`.
    fn of(body: Bytes, etag: &HeaderValue) -> Self {
        Self {
            body,
            etag: encoding::gzip_etag(etag),
        }
    }
}

/// Hits of an entry within one second of its age from which the response
/// heads of its hits are kept for that second (see [`Entry::hit_head`]).
pub const HOT_HITS_PER_SECOND: u64 = 8;

/// Low bits of [`Entry::hits_this_second`] that count the hits of its second.
const HIT_COUNT_BITS: u32 = 8;
const _: () = assert!(HOT_HITS_PER_SECOND < 1 << HIT_COUNT_BITS);

/// [`Entry::hit_head`]'s memo: one head per representation, for one age.
#[derive(Debug)]
struct HitHeads {
    age_secs: u64,
    /// Identity, then gzip.
    heads: [Option<HeaderMap>; 2],
}

impl Entry {
    /// A successful answer stored at `now`, with the policy's stale windows.
    pub fn success(body: Bytes, ttl: Duration, policy: &FreshnessPolicy, now: SystemTime) -> Self {
        let windows = [ttl, policy.stale_while_revalidate, policy.stale_if_error];
        Self::restore(body, StatusCode::OK, false, now, windows)
    }

    /// A deterministic refusal stored at `now` for the policy's negative TTL.
    pub fn negative(
        status: StatusCode,
        body: Bytes,
        policy: &FreshnessPolicy,
        now: SystemTime,
    ) -> Self {
        let windows = [policy.negative_ttl, Duration::ZERO, Duration::ZERO];
        Self::restore(body, status, true, now, windows)
    }

    /// An entry of `body` stored at `stored_at`, its ETag hashed afresh: what
    /// [`Entry::success`] and [`Entry::negative`] build on (and tests, for an
    /// entry stored at another time). Entries read back from Redis or a
    /// snapshot are decoded by the codec, which keeps their ETag and gzip form.
    /// Windows are `[ttl, stale_while_revalidate, stale_if_error]`.
    pub fn restore(
        body: Bytes,
        status: StatusCode,
        negative: bool,
        stored_at: SystemTime,
        [ttl, stale_while_revalidate, stale_if_error]: [Duration; 3],
    ) -> Self {
        let etag = encoding::strong_etag(&body);
        let windows = [ttl, stale_while_revalidate, stale_if_error];
        Self::assemble(body, etag, None, status, negative, stored_at, windows)
    }

    /// An entry from parts computed earlier (the codec keeps the ETag and,
    /// once made, the gzip form).
    fn assemble(
        body: Bytes,
        etag: HeaderValue,
        gzip: Option<Bytes>,
        status: StatusCode,
        negative: bool,
        stored_at: SystemTime,
        [ttl, stale_while_revalidate, stale_if_error]: [Duration; 3],
    ) -> Self {
        let made = OnceLock::new();
        if let Some(body) = gzip {
            let _ = made.set(Some(Gzip::of(body, &etag)));
        }
        let cache_control = encoding::cache_control([ttl, stale_while_revalidate, stale_if_error]);
        let (body, etag, cache_control) = encoding::packed(&body, &etag, &cache_control);
        Self {
            body,
            etag,
            gzip: made,
            cache_control,
            kept: None,
            status,
            negative,
            stored_at,
            ttl,
            stale_while_revalidate,
            stale_if_error,
            hits: AtomicU64::new(0),
            hits_this_second: AtomicU64::new(u64::MAX),
            hit_heads: Mutex::new(None),
        }
    }

    /// This refusal, keeping `success` (a stale success it must not lose)
    /// until the end of that success's own windows.
    pub fn keeping(mut self, success: Option<Arc<Entry>>) -> Self {
        self.kept = success;
        self
    }

    /// The success this refusal keeps, if any.
    pub fn kept(&self) -> Option<&Arc<Entry>> {
        self.kept.as_ref()
    }

    /// Whether `other` is the same stored answer (read back from a tier,
    /// whose times are kept to the millisecond): same body, same store.
    pub fn is_same_answer(&self, other: &Entry) -> bool {
        let millis = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        self.etag == other.etag && millis(self.stored_at) == millis(other.stored_at)
    }

    /// The gzip representation (made now if it was not yet), unless it
    /// would not be smaller than the body.
    pub fn gzip(&self) -> Option<&Gzip> {
        self.gzip
            .get_or_init(|| encoding::gzip(&self.body).map(|body| Gzip::of(body, &self.etag)))
            .as_ref()
    }

    /// The gzip representation if it has been made (nothing is compressed).
    pub fn gzip_made(&self) -> Option<&Gzip> {
        self.gzip.get().and_then(Option::as_ref)
    }

    /// How long the cache must keep it: the end of its longest window.
    pub fn lifetime(&self) -> Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }

    /// Time since storage (zero if the clock stepped back).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stored_at).unwrap_or_default()
    }

    /// Where `now` falls on this entry's timeline.
    pub fn freshness(&self, now: SystemTime) -> Freshness {
        let age = self.age(now);
        match age.checked_sub(self.ttl) {
            None => Freshness::Fresh {
                remaining: self.ttl - age,
            },
            Some(past) if past < self.stale_while_revalidate => {
                Freshness::StaleWhileRevalidate { past }
            }
            Some(past) if past < self.stale_if_error => Freshness::StaleIfError { past },
            Some(_) => Freshness::Expired,
        }
    }

    /// Freshness left at `now` (zero once stale).
    pub fn remaining_ttl(&self, now: SystemTime) -> Duration {
        self.ttl.saturating_sub(self.age(now))
    }

    /// Time left until the end of its longest window (zero once over).
    pub fn remaining_lifetime(&self, now: SystemTime) -> Duration {
        self.lifetime().saturating_sub(self.age(now))
    }

    /// How long a tier must hold it: until neither it nor the success it
    /// keeps can be served.
    pub fn remaining_retention(&self, now: SystemTime) -> Duration {
        let kept = self.kept.as_ref().map(|k| k.remaining_lifetime(now));
        self.remaining_lifetime(now).max(kept.unwrap_or_default())
    }

    /// True while within the fresh lifetime.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        matches!(self.freshness(now), Freshness::Fresh { .. })
    }

    /// Counts a hit; returns the hits so far including this one.
    pub fn record_hit(&self) -> u64 {
        self.hits.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }

    /// Hits served so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The response head of a hit at `age_secs` in the gzip or identity
    /// representation: `build()`'s, kept for the next hits when this entry is
    /// hot ([`HOT_HITS_PER_SECOND`] in that second), or the memo's, if built
    /// for that second.
    pub fn hit_head(
        &self,
        gzip: bool,
        age_secs: u64,
        build: impl FnOnce() -> HeaderMap,
    ) -> HeaderMap {
        // Most entries of a large cache are hit a few times a second at
        // most: for them, dropping last second's memo and cloning a new one
        // reads cold memory (the memo's buckets and values) that building
        // does not. Racing hits may miscount; it only moves the memo by a hit.
        let seen = self.hits_this_second.load(Ordering::Relaxed);
        let count = if seen >> HIT_COUNT_BITS == age_secs {
            (seen & ((1 << HIT_COUNT_BITS) - 1)) + 1
        } else {
            1
        };
        if count <= HOT_HITS_PER_SECOND {
            let packed = (age_secs << HIT_COUNT_BITS) | count;
            self.hits_this_second.store(packed, Ordering::Relaxed);
            if count < HOT_HITS_PER_SECOND {
                return build();
            }
        }
        // A poisoned lock only means a panic elsewhere mid-update: the memo
        // is a plain value, rebuilt below if stale.
        let mut memo = self.hit_heads.lock().unwrap_or_else(|e| e.into_inner());
        let memo = match &mut *memo {
            Some(memo) if memo.age_secs == age_secs => memo,
            slot => slot.insert(Box::new(HitHeads {
                age_secs,
                heads: [None, None],
            })),
        };
        memo.heads[usize::from(gzip)]
            .get_or_insert_with(build)
            .clone()
    }
}
