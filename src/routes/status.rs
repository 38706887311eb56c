//! `GET /stats` (JSON) and `GET /` (a self-contained HTML status page): uptime,
//! hit ratio, credits spent vs saved, top keys, upstream health, per-client
//! spending and a chart of the last hour drawn as inline SVG. The page loads
//! nothing from anywhere (no script, no stylesheet, no font, no image), and
//! says so in its `Content-Security-Policy`.

use std::{fmt::Write as _, sync::Arc, time::SystemTime};

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, header::CONTENT_SECURITY_POLICY, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::{
    app::AppState,
    clock::{self, SharedClock},
    limits::Budget,
    metrics::Totals,
    stats::Minute,
    summary::{CacheSummary, TopKey},
};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Stats {
    uptime_secs: u64,
    started_at: u64,
    hit_ratio: Option<f64>,
    #[serde(flatten)]
    totals: Totals,
    credits_per_call: u64,
    daily_budget: Option<u64>,
    credits_spent_today: Option<u64>,
    cache_entries: u64,
    cache_bytes: u64,
    upstream: Upstream,
    /// `up` / `down` when the Redis tier is configured, else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<&'static str>,
    clients: Vec<ClientStats>,
    top_keys: Vec<TopKey>,
    last_hour: Vec<Minute>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Upstream {
    /// `ok`, `failing` (the last call failed) or `unknown` (no call yet).
    status: &'static str,
    in_flight: u64,
    consecutive_failures: u64,
    last_success_secs_ago: Option<u64>,
    last_error_secs_ago: Option<u64>,
    last_error: Option<&'static str>,
    calls_last_hour: u64,
    /// Circuit breaker: `closed`, `open` or `half_open`.
    circuit: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientStats {
    id: String,
    requests: u64,
    credits_spent: u64,
    daily_budget: Option<u64>,
    credits_spent_today: Option<u64>,
}

impl Stats {
    async fn collect(state: &AppState) -> Self {
        let metrics = state.metrics();
        let history = metrics.history();
        let clock = history.clock();
        let now = clock.now();
        let cache = state.proxy().cache();
        let totals = metrics.totals();
        let answered = totals.hits + totals.misses;
        let last_hour = history.last_hour();
        let health = history.health();
        let ago = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs();
        let upstream = Upstream {
            status: match (&health.last_success, &health.last_error) {
                (None, None) => "unknown",
                _ if health.consecutive_failures > 0 => "failing",
                _ => "ok",
            },
            in_flight: totals.upstream_in_flight,
            consecutive_failures: health.consecutive_failures,
            last_success_secs_ago: health.last_success.map(ago),
            last_error_secs_ago: health.last_error.map(|(t, _)| ago(t)),
            last_error: health.last_error.map(|(_, kind)| kind),
            calls_last_hour: last_hour.iter().map(|m| m.upstream_calls).sum(),
            circuit: state.proxy().protection().circuit(),
        };
        let mut clients = Vec::new();
        for c in state.access().clients() {
            clients.push(ClientStats {
                id: c.id.to_string(),
                requests: c.counters.requests.get(),
                credits_spent: c.counters.credits_spent.get(),
                daily_budget: c.budget.as_ref().map(|b| b.limit()),
                credits_spent_today: spent_today(c.budget.as_ref(), clock).await,
            });
        }
        let summary = CacheSummary::of(cache).await;
        Self {
            uptime_secs: ago(history.started()),
            started_at: clock::unix_secs(history.started()),
            hit_ratio: (answered > 0).then(|| totals.hits as f64 / answered as f64),
            totals,
            credits_per_call: metrics.credits_per_call(),
            daily_budget: state.budget().map(|b| b.limit()),
            credits_spent_today: spent_today(state.budget(), clock).await,
            cache_entries: summary.entries,
            cache_bytes: summary.bytes,
            upstream,
            redis: state
                .proxy()
                .redis()
                .map(|r| if r.is_up() { "up" } else { "down" }),
            clients,
            top_keys: summary.top_keys,
            last_hour,
        }
    }
}

/// `GET /stats`.
async fn spent_today(budget: Option<&Budget>, clock: &SharedClock) -> Option<u64> {
    match budget {
        Some(budget) => Some(budget.spent_today(clock).await),
        None => None,
    }
}

pub(super) async fn stats(State(state): State<AppState>) -> Response {
    Json(&*latest(&state).await).into_response()
}

/// The stats at most [`crate::summary::REFRESH`] old, shared by `/stats` and `/`.
async fn latest(state: &AppState) -> Arc<Stats> {
    let clock = state.metrics().history().clock();
    state.stats().get(clock, || Stats::collect(state)).await
}

/// `GET /`: the status page.
pub(super) async fn status_page(State(state): State<AppState>) -> Response {
    let stats = latest(&state).await;
    let mut response = render(&stats).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    response
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:960px}\
h1{font-size:1.4em}table{border-collapse:collapse;margin:.5em 0 1.5em}\
td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}\
.cards{display:flex;flex-wrap:wrap;gap:1em;margin-bottom:1.5em}\
.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:9em}\
.card b{display:block;font-size:1.5em}.ok{color:#18794e}.failing{color:#c62828}\
.legend span{margin-right:1.5em}";

fn render(stats: &Stats) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let t = &stats.totals;
    let ratio = stats
        .hit_ratio
        .map_or("–".to_owned(), |r| format!("{:.1} %", r * 100.0));
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"30\"><title>keyapi-proxy status</title>\
         <style>{STYLE}</style></head><body><h1>keyapi-proxy</h1>\
         <div class=\"cards\">\
         <div class=\"card\">uptime<b>{uptime}</b></div>\
         <div class=\"card\">hit ratio<b>{ratio}</b>{hits} hits / {misses} misses</div>\
         <div class=\"card\">credits spent<b>{spent}</b>{per_call} per upstream call</div>\
         <div class=\"card\">credits saved<b>{saved}</b>{collapsed} collapsed waiters</div>\
         <div class=\"card\">cache<b>{entries}</b>entries, {bytes} bytes</div>\
         <div class=\"card\">upstream<b class=\"{health}\">{health}</b>{in_flight} in flight</div>\
         </div>",
        uptime = duration_text(stats.uptime_secs),
        hits = t.hits,
        misses = t.misses,
        spent = t.credits_spent,
        per_call = stats.credits_per_call,
        saved = t.credits_saved,
        collapsed = t.collapsed,
        entries = stats.cache_entries,
        bytes = stats.cache_bytes,
        health = stats.upstream.status,
        in_flight = stats.upstream.in_flight,
    );
    html.push_str("<h2>Last hour</h2>");
    chart(&mut html, &stats.last_hour);

    let u = &stats.upstream;
    let _ = write!(
        html,
        "<h2>Upstream</h2><table><tr><th>status</th><td>{}</td></tr>\
         <tr><th>calls in the last hour</th><td>{}</td></tr>\
         <tr><th>consecutive failures</th><td>{}</td></tr>\
         <tr><th>last success</th><td>{}</td></tr>\
         <tr><th>last error</th><td>{}</td></tr></table>",
        u.status,
        u.calls_last_hour,
        u.consecutive_failures,
        u.last_success_secs_ago
            .map_or("never".into(), |s| format!("{} ago", duration_text(s))),
        match (u.last_error, u.last_error_secs_ago) {
            (Some(kind), Some(s)) => format!("{} ({} ago)", escape(kind), duration_text(s)),
            _ => "none".into(),
        },
    );
    if let Some(budget) = stats.daily_budget {
        let _ = write!(
            html,
            "<p>Daily credit budget: {} of {budget} spent today (UTC).</p>",
            stats.credits_spent_today.unwrap_or(0)
        );
    }

    html.push_str("<h2>Top keys</h2><table><tr><th>hashtag</th><th>period</th><th>region</th><th>hits</th><th>bytes</th><th>age</th></tr>");
    for key in &stats.top_keys {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&key.hashtag_name),
            key.period,
            escape(&key.region),
            key.hits,
            key.bytes,
            duration_text(key.age_secs)
        );
    }
    html.push_str("</table>");

    if !stats.clients.is_empty() {
        html.push_str("<h2>Clients</h2><table><tr><th>client</th><th>requests</th><th>credits spent</th><th>today / budget</th></tr>");
        for c in &stats.clients {
            let budget = match (c.credits_spent_today, c.daily_budget) {
                (Some(today), Some(limit)) => format!("{today} / {limit}"),
                _ => "no budget".into(),
            };
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{budget}</td></tr>",
                escape(&c.id),
                c.requests,
                c.credits_spent
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<p>Same data as JSON: <a href=\"/stats\">/stats</a> · metrics: <a href=\"/metrics\">/metrics</a> · API: <a href=\"/openapi.json\">/openapi.json</a></p></body></html>");
    html
}

