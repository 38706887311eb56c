//! Concurrent identical misses cost one upstream call, and a caller that goes
//! away does not cancel or repeat the fetch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::{
    assert_hit, assert_stored_miss, hashtag_path, header, join, parts, spawn_app, stampede,
};

#[tokio::test]
async fn concurrent_identical_cold_requests_make_one_call() {
    let app = spawn_app().await;
    let results = stampede(&[&app], 200, |_| hashtag_path("hashtag_name=ufc324"), 1).await;
    assert_eq!(app.upstream.calls(), 1);
    assert_eq!(results.len(), 200);
    let bodies: HashSet<&str> = results.iter().map(|(_, _, b)| b.as_str()).collect();
    assert_eq!(bodies.len(), 1, "all 200 bodies are identical");
    let statuses: Vec<&str> = results
        .iter()
        .map(|(s, h, _)| {
            assert_eq!(*s, 200);
            header(h, "cache-status")
        })
        .collect();
    let stored = statuses.iter().filter(|s| s.ends_with("stored")).count();
    assert_eq!(stored, 1, "exactly one request fetched: {statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| s.ends_with("stored") || s.ends_with("collapsed") || s.contains("; hit;")),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn ten_keys_concurrently_make_ten_calls() {
    let app = spawn_app().await;
    let tag = |i| hashtag_path(&format!("hashtag_name=tag{}", i % 10));
    let results = stampede(&[&app], 200, tag, 10).await;
    assert_eq!(app.upstream.calls(), 10);
    for (i, (status, _, body)) in results.iter().enumerate() {
        assert_eq!(*status, 200);
        assert!(body.contains(&format!("\"hashtag_name\":\"tag{}\"", i % 10)));
    }
}

#[tokio::test]
async fn first_caller_dropped_mid_fetch_does_not_cancel_or_repeat_it() {
    let app = spawn_app().await;
    app.upstream.hold();
    let first = app.spawn_get_hashtag("hashtag_name=ufc324");
    app.upstream.wait_for_calls(1).await;
    // The leader's client goes away while its fetch is in flight.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());

    let others = (0..5)
        .map(|_| app.spawn_get_hashtag("hashtag_name=ufc324"))
        .collect();
    app.upstream.release();
    for (status, _, body) in join(others).await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(app.upstream.calls(), 1);
    // And it was stored: the next request is a hit.
    let (_, headers, _) = parts(app.get_hashtag("hashtag_name=ufc324").await).await;
    assert_hit(&headers);
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn hit_headers_follow_the_stored_entry() {
    let app = spawn_app().await;
    let (_, miss, body1) = parts(app.get_hashtag("hashtag_name=ufc324&period=1095").await).await;
    assert_stored_miss(&miss);
    assert_eq!(header(&miss, "age"), "0");
    let (_, hit, body2) = parts(app.get_hashtag("hashtag_name=ufc324&period=1095").await).await;
    assert_eq!(body1, body2);
    let status = header(&hit, "cache-status");
    assert!(status.starts_with("keyapi-proxy; hit; ttl="), "{status}");
    let ttl: u64 = status.rsplit('=').next().unwrap().parse().unwrap();
    // period 1095 has a 24 h TTL in the defaults.
    assert!((86_390..=86_400).contains(&ttl), "ttl {ttl}");
    assert_eq!(
        header(&hit, "cache-control"),
        "max-age=86400, stale-while-revalidate=600, stale-if-error=86400"
    );
    let age = header(&hit, "age").parse::<u64>().unwrap();
    assert!(age <= 1);
    assert!(
        (86_400 - age).abs_diff(ttl) <= 1,
        "max-age - Age vs ttl={ttl}"
    );
}
