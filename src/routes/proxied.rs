//! `GET|HEAD <route path>`: the one handler of every configured KeyAPI route.
//! Reads top to bottom: admit → parse (the route's parameters into a key) →
//! serve (the proxy) → respond. Nothing of the client's request other than
//! its token (a client token or a signed visitor token: checked, never
//! forwarded) or, without one, its address (a visitor's), the route's
//! parameters, `If-None-Match`, `Accept-Encoding`
//! and its `Cache-Control` directives (read by [`crate::directives`];
//! `no-cache` only if allowed) is used.

use std::{sync::Arc, time::SystemTime};

use axum::{
    body::Body,
    http::{HeaderMap, header::CONTENT_TYPE, request::Parts},
    response::{IntoResponse, Response},
};

use crate::{
    access::Client,
    cache_status,
    caller::ClientAddr,
    directives::{Ask, Directives},
    error::{APPLICATION_JSON, ApiError},
    ledger::{Account, Payer},
    limits::RateLimit,
    negotiate,
    observe::AccessLog,
    payers::KeyedPayer,
    proxy::{Outcome, ProxyError},
    route::Route,
    served::{CacheState, Served},
    spend::Tally,
    state::AppState,
};

/// The answer to a request for `route` whose head is `request` (its body,
/// if any, is never read). A caller refused or a query that does not parse
/// is an error answered before anything is served (and logged without a key).
pub(super) async fn answer(
    route: &Arc<Route>,
    state: &AppState,
    request: Parts,
) -> Result<Response, ApiError> {
    let headers = &request.headers;
    let caller = admit(state, headers).await?;
    let key = route.parse(request.uri.query())?;
    let ask = Ask {
        directives: Directives::of(headers),
        may_refresh: state.allow_client_refresh() || caller.may_refresh(),
    };
    // A fetch this request starts is charged to its caller (and the global budget).
    let payer = Payer::Request(caller.account().cloned());
    let outcome = state.proxy().serve(&key, route, &ask, payer).await;
    let (response, served, upstream_status, judged_at) = respond(headers, outcome);
    // A cached answer's day (the time the cache judged it) is the saving's day.
    if let (true, Some(now)) = (served.saved_a_call(), judged_at) {
        state
            .spend()
            .saved(caller.tally(state), route.credits(), now);
    }
    AccessLog {
        client: caller.id(),
        key,
        served,
        credits: route.credits(),
        upstream_status,
    }
    .report();
    Ok(response)
}

/// The answer to one request: the response, how it was served, and the
/// upstream status to log (when this request's own fetch got one).
/// The response to `outcome`, how it was served, the upstream status it
/// carries, and for a cached answer the time the cache judged it.
fn respond(
    headers: &HeaderMap,
    outcome: Result<Outcome, ProxyError>,
) -> (Response, Served, Option<u16>, Option<SystemTime>) {
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
            (response, Served::Cached(state), upstream, Some(now))
        }
        Ok(Outcome::Declined { status, body }) => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, APPLICATION_JSON);
            cache_status::set_forwarded_uncached(headers, Some(status.as_u16()), "declined");
            (response, Served::Declined, Some(status.as_u16()), None)
        }
        Ok(Outcome::NotCached) => {
            let response = ApiError::NotCached.into_response();
            (response, Served::NotCached, None, None)
        }
        Err(error) => {
            let upstream_status = error.upstream_status();
            let response = ApiError::from(error).into_response();
            (response, Served::Failed, upstream_status, None)
        }
    }
}

/// Who is asking: whose limits apply and who pays for the fetches it starts.
enum Caller {
    /// No token, none needed, and visitors have no limits of their own.
    Anonymous,
    /// A configured client, by its token.
    Client(Arc<Client>),
    /// The subject of a signed visitor token.
    Subject(Arc<KeyedPayer>),
    /// No token: a visitor, by its address prefix.
    Visitor(Arc<KeyedPayer>),
}

impl Caller {
    /// May force a refetch with `Cache-Control: no-cache` (a client's flag).
    fn may_refresh(&self) -> bool {
        matches!(self, Self::Client(c) if c.may_refresh)
    }

    /// The account its fetches are charged to (none: the global budget only).
    fn account(&self) -> Option<&Arc<Account>> {
        match self {
            Self::Anonymous => None,
            Self::Client(c) => Some(&c.account),
            Self::Subject(p) | Self::Visitor(p) => Some(&p.account),
        }
    }

    /// Its own request rate limit, if any.
    fn rate(&self) -> Option<&RateLimit> {
        match self {
            Self::Anonymous => None,
            Self::Client(c) => c.rate.as_ref(),
            Self::Subject(p) | Self::Visitor(p) => p.rate.as_ref(),
        }
    }

    /// Its line in the spend history.
    fn tally<'a>(&'a self, state: &'a AppState) -> &'a Tally {
        Account::tally_of(self.account().map(|a| &**a), state.spend())
    }

    /// Its name in the access log: a client's id, a subject's hashed name.
    fn id(&self) -> Option<Arc<str>> {
        match self {
            Self::Anonymous => None,
            Self::Client(c) => Some(Arc::clone(&c.id)),
            Self::Subject(p) | Self::Visitor(p) => Some(Arc::clone(&p.id)),
        }
    }

    /// Counts a request let in (`client_requests_total` / `issuer_requests_total`
    /// / `visitor_requests_total`).
    fn count_request(&self) {
        match self {
            Self::Anonymous => {}
            Self::Client(c) => {
                c.requests.inc();
            }
            Self::Subject(p) | Self::Visitor(p) => {
                p.requests.inc();
            }
        }
    }
}

/// Authenticates the caller (a JWT-shaped bearer token when issuers are
/// configured, else a client token, else none: a visitor, when the proxy is
/// open or `visitors.allow`) and applies its rate limit, then the global one.
async fn admit(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let caller = match state.issuers().presented(headers) {
        // Boxed: a key fetch's future would enlarge every request's future.
        Some(token) => Caller::Subject(Box::pin(state.issuers().verify(token)).await?),
        None => {
            let visitors = state.visitors();
            let allowed = visitors.allowed_beside_clients();
            match state.access().authenticate_caller(headers, allowed)? {
                Some(client) => Caller::Client(client),
                None => visitors
                    .visitor(ClientAddr::current())
                    .map_or(Caller::Anonymous, Caller::Visitor),
            }
        }
    };
    let limits = caller.rate().into_iter().chain(state.rate_limit());
    for limit in limits {
        if let Err(refusal) = limit.check().await {
            state.metrics().rate_limited(refusal.scope);
            state.spend().refused(caller.tally(state));
            return Err(refusal.into());
        }
    }
    caller.count_request();
    Ok(caller)
}
