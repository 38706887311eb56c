//! Warm-up: known questions answered before anyone asks, within a credit
//! allowance (`[[warmup]]`).
//!
//! Each warm-up names a route, a schedule (`every = "1h"`, or daily
//! `at = "00:30"` UTC), an allowance per UTC day and its questions (inline,
//! a list expanding to every combination, or a CSV file). Questions are
//! normalized by the route's own parser at start-up, so a bad one refuses to
//! start, and duplicates count once.
//!
//! A run prefetches, through the proxy's single flight, every question whose
//! stored answer would not stay fresh until the next run; a client asking at
//! the same moment joins the same call. Calls are paced (no burst at the top
//! of the hour), charged to the warm-up's own account (`warmup:<name>`) and
//! the global budget, and the run stops at the first budget refusal or
//! protection refusal (circuit open, 429 hold, spend cap): a failing KeyAPI
//! is not retried in a loop. With Redis, a lease per scheduled run lets one
//! replica do the work; the others read its answers from Redis.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::{
    cache::CacheKey,
    clock::{self, SharedClock},
    config::{Config, QuestionValue, WarmupConfig},
    ledger::{Account, Budget, DaySpend, Payer, Refusal},
    metrics::Scope,
    protect,
    proxy::{Prefetch, Proxy, ProxyError},
    route::{Route, RouteTable},
    spend::Tally,
    upstream::UpstreamError,
};

/// Pause between two calls of a run unless `pace` says otherwise.
const DEFAULT_PACE: Duration = Duration::from_secs(1);
/// An `every` warm-up's first run, this long after start-up, unless `start_delay` says.
const DEFAULT_START_DELAY: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// One question as (parameter, raw value) pairs.
type Question = Vec<(String, String)>;

/// A warm-up configuration that cannot run; the message names it and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("warmup[{index}] ({route}): {problem}")]
pub struct WarmupConfigError {
    index: usize,
    route: String,
    problem: String,
}

/// When a warm-up runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// At this interval.
    Every(Duration),
    /// Daily, this long after 00:00 UTC.
    DailyAt(Duration),
}

impl Schedule {
    /// The next run after one that started at `started`.
    fn next_after(&self, started: SystemTime) -> SystemTime {
        match self {
            Self::Every(interval) => started + *interval,
            Self::DailyAt(offset) => {
                let since_midnight = DAY - clock::until_utc_midnight(started);
                let midnight = started - since_midnight;
                let today = midnight + *offset;
                if today > started { today } else { today + DAY }
            }
        }
    }

    /// How long answers must stay fresh after a run starting at `now`.
    fn fresh_for(&self, now: SystemTime) -> Duration {
        match self {
            Self::Every(interval) => *interval,
            Self::DailyAt(_) => self.next_after(now).duration_since(now).unwrap_or_default(),
        }
    }

    /// Which scheduled run `now` belongs to (the Redis lease's name).
    fn slot(&self, now: SystemTime) -> u64 {
        match self {
            Self::Every(interval) => clock::unix_secs(now) / interval.as_secs().max(1),
            Self::DailyAt(_) => clock::utc_day(now),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Every(d) => write!(
                f,
                "every {}",
                humantime_serde::re::humantime::format_duration(*d)
            ),
            Self::DailyAt(offset) => {
                let minutes = offset.as_secs() / 60;
                write!(f, "daily at {:02}:{:02} UTC", minutes / 60, minutes % 60)
            }
        }
    }
}

/// A checked warm-up: its questions as keys of its route.
#[derive(Debug, Clone)]
pub struct WarmupPlan {
    /// `warmup:<name>`: its account on the ledger.
    pub name: String,
    pub route: Arc<Route>,
    pub schedule: Schedule,
    pub allowance: u64,
    pub pace: Duration,
    /// With `every`: how long after start-up the first run is.
    pub start_delay: Duration,
    /// Normalized, deduplicated, in configuration order.
    pub keys: Vec<CacheKey>,
}

impl WarmupPlan {
    /// The `[[warmup]]` entries of `config`, checked against its routes.
    pub fn from_config(
        config: &Config,
        table: &RouteTable,
    ) -> Result<Vec<Self>, WarmupConfigError> {
        Self::compile(&config.warmup, table)
    }

