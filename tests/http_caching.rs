//! HTTP niceties on cached answers, all precomputed at store time: a strong
//! `ETag` per representation with `If-None-Match` → 304, the gzip form of the
//! stored body, and freshness headers that downstream caches count right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashSet,
    io::Read,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::http::StatusCode;
use bytes::Bytes;
use common::{assert_hit, header, manual_clock, spawn_app, spawn_app_with_clock};
use flate2::read::GzDecoder;
use keyapi_proxy::{
    cache::{Entry, HOT_HITS_PER_SECOND},
    demo::FakeMode,
    route::RouteTable,
};

const Q: &str = "hashtag_name=ufc324";
const GZIP: (&str, &str) = ("Accept-Encoding", "gzip");

/// Puts an answer stored `age` ago into the app's memory tier, as a Redis
/// fill or a snapshot load would, so `Age` is known without waiting.
async fn store_aged(app: &common::TestApp, query: &str, age: Duration) {
    let config = common::test_config();
    let table = RouteTable::from_config(&config).unwrap();
    let key = table.routes()[0].parse(Some(query)).unwrap();
    let body = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "code": 0, "message": "success", "data": {"info": {"hashtag_name": "x".repeat(400)}}
        }))
        .unwrap(),
    );
    let cache = &config.cache;
    let windows = [
        cache.ttl,
        cache.stale_while_revalidate,
        cache.stale_if_error,
    ];
    let entry = Entry::restore(
        body,
        StatusCode::OK,
        false,
        SystemTime::now() - age,
        windows,
    );
    app.state.proxy().cache().insert(key, Arc::new(entry));
}

/// `(max-age, Age, Cache-Status ttl)` of a response.
fn freshness(headers: &reqwest::header::HeaderMap) -> (i64, i64, i64) {
    let directive = |name: &str| -> i64 {
        header(headers, "cache-control")
            .split(", ")
            .find_map(|d| d.strip_prefix(name)?.strip_prefix('='))
            .unwrap()
            .parse()
            .unwrap()
    };
    let ttl = header(headers, "cache-status")
        .split("; ")
        .find_map(|p| p.strip_prefix("ttl="))
        .unwrap()
        .parse()
        .unwrap();
    (
        directive("max-age"),
        header(headers, "age").parse().unwrap(),
        ttl,
    )
}

#[tokio::test]
async fn max_age_is_the_whole_lifetime_and_age_counts_down_once() {
    let app = spawn_app().await;
    let stored = app.get_hashtag(Q).await;
    assert_eq!(
        header(stored.headers(), "cache-control"),
        "max-age=3600, stale-while-revalidate=600, stale-if-error=86400"
    );
    assert_eq!(header(stored.headers(), "age"), "0");

    store_aged(&app, "hashtag_name=aged", Duration::from_secs(1000)).await;
    let hit = app.get_hashtag("hashtag_name=aged").await;
    assert_hit(hit.headers());
    let (max_age, age, ttl) = freshness(hit.headers());
    assert_eq!(max_age, 3600, "max-age is the lifetime, not what is left");
    assert!((1000..=1001).contains(&age), "Age {age}");
    assert!(
        (max_age - age - ttl).abs() <= 1,
        "{max_age} - {age} vs ttl={ttl}"
    );

    // Past its lifetime, within stale-while-revalidate: Age > max-age says stale.
    store_aged(&app, "hashtag_name=old", Duration::from_secs(3700)).await;
    let stale = app.get_hashtag("hashtag_name=old").await;
    let status = header(stale.headers(), "cache-status").to_owned();
    assert!(status.contains("detail=stale-while-revalidate"), "{status}");
    let (max_age, age, ttl) = freshness(stale.headers());
    assert!(
        (max_age - age - ttl).abs() <= 1,
        "{max_age} - {age} vs ttl={ttl}"
    );
    assert!(!header(stale.headers(), "cache-control").contains("public"));
    app.state.proxy().idle().await;
    assert_eq!(app.upstream.calls(), 2, "one store, one background refresh");
}

