//! `/admin/cache`: list and purge cached answers. Only a client whose
//! `[[clients]]` entry has `admin = true` (or `purge = true`, its older
//! name) gets in (401 without a valid token, 403 without the flag — and
//! always 403 when no client is configured); every admin action is logged
//! with the client's id.
//!
//! - `GET /admin/cache?route=<path>&prefix=ufc` lists stored keys (of one
//!   route, if given) whose first required parameter (else first hashtag or
//!   text one) starts with the prefix (normalized like that parameter), with
//!   age, freshness left and size.
//! - `DELETE /admin/cache?route=<path>&<the route's parameters>` purges one
//!   key, normalized exactly like the route's own query; `route` may be left
//!   out when only one route is configured.
//! - `DELETE /admin/cache?all=true` purges everything. Nothing else does: no
//!   query, or a parameter the purge does not take (a typo), is a 400.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    extract::{FromRequestParts, RawQuery, State},
    http::request::Parts,
};
use serde::Serialize;

use crate::{
    access::Client,
    cache::CacheKey,
    error::ApiError,
    route::{self, KeyError, Route, RouteTable},
    state::AppState,
};

/// Most entries one listing returns.
const MAX_LISTED: usize = 1000;
/// The admin queries' own parameter naming the route.
const ROUTE_PARAM: &str = "route";
/// The purge's own parameter asking for everything (`all=true`).
const ALL_PARAM: &str = "all";

/// One stored answer in a listing.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListedEntry {
    key: String,
    route: &'static str,
    params: BTreeMap<String, String>,
    age_secs: u64,
    ttl_secs: u64,
    bytes: usize,
    gzip_bytes: Option<usize>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Listing {
    count: usize,
    truncated: bool,
    entries: Vec<ListedEntry>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Purged {
    purged: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

/// A client allowed to use the admin endpoints; extracting it answers 401
/// or 403 (with the envelope) for anyone else.
pub(crate) struct Admin(pub(super) Arc<Client>);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let client = state.access().authenticate_admin(&parts.headers)?;
        Ok(Admin(client))
    }
}

pub(super) async fn list(
    Admin(admin): Admin,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Listing>, ApiError> {
    let (mut only, mut prefix) = (None, String::new());
    for (name, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*name {
            ROUTE_PARAM => only = Some(named_route(state.routes(), Some(&value))?),
            "prefix" => prefix = value.into_owned(),
            _ => {}
        }
    }
    let now = state.clock().now();
    let mut entries: Vec<ListedEntry> = state
        .proxy()
        .cache()
        .entries()
        .into_iter()
        .filter_map(|(key, entry)| {
            let route = state.routes().route_of(&key)?;
            if only.is_some_and(|o| !Arc::ptr_eq(o, route)) {
                return None;
            }
            let params: BTreeMap<String, String> = Route::params_of(&key).into_iter().collect();
            let matches = match route.prefix_param() {
                Some(param) if !prefix.is_empty() => params
                    .get(param.name())
                    .is_some_and(|v| v.starts_with(&param.normalize_prefix(&prefix))),
                _ => true,
            };
            matches.then(|| ListedEntry {
                key: key.to_string(),
                route: route.path(),
                params,
                age_secs: entry.age(now).as_secs(),
                ttl_secs: entry.remaining_ttl(now).as_secs(),
                bytes: entry.body.len(),
                gzip_bytes: entry.gzip_made().map(|gzip| gzip.body.len()),
            })
        })
        .collect();
    entries.sort_by(|a, b| (a.route, &a.params).cmp(&(b.route, &b.params)));
    let count = entries.len();
    tracing::info!(client = &*admin.id, count, "cache listed");
    entries.truncate(MAX_LISTED);
    Ok(Json(Listing {
        count,
        truncated: count > MAX_LISTED,
        entries,
    }))
}

pub(super) async fn purge(
    Admin(admin): Admin,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Purged>, ApiError> {
    let proxy = state.proxy();
    let purged = match purge_target(state.routes(), query.as_deref().unwrap_or(""))? {
        PurgeTarget::All => Purged {
            purged: proxy.purge_all().await,
            key: None,
        },
        PurgeTarget::One(key) => Purged {
            purged: proxy.purge(&key).await,
            key: Some(key.to_string()),
        },
    };
    tracing::info!(
        client = &*admin.id,
        purged = purged.purged,
        key = purged.key.as_deref(),
        "cache purge"
    );
    Ok(Json(purged))
}

/// What a `DELETE /admin/cache` purges.
#[derive(Debug)]
enum PurgeTarget {
    /// Every entry in every tier (`all=true`).
    All,
    /// One normalized key.
    One(CacheKey),
}

/// Reads a purge's query. Unlike the routes, which ignore unknown
/// parameters (cache busters), a purge refuses them: a typo (`hashtag=x`)
/// would otherwise purge something else than meant, and purging everything
/// must be asked for by name (`all=true`, alone).
fn purge_target(table: &RouteTable, raw: &str) -> Result<PurgeTarget, KeyError> {
    let (mut named, mut all) = (None, None);
    let mut any = false;
    for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
        any = true;
        let slot = match &*name {
            ROUTE_PARAM => &mut named,
            ALL_PARAM => &mut all,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(KeyError::Repeated(name.into()));
        }
    }
    if let Some(all) = all {
        if all != "true" {
            return Err(KeyError::Invalid {
                name: ALL_PARAM.into(),
                rule: "true".into(),
                got: route::clip(&all),
            });
        }
        let alone = form_urlencoded::parse(raw.as_bytes()).all(|(name, _)| name == ALL_PARAM);
        return match alone {
            true => Ok(PurgeTarget::All),
            false => Err(KeyError::PurgeAllWithKey),
        };
    }
    if !any {
        return Err(KeyError::PurgeUnnamed);
    }
    let route = named_route(table, named.as_deref())?;
    let known = |name: &str| name == ROUTE_PARAM || route.params().iter().any(|p| p.name() == name);
    if let Some((name, _)) = form_urlencoded::parse(raw.as_bytes()).find(|(name, _)| !known(name)) {
        let params: Vec<&str> = route.params().iter().map(|p| p.name()).collect();
        return Err(KeyError::Unknown {
            name: route::clip(&name),
            takes: format!("route, {}, or all=true alone", params.join(", ")).into(),
        });
    }
    route.parse(Some(raw)).map(PurgeTarget::One)
}

/// The route a `route=<path>` parameter names; without one, the only route.
fn named_route<'t>(table: &'t RouteTable, named: Option<&str>) -> Result<&'t Arc<Route>, KeyError> {
    let paths = || {
        let paths: Vec<&str> = table.routes().iter().map(|r| r.path()).collect();
        paths.join(", ")
    };
    match (named, table.routes()) {
        (None, [only]) => Ok(only),
        (None, routes) => Err(KeyError::Missing {
            name: ROUTE_PARAM.into(),
            example: routes.first().map_or("", |r| r.path()).into(),
        }),
        (Some(path), _) => table.get(path).ok_or_else(|| KeyError::Invalid {
            name: ROUTE_PARAM.into(),
            rule: format!("one of {}", paths()).into(),
            got: path.chars().take(40).collect(),
        }),
    }
}
