//! Live reload: `SIGHUP` and `POST /admin/reload` read the configuration
//! again — the `--config` file, the `KEYAPI_PROXY__*` environment and
//! `KEYAPI_API_KEY_FILE` — and check it as a whole before anything changes.
//! Invalid (or unreadable): nothing changes, one line is logged, and the
//! reload is counted as rejected (metric, `/stats`, the admin answer).
//! Valid: the next generation of [`Live`] is built beside the running one
//! and swapped in at once; a request sees the old configuration or the new.
//!
//! What applies live: `[[clients]]`, `[[issuers]]`, `[visitors]`,
//! `[rate_limit]`, `[cors]`, `[[routes]]` and the `[cache]` keys routes
//! inherit (TTLs apply to new entries; a removed route's entries are
//! dropped, the others kept), `[[warmup]]`, `[credits]`, all of
//! `[upstream]` (fetches in flight keep the settings they started with),
//! and the key. What takes a restart (`keep_running` lists it) is reported and
//! keeps its running value. Whatever a reload leaves as it is keeps its
//! state: an unchanged client, issuer, visitor section, rate limit or
//! warm-up is the same object; a changed client or warm-up goes on with
//! its budget's count of today (shared, so calls in flight settle on it).
//!
//! The first generation is built here too (`build_live`), so start-up
//! and reload assemble a configuration the same way. The reloader runs in
//! its own task (`Reloader::run`), one reload at a time, and owns the
//! warm-ups' schedules.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::Value;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    access::Access,
    api_key::{LiveKey, Reread},
    cache::EntryCheck,
    clock,
    config::{self, Config, Redacted},
    issuers::{IssuerError, Issuers},
    limits::RateLimit,
    live::{ReloadOutcome, ReloadReport, ReloadRequest, ReloadTrigger},
    metrics::Scope,
    observe::RouteLabels,
    openapi,
    protect::Protection,
    redis_conn::RedisConn,
    route::{RouteConfigError, RouteTable},
    routes::{self, Generation},
    state::{AppState, Lasting, Live},
    telemetry,
    upstream::Upstream,
    visitors::Visitors,
    warmup::{Warmup, WarmupConfigError, WarmupPlan},
};