    /// Checks every `[[warmup]]` entry against the route table.
    pub fn compile(
        configs: &[WarmupConfig],
        table: &RouteTable,
    ) -> Result<Vec<Self>, WarmupConfigError> {
        let mut plans: Vec<Self> = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let fail = |problem: String| WarmupConfigError {
                index,
                route: config.route.clone(),
                problem,
            };
            let plan = compile_one(config, table).map_err(fail)?;
            if plans.iter().any(|p| p.name == plan.name) {
                return Err(fail(format!(
                    "name: {} is used twice; give each warm-up its own name",
                    plan.name
                )));
            }
            plans.push(plan);
        }
        Ok(plans)
    }

    /// What a full run costs: every question fetched once.
    pub fn full_run_credits(&self) -> u64 {
        self.keys.len() as u64 * self.route.credits()
    }
}

fn compile_one(config: &WarmupConfig, table: &RouteTable) -> Result<WarmupPlan, String> {
    let route = table
        .get(&config.route)
        .cloned()
        .ok_or_else(|| "route: no [[routes]] entry has this path".to_owned())?;
    let schedule = match (&config.every, &config.at) {
        (Some(every), None) if *every >= Duration::from_secs(60) => Schedule::Every(*every),
        (Some(_), None) => return Err("every: at least 1m".into()),
        (None, Some(at)) => Schedule::DailyAt(
            parse_hh_mm(at)
                .ok_or_else(|| format!("at: {at:?} is not a UTC time like \"00:30\""))?,
        ),
        _ => return Err("give either every = \"1h\" or at = \"HH:MM\" (UTC)".into()),
    };
    if config.max_credits_per_day == 0 {
        return Err("max_credits_per_day: at least 1".into());
    }
    let mut questions = Questions::new(&route);
    for (i, question) in config.questions.iter().enumerate() {
        for combination in expand(question).map_err(|e| format!("questions[{i}]: {e}"))? {
            questions.add(&format!("questions[{i}]"), &combination)?;
        }
    }
    if let Some(path) = &config.questions_file {
        read_csv(path, &mut questions)?;
    }
    let keys = questions.keys;
    if keys.is_empty() {
        return Err("no questions: give [[warmup.questions]] or questions_file".into());
    }
    Ok(WarmupPlan {
        name: format!("warmup:{}", config.name.as_deref().unwrap_or(&config.route)),
        route,
        schedule,
        allowance: config.max_credits_per_day,
        pace: config.pace.unwrap_or(DEFAULT_PACE),
        start_delay: config.start_delay.unwrap_or(DEFAULT_START_DELAY),
        keys,
    })
}

/// `HH:MM` (UTC) as the time since midnight.
fn parse_hh_mm(raw: &str) -> Option<Duration> {
    let (h, m) = raw.trim().split_once(':')?;
    let (h, m) = (h.parse::<u64>().ok()?, m.parse::<u64>().ok()?);
    (h < 24 && m < 60 && raw.trim().len() == 5).then(|| Duration::from_secs(h * 3600 + m * 60))
}

/// Every combination of one question's values, parameters in name order.
fn expand(
    question: &BTreeMap<String, QuestionValue>,
) -> Result<Vec<Vec<(String, String)>>, String> {
    let mut combinations: Vec<Question> = vec![Vec::new()];
    for (name, value) in question {
        let values = match value {
            QuestionValue::List(items) => items
                .iter()
                .map(|v| scalar(v).ok_or_else(|| format!("{name}: lists hold text or numbers")))
                .collect::<Result<Vec<_>, _>>()?,
            single => vec![scalar(single).unwrap_or_default()],
        };
        if values.is_empty() {
            return Err(format!("{name}: an empty list asks nothing"));
        }
        combinations = combinations
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push((name.clone(), v.clone()));
                    next
                })
            })
            .collect();
    }
    Ok(combinations)
}

fn scalar(value: &QuestionValue) -> Option<String> {
    match value {
        QuestionValue::Text(text) => Some(text.clone()),
        QuestionValue::Number(n) => Some(n.to_string()),
        QuestionValue::List(_) => None,
    }
}

/// A warm-up's questions as keys of its route, normalized as they are read,
/// duplicates counted once.
struct Questions<'r> {
    route: &'r Route,
    seen: HashSet<CacheKey>,
    /// In the order first asked.
    keys: Vec<CacheKey>,
}

impl<'r> Questions<'r> {
    fn new(route: &'r Route) -> Self {
        Self {
            route,
            seen: HashSet::new(),
            keys: Vec::new(),
        }
    }

