//! `/admin/cache`: list and purge, only with a token whose client has the
//! `admin = true` (or its older name, `purge = true`); a purged key is
//! fetched again on the next request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    TestApp, assert_envelope, assert_hit, assert_stored_miss, client, header, parts, spawn_app,
    spawn_app_with,
};
use keyapi_proxy::route::HASHTAG_DETAIL_PATH;
use serde_json::Value;

const ADMIN: &str = "kp_admin-token";
const USER: &str = "kp_user-token";

async fn app() -> TestApp {
    spawn_app_with(|c| {
        let mut admin = client("ops", ADMIN);
        admin.admin = true;
        c.clients = vec![admin, client("user", USER)];
    })
    .await
}

async fn admin(
    app: &TestApp,
    method: reqwest::Method,
    query: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut request = app
        .client
        .request(method, app.url(&format!("/admin/cache{query}")))
        .header("X-Request-Id", "admin-test");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let (status, _, body) = parts(request.send().await.unwrap()).await;
    (status, body)
}

#[tokio::test]
async fn admin_needs_the_admin_flag() {
    let app = app().await;
    app.get_hashtag_as(USER, "hashtag_name=ufc324").await;
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let (status, body) = admin(&app, method.clone(), "", None).await;
        assert_eq!(status, 401, "{method} {body}");
        assert_envelope(&body, 401, "admin-test");
        let (status, body) = admin(&app, method.clone(), "", Some("kp_wrong")).await;
        assert_eq!(status, 401, "{method} {body}");
        let (status, body) = admin(&app, method.clone(), "", Some(USER)).await;
        assert_eq!(status, 403, "{method} {body}");
        assert!(assert_envelope(&body, 403, "admin-test").contains("admin = true"));
    }
    // Nothing was purged by the refused attempts.
    let (_, headers, _) = parts(app.get_hashtag_as(USER, "hashtag_name=ufc324").await).await;
    assert_hit(&headers);
}

