//! A client's freshness directives, within the proxy's own policy:
//! `only-if-cached` answers from any kept copy (fresh, stale within its
//! windows, a cached refusal, another replica's in Redis) or 504, and never
//! calls or spends; `max-age` / `min-fresh` refetch a fresh copy only for a
//! client that may refresh; `max-stale` takes stale copies within the windows
//! without a call and refuses staler ones. Time moves on the app's clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    Parts, TestApp, assert_envelope, assert_hit, assert_ledger_equals_bill, assert_stored_miss,
    client, cluster::Cluster, header, manual_clock, metric, parts, spawn_app_with,
    spawn_app_with_clock,
};
use keyapi_proxy::{config::Config, demo::FakeMode, route::HASHTAG_DETAIL_PATH};

const Q: &str = "hashtag_name=ufc324";
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Fresh 1 min, stale-while-revalidate 1 min, stale-if-error 1 h; one attempt per call.
fn windows(c: &mut Config) {
    c.cache.ttl = MINUTE;
    c.cache.stale_while_revalidate = MINUTE;
    c.cache.stale_if_error = HOUR;
    c.upstream.retries = 0;
    c.upstream.breaker_failures = 1000;
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `GET <route>?<query>` with `Cache-Control: <directives>`, as `token`'s client if given.
async fn ask(app: &TestApp, token: Option<&str>, query: &str, directives: &str) -> Parts {
    let mut request = app
        .hashtag_request(reqwest::Method::GET, query)
        .header("Cache-Control", directives);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    parts(request.send().await.expect("request reaches the proxy")).await
}

/// Asserts a 504 `only-if-cached` answer: our envelope, nothing stored downstream.
fn assert_not_cached((status, headers, body): &Parts) {
    assert_eq!(*status, 504, "{body}");
    assert_eq!(
        header(headers, "cache-status"),
        "keyapi-proxy; detail=only-if-cached"
    );
    assert_eq!(header(headers, "cache-control"), "no-store");
    let message = assert_envelope(body, 504, header(headers, "x-request-id"));
    assert!(message.contains("only-if-cached"), "{message}");
}

#[tokio::test]
async fn only_if_cached_on_a_cold_key_is_a_504_that_calls_and_spends_nothing() {
    let app = spawn_app_with(|c| c.credits.daily_budget = 100).await;

    assert_not_cached(&ask(&app, None, Q, "only-if-cached").await);
    assert_not_cached(&ask(&app, None, Q, "max-age=5, Only-If-Cached").await);
    assert_eq!(app.upstream.calls(), 0);
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 0.0);
    let not_cached = format!(
        "keyapi_proxy_requests_total{{route=\"{HASHTAG_DETAIL_PATH}\",status=\"504\",cache=\"not_cached\"}}"
    );
    assert_eq!(metric(&text, &not_cached), 2.0);

    // Once a request without it has stored the answer, it is a hit.
    let (_, _, stored) = app.get(Q).await;
    let (status, headers, body) = ask(&app, None, "hashtag_name=%23UFC324", "only-if-cached").await;
    assert_eq!((status, body), (200, stored));
    assert_hit(&headers);
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!((calls, credits), (1, 2));
}

#[tokio::test]
async fn only_if_cached_serves_any_kept_copy_and_starts_no_refresh() {
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        windows(c);
        c.cache.negative_ttl = MINUTE;
    })
    .await;
    let (_, _, stored) = app.get(Q).await;

    // (time since the last step, Cache-Status): fresh, stale-while-revalidate,
    // kept only for stale-if-error. The same bytes each time, no call.
    let steps = [
        (secs(30), "keyapi-proxy; hit; ttl=30"),
        (
            secs(40),
            "keyapi-proxy; hit; ttl=-10; detail=only-if-cached",
        ),
        (
            secs(590),
            "keyapi-proxy; hit; ttl=-600; detail=only-if-cached",
        ),
    ];
    for (wait, cache_status) in steps {
        clock.advance(wait);
        let (status, headers, body) = ask(&app, None, Q, "only-if-cached").await;
        assert_eq!((status, &body), (200, &stored), "{cache_status}");
        assert_eq!(header(&headers, "cache-status"), cache_status);
        app.state.proxy().idle().await;
        assert_eq!(app.upstream.calls(), 1, "no call, nor a background refresh");
    }
    // Past its windows nothing is kept.
    clock.advance(HOUR);
    assert_not_cached(&ask(&app, None, Q, "only-if-cached").await);

    // A cached refusal is a kept copy too.
    app.upstream.set_mode(FakeMode::Status(404));
    let (status, _, refusal) = app.get("hashtag_name=unknown").await;
    assert_eq!(status, 404);
    let (status, headers, body) = ask(&app, None, "hashtag_name=unknown", "only-if-cached").await;
    assert_eq!((status, body), (404, refusal));
    assert!(header(&headers, "cache-status").ends_with("; detail=negative"));
    assert_eq!(app.upstream.calls(), 2);
    assert_ledger_equals_bill(&[&app]).await;
}

