//! Test harness: spawns the real app on port 0 against a local fake KeyAPI
//! that counts calls and records what it received.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod binary;
pub mod cluster;
pub mod entries;
pub mod logs;
pub mod redis_ha;
pub mod redis_server;
pub mod relay;
pub mod tokens;

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::Empty;
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyapi_proxy::{
    app::{App, Origin},
    clock::{Clock, ManualClock, SystemClock},
    config::{ClientConfig, Config},
    demo::FakeUpstream,
    digest,
    route::HASHTAG_DETAIL_PATH,
    state::AppState,
};
use secrecy::SecretString;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
};

/// The KeyAPI key the tests configure; it must never come back out.
pub const TEST_API_KEY: &str = "sk-live-TESTKEY-9f8e7d6c5b4a39281706";

/// A running proxy plus its fake upstream.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    /// Shared by replicas made with [`TestApp::spawn_replica`].
    pub upstream: Arc<FakeUpstream>,
    /// The app's shared state, e.g. to await background refreshes.
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// Compiled-in defaults with a free port and a quiet upstream.
pub fn test_config() -> Config {
    let mut config = Config::defaults().expect("defaults are valid");
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config
}

/// A plain TTL with no stale windows: entries simply expire (for expiry tests).
pub fn plain_ttl(config: &mut Config, ttl: Duration) {
    config.cache.ttl = ttl;
    config.cache.stale_while_revalidate = Duration::ZERO;
    config.cache.stale_if_error = Duration::ZERO;
}

/// A clock standing at the present, moved only by the test (share it to
/// move several replicas' time at once).
pub fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemTime::now()))
}

/// Moves `clock` past `ttl`: an entry stored before, with that lifetime, is
/// no longer fresh (an entry is stale from the moment its age equals its TTL).
pub fn let_expire(clock: &ManualClock, ttl: Duration) {
    clock.advance(ttl);
}

/// A `[[clients]]` entry for `token` (only its hash is configured).
pub fn client(id: &str, token: &str) -> ClientConfig {
    ClientConfig {
        id: id.into(),
        token_sha256: digest::hex(&digest::sha256(token.as_bytes())),
        refresh: false,
        admin: false,
        rate_per_minute: None,
        burst: None,
        daily_budget: None,
    }
}

/// Forwarding headers believed from loopback, so one test process can be many
/// visitors (each by its `X-Forwarded-For`), each with `daily_budget` credits a day.
pub fn visitors(config: &mut Config, daily_budget: u64) {
    config.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    config.visitors.daily_budget = daily_budget;
}

/// The app with default configuration.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The app with configuration adjusted by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with_clock(Arc::new(SystemClock), adjust).await
}

/// The app counting time (rate limits, budgets, stats) with `clock`.
pub async fn spawn_app_with_clock(
    clock: Arc<dyn Clock>,
    adjust: impl FnOnce(&mut Config),
) -> TestApp {
    init_test_logging();
    let upstream = FakeUpstream::start(TEST_API_KEY, Duration::ZERO)
        .await
        .expect("fake upstream starts");
    spawn_on(Arc::new(upstream), clock, adjust).await
}

/// The configuration file and key file of a proxy that reloads them, in a
/// directory of their own (removed when dropped).
pub struct LiveFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub key: PathBuf,
}

impl LiveFiles {
    /// A fresh directory named after `test`, holding the key [`TEST_API_KEY`].
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("keyapi-live-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files = Self {
            config: dir.join("proxy.toml"),
            key: dir.join("keyapi_key"),
            dir,
        };
        files.replace_key(TEST_API_KEY);
        files
    }

    /// Writes the configuration file: `[server]` on a free loopback port,
    /// `[upstream]` at `upstream` followed by `body` (which may go on with
    /// `[upstream]` keys before its own tables).
    pub fn write_config(&self, upstream: &FakeUpstream, body: &str) {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[upstream]\nbase_url = \"{}\"\n{body}",
            upstream.base_url()
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Replaces the key file as Docker and Kubernetes do: a new file renamed over it.
    pub fn replace_key(&self, key: &str) {
        let next = self.dir.join("keyapi_key.next");
        std::fs::write(&next, format!("{key}\n")).unwrap();
        std::fs::rename(&next, &self.key).unwrap();
    }
}

