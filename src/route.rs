//! The route table: every proxied KeyAPI endpoint, described by
//! configuration (`[[routes]]`): its path, price, freshness and parameters.
//!
//! Parse, don't validate: a raw query becomes a [`CacheKey`] — the canonical
//! upstream path and query, parameters in the route's order with defaults
//! filled in and values normalized by their kind — or a client error, once.
//! Nothing after this module sees raw strings. Unknown parameters (cache
//! busters such as `_=123`) are ignored and never forwarded; a repeated one is
//! an error. Equivalent questions (`#UFC324`, `ufc324`, `UFC324&region=ALL_REGIONS`)
//! are one key, paid for once.
//!
//! A configured route is checked and compiled once at start-up; a bad one is
//! refused with one line naming the route and the field.

use std::{
    borrow::Cow,
    cell::RefCell,
    collections::HashSet,
    fmt,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, SystemTime},
};

use regex_lite::Regex;
use smallvec::{SmallVec, smallvec};
use unicode_normalization::{IsNormalized, UnicodeNormalization as _, is_nfc_quick};

use crate::{
    cache::{CacheKey, EntryLimits, FreshnessPolicy},
    clock,
    config::{Config, ParamConfig, RouteConfig},
};

/// Path of the compiled-in default route (KeyAPI's hashtag detail).
pub const HASHTAG_DETAIL_PATH: &str = "/v1/tiktok/trending/hashtag/detail";
/// Longest value a `hashtag` parameter accepts, in characters, after normalization.
pub const MAX_HASHTAG_CHARS: usize = 100;
/// Longest value a `text` parameter accepts when its `max_len` is not set.
pub const DEFAULT_TEXT_MAX_LEN: usize = 100;
const ALL_REGIONS: &str = "all_regions";

/// What a route inherits when it does not say: the `[cache]` and `[credits]` defaults.
#[derive(Debug, Clone)]
pub struct RouteDefaults {
    pub credits: u64,
    pub ttl: Duration,
    /// Global freshness rules (stale windows and negative TTL may be overridden per route).
    pub policy: FreshnessPolicy,
}

/// A route configuration that cannot be served. The message names the route and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routes[{index}] ({path}): {problem}")]
pub struct RouteConfigError {
    index: usize,
    path: String,
    problem: String,
}

pub fn is_hashtag_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// JSON Schema `pattern` of a raw `hashtag_name`: exactly what
/// a `hashtag` parameter accepts — Unicode whitespace around (trimmed, as
/// `str::trim` does), one optional `#`, then 1 to [`MAX_HASHTAG_CHARS`]
/// characters of [`is_hashtag_char`]. Built from the parser's own predicates,
/// once per process; classes list literal code points, so ECMA-262, Python
/// and Rust regex engines read it alike.
pub fn hashtag_pattern() -> &'static str {
    static PATTERN: LazyLock<String> = LazyLock::new(|| {
        let space = char_class(char::is_whitespace);
        let name = char_class(is_hashtag_char);
        format!("^{space}*#?{name}{{1,{MAX_HASHTAG_CHARS}}}{space}*$")
    });
    &PATTERN
}

/// JSON Schema `pattern` of a raw `region`: empty (the default),
/// `all_regions` in any case, or two ASCII letters, trimmed like the rest.
pub fn region_pattern() -> &'static str {
    static PATTERN: LazyLock<String> = LazyLock::new(|| {
        let space = char_class(char::is_whitespace);
        let all: String = ALL_REGIONS
            .chars()
            .map(|c| match c.is_ascii_alphabetic() {
                true => format!("[{}{c}]", c.to_ascii_uppercase()),
                false => c.to_string(),
            })
            .collect();
        format!("^{space}*(?:[A-Za-z]{{2}}|{all})?{space}*$")
    });
    &PATTERN
}

/// JSON Schema `pattern` of a raw `text` value: any characters but control
/// and bidirectional formatting ones (`is_unprintable_in_text`), apart
/// from the whitespace trimmed at either end. (A route's own `pattern`
/// applies to the normalized value and is named in the description.)
pub fn text_pattern() -> &'static str {
    static PATTERN: LazyLock<String> = LazyLock::new(|| {
        let space = char_class(char::is_whitespace);
        let printable = char_class(|c| !is_unprintable_in_text(c));
        format!("^{space}*{printable}*{space}*$")
    });
    &PATTERN
}

/// A regex character class of every code point `member` accepts, as ranges
/// of literal characters (metacharacters escaped).
fn char_class(member: fn(char) -> bool) -> String {
    let mut ranges: Vec<(char, char)> = Vec::new();
    for c in (char::MIN..=char::MAX).filter(|c| member(*c)) {
        match ranges.last_mut() {
            // `char` ranges skip the surrogates, so no run spans them.
            Some((_, last)) if u32::from(*last) + 1 == u32::from(c) => *last = c,
            _ => ranges.push((c, c)),
        }
    }
    let mut class = String::from("[");
    for (first, last) in ranges {
        push_literal(&mut class, first);
        if last != first {
            // Two neighbours need no `-`.
            if u32::from(last) > u32::from(first) + 1 {
                class.push('-');
            }
            push_literal(&mut class, last);
        }
    }
    class.push(']');
    class
}

fn push_literal(class: &mut String, c: char) {
    if matches!(c, '\\' | ']' | '[' | '^' | '-') {
        class.push('\\');
    }
    class.push(c);
}

