//! Prometheus metrics, owned by one [`App`](crate::app::App): each app has its
//! own [`Registry`] (no global recorder), so parallel tests in one binary see
//! exact numbers and two apps in one process never mix their counters.
//!
//! Every label is bounded: route templates, cache states, upstream outcome
//! kinds, limit scopes and client ids from configuration — never a raw
//! hashtag or anything else a client can choose.
//!
//! Beside the counters, `history` keeps the last hour minute by minute for
//! the status page (`status`). `register` names every family,
//! `labels` holds their label sets and `exposition` the text formats; this
//! file records.

mod exposition;
pub(crate) mod history;
mod labels;
mod register;

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicI64, AtomicU64},
    },
    time::Instant,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use exposition::Format;
pub(crate) use history::History;
pub use labels::Scope;

use self::{
    exposition::prometheus_text,
    labels::{
        ClientLabels, IssuerLabels, KindLabels, OutcomeLabels, PayerLabels, ReasonLabels,
        RejectedLabels, RequestLabels, ScopeLabels,
    },
};
use crate::served::{CacheState, Served};

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
    redis_errors: Family<KindLabels, Counter>,
    entries_rejected: Family<RejectedLabels, Counter>,
    connections: ConnectionMetrics,
    config_reloads: Family<OutcomeLabels, Counter>,
    key_rotations: Counter,
    key_rejected_after_rotation: Counter,
}

impl Metrics {
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

    /// Counts a failed or timed-out Redis call by its (bounded) `kind`.
    pub fn redis_error(&self, kind: &'static str) {
        self.redis_errors.get_or_create(&KindLabels { kind }).inc();
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
