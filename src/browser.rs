//! Browser safety: a web page the operator visits must not make the proxy
//! spend. Two checks, both before any route runs:
//!
//! - **Host** (`server.allowed_hosts`), against DNS rebinding: a page on
//!   `evil.example` can rebind its name to 127.0.0.1 and then call the proxy
//!   as "same-origin", but its requests still say `Host: evil.example`. On a
//!   loopback listen address only loopback names are answered by default;
//!   other hosts get 421 Misdirected Request. `/healthz` and `/readyz` answer
//!   whatever the `Host`: they spend nothing and tell only "up", and probes
//!   (a kubelet's `Host` is the pod's address) must not fail because of it.
//!   A request without any `Host` (HTTP/1.0, some scripts) is let through:
//!   every browser sends one, so it cannot be a page's.
//! - **`Sec-Fetch-Site: cross-site`** on a proxied route, which browsers send
//!   for requests a page on another site makes (fetch, `<img>`, forms): with
//!   CORS off it is refused (403); with CORS on, a cross-site request must be
//!   a CORS request (with `Origin`, which the CORS layer checks against
//!   `cors.allowed_origins`). `same-origin`, `same-site`, `none` (typed in
//!   the address bar) and no header at all (not a browser) pass.
//!
//! Per request: one header lookup and a few byte comparisons against names
//! lower-cased at start-up; none at all when any host is allowed.

use std::{fmt, net::SocketAddr, str::FromStr};

use axum::http::{
    HeaderMap, HeaderName, Uri,
    header::{HOST, ORIGIN},
};
use serde::{Deserialize, Serialize};

/// `Sec-Fetch-Site`, sent by browsers with every request.
pub const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The probes, `/healthz` and `/readyz`: answered whatever the `Host`.
pub const PROBE_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// The hosts a loopback listener answers by default (any port).
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// One `server.allowed_hosts` entry: `*` (any host), a DNS name, an IPv4
/// address or a bracketed IPv6 address, without a port (any port matches).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AllowedHost(String);

/// Why a `server.allowed_hosts` entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a host like \"proxy.example.com\", \"192.0.2.7\" or \"[2001:db8::1]\" (no port: any port matches), nor \"*\""
)]
pub struct BadHost(String);

impl AllowedHost {
    /// `*`: every host is allowed.
    fn is_any(&self) -> bool {
        self.0 == "*"
    }
}

impl FromStr for AllowedHost {
    type Err = BadHost;

    fn from_str(text: &str) -> Result<Self, BadHost> {
        let host = text.trim().to_ascii_lowercase();
        let name = |h: &str| {
            h.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        };
        let v6 = |h: &str| {
            h.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        };
        let ok = host == "*" || (host.len() <= 253 && name(&host)) || v6(&host);
        if ok {
            Ok(Self(host))
        } else {
            Err(BadHost(text.to_owned()))
        }
    }
}

impl TryFrom<String> for AllowedHost {
    type Error = BadHost;

    fn try_from(text: String) -> Result<Self, BadHost> {
        text.parse()
    }
}

impl From<AllowedHost> for String {
    fn from(host: AllowedHost) -> Self {
        host.0
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a request is refused before any route runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "This proxy does not answer for this Host; call it by a name in its server.allowed_hosts."
    )]
    MisdirectedHost,
    #[error(
        "Cross-site browser requests may not use this proxy's routes; list the page's origin in cors.allowed_origins."
    )]
    CrossSite,
}

impl Refusal {
    /// The `reason` log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MisdirectedHost => "misdirected_host",
            Self::CrossSite => "cross_site",
        }
    }
}

/// What a request asks for, as far as browser safety cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A configured KeyAPI route: may spend.
    Proxied,
    /// One of [`PROBE_PATHS`]: answered whatever the `Host`.
    Probe,
    /// Anything else (operational endpoints, 404s).
    Other,
}

