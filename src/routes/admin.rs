//! `/admin/cache`: list and purge cached answers. Only a client whose
//! `[[clients]]` entry has `purge = true` gets in (401 without a valid token,
//! 403 without the flag — and always 403 when no client is configured).
//!
//! - `GET /admin/cache?prefix=ufc` lists stored keys whose hashtag starts with
//!   the (normalized) prefix, with age, freshness left and size.
//! - `DELETE /admin/cache?hashtag_name=..&period=..&region=..` purges one key,
//!   normalized exactly like the proxied route's query.
//! - `DELETE /admin/cache` (no query, or none of the route's parameters)
//!   purges everything.

use std::time::SystemTime;

use axum::{
    Extension, Json,
    extract::{RawQuery, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::{
    app::AppState,
    error::ApiError,
    key::{self, HashtagKey},
    observe::RequestId,
};

/// Most entries one listing returns.
const MAX_LISTED: usize = 1000;

/// One stored answer in a listing.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListedEntry {
    key: String,
    hashtag_name: String,
    period: u32,
    region: String,
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

pub(super) async fn list(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = state.access().authenticate_admin(&headers) {
        return ApiError::from(e).to_response(&request_id);
    }
    let prefix = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(name, _)| name == "prefix")
        .map(|(_, value)| key::normalize_prefix(&value, state.rules()))
        .unwrap_or_default();
    let now = SystemTime::now();
    let mut entries: Vec<ListedEntry> = state
        .proxy()
        .cache()
        .entries()
        .into_iter()
        .filter_map(|(key, entry)| {
            let question = HashtagKey::from_cache_key(&key)?;
            question.hashtag.starts_with(&prefix).then(|| ListedEntry {
                key: key.to_string(),
                region: question.region.as_str().to_owned(),
                hashtag_name: question.hashtag,
                period: question.period,
                age_secs: entry.age(now).as_secs(),
                ttl_secs: entry.remaining_ttl(now).as_secs(),
                bytes: entry.body.len(),
                gzip_bytes: entry.gzip.as_ref().map(|g| g.len()),
            })
        })
        .collect();
    entries.sort_by(|a, b| {
        (&a.hashtag_name, a.period, &a.region).cmp(&(&b.hashtag_name, b.period, &b.region))
    });
    let count = entries.len();
    entries.truncate(MAX_LISTED);
    Json(Listing {
        count,
        truncated: count > MAX_LISTED,
        entries,
    })
    .into_response()
}

pub(super) async fn purge(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let admin = match state.access().authenticate_admin(&headers) {
        Ok(admin) => admin,
        Err(e) => return ApiError::from(e).to_response(&request_id),
    };
    let proxy = state.proxy();
    // Unknown parameters are ignored, as on the proxied route: a query names
    // a key only when it has one of the route's parameters.
    let names_a_key = |q: &&str| {
        form_urlencoded::parse(q.as_bytes()).any(|(name, _)| key::PARAMETERS.contains(&&*name))
    };
    let purged = match query.as_deref().filter(names_a_key) {
        None => Purged {
            purged: proxy.purge_all().await,
            key: None,
        },
        Some(raw) => {
            let question = match HashtagKey::parse(Some(raw), state.rules()) {
                Ok(question) => question,
                Err(e) => return ApiError::from(e).to_response(&request_id),
            };
            let key = question.cache_key();
            Purged {
                purged: proxy.purge(&key).await,
                key: Some(key.to_string()),
            }
        }
    };
    tracing::info!(
        client = &*admin.id,
        purged = purged.purged,
        key = purged.key.as_deref(),
        "cache purge"
    );
    Json(purged).into_response()
}
