//! Equivalent questions are one cache key, paid once; the upstream request is
//! built from the normalized key only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    TEST_API_KEY, assert_ledger_equals_bill, header, let_expire, manual_clock, parts, plain_ttl,
    spawn_app, spawn_app_with, spawn_app_with_clock,
};
use keyapi_proxy::config::{ParamConfig, ParamKind};

#[tokio::test]
async fn equivalent_queries_share_one_upstream_call() {
    let app = spawn_app().await;
    let queries = [
        "hashtag_name=%23UFC324",
        "hashtag_name=ufc324&period=7&region=ALL_REGIONS",
        "region=all_regions&hashtag_name=ufc324",
        "hashtag_name=+UfC324+&_=123&utm_source=x",
        "hashtag_name=ufc324&period=&region=",
    ];
    let mut bodies = Vec::new();
    for q in queries {
        let (status, _, body) = parts(app.get_hashtag(q).await).await;
        assert_eq!(status, 200, "query {q}");
        bodies.push(body);
    }
    assert_eq!(app.upstream.calls(), 1);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "bodies differ");
}

#[tokio::test]
async fn upstream_receives_exactly_the_normalized_request() {
    let app = spawn_app().await;
    let response = app
        .hashtag_request(
            reqwest::Method::GET,
            "hashtag_name=%23%C3%89T%C3%89&region=fr&period=30&_=1&api_key=evil",
        )
        .header("Authorization", "Bearer client-token-must-not-leak")
        .header("Cookie", "session=abc")
        .header("X-Forwarded-For", "10.0.0.1")
        .header("X-Api-Key", "client-api-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let recorded = app.upstream.requests();
    assert_eq!(recorded.len(), 1);
    let r = &recorded[0];
    assert_eq!(r.method, "GET");
    assert_eq!(
        r.path_and_query,
        "/v1/tiktok/trending/hashtag/detail?period=30&region=FR&hashtag_name=%C3%A9t%C3%A9"
    );
    let mut names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    // Exactly what reqwest adds plus our three headers: nothing from the client.
    assert_eq!(names, ["accept", "authorization", "host", "user-agent"]);
    assert_eq!(
        r.headers["authorization"],
        format!("Bearer {TEST_API_KEY}").as_str()
    );
    assert_eq!(r.headers["accept"], "application/json");
    assert_eq!(
        r.headers["user-agent"],
        format!("keyapi-proxy/{}", env!("CARGO_PKG_VERSION")).as_str()
    );
}

#[tokio::test]
async fn same_key_gives_byte_identical_upstream_requests() {
    let ttl = std::time::Duration::from_millis(1);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| plain_ttl(c, ttl)).await;
    // Past the TTL the second question misses again, from a different spelling.
    app.get_hashtag("hashtag_name=%23Cats&region=us").await;
    let_expire(&clock, ttl);
    app.get_hashtag("region=US&hashtag_name=cats&period=7")
        .await;
    let recorded = app.upstream.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].path_and_query, recorded[1].path_and_query);
    assert_eq!(recorded[0].headers, recorded[1].headers);
}

