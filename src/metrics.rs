//! Prometheus metrics, owned by one [`App`](crate::app::App): each app has its
//! own [`Registry`] (no global recorder), so parallel tests in one binary see
//! exact numbers and two apps in one process never mix their counters.
//!
//! Every label is bounded: route templates, cache states, upstream outcome
//! kinds, limit scopes and client ids from configuration — never a raw
//! hashtag or anything else a client can choose.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicI64, AtomicU64},
    },
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    clock::SharedClock,
    served::{CacheState, Served},
    stats::History,
};

/// A text exposition format `/metrics` can answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: the default, and what `promtool check metrics` reads.
    Prometheus,
    /// OpenMetrics 1.0.0, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of this format.
    pub fn content_type(&self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
    cache: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why a finished trace span was not delivered to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanLoss {
    /// The export queue was full (the collector is slow or down).
    QueueFull,
    /// The export failed or timed out.
    ExportFailed,
}

impl SpanLoss {
    /// Bounded label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
        }
    }
}

/// Spans dropped, process-wide like the trace exporter that counts them (it is
/// installed with the global subscriber, before any [`Metrics`] exists).
static TRACE_SPANS_DROPPED: std::sync::LazyLock<Family<ReasonLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);

/// Counts `count` spans dropped for `loss`.
pub(crate) fn trace_spans_dropped(loss: SpanLoss, count: u64) {
    TRACE_SPANS_DROPPED
        .get_or_create(&ReasonLabels {
            reason: loss.as_str(),
        })
        .inc_by(count);
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectedLabels {
    source: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PayerLabels {
    payer: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientLabels {
    client: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

/// Who a limit or budget belonged to (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole proxy.
    Global,
    /// One configured client.
    Client,
    /// One configured warm-up.
    Warmup,
    /// One subject (`sub`) of a signed visitor token.
    Subject,
    /// One visitor (a caller without a token, by address prefix).
    Visitor,
}

impl Scope {
    /// Bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Client => "client",
            Self::Warmup => "warmup",
            Self::Subject => "subject",
            Self::Visitor => "visitor",
        }
    }

    /// Whose limit it is, for messages: "the proxy's", "this client's".
    pub fn possessive(&self) -> &'static str {
        match self {
            Self::Global => "the proxy's",
            Self::Client => "this client's",
            Self::Warmup => "this warm-up's",
            Self::Subject => "this token subject's",
            Self::Visitor => "this visitor's",
        }
    }
}

/// A `requests_total` counter, resolved on first use (see [`Metrics::record_request_in`]).
#[derive(Debug, Default)]
pub struct CachedCounter(OnceLock<Counter>);

/// Counters of one configured client (or issuer), resolved once at start-up
/// so the request path does no label lookup for them.
#[derive(Debug, Clone, Default)]
pub struct ClientCounters {
    pub requests: Counter,
    pub credits_spent: Counter,
}

/// The connection layer's metrics: handles into the app's registry that
/// the server (`server` module) updates once per connection, never per request.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    open: Gauge<i64, AtomicI64>,
    accepted: Counter,
    refused: Counter,
    closed: Family<ReasonLabels, Counter>,
}

impl ConnectionMetrics {
    /// A connection was accepted and is now open.
    pub fn opened(&self) {
        self.accepted.inc();
        self.open.inc();
    }

    /// A connection was accepted and closed at once: every open one was busy.
    pub fn refused(&self) {
        self.refused.inc();
    }

