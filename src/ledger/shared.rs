//! The shared ledger in Redis: the Lua scripts that charge and refund a money
//! operation once, by its id, and the operations Redis has not confirmed yet.

use std::sync::LazyLock;

use redis::Script;

use super::budget::Budget;
use crate::redis_conn::{Applied, RedisConn};

/// Charges one money operation on several per-day counters, once. KEYS = the
/// operation's record, then the counters; ARGV = cost, expiry (s), mode:
/// `check` (all or nothing, within each counter's limit, ARGV[4..]) or
/// `record` (spend already made during an outage: no limit). An operation
/// already recorded returns its outcome and changes nothing. Outcomes:
/// `charged`, `refused <i> <count>` (the i-th counter, 1-based, held
/// `count`), or `cancelled` / `refunded` (a refund of this id came first).
pub(super) static CHARGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local done = redis.call("GET", KEYS[1])
if done then return done end
local cost = tonumber(ARGV[1])
if ARGV[3] == "check" then
  for i = 2, #KEYS do
    local count = tonumber(redis.call("GET", KEYS[i]) or "0")
    if count + cost > tonumber(ARGV[2 + i]) then
      local refused = "refused " .. (i - 1) .. " " .. count
      redis.call("SET", KEYS[1], refused, "EX", ARGV[2])
      return refused
    end
  end
end
for i = 2, #KEYS do
  redis.call("INCRBY", KEYS[i], cost) redis.call("EXPIRE", KEYS[i], ARGV[2])
end
redis.call("SET", KEYS[1], "charged", "EX", ARGV[2])
return "charged""#,
    )
});
/// Gives a charge back, once. KEYS = the operation's record, then the
/// counters; ARGV = cost, expiry (s). A charge not (yet) made is recorded
/// `cancelled`, so a late copy of it does nothing; a refused, cancelled or
/// refunded one is left as it is. Returns the outcome.
pub(super) static REFUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local done = redis.call("GET", KEYS[1])
if done == "charged" then
  for i = 2, #KEYS do redis.call("DECRBY", KEYS[i], ARGV[1]) end
  redis.call("SET", KEYS[1], "refunded", "EX", ARGV[2])
  return "refunded"
end
if done then return done end
redis.call("SET", KEYS[1], "cancelled", "EX", ARGV[2])
return "cancelled""#,
    )
});
/// One counter's value (nil when absent).
pub(super) static READ_COUNTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(r#"return redis.call("GET", KEYS[1])"#));
/// Per-day counters outlive their day a little, for late readers; operation
/// records live as long, so no late copy of an operation outlives its record.
pub(super) const COUNTER_TTL_SECS: u64 = 2 * 24 * 3600;
/// Money operations Redis has not confirmed, kept for another try. Outage
/// spend never overflows it (a full queue refuses the call); a refund that
/// does not fit is given up (its credits stay counted: the safe side).
pub(super) const MAX_PENDING: usize = 1024;

/// What a money operation does in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpKind {
    /// Adds spend made during an outage (no limit: the call was made).
    Record,
    /// Gives a charge back, or cancels it if it was never made.
    Refund,
}

impl OpKind {
    /// Bounded label for logs.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Refund => "refund",
        }
    }
}

/// A money operation Redis has not confirmed: on some budgets' counters of
/// one day, under its own id.
#[derive(Debug, Clone)]
pub(super) struct Op {
    pub(super) id: String,
    pub(super) kind: OpKind,
    /// The counters' names (client budget first, then global).
    pub(super) budgets: Vec<String>,
    pub(super) day: u64,
    pub(super) cost: u64,
    /// Sent at least once, so Redis may have applied it.
    pub(super) sent: bool,
}

impl Op {
    pub(super) fn new(
        id: String,
        kind: OpKind,
        budgets: &[Option<&Budget>; 2],
        day: u64,
        cost: u64,
    ) -> Self {
        Self {
            id,
            kind,
            budgets: budgets.iter().flatten().map(|b| b.name.clone()).collect(),
            day,
            cost,
            sent: false,
        }
    }

    /// Runs the operation (again: it is idempotent); true once Redis answered.
    pub(super) async fn send(&mut self, redis: &RedisConn) -> bool {
        let names = self.budgets.iter().map(String::as_str);
        let applied = match self.kind {
            OpKind::Record => send_charge(redis, &self.id, names, None, self.day, self.cost).await,
            OpKind::Refund => send_refund(redis, &self.id, names, self.day, self.cost).await,
        };
        self.sent |= applied != Applied::NotSent;
        matches!(applied, Applied::Answered(_))
    }
}

/// What Redis recorded for a money operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Charged,
    /// The `index`-th counter (0-based) held `count`: too much for the cost.
    Refused {
        index: usize,
        count: u64,
    },
    Cancelled,
    Refunded,
}

impl Outcome {
    /// Reads a script's answer; `None` for anything else.
    pub(super) fn parse(raw: &str) -> Option<Self> {
        let mut words = raw.split(' ');
        let outcome = match words.next()? {
            "charged" => Self::Charged,
            "cancelled" => Self::Cancelled,
            "refunded" => Self::Refunded,
            "refused" => Self::Refused {
                index: words.next()?.parse::<usize>().ok()?.checked_sub(1)?,
                count: words.next()?.parse().ok()?,
            },
            _ => return None,
        };
        words.next().is_none().then_some(outcome)
    }
}

/// A fresh money operation id.
pub(super) fn new_op_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `<prefix>[{ledger}:]count:<name>:<day>`: a budget's cluster-wide count of one UTC day.
pub(super) fn counter_key(redis: &RedisConn, name: &str, day: u64) -> String {
    redis.ledger_key(&format!("count:{name}:{day}"))
}

/// `<prefix>[{ledger}:]op:<id>`: what became of one money operation.
pub(super) fn op_key(redis: &RedisConn, id: &str) -> String {
    redis.ledger_key(&format!("op:{id}"))
}

/// Runs [`CHARGE`] for operation `id` on the counters `names` of `day`:
/// checked against `limits` (one per counter) when given, else recorded.
pub(super) async fn send_charge<'a>(
    redis: &RedisConn,
    id: &str,
    names: impl Iterator<Item = &'a str>,
    limits: Option<&[u64]>,
    day: u64,
    cost: u64,
) -> Applied<Option<Outcome>> {
    let mut invocation = CHARGE.key(op_key(redis, id));
    let mode = if limits.is_some() { "check" } else { "record" };
    invocation.arg(cost).arg(COUNTER_TTL_SECS).arg(mode);
    for name in names {
        invocation.key(counter_key(redis, name, day));
    }
    for limit in limits.unwrap_or_default() {
        invocation.arg(*limit);
    }
    let applied: Applied<String> = redis.invoke_ledger(&invocation).await;
    applied.map(|raw| Outcome::parse(&raw))
}

/// Runs [`REFUND`] for operation `id` on the counters `names` of `day`.
pub(super) async fn send_refund<'a>(
    redis: &RedisConn,
    id: &str,
    names: impl Iterator<Item = &'a str>,
    day: u64,
    cost: u64,
) -> Applied<Option<Outcome>> {
    let mut invocation = REFUND.key(op_key(redis, id));
    invocation.arg(cost).arg(COUNTER_TTL_SECS);
    for name in names {
        invocation.key(counter_key(redis, name, day));
    }
    let applied: Applied<String> = redis.invoke_ledger(&invocation).await;
    applied.map(|raw| Outcome::parse(&raw))
}