/// `Age`, `Cache-Status`, the representation and the request id of every
/// hit, whether its head is built (first hit in a second) or reused (a hot
/// entry's later hits in that second).
#[tokio::test]
async fn every_hit_of_a_hot_entry_carries_its_own_id_and_the_current_age() {
    let clock = manual_clock();
    let app = spawn_app_with_clock(clock.clone(), |_| {}).await;
    app.get_hashtag(Q).await;
    let mut ids = HashSet::new();
    for second in 0..3_u64 {
        // Enough hits in each second that the entry keeps its heads for the
        // last ones (in both representations) and drops them the next second.
        let hits = usize::try_from(HOT_HITS_PER_SECOND).unwrap() + 3;
        let mix = [None, None, Some(GZIP), None, Some(GZIP)];
        for (hit, accept) in mix.into_iter().cycle().take(hits).enumerate() {
            let response = app.get_hashtag_with(Q, accept.as_slice()).await;
            let headers = response.headers();
            let context = format!("second {second}, hit {hit}");
            assert_eq!(header(headers, "age"), second.to_string(), "{context}");
            assert_eq!(
                header(headers, "cache-status"),
                format!("keyapi-proxy; hit; ttl={}", 3600 - second),
                "{context}"
            );
            let encoding = headers.get("content-encoding").map(|v| v.to_str().unwrap());
            assert_eq!(encoding, accept.map(|(_, gzip)| gzip), "{context}");
            assert!(
                ids.insert(header(headers, "x-request-id").to_owned()),
                "{context}"
            );
        }
        clock.advance(Duration::from_secs(1));
    }
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn a_stale_window_of_zero_is_not_advertised() {
    let app = common::spawn_app_with(|c| common::plain_ttl(c, Duration::from_secs(60))).await;
    let stored = app.get_hashtag(Q).await;
    assert_eq!(header(stored.headers(), "cache-control"), "max-age=60");
}

#[tokio::test]
async fn each_representation_has_its_own_strong_etag() {
    let app = spawn_app().await;
    let plain = app.get_hashtag(Q).await;
    let identity = header(plain.headers(), "etag").to_owned();
    let zipped = app.get_hashtag_with(Q, &[GZIP]).await;
    let gzip = header(zipped.headers(), "etag").to_owned();
    assert_eq!(header(zipped.headers(), "content-encoding"), "gzip");
    assert_eq!(
        gzip,
        format!("{}-gzip\"", identity.trim_end_matches('"')),
        "{identity} / {gzip}"
    );

    // Each tag gets a 304 naming the representation it names, whatever is accepted.
    for (tag, accept) in [
        (&gzip, Some(GZIP)),
        (&gzip, None),
        (&identity, Some(GZIP)),
        (&identity, None),
    ] {
        let mut headers = vec![("If-None-Match", tag.as_str())];
        headers.extend(accept);
        let response = app.get_hashtag_with(Q, &headers).await;
        assert_eq!(response.status(), 304, "{tag} with {accept:?}");
        assert_eq!(header(response.headers(), "etag"), tag);
        assert_eq!(header(response.headers(), "content-encoding"), "");
        assert!(response.bytes().await.unwrap().is_empty());
    }
    // `*` names whatever would have been sent.
    let star = app
        .get_hashtag_with(Q, &[("If-None-Match", "*"), GZIP])
        .await;
    assert_eq!(star.status(), 304);
    assert_eq!(header(star.headers(), "etag"), gzip);
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn cached_answers_carry_a_strong_etag() {
    let app = spawn_app().await;
    let stored = app.get_hashtag(Q).await;
    let etag = header(stored.headers(), "etag").to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
        "{etag}"
    );
    assert_eq!(header(stored.headers(), "vary"), "accept-encoding");
    let hit = app.get_hashtag(Q).await;
    assert_hit(hit.headers());
    assert_eq!(header(hit.headers(), "etag"), etag);
    let other = app.get_hashtag("hashtag_name=other").await;
    assert_ne!(header(other.headers(), "etag"), etag);
}

#[tokio::test]
async fn if_none_match_answers_304_without_a_body_or_a_call() {
    let app = spawn_app().await;
    let etag = header(app.get_hashtag(Q).await.headers(), "etag").to_owned();
    for tag in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
        "*".into(),
    ] {
        let response = app.get_hashtag_with(Q, &[("If-None-Match", &tag)]).await;
        assert_eq!(response.status(), 304, "If-None-Match: {tag}");
        assert_eq!(header(response.headers(), "etag"), etag);
        assert_hit(response.headers());
        assert!(response.bytes().await.unwrap().is_empty());
    }
    let changed = app
        .get_hashtag_with(Q, &[("If-None-Match", "\"something-else\"")])
        .await;
    assert_eq!(changed.status(), 200);
    assert!(!changed.bytes().await.unwrap().is_empty());
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn gzip_is_served_when_accepted_and_decompresses_byte_identical() {
    let app = spawn_app().await;
    let plain = app.get_hashtag(Q).await;
    assert_eq!(header(plain.headers(), "content-encoding"), "");
    let plain = plain.bytes().await.unwrap();

    let zipped = app
        .get_hashtag_with(Q, &[("Accept-Encoding", "br;q=1.0, gzip;q=0.8")])
        .await;
    assert_eq!(zipped.status(), 200);
    assert_eq!(header(zipped.headers(), "content-encoding"), "gzip");
    assert_eq!(header(zipped.headers(), "content-type"), "application/json");
    assert_eq!(header(zipped.headers(), "vary"), "accept-encoding");
    let compressed = zipped.bytes().await.unwrap();
    assert!(compressed.len() < plain.len());
    let mut decompressed = Vec::new();
    GzDecoder::new(&compressed[..])
        .read_to_end(&mut decompressed)
        .unwrap();
    assert_eq!(decompressed, plain, "gzip body is the stored body");

    let refused = app
        .get_hashtag_with(Q, &[("Accept-Encoding", "gzip;q=0, identity")])
        .await;
    assert_eq!(header(refused.headers(), "content-encoding"), "");
    assert_eq!(refused.bytes().await.unwrap(), plain);
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn uncached_answers_have_no_etag() {
    let app = spawn_app().await;
    app.upstream
        .set_mode(keyapi_proxy::demo::FakeMode::CodeError(3));
    let declined = app.get_hashtag(Q).await;
    assert_eq!(header(declined.headers(), "etag"), "");
    let bad = app.get_hashtag("period=1").await;
    assert_eq!(header(bad.headers(), "etag"), "");
}

#[tokio::test]
async fn a_cached_refusal_never_answers_304() {
    let app = spawn_app().await;
    app.upstream.set_mode(FakeMode::Status(404));
    let first = app.get_hashtag(Q).await;
    assert_eq!(first.status(), 404);
    let etag = header(first.headers(), "etag").to_owned();
    for tag in ["*", etag.as_str()] {
        let response = app.get_hashtag_with(Q, &[("if-none-match", tag)]).await;
        assert_eq!(response.status(), 404, "If-None-Match: {tag}");
        assert_hit(response.headers());
    }
    assert_eq!(app.upstream.calls(), 1);
}