/// A client request a route cannot answer. Messages are plain sentences
/// saying what is wrong and what is allowed; they go to the client in the
/// 400 envelope. Echoed values are quoted, clipped and free of control
/// characters (see `clip`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("The parameter \"{0}\" is given more than once; give it at most once.")]
    Repeated(Arc<str>),
    #[error("The parameter \"{name}\" is required, for example {name}={example}.")]
    Missing { name: Arc<str>, example: Arc<str> },
    #[error("The parameter \"{name}\" is empty; give a value, for example {name}={example}.")]
    Empty { name: Arc<str>, example: Arc<str> },
    #[error("The parameter \"{name}\" must be {rule}, but it is \"{got}\".")]
    Invalid {
        name: Arc<str>,
        rule: Arc<str>,
        got: String,
    },
    /// Its percent-decoded bytes are not UTF-8 (decoding them lossily
    /// would make different inputs one key).
    #[error("The parameter \"{0}\" is not UTF-8 text once percent-decoded; send UTF-8.")]
    NotUtf8(Arc<str>),
    /// A parameter the request does not take (where a typo would change
    /// what it does, as in an admin purge).
    #[error("The parameter \"{name}\" is not one this request takes; it takes {takes}.")]
    Unknown { name: String, takes: Arc<str> },
    /// An admin purge naming nothing: purging everything must be asked for.
    #[error("Say what to purge: all=true purges everything; a route's parameters purge one key.")]
    PurgeUnnamed,
    /// An admin purge with `all=true` and a key's parameters too.
    #[error("The parameter \"all\" purges everything; give it alone, without a key's parameters.")]
    PurgeAllWithKey,
    /// A `text` value holding a control or bidirectional formatting character.
    #[error(
        "The parameter \"{0}\" holds a control or bidirectional formatting character; \
         send printable text only."
    )]
    Unprintable(Arc<str>),
}

/// How a parameter's value is checked and normalized.
#[derive(Debug, Clone)]
pub enum Kind {
    /// One of the listed values, exactly (after trimming).
    OneOf(Vec<String>),
    /// An integer in `min..=max`, written canonically (`07` → `7`).
    Int { min: i64, max: i64 },
    /// `all_regions` (any case) or a 2-letter country code, stored upper-case.
    Region,
    /// One leading `#` dropped, lower-cased, 1-100 letters, digits or `_`.
    Hashtag,
    /// Free text within a length and an optional pattern: Unicode NFC, no
    /// control or bidirectional formatting characters.
    Text {
        pattern: Option<Regex>,
        max_len: usize,
        lowercase: bool,
        strip_prefix: Option<String>,
    },
}

impl Kind {
    /// Whether an empty value (`name=`) asks for the default. It does for
    /// the closed sets (`period=`, `region=`); an empty hashtag or text is a
    /// blank field, not a question for the default (`ufc324`), so it is a 400.
    fn empty_means_default(&self) -> bool {
        matches!(self, Self::OneOf(_) | Self::Int { .. } | Self::Region)
    }
}

/// One compiled parameter.
#[derive(Debug, Clone)]
pub struct Param {
    name: Arc<str>,
    kind: Kind,
    required: bool,
    /// Normalized default, if any.
    default: Option<String>,
    /// The default as it stands in a key (form-encoded), built once.
    default_in_key: Option<Box<str>>,
    /// What a key holds before this parameter's value: `?name=` when it
    /// comes first, `&name=` after another (built once).
    key_prefix: [Box<str>; 2],
    example: Arc<str>,
    /// What the kind allows, for messages and the OpenAPI description.
    rule: Arc<str>,
}

impl Param {
    /// The query parameter name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How values are checked.
    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Whether a request must give it.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The normalized default.
    pub fn default(&self) -> Option<&str> {
        self.default.as_deref()
    }

    /// A valid example value.
    pub fn example(&self) -> &str {
        &self.example
    }

    /// What the parameter allows, as a phrase ("one of 7, 30").
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// Checks and normalizes one raw value (already known to be non-empty).
    fn normalize(&self, raw: &str) -> Result<String, KeyError> {
        let mut value = String::new();
        self.normalize_into(raw, &mut value)?;
        Ok(value)
    }

