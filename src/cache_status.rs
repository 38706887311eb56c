//! Response headers that describe where an answer came from: RFC 9211
//! `Cache-Status`, `Age` and `Cache-Control`. Constant values are built once.

use std::time::SystemTime;

use axum::http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{AGE, CACHE_CONTROL},
};

use bytes::BytesMut;

use crate::{cache::Entry, served::CacheState};

/// `Cache-Status` header name (RFC 9211).
pub(crate) const CACHE_STATUS: &str = "cache-status";
/// The same as a `HeaderName`: inserting by `&str` would parse the name per request.
const CACHE_STATUS_NAME: HeaderName = HeaderName::from_static(CACHE_STATUS);

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// Adds `Cache-Status`, `Age` and `Cache-Control` for an answer that is in
/// the cache, at `now`. `Cache-Control: max-age` is the entry's whole
/// lifetime and `Age` its age, so `max-age − Age` is the `ttl` of `Cache-Status`.
pub(crate) fn set_cached(
    headers: &mut HeaderMap,
    state: CacheState,
    entry: &Entry,
    now: SystemTime,
) {
    let age = entry.age(now);
    // RFC 9211 `ttl` goes negative once stale.
    let stale_ttl = -i64::try_from(age.saturating_sub(entry.ttl).as_secs()).unwrap_or(i64::MAX);
    let negative = if entry.negative {
        "; detail=negative"
    } else {
        ""
    };
    let status = match state {
        // `max-age` − `Age`, in whole seconds; without `core::fmt`.
        CacheState::Hit => {
            let ttl = entry.ttl.as_secs().saturating_sub(age.as_secs());
            let mut ttl_text = itoa::Buffer::new();
            let ttl_text = ttl_text.format(ttl).as_bytes();
            join(&[b"keyapi-proxy; hit; ttl=", ttl_text, negative.as_bytes()])
        }
        CacheState::Stored => {
            format_value(format_args!("keyapi-proxy; fwd=uri-miss; stored{negative}"))
        }
        CacheState::Collapsed => format_value(format_args!(
            "keyapi-proxy; fwd=uri-miss; collapsed{negative}"
        )),
        CacheState::Refreshed => {
            format_value(format_args!("keyapi-proxy; fwd=request; stored{negative}"))
        }
        CacheState::Stale => format_value(format_args!(
            "keyapi-proxy; hit; ttl={stale_ttl}; detail=stale-while-revalidate"
        )),
        CacheState::StaleIfError {
            fwd_status: Some(code),
        } => format_value(format_args!(
            "keyapi-proxy; fwd=stale; fwd-status={code}; ttl={stale_ttl}; detail=stale-if-error"
        )),
        CacheState::StaleIfError { fwd_status: None } => format_value(format_args!(
            "keyapi-proxy; fwd=stale; ttl={stale_ttl}; detail=stale-if-error"
        )),
        CacheState::StaleOverBudget => format_value(format_args!(
            "keyapi-proxy; fwd=stale; ttl={stale_ttl}; detail=budget"
        )),
        CacheState::StaleAccepted(by) => format_value(format_args!(
            "keyapi-proxy; hit; ttl={stale_ttl}; detail={}",
            by.as_str()
        )),
    };
    headers.insert(AGE, HeaderValue::from(age.as_secs()));
    headers.insert(CACHE_STATUS_NAME, status);
    headers.insert(CACHE_CONTROL, entry.cache_control.clone());
}

/// Concatenates ASCII pieces into one header value.
fn join(pieces: &[&[u8]]) -> HeaderValue {
    let mut buf = BytesMut::with_capacity(pieces.iter().map(|p| p.len()).sum());
    for piece in pieces {
        buf.extend_from_slice(piece);
    }
    HeaderValue::from_maybe_shared(buf.freeze()).unwrap_or(HeaderValue::from_static("keyapi-proxy"))
}

/// Marks an answer that went upstream and was not stored. `fwd_status` is the
/// upstream's HTTP status when it answered; otherwise `detail` says why not.
pub(crate) fn set_forwarded_uncached(
    headers: &mut HeaderMap,
    fwd_status: Option<u16>,
    detail: &str,
) {
    let status = match fwd_status {
        Some(code) => format_value(format_args!(
            "keyapi-proxy; fwd=uri-miss; fwd-status={code}"
        )),
        None => format_value(format_args!("keyapi-proxy; fwd=uri-miss; detail={detail}")),
    };
    headers.insert(CACHE_STATUS_NAME, status);
    set_no_store(headers);
}

/// Marks an answer the proxy made itself, neither from the cache nor
/// forwarded (`detail` says why: `only-if-cached`).
pub(crate) fn set_unserved(headers: &mut HeaderMap, detail: &str) {
    let status = format_value(format_args!("keyapi-proxy; detail={detail}"));
    headers.insert(CACHE_STATUS_NAME, status);
    set_no_store(headers);
}

/// `Cache-Control: no-store`: for answers that must not be kept by anyone.
pub(crate) fn set_no_store(headers: &mut HeaderMap) {
    headers.insert(CACHE_CONTROL, NO_STORE);
}

fn format_value(args: std::fmt::Arguments<'_>) -> HeaderValue {
    // Only ever formatted from ASCII literals and integers.
    HeaderValue::try_from(args.to_string()).unwrap_or(HeaderValue::from_static("keyapi-proxy"))
}