impl Drop for LiveFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The proxy configured by `files` (read as the binary reads them: file,
/// then environment; the key from its file), reloading them on request,
/// against `upstream`, counting time with `clock`.
pub async fn spawn_from_files(
    files: &LiveFiles,
    upstream: Arc<FakeUpstream>,
    clock: Arc<dyn Clock>,
) -> TestApp {
    init_test_logging();
    let config = Config::load(Some(&files.config)).expect("the configuration file loads");
    let key = keyapi_proxy::config::read_api_key_file(&files.key).expect("the key file reads");
    let origin = Origin {
        config_file: Some(files.config.clone()),
        key_file: Some(files.key.clone()),
        base_url: None,
    };
    let app = App::build_from(origin, config, key, clock)
        .await
        .expect("app builds");
    serve(app, upstream)
}

async fn spawn_on(
    upstream: Arc<FakeUpstream>,
    clock: Arc<dyn Clock>,
    adjust: impl FnOnce(&mut Config),
) -> TestApp {
    let mut config = test_config();
    config.upstream.base_url = upstream.base_url();
    adjust(&mut config);
    let app = App::build_with_clock(config, SecretString::from(TEST_API_KEY), clock)
        .await
        .expect("app builds");
    serve(app, upstream)
}

/// Runs `app` (its upstream the fake `upstream`) until the test shuts it down.
pub fn serve(app: App, upstream: Arc<FakeUpstream>) -> TestApp {
    let addr = app.local_addr();
    let state = app.state().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        upstream,
        state,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl TestApp {
    /// Another instance of the proxy (a replica) using the same fake upstream.
    pub async fn spawn_replica(&self, adjust: impl FnOnce(&mut Config)) -> TestApp {
        self.spawn_replica_with_clock(Arc::new(SystemClock), adjust)
            .await
    }

    /// [`TestApp::spawn_replica`] counting time with `clock` (share one
    /// `ManualClock` to move the whole cluster's time at once).
    pub async fn spawn_replica_with_clock(
        &self,
        clock: Arc<dyn Clock>,
        adjust: impl FnOnce(&mut Config),
    ) -> TestApp {
        spawn_on(Arc::clone(&self.upstream), clock, adjust).await
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// `GET /v1/tiktok/trending/hashtag/detail?<query>`.
    pub async fn get_hashtag(&self, query: &str) -> reqwest::Response {
        self.hashtag_request(reqwest::Method::GET, query)
            .send()
            .await
            .expect("request reaches the proxy")
    }

    /// `GET <route>?<query>`, read whole.
    pub async fn get(&self, query: &str) -> Parts {
        parts(self.get_hashtag(query).await).await
    }

    /// Starts `GET <route>?<query>` in its own task (it outlives this borrow).
    pub fn spawn_get_hashtag(&self, query: &str) -> JoinHandle<Parts> {
        self.spawn_get(&hashtag_path(query))
    }

    /// Starts `GET <path_and_query>` in its own task.
    pub fn spawn_get(&self, path_and_query: &str) -> JoinHandle<Parts> {
        let request = self.client.get(self.url(path_and_query));
        tokio::spawn(async move {
            parts(request.send().await.expect("request reaches the proxy")).await
        })
    }

    /// A request builder for the proxied route, to add headers.
    pub fn hashtag_request(&self, method: reqwest::Method, query: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(&hashtag_path(query)))
    }

    /// `GET <route>?<query>` with `Authorization: Bearer <token>`.
    pub async fn get_hashtag_as(&self, token: &str, query: &str) -> reqwest::Response {
        self.hashtag_request(reqwest::Method::GET, query)
            .bearer_auth(token)
            .send()
            .await
            .expect("request reaches the proxy")
    }

    /// `GET <route>?<query>` with extra request headers.
    pub async fn get_hashtag_with(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.hashtag_request(reqwest::Method::GET, query);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request reaches the proxy")
    }

    /// `GET <route>?hashtag_name=<name>` without a token, as the visitor at
    /// `addr` (reported in `X-Forwarded-For`; believed behind [`visitors`]), read whole.
    pub async fn ask_as_visitor(&self, addr: &str, name: &str) -> Parts {
        let query = format!("hashtag_name={name}");
        parts(
            self.get_hashtag_with(&query, &[("X-Forwarded-For", addr)])
                .await,
        )
        .await
    }

    /// `GET /stats` as JSON.
    pub async fn stats(&self) -> serde_json::Value {
        let response = self.client.get(self.url("/stats")).send().await.unwrap();
        serde_json::from_str(&response.text().await.unwrap()).unwrap()
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// Sends the shutdown signal; returns the server task to await.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.take().expect("server still running")
    }
}

/// `<hashtag detail route>?<query>`.
pub fn hashtag_path(query: &str) -> String {
    format!("{HASHTAG_DETAIL_PATH}?{query}")
}

/// A response as (status, headers, body text).
pub type Parts = (u16, reqwest::header::HeaderMap, String);

/// Reads a response as (status, headers, body text).
pub async fn parts(response: reqwest::Response) -> Parts {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.expect("body");
    (status, headers, body)
}

/// Header value as `&str` (empty if absent).
pub fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

/// Asserts the answer was served from the cache (`Cache-Status` says `hit`).
#[track_caller]
pub fn assert_hit(headers: &reqwest::header::HeaderMap) {
    let cache_status = header(headers, "cache-status");
    assert!(cache_status.contains("; hit;"), "not a hit: {cache_status}");
}

/// Asserts the answer was fetched from KeyAPI for this request and stored.
#[track_caller]
pub fn assert_stored_miss(headers: &reqwest::header::HeaderMap) {
    assert_eq!(
        header(headers, "cache-status"),
        "keyapi-proxy; fwd=uri-miss; stored"
    );
}

/// Asserts the body is our error envelope with `code` and returns its message.
pub fn assert_envelope(body: &str, code: u16, request_id: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect("envelope is JSON");
    assert_eq!(v["code"], code, "envelope code in {body}");
    assert!(v["data"].is_null(), "data must be null in {body}");
    assert_eq!(v["requestId"], request_id, "requestId in {body}");
    let message = v["message"].as_str().expect("message").to_owned();
    assert!(!message.is_empty());
    message
}

/// The value of one series in Prometheus text, e.g.
/// `keyapi_proxy_upstream_calls_total{outcome="success"}`; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.split(' ').next()?.parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// The sum of every series of the metric `name` (all label values).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Quiet unless TEST_LOG=1.
fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
    }
}