    /// [`Param::normalize`], appending to `out`: the common values (ASCII
    /// letters, digits, `_`) go straight into a key, with no string of their own.
    fn normalize_into(&self, raw: &str, out: &mut String) -> Result<(), KeyError> {
        let key = out;
        let invalid = || KeyError::Invalid {
            name: Arc::clone(&self.name),
            rule: Arc::clone(&self.rule),
            got: clip(raw),
        };
        match &self.kind {
            Kind::OneOf(values) => {
                let value = values
                    .iter()
                    .find(|v| v.as_str() == raw)
                    .ok_or_else(invalid)?;
                key.push_str(value);
            }
            Kind::Int { min, max } => {
                let n = raw
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (*min..=*max).contains(n))
                    .ok_or_else(invalid)?;
                key.push_str(itoa::Buffer::new().format(n));
            }
            Kind::Region => {
                if raw.eq_ignore_ascii_case(ALL_REGIONS) {
                    key.push_str(ALL_REGIONS);
                    return Ok(());
                }
                match raw.as_bytes() {
                    [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                        key.push(char::from(a.to_ascii_uppercase()));
                        key.push(char::from(b.to_ascii_uppercase()));
                    }
                    _ => return Err(invalid()),
                }
            }
            Kind::Hashtag => {
                let name = raw.strip_prefix('#').unwrap_or(raw);
                if name.len() <= MAX_HASHTAG_CHARS
                    && !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    // ASCII (always NFC): one byte per character.
                    let start = key.len();
                    key.push_str(name);
                    if let Some(pushed) = key.get_mut(start..) {
                        pushed.make_ascii_lowercase();
                    }
                    return Ok(());
                }
                // Composed first, so a decomposed `é` (a letter and a combining mark) validates.
                let name = nfc(Cow::Borrowed(name));
                let chars = name.chars().count();
                let valid =
                    (1..=MAX_HASHTAG_CHARS).contains(&chars) && name.chars().all(is_hashtag_char);
                if !valid {
                    return Err(invalid());
                }
                key.push_str(&nfc(Cow::Owned(name.to_lowercase())));
            }
            Kind::Text {
                pattern,
                max_len,
                lowercase,
                strip_prefix,
            } => {
                if raw.chars().any(is_unprintable_in_text) {
                    return Err(KeyError::Unprintable(Arc::clone(&self.name)));
                }
                let value = fold_text(raw, strip_prefix.as_deref(), *lowercase);
                let chars = value.chars().count();
                let fits = (1..=*max_len).contains(&chars)
                    && pattern.as_ref().is_none_or(|p| p.is_match(&value));
                if !fits {
                    return Err(invalid());
                }
                key.push_str(&value);
            }
        }
        Ok(())
    }

    /// A prefix normalized like a value of this parameter, as far as a
    /// prefix can be (for listing stored keys).
    pub fn normalize_prefix(&self, raw: &str) -> String {
        let raw = raw.trim();
        match &self.kind {
            Kind::Hashtag => nfc(Cow::Owned(
                raw.strip_prefix('#').unwrap_or(raw).to_lowercase(),
            )),
            Kind::Region => raw.to_ascii_uppercase(),
            Kind::Text {
                lowercase,
                strip_prefix,
                ..
            } => fold_text(raw, strip_prefix.as_deref(), *lowercase),
            Kind::OneOf(_) | Kind::Int { .. } => raw.to_owned(),
        }
    }
}

/// How long answers of a route stay fresh.
#[derive(Debug, Clone)]
struct Ttl {
    base: Duration,
    by: Option<TtlBy>,
    /// `freshness = "daily"`: the offset after 00:00 UTC.
    daily: Option<Duration>,
}

/// A TTL per value of one parameter.
#[derive(Debug, Clone)]
struct TtlBy {
    param: Arc<str>,
    /// Encoded value (as it stands in a key) → TTL.
    values: Vec<(String, Duration)>,
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    /// The path on both sides, leaked once per distinct path: it is a metric label.
    path: &'static str,
    credits: u64,
    params: Vec<Param>,
    ttl: Ttl,
    policy: FreshnessPolicy,
}

impl Route {
    /// Path on the proxy and on KeyAPI.
    pub fn path(&self) -> &'static str {
        self.path
    }

    /// Credits KeyAPI charges per call.
    pub fn credits(&self) -> u64 {
        self.credits
    }

    /// Parameters in upstream order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The parameter an admin listing's `prefix` matches: the first required
    /// one, else the first free-form one (`hashtag` or `text`), since the
    /// others have a handful of values.
    pub fn prefix_param(&self) -> Option<&Param> {
        let free_form = |p: &&Param| matches!(p.kind, Kind::Hashtag | Kind::Text { .. });
        let mut params = self.params.iter();
        params
            .clone()
            .find(|p| p.required)
            .or_else(|| params.find(free_form))
    }

    /// Stale windows and negative caching of this route.
    pub fn policy(&self) -> &FreshnessPolicy {
        &self.policy
    }

    /// Normalizes a raw query string (without `?`) into the canonical
    /// upstream request of this route.
    pub fn parse(&self, raw_query: Option<&str>) -> Result<CacheKey, KeyError> {
        // A route has a handful of parameters: their raw values live on the stack.
        let mut raw: SmallVec<[Option<Cow<'_, str>>; 8]> = smallvec![None; self.params.len()];
        for (name, value) in query_pairs(raw_query.unwrap_or("")) {
            let Some(index) = self.params.iter().position(|p| *p.name == *name) else {
                continue;
            };
            let Ok(value) = value else {
                return Err(KeyError::NotUtf8(Arc::clone(&self.params[index].name)));
            };
            if raw[index].replace(value).is_some() {
                return Err(KeyError::Repeated(Arc::clone(&self.params[index].name)));
            }
        }
        SCRATCH.with(|scratch| {
            // Not reentrant, so the buffer is always free; a fresh one would do.
            let (mut borrowed, mut fresh) = (scratch.try_borrow_mut(), String::new());
            let key = match &mut borrowed {
                Ok(buffer) => {
                    buffer.clear();
                    &mut **buffer
                }
                Err(_) => &mut fresh,
            };
            self.assemble(&raw, key)?;
            Ok(CacheKey::copied(key))
        })
    }

    /// Writes the key of these raw values (by parameter) into `key`.
    fn assemble(&self, raw: &[Option<Cow<'_, str>>], key: &mut String) -> Result<(), KeyError> {
        key.push_str(self.path);
        let mut first = true;
        for (param, raw) in self.params.iter().zip(raw) {
            let given = raw.as_deref().map(str::trim).filter(|g| !g.is_empty());
            // Absent: the default; empty: the default only where empty means it.
            let default = match (raw, given) {
                (_, Some(_)) => None,
                (None, None) => param.default_in_key.as_deref(),
                (Some(_), None) => param
                    .default_in_key
                    .as_deref()
                    .filter(|_| param.kind.empty_means_default()),
            };
            if given.is_none() && default.is_none() {
                let (name, example) = (Arc::clone(&param.name), Arc::clone(&param.example));
                return match raw {
                    None if !param.required => continue,
                    Some(_) if !param.required && param.default.is_none() => continue,
                    None => Err(KeyError::Missing { name, example }),
                    Some(_) => Err(KeyError::Empty { name, example }),
                };
            }
            key.push_str(&param.key_prefix[usize::from(!first)]);
            first = false;
            if let Some(given) = given {
                let start = key.len();
                param.normalize_into(given, key)?;
                if needs_encoding(&key[start..]) {
                    let value = key.split_off(start);
                    push_encoded(key, &value);
                }
            } else if let Some(default) = default {
                key.push_str(default);
            }
        }
        Ok(())
    }

    /// Whether `key` is one of this route's.
    pub fn owns(&self, key: &CacheKey) -> bool {
        key.path_and_query()
            .strip_prefix(self.path)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
    }

    /// The normalized parameters of one of this route's keys, in order.
    pub fn params_of(key: &CacheKey) -> Vec<(String, String)> {
        let query = key.path_and_query().split_once('?').map_or("", |(_, q)| q);
        form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// The longest freshness lifetime [`Route::ttl`] can give.
    fn longest_ttl(&self) -> Duration {
        let by = self
            .ttl
            .by
            .iter()
            .flat_map(|by| by.values.iter().map(|v| v.1));
        by.fold(self.ttl.base, Duration::max)
    }

    /// Freshness lifetime of an answer to `key` stored at `now`.
    pub fn ttl(&self, key: &CacheKey, now: SystemTime) -> Duration {
        let mut ttl = self.ttl.base;
        if let Some(TtlBy { param, values }) = &self.ttl.by {
            let query = key.path_and_query().split_once('?').map_or("", |(_, q)| q);
            let value = query.split('&').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                (name == &**param).then_some(value)
            });
            if let Some(found) = value.and_then(|v| values.iter().find(|(k, _)| k == v)) {
                ttl = found.1;
            }
        }
        if let Some(offset) = self.ttl.daily {
            ttl = ttl.min(until_next_daily_boundary(now, offset));
        }
        ttl
    }
}

