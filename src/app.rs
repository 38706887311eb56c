//! Building and running the service: [`App::build`] turns a config and a key
//! into a bound listener and a router; [`App::run_until`] serves until a
//! shutdown future resolves, then drains for at most the grace period.
//! Binding happens in `build` so callers (tests) can use port 0 and ask for
//! the real address. The configuration's live part is assembled by
//! [`crate::reload`], which also replaces it while running.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use arc_swap::ArcSwap;
use secrecy::SecretString;
use tokio::{net::TcpListener, sync::mpsc, time::Instant};

pub use crate::reload::{Origin, compile};
use crate::{
    api_key::LiveKey,
    cache::{EntryCheck, LocalCache, Tiers, redis::RedisTier},
    caller::Resolver,
    clock::{Clock, SharedClock, SystemClock},
    config::{self, Config},
    ledger::Ledger,
    live::{ReloadRequest, Reloads},
    metrics::Metrics,
    observe::{Observe, Traced},
    protect::Protection,
    proxy::Proxy,
    redis_conn::{RedisConn, TargetError},
    reload::{self, LiveError, Reloader, ReloaderParts},
    routes::Front,
    server::{self, Limits},
    snapshot,
    spend::{self, SpendHistory},
    state::{AppState, Lasting},
    upstream::Upstream,
};

/// Why the service could not start. Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("configuration: {0}")]
    Redis(#[from] TargetError),
}

/// A built, bound, not yet running service.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    front: Observe<Front>,
    state: AppState,
    /// Answers reloads and runs the warm-ups (in its own task while serving).
    reloader: Reloader,
    reload_requests: mpsc::Receiver<ReloadRequest>,
    limits: Limits,
    /// `server.drain_delay`: not ready but still accepting, after the signal.
    drain_delay: Duration,
    snapshot: Option<(PathBuf, Duration)>,
}

impl App {
    /// Validates `config`, builds the pipeline and binds the listener.
    pub async fn build(config: Config, api_key: SecretString) -> Result<Self, StartupError> {
        Self::build_with_clock(config, api_key, Arc::new(SystemClock)).await
    }

    /// [`App::build`] with a chosen clock (tests move time by hand). A
    /// reload reads the defaults and the environment; the key never changes.
    pub async fn build_with_clock(
        config: Config,
        api_key: SecretString,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        Self::build_from(Origin::default(), config, api_key, clock).await
    }