#[tokio::test]
async fn without_hashtag_name_the_question_is_ufc324_as_keyapi_answers_it() {
    let app = spawn_app().await;
    for q in [
        "",
        "period=7",
        "region=all_regions&_=1",
        "hashtag_name=UFC324",
    ] {
        let (status, headers, _) = parts(app.get_hashtag(q).await).await;
        assert_eq!(status, 200, "query {q:?}");
        assert!(!header(&headers, "cache-status").is_empty());
    }
    // One key, one paid call, asked of KeyAPI with the default spelled out.
    assert_eq!(app.upstream.calls(), 1);
    assert_eq!(
        app.upstream.requests()[0].path_and_query,
        "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=ufc324"
    );
    assert_ledger_equals_bill(&[&app]).await;
    // A blank hashtag is not a question for the default.
    for q in ["hashtag_name=", "hashtag_name=%20"] {
        let (status, _, body) = parts(app.get_hashtag(q).await).await;
        assert_eq!(status, 400, "query {q:?}");
        assert!(body.contains("\\\"hashtag_name\\\" is empty"), "{body}");
    }
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn a_required_hashtag_name_keeps_the_400() {
    let app = spawn_app_with(|c| {
        let hashtag = &mut c.routes[0].params[2];
        (hashtag.required, hashtag.default) = (true, None);
    })
    .await;
    for q in ["", "period=7"] {
        let (status, _, body) = parts(app.get_hashtag(q).await).await;
        assert_eq!(status, 400, "query {q:?}");
        assert!(
            body.contains("is required, for example hashtag_name=ufc324"),
            "{body}"
        );
    }
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn distinct_questions_are_distinct_keys() {
    let app = spawn_app().await;
    for q in [
        "hashtag_name=ufc324",
        "hashtag_name=ufc324&region=US",
        "hashtag_name=ufc324&period=30",
        "hashtag_name=ufc325",
    ] {
        assert_eq!(app.get_hashtag(q).await.status(), 200);
    }
    assert_eq!(app.upstream.calls(), 4);
}

#[tokio::test]
async fn a_text_parameter_keeps_its_case_unless_told() {
    // The hashtag as a `text` parameter without `lowercase`: case is kept.
    let app = spawn_app_with(|c| {
        c.routes[0].params[2] = ParamConfig {
            name: "hashtag_name".into(),
            kind: Some(ParamKind::Text),
            required: true,
            pattern: Some("[A-Za-z0-9_]+".into()),
            strip_prefix: Some("#".into()),
            ..ParamConfig::default()
        };
    })
    .await;
    app.get_hashtag("hashtag_name=UFC").await;
    app.get_hashtag("hashtag_name=ufc").await;
    assert_eq!(app.upstream.calls(), 2);
    assert!(
        app.upstream.requests()[0]
            .path_and_query
            .ends_with("hashtag_name=UFC")
    );
}

#[tokio::test]
async fn a_text_parameter_is_printable_utf8_in_nfc() {
    let app = spawn_app_with(|c| {
        c.routes[0].params[2] = ParamConfig {
            name: "hashtag_name".into(),
            kind: Some(ParamKind::Text),
            required: true,
            ..ParamConfig::default()
        };
    })
    .await;
    // Invalid UTF-8 (once U+FFFD: two inputs, one key), a control
    // character, bidi controls: 400s, no call.
    for (q, hint) in [
        ("hashtag_name=caf%E9", "is not UTF-8"),
        ("hashtag_name=caf%C3", "is not UTF-8"),
        ("hashtag_name=a%00b", "control or bidirectional"),
        ("hashtag_name=a%1Bb", "control or bidirectional"),
        (
            "hashtag_name=admin%E2%80%AEnimda",
            "control or bidirectional",
        ),
        (
            "hashtag_name=a%E2%81%A6b%E2%81%A9",
            "control or bidirectional",
        ),
        ("hashtag_name=%E2%80%8Fab", "control or bidirectional"),
    ] {
        let (status, _, body) = parts(app.get_hashtag(q).await).await;
        assert_eq!(status, 400, "query {q:?}: {body}");
        assert!(body.contains(hint), "query {q:?}: {body}");
    }
    assert_eq!(app.upstream.calls(), 0);
    // Composed and decomposed spellings are one key, asked in NFC.
    for q in ["hashtag_name=caf%C3%A9", "hashtag_name=cafe%CC%81"] {
        assert_eq!(app.get_hashtag(q).await.status(), 200, "query {q:?}");
    }
    assert_eq!(app.upstream.calls(), 1);
    assert!(
        app.upstream.requests()[0]
            .path_and_query
            .ends_with("hashtag_name=caf%C3%A9")
    );
}

#[tokio::test]
async fn demo_answer_echoes_the_question() {
    let app = spawn_app().await;
    let (_, headers, body) = parts(app.get_hashtag("hashtag_name=Cats&region=us").await).await;
    assert_eq!(header(&headers, "content-type"), "application/json");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], 0);
    assert_eq!(v["data"]["info"]["hashtag_name"], "cats");
    assert_eq!(v["data"]["info"]["country_info"]["id"], "US");
}

#[tokio::test]
async fn nfc_and_nfd_spellings_share_one_upstream_call() {
    let app = spawn_app().await;
    // "été" composed (U+00E9) and decomposed (e + U+0301), in either case.
    for q in [
        "hashtag_name=%C3%A9t%C3%A9",
        "hashtag_name=e%CC%81te%CC%81",
        "hashtag_name=E%CC%81TE%CC%81",
    ] {
        let (status, _, body) = parts(app.get_hashtag(q).await).await;
        assert_eq!(status, 200, "{q}: {body}");
    }
    assert_eq!(app.upstream.calls(), 1);
    assert_eq!(
        app.upstream.requests()[0].path_and_query,
        "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=%C3%A9t%C3%A9"
    );
}
