//! Entries read back from a shared or saved form — Redis (another replica,
//! or anyone who can write there) and the snapshot file — are claims, not
//! facts: [`EntryCheck::admit`] decodes one and serves it only if this proxy
//! could have stored it. Status and negative flag among those we store, a
//! KeyAPI envelope of at most `upstream.max_body_bytes` without our key in
//! it, an ETag and gzip form that are the body's, a store time not in the
//! future and windows no longer than any configured route gives. Anything
//! else is skipped (a miss), counted in `cache_entries_rejected_total` and
//! logged once per source and reason.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use bytes::Bytes;

use super::{CacheKey, Entry, codec, encoding, is_cacheable_refusal};
use crate::{
    clock::SharedClock,
    envelope::{KeyEcho, envelope_code},
    metrics::Metrics,
};

/// How far in the future a store time may lie: replicas' clocks differ a
/// little, and refusing each other's entries over that would pay twice.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Where an entry was read from (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shared Redis tier.
    Redis,
    /// The snapshot file, at start-up.
    Snapshot,
}

impl Source {
    /// Bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Snapshot => "snapshot",
        }
    }
}

/// Why an entry read back is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("not an entry: {0}")]
    Unreadable(#[from] codec::DecodeError),
    #[error("status or negative flag is not one this proxy stores")]
    Status,
    #[error("body is not a KeyAPI JSON envelope")]
    Body,
    #[error("body exceeds upstream.max_body_bytes")]
    TooLarge,
    #[error("body holds the API key")]
    ApiKey,
    #[error("ETag is not the body's")]
    Etag,
    #[error("gzip form does not decode to the body")]
    Gzip,
    #[error("stored in the future")]
    Future,
    #[error("lifetime longer than any configured route gives")]
    Lifetime,
}

impl Rejection {
    /// Bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unreadable(_) => "unreadable",
            Self::Status => "status",
            Self::Body => "body",
            Self::TooLarge => "too_large",
            Self::ApiKey => "api_key",
            Self::Etag => "etag",
            Self::Gzip => "gzip",
            Self::Future => "future",
            Self::Lifetime => "lifetime",
        }
    }

    /// Position among the reasons (for the once-per-reason log).
    fn index(&self) -> u32 {
        match self {
            Self::Unreadable(_) => 0,
            Self::Status => 1,
            Self::Body => 2,
            Self::TooLarge => 3,
            Self::ApiKey => 4,
            Self::Etag => 5,
            Self::Gzip => 6,
            Self::Future => 7,
            Self::Lifetime => 8,
        }
    }
}

/// What the configuration lets this proxy store (the widest any route gives).
#[derive(Debug, Clone)]
pub struct EntryLimits {
    /// `upstream.max_body_bytes`.
    pub max_body_bytes: usize,
    /// Longest `[ttl, stale_while_revalidate, stale_if_error]` of a success.
    pub success: [Duration; 3],
    /// Longest negative TTL of a refusal (which has no stale windows).
    pub negative_ttl: Duration,
    /// `cache.negative_codes`: HTTP 200 refusals that are stored.
    pub negative_codes: Vec<i64>,
}

/// The one check of entries read back, for every source.
#[derive(Debug)]
pub struct EntryCheck {
    /// Replaced when a reload changes the routes ([`EntryCheck::set_limits`]).
    limits: ArcSwap<EntryLimits>,
    key_echo: Arc<KeyEcho>,
    metrics: Arc<Metrics>,
    /// The app's clock: "the future" is the app's.
    clock: SharedClock,
    /// One bit per (source, reason) already logged.
    logged: AtomicU64,
}