    /// [`App::build_with_clock`] for `config` read from `origin`, where a
    /// reload reads it (and the key, from a file) again.
    pub async fn build_from(
        origin: Origin,
        config: Config,
        api_key: SecretString,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        config.validate()?;
        let hangups = reload::hangups();
        let clock = SharedClock::new(clock);
        let compiled = reload::compile(&config)?;
        if !config::is_valid_api_key(&api_key) {
            return Err(config::ConfigError::BadApiKey("the caller").into());
        }
        let metrics = Arc::new(Metrics::new(clock.clone()));
        let api_key = Arc::new(LiveKey::new(
            api_key,
            origin.key_file.clone(),
            Arc::clone(&metrics),
            clock.clone(),
        ));
        let upstream = Upstream::new(&config.upstream, Arc::clone(&api_key))?
            .propagating_traces(config.telemetry.propagate_upstream);
        // Redis and the snapshot hand back what anyone could have written:
        // both are held to what these routes could have stored.
        let check = Arc::new(EntryCheck::new(
            compiled.0.entry_limits(config.upstream.max_body_bytes),
            upstream.key_echo(),
            Arc::clone(&metrics),
            clock.clone(),
        ));
        let redis = match config.cache.redis.target()? {
            Some(target) => Some(Arc::new(RedisConn::new(
                &target,
                config.cache.redis.settings(),
                Arc::clone(&metrics),
            )?)),
            None => None,
        };
        let tier = redis.as_ref().map(|conn| {
            Arc::new(RedisTier::new(
                Arc::clone(conn),
                config.cache.redis.tier_settings(config.worst_fetch()),
                Arc::clone(&check),
            ))
        });
        let spend = Arc::new(SpendHistory::new(
            config.credits.history_days,
            clock.clone(),
            redis.clone(),
        ));
        let ledger = Ledger::new(
            Arc::clone(&spend),
            config.credits.daily_budget,
            redis.clone(),
            config.credits.outage_allowance,
            clock.clone(),
            Arc::clone(&metrics),
        );
        let (reloads, reload_requests) = Reloads::new();
        let shared = Arc::new(Lasting {
            proxy: Proxy::new(
                Tiers::new(
                    LocalCache::new(config.cache.max_bytes, clock.clone()),
                    tier,
                    clock.clone(),
                ),
                upstream,
                Protection::from_config(&config.upstream, clock.clone()),
                ledger,
                clock.clone(),
                Arc::clone(&metrics),
            ),
            metrics: Arc::clone(&metrics),
            clock,
            reloads,
            spend,
            ready: AtomicBool::new(false),
        });
        let live = reload::build_live(&config, compiled, &shared, redis.as_ref(), None)?;
        let state = AppState::new(Arc::clone(&shared), Arc::new(live));
        let current = Arc::new(ArcSwap::from_pointee(reload::generation(
            state.clone(),
            &config,
        )));
        let labels = Arc::new(ArcSwap::from_pointee(reload::labels(&state)));
        let callers = Resolver::new(
            &config.server.trusted_proxies,
            config.server.client_addr_header,
        );
        let traced = match (
            config.telemetry.enabled(),
            config.telemetry.trust_traceparent,
        ) {
            (false, _) => Traced::Off,
            (true, false) => Traced::Root,
            (true, true) => Traced::TrustTraceparent,
        };
        // Observe wraps the whole surface once (not each route): ids, the
        // access log and request metrics see every answer, 404s and panics
        // (which it turns into 500s) included.
        let front = Observe::new(
            Front::new(Arc::clone(&current)),
            metrics,
            Arc::clone(&labels),
            callers,
            traced,
        );
        let snapshot = config
            .cache
            .snapshot_path
            .clone()
            .map(|path| (path, config.cache.snapshot_interval));
        if let Some((path, _)) = &snapshot {
            let (cache, now) = (state.proxy().cache(), state.clock().now());
            match snapshot::load(path, cache, &check, now).await {
                Ok(loaded) => {
                    let count = loaded.entries;
                    tracing::info!(path = %path.display(), count, "cache snapshot loaded");
                    let spend = loaded.spend.filter(|_| state.proxy().redis().is_none());
                    if spend.is_some_and(|spend| !state.spend().import(&spend)) {
                        tracing::warn!("the snapshot's spend history is unreadable; skipped");
                    }
                }
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
        let limits = Limits {
            header_read_timeout: config.server.header_read_timeout,
            idle_timeout: config.server.idle_timeout,
            send_timeout: config.server.send_timeout,
            http2: config.server.http2,
            max_connections: config
                .server
                .max_connections
                .unwrap_or_else(|| server::default_max_connections(config.upstream.max_in_flight)),
            shutdown_grace: config.server.shutdown_grace,
        };
        let drain_delay = config.server.drain_delay;
        let reloader = Reloader::new(ReloaderParts {
            origin,
            shared,
            current,
            labels,
            check,
            redis,
            api_key,
            running: config,
            hangups,
        });
        Ok(Self {
            listener,
            local_addr,
            front,
            state,
            reloader,
            reload_requests,
            limits,
            drain_delay,
            snapshot,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The app's state (the configuration generation in use), e.g. to inspect the cache.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, turns `/readyz` to 503 and serves on
    /// for `server.drain_delay`, then stops accepting, closes silent
    /// connections and lets in-flight requests finish for at most the
    /// configured grace period; the final snapshot is written either way.
    pub async fn run_until<F>(self, shutdown: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Self {
            listener,
            local_addr,
            front,
            state,
            reloader,
            reload_requests,
            limits,
            drain_delay,
            snapshot,
        } = self;
        // Only what lives as long as the process: holding `state` here would
        // keep the first configuration generation (its tables of visitors and
        // subjects) alive past every reload.
        let lasting = Arc::clone(state.shared());
        drop(state);
        let purges = lasting.proxy.redis().cloned().map(|redis| {
            let cache = lasting.proxy.cache().clone();
            tokio::spawn(async move { redis.follow_purges(cache).await })
        });
        // Reloads, the key file's watch and the warm-ups' schedules.
        let reloads = tokio::spawn(reloader.run(reload_requests));
        let saver = snapshot.as_ref().map(|(path, interval)| {
            tokio::spawn(save_periodically(
                path.clone(),
                *interval,
                Arc::clone(&lasting),
            ))
        });
        let spend = Arc::clone(&lasting.spend);
        let flusher = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(spend::FLUSH_EVERY);
            loop {
                ticks.tick().await;
                spend.flush().await;
            }
        });
        // Set when draining starts: connections and fetches must end by then.
        let (deadline_tx, deadline_rx) = tokio::sync::watch::channel(None::<Instant>);
        let shutdown_grace = limits.shutdown_grace;
        let signal_lasting = Arc::clone(&lasting);
        let signal = async move {
            shutdown.await;
            signal_lasting.set_ready(false);
            if !drain_delay.is_zero() {
                tracing::info!(
                    ?drain_delay,
                    "not ready; serving on until the listener closes"
                );
                tokio::time::sleep(drain_delay).await;
            }
            deadline_tx.send_replace(Some(Instant::now() + shutdown_grace));
        };
        lasting.set_ready(true);
        tracing::info!(%local_addr, max_connections = limits.max_connections, "listening");
        let connections = lasting.metrics.connections();
        server::serve(listener, front, limits, connections, signal).await;
        // No reloads nor new warm-up calls once draining; fetches they
        // started go on below.
        reloads.abort();
        // Fetches still running (background refreshes included) have been or
        // are being paid for: let them finish and be stored, so the snapshot
        // keeps them and a restart does not pay again.
        let deadline = deadline_rx
            .borrow()
            .unwrap_or_else(|| Instant::now() + shutdown_grace);
        if tokio::time::timeout_at(deadline, lasting.proxy.idle())
            .await
            .is_err()
        {
            tracing::warn!("grace period over with upstream fetches still running");
        }
        for task in [saver, purges, Some(flusher)].into_iter().flatten() {
            task.abort();
        }
        // The last counts: to Redis, or into memory for the snapshot below.
        lasting.spend.flush().await;
        if let Some((path, _)) = &snapshot {
            save_snapshot(path, &lasting).await;
        }
        tracing::info!("stopped");
    }
}

async fn save_periodically(path: PathBuf, interval: Duration, lasting: Arc<Lasting>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await; // the first tick is immediate
    loop {
        ticks.tick().await;
        save_snapshot(&path, &lasting).await;
    }
}

async fn save_snapshot(path: &Path, lasting: &Lasting) {
    // Kept in Redis when configured: the snapshot then holds none.
    let spend = lasting.spend.export().await;
    match snapshot::save(path, lasting.proxy.cache(), spend, lasting.clock.now()).await {
        Ok(count) => tracing::info!(path = %path.display(), count, "cache snapshot written"),
        Err(e) => tracing::warn!(error = %e, "cache snapshot not written"),
    }
}
