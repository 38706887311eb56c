//! `GET|HEAD <route path>`: the one handler of every configured KeyAPI route.
//! Reads top to bottom: admit → parse (the route's parameters into a key) →
//! serve (the proxy) → respond. Nothing of the client's request other than
//! its token (checked, never forwarded), the route's parameters,
//! `If-None-Match`, `Accept-Encoding` and its `Cache-Control` directives
//! (read by [`crate::directives`]; `no-cache` only if allowed) is used.

use std::sync::Arc;

use axum::{
    body::Body,
    http::{HeaderMap, header::CONTENT_TYPE, request::Parts},
    response::Response,
};

use crate::{
    access::Client,
    cache_status,
    directives::{Ask, Directives},
    error::{APPLICATION_JSON, ApiError},
    ledger::Payer,
    negotiate,
    observe::AccessLog,
    proxy::{Outcome, ProxyError},
    request_id::RequestId,
    route::Route,
    served::{CacheState, Served},
    state::AppState,
};

/// The answer to a request for `route` whose head is `request` (its body,
/// if any, is never read).
pub(super) async fn answer(route: &Arc<Route>, state: &AppState, request: Parts) -> Response {
    let headers = &request.headers;
    let client = match admit(state, headers).await {
        Ok(client) => client,
        Err(e) => return e.to_response(&RequestId::current()),
    };
    let key = match route.parse(request.uri.query()) {
        Ok(key) => key,
        Err(e) => return ApiError::from(e).to_response(&RequestId::current()),
    };
    let ask = Ask {
        directives: Directives::of(headers),
        may_refresh: state.allow_client_refresh() || client.as_ref().is_some_and(|c| c.may_refresh),
    };
    // A fetch this request starts is charged to its client (and the global budget).
    let payer = Payer::Request(client.as_ref().map(|c| Arc::clone(&c.account)));
    let outcome = state.proxy().serve(&key, route, &ask, payer).await;
    let (response, served, upstream_status) = respond(headers, outcome);
    AccessLog {
        client: client.map(|c| Arc::clone(&c.id)),
        key,
        served,
        credits: route.credits(),
        upstream_status,
    }
    .report();
    response
}

/// The answer to one request: the response, how it was served, and the
/// upstream status to log (when this request's own fetch got one).
fn respond(
    headers: &HeaderMap,
    outcome: Result<Outcome, ProxyError>,
) -> (Response, Served, Option<u16>) {
    match outcome {
        Ok(Outcome::Cached { entry, state, now }) => {
            let response = negotiate::cached_response(headers, &entry, state, now);
            let upstream = match state {
                CacheState::Hit
                | CacheState::Stale
                | CacheState::StaleOverBudget
                | CacheState::StaleAccepted(_) => None,
                CacheState::StaleIfError { fwd_status } => fwd_status,
                CacheState::Stored | CacheState::Collapsed | CacheState::Refreshed => {
                    Some(entry.status.as_u16())
                }
            };
            (response, Served::Cached(state), upstream)
        }
        Ok(Outcome::Declined { status, body }) => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, APPLICATION_JSON);
            cache_status::set_forwarded_uncached(headers, Some(status.as_u16()), "declined");
            (response, Served::Declined, Some(status.as_u16()))
        }
        Ok(Outcome::NotCached) => {
            let response = ApiError::NotCached.to_response(&RequestId::current());
            (response, Served::NotCached, None)
        }
        Err(error) => {
            let upstream_status = error.upstream_status();
            let response = ApiError::from(error).to_response(&RequestId::current());
            (response, Served::Failed, upstream_status)
        }
    }
}

/// Authenticates the caller and applies its rate limit, then the global one.
async fn admit(state: &AppState, headers: &HeaderMap) -> Result<Option<Arc<Client>>, ApiError> {
    let client = state.access().authenticate(headers)?;
    let limits = client
        .as_ref()
        .and_then(|c| c.rate.as_ref())
        .into_iter()
        .chain(state.rate_limit());
    for limit in limits {
        if let Err(refusal) = limit.check().await {
            state.metrics().rate_limited(refusal.scope);
            return Err(refusal.into());
        }
    }
    if let Some(client) = &client {
        client.requests.inc();
    }
    Ok(client)
}