impl EntryCheck {
    /// A check against `limits` at `clock`'s time, looking for the key with
    /// `key_echo`, counting rejections in `metrics`.
    pub fn new(
        limits: EntryLimits,
        key_echo: Arc<KeyEcho>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> Self {
        Self {
            limits: ArcSwap::from_pointee(limits),
            key_echo,
            metrics,
            clock,
            logged: AtomicU64::new(0),
        }
    }

    /// What the configuration lets this proxy store from now on (a reload).
    pub fn set_limits(&self, limits: EntryLimits) {
        self.limits.store(Arc::new(limits));
    }

    /// The entry `raw` (read from `source` under `key`) holds, if it decodes
    /// and passes [`EntryCheck::check`] now; otherwise counted, logged (the
    /// first time for this source and reason) and `None`.
    pub fn admit(&self, source: Source, key: &CacheKey, raw: &Bytes) -> Option<Entry> {
        let now = self.clock.now();
        let checked = codec::decode(raw)
            .map_err(Rejection::from)
            .and_then(|entry| self.check(&entry, now).map(|()| entry));
        match checked {
            Ok(entry) => Some(entry),
            Err(rejection) => {
                self.reject(source, key, &rejection);
                None
            }
        }
    }

    /// Whether `entry` is one this proxy could have stored by `now`: itself,
    /// and the success it keeps (only a refusal may keep one).
    pub fn check(&self, entry: &Entry, now: SystemTime) -> Result<(), Rejection> {
        self.check_one(entry, now)?;
        match entry.kept() {
            None => Ok(()),
            Some(kept) if entry.negative && !kept.negative => self.check_one(kept, now),
            Some(_) => Err(Rejection::Status),
        }
    }

    /// Cheap checks first; the body is parsed, searched and hashed last.
    fn check_one(&self, entry: &Entry, now: SystemTime) -> Result<(), Rejection> {
        let limits = self.limits.load();
        // A refusal's status goes with its code: checked with the body, below.
        if !entry.negative && entry.status != StatusCode::OK {
            return Err(Rejection::Status);
        }
        if entry.body.len() > limits.max_body_bytes {
            return Err(Rejection::TooLarge);
        }
        if entry.stored_at > now + MAX_CLOCK_SKEW {
            return Err(Rejection::Future);
        }
        let windows = [
            entry.ttl,
            entry.stale_while_revalidate,
            entry.stale_if_error,
        ];
        let longest = if entry.negative {
            [limits.negative_ttl, Duration::ZERO, Duration::ZERO]
        } else {
            limits.success
        };
        if windows
            .iter()
            .zip(longest)
            .any(|(window, max)| *window > max)
        {
            return Err(Rejection::Lifetime);
        }
        let code = envelope_code(&entry.body).map_err(|_| Rejection::Body)?;
        let code_ok = match entry.negative {
            false => code == 0,
            true => is_cacheable_refusal(entry.status, code, &limits.negative_codes),
        };
        if !code_ok {
            return Err(Rejection::Status);
        }
        if self.key_echo.is_in(&entry.body) {
            return Err(Rejection::ApiKey);
        }
        if entry.etag != encoding::strong_etag(&entry.body) {
            return Err(Rejection::Etag);
        }
        match entry.gzip_made() {
            Some(gzip) if !encoding::gunzips_to(&gzip.body, &entry.body) => Err(Rejection::Gzip),
            _ => Ok(()),
        }
    }

    fn reject(&self, source: Source, key: &CacheKey, rejection: &Rejection) {
        self.metrics
            .cache_entry_rejected(source.as_str(), rejection.as_str());
        let bit = 1u64 << (source as u32 * 16 + rejection.index());
        if self.logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            // The key is a canonical request (logged elsewhere too); the body
            // is never logged: it may hold what made it bad.
            tracing::warn!(
                source = source.as_str(),
                reason = rejection.as_str(),
                %key,
                error = %rejection,
                "skipping a cached entry this proxy could not have stored; \
                 later ones for this source and reason are only counted"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{clock::SharedClock, clock::SystemClock, config::Config};
    use secrecy::SecretString;

    const KEY: &str = "sk-live-CHECK";

    fn check() -> EntryCheck {
        let config = Config::defaults().unwrap();
        let limits = EntryLimits {
            max_body_bytes: 1024,
            success: [config.cache.ttl, Duration::ZERO, Duration::from_secs(60)],
            negative_ttl: Duration::from_secs(30),
            negative_codes: vec![10001],
        };
        let echo = Arc::new(KeyEcho::new(&SecretString::from(KEY)));
        let clock = SharedClock::new(Arc::new(SystemClock));
        let metrics = Arc::new(Metrics::new(clock.clone()));
        EntryCheck::new(limits, echo, metrics, clock)
    }

    fn entry(status: u16, negative: bool, body: &str, windows: [u64; 3]) -> Entry {
        Entry::restore(
            Bytes::from(body.to_owned()),
            StatusCode::from_u16(status).unwrap(),
            negative,
            SystemTime::now(),
            windows.map(Duration::from_secs),
        )
    }

    #[test]
    fn admits_what_the_proxy_stores_and_nothing_else() {
        let check = check();
        let now = SystemTime::now();
        let ok = r#"{"code":0}"#;
        let good = [
            entry(200, false, ok, [60, 0, 60]),
            entry(404, true, r#"{"code":404}"#, [30, 0, 0]),
            entry(200, true, r#"{"code":10001}"#, [30, 0, 0]),
        ];
        for e in &good {
            assert_eq!(check.check(e, now), Ok(()), "{e:?}");
        }
        let bad = [
            (entry(101, false, ok, [60, 0, 0]), Rejection::Status),
            (entry(999, true, ok, [30, 0, 0]), Rejection::Status),
            (entry(404, false, ok, [60, 0, 0]), Rejection::Status),
            (
                entry(200, false, r#"{"code":3}"#, [60, 0, 0]),
                Rejection::Status,
            ),
            (
                entry(200, true, r#"{"code":3}"#, [30, 0, 0]),
                Rejection::Status,
            ),
            (entry(200, false, "<html>", [60, 0, 0]), Rejection::Body),
            (
                entry(200, false, &"x".repeat(2000), [60, 0, 0]),
                Rejection::TooLarge,
            ),
            (
                entry(
                    200,
                    false,
                    r#"{"code":0,"m":"sk\u002dlive\u002dCHECK"}"#,
                    [60, 0, 0],
                ),
                Rejection::ApiKey,
            ),
            (
                entry(200, false, ok, [u64::MAX / 1000, 0, 0]),
                Rejection::Lifetime,
            ),
            (entry(200, false, ok, [60, 1, 0]), Rejection::Lifetime),
            (
                entry(404, true, r#"{"code":404}"#, [30, 0, 60]),
                Rejection::Lifetime,
            ),
        ];
        for (e, rejection) in &bad {
            assert_eq!(check.check(e, now).as_ref(), Err(rejection), "{e:?}");
        }
        let future = Entry::restore(
            Bytes::from_static(br#"{"code":0}"#),
            StatusCode::OK,
            false,
            now + Duration::from_secs(3600),
            [Duration::from_secs(60), Duration::ZERO, Duration::ZERO],
        );
        assert_eq!(check.check(&future, now), Err(Rejection::Future));
        // Only a refusal keeps a success.
        let keeping = entry(200, false, ok, [60, 0, 0]).keeping(Some(Arc::new(entry(
            200,
            false,
            ok,
            [60, 0, 0],
        ))));
        assert_eq!(check.check(&keeping, now), Err(Rejection::Status));
    }
}
