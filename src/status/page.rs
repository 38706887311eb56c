//! The HTML status page of [`Stats`]: one self-contained document (cards,
//! tables, charts of the last hour and of the last 30 days' credits spent
//! and saved, drawn as inline SVG) that loads
//! nothing from anywhere, and the `Content-Security-Policy` that says so,
//! admitting only its own inline stylesheet, by hash.

use std::{fmt::Write as _, sync::LazyLock};

use axum::http::HeaderValue;
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};

use super::stats::{SpendDay, Stats};
use crate::{digest, metrics::history::Minute};

/// Nothing may load, and only our own stylesheet (by its hash, not any
/// inline style) may apply.
pub(crate) fn content_security_policy() -> HeaderValue {
    static POLICY: LazyLock<HeaderValue> = LazyLock::new(|| {
        let hash = BASE64.encode(digest::sha256(STYLE.as_bytes()));
        let policy = format!("default-src 'none'; style-src 'sha256-{hash}'");
        // Base64 and ASCII punctuation only.
        HeaderValue::try_from(policy).unwrap_or(HeaderValue::from_static("default-src 'none'"))
    });
    POLICY.clone()
}

/// Cards sit in an even grid: 2 columns on a phone, 3 on a tablet, 6 on a
/// desktop (six cards fill each). Wide tables scroll inside their own box and
/// long names are cut with an ellipsis (the full name is the tooltip), so
/// the page never scrolls sideways.
const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1em auto;padding:0 1em;color:#222;max-width:1200px}\
h1{font-size:1.4em}h2{font-size:1.15em;margin:1.2em 0 .4em}\
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:.5em 0 1em}\
td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}\
td.num,th.num{text-align:right}\
.name{display:block;max-width:min(32em,45vw);overflow:hidden;text-overflow:ellipsis}\
small{color:#666}@media(max-width:480px){td,th{padding:.2em .35em}}\
.cards{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:.8em;margin-bottom:1em}\
@media(min-width:640px){.cards{grid-template-columns:repeat(3,minmax(0,1fr))}}\
@media(min-width:1100px){.cards{grid-template-columns:repeat(6,minmax(0,1fr))}}\
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;overflow-wrap:anywhere}\
.card b{display:block;font-size:1.5em}.ok,.closed{color:#18794e}\
.failing,.open{color:#c62828}.half_open,.rejected{color:#b26a00}\
.spent{color:#e8710a}.saved{color:#18794e}\
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,420px),1fr));gap:1em}\
svg{width:100%;height:100px;display:block}figure{margin:0}\
figcaption{font-size:.9em;color:#555}\
.axis{display:flex;justify-content:space-between;font-size:.8em;color:#555}";

/// The page of `stats`.
pub(crate) fn render(stats: &Stats) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let t = &stats.totals;
    let u = &stats.upstream;
    let ratio = stats
        .hit_ratio
        .map_or("–".to_owned(), |r| format!("{:.1} %", r * 100.0));
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"30\"><title>keyapi-proxy status</title>\
         <style>{STYLE}</style></head><body><h1>keyapi-proxy</h1>\
         <div class=\"cards\">\
         <div class=\"card\">uptime<b>{uptime}</b>since start</div>\
         <div class=\"card\">hit ratio<b>{ratio}</b>{hits} / {misses}</div>\
         <div class=\"card\">credits spent<b>{spent}</b>{saved} saved, {calls} this hour</div>\
         <div class=\"card\">rejected<b class=\"{rejected_class}\">{rejected}</b>refused before the cache, no credits</div>\
         <div class=\"card\">cache<b>{entries}</b>{entry_word}, {bytes}</div>\
         <div class=\"card\">upstream<b class=\"{health}\">{health}</b>circuit <span class=\"{circuit}\">{circuit_text}</span>, {in_flight} in flight</div>\
         </div>",
        uptime = duration_text(stats.uptime_secs),
        hits = counted(t.hits, "hit", "hits"),
        misses = counted(t.misses, "miss", "misses"),
        spent = t.credits_spent,
        calls = counted(stats.upstream.calls_last_hour, "call", "calls"),
        saved = t.credits_saved,
        rejected = t.rejected,
        rejected_class = if t.rejected > 0 { "rejected" } else { "" },
        entries = stats.cache_entries,
        entry_word = noun(stats.cache_entries, "entry", "entries"),
        bytes = bytes_text(stats.cache_bytes),
        health = u.status,
        circuit = u.circuit,
        circuit_text = u.circuit.replace('_', "-"),
        in_flight = u.in_flight,
    );
    html.push_str("<h2>Last hour</h2><div class=\"charts\">");
    chart(
        &mut html,
        &stats.last_hour,
        |m| m.requests,
        ("requests", "#4a7fd6"),
    );
    chart(
        &mut html,
        &stats.last_hour,
        |m| m.credits_spent,
        ("credits spent", SPENT),
    );
    html.push_str("</div>");
    spend_chart(&mut html, &stats.spend_last_30_days);

    let _ = write!(
        html,
        "<h2>Upstream</h2><div class=\"scroll\"><table><tr><th>status</th><td class=\"{status}\">{status}</td></tr>\
         <tr><th>circuit breaker</th><td class=\"{circuit}\">{circuit_text}</td></tr>\
         <tr><th>calls in the last hour</th><td>{calls}</td></tr>\
         <tr><th>consecutive failures</th><td>{failures}</td></tr>\
         <tr><th>last success</th><td>{success}</td></tr>\
         <tr><th>last error</th><td>{error}</td></tr></table></div>",
        status = u.status,
        circuit = u.circuit,
        circuit_text = u.circuit.replace('_', "-"),
        calls = u.calls_last_hour,
        failures = u.consecutive_failures,
        success = u
            .last_success_secs_ago
            .map_or("never".into(), |s| format!("{} ago", duration_text(s))),
        error = match (u.last_error, u.last_error_secs_ago) {
            (Some(kind), Some(s)) => format!("{} ({} ago)", escape(kind), duration_text(s)),
            _ => "none".into(),
        },
    );
    if let Some(budget) = stats.daily_budget {
        let reserved = match stats.credits_reserved {
            Some(reserved) if reserved > 0 => format!(", {reserved} reserved by calls in progress"),
            _ => String::new(),
        };
        let _ = write!(
            html,
            "<p>Daily credit budget: {} of {budget} spent today (UTC){reserved}.</p>",
            stats.credits_spent_today.unwrap_or(0)
        );
    }

    // The route under the question: four columns fit a phone.
    html.push_str(
        "<h2>Top keys</h2><div class=\"scroll\"><table><tr><th>question</th>\
         <th class=\"num\">hits</th><th class=\"num\">bytes</th><th class=\"num\">age</th></tr>",
    );
    for key in &stats.top_keys {
        // The values on screen (the names take the width), everything in the tooltip.
        let values: Vec<&str> = key.params.values().map(String::as_str).collect();
        let question: Vec<String> = key.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let title = escape(&format!("{} {}", key.route, question.join(" ")));
        let _ = write!(
            html,
            "<tr><td><span class=\"name\" title=\"{title}\">{}</span><small class=\"name\">{}</small></td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&values.join(" · ")),
            escape(&key.route),
            key.hits,
            key.bytes,
            duration_text(key.age_secs)
        );
    }
    html.push_str("</table></div>");

    if !stats.clients.is_empty() {
        html.push_str(
            "<h2>Clients</h2><div class=\"scroll\"><table><tr><th>client</th><th class=\"num\">requests</th>\
             <th class=\"num\">credits spent</th><th class=\"num\">today / budget</th></tr>",
        );
        for c in &stats.clients {
            let budget = match (c.credits_spent_today, c.daily_budget) {
                (Some(today), Some(limit)) => format!("{today} / {limit}"),
                _ => "no budget".into(),
            };
            let id = escape(&c.id);
            let _ = write!(
                html,
                "<tr><td><span class=\"name\" title=\"{id}\">{id}</span></td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{budget}</td></tr>",
                c.requests, c.credits_spent
            );
        }
        html.push_str("</table></div>");
    }
    if !stats.top_spenders.is_empty() {
        html.push_str(
            "<h2>Top spenders today</h2><div class=\"scroll\"><table><tr><th>visitor or subject</th>\
             <th class=\"num\">credits today</th></tr>",
        );
        for s in &stats.top_spenders {
            let label = escape(&s.label);
            let _ = write!(
                html,
                "<tr><td><span class=\"name\" title=\"{label}\">{} {label}</span></td>\
                 <td class=\"num\">{}</td></tr>",
                s.kind, s.credits_spent_today
            );
        }
        html.push_str("</table></div>");
    }
    if !stats.warmups.is_empty() {
        html.push_str(
            "<h2>Warm-ups</h2><div class=\"scroll\"><table><tr><th>warm-up</th><th>last run</th>\
             <th class=\"num\">next run in</th><th class=\"num\">today / allowance</th></tr>",
        );
        for w in &stats.warmups {
            let name = escape(&w.name);
            let last = match &w.last_run {
                Some(r) => format!(
                    "{} warmed, {} joined, {} fresh, {} failed{}",
                    r.warmed,
                    r.joined,
                    r.skipped_fresh,
                    r.failed,
                    r.stopped_by
                        .map_or(String::new(), |why| format!(", stopped: {why}"))
                ),
                None => "not yet".into(),
            };
            let next = w.next_run_at.map_or("—".into(), |at| {
                duration_text(at.saturating_sub(stats.started_at + stats.uptime_secs))
            });
            let _ = write!(
                html,
                "<tr><td><span class=\"name\" title=\"{name}\">{name}</span><small>{} · {} questions</small></td>\
                 <td>{}</td><td class=\"num\">{next}</td><td class=\"num\">{} / {}</td></tr>",
                escape(&w.schedule),
                w.questions,
                escape(&last),
                w.credits_spent_today,
                w.max_credits_per_day
            );
        }
        html.push_str("</table></div>");
    }
    html.push_str("<p>Same data as JSON: <a href=\"/stats\">/stats</a> · metrics: <a href=\"/metrics\">/metrics</a> · API: <a href=\"/openapi.json\">/openapi.json</a></p></body></html>");
    html
}

