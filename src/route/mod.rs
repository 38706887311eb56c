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
//!
//! By idea: `kind` checks and normalizes one parameter's value,
//! `compile` builds the table from configuration, `query` turns a raw
//! query into a key, and `error` says what a configuration or a client's query got wrong.
//! This file holds the table and a route's answers about itself.

mod compile;
mod error;
mod kind;
mod query;
#[cfg(test)]
mod tests;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

pub(crate) use error::clip;
pub use error::{KeyError, RouteConfigError};
pub use kind::{
    DEFAULT_TEXT_MAX_LEN, Kind, MAX_HASHTAG_CHARS, Param, hashtag_pattern, is_hashtag_char,
    region_pattern, text_pattern,
};

use crate::{
    cache::{CacheKey, EntryLimits, FreshnessPolicy},
    clock,
};

/// Path of the compiled-in default route (KeyAPI's hashtag detail).
pub const HASHTAG_DETAIL_PATH: &str = "/v1/tiktok/trending/hashtag/detail";

/// What a route inherits when it does not say: the `[cache]` and `[credits]` defaults.
#[derive(Debug, Clone)]
pub struct RouteDefaults {
    pub credits: u64,
    pub ttl: Duration,
    /// Global freshness rules (stale windows and negative TTL may be overridden per route).
    pub policy: FreshnessPolicy,
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
    /// The path on both sides, leaked once at start-up: it is a metric label.
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

/// The configured routes, in configuration order.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Arc<[Arc<Route>]>,
}

impl RouteTable {
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
