//! The KeyAPI client: one pooled `reqwest::Client`, the API key injected on
//! every call, the body read under a size cap, and every answer classified as
//! cacheable success, the provider's own refusal (passed through), or an error.
//!
//! The request is built from the canonical path-and-query alone (a cache
//! key) — nothing of the client's request reaches KeyAPI — so one key always
//! means one byte-identical request. One [`Upstream::attempt`] is one paid
//! call, with the API key it is given ([`LiveKey::current`], taken once per
//! attempt, so a rotation never changes a call already sent); the caller (the fetch, which charges the ledger per attempt) loops
//! over attempts with [`Upstream::backoff`]. Only with
//! `telemetry.propagate_upstream` does an attempt also carry a W3C
//! `traceparent` (the attempt's own span), so KeyAPI can join the trace.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::HeaderInjector;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use reqwest::{
    StatusCode,
    header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER},
};
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    api_key::{ApiKey, LiveKey},
    config::UpstreamConfig,
    envelope::{KeyEcho, envelope_code},
};

/// `User-Agent` sent upstream.
pub const USER_AGENT: &str = concat!("keyapi-proxy/", env!("CARGO_PKG_VERSION"));

/// An answer KeyAPI gave that we can forward.
#[derive(Debug, Clone)]
pub enum UpstreamAnswer {
    /// HTTP 200, valid JSON, `code == 0`: safe to cache.
    Success(Bytes),
    /// KeyAPI's own, well-formed refusal (a 4xx other than 401/403/429, or
    /// `code != 0`): forwarded as is; cached only as a negative answer.
    Declined {
        status: StatusCode,
        /// The envelope's `code`.
        code: i64,
        body: Bytes,
    },
}

impl UpstreamAnswer {
    /// Bounded label for logs and metrics: `success` or `declined`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Success(_) => "success",
            Self::Declined { .. } => "declined",
        }
    }
}

/// Why a call did not produce a forwardable answer: what KeyAPI (or the way
/// to it) did. Our own decision not to call is [`crate::protect::Refusal`].
/// Cloneable so one failure can be shared with every waiter of a single
/// flight. Never carries the key.
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
    #[error("upstream answered 429; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
}

impl UpstreamError {
    /// The HTTP status KeyAPI answered with, when it answered at all.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            Self::KeyRejected(s) | Self::Status(s) | Self::Malformed { status: s, .. } => Some(*s),
            Self::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, when KeyAPI said.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// True when the upstream itself misbehaved (counts towards the circuit
    /// breaker); false for its deliberate answers.
    pub fn is_upstream_failure(&self) -> bool {
        match self {
            Self::Status(code) => *code >= 500,
            Self::Timeout
            | Self::Connect(_)
            | Self::Transport(_)
            | Self::Malformed { .. }
            | Self::TooLarge { .. } => true,
            _ => false,
        }
    }

    /// Whether the attempt may have reached KeyAPI (and so may be billed):
    /// everything but a connect error, which never sent the request.
    pub fn reached_upstream(&self) -> bool {
        !matches!(self, Self::Connect(_))
    }

    /// Safe to try again without risking a second charge: the request never
    /// reached KeyAPI (connect error) or KeyAPI said it did not process it
    /// (502/503/504). A timeout after sending is *not* retried: the first
    /// call may have been charged.
    fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Status(502..=504))
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
            Self::RateLimited { .. } => "rate_limited",
        }
    }
}

/// KeyAPI client shared by all requests.
#[derive(Debug)]
pub struct Upstream {
    client: reqwest::Client,
    base_url: String,
    /// The key in use, replaced on rotation (shared by every `Upstream`
    /// a reload builds).
    api_key: Arc<LiveKey>,
    /// Finds the key in an answer (shared with the check of stored entries).
    key_echo: Arc<KeyEcho>,
    max_body_bytes: usize,
    request_timeout: Duration,
    retries: u32,
    retry_backoff: Duration,
    /// `telemetry.propagate_upstream`: send the attempt's `traceparent`.
    propagate_trace: bool,
}

