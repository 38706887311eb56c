//! Building and running the service: [`App::build`] turns a config and a key
//! into a bound listener and a router; [`App::run_until`] serves until a
//! shutdown future resolves, then drains for at most the grace period.
//! Binding happens in `build` so callers (tests) can use port 0 and ask for
//! the real address.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::Router;
use bytes::Bytes;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tower::Layer as _;
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    access::Access,
    cache::{FreshnessPolicy, LocalCache, redis::RedisTier},
    clock::{Clock, SharedClock, SystemClock},
    config::{self, Config},
    cors,
    key::HashtagRules,
    limits::{Budget, RateLimit},
    metrics::{Metrics, Scope},
    observe::{Observe, ObserveLayer},
    openapi,
    protect::Protection,
    proxy::Proxy,
    routes,
    server::{self, Limits},
    snapshot,
    upstream::Upstream,
};

/// Why the service could not start. Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot set up the Redis client: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Shared, read-only state of the running service (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    proxy: Proxy,
    metrics: Arc<Metrics>,
    access: Access,
    clock: SharedClock,
    rate_limit: Option<RateLimit>,
    budget: Option<Budget>,
    rules: HashtagRules,
    /// `/openapi.json`, rendered once for this configuration.
    openapi: Bytes,
    allow_client_refresh: bool,
    /// What `/stats` and `/` show, recomputed at most once a second.
    stats: routes::StatsCell,
    ready: AtomicBool,
}

impl AppState {
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

    /// The clock that rate limits, budgets and statistics count with.
    pub fn clock(&self) -> &SharedClock {
        &self.0.clock
    }

    /// The global rate limit, if configured.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.0.rate_limit.as_ref()
    }

    /// The global daily credit budget, if configured.
    pub fn budget(&self) -> Option<&Budget> {
        self.0.budget.as_ref()
    }

    /// The hashtag route's parameter rules and TTLs.
    pub fn rules(&self) -> &HashtagRules {
        &self.0.rules
    }

    /// The OpenAPI document, as stored JSON bytes.
    pub fn openapi(&self) -> &Bytes {
        &self.0.openapi
    }

    /// Whether clients may force a refresh with `Cache-Control: no-cache`.
    pub fn allow_client_refresh(&self) -> bool {
        self.0.allow_client_refresh
    }

    /// What the operational endpoints show, shared between their requests.
    pub(crate) fn stats(&self) -> &routes::StatsCell {
        &self.0.stats
    }

    /// True while serving; false before start and while draining.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
    }

    fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::Relaxed);
    }
}

/// A built, bound, not yet running service.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Observe<Router>,
    state: AppState,
    limits: Limits,
    snapshot: Option<(PathBuf, Duration)>,
}

impl App {
    /// Validates `config`, builds the pipeline and binds the listener.
    pub async fn build(config: Config, api_key: SecretString) -> Result<Self, StartupError> {
        Self::build_with_clock(config, api_key, Arc::new(SystemClock)).await
    }

