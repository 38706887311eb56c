//! Signed visitor tokens: the `[[issuers]]` section. A site's backend or
//! identity provider mints a short-lived JWT for each of its visitors; the
//! visitor sends it as `Authorization: Bearer <jwt>`, and its subject (`sub`)
//! becomes a payer of its own, with the limits of its issuer's entry: a
//! request rate and a daily credit budget, drawn on together with the global
//! budget (see [`crate::ledger`]).
//!
//! A token is checked before anything else of the request: its `iss` picks
//! the issuer; its `alg` must be the one of the issuer's key (HS256 for a
//! shared secret; RS256, ES256 or EdDSA for a key of its JWKS, see
//! `jwks`), so `none` or a swapped algorithm never verifies; the signature
//! must verify; `aud` must name this proxy, `exp` must be present and not
//! past (on the app's clock, with `LEEWAY_SECS`), `nbf` not ahead. Anything
//! else is a 401 that costs nothing. Tokens and secrets are never logged;
//! a subject appears in logs and Redis only as a hash of its `sub`.
//!
//! Per-subject state (its rate limit, budget and account) is kept in a
//! bounded set of [`KeyedPayers`] per issuer (`max_subjects`), as visitors'
//! is: the least recently seen are forgotten first, and with Redis nothing is
//! lost by forgetting.

mod jwks;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::http::{HeaderMap, header::AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretSlice, zeroize::Zeroize};

use crate::{
    clock::{self, SharedClock},
    config::IssuerConfig,
    digest,
    metrics::{Metrics, Scope},
    payers::{KeyedPayer, KeyedPayers, Limits, Spender},
    redis_conn::RedisConn,
    spend::SpendHistory,
};

use jwks::Jwks;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;
/// Longest signed token accepted, in bytes: enough for RS256 with a few
/// claims; a client cannot make us decode and hash more per request.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest `sub` accepted, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Shortest HS256 secret accepted (RFC 7518: at least the hash's 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;
/// Bytes of SHA-256(`sub`) that name a subject (32 hex digits).
const SUBJECT_HASH_BYTES: usize = 16;

/// Why the configured issuers could not be set up. Never quotes a secret.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("issuers: cannot read hs256_secret_file of {name:?} ({}): {source}", path.display())]
    SecretFile {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("issuers: the HS256 secret of {name:?} is shorter than {MIN_SECRET_BYTES} bytes")]
    ShortSecret { name: String },
    #[error("issuers: cannot build the JWKS client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Why a signed token is refused. All are 401s but [`TokenError::KeysUnavailable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "The signed token is malformed or lacks a required claim (iss, aud, exp, sub); send the token your site issued as Authorization: Bearer <token>."
    )]
    Malformed,
    #[error("The signed token's issuer (iss) is not one this proxy trusts.")]
    UnknownIssuer,
    #[error("The signed token's key (kid) is not among its issuer's keys.")]
    UnknownKey,
    #[error("The signed token's algorithm (alg) is not the one of its issuer's key.")]
    Algorithm,
    #[error("The signed token's signature does not verify.")]
    Signature,
    #[error("The signed token has expired (exp); get a new one from your site.")]
    Expired,
    #[error("The signed token is not valid yet (nbf).")]
    NotYetValid,
    #[error("The signed token is not meant for this proxy (aud).")]
    Audience,
    #[error("The signed token's subject (sub) is empty or longer than {MAX_SUBJECT_BYTES} bytes.")]
    Subject,
    #[error(
        "The signing keys of this token's issuer cannot be fetched right now; try again in {retry_after_secs} s."
    )]
    KeysUnavailable { retry_after_secs: u64 },
}

impl TokenError {
    /// Bounded label for logs and the `tokens_rejected_total{reason}` metric.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_key",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Audience => "audience",
            Self::Subject => "subject",
            Self::KeysUnavailable { .. } => "keys_unavailable",
        }
    }

    /// What `jsonwebtoken` found wrong, in our terms.
    fn from_jwt(error: &jsonwebtoken::errors::Error) -> Self {
        match error.kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_) => Self::Signature,
            ErrorKind::InvalidAudience => Self::Audience,
            ErrorKind::InvalidIssuer => Self::UnknownIssuer,
            ErrorKind::InvalidAlgorithm => Self::Algorithm,
            ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => Self::Subject,
            _ => Self::Malformed,
        }
    }
}

/// One subject of one issuer: a payer with its own limits.
pub type Subject = KeyedPayer;

/// How an issuer's signatures are checked.
enum Keys {
    /// HS256 with a shared secret.
    Secret(SecretSlice<u8>),
    /// The public keys at a JWKS URL.
    Jwks(Jwks),
}

