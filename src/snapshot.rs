//! Restarts without re-spending credits: the in-memory cache is written to a
//! file on graceful shutdown and every `cache.snapshot_interval`, atomically
//! (temporary file + fsync + rename), and loaded at start-up with each
//! entry's original timestamps (so `Age` and expiry carry on).
//!
//! Writing streams one entry at a time through a buffer, so memory does not
//! grow with the cache. The temporary file next to the target is created
//! with `create_new` and `O_NOFOLLOW`, mode 0600: a planted symlink or file
//! at that name is never followed, only removed (the link itself).
//!
//! Format: `KAPSNAP1`, then records of `u32 key length, key, u32 entry
//! length, entry` (entries in the [`codec`] form, each with its own CRC). A
//! damaged file is skipped with a warning, never a crash; each entry passes
//! the same [`EntryCheck`] as one read from Redis before it is loaded. The
//! spend history, when it lives in memory, is one more record under
//! [`SPEND_RECORD`], a key no route can have (a version without it skips
//! the record as an unreadable entry).

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use bytes::{Buf, Bytes};

use crate::cache::{CacheKey, EntryCheck, LocalCache, Source, codec};

const MAGIC: &[u8; 8] = b"KAPSNAP1";
/// The key of the spend history's record: `#` is in no route's path.
const SPEND_RECORD: &str = "/#spend-history";

/// What a snapshot held besides the entries it loaded.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Entries loaded into the cache.
    pub(crate) entries: usize,
    /// The spend history's record, if the snapshot has one.
    pub(crate) spend: Option<Bytes>,
}

/// Why a snapshot could not be used or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {0} is damaged or not a keyapi-proxy snapshot")]
    Damaged(PathBuf),
}

/// Write buffer of the snapshot stream: a few syscalls per megabyte, not per entry.
const WRITE_BUFFER: usize = 256 * 1024;

/// Writes every live entry of `cache` to `path`, and `spend` (the spend
/// history) when given; returns how many entries.
pub(crate) async fn save(
    path: &Path,
    cache: &LocalCache,
    spend: Option<Vec<u8>>,
    now: SystemTime,
) -> Result<usize, SnapshotError> {
    let path = path.to_owned();
    let cache = cache.clone();
    let target = path.clone();
    tokio::task::spawn_blocking(move || write_atomically(&target, &cache, spend, now))
        .await
        .map_err(|e| SnapshotError::Io {
            path,
            source: std::io::Error::other(e),
        })?
}

fn write_atomically(
    path: &Path,
    cache: &LocalCache,
    spend: Option<Vec<u8>>,
    now: SystemTime,
) -> Result<usize, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = create_private(&tmp).map_err(io)?;
    let written = write_records(file, cache, spend, now).and_then(|count| {
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory is synced.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(count)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// A new file only we can read, never through a symlink. A leftover at that
/// name (a crashed run, or something planted) is removed first: `remove_file`
/// removes a link, not what it points to.
fn create_private(tmp: &Path) -> std::io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(tmp)?;
            open()
        }
        other => other,
    }
}

/// Streams the magic, every live entry and `spend` to `file`, then syncs it.
fn write_records(
    file: File,
    cache: &LocalCache,
    spend: Option<Vec<u8>>,
    now: SystemTime,
) -> std::io::Result<usize> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    out.write_all(MAGIC)?;
    let mut count = 0;
    for (key, entry) in cache.iter() {
        if entry.remaining_retention(now).is_zero() {
            continue;
        }
        write_record(
            &mut out,
            key.path_and_query().as_bytes(),
            &codec::encode(&entry),
        )?;
        count += 1;
    }
    if let Some(spend) = spend {
        write_record(&mut out, SPEND_RECORD.as_bytes(), &spend)?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(count)
}

/// One record: its key and its value, each after its length.
fn write_record(out: &mut impl Write, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    for part in [key, value] {
        out.write_all(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes())?;
        out.write_all(part)?;
    }
    Ok(())
}

/// Loads `path` into `cache`, skipping entries expired at `now` (the app's
/// clock) or refused by `check`; returns how many were loaded, and the
/// spend history's record. A missing file loads nothing.
pub(crate) async fn load(
    path: &Path,
    cache: &LocalCache,
    check: &EntryCheck,
    now: SystemTime,
) -> Result<Loaded, SnapshotError> {
    let raw = match tokio::fs::read(path).await {
        Ok(raw) => Bytes::from(raw),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(source) => {
            return Err(SnapshotError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let records = parse(raw).ok_or_else(|| SnapshotError::Damaged(path.to_owned()))?;
    let mut loaded = Loaded::default();
    for (key, encoded) in records {
        if key.path_and_query() == SPEND_RECORD {
            loaded.spend = Some(encoded);
            continue;
        }
        let Some(entry) = check.admit(Source::Snapshot, &key, &encoded) else {
            continue;
        };
        if !entry.remaining_retention(now).is_zero() {
            cache.insert(key, Arc::new(entry));
            loaded.entries += 1;
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