/// Time from `now` to the next 00:00 UTC + `offset`.
fn until_next_daily_boundary(now: SystemTime, offset: Duration) -> Duration {
    let day = Duration::from_secs(24 * 3600);
    let since_midnight = day - clock::until_utc_midnight(now);
    let offset = Duration::from_secs(offset.as_secs() % day.as_secs());
    if since_midnight < offset {
        offset - since_midnight
    } else {
        day - since_midnight + offset
    }
}

thread_local! {
    /// Where [`Route::parse`] assembles a key: one buffer per thread, so a
    /// parse allocates only the key itself.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The configured routes, in configuration order.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Arc<[Arc<Route>]>,
}

impl RouteTable {
    /// The `[[routes]]` of `config`, inheriting its `[cache]` and `[credits]` defaults.
    pub fn from_config(config: &Config) -> Result<Self, RouteConfigError> {
        let defaults = RouteDefaults {
            credits: config.credits.per_call,
            ttl: config.cache.ttl,
            policy: config.cache.freshness_policy(),
        };
        Self::compile(&config.routes, &defaults)
    }

    /// Checks and compiles `configs`; the first problem is the error.
    pub fn compile(
        configs: &[RouteConfig],
        defaults: &RouteDefaults,
    ) -> Result<Self, RouteConfigError> {
        if configs.is_empty() {
            return Err(RouteConfigError {
                index: 0,
                path: String::new(),
                problem: "at least one [[routes]] entry is needed".into(),
            });
        }
        let mut routes: Vec<Arc<Route>> = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let fail = |problem: String| RouteConfigError {
                index,
                path: config.path.clone(),
                problem,
            };
            if routes.iter().any(|r| r.path == config.path) {
                return Err(fail("path: the same path is configured twice".into()));
            }
            routes.push(Arc::new(compile_route(config, defaults).map_err(fail)?));
        }
        Ok(Self {
            routes: routes.into(),
        })
    }

    /// Every route.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route with this path.
    pub fn get(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.path == path)
    }

    /// What any of these routes could have stored, for checking entries
    /// read back from Redis or a snapshot (bodies as large as `max_body_bytes`).
    pub fn entry_limits(&self, max_body_bytes: usize) -> EntryLimits {
        let mut limits = EntryLimits {
            max_body_bytes,
            success: [Duration::ZERO; 3],
            negative_ttl: Duration::ZERO,
            negative_codes: Vec::new(),
        };
        for route in self.routes.iter() {
            let policy = &route.policy;
            let windows = [
                route.longest_ttl(),
                policy.stale_while_revalidate,
                policy.stale_if_error,
            ];
            for (longest, window) in limits.success.iter_mut().zip(windows) {
                *longest = (*longest).max(window);
            }
            limits.negative_ttl = limits.negative_ttl.max(policy.negative_ttl);
            limits.negative_codes.extend(&policy.negative_codes);
        }
        limits.negative_codes.sort_unstable();
        limits.negative_codes.dedup();
        limits
    }

    /// The route a stored key belongs to.
    pub fn route_of(&self, key: &CacheKey) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.owns(key))
    }
}