/// Bars of requests per minute (blue) with a line of credits spent (orange).
fn chart(html: &mut String, minutes: &[Minute]) {
    const W: usize = 600;
    const H: u64 = 120;
    let bar = W / minutes.len().max(1);
    let peak = minutes
        .iter()
        .map(|m| m.requests.max(m.credits_spent))
        .max()
        .unwrap_or(0)
        .max(1);
    let y = |v: u64| H - v * H / peak;
    let _ = write!(
        html,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\" role=\"img\" \
         aria-label=\"requests and credits per minute over the last hour\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#f7f7f7\"/>",
        H + 16,
        H + 16
    );
    for (i, m) in minutes.iter().enumerate() {
        let top = y(m.requests);
        let _ = write!(
            html,
            "<rect x=\"{}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"#4a7fd6\"><title>{} requests, {} hits, {} credits</title></rect>",
            i * bar,
            bar.saturating_sub(1),
            H - top,
            m.requests,
            m.hits,
            m.credits_spent
        );
    }
    let points: Vec<String> = minutes
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{},{}", i * bar + bar / 2, y(m.credits_spent)))
        .collect();
    let _ = write!(
        html,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#e8710a\" stroke-width=\"2\"/>\
         <text x=\"0\" y=\"{}\" font-size=\"11\">-60 min</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">now · peak {peak}/min</text></svg>\
         <p class=\"legend\"><span style=\"color:#4a7fd6\">■ requests per minute</span>\
         <span style=\"color:#e8710a\">━ credits spent per minute</span></p>",
        points.join(" "),
        H + 13,
        W,
        H + 13
    );
}

fn duration_text(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..86400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86400, secs % 86400 / 3600),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}