/// Awaits every spawned request, in order.
pub async fn join(handles: Vec<JoinHandle<Parts>>) -> Vec<Parts> {
    join_all(handles)
        .await
        .into_iter()
        .map(|r| r.expect("request task"))
        .collect()
}

/// The stampede: KeyAPI held, `n` requests sent at once (`GET path(i)`,
/// round-robin over `apps`, which share the fake upstream), released once
/// `calls` calls have arrived; returns the answers in order.
pub async fn stampede(
    apps: &[&TestApp],
    n: usize,
    path: impl Fn(usize) -> String,
    calls: usize,
) -> Vec<Parts> {
    let upstream = &apps[0].upstream;
    upstream.hold();
    let handles = (0..n)
        .map(|i| apps[i % apps.len()].spawn_get(&path(i)))
        .collect();
    upstream.wait_for_calls(calls).await;
    upstream.release();
    join(handles).await
}

/// Polls `future` once. In a test's single-threaded runtime it runs up to
/// its first wait and nothing else runs meanwhile: e.g. it has joined or
/// started a key's fetch, which has not run yet. Await it afterwards.
pub async fn poll_once<F: Future>(mut future: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

/// Credits on `app`'s ledger (`credits_spent_total`; readable after shutdown).
pub fn booked(app: &TestApp) -> u64 {
    app.state.metrics().totals().credits_spent
}

/// The ledger equals the bill: waits for every fetch of `apps` to end, then
/// checks that their credits are 2 (the default price) × the calls the
/// shared fake upstream received. Returns (calls, credits).
pub async fn assert_ledger_equals_bill(apps: &[&TestApp]) -> (u64, u64) {
    for app in apps {
        app.state.proxy().idle().await;
    }
    let calls = apps[0].upstream.calls() as u64;
    let mut credits = 0;
    for app in apps {
        credits += booked(app);
    }
    assert_eq!(
        credits,
        2 * calls,
        "credits on the ledger = price x calls KeyAPI received"
    );
    (calls, credits)
}

/// A raw client that has sent `GET` of the hashtag route with `query` and
/// waits (reqwest cannot hang up on a request at a moment of our choosing).
pub async fn raw_request(app: &TestApp, query: &str) -> TcpStream {
    raw_request_with(app, query, "").await
}

/// [`raw_request`] with `Authorization: Bearer <token>`.
pub async fn raw_request_as(app: &TestApp, token: &str, query: &str) -> TcpStream {
    raw_request_with(app, query, &format!("Authorization: Bearer {token}\r\n")).await
}

async fn raw_request_with(app: &TestApp, query: &str, headers: &str) -> TcpStream {
    let mut client = TcpStream::connect(app.addr).await.unwrap();
    let addr = app.addr;
    let request = format!(
        "GET {HASHTAG_DETAIL_PATH}?{query} HTTP/1.1
Host: {addr}
{headers}
"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    client
}

/// Hangs up `client` before its answer and waits for the proxy to close the
/// connection in turn: by then it has dropped the request.
pub async fn hang_up(mut client: TcpStream) {
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest));
    closed
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// An HTTP/2 client that takes no answer: it sets its streams' flow-control
/// window to 0, so the body of every answer it asks for stays unsent. Needs
/// `server.http2 = true`.
pub struct StalledH2 {
    _sender: http2::SendRequest<Empty<Bytes>>,
    /// The answers whose heads arrived; their bodies never will.
    _answers: Vec<hyper::Response<Incoming>>,
    /// Ends when the proxy closes the connection.
    connection: JoinHandle<()>,
}

impl StalledH2 {
    /// A connection to `app` holding `streams` answers of `GET /healthz`.
    pub async fn open(app: &TestApp, streams: usize) -> Self {
        let io = TokioIo::new(TcpStream::connect(app.addr).await.unwrap());
        let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake(io)
            .await
            .expect("HTTP/2 handshake");
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut answers = Vec::new();
        for _ in 0..streams {
            let request = hyper::Request::get(app.url("/healthz"))
                .body(Empty::new())
                .unwrap();
            let answer = sender.send_request(request).await.expect("answer head");
            assert_eq!(answer.status(), 200);
            answers.push(answer);
        }
        Self {
            _sender: sender,
            _answers: answers,
            connection,
        }
    }

    /// Waits (at most `within`) until the proxy closes the connection;
    /// returns how long after `since` that was.
    pub async fn closed(self, since: Instant, within: Duration) -> Duration {
        tokio::time::timeout(within, self.connection)
            .await
            .expect("the proxy closes the stalled connection")
            .unwrap();
        since.elapsed()
    }
}

/// An address that refuses connections for as long as the returned socket
/// lives: bound but never listening. Binding a port and freeing it again is
/// not enough: the next listener of any test in the same binary may be given
/// it, and the "unreachable" KeyAPI answers.
pub fn refusing_addr() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("a port");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}

/// Polls `check` every 10 ms until it holds, failing with `what` after
/// `within`: the bounded wait for what the app does in the background and
/// announces to no one (a reconnect, a pub/sub message, an export).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let waited = tokio::time::timeout(within, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    waited
        .await
        .unwrap_or_else(|_| panic!("within {within:?}: {what}"));
}

/// Waits (at most `within`) until `series` on `app`'s `/metrics` reads
/// `value`: for what only the proxy sees, such as why it closed a connection
/// whose client reads nothing.
pub async fn await_metric(app: &TestApp, series: &str, value: f64, within: Duration) {
    eventually(within, &format!("{series} reaches {value}"), || async {
        metric(&app.metrics().await, series) == value
    })
    .await;
}
