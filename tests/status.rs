//! `/stats` and the HTML status page at `/`: the numbers follow the traffic,
//! the last hour is bucketed by the (injected) clock, and the page is
//! self-contained — it references nothing outside itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use common::{TestApp, client, header, spawn_app, spawn_app_with, spawn_app_with_clock};
use keyapi_proxy::{clock::ManualClock, demo::FakeMode};
use serde_json::Value;

async fn stats(app: &TestApp) -> Value {
    let response = app.client.get(app.url("/stats")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

async fn page(app: &TestApp) -> (reqwest::header::HeaderMap, String) {
    let response = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    (headers, response.text().await.unwrap())
}

#[tokio::test]
async fn stats_follow_the_traffic() {
    let app = spawn_app().await;
    for _ in 0..4 {
        app.get_hashtag("hashtag_name=ufc324").await;
    }
    app.get_hashtag("hashtag_name=nba").await;
    let s = stats(&app).await;
    assert_eq!(s["hits"], 3);
    assert_eq!(s["misses"], 2);
    assert_eq!(s["hitRatio"], 0.6);
    assert_eq!(s["creditsSpent"], 4);
    assert_eq!(s["creditsSaved"], 6);
    assert_eq!(s["routes"][0]["credits"], 2);
    assert_eq!(s["cacheEntries"], 2);
    assert_eq!(s["upstream"]["status"], "ok");
    assert_eq!(s["upstream"]["callsLastHour"], 2);
    let top = s["topKeys"].as_array().unwrap();
    assert_eq!(top[0]["params"]["hashtag_name"], "ufc324");
    assert_eq!(top[0]["hits"], 3);
    assert_eq!(top[1]["params"]["hashtag_name"], "nba");
    assert_eq!(top[1]["hits"], 0);
    let hour = s["lastHour"].as_array().unwrap();
    assert_eq!(hour.len(), 60);
    let requests: u64 = hour.iter().map(|m| m["requests"].as_u64().unwrap()).sum();
    let credits: u64 = hour
        .iter()
        .map(|m| m["creditsSpent"].as_u64().unwrap())
        .sum();
    assert_eq!((requests, credits), (5, 4));
    assert_eq!(app.upstream.calls(), 2, "stats cost nothing");
}

#[tokio::test]
async fn the_last_hour_is_bucketed_per_minute_by_the_clock() {
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(29_000_000 * 60),
    ));
    let app = spawn_app_with_clock(clock.clone(), |_| {}).await;
    app.get_hashtag("hashtag_name=a").await;
    clock.advance(Duration::from_secs(5 * 60));
    app.get_hashtag("hashtag_name=a").await;
    app.get_hashtag("hashtag_name=b").await;
    let s = stats(&app).await;
    let hour = s["lastHour"].as_array().unwrap();
    let at = |i: usize| {
        (
            hour[i]["requests"].as_u64().unwrap(),
            hour[i]["creditsSpent"].as_u64().unwrap(),
        )
    };
    assert_eq!(at(59), (2, 2), "this minute: a hit and a miss");
    assert_eq!(at(54), (1, 2), "five minutes ago: one miss");
    assert_eq!(
        hour[59]["minute"].as_u64().unwrap() - hour[54]["minute"].as_u64().unwrap(),
        5
    );
    assert_eq!(s["uptimeSecs"], 300);
    clock.advance(Duration::from_secs(3600));
    let s = stats(&app).await;
    let requests: u64 = s["lastHour"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 0, "an hour later the history is empty");
    assert_eq!(s["creditsSpent"], 4, "totals stay");
}

