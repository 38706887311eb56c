//! `GET /metrics` moves exactly as the traffic says: every app has its own
//! registry, so these numbers are exact even with tests running in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{hang_up, header, join, logs, metric, raw_request, spawn_app};
use keyapi_proxy::{demo::FakeMode, route::HASHTAG_DETAIL_PATH};

fn requests(route: &str, status: u16, cache: &str) -> String {
    format!(
        "keyapi_proxy_requests_total{{route=\"{route}\",status=\"{status}\",cache=\"{cache}\"}}"
    )
}

#[tokio::test]
async fn n_hits_save_two_credits_each() {
    let app = spawn_app().await;
    const N: usize = 7;
    app.get_hashtag("hashtag_name=ufc324").await;
    for _ in 0..N {
        assert_eq!(
            app.get_hashtag("hashtag_name=%23UFC324").await.status(),
            200
        );
    }

    let text = app.metrics().await;
    assert_eq!(app.upstream.calls(), 1);
    assert_eq!(metric(&text, "keyapi_proxy_cache_hits_total"), N as f64);
    assert_eq!(metric(&text, "keyapi_proxy_cache_misses_total"), 1.0);
    assert_eq!(
        metric(&text, "keyapi_proxy_credits_saved_total"),
        2.0 * N as f64
    );
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 2.0);
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_upstream_calls_total{outcome=\"success\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "keyapi_proxy_upstream_latency_seconds_count"),
        1.0
    );
    assert_eq!(metric(&text, "keyapi_proxy_upstream_in_flight"), 0.0);
    assert_eq!(
        metric(&text, &requests(HASHTAG_DETAIL_PATH, 200, "hit")),
        N as f64
    );
    assert_eq!(
        metric(&text, &requests(HASHTAG_DETAIL_PATH, 200, "stored")),
        1.0
    );
    assert_eq!(metric(&text, "keyapi_proxy_cache_entries"), 1.0);
    assert!(metric(&text, "keyapi_proxy_cache_bytes") > 0.0);
}

#[tokio::test]
async fn collapsed_waiters_are_counted_as_saved() {
    let app = spawn_app().await;
    app.upstream.hold();
    let handles: Vec<_> = (0..20)
        .map(|_| app.spawn_get_hashtag("hashtag_name=ufc324"))
        .collect();
    app.upstream.wait_for_calls(1).await;
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_upstream_in_flight"), 1.0);
    app.upstream.release();
    let results = join(handles).await;
    let count = |suffix: &str| {
        results
            .iter()
            .filter(|(_, h, _)| header(h, "cache-status").ends_with(suffix))
            .count() as f64
    };
    let (stored, collapsed) = (count("stored"), count("collapsed"));
    let hits = 20.0 - stored - collapsed;

    let text = app.metrics().await;
    assert_eq!(app.upstream.calls(), 1);
    assert_eq!(stored, 1.0);
    assert_eq!(metric(&text, "keyapi_proxy_collapsed_total"), collapsed);
    assert_eq!(metric(&text, "keyapi_proxy_cache_hits_total"), hits);
    assert_eq!(
        metric(&text, "keyapi_proxy_cache_misses_total"),
        1.0 + collapsed
    );
    assert_eq!(
        metric(&text, "keyapi_proxy_credits_saved_total"),
        2.0 * 19.0
    );
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 2.0);
    assert_eq!(metric(&text, "keyapi_proxy_upstream_in_flight"), 0.0);
}

#[tokio::test]
async fn bad_input_and_other_routes_cost_nothing() {
    let app = spawn_app().await;
    assert_eq!(app.get_hashtag("period=8").await.status(), 400);
    let missing = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    app.client.get(app.url("/healthz")).send().await.unwrap();

    let text = app.metrics().await;
    assert_eq!(
        metric(&text, &requests(HASHTAG_DETAIL_PATH, 400, "none")),
        1.0
    );
    assert_eq!(metric(&text, &requests("unmatched", 404, "none")), 1.0);
    assert_eq!(metric(&text, &requests("/healthz", 200, "none")), 1.0);
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 0.0);
    assert_eq!(metric(&text, "keyapi_proxy_credits_saved_total"), 0.0);
    assert_eq!(metric(&text, "keyapi_proxy_cache_misses_total"), 0.0);
}

