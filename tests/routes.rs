//! The route table end to end: a second, fictional KeyAPI route configured
//! next to hashtag detail is served by the same machinery — its own
//! parameters and defaults, its own price on the ledger, its own path item in
//! OpenAPI, purged by route — and a daily freshness rule expires answers at
//! the UTC day boundary on the app's clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use common::{
    TestApp, assert_envelope, assert_stored_miss, client, header, metric, parts, spawn_app_with,
    spawn_app_with_clock, stampede,
};
use keyapi_proxy::{
    app::App,
    clock::ManualClock,
    config::{Config, ParamConfig, ParamKind, RouteConfig, RouteFreshness},
    route::HASHTAG_DETAIL_PATH,
};
use secrecy::SecretString;
use serde_json::Value;

const LIST: &str = "/v1/tiktok/trending/hashtag/list";
const ADMIN: &str = "kp_routes_admin";

/// `/v1/tiktok/trending/hashtag/list`: period and region like hashtag
/// detail, `page` an integer 1-50 (default 1), 1 credit a call.
fn list_route(config: &Config) -> RouteConfig {
    let detail = &config.routes[0];
    RouteConfig {
        path: LIST.into(),
        credits: Some(1),
        ttl_by: None,
        params: vec![
            detail.params[0].clone(),
            detail.params[1].clone(),
            ParamConfig {
                name: "page".into(),
                kind: Some(ParamKind::Int),
                min: Some(1),
                max: Some(50),
                default: Some("1".into()),
                ..ParamConfig::default()
            },
        ],
        ..detail.clone()
    }
}

fn with_list_route(c: &mut Config) {
    let list = list_route(c);
    c.routes.push(list);
}

