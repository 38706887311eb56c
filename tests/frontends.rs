//! Public frontends, part one: who is calling (the caller's address, believed
//! from a forwarding header only behind `server.trusted_proxies`, shown in
//! every access-log line) and browser safety on loopback (a foreign `Host`
//! gets 421, a cross-site browser request 403, both before anything is spent).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::{TestApp, assert_envelope, binary::spawn_binary, header, logs, parts, spawn_app_with};
use keyapi_proxy::{caller::ForwardedHeader, config::Config, route::HASHTAG_DETAIL_PATH};

/// The app, its log captured.
async fn spawn_logged(adjust: impl FnOnce(&mut Config)) -> TestApp {
    logs::captured();
    spawn_app_with(adjust).await
}

/// `GET <route>?hashtag_name=<tag>` with `header: value`, tagged with a
/// request id of its own; returns the status and that request's access-log line.
async fn logged_get(app: &TestApp, tag: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let id = format!("frontends-{tag}");
    let mut with_id = vec![("X-Request-Id", id.as_str())];
    with_id.extend_from_slice(headers);
    let response = app
        .get_hashtag_with(&format!("hashtag_name={tag}"), &with_id)
        .await;
    let status = response.status().as_u16();
    response.bytes().await.unwrap();
    (status, logs::access_line(&id))
}

/// A client whose DNS says `host` is `addr` (a rebinding page's view), over
/// HTTP/2 (`:authority`) when `h2`, else HTTP/1.1 (`Host`).
fn client_resolving(host: &str, addr: SocketAddr, h2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .resolve(host, addr)
        .pool_max_idle_per_host(0);
    let builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder
    };
    builder.build().unwrap()
}

/// `GET http://<host>:<port><path>` reaching `app` whatever `host` is; (status, request id, body).
async fn get_as_host(app: &TestApp, host: &str, path: &str, h2: bool) -> (u16, String, String) {
    let client = client_resolving(host, app.addr, h2);
    let url = format!("http://{host}:{}{path}", app.addr.port());
    let (status, headers, body) = parts(client.get(url).send().await.unwrap()).await;
    (status, header(&headers, "x-request-id").to_owned(), body)
}

fn hashtag(tag: &str) -> String {
    format!("{HASHTAG_DETAIL_PATH}?hashtag_name={tag}")
}

