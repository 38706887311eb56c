//! `/openapi.json` is OpenAPI 3.1, documents every route the router serves,
//! and names exactly the parameters the route parses, with the configured
//! periods as the enum.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{spawn_app, spawn_app_with};
use keyapi_proxy::{route::HASHTAG_DETAIL_PATH, routes::OPERATIONAL_PATHS};
use serde_json::Value;

async fn document(app: &common::TestApp) -> Value {
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

fn param_names(operation: &Value) -> BTreeSet<String> {
    operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["in"], "query");
            p["name"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn document_is_openapi_3_1_and_covers_every_route() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "keyapi-proxy");
    assert!(doc["info"]["version"].is_string());
    let documented: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let served: BTreeSet<&str> = OPERATIONAL_PATHS
        .into_iter()
        .chain([HASHTAG_DETAIL_PATH])
        .collect();
    assert_eq!(documented, served);
    // Every documented schema reference resolves.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(doc["components"]["schemas"][name].is_object(), "{name}");
    }
    for path in OPERATIONAL_PATHS.into_iter().chain([HASHTAG_DETAIL_PATH]) {
        let ops = doc["paths"][path].as_object().unwrap();
        assert!(!ops.is_empty(), "{path}");
        for (method, op) in ops {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
        }
    }
    assert_eq!(app.upstream.calls(), 0);
}

#[tokio::test]
async fn proxied_route_names_every_parameter_with_its_rules() {
    let app = spawn_app_with(|c| {
        let period = &mut c.routes[0].params[0];
        period.one_of = Some(vec!["7".into(), "30".into()]);
        period.default = Some("30".into());
        c.routes[0].ttl_by = None;
    })
    .await;
    let doc = document(&app).await;
    let get = &doc["paths"][HASHTAG_DETAIL_PATH]["get"];
    let expected: BTreeSet<String> = ["hashtag_name", "period", "region"]
        .map(String::from)
        .into();
    assert_eq!(param_names(get), expected);
    let purge = &doc["paths"]["/admin/cache"]["delete"];
    assert_eq!(param_names(purge), ["route".to_owned()].into());

    let param = |name: &str| {
        get["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(param("hashtag_name")["required"], true);
    assert_eq!(
        param("period")["schema"]["enum"],
        serde_json::json!(["7", "30"])
    );
    assert_eq!(param("period")["schema"]["default"], "30");
    assert_eq!(param("region")["schema"]["default"], "all_regions");
    for status in ["200", "304", "400", "401", "429", "502", "504"] {
        assert!(get["responses"][status].is_object(), "response {status}");
    }
    let headers = get["responses"]["200"]["headers"].as_object().unwrap();
    for name in ["Cache-Status", "Age", "ETag", "X-Request-Id"] {
        assert!(headers.contains_key(name), "{name}");
    }
    let envelope = &doc["components"]["schemas"]["Envelope"]["properties"];
    for field in ["code", "message", "data", "requestId"] {
        assert!(envelope[field].is_object(), "envelope field {field}");
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert!(schemes.contains_key("bearer") && schemes.contains_key("apiKey"));
}