/// One configured issuer and the subjects it has vouched for lately.
pub struct Issuer {
    name: Arc<str>,
    /// The `iss` its tokens carry.
    issuer: String,
    keys: Keys,
    /// One per algorithm its keys may use (each allows only that one).
    validations: Vec<Validation>,
    /// Recently seen subjects by hash, at most `max_subjects`.
    subjects: KeyedPayers<[u8; SUBJECT_HASH_BYTES]>,
    clock: SharedClock,
}

impl Issuer {
    fn new(
        config: &IssuerConfig,
        metrics: &Metrics,
        clock: &SharedClock,
        redis: Option<&Arc<RedisConn>>,
        spend: &SpendHistory,
    ) -> Result<Self, IssuerError> {
        let (keys, algorithms) = match (&config.hs256_secret_file, &config.jwks_url) {
            (Some(path), _) => (
                Keys::Secret(read_secret(&config.name, path)?),
                vec![Algorithm::HS256],
            ),
            (None, url) => {
                // Validated configuration names exactly one of the two.
                let url = url.clone().unwrap_or_default();
                let algorithms = vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];
                (Keys::Jwks(Jwks::new(url, clock.clone())?), algorithms)
            }
        };
        let validations = algorithms
            .into_iter()
            .map(|alg| {
                let mut validation = Validation::new(alg);
                validation.set_issuer(&[&config.issuer]);
                validation.set_audience(&[&config.audience]);
                validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                // Times are checked on the app's clock (see `Issuer::check_times`).
                validation.validate_exp = false;
                validation.validate_nbf = false;
                validation
            })
            .collect();
        Ok(Self {
            name: Arc::from(config.name.as_str()),
            issuer: config.issuer.clone(),
            keys,
            validations,
            subjects: KeyedPayers::new(
                Limits {
                    rate_per_minute: config.rate_per_minute.unwrap_or(0),
                    burst: config.burst.unwrap_or(0),
                    daily_budget: config.daily_budget.unwrap_or(0),
                },
                config.max_subjects,
                Scope::Subject,
                metrics.issuer(&config.name),
                spend.tally(&format!("issuer:{}", config.name)),
                clock,
                redis,
            ),
            clock: clock.clone(),
        })
    }

    /// Its configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Subjects this replica holds state for (at most `max_subjects`).
    pub fn tracked_subjects(&self) -> usize {
        self.subjects.len()
    }

    /// Today's top spenders among its subjects held by this replica.
    pub fn top_spenders(&self, n: usize) -> Vec<Spender> {
        self.subjects.top_spenders(n)
    }

    /// The state held for subject `sub`, if it is still held (not counted as a sighting).
    pub fn subject(&self, sub: &str) -> Option<Arc<Subject>> {
        self.subjects.peek(&subject_hash(sub))
    }

    /// The subject of `token` (whose header is `header`), if the token verifies.
    async fn verify(
        &self,
        token: &[u8],
        header: &jsonwebtoken::Header,
    ) -> Result<Arc<Subject>, TokenError> {
        let (key, alg) = match &self.keys {
            Keys::Secret(secret) => {
                let key = DecodingKey::from_secret(secret.expose_secret())
                    .map_err(|_| TokenError::Signature)?;
                (key, Algorithm::HS256)
            }
            Keys::Jwks(jwks) => jwks.key(header.kid.as_deref(), header.alg).await?,
        };
        if header.alg != alg {
            return Err(TokenError::Algorithm);
        }
        let validation = self
            .validations
            .iter()
            .find(|v| v.algorithms == [alg])
            .ok_or(TokenError::Algorithm)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, validation)
            .map_err(|e| TokenError::from_jwt(&e))?
            .claims;
        self.check_times(&claims)?;
        let sub = claims.sub.as_deref().unwrap_or_default();
        if sub.is_empty() || sub.len() > MAX_SUBJECT_BYTES {
            return Err(TokenError::Subject);
        }
        let hash = subject_hash(sub);
        Ok(self.subjects.get(&hash, || {
            let name = format!("subject:{}:{}", self.name, digest::hex(&hash));
            (name.clone(), name)
        }))
    }

    /// `exp` not past and `nbf` (if any) not ahead, on the app's clock.
    fn check_times(&self, claims: &Claims) -> Result<(), TokenError> {
        // Seconds since the epoch fit an f64 exactly for the next 285 million years.
        let now = clock::unix_secs(self.clock.now()) as f64;
        let leeway = LEEWAY_SECS as f64;
        if claims.exp + leeway < now {
            return Err(TokenError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf - leeway > now) {
            return Err(TokenError::NotYetValid);
        }
        Ok(())
    }
}