    /// An open connection ended, for `reason` (a fixed set named by the caller).
    pub fn closed(&self, reason: &'static str) {
        self.open.dec();
        self.closed.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// The `status` of a request whose client left before its answer (or whose
/// connection was closed first): nginx's 499, "client closed request".
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// All metrics of one running proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    history: History,
    requests: Family<RequestLabels, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    collapsed: Counter,
    credits_spent: Counter,
    credits_spent_by: Family<PayerLabels, Counter>,
    credits_saved: Counter,
    upstream_calls: Family<OutcomeLabels, Counter>,
    upstream_latency: Histogram,
    upstream_in_flight: Gauge<i64, AtomicI64>,
    cache_entries: Gauge<u64, AtomicU64>,
    cache_bytes: Gauge<u64, AtomicU64>,
    rate_limited: Family<ScopeLabels, Counter>,
    budget_refused: Family<ScopeLabels, Counter>,
    client_requests: Family<ClientLabels, Counter>,
    client_credits: Family<ClientLabels, Counter>,
    issuer_requests: Family<IssuerLabels, Counter>,
    issuer_credits: Family<IssuerLabels, Counter>,
    visitors: ClientCounters,
    tokens_rejected: Family<ReasonLabels, Counter>,
    stale_served: Counter,
    /// Requests of the proxied route refused before the cache (bad input,
    /// token, origin, limits): for the status page; `requests_total` with
    /// `cache="none"` and a 4xx status says the same to Prometheus.
    rejected: Counter,
    upstream_retries: Counter,
    upstream_refused: Family<ReasonLabels, Counter>,
    redis_errors: Counter,
    entries_rejected: Family<RejectedLabels, Counter>,
    connections: ConnectionMetrics,
    config_reloads: Family<OutcomeLabels, Counter>,
    key_rotations: Counter,
    key_rejected_after_rotation: Counter,
}

impl Metrics {
    /// A fresh registry; `clock` times the per-minute history of the status page.
    pub fn new(clock: SharedClock) -> Self {
        let mut registry = Registry::with_prefix("keyapi_proxy");
        let requests = Family::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route template, status and cache state",
            requests.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "cache_hits",
            "Requests answered from the cache (no upstream call)",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "cache_misses",
            "Requests of the proxied route that were not in the cache (stored, collapsed, refreshed, declined or failed)",
            cache_misses.clone(),
        );
        let collapsed = Counter::default();
        registry.register(
            "collapsed",
            "Misses answered by another request's upstream call (single flight)",
            collapsed.clone(),
        );
        let credits_spent = Counter::default();
        registry.register(
            "credits_spent",
            "KeyAPI credits spent: the route's price for every upstream attempt that reached KeyAPI",
            credits_spent.clone(),
        );
        let credits_spent_by = Family::default();
        registry.register(
            "credits_spent_by",
            "KeyAPI credits spent, by who started the call (request, revalidate, refresh_ahead)",
            credits_spent_by.clone(),
        );
        let credits_saved = Counter::default();
        registry.register(
            "credits_saved",
            "KeyAPI credits saved: the route's price for every request answered without an upstream call of its own (hits, collapsed)",
            credits_saved.clone(),
        );
        let upstream_calls = Family::default();
        registry.register(
            "upstream_calls",
            "Upstream calls made, by outcome (success, declined or an error kind)",
            upstream_calls.clone(),
        );
        let upstream_latency = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "upstream_latency_seconds",
            "Duration of upstream calls, body included",
            upstream_latency.clone(),
        );
        let upstream_in_flight = Gauge::default();
        registry.register(
            "upstream_in_flight",
            "Upstream calls in progress",
            upstream_in_flight.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Answers in the cache",
            cache_entries.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "cache_bytes",
            "Bytes weighed by the cache (keys, bodies and precomputed encodings)",
            cache_bytes.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a rate limit, by scope (global, client, subject, visitor)",
            rate_limited.clone(),
        );
        let budget_refused = Family::default();
        registry.register(
            "budget_refused",
            "Misses refused with 429 because a daily credit budget was spent, by scope",
            budget_refused.clone(),
        );
        let client_requests = Family::default();
        registry.register(
            "client_requests",
            "Authenticated requests of the proxied route, by configured client id",
            client_requests.clone(),
        );
        let client_credits = Family::default();
        registry.register(
            "client_credits_spent",
            "Credits charged to a configured client's daily budget",
            client_credits.clone(),
        );
        let stale_served = Counter::default();
        registry.register(
            "stale_served",
            "Requests answered from a stale copy (stale-while-revalidate or stale-if-error)",
            stale_served.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Upstream retries made after a connect error or HTTP 502/503/504",
            upstream_retries.clone(),
        );
        let config_reloads = Family::default();
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP, POST /admin/reload), by outcome: applied, unchanged or rejected (nothing changed)",
            config_reloads.clone(),
        );
        let key_rotations = Counter::default();
        registry.register(
            "api_key_rotations",
            "Times a new KeyAPI key was read from KEYAPI_API_KEY_FILE and put in use",
            key_rotations.clone(),
        );
        let key_rejected_after_rotation = Counter::default();
        registry.register(
            "upstream_key_rejected_after_rotation",
            "Upstream calls KeyAPI answered 401/403 for a key replaced meanwhile, retried once with the current key",
            key_rejected_after_rotation.clone(),
        );
        let issuer_requests = Family::default();
        registry.register(
            "issuer_requests",
            "Requests let in by a valid signed token, by configured issuer (no subject label)",
            issuer_requests.clone(),
        );
        let issuer_credits = Family::default();
        registry.register(
            "issuer_credits_spent",
            "Credits of upstream calls started by the subjects of a configured issuer",
            issuer_credits.clone(),
        );
        let visitors = ClientCounters::default();
        registry.register(
            "visitor_requests",
            "Requests let in from visitors (callers without a token; no address label)",
            visitors.requests.clone(),
        );
        registry.register(
            "visitor_credits_spent",
            "Credits of upstream calls started by visitors",
            visitors.credits_spent.clone(),
        );
        let tokens_rejected = Family::default();
        registry.register(
            "tokens_rejected",
            "Signed tokens refused, by reason (malformed, unknown_issuer, unknown_key, algorithm, signature, expired, not_yet_valid, audience, subject, keys_unavailable)",
            tokens_rejected.clone(),
        );
        let upstream_refused = Family::default();
        registry.register(
            "upstream_refused",
            "Upstream calls not made because of upstream protection, by reason (held_back, circuit_open, overloaded, spend_cap)",
            upstream_refused.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Redis tier calls that failed or timed out (served from memory and upstream instead)",
            redis_errors.clone(),
        );
        let entries_rejected = Family::default();
        registry.register(
            "cache_entries_rejected",
            "Entries read from Redis or a snapshot and skipped (never served), by source (redis, snapshot) and reason (unreadable, status, body, too_large, api_key, etag, gzip, future, lifetime)",
            entries_rejected.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Trace spans not delivered to the OTLP collector, by reason (queue_full, export_failed)",
            TRACE_SPANS_DROPPED.clone(),
        );
        let connections = ConnectionMetrics::default();
        registry.register(
            "connections_open",
            "Client connections open",
            connections.open.clone(),
        );
        registry.register(
            "connections_accepted",
            "Client connections accepted and served",
            connections.accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed on arrival because server.max_connections were open and all busy",
            connections.refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Client connections ended, by reason (client: the client or the protocol ended it; header_read_timeout, idle_timeout, send_timeout, evicted, shutdown: the proxy closed it)",
            connections.closed.clone(),
        );
        Self {
            registry,
            history: History::new(clock),
            requests,
            cache_hits,
            cache_misses,
            collapsed,
            credits_spent,
            credits_spent_by,
            credits_saved,
            upstream_calls,
            upstream_latency,
            upstream_in_flight,
            cache_entries,
            cache_bytes,
            rate_limited,
            budget_refused,
            client_requests,
            client_credits,
            issuer_requests,
            issuer_credits,
            visitors,
            tokens_rejected,
            stale_served,
            rejected: Counter::default(),
            upstream_retries,
            upstream_refused,
            redis_errors,
            entries_rejected,
            connections,
            config_reloads,
            key_rotations,
            key_rejected_after_rotation,
        }
    }

    /// The connection layer's metrics (handles into this registry).
    pub fn connections(&self) -> ConnectionMetrics {
        self.connections.clone()
    }

    /// The per-minute history and upstream health (for `/stats`).
    pub(crate) fn history(&self) -> &History {
        &self.history
    }

    /// Counts one answered request of `route` (`proxied`: one of the
    /// configured KeyAPI routes). `served` says how a proxied route answered
    /// and what one of its calls costs (`None` for other routes and for
    /// refusals before the cache).
    pub fn record_request(
        &self,
        route: &'static str,
        proxied: bool,
        status: u16,
        served: Option<(Served, u64)>,
    ) {
        self.record_request_in(None, route, proxied, status, served);
    }

    /// [`Metrics::record_request`] for a label set that repeats (a route's
    /// hits): its `requests_total` counter is looked up once, kept in `cached`,
    /// and later requests count without hashing their labels. A `cached`
    /// must only ever be used with one label set.
    pub fn record_request_in(
        &self,
        cached: Option<&CachedCounter>,
        route: &'static str,
        proxied: bool,
        status: u16,
        served: Option<(Served, u64)>,
    ) {
        let labels = RequestLabels {
            route,
            status,
            cache: served.as_ref().map_or("none", |(s, _)| s.as_str()),
        };
        match cached {
            Some(cached) => cached
                .0
                .get_or_init(|| self.requests.get_or_create_owned(&labels))
                .inc(),
            None => self.requests.get_or_create(&labels).inc(),
        };
        let Some((served, credits)) = served else {
            // A client that left was not refused.
            if proxied && (400..500).contains(&status) && status != CLIENT_CLOSED_REQUEST {
                self.rejected.inc();
            }
            return;
        };
        self.history.request(served.is_hit());
        if served.is_hit() {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
        if served.is_stale() {
            self.stale_served.inc();
        }
        if served == Served::Cached(CacheState::Collapsed) {
            self.collapsed.inc();
        }
        if served.saved_a_call() {
            self.credits_saved.inc_by(credits);
        }
    }

    /// Books `credits` spent on an upstream attempt started by `payer`.
    pub fn credits_spent(&self, payer: &'static str, credits: u64) {
        self.credits_spent.inc_by(credits);
        self.credits_spent_by
            .get_or_create(&PayerLabels { payer })
            .inc_by(credits);
        self.history.credits_spent(credits);
    }

    /// Starts timing one upstream call; finish it with [`UpstreamCall::finish`].
    pub fn upstream_call(&self) -> UpstreamCall<'_> {
        self.upstream_in_flight.inc();
        UpstreamCall {
            metrics: self,
            started: Instant::now(),
        }
    }

    /// Counts a retry of an upstream call, when it is made.
    pub fn upstream_retry(&self) {
        self.upstream_retries.inc();
    }

    /// Counts an upstream call that protection did not let through.
    pub fn upstream_refused(&self, reason: &'static str) {
        self.upstream_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a failed or timed-out Redis call.
    pub fn redis_error(&self) {
        self.redis_errors.inc();
    }

    /// Counts an entry read from `source` and skipped for `reason`.
    pub fn cache_entry_rejected(&self, source: &'static str, reason: &'static str) {
        self.entries_rejected
            .get_or_create(&RejectedLabels { source, reason })
            .inc();
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self, scope: Scope) {
        self.rate_limited
            .get_or_create(&ScopeLabels {
                scope: scope.as_str(),
            })
            .inc();
    }

    /// Counts a miss refused by a daily credit budget.
    pub fn budget_refused(&self, scope: Scope) {
        self.budget_refused
            .get_or_create(&ScopeLabels {
                scope: scope.as_str(),
            })
            .inc();
    }

    /// The counters of a configured client (created once, at start-up).
    pub fn client(&self, id: &str) -> ClientCounters {
        let labels = ClientLabels {
            client: id.to_owned(),
        };
        ClientCounters {
            requests: self.client_requests.get_or_create(&labels).clone(),
            credits_spent: self.client_credits.get_or_create(&labels).clone(),
        }
    }

    /// The counters of a configured issuer (created once, at start-up).
    pub fn issuer(&self, name: &str) -> ClientCounters {
        let labels = IssuerLabels {
            issuer: name.to_owned(),
        };
        ClientCounters {
            requests: self.issuer_requests.get_or_create(&labels).clone(),
            credits_spent: self.issuer_credits.get_or_create(&labels).clone(),
        }
    }

    /// The counters of all visitors together.
    pub fn visitors(&self) -> ClientCounters {
        self.visitors.clone()
    }

    /// Counts a configuration reload by its `outcome` (`applied`, `unchanged`, `rejected`).
    pub fn config_reload(&self, outcome: &'static str) {
        self.config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts a new KeyAPI key put in use.
    pub fn api_key_rotated(&self) {
        self.key_rotations.inc();
    }

    /// Counts a call KeyAPI refused for a key replaced meanwhile (retried once).
    pub fn key_rejected_after_rotation(&self) {
        self.key_rejected_after_rotation.inc();
    }

    /// Counts a signed token refused for `reason`.
    pub fn token_rejected(&self, reason: &'static str) {
        self.tokens_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The registry as text in `format`, after updating the cache gauges.
    pub fn render(&self, format: Format, cache_entries: u64, cache_bytes: u64) -> String {
        self.cache_entries.set(cache_entries);
        self.cache_bytes.set(cache_bytes);
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Prometheus => prometheus_text(&out),
        }
    }

    /// Totals for `/stats`.
    pub fn totals(&self) -> Totals {
        Totals {
            hits: self.cache_hits.get(),
            misses: self.cache_misses.get(),
            collapsed: self.collapsed.get(),
            credits_spent: self.credits_spent.get(),
            credits_saved: self.credits_saved.get(),
            rejected: self.rejected.get(),
            upstream_in_flight: u64::try_from(self.upstream_in_flight.get()).unwrap_or(0),
        }
    }
}

/// OpenMetrics text as Prometheus text 0.0.4. The two differ, for what this
/// registry holds, only in that 0.0.4 names a counter family after its
/// `_total` samples (else `# HELP` matches no sample) and has no `# UNIT` or
/// `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match comment {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if tail == "unknown" { "untyped" } else { tail });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Cumulative counters since start, as numbers.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub hits: u64,
    pub misses: u64,
    pub collapsed: u64,
    pub credits_spent: u64,
    pub credits_saved: u64,
    /// Requests of the proxied route refused before the cache (4xx from us).
    pub rejected: u64,
    pub upstream_in_flight: u64,
}

/// One upstream call being timed. Dropping it without [`finish`](Self::finish)
/// still releases the in-flight gauge.
pub struct UpstreamCall<'a> {
    metrics: &'a Metrics,
    started: Instant,
}

impl UpstreamCall<'_> {
    /// Records the call's outcome label — `Ok` for an answer we can forward,
    /// `Err` for a failure kind — and latency (its cost is the ledger's).
    pub fn finish(self, result: Result<&'static str, &'static str>) {
        let m = self.metrics;
        let (outcome, error) = match result {
            Ok(outcome) => (outcome, None),
            Err(kind) => (kind, Some(kind)),
        };
        m.history.upstream_call(error);
        m.upstream_calls
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        m.upstream_latency
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for UpstreamCall<'_> {
    fn drop(&mut self) {
        self.metrics.upstream_in_flight.dec();
    }
}