#[tokio::test]
async fn a_spoofed_forwarding_header_from_an_untrusted_peer_changes_nothing() {
    for trusted in [vec![], vec!["10.0.0.0/8".parse().unwrap()]] {
        let tag = format!("spoof{}", trusted.len());
        let app = spawn_logged(|c| c.server.trusted_proxies = trusted).await;
        let spoof = [
            ("X-Forwarded-For", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9"),
        ];
        let (status, line) = logged_get(&app, &tag, &spoof).await;
        assert_eq!(status, 200);
        assert!(line.contains(" client_addr=127.0.0.1 "), "{line}");
        assert!(!line.contains("203.0.113.9"), "{line}");
        assert!(
            !line.contains("peer_addr"),
            "the peer is the caller: {line}"
        );
    }
}

#[tokio::test]
async fn behind_two_trusted_proxies_the_rightmost_untrusted_address_is_the_caller() {
    let app = spawn_logged(|c| {
        c.server.trusted_proxies = vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
    })
    .await;
    for (tag, xff) in [
        ("twohops", "203.0.113.9, 10.0.0.2"),
        // What the caller wrote itself, left of its own address, is not believed.
        ("twohopsspoofed", "198.51.100.66, 203.0.113.9, 10.0.0.2"),
    ] {
        let (status, line) = logged_get(&app, tag, &[("X-Forwarded-For", xff)]).await;
        assert_eq!(status, 200);
        assert!(line.contains(" client_addr=203.0.113.9 "), "{line}");
        assert!(line.contains(" peer_addr=127.0.0.1 "), "{line}");
    }
    // A trusted hop that reports no address is the caller.
    let (_, line) = logged_get(
        &app,
        "unknownhop",
        &[("X-Forwarded-For", "203.0.113.9, unknown, 10.0.0.2")],
    )
    .await;
    assert!(line.contains(" client_addr=10.0.0.2 "), "{line}");
    // Only the configured header is read: a Forwarded header here is the client's own.
    let (_, line) = logged_get(&app, "otherheader", &[("Forwarded", "for=203.0.113.9")]).await;
    assert!(line.contains(" client_addr=127.0.0.1 "), "{line}");
}

#[tokio::test]
async fn forwarded_for_is_read_when_it_is_the_configured_header() {
    let app = spawn_logged(|c| {
        c.server.trusted_proxies =
            vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        c.server.client_addr_header = ForwardedHeader::Forwarded;
    })
    .await;
    let v6 = r#"for=198.51.100.66, for="[2001:db8::1]:4711";proto=https, for=10.0.0.2;by=_lb"#;
    for (tag, forwarded, caller) in [
        ("fwdv6", v6, "2001:db8::1"),
        ("fwdv4", "For=203.0.113.9:4711", "203.0.113.9"),
        (
            "fwdhidden",
            "for=203.0.113.9, for=_hidden, for=10.0.0.2",
            "10.0.0.2",
        ),
    ] {
        let spoofed_xff = ("X-Forwarded-For", "198.51.100.77");
        let (status, line) = logged_get(&app, tag, &[("Forwarded", forwarded), spoofed_xff]).await;
        assert_eq!(status, 200);
        assert!(line.contains(&format!(" client_addr={caller} ")), "{line}");
        assert!(line.contains(" peer_addr=127.0.0.1 "), "{line}");
    }
}

#[tokio::test]
async fn refused_requests_are_logged_with_their_caller_too() {
    let app = spawn_logged(|_| {}).await;
    let (status, line) = logged_get(&app, "crosslogged", &[("Sec-Fetch-Site", "cross-site")]).await;
    assert_eq!(status, 403);
    assert!(
        line.contains(" status=403 ") && line.contains(" client_addr=127.0.0.1 "),
        "{line}"
    );
}

#[tokio::test]
async fn a_foreign_host_gets_421_and_costs_nothing() {
    let app = spawn_logged(|c| c.server.http2 = true).await;
    for h2 in [false, true] {
        let (status, id, body) = get_as_host(&app, "rebound.example", &hashtag("rebind"), h2).await;
        assert_eq!(status, 421, "h2={h2}: {body}");
        let message = assert_envelope(&body, 421, &id);
        assert!(message.contains("server.allowed_hosts"), "{message}");
        for path in ["/metrics", "/stats", "/"] {
            let (status, ..) = get_as_host(&app, "rebound.example", path, h2).await;
            assert_eq!(status, 421, "{path} h2={h2}");
        }
        // Probes answer whatever the Host: they spend nothing and tell only "up".
        for path in ["/healthz", "/readyz"] {
            let (status, ..) = get_as_host(&app, "rebound.example", path, h2).await;
            assert_eq!(status, 200, "{path} h2={h2}");
        }
    }
    assert_eq!(app.upstream.calls(), 0, "a foreign Host spent nothing");
    // Loopback names on any port are answered.
    for host in ["localhost", "127.0.0.1"] {
        let (status, _, body) = get_as_host(&app, host, &hashtag("rebind"), false).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    assert_eq!(app.upstream.calls(), 1);
}

#[tokio::test]
async fn allowed_hosts_replaces_the_default_and_a_star_allows_any() {
    let app =
        spawn_logged(|c| c.server.allowed_hosts = Some(vec!["proxy.example".parse().unwrap()]))
            .await;
    let (status, ..) = get_as_host(&app, "proxy.example", &hashtag("listed"), false).await;
    assert_eq!(status, 200);
    let (status, ..) = get_as_host(&app, "localhost", &hashtag("listed"), false).await;
    assert_eq!(status, 421, "the list replaces the loopback default");
    let any = spawn_logged(|c| c.server.allowed_hosts = Some(vec!["*".parse().unwrap()])).await;
    let (status, ..) = get_as_host(&any, "anything.example", &hashtag("star"), false).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_cross_site_browser_request_is_refused_while_cors_is_off() {
    let app = spawn_logged(|_| {}).await;
    let response = app
        .get_hashtag_with(
            "hashtag_name=crosssite",
            &[("Sec-Fetch-Site", "cross-site")],
        )
        .await;
    let (status, headers, body) = parts(response).await;
    assert_eq!(status, 403);
    let message = assert_envelope(&body, 403, header(&headers, "x-request-id"));
    assert!(message.contains("cors.allowed_origins"), "{message}");
    assert_eq!(app.upstream.calls(), 0, "refused before it could spend");
    for site in ["same-origin", "same-site", "none"] {
        let response = app
            .get_hashtag_with("hashtag_name=crosssite", &[("Sec-Fetch-Site", site)])
            .await;
        assert_eq!(response.status(), 200, "{site}");
    }
    assert_eq!(app.upstream.calls(), 1);
    // Only the proxied routes spend: the operational endpoints still answer.
    let health = app
        .client
        .get(app.url("/healthz"))
        .header("Sec-Fetch-Site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn with_cors_on_an_allowed_origin_decides_a_cross_site_request() {
    const ORIGIN: &str = "https://app.example.com";
    let app = spawn_logged(|c| c.cors.allowed_origins = vec![ORIGIN.into()]).await;
    let cross = ("Sec-Fetch-Site", "cross-site");
    let allowed = app
        .get_hashtag_with("hashtag_name=corscross", &[cross, ("Origin", ORIGIN)])
        .await;
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        header(allowed.headers(), "access-control-allow-origin"),
        ORIGIN
    );
    assert_eq!(app.upstream.calls(), 1);
    let other = app
        .get_hashtag_with(
            "hashtag_name=corsother",
            &[cross, ("Origin", "https://evil.example")],
        )
        .await;
    assert_eq!(other.status(), 403, "an origin not on the list");
    // A cross-site request that is no CORS request (an <img>, a link) is not the list's to allow.
    let no_origin = app.get_hashtag_with("hashtag_name=corsimg", &[cross]).await;
    assert_eq!(no_origin.status(), 403);
    assert_eq!(app.upstream.calls(), 1, "refusals spent nothing");
}

#[tokio::test]
async fn the_demo_quick_start_answers_on_its_loopback_names() {
    let (_child, addr) = spawn_binary(None, &[]).await;
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("http://{host}:{}{}", addr.port(), hashtag("ufc324"));
        let response = client_resolving(host, addr, false)
            .get(url)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{host}");
    }
}