/// The two checks, set up once from `[server]` and `[cors]`.
#[derive(Debug, Clone)]
pub struct BrowserGuard {
    /// Lower-case hosts allowed; `None`: any.
    hosts: Option<Box<[Box<[u8]>]>>,
    /// The CORS layer is on (`cors.allowed_origins` not empty).
    cors: bool,
}

impl BrowserGuard {
    /// `allowed` as configured (`None`: the default for `listen`), with CORS on or off.
    pub fn new(allowed: Option<&[AllowedHost]>, listen: SocketAddr, cors: bool) -> Self {
        let hosts = match allowed {
            Some(list) if list.iter().any(AllowedHost::is_any) => None,
            Some(list) => Some(list.iter().map(|h| h.0.as_bytes().into()).collect()),
            None if listen.ip().is_loopback() => {
                let own = match listen {
                    SocketAddr::V4(a) => a.ip().to_string(),
                    SocketAddr::V6(a) => format!("[{}]", a.ip()),
                };
                let mut hosts: Vec<Box<[u8]>> =
                    LOOPBACK_HOSTS.iter().map(|h| h.as_bytes().into()).collect();
                // Listening on another loopback address (127.0.0.2): its own too.
                if !LOOPBACK_HOSTS.contains(&own.as_str()) {
                    hosts.push(own.into_bytes().into());
                }
                Some(hosts.into())
            }
            None => None,
        };
        Self { hosts, cors }
    }

    /// Whether a request for `target` with `uri` and `headers` may go on.
    pub fn check(&self, target: Target, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        if target != Target::Probe && !self.allows_host(uri, headers) {
            return Err(Refusal::MisdirectedHost);
        }
        if target == Target::Proxied && self.is_refused_cross_site(headers) {
            return Err(Refusal::CrossSite);
        }
        Ok(())
    }

