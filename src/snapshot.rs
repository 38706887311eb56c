//! Restarts without re-spending credits: the in-memory cache is written to a
//! file on graceful shutdown and every `cache.snapshot_interval`, atomically
//! (temporary file + fsync + rename), and loaded at start-up with each
//! entry's original timestamps (so `Age` and expiry carry on).
//!
//! Format: `KAPSNAP1`, then records of `u32 key length, key, u32 entry
//! length, entry` (entries in the [`codec`] form, each with its own CRC). A
//! damaged file is skipped with a warning, never a crash.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use bytes::{Buf, Bytes};

use crate::cache::{CacheKey, LocalCache, codec};

const MAGIC: &[u8; 8] = b"KAPSNAP1";

/// Why a snapshot could not be used or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {0} is damaged or not a keyapi-proxy snapshot")]
    Damaged(PathBuf),
}

/// Writes every live entry of `cache` to `path`; returns how many.
pub async fn save(path: &Path, cache: &LocalCache) -> Result<usize, SnapshotError> {
    let entries = cache.entries();
    let now = SystemTime::now();
    let mut out = Vec::with_capacity(MAGIC.len() + entries.len() * 3072);
    out.extend_from_slice(MAGIC);
    let mut count = 0;
    for (key, entry) in &entries {
        if entry.remaining_lifetime(now).is_zero() {
            continue;
        }
        let encoded = codec::encode(entry);
        let key = key.path_and_query().as_bytes();
        for part in [key, &encoded[..]] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(part);
        }
        count += 1;
    }
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || write_atomically(&path, &out))
        .await
        .map_err(|e| SnapshotError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })??;
    Ok(count)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Loads `path` into `cache`, skipping expired or damaged entries; returns how
/// many were loaded. A missing file loads nothing.
pub async fn load(path: &Path, cache: &LocalCache) -> Result<usize, SnapshotError> {
    let raw = match tokio::fs::read(path).await {
        Ok(raw) => Bytes::from(raw),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(SnapshotError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let records = parse(raw).ok_or_else(|| SnapshotError::Damaged(path.to_owned()))?;
    let now = SystemTime::now();
    let mut loaded = 0;
    for (key, encoded) in records {
        match codec::decode(&encoded) {
            Ok(entry) if !entry.remaining_lifetime(now).is_zero() => {
                cache.insert(key, Arc::new(entry)).await;
                loaded += 1;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%key, error = %e, "skipping a damaged snapshot entry"),
        }
    }
    Ok(loaded)
}

/// Splits the file into (key, encoded entry) records; `None` if its structure is broken.
fn parse(mut raw: Bytes) -> Option<Vec<(CacheKey, Bytes)>> {
    if !raw.starts_with(MAGIC) {
        return None;
    }
    raw.advance(MAGIC.len());
    let mut records = Vec::new();
    while raw.has_remaining() {
        let key = take(&mut raw)?;
        let entry = take(&mut raw)?;
        let key = std::str::from_utf8(&key)
            .ok()
            .filter(|k| k.starts_with('/'))?;
        records.push((CacheKey::new(key.to_owned()), entry));
    }
    Some(records)
}

fn take(raw: &mut Bytes) -> Option<Bytes> {
    if raw.remaining() < 4 {
        return None;
    }
    let len = raw.get_u32_le() as usize;
    (raw.remaining() >= len).then(|| raw.split_to(len))
}
