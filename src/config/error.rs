//! Why configuration could not be loaded, and the environment variables
//! that carry the KeyAPI key. Messages never contain the API key.

use std::path::PathBuf;

/// Environment variable holding the KeyAPI key itself.
pub const API_KEY_ENV: &str = "KEYAPI_API_KEY";
/// Environment variable naming a file that holds the KeyAPI key (Docker secret).
pub const API_KEY_FILE_ENV: &str = "KEYAPI_API_KEY_FILE";

/// Why configuration could not be loaded. Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("no KeyAPI key: set {API_KEY_ENV} or {API_KEY_FILE_ENV} (or run with --demo)")]
    MissingApiKey,
    #[error("both {API_KEY_ENV} and {API_KEY_FILE_ENV} are set; set only one")]
    AmbiguousApiKey,
    #[error("cannot read the KeyAPI key from {API_KEY_FILE_ENV}={path}: {source}")]
    ApiKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the KeyAPI key (from {0}) is empty or contains characters not allowed in an HTTP header"
    )]
    BadApiKey(&'static str),
}