#[tokio::test]
async fn upstream_health_and_client_spending_are_shown() {
    let app = spawn_app_with(|c| {
        let mut budgeted = client("dash", "kp_dash");
        budgeted.daily_budget = Some(10);
        c.clients = vec![budgeted];
    })
    .await;
    app.get_hashtag_as("kp_dash", "hashtag_name=a").await;
    app.upstream.set_mode(FakeMode::Status(500));
    app.get_hashtag_as("kp_dash", "hashtag_name=b").await;
    let s = stats(&app).await;
    assert_eq!(s["upstream"]["status"], "failing");
    assert_eq!(s["upstream"]["lastError"], "status");
    assert_eq!(s["upstream"]["consecutiveFailures"], 1);
    let dash = &s["clients"][0];
    assert_eq!(dash["id"], "dash");
    assert_eq!(dash["requests"], 2);
    assert_eq!(dash["creditsSpent"], 4);
    assert_eq!(dash["creditsSpentToday"], 4);
    assert_eq!(dash["dailyBudget"], 10);
    let (_, html) = page(&app).await;
    assert!(html.contains("failing") && html.contains("dash"), "{html}");
}

#[tokio::test]
async fn the_status_page_is_self_contained() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.get_hashtag("hashtag_name=ufc324").await;
    }
    let (headers, html) = page(&app).await;
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    let policy = header(&headers, "content-security-policy");
    assert!(
        policy.starts_with("default-src 'none'; style-src 'sha256-"),
        "{policy}"
    );
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    assert!(html.starts_with("<!doctype html>"));
    assert_eq!(
        html.matches("<svg").count(),
        3,
        "requests and credits of the last hour, each on its own scale, and the last 30 days"
    );
    // Today's bar of the 30 days: one call (2 credits), two hits (2 x 2 saved).
    assert!(
        html.contains("spent 2</span>") && html.contains("saved 4</span>"),
        "{html}"
    );
    assert!(html.contains(": 2 spent, 4 saved</title>"), "{html}");
    assert!(html.contains("66.7 %"), "hit ratio");
    assert!(html.contains("2 hits / 1 miss<"), "counts with their nouns");
    assert!(html.contains("<b>1</b>entry,"), "{html}");
    assert!(html.contains("ufc324"), "top keys");
    let lower = html.to_ascii_lowercase();
    for forbidden in [
        "<script", "<link", "<img", "<iframe", "src=", "url(", "@import", " style=",
    ] {
        assert!(!lower.contains(forbidden), "page references {forbidden}");
    }
    // The only absolute URL is the SVG namespace, which is never fetched.
    let absolute = lower.matches("http://").count() + lower.matches("https://").count();
    assert_eq!(
        absolute,
        lower.matches("http://www.w3.org/2000/svg").count()
    );
    // Links stay on this proxy.
    for href in lower.split("href=\"").skip(1) {
        assert!(href.starts_with('/'), "{href}");
    }
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn hashtags_are_escaped_on_the_page() {
    // Hashtags are letters/digits/_ only, so escaping is belt and braces; the
    // page must still render non-ASCII names intact.
    let app = spawn_app().await;
    app.get_hashtag("hashtag_name=%C3%A9t%C3%A9").await;
    let (_, html) = page(&app).await;
    assert!(html.contains("été"));
}

