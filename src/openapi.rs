//! `GET /openapi.json`: an OpenAPI 3.1 description of the proxied route and the
//! operational endpoints, generated with `utoipa` from the declarations below
//! and completed from the running configuration (allowed periods, default
//! period). Rendered once at start-up; requests get the stored bytes.
//!
//! The `openapi` tests keep it in sync: every route the router serves is
//! documented, and the documented parameters are exactly those [`crate::key`]
//! parses.
#![allow(dead_code)] // The functions below exist only to carry their `#[utoipa::path]`.

use bytes::Bytes;
use serde_json::{Value, json};
use utoipa::{
    IntoParams, Modify, OpenApi, ToSchema,
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::key::{self, HASHTAG_DETAIL_PATH, HashtagRules};

/// The error envelope (KeyAPI's own shape), with the HTTP status as `code`.
#[derive(ToSchema)]
struct Envelope {
    /// The HTTP status.
    code: u16,
    /// What went wrong and, for input errors, what is allowed.
    message: String,
    /// Always `null` in errors.
    #[schema(value_type = Option<Object>)]
    data: (),
    /// The request id (also the `X-Request-Id` response header).
    #[schema(rename = "requestId")]
    request_id: String,
}

/// Query of the proxied route. Unknown parameters are ignored and never forwarded.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
struct HashtagQuery {
    /// Hashtag: letters or digits of any script or `_` (1 to 100 of them), one
    /// leading `#` allowed, whitespace around ignored; lower-cased (by default)
    /// before it becomes the cache key. The pattern is generated from the
    /// parser's own rules.
    #[param(min_length = 1, example = "ufc324")]
    hashtag_name: String,
    /// Window in days; the allowed values come from `hashtag.periods`.
    period: Option<u32>,
    /// `all_regions` (any case) or a 2-letter country code (any case); empty
    /// means `all_regions`.
    #[param(default = "all_regions", example = "US")]
    region: Option<String>,
}

/// Query of the admin purge: the route's parameters, normalized the same
/// way. Without any query, everything is purged; with one, `hashtag_name` is
/// required (else 400).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
struct PurgeQuery {
    /// The hashtag of the one key to purge (as for the proxied route).
    #[param(min_length = 1, example = "ufc324")]
    hashtag_name: Option<String>,
    /// As for the proxied route.
    period: Option<u32>,
    /// As for the proxied route.
    #[param(default = "all_regions", example = "US")]
    region: Option<String>,
}

/// Query of the admin listing.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
struct AdminListQuery {
    /// Hashtag prefix (normalized like `hashtag_name`); empty lists everything.
    prefix: Option<String>,
}

/// KeyAPI's answer, byte for byte (`code == 0` means success). `HEAD` answers
/// the same with no body.
#[utoipa::path(
    get,
    path = "/v1/tiktok/trending/hashtag/detail",
    tag = "proxy",
    params(HashtagQuery),
    security((), ("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "KeyAPI's body, byte for byte (cached, or a passed-through `code != 0` answer)",
            content_type = "application/json", body = Object,
            headers(
                ("Cache-Status" = String, description = "RFC 9211: `keyapi-proxy; hit; ttl=N`, `…; fwd=uri-miss; stored`, `…; collapsed`, …"),
                ("Age" = u64, description = "Seconds since the answer was stored"),
                ("Cache-Control" = String, description = "Cached answers: `max-age=<whole freshness lifetime>` plus `stale-while-revalidate=`/`stale-if-error=` when configured (`max-age − Age` is the Cache-Status ttl); passed-through answers: `no-store`"),
                ("ETag" = String, description = "Strong tag of the representation sent; the gzip one ends in `-gzip`"),
                ("Vary" = String, description = "`accept-encoding`"),
                ("Content-Encoding" = String, description = "`gzip` when accepted"),
                ("X-Request-Id" = String, description = "Request id"),
            )),
        (status = 304, description = "`If-None-Match` named the ETag of one of the stored answer's representations (or `*`); no body",
            headers(
                ("ETag" = String, description = "The tag the client holds"),
                ("Cache-Status" = String, description = "As for 200"),
                ("Age" = u64, description = "As for 200"),
                ("Cache-Control" = String, description = "As for 200"),
                ("Vary" = String, description = "`accept-encoding`"),
                ("X-Request-Id" = String, description = "Request id"),
            )),
        (status = 400, description = "Missing, empty, invalid or repeated parameter; or KeyAPI's own 400, passed through", body = Envelope,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 401, description = "Clients are configured and the token is missing or wrong", body = Envelope,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The `Origin` header names an origin not in `cors.allowed_origins`", body = Envelope),
        (status = 404, description = "KeyAPI's 404 (e.g. unknown hashtag), passed through (its body)", content_type = "application/json", body = Object),
        (status = 422, description = "KeyAPI's 422, passed through (its body)", content_type = "application/json", body = Object),
        (status = "4XX", description = "Another KeyAPI 4xx, passed through (its JSON body, else our envelope)", content_type = "application/json", body = Object),
        (status = 429, description = "Rate limit exceeded, daily credit budget spent (misses only), or KeyAPI rate-limited us; see `Retry-After`", body = Envelope,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Internal failure of a shared upstream fetch", body = Envelope),
        (status = 502, description = "KeyAPI failed, rejected the configured key, or answered invalidly", body = Envelope),
        (status = 503, description = "Upstream protection: circuit open, too many calls in flight, or the spend-rate cap; see `Retry-After`", body = Envelope,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "KeyAPI did not answer in time", body = Envelope),
    )
)]
fn hashtag_detail() {}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Object)))]
fn healthz() {}

