//! `GET /openapi.json`: an OpenAPI 3.1 description of the configured routes
//! and the operational endpoints. The operational endpoints and the shape of a
//! proxied route's answers are declared below with `utoipa`; one path item per
//! configured route is then made from that shape, with parameter schemas from
//! the same rules the parser enforces ([`crate::route`]). Rendered once at
//! start-up; requests get the stored bytes.
#![allow(dead_code)] // The functions below exist only to carry their `#[utoipa::path]`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde_json::{Value, json};
use utoipa::{
    IntoParams, Modify, OpenApi, ToSchema,
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::{
    browser::PROBE_PATHS,
    route::{self, Kind, Param, RouteTable},
};

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

/// Query of the admin listing.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
struct AdminListQuery {
    /// Only keys of this route (its path).
    route: Option<String>,
    /// Prefix of each key's first required parameter, else its first hashtag or text one (normalized like it); empty lists everything.
    prefix: Option<String>,
}

/// Query of the spend history.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
struct AdminSpendQuery {
    /// First UTC day, `YYYY-MM-DD` (default: 29 days before `to`; never before the oldest day kept).
    #[param(format = Date, pattern = "^(19[7-9][0-9]|[2-9][0-9]{3})-[0-9]{2}-[0-9]{2}$")]
    from: Option<String>,
    /// Last UTC day, `YYYY-MM-DD` (default and at most: today).
    #[param(format = Date, pattern = "^(19[7-9][0-9]|[2-9][0-9]{3})-[0-9]{2}-[0-9]{2}$")]
    to: Option<String>,
    /// `json` (default) or `csv` (also chosen by `Accept: text/csv`).
    #[param(pattern = "^(json|csv)$")]
    format: Option<String>,
}

/// Where the configured routes' path items are made from (see [`document`]).
const ROUTE_TEMPLATE: &str = "/__route__";

/// KeyAPI's answer, byte for byte (`code == 0` means success). `HEAD` answers
/// the same with no body.
#[utoipa::path(
    get,
    path = "/__route__",
    tag = "proxy",
    security((), ("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "KeyAPI's body, byte for byte (cached, or a passed-through `code != 0` answer)",
            content_type = "application/json", body = Object,
            headers(
                ("Cache-Status" = String, description = "RFC 9211: `keyapi-proxy; hit; ttl=N`, `…; fwd=uri-miss; stored`, `…; collapsed`, `…; hit; ttl=-N; detail=max-stale` (a stale copy the request's `Cache-Control` took), …"),
                ("Age" = u64, description = "Seconds since the answer was stored"),
                ("Cache-Control" = String, description = "Cached answers: `max-age=<whole freshness lifetime>` plus `stale-while-revalidate=`/`stale-if-error=` when configured (`max-age − Age` is the Cache-Status ttl); passed-through answers: `no-store`"),
                ("ETag" = String, description = "Strong tag of the representation sent; the gzip one ends in `-gzip`"),
                ("Vary" = String, description = "`accept-encoding` (and `origin` when `cors.allowed_origins` is set)"),
                ("Content-Encoding" = String, description = "`gzip` when accepted"),
                ("X-Request-Id" = String, description = "Request id"),
            )),
        (status = 304, description = "`If-None-Match` named the ETag of one of the stored answer's representations (or `*`); no body",
            headers(
                ("ETag" = String, description = "The tag the client holds"),
                ("Cache-Status" = String, description = "As for 200"),
                ("Age" = u64, description = "As for 200"),
                ("Cache-Control" = String, description = "As for 200"),
                ("Vary" = String, description = "`accept-encoding` (and `origin` when `cors.allowed_origins` is set)"),
                ("X-Request-Id" = String, description = "Request id"),
            )),
        (status = 400, description = "Missing, empty, invalid or repeated parameter; or KeyAPI's own 400, passed through", body = Envelope,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 401, description = "Clients are configured and the token is missing or wrong; or a signed visitor token (issuers configured) is malformed, expired, foreign or does not verify", body = Envelope,
            headers(("WWW-Authenticate" = String, description = "`Bearer` (`Bearer error=\"invalid_token\"` for a signed token)"))),
        (status = 403, description = "The `Origin` header names an origin not in `cors.allowed_origins`; or a browser's cross-site request (`Sec-Fetch-Site: cross-site`) that is not a CORS request from an allowed origin", body = Envelope),
        (status = 404, description = "KeyAPI's 404 (e.g. unknown hashtag), passed through (its body)", content_type = "application/json", body = Object),
        (status = 422, description = "KeyAPI's 422, passed through (its body)", content_type = "application/json", body = Object),
        (status = "4XX", description = "Another KeyAPI 4xx, passed through (its JSON body, else our envelope)", content_type = "application/json", body = Object),
        (status = 429, description = "Rate limit exceeded, a daily credit budget cannot afford a call (and no stale copy is kept), or KeyAPI rate-limited us; see `Retry-After`", body = Envelope,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Internal failure of a shared upstream fetch", body = Envelope),
        (status = 502, description = "KeyAPI failed, rejected the configured key, or answered invalidly", body = Envelope),
        (status = 503, description = "Upstream protection: circuit open, too many calls in flight, or the spend-rate cap; or the shared credit ledger (Redis) is unreachable; or the signing keys of a signed token's issuer cannot be fetched; see `Retry-After`", body = Envelope,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "KeyAPI did not answer in time; or the request said `Cache-Control: only-if-cached` and no kept copy meets it (`Cache-Status: keyapi-proxy; detail=only-if-cached`: no call, no credits)", body = Envelope,
            headers(("Cache-Status" = String, description = "`keyapi-proxy; detail=only-if-cached`, or `keyapi-proxy; fwd=uri-miss; detail=timeout`"))),
    )
)]
fn proxied_route() {}

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

