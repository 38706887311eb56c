//! Entries written the way another replica (or an attacker with access to
//! Redis or the snapshot directory) would: laid out byte by byte after the
//! codec's documented format, not through our encoder, so a test can write
//! what the proxy itself never would.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyapi_proxy::{cache::CacheKey, digest, route::HASHTAG_DETAIL_PATH};

/// The cache key of the default route for `hashtag_name=<name>`.
pub fn hashtag_key(name: &str) -> CacheKey {
    CacheKey::new(format!(
        "{HASHTAG_DETAIL_PATH}?period=7&region=all_regions&hashtag_name={name}"
    ))
}

/// The fields of one encoded entry (codec version 3, nothing kept).
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub stored_at: SystemTime,
    /// `[ttl, stale_while_revalidate, stale_if_error]`.
    pub windows: [Duration; 3],
    pub status: u16,
    pub negative: bool,
    pub body: Vec<u8>,
    /// `None`: the body's own strong ETag.
    pub etag: Option<Vec<u8>>,
    pub gzip: Vec<u8>,
}

impl RawEntry {
    /// A success the proxy could have stored just now: HTTP 200, `code: 0`,
    /// a one-minute TTL, `data` saying `marker`.
    pub fn success(marker: &str) -> Self {
        Self {
            stored_at: SystemTime::now(),
            windows: [Duration::from_secs(60), Duration::ZERO, Duration::ZERO],
            status: 200,
            negative: false,
            body: format!(r#"{{"code":0,"message":"success","data":{{"marker":"{marker}"}}}}"#)
                .into_bytes(),
            etag: None,
            gzip: Vec::new(),
        }
    }

    /// The value the codec reads: header, then body, ETag and gzip form.
    pub fn encode(&self) -> Vec<u8> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let etag = self.etag.clone().unwrap_or_else(|| {
            let hash = digest::sha256(&self.body);
            format!("\"{}\"", digest::hex(&hash[..16])).into_bytes()
        });
        let mut crc = crc32fast::Hasher::new();
        for part in [&self.body, &etag, &self.gzip] {
            crc.update(part);
        }
        let mut out = b"KAPE\x03".to_vec();
        out.extend(millis(self.stored_at.duration_since(UNIX_EPOCH).unwrap()).to_le_bytes());
        for window in self.windows {
            out.extend(millis(window).to_le_bytes());
        }
        out.extend(self.status.to_le_bytes());
        out.push(u8::from(self.negative));
        out.extend(u32::try_from(self.body.len()).unwrap().to_le_bytes());
        out.extend(u16::try_from(etag.len()).unwrap().to_le_bytes());
        out.extend(u32::try_from(self.gzip.len()).unwrap().to_le_bytes());
        out.extend(crc.finalize().to_le_bytes());
        out.extend(0u32.to_le_bytes());
        for part in [&self.body, &etag, &self.gzip] {
            out.extend_from_slice(part);
        }
        out
    }
}

/// One poisoned entry per reason the proxy refuses an entry for, named by
/// that reason (its `cache_entries_rejected_total` label). Bodies larger than
/// `max_body_bytes` are the `too_large` one.
pub fn poisoned(api_key: &str, max_body_bytes: usize) -> Vec<(&'static str, RawEntry)> {
    let good = RawEntry::success("poison");
    let with = |change: &dyn Fn(&mut RawEntry)| {
        let mut entry = good.clone();
        change(&mut entry);
        entry
    };
    let other_body = RawEntry::success("another body").body;
    vec![
        ("status", with(&|e| e.status = 101)),
        (
            "status",
            with(&|e| {
                e.status = 999;
                e.negative = true;
            }),
        ),
        ("body", with(&|e| e.body = b"<html>poison</html>".to_vec())),
        (
            "api_key",
            with(&|e| {
                let escaped = api_key.replace('-', "\\u002d");
                e.body = format!(r#"{{"code":0,"data":{{"poison":"{escaped}"}}}}"#).into_bytes();
            }),
        ),
        (
            "future",
            with(&|e| e.stored_at = SystemTime::now() + Duration::from_secs(3600)),
        ),
        (
            "lifetime",
            with(&|e| e.windows[0] = Duration::from_millis(u64::MAX)),
        ),
        ("etag", with(&|e| e.etag = Some(b"\"0\"".to_vec()))),
        ("gzip", with(&|e| e.gzip = gzip(&other_body))),
        (
            "too_large",
            with(&|e| {
                let padding = "x".repeat(max_body_bytes);
                e.body = format!(r#"{{"code":0,"data":"{padding}","m":"poison"}}"#).into_bytes();
            }),
        ),
    ]
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

/// A snapshot file holding `records` (key, encoded entry).
pub fn snapshot_file(records: &[(CacheKey, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"KAPSNAP1".to_vec();
    for (key, entry) in records {
        for part in [key.path_and_query().as_bytes(), entry] {
            out.extend(u32::try_from(part.len()).unwrap().to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}
