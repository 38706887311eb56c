//! `[telemetry]` traces, end to end: the binary (with its built-in fake KeyAPI)
//! exports to a small OTLP/HTTP receiver inside the test, which decodes the
//! protobuf with `opentelemetry-proto`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, time::Duration};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use common::binary::spawn_binary;
use keyapi_proxy::{digest, route::HASHTAG_DETAIL_PATH};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value::Value},
    trace::v1::Span,
};
use prost::Message;
use tokio::{process::Child, sync::mpsc};

/// The key `--demo` runs with: it must not reach a span either.
const DEMO_KEY: &str = "demo-key-not-a-secret";
const TOKEN: &str = "kp_traces_test_token_4b1d";
/// A caller's trace: `traceparent` = 00-TRACE-PARENT-01 (sampled).
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver: every export's raw body, in arrival order.
struct Collector {
    url: String,
    exports: mpsc::UnboundedReceiver<Bytes>,
    spans: Vec<Span>,
    raw: Vec<Bytes>,
}

impl Collector {
    async fn start() -> Self {
        let (tx, exports) = mpsc::unbounded_channel();
        let app = Router::new()
            .route(
                "/v1/traces",
                post(
                    |State(tx): State<mpsc::UnboundedSender<Bytes>>, body: Bytes| async move {
                        let _ = tx.send(body);
                        StatusCode::OK
                    },
                ),
            )
            .with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url: format!("http://{addr}/v1/traces"),
            exports,
            spans: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// Waits (on the exports themselves) until a received span matches `found`.
    async fn span(&mut self, found: impl Fn(&Span) -> bool) -> Span {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(span) = self.spans.iter().find(|s| found(s)) {
                    return span.clone();
                }
                let body = self.exports.recv().await.expect("the receiver runs");
                self.receive(body);
            }
        });
        waited.await.expect("the span was exported within 10 s")
    }

    /// The request span of the trace `trace` (32 hex digits).
    async fn request_span(&mut self, trace: &str) -> Span {
        self.span(|s| s.name == HASHTAG_DETAIL_PATH && hex(&s.trace_id) == trace)
            .await
    }

    /// Takes in every export received so far (after the exporters have flushed).
    fn drain(&mut self) {
        while let Ok(body) = self.exports.try_recv() {
            self.receive(body);
        }
    }

    fn receive(&mut self, body: Bytes) {
        let request = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
        self.raw.push(body);
        let spans = request
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.extend(spans);
    }
}

/// The binary exporting to `collector`, with one client (`TOKEN`) and `env`.
async fn spawn_traced(collector: &Collector, env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let hash = digest::hex(&digest::sha256(TOKEN.as_bytes()));
    let clients = format!("[{{id=\"app\", token_sha256=\"{hash}\"}}]");
    let mut all = vec![
        (
            "KEYAPI_PROXY__TELEMETRY__OTLP_ENDPOINT",
            collector.url.as_str(),
        ),
        ("KEYAPI_PROXY__CLIENTS", clients.as_str()),
    ];
    all.extend_from_slice(env);
    spawn_binary(None, &all).await
}

async fn get(addr: SocketAddr, hashtag: &str, traceparent: Option<&str>) -> u16 {
    let url = format!("http://{addr}{HASHTAG_DETAIL_PATH}?hashtag_name={hashtag}");
    let mut request = reqwest::Client::new().get(url).bearer_auth(TOKEN);
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    request.send().await.unwrap().status().as_u16()
}

/// Sends SIGTERM and waits for the exit (the exporter flushes on the way out).
async fn stop(mut child: Child) {
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    assert!(status.unwrap().unwrap().success());
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attribute(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key}: {other:?} on {span:?}"),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{key}: {other:?} on {span:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    digest::hex(bytes)
}

#[tokio::test]
async fn a_miss_and_a_hit_are_spans_in_the_callers_trace_and_only_the_miss_calls_upstream() {
    let mut collector = Collector::start().await;
    let (child, addr) = spawn_traced(&collector, &[]).await;

    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    assert_eq!(get(addr, "tracedtag", Some(&traceparent)).await, 200);
    let request = collector.request_span(TRACE).await;
    assert_eq!(
        hex(&request.parent_span_id),
        PARENT,
        "the caller's span is the parent"
    );
    assert_eq!(text(&request, "http.route"), HASHTAG_DETAIL_PATH);
    assert_eq!(text(&request, "keyapi.cache"), "stored");
    assert_eq!(text(&request, "keyapi.client"), "app");
    assert_eq!(int(&request, "http.response.status_code"), 200);
    assert_eq!(int(&request, "keyapi.credits"), 2);
    let request_id = request.span_id.clone();
    let upstream = collector
        .span(|s| s.name == "GET KeyAPI" && s.parent_span_id == request_id)
        .await;
    assert_eq!(hex(&upstream.trace_id), TRACE);
    assert_eq!(int(&upstream, "keyapi.credits"), 2);
    assert_eq!(int(&upstream, "keyapi.attempt"), 1);
    assert_eq!(int(&upstream, "http.response.status_code"), 200);
    assert_eq!(text(&upstream, "keyapi.outcome"), "success");

    // The same question again, in another trace: a hit, no upstream span.
    let hit_trace = "0af7651916cd43dd8448eb211c80319c";
    let hit_parent = format!("00-{hit_trace}-b7ad6b7169203331-01");
    assert_eq!(get(addr, "TRACEDTAG", Some(&hit_parent)).await, 200);
    let hit = collector.request_span(hit_trace).await;
    assert_eq!(text(&hit, "keyapi.cache"), "hit");
    assert_eq!(int(&hit, "keyapi.credits"), 0);
    stop(child).await;
    // Everything exported by now is in; the hit's trace has its request span only.
    collector.drain();
    let in_hit_trace: Vec<_> = collector
        .spans
        .iter()
        .filter(|s| hex(&s.trace_id) == hit_trace)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(in_hit_trace, [HASHTAG_DETAIL_PATH]);

    // No secret or token reached any span: not the key, not the client's token.
    for body in &collector.raw {
        for secret in [DEMO_KEY, TOKEN] {
            let found = body.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret} was exported");
        }
    }
}