async fn get(app: &TestApp, path_and_query: &str) -> (u16, reqwest::header::HeaderMap, String) {
    parts(
        app.client
            .get(app.url(path_and_query))
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn defaults_and_normalization_share_one_key_and_the_upstream_query() {
    let app = spawn_app_with(with_list_route).await;
    for query in [
        "",
        "?page=1",
        "?page=01&region=ALL_REGIONS",
        "?period=7&_=cache-buster",
    ] {
        let (status, _, body) = get(&app, &format!("{LIST}{query}")).await;
        assert_eq!(status, 200, "{query}: {body}");
    }
    assert_eq!(app.upstream.calls(), 1);
    let sent = &app.upstream.requests()[0];
    assert_eq!(
        sent.path_and_query,
        format!("{LIST}?period=7&region=all_regions&page=1")
    );
    // The fake echoes other routes' parameters: what the client gets is KeyAPI's body.
    let (_, headers, body) = get(&app, &format!("{LIST}?page=2&region=us")).await;
    assert_stored_miss(&headers);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"]["params"]["page"], "2");
    assert_eq!(v["data"]["params"]["region"], "US");
}

#[tokio::test]
async fn fifty_concurrent_cold_requests_make_one_call() {
    let app = spawn_app_with(with_list_route).await;
    let results = stampede(&[&app], 50, |_| format!("{LIST}?page=3"), 1).await;
    assert!(results.iter().all(|(status, ..)| *status == 200));
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn bad_parameters_are_refused_without_a_call() {
    let app = spawn_app_with(with_list_route).await;
    for (query, hint) in [
        ("page=0", "\"page\" must be an integer from 1 to 50"),
        ("page=51", "\"page\" must be an integer from 1 to 50"),
        ("page=two", "\"page\" must be an integer from 1 to 50"),
        ("page=1&page=2", "\"page\" is given more than once"),
        ("period=8", "\"period\" must be one of"),
    ] {
        let (status, headers, body) = get(&app, &format!("{LIST}?{query}")).await;
        assert_eq!(status, 400, "{query}");
        let message = assert_envelope(&body, 400, header(&headers, "x-request-id"));
        assert!(message.contains(hint), "{query}: {message}");
    }
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn each_route_is_charged_its_own_price() {
    let app = spawn_app_with(|c| {
        with_list_route(c);
        c.credits.daily_budget = 4;
    })
    .await;
    assert_eq!(get(&app, LIST).await.0, 200);
    assert_eq!(get(&app, LIST).await.0, 200, "a hit");
    assert_eq!(app.get("hashtag_name=ufc324").await.0, 200);
    // 1 + 2 credits spent: a second list question (1) fits, a detail one (2) does not.
    assert_eq!(get(&app, &format!("{LIST}?page=2")).await.0, 200);
    assert_eq!(app.get("hashtag_name=nba").await.0, 429);
    let text = app.metrics().await;
    assert_eq!(metric(&text, "keyapi_proxy_credits_spent_total"), 4.0);
    assert_eq!(metric(&text, "keyapi_proxy_credits_saved_total"), 1.0);
    assert_eq!(
        metric(
            &text,
            &format!(
                "keyapi_proxy_requests_total{{route=\"{LIST}\",status=\"200\",cache=\"hit\"}}"
            )
        ),
        1.0
    );
    assert_eq!(app.upstream.calls(), 3);
    let stats: Value = serde_json::from_str(&get(&app, "/stats").await.2).unwrap();
    assert_eq!(stats["creditsSpentToday"], 4);
    assert_eq!(stats["routes"][1]["path"], LIST);
    assert_eq!(stats["routes"][1]["credits"], 1);
}

#[tokio::test]
async fn openapi_documents_both_routes_with_their_parameter_rules() {
    let app = spawn_app_with(with_list_route).await;
    let doc: Value = serde_json::from_str(&get(&app, "/openapi.json").await.2).unwrap();
    for path in [HASHTAG_DETAIL_PATH, LIST] {
        assert!(
            doc["paths"][path]["get"]["responses"]["200"].is_object(),
            "{path}"
        );
    }
    let params = doc["paths"][LIST]["get"]["parameters"].as_array().unwrap();
    let page = params.iter().find(|p| p["name"] == "page").unwrap();
    // An integer 1-50, or empty for the default.
    let integer = &page["schema"]["anyOf"][0];
    assert_eq!(integer["type"], "integer");
    assert_eq!(integer["minimum"], 1);
    assert_eq!(integer["maximum"], 50);
    assert_eq!(page["schema"]["anyOf"][1]["maxLength"], 0);
    assert_eq!(page["schema"]["default"], 1);
    assert_eq!(page["required"], false);
    let names: Vec<&str> = params.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["period", "region", "page"]);
    assert!(
        doc["paths"][LIST]["get"]["summary"]
            .as_str()
            .unwrap()
            .contains("1 credits")
    );
}

#[tokio::test]
async fn admin_purges_one_key_by_route() {
    let app = spawn_app_with(|c| {
        with_list_route(c);
        let mut admin = client("ops", ADMIN);
        admin.admin = true;
        c.clients = vec![admin];
    })
    .await;
    let as_admin = |method: reqwest::Method, path_and_query: String| {
        app.client
            .request(method, app.url(&path_and_query))
            .bearer_auth(ADMIN)
            .send()
    };
    let list = |page: u8| as_admin(reqwest::Method::GET, format!("{LIST}?page={page}"));
    assert_eq!(list(2).await.unwrap().status(), 200);
    // Two routes: the purge must say which.
    let purge = as_admin(reqwest::Method::DELETE, "/admin/cache?page=2".into());
    let (status, headers, body) = parts(purge.await.unwrap()).await;
    assert_eq!(status, 400);
    let message = assert_envelope(&body, 400, header(&headers, "x-request-id"));
    assert!(message.contains("\"route\" is required"), "{message}");
    let purge = as_admin(
        reqwest::Method::DELETE,
        format!("/admin/cache?route={LIST}&page=02"),
    );
    let (status, _, body) = parts(purge.await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let purged: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(purged["purged"], 1);
    assert_eq!(
        purged["key"],
        format!("{LIST}?period=7&region=all_regions&page=2")
    );
    let (_, headers, _) = parts(list(2).await.unwrap()).await;
    assert!(
        header(&headers, "cache-status").ends_with("stored"),
        "fetched again"
    );
    let listed = as_admin(reqwest::Method::GET, format!("/admin/cache?route={LIST}"));
    let listed: Value = serde_json::from_str(&listed.await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(listed["count"], 1);
    assert_eq!(listed["entries"][0]["params"]["page"], "2");
}

#[tokio::test]
async fn daily_freshness_expires_at_the_utc_boundary_on_the_app_clock() {
    // 23:50 UTC; the day's data is complete at 00:30.
    let day = 24 * 3600;
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(20_000 * day - 600),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| {
        let detail = &mut c.routes[0];
        detail.freshness = Some(RouteFreshness::Daily);
        detail.daily_offset = Some(Duration::from_secs(1800));
        detail.ttl = Some(Duration::from_secs(day));
        detail.ttl_by = None;
        detail.stale_while_revalidate = Some(Duration::ZERO);
        detail.stale_if_error = Some(Duration::ZERO);
    })
    .await;
    let (_, headers, _) = app.get("hashtag_name=ufc324").await;
    assert_stored_miss(&headers);
    // Fresh for 40 minutes: until 00:30 UTC, not for the 24 h TTL.
    clock.advance(Duration::from_secs(39 * 60));
    let (_, headers, _) = app.get("hashtag_name=ufc324").await;
    assert_eq!(
        header(&headers, "cache-status"),
        "keyapi-proxy; hit; ttl=60"
    );
    clock.advance(Duration::from_secs(61));
    let (_, headers, _) = app.get("hashtag_name=ufc324").await;
    assert_stored_miss(&headers);
    assert_eq!(app.upstream.calls(), 2);
}

#[tokio::test]
async fn a_bad_route_is_refused_at_start_up_naming_the_route_and_the_field() {
    let mut config = Config::defaults().unwrap();
    with_list_route(&mut config);
    config.routes[1].params[2].default = Some("99".into());
    let error = App::build(config, SecretString::from("k"))
        .await
        .err()
        .unwrap();
    assert_eq!(
        error.to_string(),
        format!(
            "configuration: routes[1] ({LIST}): params[2] (page): default: \"99\" is not an \
             integer from 1 to 50"
        )
    );
    let mut config = Config::defaults().unwrap();
    config.routes.push(config.routes[0].clone());
    let error = App::build(config, SecretString::from("k"))
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("routes[1]"), "{error}");
    assert!(
        error
            .to_string()
            .contains("the same path is configured twice"),
        "{error}"
    );
}