#[tokio::test]
async fn failed_upstream_calls_are_counted_and_priced_by_outcome() {
    let app = spawn_app().await;
    app.upstream.set_mode(FakeMode::Status(500));
    assert_eq!(app.get_hashtag("hashtag_name=a").await.status(), 502);
    app.upstream.set_mode(FakeMode::CodeError(3));
    assert_eq!(app.get_hashtag("hashtag_name=b").await.status(), 200);

    let text = app.metrics().await;
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_upstream_calls_total{outcome=\"status\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_upstream_calls_total{outcome=\"declined\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 4.0);
    assert_eq!(
        metric(&text, &requests(HASHTAG_DETAIL_PATH, 502, "error")),
        1.0
    );
    assert_eq!(
        metric(&text, &requests(HASHTAG_DETAIL_PATH, 200, "declined")),
        1.0
    );
    assert_eq!(metric(&text, "keyapi_proxy_cache_entries"), 0.0);
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_is_logged_and_counted_as_499() {
    logs::captured();
    let app = spawn_app().await;
    app.upstream.hold();
    let client = raw_request(&app, "hashtag_name=left_early").await;
    app.upstream.wait_for_calls(1).await;
    hang_up(client).await;

    let text = app.metrics().await;
    let left = requests(HASHTAG_DETAIL_PATH, 499, "none");
    assert_eq!(metric(&text, &left), 1.0, "{text}");
    let logs = logs::text();
    let line = logs
        .lines()
        .find(|line| line.contains("status=499"))
        .unwrap_or_else(|| panic!("no 499 line in:\n{logs}"));
    assert!(line.contains(HASHTAG_DETAIL_PATH), "{line}");
    assert!(line.contains("request_id="), "{line}");
    app.upstream.release();
}

#[tokio::test]
async fn labels_never_carry_hashtags() {
    let app = spawn_app().await;
    app.get_hashtag("hashtag_name=secretcampaign42").await;
    app.get_hashtag("hashtag_name=secretcampaign42").await;
    let text = app.metrics().await;
    assert!(!text.contains("secretcampaign42"), "{text}");
}

/// `GET /metrics` with `Accept: <accept>`: (content type, body).
async fn scrape(app: &common::TestApp, accept: Option<&str>) -> (String, String) {
    let mut request = app.client.get(app.url("/metrics"));
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "cache-control"), "no-store");
    let content_type = header(response.headers(), "content-type").to_owned();
    (content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_speak_prometheus_text_unless_openmetrics_is_preferred() {
    let app = spawn_app().await;
    app.get_hashtag("hashtag_name=ufc324").await;
    const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    // What Prometheus sends: OpenMetrics first, text as a fallback.
    const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    for (accept, expected) in [
        (None, TEXT),
        (Some("*/*"), TEXT),
        (Some("text/plain;version=0.0.4"), TEXT),
        (Some("text/plain, application/openmetrics-text"), TEXT),
        (Some("application/openmetrics-text;q=0"), TEXT),
        (Some("application/openmetrics-text"), OPENMETRICS),
        (Some(PROMETHEUS), OPENMETRICS),
    ] {
        let (content_type, body) = scrape(&app, accept).await;
        assert_eq!(content_type, expected, "Accept: {accept:?}");
        assert_eq!(body.ends_with("# EOF\n"), expected == OPENMETRICS);
    }

    // In 0.0.4 every HELP and TYPE names the family's samples (`_total` for
    // counters), which is what `promtool check metrics` looks for.
    let (_, text) = scrape(&app, None).await;
    for line in text.lines().filter(|l| l.starts_with("# HELP ")) {
        let name = line.split(' ').nth(2).unwrap();
        let typed = format!("# TYPE {name} ");
        let kind = text.lines().find_map(|l| l.strip_prefix(&typed)).unwrap();
        assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
    }
    assert!(text.contains(
        "# TYPE keyapi_proxy_credits_spent_total counter\nkeyapi_proxy_credits_spent_total 2\n"
    ));
}
