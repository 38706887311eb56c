//! Bad input: a 400 in the upstream's envelope, a clear message, no upstream call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{assert_envelope, header, parts, spawn_app};
use keyapi_proxy::{route::HASHTAG_DETAIL_PATH, routes::OPERATIONAL_PATHS};

#[tokio::test]
async fn every_bad_input_class_is_a_400_without_upstream_call() {
    let app = spawn_app().await;
    let long = format!("hashtag_name={}", "a".repeat(101));
    let cases = [
        ("hashtag_name=", "is empty"),
        ("hashtag_name=%20%20", "is empty"),
        ("hashtag_name=a%F3%92%90%82", "\"a\u{FFFD}\""),
        ("hashtag_name=%23", "hashtag_name"),
        ("hashtag_name=a-b", "hashtag_name"),
        ("hashtag_name=a%20b", "hashtag_name"),
        ("hashtag_name=%23%23ab", "hashtag_name"),
        ("hashtag_name=%FF%FE", "\"hashtag_name\" is not UTF-8"),
        ("hashtag_name=ab%C3", "\"hashtag_name\" is not UTF-8"),
        (long.as_str(), "hashtag_name"),
        ("hashtag_name=a&hashtag_name=b", "more than once"),
        ("hashtag_name=a&period=7&period=7", "more than once"),
        ("hashtag_name=a&region=US&region=FR", "more than once"),
        ("hashtag_name=a&period=8", "7, 30, 120, 365, 1095"),
        ("hashtag_name=a&period=seven", "7, 30, 120, 365, 1095"),
        ("hashtag_name=a&period=-7", "7, 30, 120, 365, 1095"),
        ("hashtag_name=a&region=USA", "2-letter"),
        ("hashtag_name=a&region=u1", "2-letter"),
        ("hashtag_name=a&region=%C3%9CS", "2-letter"),
    ];
    for (query, hint) in cases {
        let (status, headers, body) = parts(app.get_hashtag(query).await).await;
        assert_eq!(status, 400, "query {query:?}: {body}");
        assert_eq!(header(&headers, "content-type"), "application/json");
        let message = assert_envelope(&body, 400, header(&headers, "x-request-id"));
        assert!(
            message.contains(hint),
            "query {query:?}: message {message:?} lacks {hint:?}"
        );
        assert!(
            !message.contains('`') && !message.contains("\\u{"),
            "query {query:?}: {message:?} is not a plain sentence"
        );
    }
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn client_request_id_is_echoed_in_header_and_envelope() {
    let app = spawn_app().await;
    let response = app
        .hashtag_request(reqwest::Method::GET, "period=9")
        .header("X-Request-Id", "trace-abc.123")
        .send()
        .await
        .unwrap();
    let (status, headers, body) = parts(response).await;
    assert_eq!(status, 400);
    assert_eq!(header(&headers, "x-request-id"), "trace-abc.123");
    assert_envelope(&body, 400, "trace-abc.123");
}

#[tokio::test]
async fn insane_request_id_is_replaced() {
    let app = spawn_app().await;
    let response = app
        .hashtag_request(reqwest::Method::GET, "period=8")
        .header("X-Request-Id", "<script>alert(1)</script>")
        .send()
        .await
        .unwrap();
    let (_, headers, body) = parts(response).await;
    let id = header(&headers, "x-request-id");
    assert_ne!(id, "<script>alert(1)</script>");
    assert_eq!(id.len(), 36, "a generated id in a UUID's layout, got {id}");
    assert_envelope(&body, 400, id);
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_envelope_everywhere() {
    let app = spawn_app().await;
    let (status, headers, body) =
        parts(app.client.get(app.url("/v1/other")).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "cache-control"), "no-store");
    assert_envelope(&body, 404, header(&headers, "x-request-id"));

    for path in OPERATIONAL_PATHS.into_iter().chain([HASHTAG_DETAIL_PATH]) {
        // `/admin/reload` takes POST only; every other path GET (and HEAD).
        let (others, allowed) = match path {
            "/admin/reload" => ([reqwest::Method::GET, reqwest::Method::PUT], "POST"),
            _ => ([reqwest::Method::POST, reqwest::Method::PUT], "GET"),
        };
        for method in others {
            let response = app
                .client
                .request(method.clone(), app.url(path))
                .send()
                .await
                .unwrap();
            let (status, headers, body) = parts(response).await;
            assert_eq!(status, 405, "{method} {path}");
            assert_eq!(header(&headers, "content-type"), "application/json");
            assert_eq!(header(&headers, "cache-control"), "no-store");
            assert!(
                header(&headers, "allow").contains(allowed),
                "{method} {path}"
            );
            assert_envelope(&body, 405, header(&headers, "x-request-id"));
        }
    }
    assert_eq!(app.upstream.calls(), 0);
}