/// List cached keys (clients with `admin = true`).
#[utoipa::path(get, path = "/admin/cache", tag = "admin", params(AdminListQuery),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "`{count, truncated, entries: [{key, route, params, ageSecs, ttlSecs, bytes, gzipBytes}]}`", body = Object),
              (status = 400, description = "`route` names no configured route", body = Envelope),
              (status = 401, description = "No valid token", body = Envelope),
              (status = 403, description = "Token of a client without `admin = true`, or no clients configured", body = Envelope)))]
fn admin_list() {}

/// Purge one normalized key (with the route's parameters) or, with `all=true` alone, everything.
#[utoipa::path(delete, path = "/admin/cache", tag = "admin",
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "`{purged, key?}`", body = Object),
              (status = 400, description = "Invalid parameters, a parameter the purge does not take, no query, or `all=true` with a key's parameters; nothing is purged", body = Envelope),
              (status = 401, description = "No valid token", body = Envelope),
              (status = 403, description = "Token of a client without `admin = true`, or no clients configured", body = Envelope)))]
fn admin_purge() {}

/// Read the configuration file, the environment and the key file again (as `SIGHUP` does) and apply them, or change nothing.
#[utoipa::path(post, path = "/admin/reload", tag = "admin",
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "`{outcome: applied|unchanged, at, applied: [keys now in use], restartNeeded: [keys that keep their running value], keyRotated}`", body = Object),
              (status = 401, description = "No valid token", body = Envelope),
              (status = 403, description = "Token of a client without `admin = true`, or no clients configured", body = Envelope),
              (status = 422, description = "The configuration is invalid: nothing changed; the message says why", body = Envelope),
              (status = 503, description = "The proxy is stopping", body = Envelope)))]
fn admin_reload() {}

