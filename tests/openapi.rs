//! `/openapi.json` is OpenAPI 3.1, documents every route the router serves,
//! and names exactly the parameters the route parses, with the configured
//! periods as the enum and a `hashtag_name` schema that accepts exactly what
//! the parser accepts (a property test over generated names).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeSet, sync::LazyLock};

use common::{spawn_app, spawn_app_with};
use keyapi_proxy::{
    config::{Config, ParamConfig, ParamKind},
    openapi,
    route::{self, HASHTAG_DETAIL_PATH, RouteTable},
    routes::OPERATIONAL_PATHS,
};
use proptest::prelude::*;
use regex::{Regex, RegexBuilder};
use serde_json::Value;
use unicode_normalization::UnicodeNormalization as _;

async fn document(app: &common::TestApp) -> Value {
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

fn param_names(operation: &Value) -> BTreeSet<String> {
    operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["in"], "query");
            p["name"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn document_is_openapi_3_1_and_covers_every_route() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "keyapi-proxy");
    assert!(doc["info"]["version"].is_string());
    let documented: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let served: BTreeSet<&str> = OPERATIONAL_PATHS
        .into_iter()
        .chain([HASHTAG_DETAIL_PATH])
        .collect();
    assert_eq!(documented, served);
    // Every documented schema reference resolves.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(doc["components"]["schemas"][name].is_object(), "{name}");
    }
    for path in OPERATIONAL_PATHS.into_iter().chain([HASHTAG_DETAIL_PATH]) {
        let ops = doc["paths"][path].as_object().unwrap();
        assert!(!ops.is_empty(), "{path}");
        for (method, op) in ops {
            let responses = &op["responses"];
            assert!(
                responses.as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            // Every path refuses other methods and foreign origins in the envelope.
            for status in ["403", "405"] {
                assert!(responses[status].is_object(), "{status} of {method} {path}");
            }
            // Every path but the probes refuses a foreign Host.
            let probe = matches!(path, "/healthz" | "/readyz");
            assert_eq!(
                responses["421"].is_object(),
                !probe,
                "421 of {method} {path}"
            );
            if !matches!(path, HASHTAG_DETAIL_PATH | "/openapi.json") {
                assert!(
                    responses["200"]["headers"]["Cache-Control"].is_object(),
                    "no-store of {method} {path}"
                );
            }
        }
        // GETs come with their HEAD; the admin's other methods stand alone.
        assert!(
            ["head", "delete", "post"]
                .iter()
                .any(|m| ops.contains_key(*m)),
            "{path}"
        );
    }
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn a_required_hashtag_is_documented_as_required_and_needed_by_a_purge() {
    let app = spawn_app_with(|c| {
        let hashtag = &mut c.routes[0].params[2];
        (hashtag.required, hashtag.default) = (true, None);
    })
    .await;
    let doc = document(&app).await;
    let get = &doc["paths"][HASHTAG_DETAIL_PATH]["get"];
    let hashtag = get["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hashtag_name")
        .unwrap();
    assert_eq!(hashtag["required"], true);
    assert!(hashtag["schema"]["default"].is_null());
    let purge = &doc["paths"]["/admin/cache"]["delete"]["parameters"][0];
    for name in ["route", "period", "region"] {
        assert_eq!(
            purge["schema"]["dependentRequired"][name],
            serde_json::json!(["hashtag_name"]),
            "{name}"
        );
    }
}

#[tokio::test]
async fn proxied_route_names_every_parameter_with_its_rules() {
    let app = spawn_app_with(|c| {
        let period = &mut c.routes[0].params[0];
        period.one_of = Some(vec!["7".into(), "30".into()]);
        period.default = Some("30".into());
        c.routes[0].ttl_by = None;
    })
    .await;
    let doc = document(&app).await;
    let get = &doc["paths"][HASHTAG_DETAIL_PATH]["get"];
    let expected: BTreeSet<String> = ["hashtag_name", "period", "region"]
        .map(String::from)
        .into();
    assert_eq!(param_names(get), expected);
    // A purge takes `route` and the route's parameters, or `all`, as one
    // object of at least one property and no others; `hashtag_name` has a
    // default, so no parameter needs another.
    let purge = &doc["paths"]["/admin/cache"]["delete"]["parameters"][0];
    assert_eq!(
        (&purge["in"], &purge["required"]),
        (&"query".into(), &false.into())
    );
    let properties = purge["schema"]["properties"].as_object().unwrap();
    let purged: BTreeSet<String> = properties.keys().cloned().collect();
    let mut with_route = expected.clone();
    with_route.extend(["route".into(), "all".into()]);
    assert_eq!(purged, with_route);
    assert_eq!(properties["all"]["enum"], serde_json::json!(["true"]));
    assert_eq!(purge["schema"]["minProperties"], 1);
    assert_eq!(purge["schema"]["additionalProperties"], false);
    assert_eq!(
        properties["hashtag_name"]["pattern"],
        route::hashtag_pattern()
    );
    assert_eq!(purge["schema"]["dependentRequired"], serde_json::json!({}));

    let param = |name: &str| {
        get["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    // KeyAPI's reference documents ufc324 as hashtag_name's default: so does ours.
    assert_eq!(param("hashtag_name")["required"], false);
    assert_eq!(param("hashtag_name")["schema"]["default"], "ufc324");
    assert_eq!(
        param("hashtag_name")["schema"]["minLength"],
        1,
        "empty is a 400"
    );
    assert_eq!(
        param("period")["schema"]["enum"],
        serde_json::json!(["7", "30", ""]),
        "empty means the default"
    );
    assert_eq!(param("period")["schema"]["default"], "30");
    assert_eq!(param("region")["schema"]["default"], "all_regions");
    for status in [
        "200", "304", "400", "401", "403", "404", "405", "421", "422", "429", "500", "502", "503",
        "504",
    ] {
        assert!(get["responses"][status].is_object(), "response {status}");
    }
    let head = &doc["paths"][HASHTAG_DETAIL_PATH]["head"];
    assert_eq!(param_names(head), expected);
    assert!(
        head["responses"]["200"]["content"].is_null(),
        "HEAD has no body"
    );
    assert!(head["responses"]["200"]["headers"]["ETag"].is_object());
    let not_modified = get["responses"]["304"]["headers"].as_object().unwrap();
    for name in ["ETag", "Cache-Status", "Age", "Cache-Control", "Vary"] {
        assert!(not_modified.contains_key(name), "304 header {name}");
    }
    assert_eq!(
        param("hashtag_name")["schema"]["pattern"],
        route::hashtag_pattern()
    );
    assert!(param("hashtag_name")["schema"]["maxLength"].is_null());
    let headers = get["responses"]["200"]["headers"].as_object().unwrap();
    for name in ["Cache-Status", "Age", "ETag", "X-Request-Id"] {
        assert!(headers.contains_key(name), "{name}");
    }
    let envelope = &doc["components"]["schemas"]["Envelope"]["properties"];
    for field in ["code", "message", "data", "requestId"] {
        assert!(envelope[field].is_object(), "envelope field {field}");
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert!(schemes.contains_key("bearer") && schemes.contains_key("apiKey"));
}

/// The schema of the proxied route's `name` parameter as a check on a raw
/// value: its `pattern` (and `minLength`, when given).
struct Schema {
    pattern: Regex,
    min_length: usize,
}

impl Schema {
    fn of(name: &str) -> Self {
        Self::of_in(table(), name)
    }

    fn of_in(table: &RouteTable, name: &str) -> Self {
        let doc: serde_json::Value = serde_json::from_slice(&openapi::document(table)).unwrap();
        let param = doc["paths"][HASHTAG_DETAIL_PATH]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone();
        let pattern = RegexBuilder::new(param["schema"]["pattern"].as_str().unwrap())
            .size_limit(1 << 28)
            .build()
            .unwrap();
        let min_length = param["schema"]["minLength"].as_u64().unwrap_or(0);
        Self {
            pattern,
            min_length: usize::try_from(min_length).unwrap(),
        }
    }

    fn accepts(&self, value: &str) -> bool {
        value.chars().count() >= self.min_length && self.pattern.is_match(value)
    }
}

fn table() -> &'static RouteTable {
    static TABLE: LazyLock<RouteTable> =
        LazyLock::new(|| RouteTable::from_config(&Config::defaults().unwrap()).unwrap());
    &TABLE
}

/// The default route with `hashtag_name` as a `text` parameter of at most 12 characters.
fn text_table() -> &'static RouteTable {
    static TABLE: LazyLock<RouteTable> = LazyLock::new(|| {
        let mut config = Config::defaults().unwrap();
        config.routes[0].params[2] = ParamConfig {
            name: "hashtag_name".into(),
            kind: Some(ParamKind::Text),
            required: true,
            max_len: Some(12),
            ..ParamConfig::default()
        };
        RouteTable::from_config(&config).unwrap()
    });
    &TABLE
}

/// The parser takes `query` followed by `name=<value>`, percent-encoded.
fn parser_accepts(query: &str, name: &str, value: &str) -> bool {
    parser_accepts_in(table(), query, name, value)
}

fn parser_accepts_in(table: &RouteTable, query: &str, name: &str, value: &str) -> bool {
    let encoded: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
    table.routes()[0]
        .parse(Some(&format!("{query}{name}={encoded}")))
        .is_ok()
}

/// Characters near every edge of the rules: letters and digits of several
/// scripts, combining marks, whitespace the parser trims and some it does
/// not, `#`, punctuation, emoji, anything.
fn edge_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::char::range('a', 'z'),
        2 => prop::sample::select(vec![
            '_', '#', '0', '9', 'É', 'ß', 'İ', 'ſ', 'K', 'ж', '字', '٣', '²', 'Ⅻ', '\u{0301}',
            '\u{0903}', '\u{05D0}', '\u{1F600}', '\u{20000}',
        ]),
        2 => prop::sample::select(vec![
            ' ', '\t', '\n', '\u{85}', '\u{A0}', '\u{3000}', '\u{2028}', '\u{FEFF}', '\u{200B}',
            '-', '.', '%', '+', '&', '=', '"', '\\', '\u{0}', '\u{D2402}',
        ]),
        1 => any::<char>(),
    ]
}

