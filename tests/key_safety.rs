//! The KeyAPI key never leaves: not in a response (body or header, on any
//! path, errors included), not in a log line at any level, not in `Debug`
//! output, not in `check-config`. Nor do signed visitor tokens, their HS256
//! secret or their subjects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use common::{
    TEST_API_KEY,
    binary::proxy_command,
    parts, spawn_app_with,
    tokens::{HsSecret, claims, hs256_issuer, with},
};
use keyapi_proxy::{
    api_key::{LiveKey, Reread},
    clock::{SharedClock, SystemClock},
    config::Config,
    demo::FakeMode,
    metrics::Metrics,
    upstream::Upstream,
};
use secrecy::SecretString;

fn assert_no_key(what: &str, text: &str) {
    assert!(
        !text.contains(TEST_API_KEY),
        "{what} contains the API key:\n{text}"
    );
    // Nor a recognisable fragment of it.
    assert!(
        !text.contains("TESTKEY"),
        "{what} contains part of the API key:\n{text}"
    );
}

#[tokio::test]
async fn key_appears_in_no_response_and_no_log_line() {
    common::logs::captured();
    let app = spawn_app_with(|c| c.upstream.request_timeout = Duration::from_millis(300)).await;
    let modes = [
        FakeMode::Normal,
        FakeMode::Status(401),
        FakeMode::Status(403),
        FakeMode::Status(500),
        FakeMode::Status(404),
        FakeMode::CodeError(3),
        FakeMode::Garbage,
        FakeMode::Hang,
        FakeMode::EchoAuthorization,
        FakeMode::EchoKeyEscaped,
    ];
    for (i, mode) in modes.iter().enumerate() {
        app.upstream.set_mode(mode.clone());
        for query in [
            format!("hashtag_name=k{i}"),
            format!("hashtag_name=k{i}"),
            "period=x".into(),
        ] {
            let response = app
                .hashtag_request(reqwest::Method::GET, &query)
                .header("Authorization", "Bearer some-client-token")
                .send()
                .await
                .unwrap();
            let (status, headers, body) = parts(response).await;
            let what = format!("{mode:?} {query} -> {status}");
            assert_no_key(&format!("{what} body"), &body);
            for (name, value) in &headers {
                assert_no_key(
                    &format!("{what} header {name}"),
                    &String::from_utf8_lossy(value.as_bytes()),
                );
            }
        }
    }
    // The fake really received the key, so its absence above means something.
    assert!(
        app.upstream
            .requests()
            .iter()
            .all(|r| r.headers["authorization"] == format!("Bearer {TEST_API_KEY}").as_str())
    );

    let text = common::logs::text();
    assert!(
        text.contains("upstream call failed"),
        "error paths were logged"
    );
    assert_no_key("captured logs", &text);
    assert!(
        !text.contains("some-client-token"),
        "a client token was logged"
    );
}

#[tokio::test]
async fn signed_tokens_their_secret_and_subjects_appear_in_no_log_line_or_response() {
    common::logs::captured();
    let secret = HsSecret::new("hs256-SECRETVALUE-of-32-bytes-xyz");
    let app = spawn_app_with(|c| c.issuers = vec![hs256_issuer(&secret)]).await;
    let sub = "person-SUBJECTNAME@example.com";
    let now = SystemTime::now();
    let valid = secret.mint(&claims(sub, now));
    let expired = secret.mint(&with(claims(sub, now), "exp", serde_json::json!(1)));
    let forged = HsSecret::new("another-FORGEDKEY-of-32-bytes-xyz").mint(&claims(sub, now));
    let secrets = ["SECRETVALUE", "FORGEDKEY", "SUBJECTNAME"];
    let tokens = [&valid, &expired, &forged];
    let check = |what: &str, text: &str| {
        for token in tokens {
            // The signature alone would let a token be replayed.
            let signature = token.rsplit('.').next().unwrap();
            assert!(
                !text.contains(signature),
                "{what} contains a token:\n{text}"
            );
        }
        for secret in secrets {
            assert!(!text.contains(secret), "{what} contains {secret}:\n{text}");
        }
    };
    for (i, token) in tokens.iter().enumerate() {
        let response = app.get_hashtag_as(token, "hashtag_name=jwt").await;
        let (status, headers, body) = parts(response).await;
        assert_eq!(status, if i == 0 { 200 } else { 401 }, "{body}");
        check("body", &body);
        for (name, value) in &headers {
            check(name.as_str(), &String::from_utf8_lossy(value.as_bytes()));
        }
    }
    for path in ["/metrics", "/stats"] {
        let body = app.client.get(app.url(path)).send().await.unwrap();
        check(path, &body.text().await.unwrap());
    }
    let mut config = Config::defaults().unwrap();
    config.issuers = vec![hs256_issuer(&secret)];
    check("Debug of Config", &format!("{config:?}"));
    assert_eq!(app.upstream.calls(), 1);
    let text = common::logs::text();
    assert!(
        text.contains("subject:site:"),
        "the subject was logged, hashed"
    );
    check("captured logs", &text);
}

