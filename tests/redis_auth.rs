//! A Redis tier behind a password: the URL's credentials work, and the URL
//! (password included) shows up in no log line and no `check-config` output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{header, parts, redis_server::RedisServer, spawn_app_with};

const PASSWORD: &str = "s3cret-redis-pass-4f1e";

#[tokio::test]
async fn a_password_in_the_url_authenticates_the_shared_tier() {
    let Some(redis) = RedisServer::start_with_password(PASSWORD).await else {
        return;
    };
    let url = redis.url();
    let with_redis = |c: &mut keyapi_proxy::config::Config| {
        c.cache.redis.url = Some(url.clone().into());
        c.cache.redis.op_timeout = Duration::from_secs(1);
    };
    let a = spawn_app_with(with_redis).await;
    let b = a.spawn_replica(with_redis).await;
    assert_eq!(a.get("hashtag_name=ufc324").await.0, 200);
    let (status, headers, _) = parts(b.get_hashtag("hashtag_name=ufc324").await).await;
    assert_eq!(status, 200);
    assert!(
        header(&headers, "cache-status").contains("; hit"),
        "the other replica found it in Redis: {headers:?}"
    );
    assert_eq!(a.upstream.calls(), 1);
    let stats = b.client.get(b.url("/stats")).send().await.unwrap();
    assert!(!stats.text().await.unwrap().contains(PASSWORD));
    let debug = format!("{:?}", keyapi_proxy::config::RedisUrl::from(url.clone()));
    assert!(!debug.contains(PASSWORD), "{debug}");
}

#[test]
fn check_config_never_prints_the_redis_url() {
    let url = format!("rediss://:{PASSWORD}@redis.example:6380");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyapi-proxy"))
        .arg("check-config")
        .env("KEYAPI_API_KEY", "k")
        .env("KEYAPI_PROXY__CACHE__REDIS__URL", &url)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("url = \"[redacted]\""), "{printed}");
    assert!(!printed.contains(PASSWORD) && !printed.contains("redis.example"));
}
