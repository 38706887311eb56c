//! Turning a stored [`Entry`] into the response for one client: `If-None-Match`
//! (→ 304) and `Accept-Encoding` (→ the precomputed gzip form). Only header
//! comparisons happen here; the bodies and their tags (each representation
//! has its own strong `ETag`) were computed when the entry was stored.

use std::time::SystemTime;

use axum::{
    body::Body,
    http::{
        HeaderMap, HeaderName, HeaderValue, StatusCode,
        header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, ETAG, IF_NONE_MATCH, VARY},
    },
    response::Response,
};

use bytes::Bytes;

use crate::{
    cache::Entry, cache_status, error::APPLICATION_JSON, request_id::X_REQUEST_ID,
    served::CacheState,
};

const GZIP: HeaderValue = HeaderValue::from_static("gzip");
const VARY_ACCEPT_ENCODING: HeaderValue = HeaderValue::from_static("accept-encoding");

/// One of an entry's two representations: its body and its strong tag.
struct Representation<'a> {
    body: &'a Bytes,
    etag: &'a HeaderValue,
    gzip: bool,
}

/// The answer to `request` from a cached `entry` at `now`: 304, gzip or
/// identity.
pub(crate) fn cached_response(
    request: &HeaderMap,
    entry: &Entry,
    state: CacheState,
    now: SystemTime,
) -> Response {
    let identity = Representation {
        body: &entry.body,
        etag: &entry.etag,
        gzip: false,
    };
    let wants_gzip = accepts_gzip(request);
    // A negative entry (a cached refusal) is never a 304: `If-None-Match: *`
    // means "a representation exists", which a refusal is not.
    let conditional = !entry.negative && request.contains_key(IF_NONE_MATCH);
    // The gzip form is made only for a client that takes it, or to compare
    // the tag a downstream cache may hold.
    let gzip = (wants_gzip || conditional)
        .then(|| entry.gzip())
        .flatten()
        .map(|gzip| Representation {
            body: &gzip.body,
            etag: &gzip.etag,
            gzip: true,
        });
    let (selected, other) = match gzip {
        Some(gzip) if wants_gzip => (gzip, Some(identity)),
        gzip => (identity, gzip),
    };
    // A 304 names the representation the client already holds: the selected
    // one, or the other one when that is the tag it sent (a downstream cache
    // revalidating every variant it stored, RFC 9111 §4.3.2).
    let matched = if !conditional {
        None
    } else if not_modified(request, selected.etag, true) {
        Some(&selected)
    } else {
        other
            .as_ref()
            .filter(|o| not_modified(request, o.etag, false))
    };
    let (status, body, headers) = match matched {
        Some(held) => {
            let headers = head(entry, state, now, None, held.etag);
            (StatusCode::NOT_MODIFIED, Body::empty(), headers)
        }
        None => {
            let build = || head(entry, state, now, Some(&selected), selected.etag);
            let headers = if state == CacheState::Hit {
                let age_secs = entry.age(now).as_secs();
                entry.hit_head(selected.gzip, age_secs, || {
                    let mut headers = build();
                    // A clone has no spare room: the id's slot is kept (and
                    // overwritten for every answer) so adding it does not grow the map.
                    headers.insert(X_REQUEST_ID, HeaderValue::from_static("-"));
                    headers
                })
            } else {
                build()
            };
            // 200, or KeyAPI's own status for a cached refusal.
            let body = Body::from(selected.body.clone());
            (entry.status, body, headers)
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The headers of an answer from `entry` tagged `etag`: those of a body
/// when it carries `body`, else those of a 304.
fn head(
    entry: &Entry,
    state: CacheState,
    now: SystemTime,
    body: Option<&Representation<'_>>,
    etag: &HeaderValue,
) -> HeaderMap {
    // Room for every header of an answer (ours, the request id, CORS, the
    // length) from the start, so the map is allocated once and never grows.
    let mut headers = HeaderMap::with_capacity(12);
    if let Some(body) = body {
        headers.insert(CONTENT_TYPE, APPLICATION_JSON);
        if body.gzip {
            headers.insert(CONTENT_ENCODING, GZIP);
        }
    }
    headers.insert(ETAG, etag.clone());
    headers.insert(VARY, VARY_ACCEPT_ENCODING);
    cache_status::set_cached(&mut headers, state, entry, now);
    headers
}

/// `If-None-Match` names `etag` (weak comparison, as RFC 9110 asks), or is
/// `*` and `wildcard` allows it.
fn not_modified(request: &HeaderMap, etag: &HeaderValue, wildcard: bool) -> bool {
    let ours = etag.as_bytes();
    request
        .get_all(IF_NONE_MATCH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|tag| (wildcard && tag == b"*") || tag.strip_prefix(b"W/").unwrap_or(tag) == ours)
}

/// `Accept-Encoding` allows gzip: `gzip`/`x-gzip`, or else `*`, with a non-zero q.
fn accepts_gzip(request: &HeaderMap) -> bool {
    // Most API clients send none: one lookup instead of two.
    if !request.contains_key(ACCEPT_ENCODING) {
        return false;
    }
    quality(request, &ACCEPT_ENCODING, &["gzip", "x-gzip"])
        .or_else(|| quality(request, &ACCEPT_ENCODING, &["*"]))
        .is_some_and(|q| q > 0.0)
}

/// The `q` (1 when absent, 0 when unreadable) of the first item of the
/// comma-separated `name` headers whose value before any `;` is one of
/// `tokens` (ASCII case-insensitive); `None` when no item names one.
pub(crate) fn quality(request: &HeaderMap, name: &HeaderName, tokens: &[&str]) -> Option<f32> {
    request
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let token = parts.next().unwrap_or("");
            tokens
                .iter()
                .any(|t| token.eq_ignore_ascii_case(t))
                .then(|| {
                    parts
                        .find_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                        .map_or(1.0, |q| q.trim().parse::<f32>().unwrap_or(0.0))
                })
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(name: axum::http::HeaderName, value: &'static str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_static(value));
        map
    }

    #[test]
    fn accept_encoding_honours_q_values() {
        for (value, expected) in [
            ("gzip", true),
            ("br, gzip;q=0.5", true),
            ("GZIP", true),
            ("gzip;q=0", false),
            ("*", true),
            ("*;q=0", false),
            ("gzip;q=0, *", false),
            ("deflate, br", false),
            ("identity", false),
        ] {
            assert_eq!(
                accepts_gzip(&headers(ACCEPT_ENCODING, value)),
                expected,
                "{value}"
            );
        }
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let etag = HeaderValue::from_static("\"abc\"");
        for (value, expected) in [
            ("\"abc\"", true),
            ("W/\"abc\"", true),
            ("\"x\", \"abc\"", true),
            ("*", true),
            ("\"abd\"", false),
            ("abc", false),
        ] {
            assert_eq!(
                not_modified(&headers(IF_NONE_MATCH, value), &etag, true),
                expected,
                "{value}"
            );
        }
    }
}
