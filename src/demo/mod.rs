//! A fake KeyAPI on a loopback port: used by `--demo` (so the service can be
//! tried without a key) and by the tests (which need an upstream that counts
//! calls, records what it received, and fails on command).
//!
//! It answers every path: hashtag detail like the real sample body in
//! `hashtag-detail-ufc324.json` (echoing the requested hashtag and region),
//! any other route with a success envelope echoing its path and parameters.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{
        HeaderMap, HeaderValue, StatusCode,
        header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER},
    },
    response::Response,
    routing::get,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::route::HASHTAG_DETAIL_PATH;

const SAMPLE: &str = include_str!("hashtag-detail-ufc324.json");
/// Path of the fake's own call counter, for tools outside the process (the
/// benchmark script). Requests to it are neither counted nor recorded.
pub const CALLS_PATH: &str = "/__fake/calls";

/// How the fake answers the next calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeMode {
    /// HTTP 200 with a fixture-shaped success body.
    Normal,
    /// The given HTTP status with a KeyAPI-style error envelope.
    Status(u16),
    /// HTTP 200 with an envelope whose `code` is the given non-zero value.
    CodeError(i64),
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// Never answers.
    Hang,
    /// HTTP 200 with a valid success body of at least this many bytes.
    Oversize(usize),
    /// HTTP 404 whose body quotes the `Authorization` header it received.
    EchoAuthorization,
    /// HTTP 200 success whose body quotes the key JSON-escaped (`-` as
    /// `\u002d`, `/` as `\/`): valid JSON that holds the key all the same.
    EchoKeyEscaped,
    /// HTTP 429 with `Retry-After: <secs>`.
    RateLimited { retry_after_secs: u64 },
}

/// Requests the fake remembers for [`FakeUpstream::requests`]; older ones are forgotten.
pub const MAX_RECORDED: usize = 1024;

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
}

struct FakeState {
    /// `Bearer <key>`: the one key accepted (a test rotates it).
    expected_key: Mutex<String>,
    /// Calls refused for a wrong key.
    rejected: AtomicUsize,
    latency: Mutex<Duration>,
    mode: Mutex<FakeMode>,
    calls: watch::Sender<usize>,
    /// While false, calls are counted and recorded but not answered.
    open: watch::Sender<bool>,
    /// The last [`MAX_RECORDED`] requests: a long `--demo` run stays small.
    recorded: Mutex<VecDeque<Recorded>>,
    /// Modes for the next calls, one each, before falling back to `mode`.
    script: Mutex<VecDeque<FakeMode>>,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
    sample: Value,
}

