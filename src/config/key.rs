//! The KeyAPI key: read from `KEYAPI_API_KEY` or a file (a Docker secret),
//! kept in a [`SecretString`], and checked usable in a header.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

use super::error::{API_KEY_ENV, API_KEY_FILE_ENV, ConfigError};

/// Reads the KeyAPI key from `KEYAPI_API_KEY` or the file named by `KEYAPI_API_KEY_FILE`.
pub fn api_key_from_env() -> Result<SecretString, ConfigError> {
    let direct = std::env::var(API_KEY_ENV).ok().filter(|v| !v.is_empty());
    let file = std::env::var_os(API_KEY_FILE_ENV).filter(|v| !v.is_empty());
    let (key, source) = match (direct, file) {
        (Some(_), Some(_)) => return Err(ConfigError::AmbiguousApiKey),
        (None, None) => return Err(ConfigError::MissingApiKey),
        (Some(key), None) => (SecretString::from(key), API_KEY_ENV),
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            let raw = std::fs::read_to_string(&path)
                .map_err(|source| ConfigError::ApiKeyFile { path, source })?;
            (SecretString::from(raw.trim()), API_KEY_FILE_ENV)
        }
    };
    if !is_valid_api_key(&key) {
        return Err(ConfigError::BadApiKey(source));
    }
    Ok(key)
}

/// A key must be usable in `Authorization: Bearer <key>`: visible ASCII, no spaces.
pub fn is_valid_api_key(key: &SecretString) -> bool {
    let k = key.expose_secret();
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic())
}
