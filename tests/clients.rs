//! Client tokens: with `[[clients]]` configured, a request needs a valid token
//! (Bearer or X-Api-Key); the config holds only hashes; tokens never go upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    TEST_API_KEY, assert_envelope, assert_hit, client, header, metric, parts, spawn_app,
    spawn_app_with,
};
use keyapi_proxy::{config::Config, digest};

const TOKEN_A: &str = "kp_token-of-team-a";
const TOKEN_B: &str = "kp_token-of-team-b";

async fn app_with_two_clients() -> common::TestApp {
    spawn_app_with(|c| {
        c.clients = vec![client("team-a", TOKEN_A), client("team-b", TOKEN_B)];
    })
    .await
}

#[tokio::test]
async fn missing_or_wrong_tokens_get_401_and_cost_nothing() {
    let app = app_with_two_clients().await;
    let q = "hashtag_name=ufc324";
    let requests = [
        app.hashtag_request(reqwest::Method::GET, q),
        app.hashtag_request(reqwest::Method::GET, q)
            .bearer_auth("kp_wrong"),
        app.hashtag_request(reqwest::Method::GET, q)
            .header("X-Api-Key", "kp_wrong"),
        app.hashtag_request(reqwest::Method::GET, q)
            .basic_auth(TOKEN_A, None::<&str>),
        // The hash itself is not a token.
        app.hashtag_request(reqwest::Method::GET, q)
            .bearer_auth(digest::hex(&digest::sha256(TOKEN_A.as_bytes()))),
        // Bad input without a token is still a 401 (auth comes first).
        app.hashtag_request(reqwest::Method::GET, "period=8"),
    ];
    for request in requests {
        let (status, headers, body) = parts(
            request
                .header("X-Request-Id", "r-401")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(header(&headers, "www-authenticate"), "Bearer");
        let message = assert_envelope(&body, 401, "r-401");
        assert!(message.contains("X-Api-Key"), "{message}");
    }
    assert_eq!(app.upstream.calls(), 0);
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 0.0);
}

#[tokio::test]
async fn right_tokens_are_served_by_either_header() {
    let app = app_with_two_clients().await;
    let (status, headers, _) =
        parts(app.get_hashtag_as(TOKEN_A, "hashtag_name=ufc324").await).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "cache-status").ends_with("stored"));
    let response = app
        .get_hashtag_with("hashtag_name=ufc324", &[("X-Api-Key", TOKEN_B)])
        .await;
    assert_eq!(response.status(), 200);
    assert_hit(response.headers());
    assert_eq!(app.upstream.calls(), 1, "clients share the cache");

    let text = app.metrics().await;
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_client_requests_total{client=\"team-a\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_client_requests_total{client=\"team-b\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn client_tokens_are_never_forwarded_upstream() {
    let app = app_with_two_clients().await;
    app.get_hashtag_as(TOKEN_A, "hashtag_name=one").await;
    app.get_hashtag_with("hashtag_name=two", &[("X-Api-Key", TOKEN_B)])
        .await;
    let recorded = app.upstream.requests();
    assert_eq!(recorded.len(), 2);
    for request in recorded {
        assert_eq!(
            request.headers["authorization"],
            format!("Bearer {TEST_API_KEY}").as_str()
        );
        assert!(!request.headers.contains_key("x-api-key"));
        for (name, value) in &request.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains("kp_token"),
                "client token forwarded in {name}: {value}"
            );
        }
        assert!(!request.path_and_query.contains("kp_token"));
    }
}

async fn no_cache_as(app: &common::TestApp, token: &str) -> reqwest::Response {
    let bearer = format!("Bearer {token}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Cache-Control", "no-cache"),
    ];
    app.get_hashtag_with("hashtag_name=ufc324", &headers).await
}

#[tokio::test]
async fn the_refresh_flag_lets_one_client_force_a_refetch() {
    let app = spawn_app_with(|c| {
        let mut refresher = client("refresher", TOKEN_A);
        refresher.refresh = true;
        c.clients = vec![refresher, client("plain", TOKEN_B)];
    })
    .await;
    let q = "hashtag_name=ufc324";
    app.get_hashtag_as(TOKEN_A, q).await;
    let plain = no_cache_as(&app, TOKEN_B).await;
    assert_hit(plain.headers());
    assert_eq!(app.upstream.calls(), 1);
    let refreshed = no_cache_as(&app, TOKEN_A).await;
    assert_eq!(
        header(refreshed.headers(), "cache-status"),
        "keyapi-proxy; fwd=request; stored"
    );
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn without_clients_the_proxy_is_open_and_health_needs_no_token() {
    let app = spawn_app().await;
    assert_eq!(app.get_hashtag("hashtag_name=ufc324").await.status(), 200);
    let app = app_with_two_clients().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[test]
fn configuration_holds_hashes_not_tokens() {
    let mut config = Config::defaults().unwrap();
    for bad in ["", "abc", TOKEN_A, &"z".repeat(64)] {
        config.clients = vec![client("a", TOKEN_A)];
        config.clients[0].token_sha256 = bad.into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("hash-token"), "{err}");
    }
    config.clients = vec![client("a", TOKEN_A), client("a", TOKEN_B)];
    assert!(config.validate().unwrap_err().to_string().contains("twice"));
    config.clients = vec![client("a b", TOKEN_A)];
    assert!(config.validate().is_err());
    config.clients = vec![client("a", TOKEN_A), client("b", TOKEN_A)];
    assert!(config.validate().is_err());
}

#[tokio::test]
async fn hash_token_prints_a_token_that_authenticates() {
    let out = common::binary::run_binary(&["hash-token"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap()
    };
    let (token, hash) = (field("token:"), field("token_sha256:"));
    assert_eq!(hash, digest::hex(&digest::sha256(token.as_bytes())));
    assert!(text.contains(&format!("token_sha256 = \"{hash}\"")));

    let app = spawn_app_with(|c| {
        let mut entry = client("new", "unused");
        entry.token_sha256 = hash.clone();
        c.clients = vec![entry];
    })
    .await;
    assert_eq!(
        app.get_hashtag_as(&token, "hashtag_name=x").await.status(),
        200
    );
}
