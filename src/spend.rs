//! Spend history: per UTC day and per payer — each configured client
//! (`client:<id>`), each issuer's subjects together (`issuer:<name>`), the
//! callers without a token together (`visitors`), each warm-up
//! (`warmup:<name>`) and the proxy's own refreshes (`refresh`) — the credits
//! spent, the calls that cost them, the credits saved (requests answered
//! without a call of their own) and the refusals (a budget or a rate limit).
//!
//! Counting happens where things happen: a call's credits when the ledger
//! keeps them, on the same clock and at the same moment as
//! `credits_spent_total`, so a day's total is that day's increase of the
//! metric; a saving when a request is answered; a refusal when it is made.
//! Each payer's counts collect in its own [`Tally`] (one short lock, no map
//! shared by every request) and move to the store every few seconds and
//! before every read ([`SpendHistory::flush`]). The store is Redis when
//! configured — one hash per day, shared by every replica, expiring by
//! itself `credits.history_days` after its day; each batch carries an id, so
//! one sent again after a lost reply counts once — else memory, which the
//! snapshot file keeps across restarts when snapshots are on.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, LazyLock, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::Script;
use serde::{Deserialize, Serialize};

use crate::{
    clock::{self, SharedClock},
    redis_conn::{Applied, RedisConn},
};

/// Days of history `/admin/spend` and the status page show unless asked otherwise.
pub const RECENT_DAYS: u64 = 30;

/// The callers without a token (visitors, or everyone on an open proxy).
pub const VISITORS: &str = "visitors";
/// The proxy's own calls: stale-while-revalidate and refresh-ahead.
pub const REFRESH: &str = "refresh";
/// How often counts move from the tallies to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Batches Redis has not confirmed, kept for another try at most; older
/// ones are given up (logged) rather than held without bound.
const MAX_UNCONFIRMED: usize = 64;
/// `history_days` at most (ten years).
pub const MAX_HISTORY_DAYS: u64 = 3650;
const DAY_SECS: u64 = 24 * 3600;

/// Adds a batch of counts once. KEYS = the batch's record, then one day hash
/// per row; ARGV = expiry (s), then per row: payer, credits spent, calls,
/// credits saved, refusals. A batch already recorded changes nothing.
static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if not redis.call("SET", KEYS[1], "1", "NX", "EX", ARGV[1]) then return 0 end
local names = {"credits_spent", "calls", "credits_saved", "refusals"}
for i = 2, #KEYS do
  local base = 2 + (i - 2) * 5
  for j = 1, 4 do
    local n = tonumber(ARGV[base + j])
    if n ~= 0 then redis.call("HINCRBY", KEYS[i], ARGV[base] .. "|" .. names[j], n) end
  end
  redis.call("EXPIRE", KEYS[i], ARGV[1])
end
return 1"#,
    )
});
/// Every field of each day hash in KEYS, in order.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local out = {}
for i = 1, #KEYS do out[i] = redis.call("HGETALL", KEYS[i]) end
return out"#,
    )
});

/// One payer's figures for one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Credits of its calls that reached KeyAPI.
    pub credits_spent: u64,
    /// Those calls.
    pub calls: u64,
    /// Credits its requests did not spend: answered without a call of their own.
    pub credits_saved: u64,
    /// Its requests refused by a budget or a rate limit.
    pub refusals: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.credits_spent += other.credits_spent;
        self.calls += other.calls;
        self.credits_saved += other.credits_saved;
        self.refusals += other.refusals;
    }

    /// Field by Redis name.
    fn field_mut(&mut self, name: &str) -> Option<&mut u64> {
        match name {
            "credits_spent" => Some(&mut self.credits_spent),
            "calls" => Some(&mut self.calls),
            "credits_saved" => Some(&mut self.credits_saved),
            "refusals" => Some(&mut self.refusals),
            _ => None,
        }
    }
}

/// One payer's counts not yet in the store, by UTC day.
#[derive(Debug)]
pub struct Tally {
    payer: Arc<str>,
    pending: Mutex<Vec<(u64, Counts)>>,
}