/// Why a configuration cannot be put in use (at start-up or on reload).
/// Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Routes(#[from] RouteConfigError),
    #[error("configuration: {0}")]
    Warmup(#[from] WarmupConfigError),
    #[error(transparent)]
    Issuers(#[from] IssuerError),
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Where the configuration and the key are read again from on reload.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// `--config`, if given (else the defaults and the environment only).
    pub config_file: Option<PathBuf>,
    /// `KEYAPI_API_KEY_FILE`, when the key came from a file; a key given
    /// otherwise never changes.
    pub key_file: Option<PathBuf>,
    /// `upstream.base_url` whatever the configuration says (`--demo`'s fake KeyAPI).
    pub base_url: Option<String>,
}

impl Origin {
    /// The configuration as it reads now (checked).
    fn load(&self) -> Result<Config, config::ConfigError> {
        let mut config = Config::load(self.config_file.as_deref())?;
        if let Some(url) = &self.base_url {
            config.upstream.base_url.clone_from(url);
        }
        Ok(config)
    }
}

/// Compiles what `config` describes beyond its own sections: the route table
/// and the warm-ups (run at start-up, on reload and by `check-config`).
pub fn compile(config: &Config) -> Result<(RouteTable, Vec<WarmupPlan>), LiveError> {
    let routes = RouteTable::from_config(config)?;
    let warmups = WarmupPlan::from_config(config, &routes)?;
    Ok((routes, warmups))
}

/// The generation `config` describes, with its routes and warm-ups as
/// [`compile`] made them (start-up has them already). With `previous` (the running
/// generation and its configuration), what is unchanged is kept.
pub(crate) fn build_live(
    config: &Config,
    (routes, plans): (RouteTable, Vec<WarmupPlan>),
    shared: &Lasting,
    redis: Option<&Arc<RedisConn>>,
    previous: Option<(&Live, &Config)>,
) -> Result<Live, LiveError> {
    let (metrics, clock, spend) = (&shared.metrics, &shared.clock, &*shared.spend);
    let kept =
        |section: fn(&Config) -> Value| previous.filter(|(_, old)| section(old) == section(config));
    let issuers = match kept(|c| json(&c.issuers)) {
        Some((old, _)) => Arc::clone(&old.issuers),
        None => Arc::new(Issuers::new(&config.issuers, metrics, clock, redis, spend)?),
    };
    let visitors = match kept(|c| json(&c.visitors)) {
        Some((old, _)) => Arc::clone(&old.visitors),
        None => Arc::new(Visitors::new(
            &config.visitors,
            metrics,
            clock,
            redis,
            spend,
        )),
    };
    let rate_limit = match kept(|c| json(&c.rate_limit)) {
        Some((old, _)) => old.rate_limit.clone(),
        None => {
            let limit = &config.rate_limit;
            RateLimit::new(limit.per_minute, limit.burst, Scope::Global, clock)
                .map(|l| Arc::new(l.shared(redis, "global")))
        }
    };
    let access = Access::new(
        &config.clients,
        metrics,
        clock,
        redis,
        spend,
        previous.map(|(old, _)| &old.access),
    );
    let warmups = plans
        .into_iter()
        .map(|plan| {
            let before = previous.and_then(|(live, old)| {
                let warmup = live.warmups.iter().find(|w| w.plan().name == plan.name)?;
                Some((warmup, old))
            });
            match before {
                Some((warmup, old)) if same_plan(warmup.plan(), &plan, old, config) => {
                    Arc::clone(warmup)
                }
                before => {
                    let charged = metrics.client(&plan.name).credits_spent;
                    let tally = spend.tally(&plan.name);
                    let previous = before.map(|(old, _)| &**old);
                    Arc::new(Warmup::new(plan, charged, tally, previous))
                }
            }
        })
        .collect();
    Ok(Live {
        access,
        issuers,
        visitors,
        rate_limit,
        openapi: openapi::document(&routes),
        routes,
        allow_client_refresh: config.cache.allow_client_refresh,
        warmups,
    })
}

/// The served surface of `state` under `config`'s CORS and host rules.
pub(crate) fn generation(state: AppState, config: &Config) -> Generation {
    let server = &config.server;
    Generation::new(
        state,
        &config.cors,
        server.allowed_hosts.as_deref(),
        server.listen,
    )
}

/// The `route` metric labels of `state`'s routes.
pub(crate) fn labels(state: &AppState) -> RouteLabels {
    let table = state.routes();
    RouteLabels::new(routes::paths(table), table.routes().len())
}

/// A warm-up plan that a reload leaves as it is: same questions, schedule
/// and allowance, and a route compiled from the same inputs.
fn same_plan(old: &WarmupPlan, new: &WarmupPlan, old_config: &Config, config: &Config) -> bool {
    let path = new.route.path();
    old.keys == new.keys
        && old.schedule == new.schedule
        && (old.allowance, old.pace, old.start_delay) == (new.allowance, new.pace, new.start_delay)
        && route_inputs(old_config, path) == route_inputs(config, path)
}

/// What a route at `path` is compiled from: its entry and the defaults it
/// inherits (`[cache]`, `credits.per_call`).
fn route_inputs(config: &Config, path: &str) -> Value {
    serde_json::json!({
        "route": json(&config.routes.iter().find(|r| r.path == path)),
        "per_call": config.credits.per_call,
        "cache": json(&config.cache),
    })
}

/// `value` as JSON, to compare configuration parts (`Null` if it cannot be:
/// every part of [`Config`] can).
fn json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// The restart-only part of `config`, to compare. Redis URLs and passwords
/// (printed redacted) are compared by digest, so a change is seen without
/// being shown.
fn restart_view(config: &Config) -> Value {
    let cache = &config.cache;
    let digest =
        |secret: &Redacted| crate::digest::hex(&crate::digest::sha256(secret.expose().as_bytes()));
    let mut redis = json(&cache.redis);
    redis["url"] = json(&cache.redis.url.as_ref().map(digest));
    redis["sentinels"] = json(&cache.redis.sentinels.iter().map(digest).collect::<Vec<_>>());
    redis["master_password"] = json(&cache.redis.master_password.as_ref().map(digest));
    redis["cluster_nodes"] = json(
        &cache
            .redis
            .cluster_nodes
            .iter()
            .map(digest)
            .collect::<Vec<_>>(),
    );
    serde_json::json!({
        "server": json(&config.server),
        "log": { "format": json(&config.log.format) },
        "telemetry": json(&config.telemetry),
        "cache": {
            "max_bytes": cache.max_bytes,
            "snapshot_path": json(&cache.snapshot_path),
            "snapshot_interval": json(&humantime_serde::Serde::from(cache.snapshot_interval)),
            "redis": redis,
        },
    })
}

/// `config` with every restart-only key at its running value (from `running`).
fn keep_running(mut config: Config, running: &Config) -> Config {
    config.server = running.server.clone();
    config.log.format = running.log.format;
    config.telemetry = running.telemetry.clone();
    config.cache.max_bytes = running.cache.max_bytes;
    config.cache.snapshot_path = running.cache.snapshot_path.clone();
    config.cache.snapshot_interval = running.cache.snapshot_interval;
    config.cache.redis = running.cache.redis.clone();
    config
}

/// The dotted keys whose values differ between `old` and `new` (a section
/// of tables is named by its section, e.g. `clients`).
fn changed_keys(old: &Value, new: &Value) -> Vec<String> {
    fn walk(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
        match (old, new) {
            (Value::Object(a), Value::Object(b)) => {
                let names = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k)));
                for name in names {
                    let path = match prefix {
                        "" => name.clone(),
                        _ => format!("{prefix}.{name}"),
                    };
                    let missing = Value::Null;
                    let (x, y) = (
                        a.get(name).unwrap_or(&missing),
                        b.get(name).unwrap_or(&missing),
                    );
                    walk(&path, x, y, out);
                }
            }
            (a, b) if a != b => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

/// A task aborted when dropped (a warm-up's schedule).
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a reload that passed every check is about to change.
struct Changes {
    applied: Vec<String>,
    restart_needed: Vec<String>,
    key_rotated: bool,
}

/// Reads, checks and applies configurations; owns the warm-ups' schedules.
pub(crate) struct Reloader {
    origin: Origin,
    shared: Arc<Lasting>,
    /// What [`crate::routes::Front`] serves.
    current: Arc<ArcSwap<Generation>>,
    /// What `observe` labels requests with.
    labels: Arc<ArcSwap<RouteLabels>>,
    /// The check of entries read back (its limits follow the routes).
    check: Arc<EntryCheck>,
    redis: Option<Arc<RedisConn>>,
    api_key: Arc<LiveKey>,
    /// The configuration in use (restart-only keys at their running values).
    running: Config,
    /// Each warm-up's schedule, by name, with the warm-up it runs.
    schedules: HashMap<String, (Arc<Warmup>, Task)>,
    /// `SIGHUP`s since the app began to build.
    hangups: Hangups,
}

/// What the reloader is built from ([`Reloader::new`]).
pub(crate) struct ReloaderParts {
    pub(crate) origin: Origin,
    pub(crate) shared: Arc<Lasting>,
    pub(crate) current: Arc<ArcSwap<Generation>>,
    pub(crate) labels: Arc<ArcSwap<RouteLabels>>,
    pub(crate) check: Arc<EntryCheck>,
    pub(crate) redis: Option<Arc<RedisConn>>,
    pub(crate) api_key: Arc<LiveKey>,
    pub(crate) running: Config,
    /// Caught from the start of the build ([`hangups`]): a `SIGHUP` while a
    /// large snapshot loads must not end the process (its default action).
    pub(crate) hangups: Hangups,
}

impl Reloader {
    /// A reloader of the generation in `parts.current`, built from `parts.running`.
    pub(crate) fn new(parts: ReloaderParts) -> Self {
        Self {
            origin: parts.origin,
            shared: parts.shared,
            current: parts.current,
            labels: parts.labels,
            check: parts.check,
            redis: parts.redis,
            api_key: parts.api_key,
            running: parts.running,
            schedules: HashMap::new(),
            hangups: parts.hangups,
        }
    }

    /// Runs the warm-ups and watches the key file, then answers reloads
    /// (`SIGHUP`, `requests`) one at a time until the task is aborted
    /// (draining), which stops the warm-ups.
    pub(crate) async fn run(mut self, mut requests: mpsc::Receiver<ReloadRequest>) {
        let state = self.current.load().state().clone();
        self.schedule_warmups(&state);
        let _watch = self.api_key.watch().unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot watch the KeyAPI key file's directory; the key is read again on reload only");
            None
        });
        let mut hangups = self.hangups.take();
        loop {
            let (trigger, reply) = tokio::select! {
                Some(request) = requests.recv() => (request.trigger, Some(request.reply)),
                Some(()) = next_hangup(&mut hangups) => (ReloadTrigger::Signal, None),
                else => return,
            };
            let report = self.reload(&trigger).await;
            if let Some(reply) = reply {
                let _ = reply.send(report);
            }
        }
    }

    /// Reads the configuration and the key again and applies them, or
    /// changes nothing; reports, logs and counts what it did.
    pub(crate) async fn reload(&mut self, trigger: &ReloadTrigger) -> ReloadReport {
        let by = match trigger {
            ReloadTrigger::Signal => "SIGHUP".to_owned(),
            ReloadTrigger::Admin(client) => format!("admin:{client}"),
        };
        let at = clock::unix_secs(self.shared.clock.now());
        let report = match self.try_reload().await {
            Ok(changes) => {
                let outcome = if changes.applied.is_empty() && !changes.key_rotated {
                    ReloadOutcome::Unchanged
                } else {
                    ReloadOutcome::Applied
                };
                if !changes.restart_needed.is_empty() {
                    tracing::warn!(
                        keys = ?changes.restart_needed,
                        "configuration reload: these keys need a restart and keep their running values"
                    );
                }
                tracing::info!(
                    by,
                    outcome = outcome.as_str(),
                    applied = ?changes.applied,
                    key_rotated = changes.key_rotated,
                    "configuration reloaded"
                );
                ReloadReport {
                    outcome,
                    at,
                    applied: changes.applied,
                    restart_needed: changes.restart_needed,
                    key_rotated: changes.key_rotated,
                    error: None,
                }
            }
            Err(error) => {
                let line = one_line(&error.to_string());
                tracing::error!(by, error = %line, "configuration reload rejected; nothing changed");
                ReloadReport {
                    outcome: ReloadOutcome::Rejected,
                    at,
                    applied: Vec::new(),
                    restart_needed: Vec::new(),
                    key_rotated: false,
                    error: Some(line),
                }
            }
        };
        self.shared.metrics.config_reload(report.outcome.as_str());
        self.shared.reloads.record(&report);
        report
    }

    /// Everything that can fail happens before anything changes.
    async fn try_reload(&mut self) -> Result<Changes, LiveError> {
        let loaded = self.origin.load()?;
        let key = self.api_key.read()?;
        let mut restart_needed = changed_keys(&restart_view(&self.running), &restart_view(&loaded));
        restart_needed.sort();
        let config = keep_running(loaded, &self.running);
        config.validate()?;
        let applied = changed_keys(&json(&self.running), &json(&config));
        if applied.is_empty() {
            let key_rotated = key.is_some_and(|k| self.api_key.install(k, Reread::Reload));
            return Ok(Changes {
                applied,
                restart_needed,
                key_rotated,
            });
        }
        let current = self.current.load_full();
        let live = build_live(
            &config,
            compile(&config)?,
            &self.shared,
            self.redis.as_ref(),
            Some((current.state().live(), &self.running)),
        )?;
        let upstream_changed = json(&self.running.upstream) != json(&config.upstream);
        let upstream = match upstream_changed {
            true => Some(
                Upstream::new(&config.upstream, Arc::clone(&self.api_key))?
                    .propagating_traces(config.telemetry.propagate_upstream),
            ),
            false => None,
        };
        // Nothing below fails: the new configuration goes in use.
        if config.log.level != self.running.log.level {
            telemetry::set_log_level(config.log.level.as_deref());
        }
        let key_rotated = key.is_some_and(|k| self.api_key.install(k, Reread::Reload));
        if let Some(upstream) = upstream {
            let protection = protection_changed(&self.running, &config)
                .then(|| Protection::from_config(&config.upstream, self.shared.clock.clone()));
            self.shared.proxy.reconfigure(upstream, protection);
        }
        let credits = &config.credits;
        (self.shared.proxy.ledger()).set_limits(credits.daily_budget, credits.outage_allowance);
        self.shared.spend.set_days(credits.history_days);
        (self.check).set_limits(live.routes.entry_limits(config.upstream.max_body_bytes));
        let state = AppState::new(Arc::clone(&self.shared), Arc::new(live));
        self.labels.store(Arc::new(labels(&state)));
        self.current
            .store(Arc::new(generation(state.clone(), &config)));
        for route in current.state().routes().routes() {
            if state.routes().get(route.path()).is_none() {
                let dropped = self.shared.proxy.purge_route(route.path()).await;
                tracing::info!(
                    route = route.path(),
                    dropped,
                    "route removed: its cached answers dropped"
                );
            }
        }
        self.schedule_warmups(&state);
        self.running = config;
        Ok(Changes {
            applied,
            restart_needed,
            key_rotated,
        })
    }

    /// Runs the schedule of each of `state`'s warm-ups: one kept by the
    /// reload keeps its schedule; a new or changed one starts its own; one
    /// gone stops.
    fn schedule_warmups(&mut self, state: &AppState) {
        let mut schedules = HashMap::new();
        for warmup in state.warmups() {
            let name = warmup.plan().name.clone();
            let schedule = match self.schedules.remove(&name) {
                Some((running, task)) if Arc::ptr_eq(&running, warmup) => (running, task),
                _ => {
                    let (warmup, shared) = (Arc::clone(warmup), Arc::clone(&self.shared));
                    let run = Arc::clone(&warmup);
                    let task = tokio::spawn(async move {
                        run.run_on_schedule(&shared.proxy, &shared.clock).await;
                    });
                    (warmup, Task(task))
                }
            };
            schedules.insert(name, schedule);
        }
        // What is left was removed or replaced: dropping it stops its schedule.
        self.schedules = schedules;
    }
}

/// Whether the settings [`Protection`] is built from changed.
fn protection_changed(old: &Config, new: &Config) -> bool {
    let (a, b) = (&old.upstream, &new.upstream);
    (a.max_in_flight, a.max_calls_per_minute, a.queue_timeout)
        != (b.max_in_flight, b.max_calls_per_minute, b.queue_timeout)
        || (a.breaker_failures, a.breaker_cooldown) != (b.breaker_failures, b.breaker_cooldown)
}

/// `text` on one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The stream of `SIGHUP`s, if the handler could be set up.
#[cfg(unix)]
pub(crate) type Hangups = Option<tokio::signal::unix::Signal>;
/// No `SIGHUP` where there are no signals.
#[cfg(not(unix))]
pub(crate) type Hangups = Option<()>;

/// `SIGHUP`s, where there are such (none if the handler cannot be set up).
pub(crate) fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup())
            .inspect_err(|error| tracing::warn!(%error, "SIGHUP cannot be caught; reload with POST /admin/reload"))
            .ok()
    }
    #[cfg(not(unix))]
    None
}

/// The next `SIGHUP`; never, without a handler.
async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    match hangups {
        #[cfg(unix)]
        Some(signal) => signal.recv().await,
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
