//! The rules serde types cannot express, checked once at load: URLs,
//! bounds, label-safe names and keys that must name exactly one thing.

use std::net::IpAddr;

use super::{
    Config, MIN_SNAPSHOT_INTERVAL,
    callers::{ClientConfig, IssuerConfig, MAX_SUBJECTS},
    error::ConfigError,
    sections::{TelemetryConfig, VisitorsConfig},
};

impl Config {
    /// Checks the rules that serde types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        validate_url("upstream.base_url", &self.upstream.base_url)?;
        validate_telemetry(&self.telemetry)?;
        if let Some(level) = &self.log.level {
            tracing_subscriber::EnvFilter::builder()
                .parse(level)
                .map_err(|e| ConfigError::Invalid(format!("log.level {level:?}: {e}")))?;
        }
        let listen = self.server.listen;
        if self.clients.is_empty() && !self.server.open && !listen.ip().is_loopback() {
            return invalid(format!(
                "server.listen {listen} is not loopback and no [[clients]] are configured: \
                 add a [[clients]] entry (see `keyapi-proxy hash-token`), or set \
                 server.open = true (KEYAPI_PROXY__SERVER__OPEN=true) to let anyone who \
                 reaches the port spend your credits"
            ));
        }
        if self.upstream.max_body_bytes == 0 || self.upstream.max_body_bytes > u32::MAX as usize {
            return invalid("upstream.max_body_bytes must be between 1 and 4294967295".into());
        }
        if self.upstream.request_timeout.is_zero() || self.upstream.connect_timeout.is_zero() {
            return invalid("upstream timeouts must be greater than zero".into());
        }
        if self.cache.snapshot_interval < MIN_SNAPSHOT_INTERVAL {
            return invalid(format!(
                "cache.snapshot_interval must be at least {}s: each snapshot rewrites the whole cache",
                MIN_SNAPSHOT_INTERVAL.as_secs()
            ));
        }
        if self.server.header_read_timeout.is_zero()
            || self.server.idle_timeout.is_zero()
            || self.server.send_timeout.is_zero()
        {
            return invalid(
                "server.header_read_timeout, server.idle_timeout and server.send_timeout \
                 must be greater than zero"
                    .into(),
            );
        }
        if self.server.max_connections == Some(0) {
            return invalid("server.max_connections must be at least 1 (or absent: derived from the descriptor limit)".into());
        }
        if self.upstream.max_in_flight == 0 || self.upstream.breaker_failures == 0 {
            return invalid(
                "upstream.max_in_flight and upstream.breaker_failures must be at least 1".into(),
            );
        }
        if self.cache.redis.op_timeout.is_zero() || self.cache.redis.ledger_timeout.is_zero() {
            return invalid(
                "cache.redis.op_timeout and cache.redis.ledger_timeout must be greater than zero"
                    .into(),
            );
        }
        let redis = self.cache.redis.target()?;
        let worst_fetch = self.worst_fetch();
        let (lock_ttl, lock_wait) = self.cache.redis.lock_times(worst_fetch);
        if redis.is_some() && lock_ttl.min(lock_wait) <= worst_fetch {
            return invalid(format!(
                "cache.redis.lock_ttl and lock_wait must be longer than the worst-case fetch \
                 (upstream.queue_timeout + upstream.request_timeout = {}), so that no replica \
                 pays again for a question another one is still fetching",
                humantime_serde::re::humantime::format_duration(worst_fetch)
            ));
        }
        if !(0.0..1.0).contains(&self.cache.refresh_ahead) {
            return invalid("cache.refresh_ahead must be 0 (off) or a fraction below 1".into());
        }
        if self.credits.per_call == 0 {
            return invalid("credits.per_call must be at least 1".into());
        }
        if !(1..=crate::spend::MAX_HISTORY_DAYS).contains(&self.credits.history_days) {
            return invalid(format!(
                "credits.history_days must be between 1 and {}",
                crate::spend::MAX_HISTORY_DAYS
            ));
        }
        for origin in &self.cors.allowed_origins {
            let url = reqwest::Url::parse(origin).ok();
            let exact = url.as_ref().is_some_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.origin().ascii_serialization() == *origin
            });
            if !exact {
                return invalid(format!(
                    "cors.allowed_origins: {origin:?} is not an origin like \"https://app.example.com\" (scheme, host, optional port; no path, no `*`)"
                ));
            }
        }
        validate_clients(&self.clients)?;
        validate_visitors(&self.visitors)?;
        validate_issuers(&self.issuers)
    }
}

