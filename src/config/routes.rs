//! What is proxied and warmed: `[[routes]]` with their `[[routes.params]]`
//! (kinds and freshness as serde enums, so an unknown one is refused by
//! name) and `[[warmup]]` with its questions.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// One `[[routes]]` entry as written in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path, identical on the proxy and on KeyAPI, e.g. `/v1/tiktok/trending/hashtag/detail`.
    pub path: String,
    /// KeyAPI's price per call; absent: `credits.per_call`.
    pub credits: Option<u64>,
    /// Freshness lifetime; absent: `cache.ttl`.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// TTL by the value of one parameter, e.g. `{ param = "period", values = { "365" = "12h" } }`.
    pub ttl_by: Option<TtlByConfig>,
    /// `daily`: fresh until the next 00:00 UTC + `daily_offset` (capped by the TTL).
    pub freshness: Option<RouteFreshness>,
    /// With `freshness = "daily"`: how long after 00:00 UTC the day's data is complete.
    #[serde(default, with = "humantime_serde")]
    pub daily_offset: Option<Duration>,
    /// Absent: `cache.stale_while_revalidate`.
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// Absent: `cache.stale_if_error`.
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// Absent: `cache.negative_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub negative_ttl: Option<Duration>,
    /// The query parameters, in the order the upstream query is built.
    #[serde(default)]
    pub params: Vec<ParamConfig>,
}

/// A route's `freshness`: how its answers' lifetime ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteFreshness {
    /// Fresh for the TTL.
    Fixed,
    /// Fresh until the next 00:00 UTC + `daily_offset`, at most the TTL.
    Daily,
}

/// `ttl_by`: a TTL per value of one parameter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TtlByConfig {
    pub param: String,
    pub values: BTreeMap<String, humantime_serde::Serde<Duration>>,
}

/// One `[[routes.params]]` entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParamConfig {
    pub name: String,
    /// Absent: `one_of` when `one_of` is given, else `text`.
    pub kind: Option<ParamKind>,
    /// A request without it is a 400 "is required" (then it has no `default`).
    #[serde(default)]
    pub required: bool,
    /// Normalized like a value; used when the parameter is absent (and, for
    /// `one_of`, `int` and `region`, when it is empty).
    pub default: Option<String>,
    /// A value shown in the "is required" message; absent: the default or the first allowed value.
    pub example: Option<String>,
    pub one_of: Option<Vec<String>>,
    pub min: Option<i64>,
    pub max: Option<i64>,
    /// `text`: a regular expression the whole (normalized) value must match.
    pub pattern: Option<String>,
    /// `text`: longest value in characters (default 100).
    pub max_len: Option<usize>,
    /// `text`: lower-case the value.
    pub lowercase: Option<bool>,
    /// `text`: drop this prefix once (e.g. `@`).
    pub strip_prefix: Option<String>,
}

/// A parameter's `kind`: how its values are checked and normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// One of the `one_of` values.
    OneOf,
    /// An integer within `min` and `max`.
    Int,
    /// `all_regions` or a 2-letter country code.
    Region,
    /// A hashtag name: one leading `#` dropped, lower-cased.
    Hashtag,
    /// Free text within `max_len`, optionally matching `pattern`.
    Text,
}

/// One `[[warmup]]` entry as written in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// Shown in `/stats` and on the ledger as `warmup:<name>`; default: the route's path.
    pub name: Option<String>,
    /// The route's path, as in `[[routes]]`.
    pub route: String,
    /// Run at this interval (the first run shortly after start-up).
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Or run daily at this UTC time, `HH:MM`.
    pub at: Option<String>,
    /// This warm-up's own credits per UTC day (the global budget applies too).
    pub max_credits_per_day: u64,
    /// With `every`: the first run, this long after start-up (default 1 s).
    #[serde(default, with = "humantime_serde")]
    pub start_delay: Option<Duration>,
    /// Pause between two calls of a run (default 1 s).
    #[serde(default, with = "humantime_serde")]
    pub pace: Option<Duration>,
    /// Parameter → value, or → a list of values (every combination is asked).
    #[serde(default)]
    pub questions: Vec<BTreeMap<String, QuestionValue>>,
    /// A CSV file: a header of parameter names, then one question per line.
    pub questions_file: Option<PathBuf>,
}

/// A parameter's value in `[[warmup.questions]]`: text, a number, or a list.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum QuestionValue {
    Text(String),
    Number(i64),
    List(Vec<QuestionValue>),
}
