//! Registering every metric family of one [`Metrics`] in its registry, with
//! its name and help text: the list a scraper sees.

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{ClientCounters, ConnectionMetrics, History, Metrics, TRACE_SPANS_DROPPED};
use crate::clock::SharedClock;

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
}