impl Tally {
    fn add(&self, day: u64, count: impl FnOnce(&mut Counts)) {
        let mut pending = lock(&self.pending);
        match pending.iter_mut().find(|(d, _)| *d == day) {
            Some((_, counts)) => count(counts),
            None => {
                let mut counts = Counts::default();
                count(&mut counts);
                pending.push((day, counts));
            }
        }
    }

    /// The pending counts; the tally keeps its room, so counting (on every
    /// hit) does not allocate again.
    fn take(&self) -> Vec<(u64, Counts)> {
        let mut pending = lock(&self.pending);
        pending.drain(..).collect()
    }
}

/// One day of the history: each payer with anything to show, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Day {
    /// Days since 1970-01-01 (UTC).
    pub day: u64,
    pub payers: BTreeMap<Arc<str>, Counts>,
}

impl Day {
    /// Every payer's counts together.
    pub fn total(&self) -> Counts {
        let mut total = Counts::default();
        for counts in self.payers.values() {
            total.add(counts);
        }
        total
    }
}

/// One row as the snapshot file keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    day: u64,
    payer: String,
    #[serde(flatten)]
    counts: Counts,
}

/// Why the history cannot be read just now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpendError {
    #[error("the spend history lives in Redis, which did not answer; try again shortly")]
    Unavailable,
}

/// Counts Redis has not confirmed, under their batch id.
#[derive(Debug)]
struct Batch {
    id: String,
    rows: Vec<(u64, Arc<str>, Counts)>,
}

/// Where the days are kept.
enum Store {
    /// This replica's memory (and its snapshot file, when configured).
    Memory(Mutex<BTreeMap<(u64, Arc<str>), Counts>>),
    /// Redis, shared by every replica.
    Redis {
        redis: Arc<RedisConn>,
        unconfirmed: tokio::sync::Mutex<Vec<Batch>>,
    },
}

/// The spend history of this proxy (of the cluster, with Redis).
pub struct SpendHistory {
    clock: SharedClock,
    /// `credits.history_days`.
    days: AtomicU64,
    /// Every payer's tally, by name: a payer keeps its tally across reloads.
    tallies: Mutex<HashMap<Arc<str>, Arc<Tally>>>,
    visitors: Arc<Tally>,
    refresh: Arc<Tally>,
    store: Store,
}

impl std::fmt::Debug for SpendHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpendHistory")
            .field("days", &self.days)
            .finish_non_exhaustive()
    }
}

impl SpendHistory {
    /// A history of `days` days on `clock`, kept in `redis` when given.
    pub fn new(days: u64, clock: SharedClock, redis: Option<Arc<RedisConn>>) -> Self {
        let visitors = new_tally(VISITORS);
        let refresh = new_tally(REFRESH);
        let tallies = [&visitors, &refresh]
            .into_iter()
            .map(|t| (Arc::clone(&t.payer), Arc::clone(t)))
            .collect();
        Self {
            clock,
            days: AtomicU64::new(days),
            tallies: Mutex::new(tallies),
            visitors,
            refresh,
            store: match redis {
                Some(redis) => Store::Redis {
                    redis,
                    unconfirmed: tokio::sync::Mutex::default(),
                },
                None => Store::Memory(Mutex::default()),
            },
        }
    }

    /// The tally of `payer` (the same one for the same name).
    pub fn tally(&self, payer: &str) -> Arc<Tally> {
        let mut tallies = self.lock_tallies();
        if let Some(tally) = tallies.get(payer) {
            return Arc::clone(tally);
        }
        let tally = new_tally(payer);
        tallies.insert(Arc::clone(&tally.payer), Arc::clone(&tally));
        tally
    }

    /// The callers without a token.
    pub fn visitors(&self) -> &Arc<Tally> {
        &self.visitors
    }

    /// The proxy's own refreshes.
    pub fn refresh(&self) -> &Arc<Tally> {
        &self.refresh
    }

    /// Days kept (`credits.history_days`; a reload may change it).
    pub fn set_days(&self, days: u64) {
        self.days.store(days, Ordering::Relaxed);
    }

    /// One call of `credits` that reached KeyAPI, paid by `tally`.
    pub fn spent(&self, tally: &Tally, credits: u64) {
        tally.add(self.today(), |c| {
            c.credits_spent += credits;
            c.calls += 1;
        });
    }

