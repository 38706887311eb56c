//! Answers keep coming when KeyAPI is slow or down, and bursts never become
//! bursts of credits: stale-while-revalidate, stale-if-error, negative caching,
//! retries, the 429 hold, the circuit breaker, the caps and refresh-ahead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    assert_envelope, assert_hit, assert_ledger_equals_bill, assert_stored_miss, hang_up, header,
    join, let_expire, manual_clock, metric, plain_ttl, raw_request, spawn_app_with,
    spawn_app_with_clock,
};
use keyapi_proxy::{config::Config, demo::FakeMode};

const TTL: Duration = Duration::from_millis(200);

/// Short TTL, stale windows as given, single attempts, no breaker trips.
fn short_ttl(c: &mut Config, swr: Duration, sie: Duration) {
    c.cache.ttl = TTL;
    c.cache.stale_while_revalidate = swr;
    c.cache.stale_if_error = sie;
    c.upstream.retries = 0;
    c.upstream.breaker_failures = 1000;
    c.upstream.request_timeout = Duration::from_millis(300);
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_with_one_background_call() {
    let ttl = Duration::from_secs(1);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, Duration::from_secs(600), Duration::ZERO);
        c.cache.ttl = ttl;
        // The refresh is held while 100 requests are answered: give it time.
        c.upstream.request_timeout = Duration::from_secs(10);
    })
    .await;
    let (_, _, old_body) = app.get("hashtag_name=ufc324").await;
    let_expire(&clock, ttl);

    // Upstream held: if any of these waited for the refresh, they would hang.
    app.upstream.hold();
    let results = join(
        (0..100)
            .map(|_| app.spawn_get_hashtag("hashtag_name=ufc324"))
            .collect(),
    )
    .await;
    for (status, headers, body) in &results {
        assert_eq!(*status, 200);
        assert_eq!(body, &old_body);
        let cache_status = header(headers, "cache-status");
        // ttl is 0 or negative once stale (whole seconds past freshness).
        assert!(
            cache_status.starts_with("keyapi-proxy; hit; ttl="),
            "{cache_status}"
        );
        let ttl: i64 = cache_status
            .split("ttl=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(ttl <= 0, "{cache_status}");
        assert!(
            cache_status.ends_with("detail=stale-while-revalidate"),
            "{cache_status}"
        );
        assert!(header(headers, "age").parse::<u64>().is_ok());
    }
    app.upstream.wait_for_calls(2).await;
    app.upstream.release();
    app.state.proxy().idle().await;
    assert_eq!(app.upstream.calls(), 2, "exactly one background refresh");
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_stale_served_total"), 100.0);
    assert_eq!(metric(&text, "keyapi_proxy_credits_saved_total"), 200.0);
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 4.0);

    let (_, headers, new_body) = app.get("hashtag_name=ufc324").await;
    let cache_status = header(&headers, "cache-status");
    assert!(
        cache_status.starts_with("keyapi-proxy; hit; ttl="),
        "{cache_status}"
    );
    assert!(!cache_status.contains("detail=stale"), "{cache_status}");
    assert_ne!(new_body, old_body, "the refresh replaced the entry");
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn stale_if_error_serves_the_old_answer_when_upstream_fails() {
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, Duration::ZERO, Duration::from_secs(3600));
    })
    .await;
    let (_, _, old_body) = app.get("hashtag_name=ufc324").await;
    let_expire(&clock, TTL);

    for (mode, fwd) in [
        (FakeMode::Status(500), "fwd=stale; fwd-status=500; "),
        (FakeMode::Hang, "fwd=stale; ttl="),
        (FakeMode::Garbage, "fwd=stale; fwd-status=200; "),
        (FakeMode::Status(401), "fwd=stale; fwd-status=401; "),
    ] {
        app.upstream.set_mode(mode.clone());
        let (status, headers, body) = app.get("hashtag_name=ufc324").await;
        let cache_status = header(&headers, "cache-status");
        assert_eq!(status, 200, "{mode:?}");
        assert_eq!(body, old_body, "{mode:?}");
        assert!(cache_status.contains(fwd), "{mode:?}: {cache_status}");
        assert!(
            cache_status.ends_with("detail=stale-if-error"),
            "{cache_status}"
        );
    }
    assert_eq!(
        app.upstream.calls(),
        5,
        "every stale answer tried upstream first"
    );
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_stale_served_total"), 4.0);
    let failed = |outcome: &str| {
        metric(
            &text,
            &format!("keyapi_proxy_upstream_calls_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let failures = ["status", "timeout", "malformed", "key_rejected"].map(failed);
    assert_eq!(failures, [1.0; 4], "each failure counted by kind");

    app.upstream.set_mode(FakeMode::Normal);
    let (_, headers, body) = app.get("hashtag_name=ufc324").await;
    assert_stored_miss(&headers);
    assert_ne!(body, old_body);

    // Without a stale copy, the error as usual.
    app.upstream.set_mode(FakeMode::Status(500));
    let (status, _, _) = app.get("hashtag_name=other").await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn a_failed_background_refresh_keeps_the_old_body() {
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, Duration::from_secs(600), Duration::ZERO);
    })
    .await;
    let (_, _, old_body) = app.get("hashtag_name=ufc324").await;
    let_expire(&clock, TTL);
    for mode in [
        FakeMode::Status(500),
        FakeMode::Garbage,
        FakeMode::CodeError(7),
    ] {
        app.upstream.set_mode(mode.clone());
        let before = app.upstream.calls();
        let (status, _, body) = app.get("hashtag_name=ufc324").await;
        assert_eq!((status, &body), (200, &old_body), "{mode:?}");
        app.state.proxy().idle().await;
        assert_eq!(app.upstream.calls(), before + 1, "{mode:?}: one refresh");
    }
    let (_, headers, body) = app.get("hashtag_name=ufc324").await;
    assert_eq!(body, old_body);
    assert!(header(&headers, "cache-status").contains("stale-while-revalidate"));
}

