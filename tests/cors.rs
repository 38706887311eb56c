//! CORS for browser frontends: allowed origins get the headers and can read
//! the cache headers; refused origins are turned away before they can spend;
//! preflight costs nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{header, spawn_app, spawn_app_with};
use keyapi_proxy::{config::Config, route::HASHTAG_DETAIL_PATH};

const ALLOWED: &str = "https://app.example.com";
const REFUSED: &str = "https://evil.example.net";

async fn app() -> common::TestApp {
    spawn_app_with(|c| {
        c.cors.allowed_origins = vec![ALLOWED.into(), "http://localhost:3000".into()]
    })
    .await
}

async fn preflight(app: &common::TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(
            reqwest::Method::OPTIONS,
            app.url(&format!("{HASHTAG_DETAIL_PATH}?hashtag_name=ufc324")),
        )
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "GET")
        .header(
            "Access-Control-Request-Headers",
            "authorization, if-none-match",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn preflight_from_an_allowed_origin_is_answered_without_credits() {
    let app = app().await;
    let response = preflight(&app, ALLOWED).await;
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(header(h, "access-control-allow-origin"), ALLOWED);
    let methods = header(h, "access-control-allow-methods");
    assert!(
        methods.contains("GET") && methods.contains("HEAD"),
        "{methods}"
    );
    assert!(
        !methods.contains("POST") && !methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = header(h, "access-control-allow-headers").to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("x-api-key"),
        "{allowed}"
    );
    assert_eq!(header(h, "access-control-max-age"), "600");
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn preflight_from_a_refused_origin_gets_no_allow_origin() {
    let app = app().await;
    let response = preflight(&app, REFUSED).await;
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        ""
    );
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn actual_requests_expose_the_cache_headers_to_allowed_origins_only() {
    let app = app().await;
    let allowed = app
        .get_hashtag_with("hashtag_name=ufc324", &[("Origin", ALLOWED)])
        .await;
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        header(allowed.headers(), "access-control-allow-origin"),
        ALLOWED
    );
    let exposed = header(allowed.headers(), "access-control-expose-headers").to_ascii_lowercase();
    for name in ["cache-status", "age", "x-request-id"] {
        assert!(exposed.contains(name), "{name} not in {exposed}");
    }
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn a_refused_origin_is_turned_away_before_it_can_spend() {
    let app = app().await;
    // A cold key: without the check this simple GET would reach KeyAPI.
    for origin in [REFUSED, "null", "https://app.example.com.evil.net"] {
        let (status, headers, body) = common::parts(
            app.get_hashtag_with("hashtag_name=ufc324", &[("Origin", origin)])
                .await,
        )
        .await;
        assert_eq!(status, 403, "{origin}");
        assert_eq!(header(&headers, "access-control-allow-origin"), "");
        assert_eq!(header(&headers, "cache-control"), "no-store");
        let message = common::assert_envelope(&body, 403, header(&headers, "x-request-id"));
        assert!(message.contains("origin"), "{message}");
    }
    assert_eq!(app.upstream.calls(), 0);
    let metrics = app.metrics().await;
    assert_eq!(
        common::metric(&metrics, "keyapi_proxy_credits_spent_total"),
        0.0
    );

    // No Origin (a server, a same-origin page): unaffected.
    assert_eq!(app.get_hashtag("hashtag_name=ufc324").await.status(), 200);
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn an_answer_without_origin_varies_by_origin_either_way_it_is_served() {
    let app = app().await;
    // A GET without `Origin` is answered directly; a HEAD goes through the
    // CORS layer. Both say the answer depends on `Origin`.
    let get = app.get_hashtag("hashtag_name=ufc324").await;
    let head = app
        .hashtag_request(reqwest::Method::HEAD, "hashtag_name=ufc324")
        .send()
        .await
        .unwrap();
    for response in [&get, &head] {
        let vary: Vec<&str> = response
            .headers()
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(vary.contains(&"accept-encoding"), "{vary:?}");
        assert!(vary.iter().any(|v| v.contains("origin")), "{vary:?}");
    }
}

#[tokio::test]
async fn without_origins_no_cors_headers_are_sent() {
    let app = spawn_app().await;
    let response = preflight(&app, ALLOWED).await;
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        ""
    );
    assert_eq!(app.upstream.calls(), 0);
}

#[test]
fn origins_must_be_exact() {
    for bad in [
        "*",
        "app.example.com",
        "https://app.example.com/",
        "https://a.com/path",
        "ftp://a.com",
    ] {
        let mut config = Config::defaults().unwrap();
        config.cors.allowed_origins = vec![bad.into()];
        assert!(config.validate().is_err(), "{bad}");
    }
    let mut config = Config::defaults().unwrap();
    config.cors.allowed_origins = vec![ALLOWED.into(), "http://127.0.0.1:8080".into()];
    config.validate().unwrap();
}