/// Readiness.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "`{\"status\":\"ready\"}`", body = Object),
              (status = 503, description = "`{\"status\":\"draining\"}`", body = Object)))]
fn readyz() {}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text 0.0.4 by default and for `text/plain`; OpenMetrics 1.0.0 when `Accept` prefers `application/openmetrics-text`",
        content((String = "text/plain"), (String = "application/openmetrics-text")))))]
fn metrics() {}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
fn openapi() {}

/// Statistics as JSON (the status page's data).
#[utoipa::path(get, path = "/stats", tag = "operations",
    responses((status = 200, description = "Uptime, hit ratio, credits, top keys, upstream health, last hour per minute", body = Object)))]
fn stats() {}

/// Self-contained HTML status page.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "HTML, no external assets", content_type = "text/html", body = String)))]
fn status_page() {}

/// List cached keys (clients with the purge flag).
#[utoipa::path(get, path = "/admin/cache", tag = "admin", params(AdminListQuery),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "`{count, truncated, entries: [{key, hashtagName, period, region, ageSecs, ttlSecs, bytes, gzipBytes}]}`", body = Object),
              (status = 401, description = "No valid token", body = Envelope),
              (status = 403, description = "Token without the purge flag, or no clients configured", body = Envelope)))]
fn admin_list() {}

/// Purge one normalized key (with the route's parameters) or, without a query, everything.
#[utoipa::path(delete, path = "/admin/cache", tag = "admin", params(PurgeQuery),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "`{purged, key?}`", body = Object),
              (status = 400, description = "Invalid parameters", body = Envelope),
              (status = 401, description = "No valid token", body = Envelope),
              (status = 403, description = "Token without the purge flag, or no clients configured", body = Envelope)))]
fn admin_purge() {}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keyapi-proxy",
        description = "Caching, single-flight proxy for KeyAPI's TikTok hashtag-detail endpoint (2 credits per upstream call). Same route and body as KeyAPI; the KeyAPI key is injected server-side."
    ),
    paths(hashtag_detail, healthz, readyz, metrics, openapi, stats, status_page, admin_list, admin_purge),
    components(schemas(Envelope)),
    modifiers(&Security),
    tags(
        (name = "proxy", description = "The proxied KeyAPI route"),
        (name = "operations", description = "Health, metrics, statistics"),
        (name = "admin", description = "Cache administration (purge flag)"),
    )
)]
struct ApiDoc;