    /// Adds one question given as (parameter, raw value) pairs; `origin`
    /// says where it was written.
    fn add<K, V>(&mut self, origin: &str, pairs: &[(K, V)]) -> Result<(), String>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        if let Some((name, _)) = pairs.iter().find(|(name, _)| !self.takes(name.as_ref())) {
            return Err(format!("{origin}: {}", self.unknown(name.as_ref())));
        }
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        let key = self
            .route
            .parse(Some(&query))
            .map_err(|e| format!("{origin}: {e}"))?;
        if self.seen.insert(key.clone()) {
            self.keys.push(key);
        }
        Ok(())
    }

    /// Whether the route has a parameter `name`.
    fn takes(&self, name: &str) -> bool {
        self.route.params().iter().any(|p| p.name() == name)
    }

    /// What is wrong with a name the route does not take: a misspelt
    /// parameter would otherwise be ignored and warm another question.
    fn unknown(&self, name: &str) -> String {
        let names: Vec<&str> = self.route.params().iter().map(|p| p.name()).collect();
        format!(
            "{name:?} is not a parameter of this route (it has {})",
            names.join(", ")
        )
    }
}

/// Questions from a CSV file: a header of parameter names, one question per
/// line, read one record at a time (the file is never held whole); each
/// labelled with its line number for error messages. A column the route
/// does not take refuses the file.
fn read_csv(path: &Path, questions: &mut Questions<'_>) -> Result<(), String> {
    let shown = path.display();
    let fail = |e: csv::Error| format!("questions_file {shown}: {e}");
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(fail)?;
    let header = reader.headers().map_err(fail)?.clone();
    if let Some(column) = header.iter().find(|c| !questions.takes(c)) {
        return Err(format!(
            "questions_file {shown}: column {}",
            questions.unknown(column)
        ));
    }
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(fail)? {
        let line = record.position().map_or(0, csv::Position::line);
        let pairs: Vec<(&str, &str)> = header
            .iter()
            .zip(record.iter())
            .filter(|(_, v)| !v.is_empty())
            .collect();
        questions.add(&format!("{shown} line {line}"), &pairs)?;
    }
    Ok(())
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// Unix seconds (app clock) when it started.
    pub started_at: u64,
    /// Fetched and stored by this run.
    pub warmed: u64,
    /// Answered by a fetch already in flight.
    pub joined: u64,
    /// Already fresh until the next run: no call.
    pub skipped_fresh: u64,
    /// KeyAPI refused the question (paid, not stored).
    pub declined: u64,
    /// No answer (upstream failure).
    pub failed: u64,
    /// Why the run ended early: a budget, our protection, or another replica's lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<&'static str>,
}

/// One configured warm-up at run time.
pub struct Warmup {
    plan: WarmupPlan,
    account: Arc<Account>,
    state: Mutex<WarmupState>,
}

#[derive(Debug, Default)]
struct WarmupState {
    next_run_at: Option<SystemTime>,
    last_run: Option<RunReport>,
}

/// A warm-up as `/stats` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmupStats {
    pub name: String,
    pub route: &'static str,
    pub schedule: String,
    pub questions: usize,
    pub max_credits_per_day: u64,
    pub credits_spent_today: u64,
    pub next_run_at: Option<u64>,
    pub last_run: Option<RunReport>,
}

impl Warmup {
    /// A warm-up charging its calls to an account whose spend is
    /// `charged`, its spend history in `tally`.
    /// With `previous`, the warm-up of the same name a reload replaces, it
    /// takes over its spend of today and its last run.
    pub fn new(
        plan: WarmupPlan,
        charged: Counter,
        tally: Arc<Tally>,
        previous: Option<&Warmup>,
    ) -> Self {
        let budget = Budget::new(plan.allowance, Scope::Warmup, plan.name.clone());
        let account = Account {
            budget,
            charged,
            spent: DaySpend::default(),
            tally,
        }
        .continuing(previous.map(|p| &*p.account));
        let state = WarmupState {
            last_run: previous.and_then(|p| p.lock().last_run.clone()),
            ..WarmupState::default()
        };
        Self {
            plan,
            account: Arc::new(account),
            state: Mutex::new(state),
        }
    }

    /// Its checked configuration.
    pub fn plan(&self) -> &WarmupPlan {
        &self.plan
    }