/// The claims we read once the signature has verified (`iss` and `aud` are
/// checked by `jsonwebtoken`).
#[derive(serde::Deserialize)]
struct Claims {
    /// Absent is refused like empty (as a subject problem, not a malformed token).
    #[serde(default)]
    sub: Option<String>,
    /// NumericDate: seconds since the epoch, possibly fractional.
    exp: f64,
    #[serde(default)]
    nbf: Option<f64>,
}

/// The configured issuers.
pub struct Issuers {
    issuers: Vec<Issuer>,
    metrics: Arc<Metrics>,
}

impl Issuers {
    /// Issuers from (validated) configuration; HS256 secrets are read now.
    pub fn new(
        config: &[IssuerConfig],
        metrics: &Arc<Metrics>,
        clock: &SharedClock,
        redis: Option<&Arc<RedisConn>>,
        spend: &SpendHistory,
    ) -> Result<Self, IssuerError> {
        let issuers = config
            .iter()
            .map(|c| Issuer::new(c, metrics, clock, redis, spend))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            issuers,
            metrics: Arc::clone(metrics),
        })
    }

    /// Every configured issuer, in configuration order.
    pub fn issuers(&self) -> &[Issuer] {
        &self.issuers
    }

    /// The token of `Authorization: Bearer <token>` when it looks like a JWT
    /// and an issuer is configured; otherwise the bearer token, if any, is
    /// left to the client-token check.
    pub fn presented<'a>(&self, headers: &'a HeaderMap) -> Option<&'a [u8]> {
        if self.issuers.is_empty() {
            return None;
        }
        let value = headers.get(AUTHORIZATION)?.as_bytes();
        let (scheme, rest) = value.split_at_checked(7)?;
        let token = rest.trim_ascii();
        (scheme.eq_ignore_ascii_case(b"bearer ") && looks_like_jwt(token)).then_some(token)
    }

    /// The subject `token` vouches for, or why it is refused (counted by reason).
    pub async fn verify(&self, token: &[u8]) -> Result<Arc<Subject>, TokenError> {
        let verified = self.verify_uncounted(token).await;
        if let Err(error) = &verified {
            self.metrics.token_rejected(error.as_str());
            tracing::debug!(reason = error.as_str(), "signed token refused");
        }
        verified
    }

    async fn verify_uncounted(&self, token: &[u8]) -> Result<Arc<Subject>, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        // `alg: none` (or any algorithm we do not know) fails here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.crit.is_some() {
            // RFC 7515 4.1.11: extensions we do not understand must be refused.
            return Err(TokenError::Malformed);
        }
        // The unverified `iss` only chooses whose key checks the signature;
        // the verified claims must then name the same issuer.
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<Unverified>(token)
            .map_err(|_| TokenError::Malformed)?
            .iss;
        let issuer = self
            .issuers
            .iter()
            .find(|i| iss.as_deref() == Some(i.issuer.as_str()))
            .ok_or(TokenError::UnknownIssuer)?;
        issuer.verify(token, &header).await
    }
}

/// The one claim read before verification.
#[derive(serde::Deserialize)]
struct Unverified {
    #[serde(default)]
    iss: Option<String>,
}

/// A compact JWS: three base64url parts, the first a JSON object (`eyJ` is
/// `{"` encoded). Client tokens never look like this.
fn looks_like_jwt(token: &[u8]) -> bool {
    token.starts_with(b"eyJ")
        && token.iter().filter(|b| **b == b'.').count() == 2
        && token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The first bytes of SHA-256(`sub`): a subject's fixed-size name.
fn subject_hash(sub: &str) -> [u8; SUBJECT_HASH_BYTES] {
    let mut hash = [0u8; SUBJECT_HASH_BYTES];
    hash.copy_from_slice(&digest::sha256(sub.as_bytes())[..SUBJECT_HASH_BYTES]);
    hash
}

/// The secret of `path`, without a final newline (or other trailing whitespace).
fn read_secret(name: &str, path: &Path) -> Result<SecretSlice<u8>, IssuerError> {
    let mut raw = std::fs::read(path).map_err(|source| IssuerError::SecretFile {
        name: name.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    // An exact-size copy (no reallocation leaves a copy behind); the read buffer is wiped.
    let secret = SecretSlice::from(raw.trim_ascii_end().to_vec());
    raw.zeroize();
    if secret.expose_secret().len() < MIN_SECRET_BYTES {
        return Err(IssuerError::ShortSecret {
            name: name.to_owned(),
        });
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jwt_shaped_bearer_tokens_are_taken_for_jwts() {
        assert!(looks_like_jwt(b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"));
        for not in [
            &b"kp_0123456789abcdef"[..],
            b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0",
            b"eyJ.a.b.c",
            b"eyJhbGci OiJ.a.b",
            b"abc.def.ghi",
        ] {
            assert!(!looks_like_jwt(not), "{}", String::from_utf8_lossy(not));
        }
    }
}