/// The document for this configuration, as JSON bytes.
pub fn document(rules: &HashtagRules) -> Bytes {
    let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(doc) => doc,
        Err(_) => return Bytes::from_static(b"{}"),
    };
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, operations) in paths.iter_mut() {
            let operational = !matches!(path.as_str(), HASHTAG_DETAIL_PATH | "/openapi.json");
            complete(operations, rules, operational);
        }
    }
    if let Some(purge) = doc["paths"]["/admin/cache"].get_mut("delete") {
        query_as_one_object(purge);
    }
    Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
}

/// A purge takes no query (everything) or one naming a key, so `period` and
/// `region` need `hashtag_name`. Query parameters cannot depend on each
/// other, so they become the properties of one form-exploded object (the
/// same `?a=1&b=2` on the wire) whose schema says so with `dependentRequired`.
fn query_as_one_object(operation: &mut Value) {
    let Some(params) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let mut properties = serde_json::Map::new();
    for param in params.drain(..) {
        if let (Some(name), Some(schema)) = (param["name"].as_str(), param.get("schema")) {
            let mut schema = schema.clone();
            schema["description"] = param["description"].clone();
            properties.insert(name.to_owned(), schema);
        }
    }
    params.push(json!({
        "name": "key",
        "in": "query",
        "style": "form",
        "explode": true,
        "required": false,
        "description": "The key to purge, as the proxied route's parameters; none purges everything",
        "schema": {
            "type": "object",
            "properties": properties,
            "dependentRequired": {"period": ["hashtag_name"], "region": ["hashtag_name"]},
        },
    }));
}

/// Fills in what only the parser and the router know: the parameter rules
/// (the same values [`crate::key`] enforces), `HEAD` next to every `GET`
/// (axum answers it), the 405 every path gives to other methods, the 403 of
/// a refused origin, and `no-store` on every `operational` answer.
fn complete(operations: &mut Value, rules: &HashtagRules, operational: bool) {
    let Some(operations) = operations.as_object_mut() else {
        return;
    };
    for operation in operations.values_mut() {
        let params = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut);
        for param in params.into_iter().flatten() {
            let name = param["name"].as_str().unwrap_or_default().to_owned();
            let schema = &mut param["schema"];
            match name.as_str() {
                "period" => {
                    schema["enum"] = json!(rules.periods());
                    schema["default"] = json!(rules.default_period());
                }
                "hashtag_name" => schema["pattern"] = json!(key::hashtag_pattern()),
                "region" => schema["pattern"] = json!(key::region_pattern()),
                _ => {}
            }
        }
        let responses = &mut operation["responses"];
        responses["405"] = json!({
            "description": "Method not allowed here; `Allow` lists the methods that are",
            "headers": {"Allow": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
        });
        if responses.get("403").is_none() {
            responses["403"] = json!({
                "description": "The `Origin` header names an origin not in `cors.allowed_origins`",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
            });
        }
        if operational {
            for response in responses
                .as_object_mut()
                .into_iter()
                .flat_map(|r| r.values_mut())
            {
                response["headers"]["Cache-Control"] =
                    json!({"description": "`no-store`", "schema": {"type": "string"}});
            }
        }
    }
    if let Some(get) = operations.get("get") {
        let mut head = get.clone();
        if let Some(id) = head["operationId"].as_str() {
            head["operationId"] = json!(format!("{id}_head"));
        }
        // Same status and headers as GET, never a body.
        for response in head["responses"]
            .as_object_mut()
            .into_iter()
            .flat_map(|r| r.values_mut())
        {
            if let Some(response) = response.as_object_mut() {
                response.remove("content");
            }
        }
        operations.insert("head".to_owned(), head);
    }
}

/// For tests and callers that want to inspect the document.
pub fn document_value(rules: &HashtagRules) -> Value {
    serde_json::from_slice(&document(rules)).unwrap_or(Value::Null)
}