/// One series of the last hour as bars on its own scale (requests and
/// credits differ by orders of magnitude when hits dominate), labelled with
/// its peak in its own unit.
fn chart(
    html: &mut String,
    minutes: &[Minute],
    value: fn(&Minute) -> u64,
    (unit, color): (&str, &str),
) {
    let peak = minutes.iter().map(value).max().unwrap_or(0);
    let scale = peak.max(1);
    let caption = format!("{unit} per minute · peak {peak}");
    let aria = format!("{unit} per minute over the last hour");
    let bar = begin_chart(html, &caption, &aria, minutes.len());
    for (i, m) in minutes.iter().enumerate() {
        let v = value(m);
        let height = v * H / scale;
        let _ = write!(
            html,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{height}\" fill=\"{color}\"><title>{v} {unit}</title></rect>",
            i * bar,
            H - height,
            bar.saturating_sub(1),
        );
    }
    end_chart(html, "-60 min", "now");
}

/// A chart's width and height in its own units (drawn 100 px high, as wide
/// as the page allows).
const W: usize = 600;
const H: u64 = 100;
/// Spent and saved credits, as the page's `.spent` and `.saved` text.
const SPENT: &str = "#e8710a";
const SAVED: &str = "#18794e";

/// Opens a chart of `bars` bars under `caption` (HTML); returns a bar's width.
fn begin_chart(html: &mut String, caption: &str, aria: &str, bars: usize) -> usize {
    let _ = write!(
        html,
        "<figure><figcaption>{caption}</figcaption>\
         <svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" \
         preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{aria}\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#f7f7f7\"/>"
    );
    W / bars.max(1)
}

