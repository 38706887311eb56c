//! The request id: a sane client `X-Request-Id` is kept (so ids can be
//! followed across services), otherwise one is generated — a per-process
//! random prefix and a counter, in a UUID's layout. Every answer carries it,
//! and so does every error envelope. [`crate::observe`] assigns it and keeps
//! the current request's.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};

use axum::http::{HeaderName, HeaderValue};

/// `X-Request-Id`, on every response.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const MAX_ID_LEN: usize = 128;

/// The id of the request being served.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(Id);

#[derive(Debug, Clone)]
enum Id {
    /// The client's, echoed: shares the request's buffer.
    Client(HeaderValue),
    /// Ours, kept as text on the stack until it becomes a header.
    Generated([u8; GENERATED_LEN]),
}

/// Length of a generated id: the layout of a UUID.
const GENERATED_LEN: usize = 36;
/// Length of its per-process part, `xxxxxxxx-xxxx-xxxx-`.
const PREFIX_LEN: usize = 19;

/// Writes the low `out.len()` nibbles of `value` into `out` as lowercase
/// hex, most significant first.
fn hex_into(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b"0123456789abcdef"[(value & 0xf) as usize];
        value >>= 4;
    }
}

impl RequestId {
    /// The client's id if it is 1–128 visible characters from `[A-Za-z0-9._:-]`.
    pub(crate) fn from_client(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let sane = (1..=MAX_ID_LEN).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        sane.then(|| Self(Id::Client(value.clone())))
    }

    /// A new id (for requests that sent none, or no usable one): a random
    /// per-process prefix and a counter, in a UUID's layout. Unique without
    /// asking an RNG per request, and sortable within one process.
    pub(crate) fn generate() -> Self {
        /// `xxxxxxxx-xxxx-xxxx-`: 64 random bits, formatted once.
        static PREFIX: OnceLock<[u8; PREFIX_LEN]> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix = PREFIX.get_or_init(|| {
            let bits = fastrand::u64(..);
            let mut text = [b'-'; PREFIX_LEN];
            hex_into(&mut text[0..8], bits >> 32);
            hex_into(&mut text[9..13], bits >> 16);
            hex_into(&mut text[14..18], bits);
            text
        });
        // `xxxx-xxxxxxxxxxxx`: the counter's 64 bits.
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut text = [b'-'; GENERATED_LEN];
        text[..PREFIX_LEN].copy_from_slice(prefix);
        hex_into(&mut text[PREFIX_LEN..PREFIX_LEN + 4], next >> 48);
        hex_into(&mut text[PREFIX_LEN + 5..], next);
        Self(Id::Generated(text))
    }

    /// The id as text (always ASCII by construction).
    pub(crate) fn as_str(&self) -> &str {
        match &self.0 {
            Id::Client(value) => value.to_str().unwrap_or(""),
            Id::Generated(text) => std::str::from_utf8(text).unwrap_or(""),
        }
    }

    /// The id as the `X-Request-Id` header value.
    pub(crate) fn into_header(self) -> HeaderValue {
        match self.0 {
            Id::Client(value) => value,
            Id::Generated(text) => {
                HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("unknown"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_and_uuid_shaped() {
        let (a, b) = (RequestId::generate(), RequestId::generate());
        assert_ne!(a.as_str(), b.as_str());
        for id in [a.as_str(), b.as_str()] {
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert!(
                id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()),
                "{id}"
            );
        }
        assert_eq!(a.into_header().as_bytes().len(), GENERATED_LEN);
    }
}
