//! HTTP niceties on cached answers, all precomputed at store time: a strong
//! `ETag` with `If-None-Match` → 304, and the gzip form of the stored body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;

use common::{header, spawn_app};
use flate2::read::GzDecoder;
use keyapi_proxy::demo::FakeMode;

const Q: &str = "hashtag_name=ufc324";

#[tokio::test]
async fn cached_answers_carry_one_strong_etag() {
    let app = spawn_app().await;
    let stored = app.get_hashtag(Q).await;
    let etag = header(stored.headers(), "etag").to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
        "{etag}"
    );
    assert_eq!(header(stored.headers(), "vary"), "accept-encoding");
    let hit = app.get_hashtag(Q).await;
    assert!(header(hit.headers(), "cache-status").contains("; hit;"));
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
        assert!(header(response.headers(), "cache-status").contains("; hit;"));
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
        assert!(header(response.headers(), "cache-status").contains("; hit;"));
    }
    assert_eq!(app.upstream.calls(), 1);
}