/// Closes a chart's `<svg>` and labels its two ends under it: in HTML, so
/// the labels keep the page's type size however wide the chart is drawn.
fn end_chart(html: &mut String, first: &str, last: &str) {
    let _ = write!(
        html,
        "</svg><div class=\"axis\"><span>{first}</span><span>{last}</span></div></figure>"
    );
}

/// The last days' credits as stacked bars: what each day's questions would
/// have cost, spent (paid to KeyAPI) below and saved (answered without a
/// call) above, on one scale.
fn spend_chart(html: &mut String, days: &[SpendDay]) {
    let peak = days
        .iter()
        .map(|d| d.credits_spent + d.credits_saved)
        .max()
        .unwrap_or(0);
    let scale = peak.max(1);
    let spent: u64 = days.iter().map(|d| d.credits_spent).sum();
    let saved: u64 = days.iter().map(|d| d.credits_saved).sum();
    let n = days.len();
    let _ = write!(html, "<h2>Last {n} days</h2>");
    let caption = format!(
        "credits per UTC day · <span class=\"spent\">spent {spent}</span> · \
         <span class=\"saved\">saved {saved}</span>"
    );
    let aria = format!("credits spent and saved per day over the last {n} days");
    let bar = begin_chart(html, &caption, &aria, n);
    for (i, d) in days.iter().enumerate() {
        let spent_height = d.credits_spent * H / scale;
        let saved_height = (d.credits_spent + d.credits_saved) * H / scale - spent_height;
        let (x, width) = (i * bar, bar.saturating_sub(1));
        let title = format!(
            "{}: {} spent, {} saved",
            d.day, d.credits_spent, d.credits_saved
        );
        let _ = write!(
            html,
            "<g><title>{title}</title>\
             <rect x=\"{x}\" y=\"{}\" width=\"{width}\" height=\"{saved_height}\" fill=\"{SAVED}\"/>\
             <rect x=\"{x}\" y=\"{}\" width=\"{width}\" height=\"{spent_height}\" fill=\"{SPENT}\"/></g>",
            H - spent_height - saved_height,
            H - spent_height,
        );
    }
    let first = days.first().map_or("", |d| d.day.as_str());
    end_chart(html, first, "today");
}

fn bytes_text(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// `1 hit`, `2 hits`: the number with the noun it counts.
fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", noun(n, one, many))
}

/// The singular for exactly one, else the plural.
fn noun<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
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