#[tokio::test]
async fn key_appears_in_no_operational_endpoint() {
    let app = spawn_app_with(|c| {
        let mut admin = common::client("ops", "kp_admin");
        admin.admin = true;
        c.clients = vec![admin];
    })
    .await;
    app.get_hashtag_as("kp_admin", "hashtag_name=ufc324").await;
    app.upstream.set_mode(FakeMode::EchoAuthorization);
    app.get_hashtag_as("kp_admin", "hashtag_name=echo").await;
    for path in ["/metrics", "/stats", "/", "/openapi.json", "/admin/cache"] {
        let response = app
            .client
            .get(app.url(path))
            .bearer_auth("kp_admin")
            .send()
            .await
            .unwrap();
        let (status, headers, body) = parts(response).await;
        assert_eq!(status, 200, "{path}");
        assert_no_key(&format!("{path} body"), &body);
        for (name, value) in &headers {
            assert_no_key(
                &format!("{path} header {name}"),
                &String::from_utf8_lossy(value.as_bytes()),
            );
        }
        assert!(!body.contains("kp_admin"), "{path} shows a client token");
    }
}

#[tokio::test]
async fn an_upstream_body_quoting_the_key_is_not_forwarded() {
    let app = spawn_app_with(|_| {}).await;
    app.upstream.set_mode(FakeMode::EchoAuthorization);
    let (status, _, body) = parts(app.get_hashtag("hashtag_name=echo").await).await;
    assert_eq!(status, 404, "{body}");
    assert_no_key("echoed body", &body);
}

#[tokio::test]
async fn a_json_escaped_echo_of_the_key_is_neither_served_nor_cached() {
    let app = spawn_app_with(|_| {}).await;
    app.upstream.set_mode(FakeMode::EchoKeyEscaped);
    for _ in 0..2 {
        let (status, _, body) = parts(app.get_hashtag("hashtag_name=escaped").await).await;
        assert_eq!(status, 502, "{body}");
        assert_no_key("escaped echo", &body);
    }
    assert_eq!(app.upstream.calls(), 2, "nothing was cached");
    assert_eq!(app.state.proxy().cache().entry_count(), 0);
}

#[test]
fn debug_output_redacts_the_key() {
    let config = Config::defaults().unwrap();
    let clock = SharedClock::new(Arc::new(SystemClock));
    let metrics = Arc::new(Metrics::new(clock.clone()));
    let key = LiveKey::new(SecretString::from(TEST_API_KEY), None, metrics, clock);
    let key = Arc::new(key);
    key.install(
        SecretString::from("sk-live-ROTATED-0123456789"),
        Reread::Reload,
    );
    let upstream = Upstream::new(&config.upstream, Arc::clone(&key)).unwrap();
    assert_no_key("Debug of Upstream", &format!("{upstream:?}"));
    assert!(!format!("{upstream:?}{key:?}").contains("ROTATED"));
    assert_no_key("Debug of Config", &format!("{config:?}"));
}

#[test]
fn check_config_redacts_the_key() {
    let out = proxy_command()
        .arg("check-config")
        .env("KEYAPI_API_KEY", TEST_API_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("api_key = \"[redacted]\""), "{stdout}");
    assert_no_key("check-config stdout", &stdout);
    assert_no_key("check-config stderr", &String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_rejected_key_file_is_not_echoed() {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("key");
    // A key with a space is invalid; the error must not quote it.
    std::fs::write(&file, format!("{TEST_API_KEY} extra\n")).unwrap();
    let out = proxy_command()
        .arg("check-config")
        .env("KEYAPI_API_KEY_FILE", &file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KEYAPI_API_KEY_FILE"), "{stderr}");
    assert_no_key("stderr", &stderr);
    assert_no_key("stdout", &String::from_utf8_lossy(&out.stdout));
    std::fs::remove_dir_all(dir).unwrap();
}
