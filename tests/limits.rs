//! Rate limits and daily credit budgets, per client and global: they trip at
//! the right count, answer 429 with Retry-After and the envelope, budgets
//! still serve cache hits, and everything resets as the (injected) clock
//! moves — no sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use common::{
    TestApp, assert_envelope, assert_hit, client, header, metric, parts, spawn_app_with_clock,
};
use keyapi_proxy::{clock::ManualClock, config::Config};

const DAY: u64 = 24 * 3600;
const TOKEN: &str = "kp_limited-client";
const OTHER: &str = "kp_other-client";

/// A clock 60 s before a UTC midnight.
fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(20_000 * DAY - 60),
    ))
}

async fn spawn(clock: &Arc<ManualClock>, adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with_clock(clock.clone(), adjust).await
}

async fn status_as(
    app: &TestApp,
    token: &str,
    query: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let request = app
        .hashtag_request(reqwest::Method::GET, query)
        .bearer_auth(token)
        .header("X-Request-Id", "limit-test");
    parts(request.send().await.unwrap()).await
}

#[tokio::test]
async fn client_rate_limit_trips_after_its_burst_and_refills() {
    let clock = clock();
    let app = spawn(&clock, |c| {
        let mut limited = client("limited", TOKEN);
        limited.rate_per_minute = Some(3);
        c.clients = vec![limited, client("other", OTHER)];
    })
    .await;
    for _ in 0..3 {
        assert_eq!(status_as(&app, TOKEN, "hashtag_name=a").await.0, 200);
    }
    let (status, headers, body) = status_as(&app, TOKEN, "hashtag_name=a").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(header(&headers, "retry-after"), "20");
    let message = assert_envelope(&body, 429, "limit-test");
    assert!(message.contains("this client's rate limit"), "{message}");
    // Another client is not affected.
    assert_eq!(status_as(&app, OTHER, "hashtag_name=a").await.0, 200);

    clock.advance(Duration::from_secs(20));
    assert_eq!(status_as(&app, TOKEN, "hashtag_name=a").await.0, 200);
    assert_eq!(status_as(&app, TOKEN, "hashtag_name=a").await.0, 429);

    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "keyapi_proxy_rate_limited_total{scope=\"client\"}"),
        2.0
    );
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn global_rate_limit_covers_everyone() {
    let clock = clock();
    let app = spawn(&clock, |c| {
        c.rate_limit.per_minute = 60;
        c.rate_limit.burst = 2;
    })
    .await;
    assert_eq!(app.get_hashtag("hashtag_name=a").await.status(), 200);
    assert_eq!(app.get_hashtag("hashtag_name=b").await.status(), 200);
    let (status, headers, body) = parts(app.get_hashtag("hashtag_name=c").await).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), "1");
    assert!(body.contains("the proxy's rate limit"), "{body}");
    clock.advance(Duration::from_secs(1));
    assert_eq!(app.get_hashtag("hashtag_name=c").await.status(), 200);
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "keyapi_proxy_rate_limited_total{scope=\"global\"}"),
        1.0
    );
    assert_eq!(app.upstream.calls(), 3);
}

#[tokio::test]
async fn client_budget_refuses_misses_serves_hits_and_resets_at_utc_midnight() {
    let clock = clock();
    let app = spawn(&clock, |c| {
        let mut budgeted = client("budgeted", TOKEN);
        budgeted.daily_budget = Some(4);
        c.clients = vec![budgeted, client("other", OTHER)];
    })
    .await;
    assert_eq!(status_as(&app, TOKEN, "hashtag_name=one").await.0, 200);
    assert_eq!(status_as(&app, TOKEN, "hashtag_name=two").await.0, 200);
    let (status, headers, body) = status_as(&app, TOKEN, "hashtag_name=three").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(header(&headers, "retry-after"), "60", "until 00:00 UTC");
    let message = assert_envelope(&body, 429, "limit-test");
    assert!(
        message.contains("daily credit budget (4 credits)"),
        "{message}"
    );
    // Hits cost nothing and are still served, for as long as they are cached.
    for _ in 0..5 {
        let (status, headers, _) = status_as(&app, TOKEN, "hashtag_name=one").await;
        assert_eq!(status, 200);
        assert_hit(&headers);
    }
    // Another client has its own (absent) budget.
    assert_eq!(status_as(&app, OTHER, "hashtag_name=three").await.0, 200);
    assert_eq!(app.upstream.calls(), 3);

    clock.advance(Duration::from_secs(60));
    assert_eq!(status_as(&app, TOKEN, "hashtag_name=four").await.0, 200);
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "keyapi_proxy_budget_refused_total{scope=\"client\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_client_credits_spent_total{client=\"budgeted\"}"
        ),
        6.0
    );
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_client_credits_spent_total{client=\"other\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn global_budget_refuses_misses_of_everyone() {
    let clock = clock();
    let app = spawn(&clock, |c| c.credits.daily_budget = 2).await;
    assert_eq!(app.get_hashtag("hashtag_name=one").await.status(), 200);
    let (status, headers, body) = parts(app.get_hashtag("hashtag_name=two").await).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), "60");
    assert!(body.contains("the proxy's daily credit budget"), "{body}");
    assert_eq!(app.get_hashtag("hashtag_name=one").await.status(), 200);
    assert_eq!(app.upstream.calls(), 1);
    clock.advance(Duration::from_secs(60));
    assert_eq!(app.get_hashtag("hashtag_name=two").await.status(), 200);
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn collapsed_waiters_and_hits_are_not_charged() {
    let clock = clock();
    let app = spawn(&clock, |c| c.credits.daily_budget = 4).await;
    let shared = |_| common::hashtag_path("hashtag_name=shared");
    for (status, _, body) in common::stampede(&[&app], 10, shared, 1).await {
        // Joining a fetch in flight is free and never refused by a budget.
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(app.upstream.calls(), 1);
    // 2 of 4 credits spent: exactly one more miss fits.
    assert_eq!(app.get_hashtag("hashtag_name=next").await.status(), 200);
    assert_eq!(app.get_hashtag("hashtag_name=last").await.status(), 429);
}