    /// One request of `tally`'s answered without a call of its own, saving
    /// `credits`, dated by `now`: the time the cache judged the answer (a hit
    /// has read the clock already).
    pub fn saved(&self, tally: &Tally, credits: u64, now: std::time::SystemTime) {
        tally.add(clock::utc_day(now), |c| c.credits_saved += credits);
    }

    /// One request of `tally`'s refused by a budget or a rate limit.
    pub fn refused(&self, tally: &Tally) {
        tally.add(self.today(), |c| c.refusals += 1);
    }

    /// Today (UTC) by the app's clock.
    pub fn today(&self) -> u64 {
        clock::utc_day(self.clock.now())
    }

    /// The first of the [`RECENT_DAYS`] days ending with `to`, or the
    /// oldest day kept if that is later: the span shown when none is asked for.
    pub fn recent_from(&self, to: u64) -> u64 {
        (to + 1).saturating_sub(RECENT_DAYS).max(self.first_kept())
    }

    /// The oldest day kept.
    pub fn first_kept(&self) -> u64 {
        let days = self.days.load(Ordering::Relaxed).max(1);
        (self.today() + 1).saturating_sub(days)
    }

    /// Moves every tally's counts to the store.
    pub async fn flush(&self) {
        let tallies: Vec<Arc<Tally>> = self.lock_tallies().values().cloned().collect();
        let mut rows = Vec::new();
        for tally in tallies {
            for (day, counts) in tally.take() {
                rows.push((day, Arc::clone(&tally.payer), counts));
            }
        }
        match &self.store {
            Store::Memory(days) => {
                let first = self.first_kept();
                let mut days = lock(days);
                for (day, payer, counts) in rows {
                    days.entry((day, payer)).or_default().add(&counts);
                }
                days.retain(|(day, _), _| *day >= first);
            }
            Store::Redis { redis, unconfirmed } => {
                let mut unconfirmed = unconfirmed.lock().await;
                if !rows.is_empty() {
                    let id = uuid::Uuid::new_v4().simple().to_string();
                    unconfirmed.push(Batch { id, rows });
                }
                let ttl = (self.days.load(Ordering::Relaxed) + 1) * DAY_SECS;
                while let Some(batch) = unconfirmed.first() {
                    if !send(redis, batch, ttl).await {
                        break;
                    }
                    unconfirmed.remove(0);
                }
                if unconfirmed.len() > MAX_UNCONFIRMED {
                    let dropped = unconfirmed.len() - MAX_UNCONFIRMED;
                    unconfirmed.drain(..dropped);
                    tracing::warn!(
                        dropped,
                        "spend history batches given up: Redis did not take them"
                    );
                }
            }
        }
    }

