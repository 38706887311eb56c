//! The request id: a sane client `X-Request-Id` is kept (so ids can be
//! followed across services), otherwise one is generated — a valid version 7
//! UUID (RFC 9562) made from the process's start time, a counter and
//! per-process random bits. Every answer carries it, and so does every error
//! envelope. [`crate::observe`] assigns it and keeps the current request's.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::http::{HeaderName, HeaderValue};
use uuid::Builder;

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

/// Length of a generated id: a hyphenated UUID.
const GENERATED_LEN: usize = 36;
/// Where the text of the bits that change per id starts: after
/// `tttttttt-tttt-7` (the start time's 48 bits and the version).
const COUNTER_AT: usize = 15;
/// Per-process random bits below the counter in a generated id.
const RANDOM_BITS: u32 = 26;
/// RFC 9562's variant, in the top two bits of the id's last 64.
const VARIANT: u64 = 0b10 << 62;

/// Writes the low `out.len()` nibbles of `value` into `out` as lowercase
/// hex, most significant first.
fn hex_into(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b"0123456789abcdef"[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// `template` with the 74 bits after its version filled in: `counter` (its
/// low 48 bits) above `random`, 12 bits in the third group (`ccc`), 62 after
/// the variant.
fn numbered(template: &[u8; GENERATED_LEN], random: u64, counter: u64) -> [u8; GENERATED_LEN] {
    let mut text = *template;
    hex_into(
        &mut text[COUNTER_AT..COUNTER_AT + 3],
        counter >> (62 - RANDOM_BITS),
    );
    let low = VARIANT | ((counter << RANDOM_BITS | random) & !(0b11 << 62));
    hex_into(&mut text[COUNTER_AT + 4..COUNTER_AT + 8], low >> 48);
    hex_into(&mut text[COUNTER_AT + 9..], low);
    text
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

    /// A new id (for requests that sent none, or no usable one): a version 7
    /// UUID whose timestamp is the process's start (read once: no clock read
    /// per request), followed by a 48-bit counter and 26 random bits fixed
    /// per process. Unique without asking an RNG per request (processes
    /// started in the same millisecond differ by their random bits), and
    /// sortable: by process start, then by order within the process.
    pub(crate) fn generate() -> Self {
        /// The start time and version formatted once, and this process's random bits.
        static TEMPLATE: OnceLock<([u8; GENERATED_LEN], u64)> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let (template, random) = TEMPLATE.get_or_init(|| {
            // Wall time, not the app's clock: a UUID's timestamp is Unix time.
            let start = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64);
            let template = Builder::from_unix_timestamp_millis(start, &[0; 10]).into_uuid();
            let mut text = [0; GENERATED_LEN];
            template.hyphenated().encode_lower(&mut text);
            (text, fastrand::u64(..1 << RANDOM_BITS))
        });
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(Id::Generated(numbered(template, *random, next)))
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
#[allow(clippy::unwrap_used)]
mod tests {
    use uuid::{Uuid, Variant, Version};

    use super::*;

    #[test]
    fn generated_ids_are_version_7_uuids_in_order() {
        let ids: Vec<RequestId> = (0..3).map(|_| RequestId::generate()).collect();
        let texts: Vec<&str> = ids.iter().map(RequestId::as_str).collect();
        assert!(texts.is_sorted() && texts[0] < texts[2], "{texts:?}");
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for text in &texts {
            let uuid = Uuid::parse_str(text).unwrap();
            assert_eq!(uuid.get_version(), Some(Version::SortRand), "{text}");
            assert_eq!(uuid.get_variant(), Variant::RFC4122, "{text}");
            assert_eq!(
                uuid.hyphenated().to_string(),
                *text,
                "lower-case, hyphenated"
            );
            // The timestamp is this process's start: earlier than now, but not by days.
            let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
            let started_ms = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(
                started_ms <= now_ms && now_ms - started_ms < 86_400_000,
                "{text}"
            );
        }
        assert_eq!(
            ids.into_iter().next().unwrap().into_header().len(),
            GENERATED_LEN
        );
    }

    #[test]
    fn ids_stay_valid_and_ordered_where_the_counter_carries_into_the_third_group() {
        let template = *RequestId::generate()
            .as_str()
            .as_bytes()
            .first_chunk()
            .unwrap();
        let random = (1 << RANDOM_BITS) - 1;
        let carry = 1 << (62 - RANDOM_BITS);
        let ids = [0, carry - 1, carry, (1 << 48) - 1].map(|n| numbered(&template, random, n));
        let texts = ids.map(|id| String::from_utf8(id.to_vec()).unwrap());
        assert!(texts.is_sorted(), "{texts:?}");
        for text in &texts {
            let uuid = Uuid::parse_str(text).unwrap();
            assert_eq!(uuid.get_version(), Some(Version::SortRand), "{text}");
            assert_eq!(uuid.get_variant(), Variant::RFC4122, "{text}");
            assert_eq!(
                text[..COUNTER_AT],
                texts[0][..COUNTER_AT],
                "start time kept"
            );
        }
    }
}
