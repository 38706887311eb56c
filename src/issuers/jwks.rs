//! An issuer's public keys, fetched from its JWKS URL: cached, fetched again
//! when a token names a key (`kid`) the cache does not hold, or when the
//! cache is an hour old — at most once a minute on the app's clock, so a
//! flood of tokens with made-up `kid`s costs one fetch a minute, not one per
//! request. A failed fetch keeps the keys already held. The fetch is bounded:
//! its own client with short timeouts, no redirects, a capped body and a
//! capped number of keys.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse},
};
use tokio::sync::{Mutex, MutexGuard};

use super::TokenError;
use crate::clock::{self, SharedClock};

/// Shortest time between two fetches of one issuer's keys.
pub(super) const MIN_REFETCH: Duration = Duration::from_secs(60);
/// Age after which held keys are fetched again (a removed key stops being
/// trusted within about this long).
const MAX_AGE: Duration = Duration::from_secs(3600);
/// Time one fetch may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to connect to the JWKS host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest JWKS body read; a real one holds a few keys in a few KiB.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most keys kept from one JWKS.
const MAX_KEYS: usize = 32;

/// Why a fetch brought no keys (logged, never shown to a client).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request failed: {0}")]
    Request(#[from] reqwest::Error),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no usable RS256, ES256 or EdDSA key")]
    NoKeys,
}

/// One usable public key.
struct Key {
    kid: Option<String>,
    /// The one algorithm its tokens may use.
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys held, and when they were fetched.
#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
    fetched_at: Option<SystemTime>,
}

/// The keys of one issuer, as served at its JWKS URL.
pub(super) struct Jwks {
    url: String,
    client: reqwest::Client,
    clock: SharedClock,
    keys: RwLock<Arc<KeySet>>,
    /// When a fetch was last started; held while fetching, so that tokens
    /// arriving meanwhile wait for its keys instead of fetching again.
    last_fetch: Mutex<Option<SystemTime>>,
}

impl Jwks {
    /// Keys to be fetched from `url` (nothing is fetched before a token needs them).
    pub(super) fn new(url: String, clock: SharedClock) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            url,
            client,
            clock,
            keys: RwLock::default(),
            last_fetch: Mutex::new(None),
        })
    }

    /// The key for a token whose header names `kid` and `alg`, fetching the
    /// keys again if they lack it (or are old) and a fetch is allowed.
    pub(super) async fn key(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<(DecodingKey, Algorithm), TokenError> {
        let held = self.held();
        let held = match find(&held, kid) {
            Some(_) if !is_old(&held, self.clock.now()) => held,
            // An hourly refresh: whoever comes first fetches; meanwhile the
            // held key serves, so nobody waits on a slow JWKS host for it.
            Some(_) => match self.last_fetch.try_lock() {
                Ok(last) => self.refresh(last, &held).await,
                Err(_) => held,
            },
            // A key we lack: wait for a fetch in progress, it may bring it.
            None => self.refresh(self.last_fetch.lock().await, &held).await,
        };
        match find(&held, kid) {
            Some(found) => matching(found, alg),
            None if held.keys.is_empty() => Err(TokenError::KeysUnavailable {
                retry_after_secs: self.next_fetch_in().await,
            }),
            None => Err(TokenError::UnknownKey),
        }
    }

    fn held(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Fetches the keys (holding `last`, the time of the last fetch) unless
    /// `seen` was replaced meanwhile or the last fetch is under a minute old;
    /// returns the keys held afterwards.
    async fn refresh(
        &self,
        mut last: MutexGuard<'_, Option<SystemTime>>,
        seen: &Arc<KeySet>,
    ) -> Arc<KeySet> {
        let current = self.held();
        if !Arc::ptr_eq(&current, seen) {
            return current;
        }
        let now = self.clock.now();
        if last.is_some_and(|at| since(at, now) < MIN_REFETCH) {
            return current;
        }
        *last = Some(now);
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "issuer keys fetched");
                let fetched = Arc::new(KeySet {
                    keys,
                    fetched_at: Some(now),
                });
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&fetched);
                fetched
            }
            Err(error) => {
                tracing::warn!(url = %self.url, %error, "issuer keys not fetched; keeping those held");
                current
            }
        }
    }

    /// Whole seconds (at least 1) until a fetch is allowed again.
    async fn next_fetch_in(&self) -> u64 {
        let last = *self.last_fetch.lock().await;
        let waited = last.map_or(MIN_REFETCH, |at| since(at, self.clock.now()));
        clock::ceil_secs(MIN_REFETCH.saturating_sub(waited))
    }

    async fn fetch(&self) -> Result<Vec<Key>, FetchError> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse(&body)
    }
}

/// The usable keys of a JWKS document; keys of other kinds are skipped.
fn parse(body: &[u8]) -> Result<Vec<Key>, FetchError> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(body)?;
    let keys: Vec<Key> = document
        .keys
        .into_iter()
        .filter_map(|value| usable(&serde_json::from_value(value).ok()?))
        .take(MAX_KEYS)
        .collect();
    if keys.is_empty() {
        return Err(FetchError::NoKeys);
    }
    Ok(keys)
}

/// A signing key of RS256, ES256 (P-256) or EdDSA (Ed25519); its `alg`, when
/// stated, must agree with its kind.
fn usable(jwk: &Jwk) -> Option<Key> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    if let Some(stated) = jwk.common.key_algorithm
        && stated != KeyAlgorithm::from(alg)
    {
        return None;
    }
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// The key named `kid`; a token without `kid` may use the only key there is.
fn find<'a>(set: &'a KeySet, kid: Option<&str>) -> Option<&'a Key> {
    match kid {
        Some(kid) => set.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
        None => match set.keys.as_slice() {
            [only] => Some(only),
            _ => None,
        },
    }
}

/// Time from `at` to `now` (zero if the clock went back).
fn since(at: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(at).unwrap_or_default()
}

fn is_old(set: &KeySet, now: SystemTime) -> bool {
    set.fetched_at.is_none_or(|at| since(at, now) >= MAX_AGE)
}

/// The key, if the token's `alg` is the one it is for (never another).
fn matching(key: &Key, alg: Algorithm) -> Result<(DecodingKey, Algorithm), TokenError> {
    if key.alg == alg {
        Ok((key.key.clone(), key.alg))
    } else {
        Err(TokenError::Algorithm)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_signing_keys_of_the_three_kinds_are_kept() {
        let body = br#"{"keys":[
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"enc","use":"enc"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"mislabelled","alg":"RS256"},
            {"kty":"oct","k":"c2VjcmV0","kid":"hmac"},
            {"kty":"weird"}
        ]}"#;
        let keys = parse(body).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("ed"));
        assert_eq!(keys[0].alg, Algorithm::EdDSA);
        assert!(matches!(parse(br#"{"keys":[]}"#), Err(FetchError::NoKeys)));
        assert!(matches!(parse(b"[]"), Err(FetchError::Json(_))));
    }
}