/// The OTLP endpoint and the sample ratio are usable.
fn validate_telemetry(telemetry: &TelemetryConfig) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&telemetry.sample_ratio) {
        return Err(ConfigError::Invalid(format!(
            "telemetry.sample_ratio {} must be between 0 and 1",
            telemetry.sample_ratio
        )));
    }
    if let Some(endpoint) = &telemetry.otlp_endpoint {
        let parsed = url::Url::parse(endpoint).map_err(|e| {
            ConfigError::Invalid(format!("telemetry.otlp_endpoint {endpoint:?}: {e}"))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid(format!(
                "telemetry.otlp_endpoint {endpoint:?} must be an http:// or https:// URL"
            )));
        }
    }
    Ok(())
}

/// Client ids become metric labels and log fields; hashes must be usable.
fn validate_clients(clients: &[ClientConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashSet::new();
    let mut hashes = std::collections::HashSet::new();
    for client in clients {
        let id = &client.id;
        if !is_label(id) {
            return Err(ConfigError::Invalid(format!(
                "clients: id {id:?} must be 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        if !ids.insert(id.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "clients: id {id:?} is used twice"
            )));
        }
        let Some(hash) = crate::digest::parse_sha256_hex(&client.token_sha256) else {
            return Err(ConfigError::Invalid(format!(
                "clients: token_sha256 of {id:?} must be 64 hex digits (run `keyapi-proxy hash-token`)"
            )));
        };
        if !hashes.insert(hash) {
            return Err(ConfigError::Invalid(format!(
                "clients: token_sha256 of {id:?} is used by another client"
            )));
        }
    }
    Ok(())
}

/// A name usable as a metric label and log field: 1-64 of `[A-Za-z0-9._-]`.
pub(super) fn is_label(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The visitors' address prefixes and tracking bound are in range.
fn validate_visitors(visitors: &VisitorsConfig) -> Result<(), ConfigError> {
    if !(1..=32).contains(&visitors.ipv4_prefix) || !(1..=128).contains(&visitors.ipv6_prefix) {
        return Err(ConfigError::Invalid(
            "visitors.ipv4_prefix must be 1-32 and visitors.ipv6_prefix 1-128".into(),
        ));
    }
    if !(1..=MAX_SUBJECTS).contains(&visitors.max_tracked) {
        return Err(ConfigError::Invalid(format!(
            "visitors.max_tracked must be between 1 and {MAX_SUBJECTS}"
        )));
    }
    Ok(())
}

/// Issuer names become metric labels and ledger names; each names one key.
fn validate_issuers(issuers: &[IssuerConfig]) -> Result<(), ConfigError> {
    let invalid = |msg: String| Err(ConfigError::Invalid(msg));
    let mut names = std::collections::HashSet::new();
    let mut iss = std::collections::HashSet::new();
    for issuer in issuers {
        let name = &issuer.name;
        if !is_label(name) {
            return invalid(format!(
                "issuers: name {name:?} must be 1-64 characters of [A-Za-z0-9._-]"
            ));
        }
        if !names.insert(name.as_str()) {
            return invalid(format!("issuers: name {name:?} is used twice"));
        }
        if issuer.issuer.is_empty() || issuer.audience.is_empty() {
            return invalid(format!(
                "issuers: {name:?} needs a non-empty issuer and audience"
            ));
        }
        // A token's `iss` picks the entry that verifies it.
        if !iss.insert(issuer.issuer.as_str()) {
            return invalid(format!(
                "issuers: issuer {:?} of {name:?} is used by another entry",
                issuer.issuer
            ));
        }
        match (&issuer.jwks_url, &issuer.hs256_secret_file) {
            (Some(url), None) => validate_url(&format!("issuers: jwks_url of {name:?}"), url)?,
            (None, Some(_)) => {}
            _ => {
                return invalid(format!(
                    "issuers: {name:?} needs exactly one of jwks_url and hs256_secret_file"
                ));
            }
        }
        if !(1..=MAX_SUBJECTS).contains(&issuer.max_subjects) {
            return invalid(format!(
                "issuers: max_subjects of {name:?} must be between 1 and {MAX_SUBJECTS}"
            ));
        }
    }
    Ok(())
}

/// `what` (a configured URL) is https, or plain http to a loopback host, and
/// carries no query, fragment or credentials. Plain http is only accepted to
/// loopback: anywhere else the KeyAPI key (or a JWKS) would cross the network
/// in clear text, open to reading (or forging).
fn validate_url(what: &str, raw: &str) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(raw)
        .map_err(|e| ConfigError::Invalid(format!("{what} {raw:?}: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(ConfigError::Invalid(format!(
                "{what} {raw:?}: plain http is only allowed to a loopback host; use https"
            )));
        }
        other => {
            return Err(ConfigError::Invalid(format!(
                "{what} {raw:?}: unsupported scheme {other:?}"
            )));
        }
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{what} {raw:?} must not carry a query, fragment or credentials"
        )));
    }
    Ok(())
}
