//! The connection layer against hostile clients: slowloris heads and idle
//! keep-alive connections are cut after their timeouts, silent sockets beyond
//! the cap (or the descriptor limit) make room for real clients, oversized
//! heads are refused, and SIGTERM with silent connections exits at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{spawn_app_with, spawn_binary};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n";

/// Reads until the server closes the connection; returns when that happened.
async fn closed_after(stream: &mut TcpStream, started: Instant, within: Duration) -> Duration {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection")
}

/// Sends `GET /healthz` on a kept-alive connection and reads the answer's head and body.
async fn healthz_on(stream: &mut TcpStream) {
    stream.write_all(HEALTHZ).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"{\"status\":\"ok\"}") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "answer: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn a_slowloris_head_is_cut_after_the_header_timeout() {
    let timeout = Duration::from_millis(200);
    let app = spawn_app_with(|c| {
        c.server.header_read_timeout = timeout;
        c.server.idle_timeout = Duration::from_secs(30);
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // One header byte every 20 ms: the client is never silent, yet its head never ends.
    let (mut read, mut write) = stream.split();
    let drip = async {
        loop {
            if write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let closed = async {
        let mut buf = [0u8; 64];
        while let Ok(n) = read.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        started.elapsed()
    };
    let elapsed = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::select! { () = drip => started.elapsed(), e = closed => e }
    })
    .await
    .expect("the slow head is cut");
    assert!(elapsed >= timeout, "cut too early: {elapsed:?}");
    assert!(elapsed < timeout * 4, "cut too late: {elapsed:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // The idle timeout is the longer one here: a silent keep-alive connection
    // must not be cut by the header timer.
    let idle = Duration::from_millis(600);
    let app = spawn_app_with(|c| {
        c.server.header_read_timeout = Duration::from_millis(100);
        c.server.idle_timeout = idle;
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    healthz_on(&mut stream).await;
    let answered = Instant::now();
    healthz_on(&mut stream).await; // still open: keep-alive works
    let elapsed = closed_after(&mut stream, answered, Duration::from_secs(3)).await;
    assert!(
        elapsed >= idle,
        "closed before the idle timeout: {elapsed:?}"
    );
    assert!(elapsed < idle * 3, "closed too late: {elapsed:?}");
    // Counted once, when its task ended; the scrape's own connection is the one open.
    let text = app.metrics().await;
    let closed = r#"keyapi_proxy_connections_closed_total{reason="idle_timeout"}"#;
    assert_eq!(common::metric(&text, closed), 1.0);
    assert_eq!(
        common::metric(&text, "keyapi_proxy_connections_accepted_total"),
        2.0
    );
    assert_eq!(common::metric(&text, "keyapi_proxy_connections_open"), 1.0);
}

#[tokio::test]
async fn silent_sockets_beyond_the_cap_make_room_for_real_clients() {
    let app = spawn_app_with(|c| c.server.max_connections = Some(8)).await;
    app.get_hashtag("hashtag_name=ufc324").await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let started = Instant::now();
    let (status, headers, _) = common::parts(
        tokio::time::timeout(
            Duration::from_secs(1),
            app.get_hashtag("hashtag_name=ufc324"),
        )
        .await
        .expect("a real client is served at the cap"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(common::header(&headers, "cache-status").contains("; hit"));
    // The oldest silent socket was closed to make room.
    closed_after(&mut silent[0], started, Duration::from_secs(1)).await;
    assert_eq!(app.upstream.calls(), 1);
    // Two requests and 20 silent sockets, then the scrape: all accepted, none refused.
    let text = app.metrics().await;
    assert_eq!(
        common::metric(&text, "keyapi_proxy_connections_accepted_total"),
        23.0
    );
    assert_eq!(
        common::metric(&text, "keyapi_proxy_connections_refused_total"),
        0.0
    );
    let evicted = r#"keyapi_proxy_connections_closed_total{reason="evicted"}"#;
    assert!(common::metric(&text, evicted) >= 1.0, "{text}");
}

#[tokio::test]
async fn oversized_heads_are_refused() {
    let app = spawn_app_with(|_| {}).await;
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("x-padding", "a".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let mut request = app.client.get(app.url("/healthz"));
    for i in 0..100 {
        request = request.header(format!("x-h{i}"), "1");
    }
    assert_eq!(request.send().await.unwrap().status(), 431);
}

#[tokio::test]
async fn silent_sockets_beyond_the_descriptor_limit_leave_the_service_answering() {
    let (_child, addr) = spawn_binary(Some(256), &[]).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let hashtag = format!("http://{addr}/v1/tiktok/trending/hashtag/detail?hashtag_name=ufc324");
    assert_eq!(client.get(&hashtag).send().await.unwrap().status(), 200);

    let mut silent = Vec::new();
    for _ in 0..400 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    for _ in 0..3 {
        let health = client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let hit = client.get(&hashtag).send().await.unwrap();
        assert_eq!(hit.status(), 200);
        let status = hit.headers()["cache-status"].to_str().unwrap().to_owned();
        assert!(status.contains("; hit"), "{status}");
    }
}

#[tokio::test]
async fn sigterm_with_silent_connections_exits_at_once_and_writes_the_snapshot() {
    let dir = std::env::temp_dir().join(format!("keyapi-proxy-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snapshot = dir.join("cache.snap");
    let (mut child, addr) = spawn_binary(
        None,
        &[(
            "KEYAPI_PROXY__CACHE__SNAPSHOT_PATH",
            snapshot.to_str().unwrap(),
        )],
    )
    .await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    healthz_on(&mut idle).await;
    let mut half_sent = TcpStream::connect(addr).await.unwrap();
    half_sent
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: pro")
        .await
        .unwrap();
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    // The proxy accepted all three before the signal.
    healthz_on(&mut fresh).await;

    let started = Instant::now();
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(1), child.wait())
        .await
        .expect("exits within a second")
        .unwrap();
    assert!(status.success(), "{status:?} after {:?}", started.elapsed());
    assert!(Path::new(&snapshot).is_file(), "final snapshot written");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served_on_the_same_port() {
    let app = spawn_app_with(|_| {}).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
}

#[tokio::test]
async fn http2_pings_between_requests_do_not_start_the_header_timer() {
    let app = spawn_app_with(|c| {
        c.server.header_read_timeout = Duration::from_millis(100);
        c.server.idle_timeout = Duration::from_secs(30);
    })
    .await;
    // A client that PINGs its idle connection every 20 ms, as gRPC-style clients do.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_keep_alive_interval(Duration::from_millis(20))
        .http2_keep_alive_while_idle(true)
        .build()
        .unwrap();
    let healthz = app.url("/healthz");
    assert_eq!(h2.get(&healthz).send().await.unwrap().status(), 200);
    // Five header timeouts of PINGs: frames, not request heads, so the
    // connection is idle (30 s) rather than reading a head (100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h2.get(&healthz).send().await.unwrap().status(), 200);

    let text = app.metrics().await;
    let cut = r#"keyapi_proxy_connections_closed_total{reason="header_read_timeout"}"#;
    assert_eq!(common::metric(&text, cut), 0.0, "{text}");
    assert_eq!(
        common::metric(&text, "keyapi_proxy_connections_accepted_total"),
        2.0,
        "one HTTP/2 connection for both requests, and the scrape's"
    );
}

#[tokio::test]
async fn a_busy_connection_is_told_to_close_after_its_answer_on_shutdown() {
    let mut app = spawn_app_with(|_| {}).await;
    app.upstream.hold();
    let in_flight = app.spawn_get_hashtag("hashtag_name=ufc324");
    app.upstream.wait_for_calls(1).await;
    let server = app.begin_shutdown();
    // The listener closes just before the drain is announced to every connection.
    while TcpStream::connect(app.addr).await.is_ok() {
        tokio::task::yield_now().await;
    }
    app.upstream.release();
    let (status, headers, _) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(common::header(&headers, "connection"), "close");
    server.await.unwrap();
}

#[tokio::test]
async fn an_idle_http2_connection_does_not_hold_shutdown() {
    let mut app = spawn_app_with(|c| c.server.shutdown_grace = Duration::from_secs(30)).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    // The client keeps its connection open; the drain must not wait for it.
    tokio::time::timeout(Duration::from_secs(1), app.begin_shutdown())
        .await
        .expect("shutdown within a second despite an idle HTTP/2 connection")
        .unwrap();
    drop(h2);
}