#[tokio::test]
async fn deterministic_refusals_are_cached_briefly_and_errors_never() {
    let negative_ttl = Duration::from_secs(1);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, Duration::ZERO, Duration::from_secs(3600));
        c.cache.negative_ttl = negative_ttl;
        c.cache.negative_codes = vec![10001];
    })
    .await;
    let cases = [
        (FakeMode::CodeError(10001), 200, 1),
        (FakeMode::Status(404), 404, 1),
        (FakeMode::Status(400), 400, 1),
        (FakeMode::Status(422), 422, 1),
        (FakeMode::CodeError(5), 200, 2),
        (FakeMode::Status(500), 502, 2),
        (FakeMode::Status(401), 502, 2),
        (
            FakeMode::RateLimited {
                retry_after_secs: 0,
            },
            429,
            2,
        ),
        (FakeMode::Garbage, 502, 2),
    ];
    for (i, (mode, status, calls)) in cases.iter().enumerate() {
        app.upstream.set_mode(mode.clone());
        let before = app.upstream.calls();
        let query = format!("hashtag_name=neg{i}");
        let (first, _, body) = app.get(&query).await;
        let (second, headers, _) = app.get(&query).await;
        assert_eq!((first, second), (*status, *status), "{mode:?}: {body}");
        assert_eq!(app.upstream.calls() - before, *calls, "{mode:?}");
        if *calls == 1 {
            assert_hit(&headers);
            assert!(header(&headers, "cache-status").ends_with("detail=negative"));
        }
    }
    // Negative entries expire (no stale windows for them).
    app.upstream.set_mode(FakeMode::Normal);
    let_expire(&clock, negative_ttl);
    let (status, _, _) = app.get("hashtag_name=neg0").await;
    assert_eq!(status, 200);
}

/// `Cache-Status` of a response, for one assertion per line.
fn cache_status(headers: &reqwest::header::HeaderMap) -> String {
    header(headers, "cache-status").to_owned()
}

#[tokio::test]
async fn a_refusal_after_a_stale_success_is_paid_once_per_negative_ttl_and_keeps_it() {
    let (ttl, negative_ttl) = (Duration::from_secs(600), Duration::from_secs(60));
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, Duration::ZERO, Duration::from_secs(24 * 3600));
        c.cache.ttl = ttl;
        c.cache.negative_ttl = negative_ttl;
        c.cache.allow_client_refresh = true;
    })
    .await;
    let q = "hashtag_name=ufc324";
    let (_, _, good) = app.get(q).await;
    clock.advance(ttl + Duration::from_secs(1));

    // KeyAPI now refuses the question: ten requests, one paid call.
    app.upstream.set_mode(FakeMode::Status(404));
    for i in 0..10 {
        let (status, headers, _) = app.get(q).await;
        assert_eq!(status, 404);
        let expected = if i == 0 { "; stored" } else { "; hit; " };
        assert!(cache_status(&headers).contains(expected), "{headers:?}");
        assert!(cache_status(&headers).ends_with("detail=negative"));
    }
    assert_eq!(app.upstream.calls(), 2, "the refusal was paid once");

    // Once the refusal is over, the stale success still stands in for failures.
    clock.advance(negative_ttl);
    app.upstream.set_mode(FakeMode::Status(500));
    let (status, headers, body) = app.get(q).await;
    assert_eq!((status, &body), (200, &good));
    assert!(cache_status(&headers).ends_with("detail=stale-if-error"));
    assert_eq!(app.upstream.calls(), 3);

    // Refused again: remembered again (still keeping the success), paid once.
    app.upstream.set_mode(FakeMode::Status(404));
    for _ in 0..3 {
        assert_eq!(app.get(q).await.0, 404);
    }
    assert_eq!(app.upstream.calls(), 4);
    clock.advance(negative_ttl);
    app.upstream.set_mode(FakeMode::Status(500));
    assert_eq!(
        app.get(q).await.2,
        good,
        "the success outlived two refusals"
    );

    // A fresh success is never replaced: a forced refresh sees the refusal,
    // everyone after it the success.
    app.upstream.set_mode(FakeMode::Normal);
    let (status, _, fresh) = app.get(q).await;
    assert_eq!(status, 200);
    assert_ne!(fresh, good);
    app.upstream.set_mode(FakeMode::Status(404));
    let refreshed = app
        .get_hashtag_with(q, &[("Cache-Control", "no-cache")])
        .await;
    assert_eq!(refreshed.status(), 404);
    let (status, headers, body) = app.get(q).await;
    assert_eq!((status, &body), (200, &fresh));
    assert_hit(&headers);
    assert!(!cache_status(&headers).contains("detail="), "{headers:?}");
    assert_eq!(app.upstream.calls(), 7);
    assert_ledger_equals_bill(&[&app]).await;
}