/// `path` as a `&'static str` (a metric label). Leaked once per distinct
/// path: reloads that compile the same routes again leak nothing more.
fn intern(path: &str) -> &'static str {
    static PATHS: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Mutex::default);
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    match paths.get(path) {
        Some(interned) => interned,
        None => {
            let leaked: &'static str = Box::leak(path.to_owned().into_boxed_str());
            paths.insert(leaked);
            leaked
        }
    }
}

fn compile_route(config: &RouteConfig, defaults: &RouteDefaults) -> Result<Route, String> {
    let path = config.path.as_str();
    let valid_path = path.starts_with('/')
        && path.len() <= 200
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'));
    if !valid_path {
        return Err(
            "path: must start with / and hold only letters, digits, / _ - . (no query)".into(),
        );
    }
    let credits = config.credits.unwrap_or(defaults.credits);
    if credits == 0 {
        return Err("credits: must be at least 1 (KeyAPI's price per call)".into());
    }
    let mut params: Vec<Param> = Vec::with_capacity(config.params.len());
    for (i, p) in config.params.iter().enumerate() {
        if params.iter().any(|q| *q.name == *p.name) {
            return Err(format!(
                "params[{i}] ({}): the same name is given twice",
                p.name
            ));
        }
        params.push(compile_param(p).map_err(|e| format!("params[{i}] ({}): {e}", p.name))?);
    }
    let ttl = config.ttl.unwrap_or(defaults.ttl);
    let by = match &config.ttl_by {
        None => None,
        Some(by) => {
            let param = params
                .iter()
                .find(|p| *p.name == by.param)
                .ok_or_else(|| format!("ttl_by.param: no parameter named {:?}", by.param))?;
            let mut values = Vec::new();
            for (raw, duration) in &by.values {
                let normalized = param.normalize(raw.trim()).map_err(|_| {
                    format!(
                        "ttl_by.values: {raw:?} is not a valid value of {} ({})",
                        by.param, param.rule
                    )
                })?;
                let mut encoded = String::new();
                push_encoded(&mut encoded, &normalized);
                values.push((encoded, duration.into_inner()));
            }
            Some(TtlBy {
                param: Arc::clone(&param.name),
                values,
            })
        }
    };
    let daily = match config.freshness.as_deref() {
        None | Some("fixed") => {
            if config.daily_offset.is_some() {
                return Err("daily_offset: only with freshness = \"daily\"".into());
            }
            None
        }
        Some("daily") => Some(config.daily_offset.unwrap_or_default()),
        Some(other) => {
            return Err(format!(
                "freshness: {other:?} is not \"fixed\" or \"daily\""
            ));
        }
    };
    let all_ttls = std::iter::once(ttl).chain(by.iter().flat_map(|b| b.values.iter().map(|x| x.1)));
    if all_ttls.into_iter().any(|t| t.is_zero()) {
        return Err("ttl: must be greater than zero".into());
    }
    let mut policy = defaults.policy.clone();
    if let Some(swr) = config.stale_while_revalidate {
        policy.stale_while_revalidate = swr;
    }
    if let Some(sie) = config.stale_if_error {
        policy.stale_if_error = sie;
    }
    if let Some(negative) = config.negative_ttl {
        policy.negative_ttl = negative;
    }
    Ok(Route {
        path: intern(path),
        credits,
        params,
        ttl: Ttl {
            base: ttl,
            by,
            daily,
        },
        policy,
    })
}

