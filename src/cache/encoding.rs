//! What is computed once per entry, so a hit only picks bytes: its strong
//! `ETag` and the `Cache-Control` value of its lifetime (when stored), its
//! gzip form with its own tag (when first asked for).

use std::{fmt::Write as _, io::Write as _, time::Duration};

use axum::http::HeaderValue;
use bytes::Bytes;
use flate2::{Compression, write::GzEncoder};

use crate::digest;

/// Bodies smaller than this are not worth compressing.
const MIN_GZIP_BYTES: usize = 256;

/// `"<first 128 bits of SHA-256, hex>"`: equal bodies, equal tags.
pub(super) fn strong_etag(body: &[u8]) -> HeaderValue {
    let hash = digest::sha256(body);
    let tag = format!("\"{}\"", digest::hex(&hash[..16]));
    // Quotes and hex digits are always a valid header value.
    HeaderValue::try_from(tag).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The tag of the gzip representation: `"<tag>-gzip"` for `"<tag>"`.
pub(super) fn gzip_etag(etag: &HeaderValue) -> HeaderValue {
    let bytes = etag.as_bytes();
    let inner = bytes.strip_suffix(b"\"").unwrap_or(bytes);
    let mut tag = Vec::with_capacity(bytes.len() + 5);
    tag.extend_from_slice(inner);
    tag.extend_from_slice(b"-gzip\"");
    // A valid header value plus ASCII letters is still one.
    HeaderValue::from_bytes(&tag).unwrap_or(HeaderValue::from_static("\"0-gzip\""))
}

/// `max-age` is the whole freshness lifetime (downstream caches subtract
/// `Age` themselves); the stale windows are advertised when they exist.
/// No `public`: without `Authorization` it changes nothing, and with client
/// tokens a shared cache must not hand a client's answer to anyone else.
pub(super) fn cache_control([ttl, swr, sie]: [Duration; 3]) -> HeaderValue {
    let mut value = format!("max-age={}", ttl.as_secs());
    for (directive, window) in [("stale-while-revalidate", swr), ("stale-if-error", sie)] {
        if !window.is_zero() {
            let _ = write!(value, ", {directive}={}", window.as_secs());
        }
    }
    // Digits, letters, `-`, `=`, `,` and spaces only.
    HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static("max-age=0"))
}

/// The gzip form of `body`, if it is smaller than `body`.
pub(super) fn gzip(body: &[u8]) -> Option<Bytes> {
    if body.len() < MIN_GZIP_BYTES {
        return None;
    }
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 3), Compression::default());
    encoder.write_all(body).ok()?;
    let compressed = encoder.finish().ok()?;
    // Exact-size allocation: the encoder's Vec may have doubled its capacity,
    // and an entry keeps this buffer for its whole life.
    (compressed.len() < body.len()).then(|| Bytes::from(compressed.into_boxed_slice()))
}