/// Credits spent and saved, calls and refusals per UTC day and payer (`client:<id>`, `issuer:<name>`, `visitors`, `warmup:<name>`, `refresh`).
#[utoipa::path(get, path = "/admin/spend", tag = "admin", params(AdminSpendQuery),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "JSON `{from, to, days: [{day, total: {creditsSpent, calls, creditsSaved, refusals}, payers: [{payer, creditsSpent, calls, creditsSaved, refusals}]}]}`, or CSV `day,payer,credits_spent,calls,credits_saved,refusals`", body = Object,
                  content((Object = "application/json"), (String = "text/csv"))),
              (status = 400, description = "A date that is not one, `from` after `to`, or a parameter it does not take", body = Envelope),
              (status = 401, description = "No valid token", body = Envelope),
              (status = 403, description = "Token of a client without `admin = true`, or no clients configured", body = Envelope),
              (status = 503, description = "The history lives in Redis, which did not answer", body = Envelope)))]
fn admin_spend() {}

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
        description = "Caching, single-flight proxy for KeyAPI's paid endpoints. Same routes and bodies as KeyAPI; the KeyAPI key is injected server-side."
    ),
    paths(proxied_route, healthz, readyz, metrics, openapi, stats, status_page, admin_list, admin_purge, admin_reload, admin_spend),
    components(schemas(Envelope)),
    modifiers(&Security),
    tags(
        (name = "proxy", description = "The proxied KeyAPI route"),
        (name = "operations", description = "Health, metrics, statistics"),
        (name = "admin", description = "Administration: cache, reload, spend history (clients with `admin = true`)"),
    )
)]
struct ApiDoc;

/// The document for this route table, as JSON bytes.
pub fn document(table: &RouteTable) -> Bytes {
    let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(doc) => doc,
        Err(_) => return Bytes::from_static(b"{}"),
    };
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    let template = doc["paths"]
        .as_object_mut()
        .and_then(|paths| paths.remove(ROUTE_TEMPLATE))
        .unwrap_or(Value::Null);
    let paths: Vec<&str> = table.routes().iter().map(|r| r.path()).collect();
    if let Some(params) = doc["paths"]["/admin/cache"]["get"]["parameters"].as_array_mut() {
        for param in params.iter_mut().filter(|p| p["name"] == "route") {
            param["schema"]["enum"] = json!(paths);
        }
    }
    if let Some(purge) = doc["paths"]["/admin/cache"].get_mut("delete") {
        purge["parameters"] = json!([purge_query(table)]);
    }
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, operations) in paths.iter_mut() {
            // Before `complete`, so the HEAD made from GET gets it (without a body).
            if !PROBE_PATHS.contains(&path.as_str()) {
                refuse_foreign_hosts(operations);
            }
            complete(operations, path != "/openapi.json");
        }
    }
    for route in table.routes() {
        let mut item = template.clone();
        let operation = &mut item["get"];
        operation["summary"] = json!(format!(
            "KeyAPI {} ({} credits per upstream call)",
            route.path(),
            route.credits()
        ));
        operation["operationId"] = json!(route.path());
        operation["parameters"] = route.params().iter().map(parameter).collect();
        refuse_foreign_hosts(&mut item);
        complete(&mut item, false);
        doc["paths"][route.path()] = item;
    }
    Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
}

