//! The KeyAPI key in use, and its rotation without a restart.
//!
//! [`LiveKey`] holds the current key — a [`SecretString`] with a generation
//! number — and where it came from: given once (`KEYAPI_API_KEY`, tests), or
//! a file (`KEYAPI_API_KEY_FILE`: a Docker or Kubernetes secret). A file is
//! read again on every reload, when its directory changes ([`LiveKey::watch`]:
//! secrets are replaced by a rename, which a watch on the file itself would
//! miss), and when KeyAPI rejects a key that may have been replaced. Each
//! upstream attempt takes the current key once ([`LiveKey::current`]), so a
//! call already sent finishes with its key while new calls use the new one.
//! Nothing here prints a key: [`ApiKey`] shows its generation only.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    clock::{self, SharedClock},
    config::{self, ConfigError},
    envelope::KeyEcho,
    metrics::Metrics,
};

/// Pause after a change in the key's directory before reading it: a
/// secret update is several events (write, rename, symlink swap) in a row.
const SETTLE: Duration = Duration::from_millis(50);

/// One key, as sent in `Authorization: Bearer`.
pub struct ApiKey {
    secret: SecretString,
    /// 1 for the key the process started with, one more per rotation.
    generation: u64,
}

impl ApiKey {
    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Which key this is: 1 at start, one more per rotation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Shows the generation only.
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey([redacted], generation {})", self.generation)
    }
}

/// Why the key was read again (a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reread {
    /// A configuration reload.
    Reload,
    /// A change in the key file's directory.
    Watch,
    /// KeyAPI rejected a key.
    Rejected,
}

impl Reread {
    fn as_str(self) -> &'static str {
        match self {
            Self::Reload => "reload",
            Self::Watch => "file_changed",
            Self::Rejected => "key_rejected",
        }
    }
}

/// What `/readyz` and `/stats` say about the key (never the key).
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// The key in use: 1 at start, one more per rotation.
    pub generation: u64,
    /// Unix seconds of the last rotation, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<u64>,
    /// Unix seconds of the last 401/403 from KeyAPI, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rejected_at: Option<u64>,
    /// Whether that rejection was of a key replaced meanwhile (retried with
    /// the current one) rather than of the key in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rejected_after_rotation: Option<bool>,
}

/// The current KeyAPI key and where to read the next one.
pub struct LiveKey {
    /// `KEYAPI_API_KEY_FILE`, when the key came from a file.
    file: Option<PathBuf>,
    current: ArcSwap<ApiKey>,
    /// Searches answers for the key (current and previous).
    echo: Arc<KeyEcho>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    /// Rotations and rejections, for [`LiveKey::status`] (which takes the
    /// generation from `current`); also serializes
    /// rotations (a watch event and a rejected call may race).
    status: Mutex<KeyStatus>,
}

impl std::fmt::Debug for LiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKey")
            .field("file", &self.file)
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

impl LiveKey {
    /// `key` (already checked), read again from `file` when given.
    pub fn new(
        key: SecretString,
        file: Option<PathBuf>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> Self {
        Self {
            file,
            echo: Arc::new(KeyEcho::new(&key)),
            current: ArcSwap::from_pointee(ApiKey {
                secret: key,
                generation: 1,
            }),
            metrics,
            clock,
            status: Mutex::new(KeyStatus::default()),
        }
    }

    /// The key for the next call.
    pub fn current(&self) -> Arc<ApiKey> {
        self.current.load_full()
    }

    /// The search for the key (and the one before it) in bodies.
    pub fn echo(&self) -> Arc<KeyEcho> {
        Arc::clone(&self.echo)
    }

    /// Reads the key file (`None` when the key was given once): checked, not yet used.
    pub fn read(&self) -> Result<Option<SecretString>, ConfigError> {
        self.file
            .as_deref()
            .map(config::read_api_key_file)
            .transpose()
    }

    /// Puts `key` in use if it is not the current one; true when it was
    /// new (then logged and counted).
    pub fn install(&self, key: SecretString, why: Reread) -> bool {
        let mut status = self.lock_status();
        let current = self.current.load();
        if current.expose() == key.expose_secret() {
            return false;
        }
        let generation = current.generation + 1;
        self.echo.rotate(&key);
        self.current.store(Arc::new(ApiKey {
            secret: key,
            generation,
        }));
        status.rotated_at = Some(clock::unix_secs(self.clock.now()));
        drop(status);
        self.metrics.api_key_rotated();
        tracing::info!(
            generation,
            why = why.as_str(),
            "KeyAPI key rotated: new calls use the new key"
        );
        true
    }

    /// Reads the key file again and puts a new key in use; true when the
    /// key changed. A file that cannot be read keeps the current key.
    pub fn reread(&self, why: Reread) -> bool {
        match self.read() {
            Ok(Some(key)) => self.install(key, why),
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(%error, why = why.as_str(), "KeyAPI key file not usable; the current key stays in use");
                false
            }
        }
    }

