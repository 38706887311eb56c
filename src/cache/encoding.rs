//! What is precomputed from a body when it is stored, so a hit only picks
//! bytes: its strong `ETag` and its gzip form.

use std::io::Write as _;

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