fn compile_param(p: &ParamConfig) -> Result<Param, String> {
    let valid_name = !p.name.is_empty()
        && p.name.len() <= 64
        && p.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !valid_name {
        return Err("name: 1-64 letters, digits, _ - .".into());
    }
    let kind_name = p
        .kind
        .as_deref()
        .unwrap_or(if p.one_of.is_some() { "one_of" } else { "text" });
    let only = |field: &str, present: bool, kinds: &str| {
        if present {
            Err(format!("{field}: only for kind {kinds}"))
        } else {
            Ok(())
        }
    };
    only(
        "one_of",
        p.one_of.is_some() && kind_name != "one_of",
        "one_of",
    )?;
    only(
        "min/max",
        (p.min.is_some() || p.max.is_some()) && kind_name != "int",
        "int",
    )?;
    let text_only = p.pattern.is_some()
        || p.max_len.is_some()
        || p.lowercase.is_some()
        || p.strip_prefix.is_some();
    only(
        "pattern/max_len/lowercase/strip_prefix",
        text_only && kind_name != "text",
        "text",
    )?;
    let (kind, rule) = match kind_name {
        "one_of" => {
            let values: Vec<String> = p.one_of.clone().unwrap_or_default();
            if values.is_empty() || values.iter().any(|v| v.trim().is_empty() || v.trim() != v) {
                return Err("one_of: list at least one value, none empty or padded".into());
            }
            let rule = format!("one of {}", values.join(", "));
            (Kind::OneOf(values), rule)
        }
        "int" => {
            let (min, max) = (p.min.unwrap_or(i64::MIN), p.max.unwrap_or(i64::MAX));
            if min > max {
                return Err("min: must not exceed max".into());
            }
            (
                Kind::Int { min, max },
                format!("an integer from {min} to {max}"),
            )
        }
        "region" => (
            Kind::Region,
            "\"all_regions\" or a 2-letter country code such as US".to_owned(),
        ),
        "hashtag" => (
            Kind::Hashtag,
            format!(
                "1 to {MAX_HASHTAG_CHARS} letters, digits or underscores, optionally after one \"#\""
            ),
        ),
        "text" => {
            let max_len = p.max_len.unwrap_or(DEFAULT_TEXT_MAX_LEN);
            if max_len == 0 || max_len > 1000 {
                return Err("max_len: 1 to 1000".into());
            }
            let pattern = match &p.pattern {
                Some(raw) => Some(
                    Regex::new(&format!("^(?:{raw})$"))
                        .map_err(|e| format!("pattern: not a valid regular expression: {e}"))?,
                ),
                None => None,
            };
            let rule = match &p.pattern {
                Some(raw) => format!("1 to {max_len} printable characters matching {raw}"),
                None => format!("1 to {max_len} printable characters"),
            };
            let kind = Kind::Text {
                pattern,
                max_len,
                lowercase: p.lowercase.unwrap_or(false),
                strip_prefix: p.strip_prefix.clone().filter(|s| !s.is_empty()),
            };
            (kind, rule)
        }
        other => {
            return Err(format!(
                "kind: unknown kind {other:?}; use one_of, int, region, hashtag or text"
            ));
        }
    };
    let mut param = Param {
        name: p.name.as_str().into(),
        kind,
        required: p.required,
        default: None,
        default_in_key: None,
        key_prefix: [
            format!("?{}=", p.name).into(),
            format!("&{}=", p.name).into(),
        ],
        example: "".into(),
        rule: rule.into(),
    };
    if let Some(raw) = &p.default {
        if p.required {
            return Err("default: a required parameter has no default".into());
        }
        let normalized = param
            .normalize(raw.trim())
            .map_err(|_| format!("default: {raw:?} is not {}", param.rule))?;
        let mut in_key = String::new();
        push_encoded(&mut in_key, &normalized);
        param.default_in_key = Some(in_key.into());
        param.default = Some(normalized);
    }
    let example = match (&p.example, &param.default, &param.kind) {
        (Some(example), ..) => example.clone(),
        (None, Some(default), _) => default.clone(),
        (None, None, Kind::OneOf(values)) => values[0].clone(),
        (None, None, Kind::Int { min, .. }) => (*min).max(0).to_string(),
        (None, None, Kind::Region) => "US".to_owned(),
        (None, None, Kind::Hashtag) => "ufc324".to_owned(),
        (None, None, Kind::Text { .. }) => "value".to_owned(),
    };
    param.example = example.into();
    Ok(param)
}

/// A `text` value in NFC (like a hashtag, so canonically equal spellings
/// are one key), its prefix dropped once and, if asked, lower-cased (and
/// composed again: lower-casing can decompose).
fn fold_text(raw: &str, strip_prefix: Option<&str>, lowercase: bool) -> String {
    let composed = nfc(Cow::Borrowed(raw));
    let value = strip_prefix.map_or(composed.as_str(), |p| {
        composed.strip_prefix(p).unwrap_or(&composed)
    });
    if lowercase {
        nfc(Cow::Owned(value.to_lowercase()))
    } else {
        value.to_owned()
    }
}

/// Characters a `text` value may not hold: control characters (C0, DEL,
/// C1) and the bidirectional formatting controls that make text display
/// other than it reads (Trojan Source: U+202A-U+202E, U+2066-U+2069, the
/// marks U+200E, U+200F and U+061C).
fn is_unprintable_in_text(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `text` in Unicode Normalization Form C, so canonically equivalent
/// spellings (`é` as one code point or as `e` + U+0301) are one key, and so
/// are the forms lower-casing produces. Compatibility forms (fullwidth
/// `ＵＦＣ`, ligatures) are deliberately not folded: they are different text
/// that KeyAPI may answer differently. No copy when it already is (ASCII always is).
fn nfc(text: Cow<'_, str>) -> String {
    if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        text.into_owned()
    } else {
        text.nfc().collect()
    }
}

/// A value whose percent-decoded bytes are not UTF-8.
struct NotUtf8;

/// A decoded name and its value (or [`NotUtf8`]).
type Pair<'q> = (Cow<'q, str>, Result<Cow<'q, str>, NotUtf8>);

/// The `name=value` pairs of a query, decoded as `application/x-www-form-urlencoded`,
/// except that a value whose bytes are not UTF-8 is an error rather than
/// U+FFFD (names are decoded lossily: no parameter's name holds one).
/// Pairs without `%` or `+` (the common case) are borrowed, not decoded.
fn query_pairs(query: &str) -> impl Iterator<Item = Pair<'_>> {
    let mut rest = query;
    // One pass over the bytes (a query is short; no searcher set-up).
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let (mut end, mut equals, mut encoded) = (rest.len(), None, false);
            for (i, b) in rest.bytes().enumerate() {
                match b {
                    b'&' => {
                        end = i;
                        break;
                    }
                    b'=' if equals.is_none() => equals = Some(i),
                    b'%' | b'+' => encoded = true,
                    _ => {}
                }
            }
            let pair = &rest[..end];
            rest = rest.get(end + 1..).unwrap_or("");
            if pair.is_empty() {
                continue;
            }
            let (name, value) = equals.map_or((pair, ""), |i| (&pair[..i], &pair[i + 1..]));
            if encoded {
                let name = form_decode(name).unwrap_or_else(|bytes| {
                    Cow::Owned(String::from_utf8_lossy(&bytes).into_owned())
                });
                return Some((name, form_decode(value).map_err(|_| NotUtf8)));
            }
            return Some((Cow::Borrowed(name), Ok(Cow::Borrowed(value))));
        }
        None
    })
}