    /// The request's host (the URI's authority, as HTTP/2 `:authority` and
    /// absolute-form requests give it, else `Host`) is allowed, or absent.
    fn allows_host(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        let Some(hosts) = &self.hosts else {
            return true;
        };
        let host = match uri.authority() {
            Some(authority) => authority.host().as_bytes(),
            None => match headers.get(HOST) {
                Some(value) => without_port(value.as_bytes()),
                None => return true,
            },
        };
        hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// A browser's cross-site request that CORS does not decide on.
    fn is_refused_cross_site(&self, headers: &HeaderMap) -> bool {
        let cross_site = headers
            .get(SEC_FETCH_SITE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        cross_site && !(self.cors && headers.contains_key(ORIGIN))
    }
}

/// `host[:port]` or `[v6][:port]` without the port.
fn without_port(host: &[u8]) -> &[u8] {
    let end = if host.first() == Some(&b'[') {
        host.iter()
            .position(|b| *b == b']')
            .map_or(host.len(), |i| i + 1)
    } else {
        host.iter().position(|b| *b == b':').unwrap_or(host.len())
    };
    host.get(..end).unwrap_or(host)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn hosts(list: &[&str]) -> Vec<AllowedHost> {
        list.iter().map(|h| h.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    /// The check of a request for `target` with `Host: host` (none when empty).
    fn with_host(guard: &BrowserGuard, target: Target, host: &str) -> Result<(), Refusal> {
        let map = if host.is_empty() {
            HeaderMap::new()
        } else {
            headers(&[(HOST, host)])
        };
        guard.check(target, &Uri::from_static("/x?y=1"), &map)
    }

    #[test]
    fn loopback_listeners_answer_loopback_names_on_any_port() {
        let guard = BrowserGuard::new(None, "127.0.0.1:8080".parse().unwrap(), false);
        for ok in [
            "localhost",
            "LOCALHOST:9",
            "127.0.0.1:8080",
            "[::1]:8080",
            "[::1]",
            "",
        ] {
            assert_eq!(with_host(&guard, Target::Proxied, ok), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.2:8080",
            "localhost.",
            "localhostx",
        ] {
            let refused = Err(Refusal::MisdirectedHost);
            assert_eq!(with_host(&guard, Target::Proxied, bad), refused, "{bad}");
            assert_eq!(with_host(&guard, Target::Other, bad), refused, "{bad}");
            assert_eq!(with_host(&guard, Target::Probe, bad), Ok(()), "{bad}");
        }
        let other = BrowserGuard::new(None, "127.0.0.2:0".parse().unwrap(), false);
        assert_eq!(with_host(&other, Target::Proxied, "127.0.0.2:80"), Ok(()));
    }

    #[test]
    fn the_authority_of_the_uri_wins_over_host() {
        let guard = BrowserGuard::new(None, "[::1]:8080".parse().unwrap(), false);
        let absolute = Uri::from_static("http://evil.example:8080/x");
        let map = headers(&[(HOST, "localhost")]);
        assert_eq!(
            guard.check(Target::Proxied, &absolute, &map),
            Err(Refusal::MisdirectedHost)
        );
        let h2 = Uri::from_static("http://[::1]:8080/x");
        assert_eq!(guard.check(Target::Proxied, &h2, &HeaderMap::new()), Ok(()));
    }

    #[test]
    fn other_listeners_and_a_star_answer_any_host_and_a_list_replaces_the_default() {
        let public = BrowserGuard::new(None, "0.0.0.0:8080".parse().unwrap(), false);
        assert_eq!(
            with_host(&public, Target::Proxied, "anything.example"),
            Ok(())
        );
        let star = hosts(&["localhost", "*"]);
        let any = BrowserGuard::new(Some(&star), "127.0.0.1:8080".parse().unwrap(), false);
        assert_eq!(with_host(&any, Target::Proxied, "anything.example"), Ok(()));
        let listed = hosts(&["Proxy.Example.com"]);
        let only = BrowserGuard::new(Some(&listed), "127.0.0.1:8080".parse().unwrap(), false);
        assert_eq!(
            with_host(&only, Target::Proxied, "proxy.example.COM:443"),
            Ok(())
        );
        let refused = Err(Refusal::MisdirectedHost);
        assert_eq!(with_host(&only, Target::Proxied, "localhost:8080"), refused);
    }

    #[test]
    fn allowed_host_entries_are_names_or_addresses_without_a_port() {
        for ok in [
            "*",
            "localhost",
            "Proxy.Example.com",
            "192.0.2.7",
            "[2001:db8::1]",
        ] {
            assert!(ok.parse::<AllowedHost>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "localhost:8080",
            "2001:db8::1",
            "[::1]:80",
            "a..b",
            "https://x",
            "*.example.com",
        ] {
            assert_eq!(
                bad.parse::<AllowedHost>(),
                Err(BadHost(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn cross_site_requests_to_proxied_routes_are_refused_unless_cors_decides() {
        let uri = Uri::from_static("/x");
        let listen = "127.0.0.1:8080".parse().unwrap();
        let (off, on) = (
            BrowserGuard::new(None, listen, false),
            BrowserGuard::new(None, listen, true),
        );
        let cross = headers(&[(SEC_FETCH_SITE, "cross-site")]);
        let cors = headers(&[
            (SEC_FETCH_SITE, "cross-site"),
            (ORIGIN, "https://app.example"),
        ]);
        assert_eq!(
            off.check(Target::Proxied, &uri, &cross),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            off.check(Target::Proxied, &uri, &cors),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            on.check(Target::Proxied, &uri, &cross),
            Err(Refusal::CrossSite)
        );
        assert_eq!(on.check(Target::Proxied, &uri, &cors), Ok(()));
        assert_eq!(off.check(Target::Other, &uri, &cross), Ok(()));
        for site in ["same-origin", "same-site", "none"] {
            let map = headers(&[(SEC_FETCH_SITE, site)]);
            assert_eq!(off.check(Target::Proxied, &uri, &map), Ok(()), "{site}");
        }
    }
}
