//! The KeyAPI key: read from `KEYAPI_API_KEY` or a file (a Docker secret),
//! kept in a [`SecretString`], and checked usable in a header.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use super::error::{API_KEY_ENV, API_KEY_FILE_ENV, ConfigError};

/// Reads the KeyAPI key from `KEYAPI_API_KEY` or the file named by `KEYAPI_API_KEY_FILE`.
pub fn api_key_from_env() -> Result<SecretString, ConfigError> {
    let direct = std::env::var(API_KEY_ENV).ok().filter(|v| !v.is_empty());
    let file = api_key_file_from_env();
    match (direct, file) {
        (Some(_), Some(_)) => Err(ConfigError::AmbiguousApiKey),
        (None, None) => Err(ConfigError::MissingApiKey),
        (Some(key), None) => {
            let key = SecretString::from(key);
            match is_valid_api_key(&key) {
                true => Ok(key),
                false => Err(ConfigError::BadApiKey(API_KEY_ENV)),
            }
        }
        (None, Some(path)) => read_api_key_file(&path),
    }
}

/// The file `KEYAPI_API_KEY_FILE` names, if set (the key is read again from
/// it on every reload and when it changes: see [`crate::api_key`]).
pub fn api_key_file_from_env() -> Option<PathBuf> {
    std::env::var_os(API_KEY_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Reads and checks the KeyAPI key held in `path` (surrounding whitespace ignored).
pub fn read_api_key_file(path: &Path) -> Result<SecretString, ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::ApiKeyFile {
        path: path.to_owned(),
        source,
    })?;
    let key = SecretString::from(raw.trim());
    if !is_valid_api_key(&key) {
        return Err(ConfigError::BadApiKey(API_KEY_FILE_ENV));
    }
    Ok(key)
}

/// A key must be usable in `Authorization: Bearer <key>`: visible ASCII, no spaces.
pub fn is_valid_api_key(key: &SecretString) -> bool {
    let k = key.expose_secret();
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic())
}