    /// Runs once now: prefetches every question that would not stay fresh
    /// until the next scheduled run.
    pub async fn run(&self, proxy: &Proxy, now: SystemTime) -> RunReport {
        let schedule = self.plan.schedule;
        let mut report = RunReport {
            started_at: clock::unix_secs(now),
            ..RunReport::default()
        };
        if let Some(redis) = proxy.redis() {
            let lease = format!("{}:{}", self.plan.name, schedule.slot(now));
            let ttl = schedule.fresh_for(now).max(Duration::from_secs(1));
            if redis.conn().take_lease(&lease, ttl).await == Some(false) {
                report.stopped_by = Some("another_replica");
                self.finish(report.clone());
                return report;
            }
        }
        let fresh_for = schedule.fresh_for(now);
        let mut called = false;
        for key in &self.plan.keys {
            if called && !self.plan.pace.is_zero() {
                tokio::time::sleep(self.plan.pace).await;
            }
            let payer = Payer::Warmup(Arc::clone(&self.account));
            let outcome = proxy
                .prefetch(key, &self.plan.route, fresh_for, payer)
                .await;
            called = !matches!(outcome, Prefetch::Fresh);
            match outcome {
                Prefetch::Fresh => report.skipped_fresh += 1,
                Prefetch::Fetched => report.warmed += 1,
                Prefetch::Joined => report.joined += 1,
                Prefetch::Declined => report.declined += 1,
                Prefetch::Failed(error) => {
                    if let Some(reason) = stops_the_run(&error) {
                        tracing::info!(warmup = %self.plan.name, reason, "warm-up run stopped");
                        report.stopped_by = Some(reason);
                        break;
                    }
                    tracing::warn!(warmup = %self.plan.name, %key, %error, "warm-up question failed");
                    report.failed += 1;
                }
            }
        }
        self.finish(report.clone());
        report
    }

    /// Runs on schedule until the task is aborted (at shutdown).
    pub async fn run_on_schedule(&self, proxy: &Proxy, clock: &SharedClock) {
        let now = clock.now();
        let mut next = match self.plan.schedule {
            Schedule::Every(_) => now + self.plan.start_delay,
            Schedule::DailyAt(_) => self.plan.schedule.next_after(now),
        };
        loop {
            self.lock().next_run_at = Some(next);
            let wait = next.duration_since(clock.now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            let started = clock.now();
            let report = self.run(proxy, started).await;
            tracing::info!(warmup = %self.plan.name, ?report, "warm-up run");
            next = self.plan.schedule.next_after(started);
        }
    }

    /// Its status for `/stats`.
    pub async fn stats(&self, proxy: &Proxy) -> WarmupStats {
        let (next_run_at, last_run) = {
            let state = self.lock();
            (state.next_run_at, state.last_run.clone())
        };
        let spent = match &self.account.budget {
            Some(budget) => proxy.ledger().spent_today(budget).await,
            None => 0,
        };
        WarmupStats {
            name: self.plan.name.clone(),
            route: self.plan.route.path(),
            schedule: self.plan.schedule.to_string(),
            questions: self.plan.keys.len(),
            max_credits_per_day: self.plan.allowance,
            credits_spent_today: spent,
            next_run_at: next_run_at.map(clock::unix_secs),
            last_run,
        }
    }

    fn finish(&self, report: RunReport) {
        self.lock().last_run = Some(report);
    }

    fn lock(&self) -> MutexGuard<'_, WarmupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Refusals that end a run instead of trying the next question: a budget
/// cannot afford more, or our protection says KeyAPI must be left alone.
fn stops_the_run(error: &ProxyError) -> Option<&'static str> {
    match error {
        ProxyError::Budget(
            refusal @ (Refusal::Spent { .. }
            | Refusal::Reserved { .. }
            | Refusal::LedgerUnavailable),
        ) => Some(refusal.as_str()),
        ProxyError::Protection(
            refusal @ (protect::Refusal::CircuitOpen { .. }
            | protect::Refusal::HeldBack { .. }
            | protect::Refusal::SpendCap { .. }),
        ) => Some(refusal.as_str()),
        ProxyError::Upstream(
            e @ (UpstreamError::RateLimited { .. } | UpstreamError::KeyRejected(_)),
        ) => Some(e.as_str()),
        ProxyError::Protection(protect::Refusal::Overloaded { .. })
        | ProxyError::Upstream(_)
        | ProxyError::Abandoned(_) => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
