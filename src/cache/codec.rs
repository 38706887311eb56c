//! Binary form of an [`Entry`], shared by the Redis tier and the snapshot
//! file: a fixed header (magic, version, timestamps, windows, status, part
//! lengths, CRC-32) followed by the raw body, its ETag, its gzip form and,
//! for a refusal that keeps a stale success, that success in this same form
//! (one level deep). Anything that does not decode exactly — foreign values,
//! truncation, bit rot — is rejected; what decodes is still only a claim,
//! checked by [`super::EntryCheck`] before it is served.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode};
use bytes::{BufMut, Bytes, BytesMut};

use super::Entry;

const MAGIC: &[u8; 4] = b"KAPE";
/// 3: a refusal carries the stale success it keeps. Version 2 (the same
/// header without the kept length) is still read, so an upgrade keeps its
/// snapshot and Redis entries.
const VERSION: u8 = 3;
const VERSION_2: u8 = 2;
/// magic + version + stored_at + ttl + swr + sie + status + negative
/// + body, etag and gzip lengths + crc (version 2 ends here) + kept length
const HEADER_LEN: usize = 4 + 1 + 8 + 8 + 8 + 8 + 2 + 1 + 4 + 2 + 4 + 4 + 4;
const HEADER_LEN_2: usize = HEADER_LEN - 4;

/// Why bytes are not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a keyapi-proxy entry (bad magic or version)")]
    Foreign,
    #[error("entry is truncated or has trailing bytes")]
    Length,
    #[error("entry body checksum mismatch")]
    Checksum,
    #[error("entry header holds an invalid value")]
    Invalid,
}