#[tokio::test]
async fn without_clients_admin_is_unreachable() {
    let app = spawn_app().await;
    app.get_hashtag("hashtag_name=ufc324").await;
    let (status, _) = admin(&app, reqwest::Method::DELETE, "", None).await;
    assert_eq!(status, 403);
    let (status, _) = admin(&app, reqwest::Method::GET, "", Some(ADMIN)).await;
    assert_eq!(status, 403);
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn purge_one_normalized_key_then_it_misses() {
    let app = app().await;
    app.get_hashtag_as(USER, "hashtag_name=ufc324").await;
    app.get_hashtag_as(USER, "hashtag_name=other").await;
    // Same normalization as the route: #UFC324 with explicit defaults is the same key.
    let (status, body) = admin(
        &app,
        reqwest::Method::DELETE,
        "?hashtag_name=%23UFC324&period=7&region=ALL_REGIONS",
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["purged"], 1);
    assert!(v["key"].as_str().unwrap().ends_with("hashtag_name=ufc324"));

    let (_, headers, _) = parts(app.get_hashtag_as(USER, "hashtag_name=ufc324").await).await;
    assert_stored_miss(&headers);
    let (_, headers, _) = parts(app.get_hashtag_as(USER, "hashtag_name=other").await).await;
    // Other keys stay.
    assert_hit(&headers);
    assert_eq!(app.upstream.calls(), 3);

    let (status, body) = admin(
        &app,
        reqwest::Method::DELETE,
        "?hashtag_name=never",
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["purged"], 0);
    let (status, body) = admin(&app, reqwest::Method::DELETE, "?period=8", Some(ADMIN)).await;
    assert_eq!(status, 400);
    assert_envelope(&body, 400, "admin-test");
}

#[tokio::test]
async fn purge_all_needs_all_true_then_everything_misses() {
    let app = app().await;
    for tag in ["a", "b", "c"] {
        app.get_hashtag_as(USER, &format!("hashtag_name={tag}"))
            .await;
    }
    let (status, body) = admin(&app, reqwest::Method::DELETE, "?all=true", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((&v["purged"], &v["key"]), (&3.into(), &Value::Null));
    for tag in ["a", "b", "c"] {
        let (_, headers, _) = parts(
            app.get_hashtag_as(USER, &format!("hashtag_name={tag}"))
                .await,
        )
        .await;
        assert!(header(&headers, "cache-status").ends_with("stored"));
    }
    assert_eq!(app.upstream.calls(), 6);
}

#[tokio::test]
async fn a_purge_naming_nothing_or_a_typo_is_a_400_and_purges_nothing() {
    let app = app().await;
    for tag in ["x", "ufc324"] {
        app.get_hashtag_as(USER, &format!("hashtag_name={tag}"))
            .await;
    }
    let cases = [
        ("", "all=true purges everything"),
        ("?", "all=true purges everything"),
        ("?hashtag=x", "\"hashtag\" is not one this request takes"),
        ("?_=123", "\"_\" is not one this request takes"),
        (
            "?hashtag_name=x&hashtagname=y",
            "\"hashtagname\" is not one",
        ),
        ("?all=1", "\"all\" must be true"),
        ("?all=true&hashtag_name=x", "give it alone"),
        ("?all=true&all=true", "more than once"),
        (
            "?route=/v1/nowhere&hashtag_name=x",
            "\"route\" must be one of",
        ),
    ];
    for (query, hint) in cases {
        let (status, body) = admin(&app, reqwest::Method::DELETE, query, Some(ADMIN)).await;
        assert_eq!(status, 400, "{query}: {body}");
        let message = assert_envelope(&body, 400, "admin-test");
        assert!(message.contains(hint), "{query}: {message}");
    }
    let (_, body) = admin(&app, reqwest::Method::GET, "", Some(ADMIN)).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["count"], 2);
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn list_keys_by_prefix_with_age_and_size() {
    let app = app().await;
    for q in [
        "hashtag_name=ufc324",
        "hashtag_name=ufc325&region=us&period=30",
        "hashtag_name=nba",
    ] {
        app.get_hashtag_as(USER, q).await;
    }
    let (status, body) = admin(&app, reqwest::Method::GET, "?prefix=%23UFC", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["count"], 2);
    let entries = v["entries"].as_array().unwrap();
    let names: Vec<&str> = entries
        .iter()
        .map(|e| e["params"]["hashtag_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ufc324", "ufc325"]);
    assert_eq!(entries[1]["route"], HASHTAG_DETAIL_PATH);
    assert_eq!(entries[1]["params"]["region"], "US");
    assert_eq!(entries[1]["params"]["period"], "30");
    for entry in entries {
        assert!(entry["bytes"].as_u64().unwrap() > 0);
        assert!(entry["ageSecs"].is_u64() && entry["ttlSecs"].is_u64());
    }
    let (_, body) = admin(&app, reqwest::Method::GET, "", Some(ADMIN)).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["count"], 3);
    assert_eq!(app.upstream.calls(), 3, "listing costs nothing");
}

#[tokio::test]
async fn admin_true_and_its_older_name_purge_true_both_open_admin_and_actions_name_the_client() {
    common::logs::captured();
    let dir = std::env::temp_dir().join(format!("keyapi-admin-flag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    let hash = |t: &str| keyapi_proxy::digest::hex(&keyapi_proxy::digest::sha256(t.as_bytes()));
    std::fs::write(
        &file,
        format!(
            "[[clients]]\nid = \"new-style\"\ntoken_sha256 = \"{}\"\nadmin = true\n\n\
             [[clients]]\nid = \"old-style\"\ntoken_sha256 = \"{}\"\npurge = true\n\n\
             [[clients]]\nid = \"plain\"\ntoken_sha256 = \"{}\"\n",
            hash(ADMIN),
            hash("kp_old-admin"),
            hash(USER)
        ),
    )
    .unwrap();
    let loaded = keyapi_proxy::config::Config::load(Some(&file)).unwrap();
    let flags: Vec<bool> = loaded.clients.iter().map(|c| c.admin).collect();
    assert_eq!(flags, [true, true, false]);
    let app = spawn_app_with(|c| c.clients = loaded.clients).await;
    app.get_hashtag_as(USER, "hashtag_name=ufc324").await;
    for token in [ADMIN, "kp_old-admin"] {
        let (status, body) = admin(&app, reqwest::Method::GET, "", Some(token)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = admin(&app, reqwest::Method::GET, "", Some(USER)).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = admin(
        &app,
        reqwest::Method::DELETE,
        "?all=true",
        Some("kp_old-admin"),
    )
    .await;
    assert_eq!(status, 200);
    let logs = common::logs::text();
    let logged = |action: &str, client: &str| {
        let client = format!("client=\"{client}\"");
        logs.lines()
            .any(|l| l.contains(action) && l.contains(&client))
    };
    assert!(logged("cache listed", "new-style"), "{logs}");
    assert!(logged("cache listed", "old-style"), "{logs}");
    assert!(logged("cache purge", "old-style"), "{logs}");
    std::fs::remove_dir_all(&dir).unwrap();
}