    /// [`App::build`] with a chosen clock (tests move time by hand).
    pub async fn build_with_clock(
        config: Config,
        api_key: SecretString,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        config.validate()?;
        let clock = SharedClock::new(clock);
        let rules = HashtagRules::from_config(&config);
        let openapi = openapi::document(&rules);
        if !config::is_valid_api_key(&api_key) {
            return Err(config::ConfigError::BadApiKey("the caller").into());
        }
        let metrics = Arc::new(Metrics::new(config.credits.per_call, clock.clone()));
        let upstream = Upstream::new(&config.upstream, api_key)?.with_metrics(Arc::clone(&metrics));
        let redis = match &config.cache.redis.url {
            Some(url) => Some(Arc::new(RedisTier::new(
                url.expose(),
                &config.cache.redis,
                Arc::clone(&metrics),
            )?)),
            None => None,
        };
        let state = AppState(Arc::new(Shared {
            proxy: Proxy::new(
                LocalCache::new(config.cache.max_bytes),
                redis.clone(),
                upstream,
                Protection::from_config(&config.upstream),
                FreshnessPolicy::from_config(&config.cache),
                Arc::clone(&metrics),
            ),
            metrics: Arc::clone(&metrics),
            access: Access::new(&config.clients, &metrics, &clock, redis.as_ref()),
            rate_limit: RateLimit::new(
                config.rate_limit.per_minute,
                config.rate_limit.burst,
                Scope::Global,
                &clock,
            )
            .map(|l| l.shared(redis.as_ref(), "global")),
            budget: Budget::new(config.credits.daily_budget, Scope::Global)
                .map(|b| b.shared(redis.as_ref(), "global")),
            clock,
            rules,
            openapi,
            allow_client_refresh: config.cache.allow_client_refresh,
            stats: routes::StatsCell::default(),
            ready: AtomicBool::new(false),
        }));
        let mut router = routes::router(state.clone());
        if let Some(cors) = cors::layer(&config.cors) {
            router = router.layer(cors);
        }
        // Observe wraps the finished router once (not each route): ids, the
        // access log and request metrics see every answer, 404s and panics included.
        let router = ObserveLayer::new(metrics).layer(router.layer(CatchPanicLayer::new()));
        let snapshot = config
            .cache
            .snapshot_path
            .clone()
            .map(|path| (path, config.cache.snapshot_interval));
        if let Some((path, _)) = &snapshot {
            match snapshot::load(path, state.proxy().cache()).await {
                Ok(count) => tracing::info!(path = %path.display(), count, "cache snapshot loaded"),
                Err(e) => tracing::warn!(error = %e, "cache snapshot skipped"),
            }
        }
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        if state.access().is_open() && !local_addr.ip().is_loopback() {
            // Only reachable with server.open = true (validate refuses it otherwise).
            tracing::warn!(
                %local_addr,
                "server.open = true and no [[clients]]: \
                 anyone who can reach this port spends your KeyAPI credits"
            );
        }
        Ok(Self {
            listener,
            local_addr,
            router,
            state,
            limits: Limits {
                header_read_timeout: config.server.header_read_timeout,
                idle_timeout: config.server.idle_timeout,
                max_connections: config.server.max_connections.unwrap_or_else(|| {
                    server::default_max_connections(config.upstream.max_in_flight)
                }),
                shutdown_grace: config.server.shutdown_grace,
            },
            snapshot,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Shared state, e.g. to inspect the cache.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, closes silent
    /// connections and lets in-flight requests finish for at most the
    /// configured grace period; the final snapshot is written either way.
    pub async fn run_until<F>(self, shutdown: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Self {
            listener,
            local_addr,
            router,
            state,
            limits,
            snapshot,
        } = self;
        let purges = state.proxy().redis().cloned().map(|redis| {
            let cache = state.proxy().cache().clone();
            tokio::spawn(async move { redis.follow_purges(cache).await })
        });
        let saver = snapshot.as_ref().map(|(path, interval)| {
            tokio::spawn(save_periodically(path.clone(), *interval, state.clone()))
        });
        let signal_state = state.clone();
        let signal = async move {
            shutdown.await;
            signal_state.set_ready(false);
        };
        state.set_ready(true);
        tracing::info!(%local_addr, max_connections = limits.max_connections, "listening");
        server::serve(listener, router, limits, signal).await;
        for task in [saver, purges].into_iter().flatten() {
            task.abort();
        }
        if let Some((path, _)) = &snapshot {
            save_snapshot(path, &state).await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

async fn save_periodically(path: PathBuf, interval: Duration, state: AppState) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await; // the first tick is immediate
    loop {
        ticks.tick().await;
        save_snapshot(&path, &state).await;
    }
}

async fn save_snapshot(path: &Path, state: &AppState) {
    match snapshot::save(path, state.proxy().cache()).await {
        Ok(count) => tracing::info!(path = %path.display(), count, "cache snapshot written"),
        Err(e) => tracing::warn!(error = %e, "cache snapshot not written"),
    }
}