/// A running fake KeyAPI. Stops when dropped.
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<FakeState>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    /// Starts on `127.0.0.1:<free port>`, accepting `Bearer <expected_key>`
    /// and answering after `latency`.
    pub async fn start(expected_key: &str, latency: Duration) -> std::io::Result<Self> {
        let sample = serde_json::from_str(SAMPLE).map_err(std::io::Error::other)?;
        let state = Arc::new(FakeState {
            expected_key: Mutex::new(format!("Bearer {expected_key}")),
            rejected: AtomicUsize::new(0),
            latency: Mutex::new(latency),
            mode: Mutex::new(FakeMode::Normal),
            calls: watch::Sender::new(0),
            open: watch::Sender::new(true),
            recorded: Mutex::new(VecDeque::new()),
            script: Mutex::new(VecDeque::new()),
            concurrent: AtomicUsize::new(0),
            max_concurrent: AtomicUsize::new(0),
            sample,
        });
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route(CALLS_PATH, get(calls))
            .fallback(answer)
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake upstream stopped");
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:<port>`, to use as `upstream.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        *self.state.calls.borrow()
    }

    /// Resolves once at least `n` calls have arrived.
    pub async fn wait_for_calls(&self, n: usize) {
        let mut rx = self.state.calls.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|calls| *calls >= n).await;
    }

    /// The last [`MAX_RECORDED`] requests received, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.recorded).iter().cloned().collect()
    }

    /// Changes how the next calls are answered.
    /// Answers the next calls with these modes, one per call, then the current mode.
    pub fn script(&self, modes: impl IntoIterator<Item = FakeMode>) {
        lock(&self.state.script).extend(modes);
    }

    /// The most calls that were being answered at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_concurrent.load(Ordering::SeqCst)
    }

    /// Changes how the next calls are answered (after any scripted ones).
    pub fn set_mode(&self, mode: FakeMode) {
        *lock(&self.state.mode) = mode;
    }

    /// Accepts only `key` from now on (a rotation at KeyAPI: the old key is revoked).
    pub fn set_key(&self, key: &str) {
        *lock(&self.state.expected_key) = format!("Bearer {key}");
    }

    /// Calls refused (401) for a wrong key so far.
    pub fn rejected(&self) -> usize {
        self.state.rejected.load(Ordering::SeqCst)
    }

    /// Changes the answer latency of the next calls.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.state.latency) = latency;
    }

    /// Holds calls (counted, not answered) until [`FakeUpstream::release`].
    pub fn hold(&self) {
        self.state.open.send_replace(false);
    }

    /// Lets held and future calls be answered.
    pub fn release(&self) {
        self.state.open.send_replace(true);
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn answer(State(state): State<Arc<FakeState>>, request: Request) -> Response {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let query = request.uri().query().unwrap_or("").to_owned();
    let path = request.uri().path().to_owned();
    let hashtag_detail = path == HASHTAG_DETAIL_PATH;
    let headers = request.headers().clone();
    {
        let mut recorded = lock(&state.recorded);
        if recorded.len() == MAX_RECORDED {
            recorded.pop_front();
        }
        recorded.push_back(Recorded {
            method: request.method().to_string(),
            path_and_query,
            headers: headers.clone(),
        });
    }
    let now = state.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_concurrent.fetch_max(now, Ordering::SeqCst);
    let _concurrent = Decrement(&state.concurrent);
    let scripted = lock(&state.script).pop_front();
    state.calls.send_modify(|c| *c += 1);

    let mut open = state.open.subscribe();
    let _ = open.wait_for(|open| *open).await;
    let latency = *lock(&state.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mode = scripted.unwrap_or_else(|| lock(&state.mode).clone());
    // Checked as the answer goes out: a key revoked meanwhile is refused.
    let authorized = headers
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == lock(&state.expected_key).as_bytes());
    if !authorized {
        state.rejected.fetch_add(1, Ordering::SeqCst);
        return envelope(StatusCode::UNAUTHORIZED, 401, "invalid api key");
    }
    match mode {
        FakeMode::Normal if !hashtag_detail => {
            json_response(StatusCode::OK, echo_body(&path, &query))
        }
        FakeMode::Normal => json_response(StatusCode::OK, success_body(&state.sample, &query, 0)),
        FakeMode::Oversize(n) => {
            json_response(StatusCode::OK, success_body(&state.sample, &query, n))
        }
        FakeMode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            envelope(status, i64::from(code), "fake upstream error")
        }
        FakeMode::CodeError(code) => envelope(StatusCode::OK, code, "hashtag not found"),
        FakeMode::Garbage => Response::new(Body::from("<html>502 Bad Gateway</html>")),
        FakeMode::Hang => std::future::pending().await,
        FakeMode::RateLimited { retry_after_secs } => {
            let mut response = envelope(StatusCode::TOO_MANY_REQUESTS, 429, "rate limited");
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        FakeMode::EchoKeyEscaped => {
            let expected = lock(&state.expected_key).clone();
            let key = expected.trim_start_matches("Bearer ");
            let escaped = key.replace('-', "\\u002d").replace('/', "\\/");
            let body = format!(r#"{{"code":0,"message":"success","data":{{"echo":"{escaped}"}}}}"#);
            let mut response = Response::new(Body::from(body));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, crate::error::APPLICATION_JSON);
            response
        }
        FakeMode::EchoAuthorization => {
            let echoed = format!("bad request from {}", lock(&state.expected_key));
            envelope(StatusCode::NOT_FOUND, 404, &echoed)
        }
    }
}

/// `GET /__fake/calls`: the number of calls received so far, as plain text.
async fn calls(State(state): State<Arc<FakeState>>) -> String {
    state.calls.borrow().to_string()
}

/// A success envelope for any other route: the path and parameters it was asked.
fn echo_body(path: &str, query: &str) -> Value {
    let params: serde_json::Map<String, Value> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), json!(v)))
        .collect();
    json!({
        "code": 0,
        "message": "success",
        "data": { "path": path, "params": params },
        "requestId": uuid::Uuid::new_v4().to_string(),
    })
}

/// The sample body with the requested hashtag and region, and `pad` bytes of padding.
fn success_body(sample: &Value, query: &str, pad: usize) -> Value {
    let mut body = sample.clone();
    let mut hashtag = "ufc324".to_owned();
    let mut region = "all_regions".to_owned();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "hashtag_name" => hashtag = v.into_owned(),
            "region" => region = v.into_owned(),
            _ => {}
        }
    }
    let country = if region == "all_regions" {
        "ALL".to_owned()
    } else {
        region
    };
    let info = &mut body["data"]["info"];
    info["hashtag_name"] = json!(hashtag);
    info["video_url"] = json!(format!("https://www.tiktok.com/tag/{hashtag}"));
    info["country_info"] = json!({ "id": country, "value": country, "label": country });
    if pad > 0 {
        info["padding"] = json!("x".repeat(pad));
    }
    body["requestId"] = json!(uuid::Uuid::new_v4().to_string());
    body
}

fn envelope(status: StatusCode, code: i64, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "data": null,
        "requestId": uuid::Uuid::new_v4().to_string(),
    });
    json_response(status, body)
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, crate::error::APPLICATION_JSON);
    response
}

/// Counts a call as finished when its handler ends, however it ends.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