#[tokio::test]
async fn operational_answers_are_never_stored_downstream() {
    let app = spawn_app_with(|c| {
        c.clients = vec![client("ops", "tok-ops")];
        c.clients[0].admin = true;
    })
    .await;
    for (path, token) in [
        ("/", None),
        ("/stats", None),
        ("/metrics", None),
        ("/healthz", None),
        ("/readyz", None),
        ("/admin/cache", Some("tok-ops")),
        ("/admin/cache", None),
    ] {
        let mut request = app.client.get(app.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let expected = if token.is_some() || !path.starts_with("/admin") {
            200
        } else {
            401
        };
        assert_eq!(response.status(), expected, "{path}");
        assert_eq!(
            header(response.headers(), "cache-control"),
            "no-store",
            "{path} ({})",
            response.status()
        );
    }
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn the_page_shows_rejections_the_circuit_and_long_names_whole_in_a_tooltip() {
    let app = spawn_app().await;
    let long = "x".repeat(100);
    app.get_hashtag(&format!("hashtag_name={long}")).await;
    for _ in 0..3 {
        assert_eq!(app.get_hashtag("hashtag_name=a-b").await.status(), 400);
    }
    assert_eq!(app.get_hashtag("period=8").await.status(), 400);
    let s = stats(&app).await;
    assert_eq!(s["rejected"], 4);
    assert_eq!(s["upstream"]["circuit"], "closed");

    let (_, html) = page(&app).await;
    assert!(
        html.contains("rejected<b class=\"rejected\">4</b>"),
        "{html}"
    );
    assert!(
        html.contains("circuit <span class=\"closed\">closed</span>"),
        "{html}"
    );
    // Cut on screen by CSS, whole in the tooltip.
    assert!(
        html.contains(&format!(
            "<span class=\"name\" title=\"/v1/tiktok/trending/hashtag/detail hashtag_name={long} period=7 region=all_regions\">{long} · 7 · all_regions</span>"
        )),
        "{html}"
    );
    assert!(
        html.contains(".name{display:block;max-width:") && html.contains("text-overflow:ellipsis")
    );
    // Credits get their own chart and their own peak.
    assert!(html.contains("requests per minute · peak 1"), "{html}");
    assert!(html.contains("credits spent per minute · peak 2"), "{html}");
}

#[tokio::test]
async fn stats_are_computed_at_most_once_a_second() {
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(29_000_000 * 60),
    ));
    let app = spawn_app_with_clock(clock.clone(), |_| {}).await;
    app.get_hashtag("hashtag_name=a").await;
    app.get_hashtag("hashtag_name=a").await;
    let first = stats(&app).await;
    assert_eq!(first["topKeys"][0]["hits"], 1);
    app.get_hashtag("hashtag_name=a").await;
    app.get_hashtag("hashtag_name=b").await;
    assert_eq!(stats(&app).await, first, "shared within the second");
    let (_, html) = page(&app).await;
    assert!(
        !html.contains("<td>b</td>"),
        "the page shows the same numbers"
    );
    clock.advance(Duration::from_secs(1));
    let s = stats(&app).await;
    assert_eq!(s["topKeys"][0]["hits"], 2, "recomputed a second later");
    assert_eq!(
        (s["hits"].as_u64(), s["cacheEntries"].as_u64()),
        (Some(2), Some(2))
    );
}

#[tokio::test]
async fn a_budget_held_by_a_call_in_progress_shows_as_reserved_not_spent() {
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(29_000_000 * 60),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| c.credits.daily_budget = 2).await;
    app.upstream.hold();
    let first = app.spawn_get_hashtag("hashtag_name=first");
    app.upstream.wait_for_calls(1).await;
    let s = stats(&app).await;
    assert_eq!(
        (&s["creditsSpentToday"], &s["creditsReserved"]),
        (&Value::from(0), &Value::from(2)),
        "{s}"
    );
    let (_, html) = page(&app).await;
    assert!(
        html.contains("0 of 2 spent today (UTC), 2 reserved by calls in progress."),
        "{html}"
    );
    // The only call that fits is in progress: come back shortly, not at midnight.
    let (status, headers, body) = app.get("hashtag_name=second").await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), "5");
    assert!(
        body.contains("2 credits are reserved by calls in progress"),
        "{body}"
    );
    app.upstream.release();
    assert_eq!(first.await.unwrap().0, 200);
    clock.advance(Duration::from_secs(1));
    let s = stats(&app).await;
    assert_eq!(
        (&s["creditsSpentToday"], &s["creditsReserved"]),
        (&Value::from(2), &Value::from(0)),
        "{s}"
    );
    let (status, headers, body) = app.get("hashtag_name=third").await;
    assert_eq!(status, 429);
    assert_ne!(header(&headers, "retry-after"), "5");
    assert!(body.contains("is spent"), "{body}");
}