#[tokio::test]
async fn sampled_out_requests_export_nothing() {
    let mut collector = Collector::start().await;
    let (child, addr) = spawn_traced(
        &collector,
        &[("KEYAPI_PROXY__TELEMETRY__SAMPLE_RATIO", "0")],
    )
    .await;
    assert_eq!(get(addr, "sampledout", None).await, 200);
    assert_eq!(get(addr, "sampledout", None).await, 200);
    // Shutdown flushes the exporter: whatever it held has been sent once the process is gone.
    stop(child).await;
    assert!(
        collector.exports.try_recv().is_err(),
        "a sampled-out trace was exported"
    );
}

#[tokio::test]
async fn a_dead_collector_costs_no_failed_request_and_its_spans_are_counted() {
    // A port nobody listens on: every export is refused.
    let (_held, dead_addr) = common::refusing_addr();
    let mut collector = Collector::start().await;
    collector.url = format!("http://{dead_addr}/v1/traces");
    let (child, addr) = spawn_traced(&collector, &[]).await;

    for i in 0..10 {
        assert_eq!(
            get(addr, &format!("deadcollector{}", i % 3), None).await,
            200
        );
    }
    let metrics_url = format!("http://{addr}/metrics");
    let dropped = r#"keyapi_proxy_trace_spans_dropped_total{reason="export_failed"}"#;
    common::eventually(
        Duration::from_secs(10),
        "the lost spans are counted",
        || async {
            let text = reqwest::get(&metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            common::metric(&text, dropped) >= 10.0
        },
    )
    .await;
    stop(child).await;
}

/// `telemetry.propagate_upstream`: off (the default), a client's `traceparent` never
/// reaches KeyAPI; on, each attempt carries its own span's `traceparent`, in the
/// caller's trace. In-process, under a thread-local subscriber with an OpenTelemetry
/// layer (this test's runtime has one thread, so the app's tasks see it).
#[tokio::test]
async fn a_traceparent_reaches_keyapi_only_when_propagation_is_on() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    let _traced = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    for propagate in [false, true] {
        let app = common::spawn_app_with(|config| {
            // Exports go nowhere: this subscriber has no exporter.
            config.telemetry.otlp_endpoint = Some("http://127.0.0.1:9/v1/traces".into());
            config.telemetry.propagate_upstream = propagate;
        })
        .await;
        let response = app
            .get_hashtag_with("hashtag_name=propagated", &[("traceparent", &traceparent)])
            .await;
        assert_eq!(response.status(), 200);
        let sent = app.upstream.requests();
        assert_eq!(sent.len(), 1);
        let upstream = sent[0].headers.get("traceparent");
        if propagate {
            let value = upstream.expect("a traceparent").to_str().unwrap();
            assert!(value.starts_with(&format!("00-{TRACE}-")), "{value}");
            assert!(!value.contains(PARENT), "the attempt's own span: {value}");
        } else {
            assert!(upstream.is_none(), "{upstream:?} reached KeyAPI");
        }
    }
}

/// With the Redis tier on, a miss's Redis commands are child spans of its request
/// span, named for the command and carrying neither keys nor values; a second
/// replica's hit from Redis reads it in a `GET` span of its own trace.
#[tokio::test]
async fn redis_commands_are_spans_under_the_request() {
    let Some(redis) = common::redis_server::RedisServer::start().await else {
        return;
    };
    let mut collector = Collector::start().await;
    let url = redis.url();
    let redis_env = [("KEYAPI_PROXY__CACHE__REDIS__URL", url.as_str())];
    let (first, first_addr) = spawn_traced(&collector, &redis_env).await;
    let (second, second_addr) = spawn_traced(&collector, &redis_env).await;

    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    assert_eq!(get(first_addr, "redisspans", Some(&traceparent)).await, 200);
    let request = collector.request_span(TRACE).await;
    assert_eq!(text(&request, "keyapi.cache"), "stored");
    let request_id = request.span_id.clone();
    let lookup = collector
        .span(|s| s.name == "GET" && s.parent_span_id == request_id)
        .await;
    assert_eq!(text(&lookup, "db.system.name"), "redis");
    assert_eq!(text(&lookup, "db.operation.name"), "GET");
    assert_eq!(hex(&lookup.trace_id), TRACE);

    // The other replica answers from Redis: a hit whose trace has a Redis GET and no upstream call.
    let hit_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let hit_parent = format!("00-{hit_trace}-{PARENT}-01");
    assert_eq!(get(second_addr, "redisspans", Some(&hit_parent)).await, 200);
    let hit = collector.request_span(hit_trace).await;
    assert_eq!(text(&hit, "keyapi.cache"), "hit");
    let hit_id = hit.span_id.clone();
    collector
        .span(|s| s.name == "GET" && s.parent_span_id == hit_id)
        .await;
    stop(first).await;
    stop(second).await;
    collector.drain();
    // Nothing of the question (its hashtag, the Redis key) reached a span.
    for body in &collector.raw {
        let found = body.windows(10).any(|w| w == b"redisspans");
        assert!(!found, "a Redis key or value was exported");
    }
}