    /// KeyAPI rejected `used` (401/403): the key file is read again, and the
    /// current key is returned when it is newer than `used` — the call may
    /// be tried once more with it. Reported either way (log, metric, status).
    pub fn rejected(&self, used: &ApiKey) -> Option<Arc<ApiKey>> {
        self.reread(Reread::Rejected);
        let current = self.current();
        let after_rotation = current.generation > used.generation;
        {
            let mut status = self.lock_status();
            status.last_rejected_at = Some(clock::unix_secs(self.clock.now()));
            status.last_rejected_after_rotation = Some(after_rotation);
        }
        if after_rotation {
            self.metrics.key_rejected_after_rotation();
            tracing::warn!(
                rejected = used.generation,
                current = current.generation,
                "KeyAPI rejected a key replaced meanwhile (rotation); trying once more with the current key"
            );
            Some(current)
        } else {
            tracing::error!(
                generation = used.generation,
                "KeyAPI rejected the KeyAPI key in use; replace it (KEYAPI_API_KEY_FILE is read again on change and on reload)"
            );
            None
        }
    }

    /// Rotations and rejections so far.
    pub fn status(&self) -> KeyStatus {
        KeyStatus {
            generation: self.current.load().generation,
            ..*self.lock_status()
        }
    }

    /// Watches the key file's directory (a secret replaced by a rename, a
    /// Kubernetes symlink swap) and the file itself (a write in place, seen
    /// through a bind mount), and reads the key again after each change,
    /// until the returned watch is dropped; `None` when the key was given once.
    pub fn watch(self: &Arc<Self>) -> Result<Option<KeyWatch>, notify::Error> {
        let Some(file) = self.file.clone() else {
            return Ok(None);
        };
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let changed = Arc::new(Notify::new());
        let signal = Arc::clone(&changed);
        // Called on notify's own thread: it only wakes the task below.
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    signal.notify_one();
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let _ = watcher.watch(&file, RecursiveMode::NonRecursive);
        // A change between the first read and the watch was not seen.
        self.reread(Reread::Watch);
        let key = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                changed.notified().await;
                tokio::time::sleep(SETTLE).await;
                key.reread(Reread::Watch);
                // A file replaced by a rename is a new one: watch that.
                let _ = watcher.watch(&file, RecursiveMode::NonRecursive);
            }
        });
        Ok(Some(KeyWatch { task }))
    }

    fn lock_status(&self) -> MutexGuard<'_, KeyStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running watch of the key file and its directory; stops when dropped.
pub struct KeyWatch {
    /// Owns the watcher: aborting it stops the watch.
    task: JoinHandle<()>,
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn live(file: Option<PathBuf>) -> LiveKey {
        let clock = SharedClock::new(Arc::new(SystemClock));
        let metrics = Arc::new(Metrics::new(clock.clone()));
        LiveKey::new(SecretString::from("sk-one"), file, metrics, clock)
    }

    #[test]
    fn a_new_key_gets_the_next_generation_and_never_prints() {
        let key = live(None);
        assert!(!key.install(SecretString::from("sk-one"), Reread::Reload));
        assert!(key.install(SecretString::from("sk-two"), Reread::Reload));
        let current = key.current();
        assert_eq!((current.generation(), current.expose()), (2, "sk-two"));
        assert_eq!(format!("{current:?}"), "ApiKey([redacted], generation 2)");
        assert!(!format!("{key:?}").contains("sk-"));
        assert!(
            key.echo().is_in(b"{\"m\":\"sk-one\"}"),
            "the old key is still searched for"
        );
        assert_eq!(key.status().generation, 2);
    }

    #[test]
    fn a_rejected_old_key_offers_the_current_one_once_a_rejected_current_key_nothing() {
        let key = live(None);
        let old = key.current();
        assert!(key.rejected(&old).is_none(), "nothing newer to try");
        key.install(SecretString::from("sk-two"), Reread::Watch);
        assert_eq!(key.rejected(&old).map(|k| k.generation()), Some(2));
        assert_eq!(key.status().last_rejected_after_rotation, Some(true));
    }
}