#[tokio::test]
async fn max_age_and_min_fresh_refetch_a_fresh_copy_only_for_a_client_that_may_refresh() {
    const MAY: &str = "kp_directives_may_refresh";
    const PLAIN: &str = "kp_directives_plain";
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |c| {
        windows(c);
        let mut may = client("may", MAY);
        may.refresh = true;
        c.clients = vec![may, client("plain", PLAIN)];
    })
    .await;
    let (_, _, first) = parts(app.get_hashtag_as(PLAIN, Q).await).await;
    clock.advance(secs(20));

    // A client that may not refresh gets the fresh copy whatever it says:
    // its directives cannot make the proxy spend on a fresh key.
    for directives in ["max-age=0", "max-age=10", "min-fresh=50", "no-cache"] {
        let (status, headers, body) = ask(&app, Some(PLAIN), Q, directives).await;
        assert_eq!((status, &body), (200, &first), "{directives}");
        assert_eq!(
            header(&headers, "cache-status"),
            "keyapi-proxy; hit; ttl=40"
        );
    }
    // One that may: a copy within its bounds answers ...
    for directives in ["max-age=20", "min-fresh=40", "max-age=30, min-fresh=1"] {
        let (_, headers, body) = ask(&app, Some(MAY), Q, directives).await;
        assert_eq!(body, first, "{directives}");
        assert_eq!(
            header(&headers, "cache-status"),
            "keyapi-proxy; hit; ttl=40"
        );
    }
    assert_eq!(app.upstream.calls(), 1);
    // ... one older than max-age (or fresh for less than min-fresh) is
    // refetched, charged to that client.
    let (status, headers, second) = ask(&app, Some(MAY), Q, "max-age=0").await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; fwd=request; stored"
    );
    assert_ne!(second, first);
    clock.advance(secs(1));
    let (_, headers, _) = ask(&app, Some(MAY), Q, "min-fresh=60").await;
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; fwd=request; stored"
    );
    assert_eq!(app.upstream.calls(), 3);

    // With only-if-cached the bounds refuse without a call, whoever asks;
    // an honoured no-cache refuses every copy.
    clock.advance(secs(5));
    assert_not_cached(&ask(&app, Some(PLAIN), Q, "only-if-cached, max-age=1").await);
    assert_not_cached(&ask(&app, Some(MAY), Q, "only-if-cached, no-cache").await);
    let (status, _, _) = ask(&app, Some(PLAIN), Q, "only-if-cached, no-cache").await;
    assert_eq!(status, 200, "no-cache is ignored without the permission");

    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 3);
    let text = app.metrics().await;
    let spent_by = |id: &str| {
        metric(
            &text,
            &format!("keyapi_proxy_client_credits_spent_total{{client=\"{id}\"}}"),
        )
    };
    assert_eq!((spent_by("may"), spent_by("plain")), (4.0, 2.0));
}

