//! Compiling the `[[routes]]` configuration into the [`RouteTable`]: every
//! field checked once at start-up, each problem one line naming the route
//! and the field; defaults normalized and encoded as they will stand in keys.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock, Mutex},
};

use regex_lite::Regex;

use super::{
    Route, RouteDefaults, RouteTable, Ttl, TtlBy,
    error::RouteConfigError,
    kind::{DEFAULT_TEXT_MAX_LEN, Kind, MAX_HASHTAG_CHARS, Param},
    query::push_encoded,
};
use crate::config::{Config, ParamConfig, ParamKind, RouteConfig, RouteFreshness};

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
    let daily = match config.freshness {
        None | Some(RouteFreshness::Fixed) => {
            if config.daily_offset.is_some() {
                return Err("daily_offset: only with freshness = \"daily\"".into());
            }
            None
        }
        Some(RouteFreshness::Daily) => Some(config.daily_offset.unwrap_or_default()),
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
    let kind_name = p.kind.unwrap_or(if p.one_of.is_some() {
        ParamKind::OneOf
    } else {
        ParamKind::Text
    });
    let only = |field: &str, present: bool, kinds: &str| {
        if present {
            Err(format!("{field}: only for kind {kinds}"))
        } else {
            Ok(())
        }
    };
    only(
        "one_of",
        p.one_of.is_some() && kind_name != ParamKind::OneOf,
        "one_of",
    )?;
    only(
        "min/max",
        (p.min.is_some() || p.max.is_some()) && kind_name != ParamKind::Int,
        "int",
    )?;
    let text_only = p.pattern.is_some()
        || p.max_len.is_some()
        || p.lowercase.is_some()
        || p.strip_prefix.is_some();
    only(
        "pattern/max_len/lowercase/strip_prefix",
        text_only && kind_name != ParamKind::Text,
        "text",
    )?;
    let (kind, rule) = match kind_name {
        ParamKind::OneOf => {
            let values: Vec<String> = p.one_of.clone().unwrap_or_default();
            if values.is_empty() || values.iter().any(|v| v.trim().is_empty() || v.trim() != v) {
                return Err("one_of: list at least one value, none empty or padded".into());
            }
            let rule = format!("one of {}", values.join(", "));
            (Kind::OneOf(values), rule)
        }
        ParamKind::Int => {
            let (min, max) = (p.min.unwrap_or(i64::MIN), p.max.unwrap_or(i64::MAX));
            if min > max {
                return Err("min: must not exceed max".into());
            }
            (
                Kind::Int { min, max },
                format!("an integer from {min} to {max}"),
            )
        }
        ParamKind::Region => (
            Kind::Region,
            "\"all_regions\" or a 2-letter country code such as US".to_owned(),
        ),
        ParamKind::Hashtag => (
            Kind::Hashtag,
            format!(
                "1 to {MAX_HASHTAG_CHARS} letters, digits or underscores, optionally after one \"#\""
            ),
        ),
        ParamKind::Text => {
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
