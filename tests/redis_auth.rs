//! A Redis tier behind a password or TLS: the URL's credentials and
//! `rediss://` work, and the URL (password included) shows up in no log line
//! and no `check-config` output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    binary::{run_binary, spawn_binary},
    header, parts,
    redis_server::RedisServer,
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

/// A self-signed server certificate for 127.0.0.1 in `dir` (cert, key); `None`
/// (after a loud message) without the `openssl` command.
fn self_signed(dir: &std::path::Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        // A server certificate, not a CA: webpki refuses a CA as the end entity.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!(
            "\n*** SKIPPED: openssl is not on PATH; it makes the TLS test's certificate ***\n"
        );
    }
    made.then_some((cert, key))
}

#[tokio::test]
async fn a_rediss_url_reaches_redis_over_tls() {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Some((cert, key)) = self_signed(&dir) else {
        return;
    };
    let Some(redis) = RedisServer::start_with_tls(&cert, &key).await else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{}", redis.tls_port.unwrap());
    // The system's trust store, extended for this certificate the standard way.
    let (_child, addr) = spawn_binary(
        None,
        &[
            ("KEYAPI_PROXY__CACHE__REDIS__URL", &url),
            // A debug build's first TLS handshake can take longer than the default 50 ms.
            ("KEYAPI_PROXY__CACHE__REDIS__OP_TIMEOUT", "2s"),
            ("SSL_CERT_FILE", cert.to_str().unwrap()),
        ],
    )
    .await;
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
