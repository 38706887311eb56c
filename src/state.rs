//! What every handler shares: [`AppState`], built by [`crate::app`] and, on
//! each configuration reload, by `reload`. Handlers import this module, never
//! `app`, so the HTTP layer does not depend on how the service is assembled
//! and run.
//!
//! It has two parts. [`Lasting`] lives as long as the process: the cache and
//! upstream pipeline, the metrics, the clock. [`Live`] is one generation of
//! the configuration that a reload replaces as a whole: clients, issuers,
//! visitors, limits, routes, warm-ups. A request takes the generation once,
//! as it arrives, and keeps it to the end: it sees the old configuration or
//! the new one, never a mix.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;

use crate::{
    access::Access, clock::SharedClock, issuers::Issuers, limits::RateLimit, live::Reloads,
    metrics::Metrics, proxy::Proxy, route::RouteTable, spend::SpendHistory, visitors::Visitors,
    warmup::Warmup,
};

/// One generation of the configuration, as requests see it (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Lasting>,
    live: Arc<Live>,
}

/// What lives as long as the process, whatever reloads change.
pub struct Lasting {
    pub proxy: Proxy,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    /// Reload requests (`POST /admin/reload`) and what reloads did.
    pub reloads: Reloads,
    /// Credits spent and saved, calls and refusals, per UTC day and payer.
    pub spend: Arc<SpendHistory>,
    /// False before start and while draining (`/readyz`).
    pub ready: AtomicBool,
}

/// What a reload replaces, as one piece.
pub struct Live {
    pub access: Access,
    /// The `[[issuers]]` whose signed tokens let visitors in (kept across a
    /// reload that leaves `[[issuers]]` as it is).
    pub issuers: Arc<Issuers>,
    /// Callers without a token: their limits and the ones seen lately
    /// (kept across a reload that leaves `[visitors]` as it is).
    pub visitors: Arc<Visitors>,
    pub rate_limit: Option<Arc<RateLimit>>,
    pub routes: RouteTable,
    /// `/openapi.json`, rendered once for this configuration.
    pub openapi: Bytes,
    pub allow_client_refresh: bool,
    /// The configured warm-ups (their schedules run in `reload`).
    pub warmups: Vec<Arc<Warmup>>,
}

impl AppState {
    /// `live` as seen with `shared`.
    pub fn new(shared: Arc<Lasting>, live: Arc<Live>) -> Self {
        Self { shared, live }
    }

    /// The part no reload replaces.
    pub fn shared(&self) -> &Arc<Lasting> {
        &self.shared
    }

    /// This generation of the configuration.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The cache/single-flight/upstream pipeline.
    pub fn proxy(&self) -> &Proxy {
        &self.shared.proxy
    }

    /// This app's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Reload requests and what reloads did.
    pub fn reloads(&self) -> &Reloads {
        &self.shared.reloads
    }

    /// Credits spent and saved, calls and refusals, per UTC day and payer.
    pub fn spend(&self) -> &Arc<SpendHistory> {
        &self.shared.spend
    }

    /// The configured clients (empty: open proxy).
    pub fn access(&self) -> &Access {
        &self.live.access
    }

    /// The configured issuers of signed visitor tokens (empty: none).
    pub fn issuers(&self) -> &Issuers {
        &self.live.issuers
    }

    /// Callers without a token, known by address prefix.
    pub fn visitors(&self) -> &Visitors {
        &self.live.visitors
    }

    /// The clock that rate limits, budgets and statistics count with.
    pub fn clock(&self) -> &SharedClock {
        &self.shared.clock
    }

    /// The global rate limit, if configured.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.live.rate_limit.as_deref()
    }

    /// The configured routes.
    pub fn routes(&self) -> &RouteTable {
        &self.live.routes
    }

    /// The configured warm-ups.
    pub fn warmups(&self) -> &[Arc<Warmup>] {
        &self.live.warmups
    }

    /// The OpenAPI document, as stored JSON bytes.
    pub fn openapi(&self) -> &Bytes {
        &self.live.openapi
    }

    /// Whether clients may force a refresh with `Cache-Control: no-cache` (or
    /// `max-age` / `min-fresh` refusing a fresh copy).
    pub fn allow_client_refresh(&self) -> bool {
        self.live.allow_client_refresh
    }

    /// True while serving; false before start and while draining.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }
}

impl Lasting {
    /// Marks the service ready (serving) or not (starting, draining).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}