/// The purge's query: `all=true` alone purges everything; otherwise `route`
/// and the route's parameters name one key; anything else is a 400. Query
/// parameters cannot depend on each
/// other, so they become the properties of one form-exploded object (the same
/// `?a=1&b=2` on the wire) whose `dependentRequired` says that any of them
/// needs the route's required parameters (exact with one route; with several,
/// the union over the routes that have the parameter).
fn purge_query(table: &RouteTable) -> Value {
    let paths: Vec<&str> = table.routes().iter().map(|r| r.path()).collect();
    let mut properties = serde_json::Map::new();
    properties.insert(
        "route".into(),
        json!({"type": "string", "enum": paths, "description": "The route (its path); may be left out with one route"}),
    );
    properties.insert(
        "all".into(),
        json!({"type": "string", "enum": ["true"], "description": "Purge everything; given alone"}),
    );
    let mut needs: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for route in table.routes() {
        let required: Vec<&str> = route
            .params()
            .iter()
            .filter(|p| p.required())
            .map(Param::name)
            .collect();
        for param in route.params() {
            let described = parameter(param);
            properties
                .entry(param.name().to_owned())
                .or_insert_with(|| described["schema"].clone());
            let needed = needs.entry(param.name().to_owned()).or_default();
            needed.extend(required.iter().filter(|r| **r != param.name()));
        }
        let route_needs = needs.entry("route".to_owned()).or_default();
        route_needs.extend(required.iter().copied());
    }
    let dependent: serde_json::Map<String, Value> = needs
        .into_iter()
        .filter(|(_, needed)| !needed.is_empty())
        .map(|(name, needed)| (name, json!(needed)))
        .collect();
    json!({
        "name": "key",
        "in": "query",
        "style": "form",
        "explode": true,
        "required": false,
        "description": "The key to purge: `route` and that route's parameters; or `all=true` alone to purge everything (no query, or another parameter, is a 400)",
        "schema": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": false,
            "properties": properties,
            "dependentRequired": dependent,
        },
    })
}

/// The 421 every path but the probes gives to a `Host` not in `server.allowed_hosts`.
fn refuse_foreign_hosts(operations: &mut Value) {
    let Some(operations) = operations.as_object_mut() else {
        return;
    };
    for operation in operations.values_mut() {
        operation["responses"]["421"] = json!({
            "description": "The `Host` is not in `server.allowed_hosts` (DNS-rebinding defence)",
            "headers": {"Cache-Control": {"description": "`no-store`", "schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
        });
    }
}

/// Fills in what only the router knows: `HEAD` next to every `GET` (axum
/// answers it), the 405 every path gives to other methods, the 403 of a
/// refused origin, and `no-store` on every `operational` answer.
fn complete(operations: &mut Value, operational: bool) {
    let Some(operations) = operations.as_object_mut() else {
        return;
    };
    for operation in operations.values_mut() {
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

/// One query parameter of a route, its schema from the parser's own rule
/// (patterns generated from the same predicates, see [`crate::route`]).
fn parameter(param: &Param) -> Value {
    let mut schema = match param.kind() {
        Kind::OneOf(values) => {
            let mut allowed: Vec<&str> = values.iter().map(String::as_str).collect();
            // Empty means the default.
            if param.default().is_some() {
                allowed.push("");
            }
            json!({ "type": "string", "enum": allowed })
        }
        Kind::Int { min, max } => {
            let mut schema = json!({ "type": "integer" });
            if *min > i64::MIN {
                schema["minimum"] = json!(min);
            }
            if *max < i64::MAX {
                schema["maximum"] = json!(max);
            }
            if param.default().is_some() {
                // Empty means the default.
                schema = json!({ "anyOf": [schema, { "type": "string", "maxLength": 0 }] });
            }
            schema
        }
        Kind::Region => json!({ "type": "string", "pattern": route::region_pattern() }),
        Kind::Hashtag => json!({
            "type": "string",
            "minLength": 1,
            "pattern": route::hashtag_pattern(),
        }),
        // Never empty: an empty text is a 400 even with a default.
        Kind::Text { max_len, .. } => json!({
            "type": "string",
            "minLength": 1,
            "maxLength": max_len,
            "pattern": route::text_pattern(),
        }),
    };
    // Integers are documented as numbers, everything else as the text sent.
    let typed = |value: &str| match param.kind() {
        Kind::Int { .. } => value.parse::<i64>().map_or(json!(value), |n| json!(n)),
        _ => json!(value),
    };
    if let Some(default) = param.default() {
        schema["default"] = typed(default);
    }
    json!({
        "name": param.name(),
        "in": "query",
        "required": param.required(),
        "description": format!("{} ({} parameter): {}", param.name(), param.kind(), param.rule()),
        "schema": schema,
        "example": typed(param.example()),
    })
}
