//! The KeyAPI key never leaves: not in a response (body or header, on any
//! path, errors included), not in a log line at any level, not in `Debug`
//! output, not in `check-config`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Command, time::Duration};

use common::{TEST_API_KEY, parts, spawn_app_with};
use keyapi_proxy::{config::Config, demo::FakeMode, upstream::Upstream};
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
async fn key_appears_in_no_operational_endpoint() {
    let app = spawn_app_with(|c| {
        let mut admin = common::client("ops", "kp_admin");
        admin.purge = true;
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
    let upstream = Upstream::new(&config.upstream, SecretString::from(TEST_API_KEY)).unwrap();
    assert_no_key("Debug of Upstream", &format!("{upstream:?}"));
    assert_no_key("Debug of Config", &format!("{config:?}"));
}

fn proxy_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyapi-proxy"));
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYAPI_") {
            cmd.env_remove(name);
        }
    }
    cmd
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
