//! The KeyAPI client: one pooled `reqwest::Client`, the API key injected on
//! every call, the body read under a size cap, and every answer classified as
//! cacheable success, the provider's own refusal (passed through), or an error.
//!
//! The request is built from the [`CacheKey`] alone — nothing of the client's
//! request reaches KeyAPI — so one key always means one byte-identical request.

use std::{sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use reqwest::{
    StatusCode,
    header::{ACCEPT, AUTHORIZATION, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{cache::CacheKey, config::UpstreamConfig, metrics::Metrics};

/// `User-Agent` sent upstream.
pub const USER_AGENT: &str = concat!("keyapi-proxy/", env!("CARGO_PKG_VERSION"));

/// An answer KeyAPI gave that we can forward.
#[derive(Debug, Clone)]
pub enum UpstreamAnswer {
    /// HTTP 200, valid JSON, `code == 0`: safe to cache.
    Success(Bytes),
    /// KeyAPI's own, well-formed refusal (a 4xx other than 401/403, or
    /// `code != 0`): forwarded as is, never cached.
    Declined { status: StatusCode, body: Bytes },
}

/// Why a call did not produce a forwardable answer. Cloneable so one failure
/// can be shared with every waiter of a single flight. Never carries the key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream rejected the configured API key (HTTP {0})")]
    KeyRejected(u16),
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    #[error("upstream did not answer within the request timeout")]
    Timeout,
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    #[error("upstream request failed: {0}")]
    Transport(String),
    #[error(
        "upstream answered HTTP {status} with a body that is not a KeyAPI JSON envelope: {detail}"
    )]
    Malformed { status: u16, detail: String },
    #[error("upstream body exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
}

impl UpstreamError {
    /// The HTTP status KeyAPI answered with, when it answered at all.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            Self::KeyRejected(s) | Self::Status(s) | Self::Malformed { status: s, .. } => Some(*s),
            Self::Timeout | Self::Connect(_) | Self::Transport(_) | Self::TooLarge { .. } => None,
        }
    }

    /// Short, bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::KeyRejected(_) => "key_rejected",
            Self::Status(_) => "status",
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect",
            Self::Transport(_) => "transport",
            Self::Malformed { .. } => "malformed",
            Self::TooLarge { .. } => "too_large",
        }
    }
}

/// The part of KeyAPI's envelope we check; parsing into it also validates the
/// whole body as JSON (serde skips the other fields but still parses them).
#[derive(Deserialize)]
struct EnvelopeHead {
    code: i64,
}

/// KeyAPI client shared by all requests.
#[derive(Debug)]
pub struct Upstream {
    client: reqwest::Client,
    base_url: String,
    api_key: SecretString,
    max_body_bytes: usize,
    /// Counts, times and prices every call (credits spent), when set.
    metrics: Option<Arc<Metrics>>,
}

impl Upstream {
    /// Builds the pooled client. `config` must have been validated.
    pub fn new(config: &UpstreamConfig, api_key: SecretString) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // A redirect could carry the key elsewhere; KeyAPI has no reason to send one.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            client,
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            api_key,
            max_body_bytes: config.max_body_bytes,
            metrics: None,
        })
    }

    /// Records every call in `metrics` (calls by outcome, latency, in flight, credits).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The full upstream URL for a key: a pure function of the key.
    pub fn url_for(&self, key: &CacheKey) -> String {
        format!("{}{}", self.base_url, key.path_and_query())
    }

    /// Performs one (paid) call and classifies the answer.
    pub async fn fetch(&self, key: &CacheKey) -> Result<UpstreamAnswer, UpstreamError> {
        let call = self.metrics.as_deref().map(Metrics::upstream_call);
        let result = self.fetch_once(key).await;
        if let Some(call) = call {
            call.finish(&result);
        }
        result
    }

    async fn fetch_once(&self, key: &CacheKey) -> Result<UpstreamAnswer, UpstreamError> {
        let response = self
            .client
            .get(self.url_for(key))
            .header(AUTHORIZATION, self.authorization()?)
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .send()
            .await
            .map_err(classify_transport)?;
        let status = response.status();
        let body = self.read_capped(response).await?;
        self.classify(status, body)
    }

    fn authorization(&self) -> Result<HeaderValue, UpstreamError> {
        let mut value = HeaderValue::try_from(format!("Bearer {}", self.api_key.expose_secret()))
            // Unreachable after start-up validation; say nothing about the value.
            .map_err(|_| UpstreamError::Transport("invalid API key characters".into()))?;
        // Keeps the value out of any `Debug` output of the request.
        value.set_sensitive(true);
        Ok(value)
    }

    async fn read_capped(&self, mut response: reqwest::Response) -> Result<Bytes, UpstreamError> {
        let limit = self.max_body_bytes;
        let too_large = UpstreamError::TooLarge { limit };
        let declared = response.content_length().unwrap_or(0);
        if declared > limit as u64 {
            return Err(too_large);
        }
        let mut body = BytesMut::with_capacity(declared as usize);
        while let Some(chunk) = response.chunk().await.map_err(classify_transport)? {
            if body.len() + chunk.len() > limit {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    fn classify(&self, status: StatusCode, body: Bytes) -> Result<UpstreamAnswer, UpstreamError> {
        let code = status.as_u16();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(UpstreamError::KeyRejected(code));
        }
        if status.is_server_error() || !(status == StatusCode::OK || status.is_client_error()) {
            return Err(UpstreamError::Status(code));
        }
        let head = serde_json::from_slice::<EnvelopeHead>(&body).map_err(|e| {
            if status.is_client_error() {
                // A 4xx without a JSON envelope: keep the status, use our envelope.
                UpstreamError::Status(code)
            } else {
                UpstreamError::Malformed {
                    status: code,
                    detail: e.to_string(),
                }
            }
        })?;
        if self.echoes_key(&body) {
            // Never forward a body that quotes our key back.
            return Err(UpstreamError::Status(code));
        }
        if status == StatusCode::OK && head.code == 0 {
            Ok(UpstreamAnswer::Success(body))
        } else {
            Ok(UpstreamAnswer::Declined { status, body })
        }
    }

    fn echoes_key(&self, body: &[u8]) -> bool {
        let key = self.api_key.expose_secret().as_bytes();
        !key.is_empty() && body.windows(key.len()).any(|w| w == key)
    }
}

fn classify_transport(err: reqwest::Error) -> UpstreamError {
    // `without_url` keeps log detail short; the URL never holds the key anyway.
    let err = err.without_url();
    if err.is_timeout() {
        UpstreamError::Timeout
    } else if err.is_connect() {
        UpstreamError::Connect(err.to_string())
    } else {
        UpstreamError::Transport(err.to_string())
    }
}