fn names() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(edge_char(), 0..12).prop_map(String::from_iter),
        // Around the length limit, with optional `#` and whitespace.
        (
            prop::sample::select(vec!["", " ", "#", " #", "##", "\u{3000}"]),
            prop::collection::vec(prop::char::range('a', 'z'), 95..=105),
            prop::sample::select(vec!["", " ", "\t", "_", "-"]),
        )
            .prop_map(|(pre, body, post)| format!("{pre}{}{post}", String::from_iter(body))),
        prop::collection::vec(edge_char(), 90..110).prop_map(String::from_iter),
    ]
}

fn regions() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(edge_char(), 0..4).prop_map(String::from_iter),
        // Mixed-case `all_regions`, `us`, with a character dropped, doubled or padded.
        (
            prop::sample::select(vec![
                "all_regions",
                "ALL_Regions",
                "us",
                "Fr",
                "all-regions"
            ]),
            prop::sample::select(vec!["", " ", "\u{3000}", "x", "_"]),
            any::<bool>(),
        )
            .prop_map(|(core, pad, before)| match before {
                true => format!("{pad}{core}"),
                false => format!("{core}{pad}"),
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// For text in NFC, the form the schema describes. The parser also
    /// takes the canonically equivalent decomposed spellings of the names it
    /// accepts (it normalizes to NFC first), so it accepts a superset there.
    #[test]
    fn the_documented_hashtag_schema_accepts_exactly_what_the_parser_accepts(raw in names()) {
        static SCHEMA: LazyLock<Schema> = LazyLock::new(|| Schema::of("hashtag_name"));
        let name: String = raw.nfc().collect();
        let parsed = parser_accepts("", "hashtag_name", &name);
        prop_assert_eq!(SCHEMA.accepts(&name), parsed, "hashtag_name {:?}", name);
        // A decomposed spelling is accepted exactly when its NFC form is.
        prop_assert_eq!(parser_accepts("", "hashtag_name", &raw), parsed, "hashtag_name {:?}", raw);
    }

    /// Text in NFC, up to 11 characters (within `max_len`): the schema's
    /// `pattern` refuses exactly the control and bidi characters the parser
    /// refuses.
    #[test]
    fn the_documented_text_schema_accepts_exactly_what_the_parser_accepts(
        raw in prop::collection::vec(prop_oneof![
            4 => edge_char(),
            1 => prop::sample::select(vec![
                '\u{1B}', '\u{7F}', '\u{9F}', '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}',
                '\u{202E}', '\u{2066}', '\u{2069}', '\u{200D}', '\u{05D0}',
            ]),
        ], 1..12).prop_map(String::from_iter)
    ) {
        static SCHEMA: LazyLock<Schema> =
            LazyLock::new(|| Schema::of_in(text_table(), "hashtag_name"));
        let text: String = raw.nfc().collect();
        // `minLength` counts what is sent, the parser the trimmed value: an
        // all-whitespace value is "empty" to one only, so values padded at the
        // ends are left out.
        prop_assume!(text.trim().chars().count() == text.chars().count());
        let parsed = parser_accepts_in(text_table(), "", "hashtag_name", &text);
        prop_assert_eq!(SCHEMA.accepts(&text), parsed, "text {:?}", text);
    }

    #[test]
    fn the_documented_region_schema_accepts_exactly_what_the_parser_accepts(region in regions()) {
        static SCHEMA: LazyLock<Schema> = LazyLock::new(|| Schema::of("region"));
        let parsed = parser_accepts("hashtag_name=a&", "region", &region);
        prop_assert_eq!(SCHEMA.accepts(&region), parsed, "region {:?}", region);
    }
}
