//! What every handler shares: [`AppState`], built once by [`crate::app`].
//! Handlers import this module, never `app`, so the HTTP layer does not
//! depend on how the service is assembled and run.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;

use crate::{
    access::Access, clock::SharedClock, issuers::Issuers, limits::RateLimit, metrics::Metrics,
    proxy::Proxy, route::RouteTable, visitors::Visitors, warmup::Warmup,
};

/// Shared, read-only state of the running service (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

/// The parts of an [`AppState`]: what the handlers share, as [`crate::app`]
/// assembles it.
pub struct AppParts {
    pub proxy: Proxy,
    pub metrics: Arc<Metrics>,
    pub access: Access,
    /// The `[[issuers]]` whose signed tokens let visitors in.
    pub issuers: Issuers,
    /// Callers without a token: their limits and the ones seen lately.
    pub visitors: Visitors,
    pub clock: SharedClock,
    pub rate_limit: Option<RateLimit>,
    pub routes: RouteTable,
    /// `/openapi.json`, rendered once for this configuration.
    pub openapi: Bytes,
    pub allow_client_refresh: bool,
    /// The configured warm-ups (their schedules run in [`crate::app`]).
    pub warmups: Vec<Arc<Warmup>>,
    /// False before start and while draining (`/readyz`).
    pub ready: AtomicBool,
}

impl AppState {
    /// Shares `parts` with every handler.
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }

    /// The cache/single-flight/upstream pipeline.
    pub fn proxy(&self) -> &Proxy {
        &self.0.proxy
    }

    /// This app's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The configured clients (empty: open proxy).
    pub fn access(&self) -> &Access {
        &self.0.access
    }

    /// The configured issuers of signed visitor tokens (empty: none).
    pub fn issuers(&self) -> &Issuers {
        &self.0.issuers
    }

    /// Callers without a token, known by address prefix.
    pub fn visitors(&self) -> &Visitors {
        &self.0.visitors
    }

    /// The clock that rate limits, budgets and statistics count with.
    pub fn clock(&self) -> &SharedClock {
        &self.0.clock
    }

    /// The global rate limit, if configured.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.0.rate_limit.as_ref()
    }

    /// The configured routes.
    pub fn routes(&self) -> &RouteTable {
        &self.0.routes
    }

    /// The configured warm-ups.
    pub fn warmups(&self) -> &[Arc<Warmup>] {
        &self.0.warmups
    }

    /// The OpenAPI document, as stored JSON bytes.
    pub fn openapi(&self) -> &Bytes {
        &self.0.openapi
    }

    /// Whether clients may force a refresh with `Cache-Control: no-cache` (or
    /// `max-age` / `min-fresh` refusing a fresh copy).
    pub fn allow_client_refresh(&self) -> bool {
        self.0.allow_client_refresh
    }

    /// True while serving; false before start and while draining.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
    }

    /// Marks the service ready (serving) or not (starting, draining).
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::Relaxed);
    }
}