/// One form-encoded name or value decoded (`+` is a space), or its bytes
/// when they are not UTF-8.
fn form_decode(raw: &str) -> Result<Cow<'_, str>, Vec<u8>> {
    if raw.contains('+') {
        let spaced = raw.replace('+', " ");
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(&spaced).collect();
        return String::from_utf8(decoded)
            .map(Cow::Owned)
            .map_err(|e| e.into_bytes());
    }
    match Cow::from(percent_encoding::percent_decode_str(raw)) {
        Cow::Borrowed(bytes) => std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|_| bytes.to_vec()),
        Cow::Owned(bytes) => String::from_utf8(bytes)
            .map(Cow::Owned)
            .map_err(|e| e.into_bytes()),
    }
}

/// Whether `value` has anything but ASCII letters, digits and `_`.
fn needs_encoding(value: &str) -> bool {
    !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Appends `value` form-encoded. Letters, digits and `_` in ASCII need no
/// encoding (the common case); anything else is encoded as a form serializer would.
fn push_encoded(out: &mut String, value: &str) {
    if !needs_encoding(value) {
        out.push_str(value);
    } else {
        out.extend(form_urlencoded::byte_serialize(value.as_bytes()));
    }
}

/// Echoes at most 40 characters of a bad value back to the client, each
/// control or invisible formatting character shown as `�` (a message is for
/// reading; the raw bytes are nobody's business).
pub(crate) fn clip(raw: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = raw
        .chars()
        .take(MAX)
        .map(|c| if is_printable(c) { c } else { '\u{FFFD}' })
        .collect();
    if raw.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// Not a control character, not a private-use, unassigned-plane or
/// formatting code point that would print as nothing or as a box.
fn is_printable(c: char) -> bool {
    !c.is_control()
        && !matches!(c,
            '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}' | '\u{E000}'..='\u{F8FF}' | '\u{40000}'..)
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OneOf(_) => "one_of",
            Self::Int { .. } => "int",
            Self::Region => "region",
            Self::Hashtag => "hashtag",
            Self::Text { .. } => "text",
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::from_config(&Config::defaults().unwrap()).unwrap()
    }

    fn key(q: &str) -> Result<String, KeyError> {
        table().routes()[0].parse(Some(q)).map(|k| k.to_string())
    }

    #[test]
    fn equivalent_queries_share_one_key() {
        let expected =
            "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=ufc324";
        for q in [
            "hashtag_name=%23UFC324",
            "hashtag_name=ufc324&period=7&region=ALL_REGIONS",
            "region=all_regions&hashtag_name=ufc324",
            "hashtag_name=+ufc324+&_=123",
        ] {
            assert_eq!(key(q).as_deref(), Ok(expected), "query {q}");
        }
    }

    #[test]
    fn unicode_is_lowercased_and_percent_encoded() {
        let k = key("hashtag_name=%C3%89T%C3%89&region=fr&period=30");
        assert_eq!(
            k.as_deref(),
            Ok("/v1/tiktok/trending/hashtag/detail?period=30&region=FR&hashtag_name=%C3%A9t%C3%A9")
        );
    }

    #[test]
    fn bad_inputs_are_rejected_with_the_parameter_named() {
        let long = format!("hashtag_name={}", "a".repeat(101));
        let cases: [(&str, &str); 11] = [
            ("hashtag_name=", "\"hashtag_name\" is empty"),
            ("hashtag_name=+", "\"hashtag_name\" is empty"),
            ("hashtag_name=ab%FF", "\"hashtag_name\" is not UTF-8"),
            ("hashtag_name=%23", "\"hashtag_name\" must be"),
            ("hashtag_name=a-b", "\"hashtag_name\" must be"),
            ("hashtag_name=%23%23ab", "\"hashtag_name\" must be"),
            (&long, "\"hashtag_name\" must be"),
            (
                "hashtag_name=a&hashtag_name=b",
                "\"hashtag_name\" is given more than once",
            ),
            (
                "hashtag_name=a&period=8",
                "\"period\" must be one of 7, 30, 120, 365, 1095",
            ),
            ("hashtag_name=a&region=USA", "\"region\" must be"),
            ("hashtag_name=a&region=u1", "\"region\" must be"),
        ];
        for (q, expected) in cases {
            match key(q) {
                Err(e) => assert!(e.to_string().contains(expected), "query {q:?} gave {e}"),
                Ok(k) => panic!("query {q:?} was accepted as {k}"),
            }
        }
    }

    #[test]
    fn without_hashtag_name_the_question_is_keyapis_default_ufc324() {
        let expected =
            "/v1/tiktok/trending/hashtag/detail?period=7&region=all_regions&hashtag_name=ufc324";
        for q in ["", "period=7", "region=ALL_REGIONS&period=", "_=1"] {
            assert_eq!(key(q).as_deref(), Ok(expected), "query {q:?}");
        }
        assert_eq!(
            table().routes()[0].parse(None).unwrap().to_string(),
            expected
        );
    }

    /// The default route with `hashtag_name` as a `text` parameter.
    fn text_key(q: &str) -> Result<String, KeyError> {
        let mut config = Config::defaults().unwrap();
        config.routes[0].params[2] = ParamConfig {
            name: "hashtag_name".into(),
            kind: Some("text".into()),
            required: true,
            ..ParamConfig::default()
        };
        let table = RouteTable::from_config(&config).unwrap();
        table.routes()[0].parse(Some(q)).map(|k| k.to_string())
    }

    #[test]
    fn text_is_utf8_printable_and_nfc() {
        // Two spellings of "été": one key.
        assert_eq!(
            text_key("hashtag_name=e%CC%81te%CC%81"),
            text_key("hashtag_name=%C3%A9t%C3%A9")
        );
        assert!(
            text_key("hashtag_name=%C3%A9t%C3%A9")
                .unwrap()
                .ends_with("=%C3%A9t%C3%A9")
        );
        // Invalid UTF-8 is refused, not turned into U+FFFD (which is another, valid input).
        assert!(text_key("hashtag_name=a%EF%BF%BD").is_ok());
        for bad in ["a%FF", "a%C3", "%ED%A0%80", "a%FF+b"] {
            assert_eq!(
                text_key(&format!("hashtag_name={bad}")),
                Err(KeyError::NotUtf8("hashtag_name".into())),
                "{bad}"
            );
        }
        // Control characters and bidi controls, anywhere but at the trimmed ends.
        for bad in [
            "a%00b",
            "a%09b",
            "a%0Ab",
            "a%7Fb",
            "a%C2%85b",
            "a%D8%9Cb",
            "a%E2%80%8Eb",
            "a%E2%80%8Fb",
            "a%E2%80%AAb",
            "a%E2%80%AEb",
            "a%E2%81%A6b",
            "a%E2%81%A9b",
        ] {
            assert_eq!(
                text_key(&format!("hashtag_name={bad}")),
                Err(KeyError::Unprintable("hashtag_name".into())),
                "{bad}"
            );
        }
        // Not bidi controls: a zero-width joiner (emoji) and a right-to-left letter.
        assert!(text_key("hashtag_name=a%E2%80%8Db").is_ok());
        assert!(text_key("hashtag_name=%D7%90").is_ok());
        // An invalid value of an unknown parameter is ignored, like the parameter.
        assert!(key("hashtag_name=a&x=%FF").is_ok());
    }

    #[test]
    fn ttl_follows_the_period_and_the_daily_boundary() {
        let table = table();
        let route = &table.routes()[0];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 3_600);
        let week = route.parse(Some("hashtag_name=a")).unwrap();
        let years = route.parse(Some("hashtag_name=a&period=1095")).unwrap();
        assert_eq!(route.ttl(&week, now), Duration::from_secs(3600));
        assert_eq!(route.ttl(&years, now), Duration::from_secs(24 * 3600));
        let offset = Duration::from_secs(1800);
        // 01:00 UTC: the next 00:30 is 23.5 h away; at 00:10 it is 20 min away.
        assert_eq!(
            until_next_daily_boundary(now, offset),
            Duration::from_secs(23 * 3600 + 1800)
        );
        let early = now - Duration::from_secs(3000);
        assert_eq!(
            until_next_daily_boundary(early, offset),
            Duration::from_secs(1200)
        );
    }

    #[test]
    fn canonically_equivalent_spellings_share_one_key() {
        let composed = key("hashtag_name=%C3%A9t%C3%A9"); // é as U+00E9
        for q in [
            "hashtag_name=e%CC%81te%CC%81", // e + U+0301 (NFD)
            "hashtag_name=E%CC%81TE%CC%81", // upper-case NFD
            "hashtag_name=%C3%89T%C3%89",   // upper-case NFC
        ] {
            assert_eq!(key(q), composed, "query {q}");
        }
        // Fullwidth letters are compatibility forms: a different key, by design.
        assert_ne!(key("hashtag_name=%EF%BC%B5FC"), key("hashtag_name=ufc"));
    }

    #[test]
    fn exactly_100_characters_is_accepted() {
        let q = format!("hashtag_name={}", "é".repeat(100));
        assert!(key(&q).is_ok());
    }

    #[test]
    fn bad_routes_are_refused_naming_the_route_and_the_field() {
        let config = Config::defaults().unwrap();
        let defaults = RouteDefaults {
            credits: 2,
            ttl: config.cache.ttl,
            policy: config.cache.freshness_policy(),
        };
        let route = |params: Vec<ParamConfig>| RouteConfig {
            path: "/v1/x".into(),
            credits: Some(1),
            ttl: None,
            ttl_by: None,
            freshness: None,
            daily_offset: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            negative_ttl: None,
            params,
        };
        let param = |name: &str, kind: &str| ParamConfig {
            name: name.into(),
            kind: Some(kind.into()),
            ..ParamConfig::default()
        };
        let compile = |routes: Vec<RouteConfig>| {
            RouteTable::compile(&routes, &defaults)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            compile(vec![route(vec![]), route(vec![])]),
            "routes[1] (/v1/x): path: the same path is configured twice"
        );
        assert!(compile(vec![route(vec![param("a", "colour")])]).contains("unknown kind"));
        let mut bad_default = param("page", "int");
        (bad_default.min, bad_default.max) = (Some(1), Some(50));
        bad_default.default = Some("0".into());
        assert_eq!(
            compile(vec![route(vec![bad_default])]),
            "routes[0] (/v1/x): params[0] (page): default: \"0\" is not an integer from 1 to 50"
        );
        let mut free = route(vec![]);
        free.credits = Some(0);
        assert!(compile(vec![free]).contains("credits: must be at least 1"));
    }
}
