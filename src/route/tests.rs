//! The route table's unit tests: keys, refusals, TTLs and bad configurations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use super::*;
use crate::config::{Config, ParamConfig, ParamKind, RouteConfig};

fn table() -> RouteTable {
    RouteTable::from_config(&Config::defaults().unwrap()).unwrap()
}

fn key(q: &str) -> Result<String, KeyError> {
    table().routes()[0].parse(Some(q)).map(|k| k.to_string())
}

#[test]
fn equivalent_queries_share_one_key() {
    let expected =
        "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=ufc324";
    for q in [
        "hashtag_name=%23UFC324",
        "hashtag_name=ufc324&period=7&region=ALL_REGIONS",
        "region=all_regions&hashtag_name=ufc324",
        "hashtag_name=+ufc324+&_=123",
    ] {
        assert_eq!(key(q).as_deref(), Ok(expected), "query {q}");
    }
}

#[test]
fn unicode_is_lowercased_and_percent_encoded() {
    let k = key("hashtag_name=%C3%89T%C3%89&region=fr&period=30");
    assert_eq!(
        k.as_deref(),
        Ok("/v1/tiktok/trending/hashtag/detail?period=30&region=FR&hashtag_name=%C3%A9t%C3%A9")
    );
}

#[test]
fn bad_inputs_are_rejected_with_the_parameter_named() {
    let long = format!("hashtag_name={}", "a".repeat(101));
    let cases: [(&str, &str); 11] = [
        ("hashtag_name=", "\"hashtag_name\" is empty"),
        ("hashtag_name=+", "\"hashtag_name\" is empty"),
        ("hashtag_name=ab%FF", "\"hashtag_name\" is not UTF-8"),
        ("hashtag_name=%23", "\"hashtag_name\" must be"),
        ("hashtag_name=a-b", "\"hashtag_name\" must be"),
        ("hashtag_name=%23%23ab", "\"hashtag_name\" must be"),
        (&long, "\"hashtag_name\" must be"),
        (
            "hashtag_name=a&hashtag_name=b",
            "\"hashtag_name\" is given more than once",
        ),
        (
            "hashtag_name=a&period=8",
            "\"period\" must be one of 7, 30, 120, 365, 1095",
        ),
        ("hashtag_name=a&region=USA", "\"region\" must be"),
        ("hashtag_name=a&region=u1", "\"region\" must be"),
    ];
    for (q, expected) in cases {
        match key(q) {
            Err(e) => assert!(e.to_string().contains(expected), "query {q:?} gave {e}"),
            Ok(k) => panic!("query {q:?} was accepted as {k}"),
        }
    }
}

#[test]
fn without_hashtag_name_the_question_is_keyapis_default_ufc324() {
    let expected =
        "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=ufc324";
    for q in ["", "period=7", "region=ALL_REGIONS&period=", "_=1"] {
        assert_eq!(key(q).as_deref(), Ok(expected), "query {q:?}");
    }
    assert_eq!(
        table().routes()[0].parse(None).unwrap().to_string(),
        expected
    );
}

/// The default route with `hashtag_name` as a `text` parameter.
fn text_key(q: &str) -> Result<String, KeyError> {
    let mut config = Config::defaults().unwrap();
    config.routes[0].params[2] = ParamConfig {
        name: "hashtag_name".into(),
        kind: Some(ParamKind::Text),
        required: true,
        ..ParamConfig::default()
    };
    let table = RouteTable::from_config(&config).unwrap();
    table.routes()[0].parse(Some(q)).map(|k| k.to_string())
}

