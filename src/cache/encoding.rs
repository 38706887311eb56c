//! What is computed once per entry, so a hit only picks bytes: its strong
//! `ETag` and the `Cache-Control` value of its lifetime (when stored), its
//! gzip form with its own tag (when first asked for).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    time::Duration,
};

use axum::http::HeaderValue;
use bytes::{Bytes, BytesMut};
use flate2::{Compression, read::GzDecoder, write::GzEncoder};

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

/// `body`, `etag` and `cache_control` copied into one exact-size buffer and
/// returned as views of it: a hit clones all three, and in a large cache
/// their reference counts in three cold allocations cost three cache misses,
/// in one buffer one. The two values go first: a hit copies them into the
/// response head, then the kernel reads the body that follows them, so they
/// share its first cache line instead of taking one of their own after it.
pub(super) fn packed(
    body: &[u8],
    etag: &HeaderValue,
    cache_control: &HeaderValue,
) -> (Bytes, HeaderValue, HeaderValue) {
    let mut buffer = BytesMut::with_capacity(etag.len() + cache_control.len() + body.len());
    for part in [etag.as_bytes(), cache_control.as_bytes(), body] {
        buffer.extend_from_slice(part);
    }
    let buffer = buffer.freeze();
    let (etag_end, head_end) = (etag.len(), etag.len() + cache_control.len());
    // The bytes were valid header values already; the fallback never runs.
    let value = |range: std::ops::Range<usize>, original: &HeaderValue| {
        HeaderValue::from_maybe_shared(buffer.slice(range)).unwrap_or_else(|_| original.clone())
    };
    (
        buffer.slice(head_end..),
        value(0..etag_end, etag),
        value(etag_end..head_end, cache_control),
    )
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

/// Whether `gzip` decompresses to exactly `body` (reading at most one byte
/// more than `body`, so a bomb costs no more than the body it claims).
pub(super) fn gunzips_to(gzip: &[u8], body: &[u8]) -> bool {
    let limit = u64::try_from(body.len())
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut plain = Vec::with_capacity(body.len());
    GzDecoder::new(gzip)
        .take(limit)
        .read_to_end(&mut plain)
        .is_ok_and(|_| plain == body)
}