impl Upstream {
    /// Builds the pooled client. `config` must have been validated.
    pub fn new(config: &UpstreamConfig, api_key: Arc<LiveKey>) -> Result<Self, reqwest::Error> {
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
            key_echo: api_key.echo(),
            api_key,
            max_body_bytes: config.max_body_bytes,
            request_timeout: config.request_timeout,
            retries: config.retries,
            retry_backoff: config.retry_backoff,
            propagate_trace: false,
        })
    }

    /// Sends each attempt's `traceparent` to KeyAPI (`telemetry.propagate_upstream`).
    pub fn propagating_traces(mut self, on: bool) -> Self {
        self.propagate_trace = on;
        self
    }

    /// The full upstream URL for a canonical path-and-query: a pure function of it.
    pub fn url_for(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base_url, path_and_query)
    }

    /// The search for our key in a body, for checking what comes back from
    /// a cache tier as this client checks what comes from KeyAPI.
    pub fn key_echo(&self) -> Arc<KeyEcho> {
        Arc::clone(&self.key_echo)
    }

    /// The key in use and where the next one comes from.
    pub fn api_key(&self) -> &Arc<LiveKey> {
        &self.api_key
    }

    /// Time allowed for one fetch, all its attempts together.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The pause before attempt number `attempt + 1` after `error`, or
    /// `None` when it must not be retried: it could be charged twice (only
    /// connect errors and 502/503/504 are retried), the retries are used up,
    /// or the pause would not fit before `deadline`. Full jitter.
    pub fn backoff(
        &self,
        attempt: u32,
        error: &UpstreamError,
        deadline: Instant,
    ) -> Option<Duration> {
        if attempt >= self.retries || !error.is_retryable() {
            return None;
        }
        let ceiling = self.retry_backoff.saturating_mul(1 << attempt.min(16));
        let backoff = ceiling.mul_f64(fastrand::f64());
        (Instant::now() + backoff < deadline).then_some(backoff)
    }

    /// One (paid) call for `path_and_query` with `key`, given `timeout` at most.
    pub async fn attempt(
        &self,
        path_and_query: &str,
        key: &ApiKey,
        timeout: Duration,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        let mut request = self
            .client
            .get(self.url_for(path_and_query))
            .header(AUTHORIZATION, authorization(key)?)
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .timeout(timeout);
        if self.propagate_trace {
            request = request.headers(current_traceparent());
        }
        let response = request.send().await.map_err(classify_transport)?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(UpstreamError::RateLimited {
                retry_after_secs: retry_after_secs(response.headers()),
            });
        }
        let body = self.read_capped(response).await?;
        self.classify(status, body)
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
        let code_in_body = envelope_code(&body).map_err(|e| {
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
        if self.key_echo.is_in(&body) {
            // Never forward (nor cache) a body that quotes our key back.
            return Err(UpstreamError::Status(code));
        }
        if status == StatusCode::OK && code_in_body == 0 {
            Ok(UpstreamAnswer::Success(body))
        } else {
            Ok(UpstreamAnswer::Declined {
                status,
                code: code_in_body,
                body,
            })
        }
    }
}

/// `Bearer <key>`, marked sensitive.
fn authorization(key: &ApiKey) -> Result<HeaderValue, UpstreamError> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", key.expose()))
        // Unreachable: every key is checked before use; say nothing about the value.
        .map_err(|_| UpstreamError::Transport("invalid API key characters".into()))?;
    // Keeps the value out of any `Debug` output of the request.
    value.set_sensitive(true);
    Ok(value)
}

fn classify_transport(err: reqwest::Error) -> UpstreamError {
    // `without_url` keeps log detail short; the URL never holds the key anyway.
    let err = err.without_url();
    // Connect first: a connect timeout never sent the request, so it is retryable.
    if err.is_connect() {
        UpstreamError::Connect(err.to_string())
    } else if err.is_timeout() {
        UpstreamError::Timeout
    } else {
        UpstreamError::Transport(err.to_string())
    }
}

/// Longest `Retry-After` passed on to clients: KeyAPI's value is not ours to
/// trust, and a client told to wait years would never come back.
pub const MAX_RETRY_AFTER_SECS: u64 = 3600;

/// `Retry-After` as seconds (delta-seconds or HTTP-date), capped at
/// [`MAX_RETRY_AFTER_SECS`]; 1 s when absent or unreadable.
/// The current span's W3C trace context (`traceparent`; empty when not traced).
fn current_traceparent() -> HeaderMap {
    let mut headers = HeaderMap::new();
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(&mut headers));
    headers
}

fn retry_after_secs(headers: &HeaderMap) -> u64 {
    let Some(value) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) else {
        return 1;
    };
    let value = value.trim();
    let secs = value.parse::<u64>().ok().unwrap_or_else(|| {
        httpdate::parse_http_date(value)
            .ok()
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map_or(1, |d| d.as_secs().max(1))
    });
    secs.min(MAX_RETRY_AFTER_SECS)
}