/// One retry after a short backoff; nothing stale is served.
fn one_retry(c: &mut Config) {
    short_ttl(c, Duration::ZERO, Duration::ZERO);
    c.upstream.retries = 1;
    c.upstream.retry_backoff = Duration::from_millis(10);
}

#[tokio::test]
async fn retries_happen_only_where_they_cannot_double_charge() {
    let app = spawn_app_with(one_retry).await;
    let cases = [
        (vec![FakeMode::Status(503)], 200, 2),
        (vec![FakeMode::Status(502)], 200, 2),
        (vec![FakeMode::Status(504), FakeMode::Status(504)], 502, 2),
        (vec![FakeMode::Status(500)], 502, 1),
        (vec![FakeMode::Hang], 504, 1),
        (vec![FakeMode::Garbage], 502, 1),
        (
            vec![FakeMode::RateLimited {
                retry_after_secs: 0,
            }],
            429,
            1,
        ),
    ];
    for (i, (script, status, calls)) in cases.into_iter().enumerate() {
        let what = format!("{script:?}");
        app.upstream.script(script);
        let before = app.upstream.calls();
        let (got, _, body) = app.get(&format!("hashtag_name=retry{i}")).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(app.upstream.calls() - before, calls, "{what}");
    }
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_upstream_retries_total"), 3.0);
}

#[tokio::test]
async fn a_retry_is_not_paid_for_a_client_that_has_gone() {
    let app = spawn_app_with(|c| {
        one_retry(c);
        // The first attempt is held until the client has gone: no timeout.
        c.upstream.request_timeout = Duration::from_secs(10);
    })
    .await;
    app.upstream.script([FakeMode::Status(503)]);
    app.upstream.hold();
    let client = raw_request(&app, "hashtag_name=gone").await;
    app.upstream.wait_for_calls(1).await;
    // The client leaves while the first attempt is out.
    hang_up(client).await;
    app.upstream.release();
    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 1, "the 503 is not retried for nobody");
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_upstream_retries_total"), 0.0);

    // The control: a client that waits gets the retry.
    app.upstream.script([FakeMode::Status(503)]);
    let (status, _, body) = app.get("hashtag_name=gone").await;
    assert_eq!(status, 200, "{body}");
    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 3);
}

#[tokio::test]
async fn circuit_opens_fails_fast_half_opens_with_one_probe_and_closes() {
    let cooldown = Duration::from_secs(1);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, Duration::ZERO, Duration::ZERO);
        c.upstream.breaker_failures = 3;
        c.upstream.breaker_cooldown = cooldown;
    })
    .await;
    app.upstream.set_mode(FakeMode::Status(500));
    for i in 0..3 {
        assert_eq!(app.get(&format!("hashtag_name=a{i}")).await.0, 502);
    }
    assert_eq!(app.upstream.calls(), 3);

    // Open: fast 503 with Retry-After, no upstream call.
    let (status, headers, body) = app.get("hashtag_name=b").await;
    assert_eq!(status, 503);
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() >= 1);
    let message = assert_envelope(&body, 503, header(&headers, "x-request-id"));
    assert!(message.contains("circuit open"), "{message}");
    assert_eq!(app.upstream.calls(), 3);
    let text = app.metrics().await;
    assert_eq!(
        metric(
            &text,
            "keyapi_proxy_upstream_refused_total{reason=\"circuit_open\"}"
        ),
        1.0
    );

    // Not a moment before the cool-down is over.
    clock.advance(cooldown - Duration::from_millis(1));
    assert_eq!(app.get("hashtag_name=b").await.0, 503);
    assert_eq!(app.upstream.calls(), 3);
    // After it: exactly one probe goes through.
    clock.advance(Duration::from_millis(1));
    app.upstream.set_mode(FakeMode::Normal);
    app.upstream.hold();
    let probe = app.spawn_get_hashtag("hashtag_name=probe");
    app.upstream.wait_for_calls(4).await;
    for i in 0..4 {
        let (status, _, _) = app.get(&format!("hashtag_name=c{i}")).await;
        assert_eq!(status, 503, "half-open lets only the probe through");
    }
    app.upstream.release();
    assert_eq!(probe.await.unwrap().0, 200);

    // Closed again.
    for i in 0..3 {
        assert_eq!(app.get(&format!("hashtag_name=d{i}")).await.0, 200);
    }
    assert_eq!(app.upstream.calls(), 7);
}