#[tokio::test]
async fn max_stale_takes_stale_copies_within_the_windows_and_refuses_staler_ones() {
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), windows).await;
    let (_, _, stored) = app.get(Q).await;

    // Kept only for stale-if-error (10 min past freshness): without a
    // directive that is a call; a max-stale that allows it takes the copy
    // as it is, with no call and no refresh.
    clock.advance(MINUTE + secs(600));
    for directives in ["max-stale", "max-stale=600", "MAX-STALE=\"3600\""] {
        let (status, headers, body) = ask(&app, None, Q, directives).await;
        assert_eq!((status, &body), (200, &stored), "{directives}");
        assert_eq!(
            header(&headers, "cache-status"),
            "keyapi-proxy; hit; ttl=-600; detail=max-stale"
        );
    }
    app.state.proxy().idle().await;
    assert_eq!(app.upstream.calls(), 1);

    // A copy staler than max-stale allows is not served without a call; if
    // the call fails, it stands in all the same (stale-if-error).
    app.upstream.set_mode(FakeMode::Status(500));
    let (status, headers, body) = ask(&app, None, Q, "max-stale=599").await;
    assert_eq!((status, &body), (200, &stored));
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; fwd=stale; fwd-status=500; ttl=-600; detail=stale-if-error"
    );
    app.upstream.set_mode(FakeMode::Normal);
    let (_, headers, _) = ask(&app, None, Q, "max-stale=599").await;
    assert_stored_miss(&headers);
    assert_eq!(app.upstream.calls(), 3);

    // Within stale-while-revalidate: too stale for the request → fetched in
    // the foreground; stale enough → served while refreshing, as usual.
    clock.advance(MINUTE + secs(30));
    let (_, headers, _) = ask(&app, None, Q, "max-stale=20").await;
    assert_stored_miss(&headers);
    clock.advance(MINUTE + secs(30));
    let (_, headers, _) = ask(&app, None, Q, "max-stale=40").await;
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; hit; ttl=-30; detail=stale-while-revalidate"
    );
    app.state.proxy().idle().await;
    assert_eq!(app.upstream.calls(), 5, "one foreground call, one refresh");

    // Past the windows no copy is kept: max-stale cannot bring one back.
    clock.advance(2 * HOUR);
    assert_not_cached(&ask(&app, None, Q, "only-if-cached, max-stale").await);
    let (_, headers, _) = ask(&app, None, Q, "max-stale").await;
    assert_stored_miss(&headers);
    let (calls, _) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!(calls, 6);
}

#[tokio::test]
async fn only_if_cached_leaves_every_budget_untouched() {
    const TOKEN: &str = "kp_directives_frontend";
    let app = spawn_app_with(|c| {
        let mut frontend = client("frontend", TOKEN);
        frontend.daily_budget = Some(2);
        c.clients = vec![frontend];
        c.credits.daily_budget = 4;
    })
    .await;
    for i in 0..20 {
        let cold = format!("hashtag_name=cold{i}");
        assert_not_cached(&ask(&app, Some(TOKEN), &cold, "only-if-cached").await);
    }
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 0.0);
    assert_eq!(
        metric(&text, "keyapi_proxy_budget_refused_total{scope=\"client\"}"),
        0.0
    );

    // The client's budget still affords its one call ...
    let (status, headers, stored) = parts(app.get_hashtag_as(TOKEN, Q).await).await;
    assert_eq!(status, 200);
    assert_stored_miss(&headers);
    // ... and once it is spent, only-if-cached still answers from the cache,
    // and with 504 (not 429) where nothing is kept.
    assert_eq!(
        app.get_hashtag_as(TOKEN, "hashtag_name=other")
            .await
            .status(),
        429
    );
    let (status, _, body) = ask(&app, Some(TOKEN), Q, "only-if-cached").await;
    assert_eq!((status, body), (200, stored));
    assert_not_cached(&ask(&app, Some(TOKEN), "hashtag_name=other", "only-if-cached").await);
    let (calls, credits) = assert_ledger_equals_bill(&[&app]).await;
    assert_eq!((calls, credits), (1, 2));
}

#[tokio::test]
async fn only_if_cached_answers_from_another_replicas_copy_in_redis() {
    let Some(cluster) = Cluster::start(|_| {}).await else {
        return;
    };
    let Cluster { a, b, .. } = &cluster;
    let (_, _, stored) = a.get(Q).await;

    let (status, headers, body) = ask(b, None, Q, "only-if-cached").await;
    assert_eq!((status, body), (200, stored));
    assert_hit(&headers);
    assert_not_cached(&ask(b, None, "hashtag_name=cold", "only-if-cached").await);
    let (calls, _) = assert_ledger_equals_bill(&[a, b]).await;
    assert_eq!(calls, 1);
}
