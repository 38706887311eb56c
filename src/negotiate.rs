//! Turning a stored [`Entry`] into the response for one client: `If-None-Match`
//! (→ 304) and `Accept-Encoding` (→ the precomputed gzip form). Only header
//! comparisons happen here; the body, its tag and its compressed form were
//! computed when the entry was stored.

use axum::{
    body::Body,
    http::{
        HeaderMap, HeaderValue, StatusCode,
        header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, ETAG, IF_NONE_MATCH, VARY},
    },
    response::Response,
};

use crate::{
    cache::Entry,
    cache_status::{self, CacheState},
    error::APPLICATION_JSON,
};

const GZIP: HeaderValue = HeaderValue::from_static("gzip");
const VARY_ACCEPT_ENCODING: HeaderValue = HeaderValue::from_static("accept-encoding");

/// The answer to `request` from a cached `entry`: 304, gzip or identity. A
/// negative entry (a cached refusal) is never a 304: `If-None-Match: *` means
/// "a representation exists", which a refusal is not.
pub fn cached_response(request: &HeaderMap, entry: &Entry, state: CacheState) -> Response {
    let mut response: Response = if !entry.negative && not_modified(request, &entry.etag) {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let gzip = entry.gzip.as_ref().filter(|_| accepts_gzip(request));
        let mut response = Response::new(Body::from(gzip.unwrap_or(&entry.body).clone()));
        // 200, or KeyAPI's own status for a cached refusal.
        *response.status_mut() = entry.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, APPLICATION_JSON);
        if gzip.is_some() {
            headers.insert(CONTENT_ENCODING, GZIP);
        }
        response
    };
    let headers = response.headers_mut();
    // Room for every header of a hit (ours, the request id, CORS, date and
    // length added later) so the map never grows mid-request.
    headers.reserve(12);
    headers.insert(ETAG, entry.etag.clone());
    headers.insert(VARY, VARY_ACCEPT_ENCODING);
    cache_status::set_cached(headers, state, entry);
    response
}

/// `If-None-Match` names `etag` (weak comparison, as RFC 9110 asks) or is `*`.
fn not_modified(request: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    request
        .get_all(IF_NONE_MATCH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|tag| tag == b"*" || tag.strip_prefix(b"W/").unwrap_or(tag) == ours)
}

/// `Accept-Encoding` allows gzip: `gzip`/`x-gzip` or `*` with a non-zero q.
fn accepts_gzip(request: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for item in request
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let q = parts
            .find_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
            .map_or(1.0, |q| q.trim().parse::<f32>().unwrap_or(0.0));
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(q > 0.0);
        } else if coding == "*" {
            any = Some(q > 0.0);
        }
    }
    gzip.or(any).unwrap_or(false)
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
                not_modified(&headers(IF_NONE_MATCH, value), &etag),
                expected,
                "{value}"
            );
        }
    }
}
