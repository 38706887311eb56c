//! Operating behaviour: health endpoints, HEAD, TTL expiry, client refresh,
//! graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    assert_hit, assert_stored_miss, header, let_expire, manual_clock, parts, plain_ttl, spawn_app,
    spawn_app_with, spawn_app_with_clock,
};

#[tokio::test]
async fn health_endpoints_answer_without_spending_credits() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().contains_key("x-request-id"));
    }
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn head_is_served_like_get_without_a_body() {
    // A still clock: the two hits below are the same second of the entry's age.
    let app = spawn_app_with_clock(manual_clock(), |_| {}).await;
    let head = app
        .hashtag_request(reqwest::Method::HEAD, "hashtag_name=ufc324")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(head.headers(), "content-type"), "application/json");
    assert_stored_miss(head.headers());
    let length: usize = header(head.headers(), "content-length").parse().unwrap();
    assert!(head.text().await.unwrap().is_empty());

    let (status, headers, body) = parts(app.get_hashtag("hashtag_name=ufc324").await).await;
    assert_eq!(status, 200);
    assert_hit(&headers);
    assert_eq!(body.len(), length);
    assert_eq!(app.upstream.calls(), 1, "HEAD filled the cache for GET");

    // A GET takes the direct way to the handler, a HEAD the router's: one answer.
    let head = app
        .hashtag_request(reqwest::Method::HEAD, "hashtag_name=ufc324")
        .send()
        .await
        .unwrap();
    let comparable = |h: &reqwest::header::HeaderMap| {
        let mut named: Vec<(String, String)> = h
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "x-request-id" | "date"))
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        named.sort();
        named
    };
    assert_eq!(comparable(head.headers()), comparable(&headers));
}

#[tokio::test]
async fn expired_entries_are_fetched_again() {
    let ttl = Duration::from_secs(1);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| plain_ttl(c, ttl)).await;
    app.get_hashtag("hashtag_name=ufc324").await;
    clock.advance(ttl - Duration::from_millis(1));
    assert_hit(&app.get("hashtag_name=ufc324").await.1);
    assert_eq!(app.upstream.calls(), 1);
    let_expire(&clock, Duration::from_millis(1));
    assert_stored_miss(&app.get("hashtag_name=ufc324").await.1);
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn client_no_cache_is_ignored_by_default() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.hashtag_request(reqwest::Method::GET, "hashtag_name=ufc324")
            .header("Cache-Control", "no-cache")
            .send()
            .await
            .unwrap();
    }
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn client_no_cache_refreshes_when_allowed() {
    let app = spawn_app_with(|c| c.cache.allow_client_refresh = true).await;
    app.get_hashtag("hashtag_name=ufc324").await;
    let response = app
        .hashtag_request(reqwest::Method::GET, "hashtag_name=ufc324")
        .header("Cache-Control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(response.headers(), "cache-status"),
        "keyapi-proxy; fwd=request; stored"
    );
    assert_eq!(app.upstream.calls(), 2);
    let (_, headers, _) = parts(app.get_hashtag("hashtag_name=ufc324").await).await;
    assert_hit(&headers);
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let mut app = spawn_app().await;
    app.upstream.hold();
    let in_flight = app.spawn_get_hashtag("hashtag_name=ufc324");
    app.upstream.wait_for_calls(1).await;

    let server = app.begin_shutdown();
    // The drain has started (readiness flips) but the request is still held.
    assert!(!server.is_finished());
    app.upstream.release();

    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    server.await.unwrap();
    assert!(
        app.client.get(app.url("/healthz")).send().await.is_err(),
        "no longer accepting connections"
    );
}

#[tokio::test]
async fn drain_delay_keeps_serving_while_readiness_says_draining() {
    let mut app = spawn_app_with(|c| c.server.drain_delay = Duration::from_secs(2)).await;
    app.get("hashtag_name=ufc324").await;

    let server = app.begin_shutdown();
    // New connections (the client pools none) are still accepted and served,
    // but a load balancer probing readiness is told to stop sending them.
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = serde_json::from_str(&ready.text().await.unwrap()).unwrap();
    assert_eq!(ready["status"], "draining", "{ready}");
    assert_eq!(ready["apiKey"]["generation"], 1, "{ready}");
    let (status, headers, body) = app.get("hashtag_name=ufc324").await;
    assert_eq!(status, 200, "{body}");
    assert_hit(&headers);
    assert!(!server.is_finished());

    // After the delay the listener closes and the drain runs as without one.
    server.await.unwrap();
    assert!(app.client.get(app.url("/healthz")).send().await.is_err());
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let mut app = spawn_app_with(|c| c.server.shutdown_grace = Duration::from_millis(200)).await;
    app.upstream.hold();
    let stuck = app.spawn_get_hashtag("hashtag_name=ufc324");
    app.upstream.wait_for_calls(1).await;
    // The server returns after the grace period although the request never ends.
    app.begin_shutdown().await.unwrap();
    stuck.abort();
}