#[test]
fn text_is_utf8_printable_and_nfc() {
    // Two spellings of "été": one key.
    assert_eq!(
        text_key("hashtag_name=e%CC%81te%CC%81"),
        text_key("hashtag_name=%C3%A9t%C3%A9")
    );
    assert!(
        text_key("hashtag_name=%C3%A9t%C3%A9")
            .unwrap()
            .ends_with("=%C3%A9t%C3%A9")
    );
    // Invalid UTF-8 is refused, not turned into U+FFFD (which is another, valid input).
    assert!(text_key("hashtag_name=a%EF%BF%BD").is_ok());
    for bad in ["a%FF", "a%C3", "%ED%A0%80", "a%FF+b"] {
        assert_eq!(
            text_key(&format!("hashtag_name={bad}")),
            Err(KeyError::NotUtf8("hashtag_name".into())),
            "{bad}"
        );
    }
    // Control characters and bidi controls, anywhere but at the trimmed ends.
    for bad in [
        "a%00b",
        "a%09b",
        "a%0Ab",
        "a%7Fb",
        "a%C2%85b",
        "a%D8%9Cb",
        "a%E2%80%8Eb",
        "a%E2%80%8Fb",
        "a%E2%80%AAb",
        "a%E2%80%AEb",
        "a%E2%81%A6b",
        "a%E2%81%A9b",
    ] {
        assert_eq!(
            text_key(&format!("hashtag_name={bad}")),
            Err(KeyError::Unprintable("hashtag_name".into())),
            "{bad}"
        );
    }
    // Not bidi controls: a zero-width joiner (emoji) and a right-to-left letter.
    assert!(text_key("hashtag_name=a%E2%80%8Db").is_ok());
    assert!(text_key("hashtag_name=%D7%90").is_ok());
    // An invalid value of an unknown parameter is ignored, like the parameter.
    assert!(key("hashtag_name=a&x=%FF").is_ok());
}

#[test]
fn ttl_follows_the_period_and_the_daily_boundary() {
    let table = table();
    let route = &table.routes()[0];
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 3_600);
    let week = route.parse(Some("hashtag_name=a")).unwrap();
    let years = route.parse(Some("hashtag_name=a&period=1095")).unwrap();
    assert_eq!(route.ttl(&week, now), Duration::from_secs(3600));
    assert_eq!(route.ttl(&years, now), Duration::from_secs(24 * 3600));
    let offset = Duration::from_secs(1800);
    // 01:00 UTC: the next 00:30 is 23.5 h away; at 00:10 it is 20 min away.
    assert_eq!(
        until_next_daily_boundary(now, offset),
        Duration::from_secs(23 * 3600 + 1800)
    );
    let early = now - Duration::from_secs(3000);
    assert_eq!(
        until_next_daily_boundary(early, offset),
        Duration::from_secs(1200)
    );
}

#[test]
fn canonically_equivalent_spellings_share_one_key() {
    let composed = key("hashtag_name=%C3%A9t%C3%A9"); // é as U+00E9
    for q in [
        "hashtag_name=e%CC%81te%CC%81", // e + U+0301 (NFD)
        "hashtag_name=E%CC%81TE%CC%81", // upper-case NFD
        "hashtag_name=%C3%89T%C3%89",   // upper-case NFC
    ] {
        assert_eq!(key(q), composed, "query {q}");
    }
    // Fullwidth letters are compatibility forms: a different key, by design.
    assert_ne!(key("hashtag_name=%EF%BC%B5FC"), key("hashtag_name=ufc"));
}

#[test]
fn exactly_100_characters_is_accepted() {
    let q = format!("hashtag_name={}", "é".repeat(100));
    assert!(key(&q).is_ok());
}

#[test]
fn bad_routes_are_refused_naming_the_route_and_the_field() {
    let config = Config::defaults().unwrap();
    let defaults = RouteDefaults {
        credits: 2,
        ttl: config.cache.ttl,
        policy: config.cache.freshness_policy(),
    };
    let route = |params: Vec<ParamConfig>| RouteConfig {
        path: "/v1/x".into(),
        credits: Some(1),
        ttl: None,
        ttl_by: None,
        freshness: None,
        daily_offset: None,
        stale_while_revalidate: None,
        stale_if_error: None,
        negative_ttl: None,
        params,
    };
    let param = |name: &str, kind: ParamKind| ParamConfig {
        name: name.into(),
        kind: Some(kind),
        ..ParamConfig::default()
    };
    let compile = |routes: Vec<RouteConfig>| {
        RouteTable::compile(&routes, &defaults)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        compile(vec![route(vec![]), route(vec![])]),
        "routes[1] (/v1/x): path: the same path is configured twice"
    );
    let mut bad_default = param("page", ParamKind::Int);
    (bad_default.min, bad_default.max) = (Some(1), Some(50));
    bad_default.default = Some("0".into());
    assert_eq!(
        compile(vec![route(vec![bad_default])]),
        "routes[0] (/v1/x): params[0] (page): default: \"0\" is not an integer from 1 to 50"
    );
    let mut free = route(vec![]);
    free.credits = Some(0);
    assert!(compile(vec![free]).contains("credits: must be at least 1"));
}
