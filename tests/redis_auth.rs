//! A Redis tier behind a password or TLS: the URL's credentials and
//! `rediss://` work, and the URL (password included) shows up in no log line
//! and no `check-config` output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    binary::{run_binary, spawn_binary_on_tls_redis},
    header, parts,
    redis_server::{RedisServer, self_signed_cert},
    spawn_app_with,
};
use redis::AsyncCommands;

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
    let out = run_binary(
        &["check-config"],
        &[
            ("KEYAPI_API_KEY", "k"),
            ("KEYAPI_PROXY__CACHE__REDIS__URL", &url),
        ],
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("url = \"[redacted]\""), "{printed}");
    assert!(!printed.contains(PASSWORD) && !printed.contains("redis.example"));
}

/// `check-config` with the KeyAPI key and `env`.
fn check_config(env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keyapi-proxy"))
        .arg("check-config")
        .env("KEYAPI_API_KEY", "k")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn check_config_never_prints_sentinel_or_cluster_urls_nor_the_primary_password() {
    let sentinels = format!(r#"["redis://:{PASSWORD}@sentinel.example:26379"]"#);
    let nodes = format!(
        r#"["rediss://:{PASSWORD}@node-a.example:6380", "rediss://:{PASSWORD}@node-b.example:6380"]"#
    );
    let cases = [
        vec![
            // Empty counts as unset (a compose overlay switching modes).
            ("KEYAPI_PROXY__CACHE__REDIS__URL", ""),
            ("KEYAPI_PROXY__CACHE__REDIS__SENTINELS", sentinels.as_str()),
            ("KEYAPI_PROXY__CACHE__REDIS__MASTER_NAME", "mymaster"),
            ("KEYAPI_PROXY__CACHE__REDIS__MASTER_PASSWORD", PASSWORD),
        ],
        vec![("KEYAPI_PROXY__CACHE__REDIS__CLUSTER_NODES", nodes.as_str())],
    ];
    for env in cases {
        let out = check_config(&env);
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{printed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(printed.contains("\"[redacted]\""), "{printed}");
        assert!(
            !printed.contains(PASSWORD) && !printed.contains(".example"),
            "{printed}"
        );
    }
}

#[test]
fn a_config_naming_no_single_redis_mode_refuses_to_start_with_one_line() {
    let url = (
        "KEYAPI_PROXY__CACHE__REDIS__URL",
        "redis://:pw@redis.example:6379",
    );
    let sentinels = (
        "KEYAPI_PROXY__CACHE__REDIS__SENTINELS",
        r#"["redis://:pw@s.example:26379"]"#,
    );
    let cluster = (
        "KEYAPI_PROXY__CACHE__REDIS__CLUSTER_NODES",
        r#"["redis://:pw@n.example:6379"]"#,
    );
    let master = ("KEYAPI_PROXY__CACHE__REDIS__MASTER_NAME", "mymaster");
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[url, cluster], "exactly one of url, sentinels"),
        (&[url, sentinels, master], "exactly one of url, sentinels"),
        (&[sentinels], "needs cache.redis.master_name"),
        (&[url, master], "apply only with cache.redis.sentinels"),
        (
            &[("KEYAPI_PROXY__CACHE__REDIS__LOCK_TTL", "20s")],
            "no redis is",
        ),
        (
            &[(
                "KEYAPI_PROXY__CACHE__REDIS__CLUSTER_NODES",
                r#"["redis://:pw@n.example:6379", "redis://:other@m.example:6379"]"#,
            )],
            "same credentials",
        ),
    ];
    for (env, hint) in cases {
        let out = check_config(env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} accepted");
        assert!(err.to_lowercase().contains(hint), "{env:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!err.contains("pw@") && !err.contains(".example"), "{err}");
    }
}

#[tokio::test]
async fn a_rediss_url_reaches_redis_over_tls() {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Some((cert, key)) = self_signed_cert(&dir) else {
        return;
    };
    let Some(redis) = RedisServer::start_with_tls(&cert, &key).await else {
        return;
    };
    let (_child, addr) = spawn_binary_on_tls_redis(&[("URL", &redis.served_url())], &cert).await;
    let response = reqwest::get(format!(
        "http://{addr}/v1/tiktok/trending/hashtag/detail?hashtag_name=ufc324"
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    // Read back over the plain port: the proxy stored the entry through TLS.
    let mut conn = redis.connection().await;
    let stored: Vec<String> = conn.keys("keyapi-proxy:v1:entry:*").await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
