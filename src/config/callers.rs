//! Who may call: `[[clients]]` (a token's hash and its limits) and
//! `[[issuers]]` (whose signed visitor tokens are believed).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One `[[clients]]` entry: a caller allowed to use the proxy. The token itself
/// is never configured, only its SHA-256 (`keyapi-proxy hash-token` makes both).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Shown in logs, metrics (`client` label) and `/stats`: 1-64 of `[A-Za-z0-9._-]`.
    pub id: String,
    /// Lower-case hex SHA-256 of the client's token (64 digits).
    pub token_sha256: String,
    /// May force a refetch with `Cache-Control: no-cache`, or `max-age` /
    /// `min-fresh` refusing a fresh copy (spends credits).
    #[serde(default)]
    pub refresh: bool,
    /// May use every `/admin` endpoint (cache, reload, spend); `purge` is
    /// accepted as its older name.
    #[serde(default, alias = "purge")]
    pub admin: bool,
    /// This client's requests per minute (absent or 0 = no client limit).
    pub rate_per_minute: Option<u32>,
    /// This client's burst (absent or 0 = `rate_per_minute`).
    pub burst: Option<u32>,
    /// Credits this client's misses may spend per UTC day (absent or 0 = no budget).
    pub daily_budget: Option<u64>,
}

/// One `[[issuers]]` entry: a site backend or identity provider whose signed
/// tokens (`Authorization: Bearer <jwt>`) let its visitors in, each subject
/// (`sub`) with its own limits. Exactly one of `jwks_url` and
/// `hs256_secret_file` names the key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Shown in logs, metrics (`issuer` label) and ledger names: 1-64 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// The `iss` claim its tokens carry, exactly.
    pub issuer: String,
    /// A value its tokens' `aud` claim must hold (this proxy's name at the issuer).
    pub audience: String,
    /// Where its public keys are (a JWKS: RS256, ES256, EdDSA); `https://`, or
    /// `http://` to a loopback host.
    pub jwks_url: Option<String>,
    /// A file holding its HS256 secret (at least 32 bytes; a final newline is
    /// ignored), read once at start-up.
    pub hs256_secret_file: Option<PathBuf>,
    /// Each subject's requests per minute (absent or 0 = no limit).
    pub rate_per_minute: Option<u32>,
    /// Each subject's burst (absent or 0 = `rate_per_minute`).
    pub burst: Option<u32>,
    /// Credits each subject's misses may spend per UTC day (absent or 0 = no budget).
    pub daily_budget: Option<u64>,
    /// Subjects whose limits this replica keeps in memory; when full, those
    /// not seen again lately are forgotten first.
    #[serde(default = "default_max_subjects")]
    pub max_subjects: usize,
}

/// Largest `max_subjects`: its memory is sized at start-up.
pub(super) const MAX_SUBJECTS: usize = 10_000_000;

/// `max_subjects` when absent: a few tens of megabytes at most.
pub(super) fn default_max_subjects() -> usize {
    100_000
}
