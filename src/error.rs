//! Every error a client can see, mapped to a response in one place: the
//! upstream's own envelope `{"code","message","data":null,"requestId"}` with
//! the right HTTP status. Client mistakes are 400, upstream trouble 502/504,
//! our own faults 500; our own refusals to call KeyAPI (protection, budgets)
//! 429/503 with `Retry-After`. Internal detail goes to the log, never to the
//! body. [`ApiError`] wraps each layer's error and is an `IntoResponse`, so
//! handlers return it with `?`.

use axum::{
    body::Body,
    http::{
        HeaderMap, HeaderValue, StatusCode,
        header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE},
    },
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::{
    access::AuthError, browser, cache_status, issuers::TokenError, ledger, limits::RateLimited,
    protect, proxy::ProxyError, request_id::RequestId, route::KeyError, spend::SpendError,
    upstream::UpstreamError,
};

/// An error answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    BadRequest(#[from] KeyError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Limited(#[from] RateLimited),
    #[error("origin not in cors.allowed_origins")]
    OriginRefused,
    /// A foreign `Host` or a cross-site browser request (see [`browser`]).
    #[error(transparent)]
    Browser(#[from] browser::Refusal),
    /// `Cache-Control: only-if-cached` and no kept copy meets the request.
    #[error("only-if-cached: no kept copy")]
    NotCached,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An HTTP/1 request with method `PRI`: the HTTP/2 preface's first line,
    /// which no HTTP/1 request may use (RFC 9113, section 3.4).
    #[error("method PRI over HTTP/1")]
    PrefaceOverHttp1,
    /// A handler panicked (the detail is logged, never sent).
    #[error("request handler panicked")]
    Panicked,
    /// `POST /admin/reload` found the configuration invalid: nothing changed.
    #[error("configuration reload rejected: {0}")]
    ReloadRejected(String),
    /// The spend history cannot be read just now.
    #[error(transparent)]
    Spend(#[from] SpendError),
    /// `POST /admin/reload` while the service is stopping.
    #[error("no reload while stopping")]
    Stopping,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    code: u16,
    message: &'a str,
    data: (),
    request_id: &'a str,
}

/// The message of a 429 that KeyAPI's rate limit caused, directly or through our hold.
const RATE_LIMITED: &str =
    "KeyAPI's rate limit is reached; retry after the seconds in Retry-After.";

/// `application/json`, shared by every JSON answer.
pub(crate) const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

impl ApiError {
    /// The HTTP status this error is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::PrefaceOverHttp1 => StatusCode::BAD_REQUEST,
            Self::Auth(AuthError::Unauthorized) => StatusCode::UNAUTHORIZED,
            // Not the token's fault: its issuer's keys cannot be had just now.
            Self::Token(TokenError::KeysUnavailable { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Token(_) => StatusCode::UNAUTHORIZED,
            Self::Auth(AuthError::Forbidden)
            | Self::OriginRefused
            | Self::Browser(browser::Refusal::CrossSite) => StatusCode::FORBIDDEN,
            Self::Browser(browser::Refusal::MisdirectedHost) => StatusCode::MISDIRECTED_REQUEST,
            Self::Limited(_)
            | Self::Proxy(ProxyError::Budget(
                ledger::Refusal::Spent { .. } | ledger::Refusal::Reserved { .. },
            )) => StatusCode::TOO_MANY_REQUESTS,
            Self::Proxy(ProxyError::Budget(ledger::Refusal::LedgerUnavailable)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::ReloadRejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Stopping | Self::Spend(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Proxy(ProxyError::Abandoned(_)) | Self::Panicked => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            // RFC 9111 §5.2.1.7: 504 when only-if-cached finds nothing.
            Self::NotCached | Self::Proxy(ProxyError::Upstream(UpstreamError::Timeout)) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::Proxy(ProxyError::Upstream(UpstreamError::RateLimited { .. }))
            | Self::Proxy(ProxyError::Protection(protect::Refusal::HeldBack { .. })) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Proxy(ProxyError::Protection(
                protect::Refusal::CircuitOpen { .. }
                | protect::Refusal::Overloaded { .. }
                | protect::Refusal::SpendCap { .. },
            )) => StatusCode::SERVICE_UNAVAILABLE,
            // KeyAPI's 4xx statuses (other than 401/403) keep their meaning.
            Self::Proxy(ProxyError::Upstream(UpstreamError::Status(code)))
                if (400..500).contains(code) =>
            {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            Self::Proxy(ProxyError::Upstream(_)) => StatusCode::BAD_GATEWAY,
        }
    }

    /// What the client is told: the input problem for 400s, a fixed sentence
    /// for everything else (upstream detail stays in the log).
    fn public_message(&self) -> String {
        let fixed = match self {
            Self::BadRequest(e) => return e.to_string(),
            Self::Auth(e) => return e.to_string(),
            Self::Token(e) => return e.to_string(),
            Self::Limited(e) => return e.to_string(),
            Self::Browser(e) => return e.to_string(),
            Self::Proxy(ProxyError::Budget(e)) => return e.to_string(),
            Self::OriginRefused => {
                "Requests from this origin are not allowed: it is not in the proxy's cors.allowed_origins."
            }
            Self::NotCached => {
                "The request said Cache-Control: only-if-cached and the proxy keeps no copy of this answer that meets it; KeyAPI was not asked and no credits were spent."
            }
            Self::NotFound => {
                "There is nothing at this path; /openapi.json lists the proxied routes and the other endpoints."
            }
            Self::MethodNotAllowed => {
                "This path does not take this method; the Allow header lists the methods it does take."
            }
            Self::PrefaceOverHttp1 => {
                "PRI is the HTTP/2 connection preface, not a request method; this port speaks HTTP/1.1 (and h2c with prior knowledge only when server.http2 is on)."
            }
            Self::Proxy(ProxyError::Abandoned(_)) => {
                "An internal error stopped the fetch from KeyAPI; try again."
            }
            Self::Panicked => "An internal error stopped this request; try again.",
            Self::ReloadRejected(error) => {
                return format!("The configuration was not reloaded and nothing changed: {error}");
            }
            Self::Stopping => "The proxy is stopping; it takes no reload now.",
            Self::Spend(e) => return e.to_string(),
            Self::Proxy(ProxyError::Upstream(e)) => match e {
                UpstreamError::KeyRejected(_) => "KeyAPI rejected the configured API key.",
                UpstreamError::Status(code) if (400..500).contains(code) => {
                    return format!("KeyAPI refused the request (HTTP {code}).");
                }
                UpstreamError::Status(code) => {
                    return format!("KeyAPI failed with an upstream error (HTTP {code}).");
                }
                UpstreamError::Timeout => "KeyAPI did not answer in time.",
                UpstreamError::Connect(_) => "KeyAPI is unreachable.",
                UpstreamError::Transport(_) => "The request to KeyAPI failed.",
                UpstreamError::Malformed { .. } => "KeyAPI sent an invalid answer.",
                UpstreamError::TooLarge { .. } => "KeyAPI's answer is too large.",
                UpstreamError::RateLimited { .. } => RATE_LIMITED,
            },
            Self::Proxy(ProxyError::Protection(refusal)) => match refusal {
                // We hold back because KeyAPI said 429: its limit, as far as the client can tell.
                protect::Refusal::HeldBack { .. } => RATE_LIMITED,
                protect::Refusal::CircuitOpen { .. } => {
                    "KeyAPI is failing, so calls to it are paused (circuit open); retry after the seconds in Retry-After."
                }
                protect::Refusal::Overloaded { .. } => {
                    "Too many calls to KeyAPI are in flight; retry after the seconds in Retry-After."
                }
                protect::Refusal::SpendCap { .. } => {
                    "The spend-rate cap on KeyAPI calls is reached; retry after the seconds in Retry-After."
                }
            },
        };
        fixed.to_owned()
    }

    /// The error as an HTTP response carrying `request_id` in its envelope.
    pub(crate) fn to_response(&self, request_id: &RequestId) -> Response {
        let status = self.status();
        let message = self.public_message();
        let envelope = Envelope {
            code: status.as_u16(),
            message: &message,
            data: (),
            request_id: request_id.as_str(),
        };
        // Serializing a struct of strings and integers cannot fail.
        let body = serde_json::to_vec(&envelope).unwrap_or_default();
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, APPLICATION_JSON);
        match self {
            Self::Proxy(ProxyError::Upstream(e)) => {
                cache_status::set_forwarded_uncached(headers, e.upstream_status(), e.as_str());
                if let Some(secs) = e.retry_after_secs() {
                    headers.insert(RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            Self::Auth(AuthError::Unauthorized) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                cache_status::set_no_store(headers);
            }
            Self::Token(TokenError::KeysUnavailable { retry_after_secs }) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                cache_status::set_no_store(headers);
            }
            Self::Token(_) => {
                // RFC 6750 3.1: the client should get a new token.
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                cache_status::set_no_store(headers);
            }
            Self::Limited(refusal) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(refusal.retry_after_secs()));
                cache_status::set_no_store(headers);
            }
            Self::Proxy(ProxyError::Protection(refusal)) => {
                declined(headers, refusal.retry_after_secs(), refusal.as_str());
            }
            Self::Proxy(ProxyError::Budget(refusal)) => {
                declined(headers, refusal.retry_after_secs(), refusal.as_str());
            }
            Self::NotCached => cache_status::set_unserved(headers, "only-if-cached"),
            _ => cache_status::set_no_store(headers),
        }
        response
    }
}

/// Handlers return `Result<_, ApiError>` and use `?`: the error answers
/// with the current request's id.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.to_response(&RequestId::current())
    }
}

/// The headers of a call we declined to make (protection or a budget):
/// when to come back, and that KeyAPI was not asked (`reason` says why).
fn declined(headers: &mut HeaderMap, retry_after_secs: u64, reason: &str) {
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    cache_status::set_forwarded_uncached(headers, None, reason);
}