    /// The days from `from` to `to` (UTC days, both included), oldest first,
    /// every day present even if nothing happened; counts moved to the store first.
    pub async fn days(&self, from: u64, to: u64) -> Result<Vec<Day>, SpendError> {
        self.flush().await;
        let mut out: Vec<Day> = (from..=to)
            .map(|day| Day {
                day,
                payers: BTreeMap::new(),
            })
            .collect();
        match &self.store {
            Store::Memory(days) => {
                let days = lock(days);
                let kept = days.range((from, Arc::from(""))..);
                for ((day, payer), counts) in kept.take_while(|((day, _), _)| *day <= to) {
                    if let Some(slot) = day.checked_sub(from).and_then(|i| out.get_mut(i as usize))
                    {
                        slot.payers.insert(Arc::clone(payer), *counts);
                    }
                }
            }
            Store::Redis { redis, .. } => {
                let mut read = READ.prepare_invoke();
                for day in from..=to {
                    read.key(day_key(redis, day));
                }
                let hashes: Vec<Vec<String>> =
                    redis.invoke(&read).await.ok_or(SpendError::Unavailable)?;
                for (slot, fields) in out.iter_mut().zip(hashes) {
                    for pair in fields.chunks_exact(2) {
                        let Some((payer, name)) = pair[0].rsplit_once('|') else {
                            continue;
                        };
                        let counts = slot.payers.entry(Arc::from(payer)).or_default();
                        if let (Some(field), Ok(n)) = (counts.field_mut(name), pair[1].parse()) {
                            *field = n;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The history kept in memory as JSON (for the snapshot file); `None`
    /// when it lives in Redis.
    pub async fn export(&self) -> Option<Vec<u8>> {
        self.flush().await;
        let Store::Memory(days) = &self.store else {
            return None;
        };
        let rows: Vec<Row> = lock(days)
            .iter()
            .map(|((day, payer), counts)| Row {
                day: *day,
                payer: payer.to_string(),
                counts: *counts,
            })
            .collect();
        serde_json::to_vec(&rows).ok()
    }

    /// Adds the days of `exported` (from [`SpendHistory::export`]) still
    /// kept; false if it is not such a history.
    pub fn import(&self, exported: &[u8]) -> bool {
        let Ok(rows) = serde_json::from_slice::<Vec<Row>>(exported) else {
            return false;
        };
        if let Store::Memory(days) = &self.store {
            let first = self.first_kept();
            let mut days = lock(days);
            for row in rows.into_iter().filter(|r| r.day >= first) {
                let payer = Arc::from(row.payer);
                days.entry((row.day, payer)).or_default().add(&row.counts);
            }
        }
        true
    }

    fn lock_tallies(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Tally>>> {
        lock(&self.tallies)
    }
}

fn new_tally(payer: &str) -> Arc<Tally> {
    Arc::new(Tally {
        payer: Arc::from(payer),
        pending: Mutex::default(),
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `<prefix>spend:<day>`: one day's hash (in the ledger's slot in a
/// cluster: a batch's script touches several days and its own record).
fn day_key(redis: &RedisConn, day: u64) -> String {
    redis.ledger_key(&format!("spend:{day}"))
}

/// Sends `batch` (again: it counts once); true once Redis answered.
async fn send(redis: &RedisConn, batch: &Batch, ttl: u64) -> bool {
    let mut add = ADD.key(redis.ledger_key(&format!("spendop:{}", batch.id)));
    add.arg(ttl);
    for (day, payer, counts) in &batch.rows {
        add.key(day_key(redis, *day));
        add.arg(payer.as_ref())
            .arg(counts.credits_spent)
            .arg(counts.calls)
            .arg(counts.credits_saved)
            .arg(counts.refusals);
    }
    let applied: Applied<i64> = redis.invoke_ledger(&add).await;
    matches!(applied, Applied::Answered(_))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::clock::ManualClock;

    #[tokio::test]
    async fn days_keep_each_payer_apart_forget_the_oldest_and_survive_an_export() {
        let manual = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(100 * DAY_SECS),
        ));
        let history = SpendHistory::new(2, SharedClock::new(manual.clone()), None);
        let app = history.tally("client:app");
        history.spent(&app, 2);
        history.saved(&app, 2, crate::clock::Clock::now(&*manual));
        history.refused(history.visitors());
        manual.advance(Duration::from_secs(DAY_SECS));
        history.spent(&app, 2);
        history.spent(history.refresh(), 1);
        let days = history.days(99, 101).await.unwrap();
        assert_eq!(days.len(), 3);
        assert!(days[0].payers.is_empty());
        let app_day = days[1].payers["client:app"];
        assert_eq!(
            (app_day.credits_spent, app_day.calls, app_day.credits_saved),
            (2, 1, 2)
        );
        assert_eq!(days[1].payers["visitors"].refusals, 1);
        assert_eq!(days[2].total().credits_spent, 3);
        assert_eq!(days[2].total().calls, 2);

        let exported = history.export().await.unwrap();
        let restored = SpendHistory::new(2, SharedClock::new(manual.clone()), None);
        assert!(restored.import(&exported));
        assert_eq!(restored.days(100, 101).await.unwrap(), days[1..].to_vec());
        assert!(!restored.import(b"not a history"));
        // Two days kept: day 100 goes when day 102 begins.
        manual.advance(Duration::from_secs(DAY_SECS));
        history.flush().await;
        let days = history.days(100, 102).await.unwrap();
        assert!(days[0].payers.is_empty() && !days[1].payers.is_empty());
    }
}