/// Serializes `entry` (timestamps in milliseconds). The CRC covers
/// everything after the header: body, ETag, gzip form and kept entry.
pub fn encode(entry: &Entry) -> Bytes {
    let etag = entry.etag.as_bytes();
    let gzip: &[u8] = entry.gzip_made().map_or(&[], |gzip| &gzip.body[..]);
    let kept = entry.kept().map(|kept| encode(kept)).unwrap_or_default();
    let parts = [&entry.body[..], etag, gzip, &kept[..]];
    let mut out =
        BytesMut::with_capacity(HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>());
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u64_le(unix_millis(entry.stored_at));
    for window in [
        entry.ttl,
        entry.stale_while_revalidate,
        entry.stale_if_error,
    ] {
        out.put_u64_le(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
    }
    out.put_u16_le(entry.status.as_u16());
    out.put_u8(u8::from(entry.negative));
    // Bodies are capped by upstream.max_body_bytes (validated to fit in u32);
    // an ETag is 34 bytes.
    out.put_u32_le(u32::try_from(entry.body.len()).unwrap_or(u32::MAX));
    out.put_u16_le(u16::try_from(etag.len()).unwrap_or(u16::MAX));
    out.put_u32_le(u32::try_from(gzip.len()).unwrap_or(u32::MAX));
    let mut crc = crc32fast::Hasher::new();
    for part in parts {
        crc.update(part);
    }
    out.put_u32_le(crc.finalize());
    out.put_u32_le(u32::try_from(kept.len()).unwrap_or(u32::MAX));
    for part in parts {
        out.put_slice(part);
    }
    out.freeze()
}

/// Parses bytes produced by [`encode`]; the parts are zero-copy slices of `raw`.
pub fn decode(raw: &Bytes) -> Result<Entry, DecodeError> {
    decode_nested(raw, true)
}

/// [`decode`], with a kept entry allowed only at the top (`may_keep`).
fn decode_nested(raw: &Bytes, may_keep: bool) -> Result<Entry, DecodeError> {
    if raw.len() < 5 || &raw[..4] != MAGIC {
        return Err(if raw.starts_with(MAGIC) {
            DecodeError::Length
        } else {
            DecodeError::Foreign
        });
    }
    let header_len = match raw[4] {
        VERSION => HEADER_LEN,
        VERSION_2 => HEADER_LEN_2,
        _ => return Err(DecodeError::Foreign),
    };
    if raw.len() < header_len {
        return Err(DecodeError::Length);
    }
    let header = &raw[..header_len];
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let u32_at = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[i..i + 4]);
        u32::from_le_bytes(b)
    };
    let stored_at = UNIX_EPOCH + Duration::from_millis(u64_at(5));
    let windows = [13, 21, 29].map(|i| Duration::from_millis(u64_at(i)));
    let status = StatusCode::from_u16(u16::from_le_bytes([header[37], header[38]]))
        .map_err(|_| DecodeError::Invalid)?;
    let negative = match header[39] {
        0 => false,
        1 => true,
        _ => return Err(DecodeError::Invalid),
    };
    let body_len = u32_at(40) as usize;
    let etag_len = usize::from(u16::from_le_bytes([header[44], header[45]]));
    let gzip_len = u32_at(46) as usize;
    let kept_len = if header_len == HEADER_LEN {
        u32_at(54) as usize
    } else {
        0
    };
    if raw.len() - header_len != body_len + etag_len + gzip_len + kept_len {
        return Err(DecodeError::Length);
    }
    if crc32fast::hash(&raw[header_len..]) != u32_at(50) {
        return Err(DecodeError::Checksum);
    }
    if kept_len > 0 && !may_keep {
        return Err(DecodeError::Invalid);
    }
    let body_end = header_len + body_len;
    let etag_end = body_end + etag_len;
    let gzip_end = etag_end + gzip_len;
    let etag = HeaderValue::from_maybe_shared(raw.slice(body_end..etag_end))
        .map_err(|_| DecodeError::Invalid)?;
    // Copied: the entry copies its body and tag into a buffer of its own, so
    // a view would keep the rest of the record alive for nothing.
    let gzip = (gzip_len > 0).then(|| Bytes::copy_from_slice(&raw[etag_end..gzip_end]));
    let kept = match kept_len {
        0 => None,
        _ => Some(decode_nested(&raw.slice(gzip_end..), false)?.into()),
    };
    let entry = Entry::assemble(
        raw.slice(header_len..body_end),
        etag,
        gzip,
        status,
        negative,
        stored_at,
        windows,
    );
    Ok(entry.keeping(kept))
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::{sync::Arc, time::SystemTime};

    use crate::config::Config;

    fn entry() -> Entry {
        let policy = Config::defaults().unwrap().cache.freshness_policy();
        Entry::success(
            Bytes::from_static(br#"{"code":0}"#),
            Duration::from_secs(60),
            &policy,
            SystemTime::now(),
        )
    }

    #[test]
    fn round_trips() {
        let original = entry();
        let decoded = decode(&encode(&original)).unwrap();
        assert_eq!(decoded.body, original.body);
        assert_eq!(decoded.etag, original.etag);
        assert!(decoded.gzip_made().is_none() && original.gzip_made().is_none());
        assert_eq!(decoded.status, original.status);
        assert_eq!(decoded.lifetime(), original.lifetime());
        let drift = original.age(decoded.stored_at) + decoded.age(original.stored_at);
        assert!(
            drift < Duration::from_millis(1),
            "stored_at kept to the millisecond"
        );
    }

    #[test]
    fn round_trips_the_precomputed_gzip_form() {
        let policy = Config::defaults().unwrap().cache.freshness_policy();
        let body = format!("{{\"code\":0,\"data\":\"{}\"}}", "ufc324 ".repeat(200));
        let original = Entry::success(
            Bytes::from(body),
            Duration::from_secs(60),
            &policy,
            SystemTime::now(),
        );
        let made = original.gzip().map(|gzip| gzip.body.clone());
        assert!(made.is_some());
        let decoded = decode(&encode(&original)).unwrap();
        assert_eq!(decoded.gzip_made().map(|gzip| gzip.body.clone()), made);
        assert_eq!(decoded.etag, original.etag);
        assert_eq!(decoded.body, original.body);
    }

    #[test]
    fn round_trips_a_refusal_that_keeps_a_success() {
        let policy = Config::defaults().unwrap().cache.freshness_policy();
        let success = Arc::new(entry());
        let refusal = Entry::negative(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"code":404}"#),
            &policy,
            SystemTime::now(),
        )
        .keeping(Some(Arc::clone(&success)));
        let decoded = decode(&encode(&refusal)).unwrap();
        assert!(decoded.negative);
        assert_eq!(decoded.status, StatusCode::NOT_FOUND);
        let kept = decoded.kept().unwrap();
        assert!(kept.is_same_answer(&success) && kept.kept().is_none());
        assert_eq!(kept.body, success.body);

        // Only one level deep: a kept entry keeping another is refused.
        let nested = Entry::negative(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"{}"),
            &policy,
            SystemTime::now(),
        )
        .keeping(Some(Arc::new(refusal)));
        assert_eq!(decode(&encode(&nested)).unwrap_err(), DecodeError::Invalid);
    }

    #[test]
    fn reads_version_2() {
        let v3 = encode(&entry());
        let mut v2 = v3[..HEADER_LEN_2].to_vec();
        v2[4] = VERSION_2;
        v2.extend_from_slice(&v3[HEADER_LEN..]);
        let decoded = decode(&Bytes::from(v2)).unwrap();
        assert_eq!(decoded.body, entry().body);
    }

    #[test]
    fn rejects_damage_and_foreign_values() {
        let good = encode(&entry());
        assert_eq!(
            decode(&Bytes::from_static(b"hello world")).unwrap_err(),
            DecodeError::Foreign
        );
        assert_eq!(
            decode(&good.slice(..good.len() - 1)).unwrap_err(),
            DecodeError::Length
        );
        let mut flipped = good.to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            decode(&Bytes::from(flipped)).unwrap_err(),
            DecodeError::Checksum
        );
        let mut longer = good.to_vec();
        longer.push(b' ');
        assert_eq!(
            decode(&Bytes::from(longer)).unwrap_err(),
            DecodeError::Length
        );
    }
}
