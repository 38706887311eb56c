//! The connection layer against hostile clients: slowloris heads and idle
//! keep-alive connections are cut after their timeouts, answers a client does
//! not take (HTTP/1 not reading, HTTP/2 at a zero window) after the send
//! timeout, silent sockets and stuck HTTP/2 connections beyond the cap (or the
//! descriptor limit) make room for real clients, oversized heads and `PRI`
//! over HTTP/1 are refused, h2c is spoken only when enabled, and SIGTERM with
//! silent or stuck connections exits at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{StalledH2, await_metric, binary::spawn_binary, spawn_app_with};
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
    // (A real sleep: the drip is the slow client itself, against the server's real timer.)
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

/// The HTTP/2 client preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served_on_the_same_port_only_when_enabled() {
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let app = spawn_app_with(|c| c.server.http2 = true).await;
    let response = h2.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);

    // The default: HTTP/1.1 only. hyper's parser closes a connection that
    // opens with the HTTP/2 preface, answering nothing.
    let app = spawn_app_with(|_| {}).await;
    assert!(h2.get(app.url("/healthz")).send().await.is_err());
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest))
        .await
        .expect("the connection is closed");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // HTTP/1.1 still works on the same port.
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

/// Reads one HTTP/1.1 answer (head and `Content-Length` body) from `stream`.
async fn answer_on(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .map_or(0, |n| n.trim().parse().unwrap());
            if body.len() >= length {
                return text;
            }
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "answer: {text}");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn pri_over_http1_is_a_400_and_later_heads_stay_timed() {
    let timeout = Duration::from_millis(200);
    for http2 in [false, true] {
        let app = spawn_app_with(|c| {
            c.server.http2 = http2;
            c.server.header_read_timeout = timeout;
            c.server.idle_timeout = Duration::from_secs(30);
        })
        .await;
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream
            .write_all(b"PRI / HTTP/1.1\r\nHost: proxy\r\n\r\n")
            .await
            .unwrap();
        let answer = answer_on(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "http2 = {http2}: {answer}"
        );
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        let envelope: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(envelope["code"], 400, "{body}");
        assert!(
            envelope["message"].as_str().unwrap().contains("PRI"),
            "{body}"
        );

        // The connection still speaks HTTP/1: a slow head is cut by the
        // header timer, not left to the idle one.
        let started = Instant::now();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let elapsed = closed_after(&mut stream, started, Duration::from_secs(3)).await;
        assert!(elapsed >= timeout, "cut too early: {elapsed:?}");
        assert!(
            elapsed < timeout * 4,
            "http2 = {http2}: cut late: {elapsed:?}"
        );
    }
}

#[tokio::test]
async fn an_http1_client_that_does_not_read_is_closed_after_the_send_timeout() {
    let send_timeout = Duration::from_millis(300);
    let app = spawn_app_with(|c| c.server.send_timeout = send_timeout).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    // Pipelined requests for the status page: megabytes of answers, more
    // than both sockets' buffers hold, and the client reads none of them.
    let addr = app.addr;
    let requests = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(2000);
    let started = Instant::now();
    stream.write_all(requests.as_bytes()).await.unwrap();
    let send_timeouts = r#"keyapi_proxy_connections_closed_total{reason="send_timeout"}"#;
    await_metric(&app, send_timeouts, 1.0, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= send_timeout, "closed too early: {elapsed:?}");
    drop(stream);
}

#[tokio::test]
async fn http2_streams_at_a_zero_window_are_closed_after_the_send_timeout() {
    let send_timeout = Duration::from_millis(300);
    let app = spawn_app_with(|c| {
        c.server.http2 = true;
        c.server.send_timeout = send_timeout;
    })
    .await;
    let stalled = StalledH2::open(&app, 3).await;
    let answered = Instant::now();
    let elapsed = stalled.closed(answered, Duration::from_secs(3)).await;
    assert!(elapsed >= send_timeout, "closed too early: {elapsed:?}");
    assert!(elapsed < send_timeout * 2, "closed too late: {elapsed:?}");
    let text = app.metrics().await;
    let send_timeouts = r#"keyapi_proxy_connections_closed_total{reason="send_timeout"}"#;
    assert_eq!(common::metric(&text, send_timeouts), 1.0, "{text}");
}

#[tokio::test]
async fn stuck_http2_connections_at_the_cap_make_room_for_real_clients() {
    // The default send timeout (30 s) never fires here: room comes from eviction.
    let app = spawn_app_with(|c| {
        c.server.http2 = true;
        c.server.max_connections = Some(3);
        // A short reap period: stuck is "no progress for two periods".
        c.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(StalledH2::open(&app, 10).await);
    }
    let started = Instant::now();
    // Refused while the answers are still fresh, served once they count as stuck.
    let served = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match app.client.get(app.url("/healthz")).send().await {
                Ok(response) => return response.status(),
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("a real client is served at the cap");
    assert_eq!(served, 200);
    // The oldest stuck connection made room.
    let oldest = stalled.remove(0);
    oldest.closed(started, Duration::from_secs(1)).await;
    let text = app.metrics().await;
    let evicted = r#"keyapi_proxy_connections_closed_total{reason="evicted"}"#;
    assert!(common::metric(&text, evicted) >= 1.0, "{text}");
}

#[tokio::test]
async fn shutdown_does_not_wait_for_http2_streams_at_a_zero_window() {
    let mut app = spawn_app_with(|c| {
        c.server.http2 = true;
        c.server.shutdown_grace = Duration::from_secs(30);
        c.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let stalled = [
        StalledH2::open(&app, 5).await,
        StalledH2::open(&app, 5).await,
    ];
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), app.begin_shutdown())
        .await
        .expect("shutdown well within the grace period despite stuck streams")
        .unwrap();
    for connection in stalled {
        connection.closed(started, Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn http2_pings_between_requests_do_not_start_the_header_timer() {
    let app = spawn_app_with(|c| {
        c.server.http2 = true;
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
    // connection is idle (30 s) rather than reading a head (100 ms). A real
    // sleep: the header timer is the server's real one, and this is the silence
    // it must not count (no signal marks a timer that did not fire).
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
    let mut app = spawn_app_with(|c| {
        c.server.http2 = true;
        c.server.shutdown_grace = Duration::from_secs(30);
    })
    .await;
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
