//! Upstream faults map to the right status in our envelope (or KeyAPI's own
//! refusal passed through), and nothing but a success is ever cached.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{assert_envelope, header, join, parts, spawn_app_with};
use keyapi_proxy::demo::FakeMode;

/// One fault: what the fake does, what the client must see.
struct Case {
    mode: FakeMode,
    status: u16,
    cache_status: &'static str,
    /// Our envelope with this message fragment; `None` = KeyAPI's body passed through.
    ours: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let ours = |mode, status, cache_status, msg| Case {
        mode,
        status,
        cache_status,
        ours: Some(msg),
    };
    vec![
        ours(
            FakeMode::Status(500),
            502,
            "fwd-status=500",
            "upstream error (HTTP 500)",
        ),
        ours(
            FakeMode::Status(503),
            502,
            "fwd-status=503",
            "upstream error",
        ),
        ours(
            FakeMode::Hang,
            504,
            "detail=timeout",
            "did not answer in time",
        ),
        ours(FakeMode::Garbage, 502, "fwd-status=200", "invalid answer"),
        ours(
            FakeMode::Status(401),
            502,
            "fwd-status=401",
            "rejected the configured API key",
        ),
        ours(
            FakeMode::Status(403),
            502,
            "fwd-status=403",
            "rejected the configured API key",
        ),
        ours(
            FakeMode::Oversize(70_000),
            502,
            "detail=too_large",
            "too large",
        ),
        Case {
            mode: FakeMode::CodeError(10001),
            status: 200,
            cache_status: "fwd-status=200",
            ours: None,
        },
        Case {
            mode: FakeMode::Status(404),
            status: 404,
            cache_status: "fwd-status=404",
            ours: None,
        },
        ours(
            FakeMode::RateLimited {
                retry_after_secs: 0,
            },
            429,
            "fwd-status=429",
            "rate limit",
        ),
    ]
}

#[tokio::test]
async fn faults_give_the_right_answer_and_are_never_cached() {
    let app = spawn_app_with(|c| {
        c.upstream.request_timeout = Duration::from_millis(300);
        c.upstream.max_body_bytes = 64 * 1024;
        // One call per request, and no circuit breaking across the cases:
        // retries and the breaker have their own tests (resilience.rs).
        c.upstream.retries = 0;
        c.upstream.breaker_failures = 1000;
        c.cache.stale_if_error = Duration::ZERO;
        c.cache.negative_ttl = Duration::ZERO;
    })
    .await;
    for (i, case) in cases().into_iter().enumerate() {
        app.upstream.set_mode(case.mode.clone());
        let query = format!("hashtag_name=fault{i}");
        for attempt in 1..=2 {
            let (status, headers, body) = parts(app.get_hashtag(&query).await).await;
            let what = format!("{:?} attempt {attempt}: {body}", case.mode);
            assert_eq!(status, case.status, "{what}");
            assert_eq!(
                header(&headers, "content-type"),
                "application/json",
                "{what}"
            );
            assert_eq!(header(&headers, "cache-control"), "no-store", "{what}");
            let cache_status = header(&headers, "cache-status");
            assert!(
                cache_status.contains(case.cache_status),
                "{what}: {cache_status}"
            );
            match case.ours {
                Some(fragment) => {
                    let message = assert_envelope(&body, status, header(&headers, "x-request-id"));
                    assert!(message.contains(fragment), "{what}: {message}");
                }
                None => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    assert_ne!(v["code"], 0, "{what}");
                    assert!(!v["message"].as_str().unwrap().is_empty());
                }
            }
            // Every attempt went upstream again: the failure was not cached.
            assert_eq!(app.upstream.calls(), 2 * i + attempt, "{what}");
        }
    }
    // After the faults clear, the same keys are fetched and then cached.
    app.upstream.set_mode(FakeMode::Normal);
    let before = app.upstream.calls();
    for _ in 0..2 {
        let (status, _, _) = parts(app.get_hashtag("hashtag_name=fault0").await).await;
        assert_eq!(status, 200);
    }
    assert_eq!(app.upstream.calls(), before + 1);
}

#[tokio::test]
async fn a_failed_fetch_is_shared_by_its_waiters_then_forgotten() {
    let app = spawn_app_with(|_| {}).await;
    app.upstream.set_mode(FakeMode::Status(500));
    app.upstream.hold();
    let handles = (0..20)
        .map(|_| app.spawn_get_hashtag("hashtag_name=ufc324"))
        .collect();
    app.upstream.wait_for_calls(1).await;
    app.upstream.release();
    for (status, _, _) in join(handles).await {
        assert_eq!(status, 502);
    }
    assert_eq!(
        app.upstream.calls(),
        1,
        "waiters shared the one failed call"
    );

    app.upstream.set_mode(FakeMode::Normal);
    let (status, _, _) = parts(app.get_hashtag("hashtag_name=ufc324").await).await;
    assert_eq!(status, 200);
    assert_eq!(app.upstream.calls(), 2, "the next request tried again");
}

#[tokio::test]
async fn unreachable_upstream_is_a_502() {
    // A port nothing listens on.
    let (_held, closed) = common::refusing_addr();
    let app = spawn_app_with(|c| c.upstream.base_url = format!("http://{closed}")).await;
    let (status, headers, body) = parts(app.get_hashtag("hashtag_name=a").await).await;
    assert_eq!(status, 502);
    assert!(header(&headers, "cache-status").contains("detail=connect"));
    let message = assert_envelope(&body, 502, header(&headers, "x-request-id"));
    assert!(message.contains("unreachable"), "{message}");
}

#[tokio::test]
async fn an_absurd_upstream_retry_after_is_capped_at_an_hour() {
    let app = spawn_app_with(|c| c.upstream.retries = 0).await;
    app.upstream.set_mode(FakeMode::RateLimited {
        retry_after_secs: 99_999_999_999,
    });
    for query in ["hashtag_name=first", "hashtag_name=held"] {
        let response = app.get_hashtag(query).await;
        assert_eq!(response.status(), 429, "{query}");
        assert_eq!(header(response.headers(), "retry-after"), "3600", "{query}");
    }
    assert_eq!(app.upstream.calls(), 1, "the hold stops the second call");
}
