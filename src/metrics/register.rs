//! Registering every metric family of one [`Metrics`] in its registry, with
//! its name and help text: the list a scraper sees.

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

use super::{ClientCounters, ConnectionMetrics, History, Metrics, TRACE_SPANS_DROPPED};
use crate::clock::SharedClock;

impl Metrics {
    /// A fresh registry; `clock` times the per-minute history of the status page.
    pub fn new(clock: SharedClock) -> Self {
        let mut registry = Registry::with_prefix("keyapi_proxy");
        let requests = registered(
            &mut registry,
            "requests",
            "HTTP requests answered, by route template, status and cache state",
            Family::default(),
        );
        let cache_hits = registered(
            &mut registry,
            "cache_hits",
            "Requests answered from the cache (no upstream call)",
            Counter::default(),
        );
        let cache_misses = registered(
            &mut registry,
            "cache_misses",
            "Requests of the proxied route that were not in the cache (stored, collapsed, refreshed, declined or failed)",
            Counter::default(),
        );
        let collapsed = registered(
            &mut registry,
            "collapsed",
            "Misses answered by another request's upstream call (single flight)",
            Counter::default(),
        );
        let credits_spent = registered(
            &mut registry,
            "credits_spent",
            "KeyAPI credits spent: the route's price for every upstream attempt that reached KeyAPI",
            Counter::default(),
        );
        let credits_spent_by = registered(
            &mut registry,
            "credits_spent_by",
            "KeyAPI credits spent, by who started the call (request, revalidate, refresh_ahead)",
            Family::default(),
        );
        let credits_saved = registered(
            &mut registry,
            "credits_saved",
            "KeyAPI credits saved: the route's price for every request answered without an upstream call of its own (hits, collapsed)",
            Counter::default(),
        );
        let upstream_calls = registered(
            &mut registry,
            "upstream_calls",
            "Upstream calls made, by outcome (success, declined or an error kind)",
            Family::default(),
        );
        let upstream_latency = registered(
            &mut registry,
            "upstream_latency_seconds",
            "Duration of upstream calls, body included",
            Histogram::new(exponential_buckets(0.005, 2.0, 12)),
        );
        let upstream_in_flight = registered(
            &mut registry,
            "upstream_in_flight",
            "Upstream calls in progress",
            Gauge::default(),
        );
        let cache_entries = registered(
            &mut registry,
            "cache_entries",
            "Answers in the cache",
            Gauge::default(),
        );
        let cache_bytes = registered(
            &mut registry,
            "cache_bytes",
            "Bytes weighed by the cache (keys, bodies and precomputed encodings)",
            Gauge::default(),
        );
        let rate_limited = registered(
            &mut registry,
            "rate_limited",
            "Requests refused with 429 by a rate limit, by scope (global, client, subject, visitor)",
            Family::default(),
        );
        let budget_refused = registered(
            &mut registry,
            "budget_refused",
            "Misses refused with 429 because a daily credit budget was spent, by scope",
            Family::default(),
        );
        let client_requests = registered(
            &mut registry,
            "client_requests",
            "Authenticated requests of the proxied route, by configured client id",
            Family::default(),
        );
        let client_credits = registered(
            &mut registry,
            "client_credits_spent",
            "Credits charged to a configured client's daily budget",
            Family::default(),
        );
        let stale_served = registered(
            &mut registry,
            "stale_served",
            "Requests answered from a stale copy (stale-while-revalidate or stale-if-error)",
            Counter::default(),
        );
        let upstream_retries = registered(
            &mut registry,
            "upstream_retries",
            "Upstream retries made after a connect error or HTTP 502/503/504",
            Counter::default(),
        );
        let config_reloads = registered(
            &mut registry,
            "config_reloads",
            "Configuration reloads (SIGHUP, POST /admin/reload), by outcome: applied, unchanged or rejected (nothing changed)",
            Family::default(),
        );
        let key_rotations = registered(
            &mut registry,
            "api_key_rotations",
            "Times a new KeyAPI key was read from KEYAPI_API_KEY_FILE and put in use",
            Counter::default(),
        );
        let key_rejected_after_rotation = registered(
            &mut registry,
            "upstream_key_rejected_after_rotation",
            "Upstream calls KeyAPI answered 401/403 for a key replaced meanwhile, retried once with the current key",
            Counter::default(),
        );
        let issuer_requests = registered(
            &mut registry,
            "issuer_requests",
            "Requests let in by a valid signed token, by configured issuer (no subject label)",
            Family::default(),
        );
        let issuer_credits = registered(
            &mut registry,
            "issuer_credits_spent",
            "Credits of upstream calls started by the subjects of a configured issuer",
            Family::default(),
        );
        let visitors = ClientCounters {
            requests: registered(
                &mut registry,
                "visitor_requests",
                "Requests let in from visitors (callers without a token; no address label)",
                Counter::default(),
            ),
            credits_spent: registered(
                &mut registry,
                "visitor_credits_spent",
                "Credits of upstream calls started by visitors",
                Counter::default(),
            ),
        };
        let tokens_rejected = registered(
            &mut registry,
            "tokens_rejected",
            "Signed tokens refused, by reason (malformed, unknown_issuer, unknown_key, algorithm, signature, expired, not_yet_valid, audience, subject, keys_unavailable)",
            Family::default(),
        );
        let upstream_refused = registered(
            &mut registry,
            "upstream_refused",
            "Upstream calls not made because of upstream protection, by reason (held_back, circuit_open, overloaded, spend_cap)",
            Family::default(),
        );
        let redis_errors = registered(
            &mut registry,
            "redis_errors",
            "Redis calls that failed or timed out (served from memory and upstream instead), by kind (not_connected, timeout, refused, connection, readonly, cluster, server, other)",
            Family::default(),
        );
        let entries_rejected = registered(
            &mut registry,
            "cache_entries_rejected",
            "Entries read from Redis or a snapshot and skipped (never served), by source (redis, snapshot) and reason (unreadable, status, body, too_large, api_key, etag, gzip, future, lifetime)",
            Family::default(),
        );
        registry.register(
            "trace_spans_dropped",
            "Trace spans not delivered to the OTLP collector, by reason (queue_full, export_failed)",
            TRACE_SPANS_DROPPED.clone(),
        );
        let connections = ConnectionMetrics {
            open: registered(
                &mut registry,
                "connections_open",
                "Client connections open",
                Gauge::default(),
            ),
            accepted: registered(
                &mut registry,
                "connections_accepted",
                "Client connections accepted and served",
                Counter::default(),
            ),
            refused: registered(
                &mut registry,
                "connections_refused",
                "Client connections closed on arrival because server.max_connections were open and all busy",
                Counter::default(),
            ),
            closed: registered(
                &mut registry,
                "connections_closed",
                "Client connections ended, by reason (client: the client or the protocol ended it; header_read_timeout, idle_timeout, send_timeout, evicted, shutdown: the proxy closed it)",
                Family::default(),
            ),
        };
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

/// Registers `metric` under `name` with `help`, and gives it back to keep:
/// the registry holds a clone, sharing its value.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}