#[tokio::test]
async fn max_in_flight_holds_under_500_concurrent_distinct_keys() {
    let app = spawn_app_with(|c| {
        c.upstream.max_in_flight = 8;
        c.upstream.queue_timeout = Duration::from_secs(60);
    })
    .await;
    app.upstream.set_latency(Duration::from_millis(2));
    let results = join(
        (0..500)
            .map(|i| app.spawn_get_hashtag(&format!("hashtag_name=k{i}")))
            .collect(),
    )
    .await;
    assert!(results.iter().all(|(status, _, _)| *status == 200));
    assert_eq!(app.upstream.calls(), 500);
    let max = app.upstream.max_concurrent();
    assert!(
        (1..=8).contains(&max),
        "upstream saw {max} concurrent calls"
    );
}

#[tokio::test]
async fn spend_rate_cap_refuses_misses_but_serves_hits() {
    let app = spawn_app_with(|c| {
        c.upstream.max_calls_per_minute = 2;
        c.upstream.queue_timeout = Duration::from_millis(50);
    })
    .await;
    assert_eq!(app.get("hashtag_name=a").await.0, 200);
    assert_eq!(app.get("hashtag_name=b").await.0, 200);
    let (status, headers, body) = app.get("hashtag_name=c").await;
    assert_eq!(status, 503);
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() >= 1);
    assert!(assert_envelope(&body, 503, header(&headers, "x-request-id")).contains("spend-rate"));
    assert_eq!(app.upstream.calls(), 2);
    assert_eq!(
        app.get("hashtag_name=a").await.0,
        200,
        "hits are not capped"
    );
}

#[tokio::test]
async fn upstream_429_holds_back_every_call_until_retry_after() {
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        short_ttl(c, Duration::ZERO, Duration::ZERO)
    })
    .await;
    app.upstream.set_mode(FakeMode::RateLimited {
        retry_after_secs: 1,
    });
    let (status, headers, _) = app.get("hashtag_name=a").await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), "1");
    assert!(header(&headers, "cache-status").contains("fwd-status=429"));

    app.upstream.set_mode(FakeMode::Normal);
    let (status, headers, _) = app.get("hashtag_name=b").await;
    assert_eq!(status, 429, "held back without calling");
    assert_eq!(header(&headers, "retry-after"), "1");
    assert_eq!(app.upstream.calls(), 1);

    clock.advance(Duration::from_millis(999));
    assert_eq!(app.get("hashtag_name=b").await.0, 429, "held to the end");
    clock.advance(Duration::from_millis(1));
    assert_eq!(app.get("hashtag_name=b").await.0, 200);
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn refresh_ahead_keeps_hot_keys_fresh_and_leaves_cold_keys_alone() {
    let ttl = Duration::from_secs(2);
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        plain_ttl(c, ttl);
        c.cache.refresh_ahead = 0.5;
        c.cache.refresh_ahead_min_hits = 2;
    })
    .await;
    let (_, _, hot_body) = app.get("hashtag_name=hot").await;
    app.get("hashtag_name=cold").await;
    for _ in 0..2 {
        assert_hit(&app.get("hashtag_name=hot").await.1);
    }
    app.state.proxy().idle().await;
    assert_eq!(app.upstream.calls(), 2, "young entries are not refreshed");

    // Past half the TTL: the next hit on the hot key refreshes it in the background.
    clock.advance(ttl / 2);
    for query in ["hashtag_name=cold", "hashtag_name=hot"] {
        // No client sees a miss.
        assert_hit(&app.get(query).await.1);
    }
    app.state.proxy().idle().await;
    assert_eq!(app.upstream.calls(), 3, "one refresh, for the hot key only");

    let (_, headers, body) = app.get("hashtag_name=hot").await;
    assert_hit(&headers);
    assert_ne!(body, hot_body, "served from the refreshed entry");
}
