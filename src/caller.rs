//! Who is calling, by address: the TCP peer, or, only when the peer is one of
//! `server.trusted_proxies`, the address a trusted proxy reports in
//! `X-Forwarded-For` or `Forwarded: for=` (RFC 7239), whichever
//! `server.client_addr_header` names.
//!
//! Each proxy appends the address of the peer it accepted, so the header is
//! read from the right: addresses of trusted proxies are skipped, and the first
//! one that is not trusted is the caller. Everything left of it was written by
//! the caller itself and is never believed, so a script cannot get a fresh
//! identity by sending a new header. An entry that is no address (`unknown`,
//! an obfuscated `_hidden`, garbage) ends the walk: the caller is then the
//! trusted hop that reported it. From any other peer the headers are ignored.
//!
//! Only one header is read (the other is ignored): a proxy that writes one
//! usually passes the other through from the client untouched, and reading it
//! would believe the client. Work is bounded: at most [`MAX_ENTRIES`] entries,
//! from the last [`MAX_SCANNED_BYTES`] bytes of each header line.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use axum::http::{HeaderMap, HeaderName, header::FORWARDED};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Entries of a forwarding header looked at, from the right: more proxies
/// than this in front of us is a misconfiguration, not a deployment.
pub const MAX_ENTRIES: usize = 32;
/// Bytes of each header line looked at, from its end (the entries we may
/// believe are the last ones; a partial first entry is dropped).
pub const MAX_SCANNED_BYTES: usize = 2048;
/// Longest entry that can be an address (`"[v6]:port"` with quotes is 55 bytes).
const MAX_NODE_BYTES: usize = 64;

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The caller of one request: the address it is known by, and the TCP peer
/// it came from (the same unless a trusted proxy reported the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    ip: IpAddr,
    peer: IpAddr,
}

impl ClientAddr {
    /// A caller connected directly from `peer` (no proxy believed).
    pub fn direct(peer: IpAddr) -> Self {
        let peer = peer.to_canonical();
        Self { ip: peer, peer }
    }

    /// The caller's address: what limits and logs key on.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The TCP peer's address (a trusted proxy's, when one reported the caller).
    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    /// True when a trusted proxy reported the caller (it differs from the peer).
    pub fn is_forwarded(&self) -> bool {
        self.ip != self.peer
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ip.fmt(f)
    }
}

/// Which header a trusted proxy reports the caller in (`server.client_addr_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: <client>, <proxy1>, <proxy2>` (nginx `$proxy_add_x_forwarded_for`).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded: for=<client>, for=<proxy1>` (RFC 7239).
    #[serde(rename = "forwarded")]
    Forwarded,
}

impl ForwardedHeader {
    /// The header's name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
        }
    }

    fn name(self) -> HeaderName {
        match self {
            Self::XForwardedFor => X_FORWARDED_FOR,
            Self::Forwarded => FORWARDED,
        }
    }
}

/// A network whose addresses are trusted proxies: a CIDR such as
/// `10.0.0.0/8` or `2001:db8::/32`, or one address (`192.0.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustedNet(IpNet);

/// Why a `server.trusted_proxies` entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither a CIDR (like \"10.0.0.0/8\" or \"2001:db8::/32\") nor an address")]
pub struct BadCidr(String);

impl FromStr for TrustedNet {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Self, BadCidr> {
        let text = text.trim();
        IpNet::from_str(text)
            .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
            // `10.1.2.3/8` means 10.0.0.0/8: the host bits are dropped.
            .map(|net| Self(net.trunc()))
            .map_err(|_| BadCidr(text.to_owned()))
    }
}

impl TryFrom<String> for TrustedNet {
    type Error = BadCidr;

    fn try_from(text: String) -> Result<Self, BadCidr> {
        text.parse()
    }
}

impl From<TrustedNet> for String {
    fn from(net: TrustedNet) -> Self {
        net.0.to_string()
    }
}

/// Resolves each request's [`ClientAddr`] from its peer and headers.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    trusted: Vec<IpNet>,
    header: ForwardedHeader,
}

impl Resolver {
    /// Believes `header` from peers in `trusted` (empty: from nobody).
    pub fn new(trusted: &[TrustedNet], header: ForwardedHeader) -> Self {
        Self {
            trusted: trusted.iter().map(|net| net.0).collect(),
            header,
        }
    }

    /// Who is calling, for a request from `peer` with `headers`. With no
    /// trusted proxy (the default) no header is even looked up.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return ClientAddr::direct(peer);
        }
        let lines = headers.get_all(self.header.name());
        let nodes = lines
            .iter()
            .rev()
            .flat_map(|line| entries(line.as_bytes()))
            .take(MAX_ENTRIES)
            .map(|entry| match self.header {
                ForwardedHeader::XForwardedFor => parse_node(entry),
                ForwardedHeader::Forwarded => forwarded_for(entry).and_then(parse_node),
            });
        ClientAddr {
            ip: self.rightmost_untrusted(peer, nodes),
            peer,
        }
    }

    /// The first of `nodes` (right to left, after `peer`) that is not
    /// trusted; else the last trusted hop that reported something usable.
    fn rightmost_untrusted(
        &self,
        peer: IpAddr,
        nodes: impl Iterator<Item = Option<IpAddr>>,
    ) -> IpAddr {
        let mut reporter = peer;
        for node in nodes {
            let Some(ip) = node else {
                // `reporter` wrote something that is no address: it is the
                // caller as far as we can know; nothing further left is its word.
                return reporter;
            };
            if !self.is_trusted(ip) {
                return ip;
            }
            reporter = ip;
        }
        reporter
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// The comma-separated entries of one header line, right to left, trimmed,
/// from its last [`MAX_SCANNED_BYTES`] bytes only.
fn entries(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    let start = line.len().saturating_sub(MAX_SCANNED_BYTES);
    let mut window = line.get(start..).unwrap_or_default();
    if start > 0 {
        // The window's first entry may be cut: drop it.
        let first_comma = window.iter().position(|b| *b == b',');
        window = first_comma
            .and_then(|i| window.get(i + 1..))
            .unwrap_or_default();
    }
    let empty = window.is_empty();
    window
        .rsplit(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        // An empty line has no entry (rather than one empty, unusable one).
        .filter(move |_| !empty)
}

/// The `for=` value of one `Forwarded` element (`for=…;proto=…;by=…`), its
/// quotes removed; none when the element has no `for`.
fn forwarded_for(element: &[u8]) -> Option<&[u8]> {
    element.split(|b| *b == b';').find_map(|pair| {
        let (name, value) = pair.split_at_checked(pair.iter().position(|b| *b == b'=')?)?;
        let value = value.get(1..)?.trim_ascii();
        if !name.trim_ascii().eq_ignore_ascii_case(b"for") {
            return None;
        }
        match value.strip_prefix(b"\"") {
            Some(quoted) => quoted.strip_suffix(b"\""),
            None => Some(value),
        }
    })
}

/// An address written as `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`; none for anything else
/// (`unknown`, `_obfuscated`, garbage).
fn parse_node(node: &[u8]) -> Option<IpAddr> {
    if node.len() > MAX_NODE_BYTES {
        return None;
    }
    let text = std::str::from_utf8(node).ok()?;
    if let Ok(ip) = IpAddr::from_str(text) {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = SocketAddr::from_str(text) {
        return Some(addr.ip().to_canonical());
    }
    let bracketed = text.strip_prefix('[')?.strip_suffix(']')?;
    Ipv6Addr::from_str(bracketed)
        .ok()
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn resolver(trusted: &[&str], header: ForwardedHeader) -> Resolver {
        let nets: Vec<TrustedNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        Resolver::new(&nets, header)
    }

    /// The caller of a request from `peer` with `header: value` lines.
    fn resolve(resolver: &Resolver, peer: &str, lines: &[&str]) -> IpAddr {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(resolver.header.name(), HeaderValue::from_str(line).unwrap());
        }
        resolver.resolve(ip(peer), &headers).ip()
    }

    #[test]
    fn nodes_parse_in_every_written_form() {
        for (text, expected) in [
            ("192.0.2.7", Some("192.0.2.7")),
            ("192.0.2.7:4711", Some("192.0.2.7")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:4711", Some("2001:db8::1")),
            ("::ffff:192.0.2.7", Some("192.0.2.7")),
            ("unknown", None),
            ("_hidden", None),
            ("", None),
            ("192.0.2.256", None),
            ("[192.0.2.7]", None),
        ] {
            let parsed = parse_node(text.as_bytes());
            assert_eq!(parsed, expected.map(ip), "{text}");
        }
        assert_eq!(parse_node("1".repeat(MAX_NODE_BYTES + 1).as_bytes()), None);
    }

    #[test]
    fn forwarded_elements_give_their_for_value() {
        for (element, expected) in [
            (
                "for=192.0.2.60;proto=http;by=203.0.113.43",
                Some("192.0.2.60"),
            ),
            (
                "proto=https; FOR = \"[2001:db8:cafe::17]:4711\"",
                Some("[2001:db8:cafe::17]:4711"),
            ),
            ("for=unknown", Some("unknown")),
            ("by=203.0.113.43", None),
            ("for=\"192.0.2.60", None),
            ("for", None),
        ] {
            let value = forwarded_for(element.as_bytes());
            assert_eq!(value, expected.map(str::as_bytes), "{element}");
        }
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let none = resolver(&[], ForwardedHeader::XForwardedFor);
        assert_eq!(
            resolve(&none, "198.51.100.1", &["203.0.113.9"]),
            ip("198.51.100.1")
        );
        let some = resolver(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        assert_eq!(
            resolve(&some, "198.51.100.1", &["203.0.113.9"]),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_caller() {
        let xff = resolver(
            &["127.0.0.0/8", "10.0.0.0/8"],
            ForwardedHeader::XForwardedFor,
        );
        // Two proxies: 10.0.0.2 reported the caller, the peer reported 10.0.0.2.
        let two_hops = ["203.0.113.9, 10.0.0.2"];
        assert_eq!(resolve(&xff, "127.0.0.1", &two_hops), ip("203.0.113.9"));
        // What the caller wrote itself, left of its own address, is not believed.
        let spoofed = ["1.1.1.1, 203.0.113.9, 10.0.0.2"];
        assert_eq!(resolve(&xff, "127.0.0.1", &spoofed), ip("203.0.113.9"));
        // Header lines join in order: the last line's last entry is the nearest.
        let lines = ["1.1.1.1", "203.0.113.9 ,10.0.0.2"];
        assert_eq!(resolve(&xff, "127.0.0.1", &lines), ip("203.0.113.9"));
        // Every entry trusted: the farthest trusted hop.
        assert_eq!(
            resolve(&xff, "127.0.0.1", &["10.0.0.3, 10.0.0.2"]),
            ip("10.0.0.3")
        );
        // No header, or an empty one: the peer.
        assert_eq!(resolve(&xff, "127.0.0.1", &[]), ip("127.0.0.1"));
        assert_eq!(resolve(&xff, "127.0.0.1", &[""]), ip("127.0.0.1"));
        // A hop that reports no address is the caller; nothing left of it counts.
        let unknown = ["203.0.113.9, unknown, 10.0.0.2"];
        assert_eq!(resolve(&xff, "127.0.0.1", &unknown), ip("10.0.0.2"));
        assert_eq!(resolve(&xff, "127.0.0.1", &["garbage"]), ip("127.0.0.1"));
        // IPv4-mapped IPv6 peers are their IPv4 address.
        assert_eq!(
            resolve(&xff, "::ffff:10.1.1.1", &["203.0.113.9"]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn forwarded_is_read_by_the_same_rule() {
        let fwd = resolver(&["127.0.0.0/8", "10.0.0.0/8"], ForwardedHeader::Forwarded);
        let v6 = ["for=1.1.1.1, for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.2"];
        assert_eq!(resolve(&fwd, "127.0.0.1", &v6), ip("2001:db8::1"));
        let obfuscated = ["for=203.0.113.9, for=_hidden, for=10.0.0.2;by=_lb"];
        assert_eq!(resolve(&fwd, "127.0.0.1", &obfuscated), ip("10.0.0.2"));
        let no_for = ["for=203.0.113.9, by=10.0.0.9"];
        assert_eq!(resolve(&fwd, "127.0.0.1", &no_for), ip("127.0.0.1"));
        // Only the configured header is read.
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        assert_eq!(fwd.resolve(ip("127.0.0.1"), &headers).ip(), ip("127.0.0.1"));
    }

    #[test]
    fn work_is_bounded() {
        let xff = resolver(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        // More trusted entries than are looked at: the walk ends at the bound.
        let hops: Vec<String> = (0..MAX_ENTRIES + 5)
            .map(|i| format!("10.0.0.{i}"))
            .collect();
        let line = format!("203.0.113.9, {}", hops.join(", "));
        let caller = resolve(&xff, "10.9.9.9", &[&line]);
        assert_eq!(
            caller,
            ip(&format!("10.0.0.{}", 5)),
            "the {MAX_ENTRIES}th entry from the right"
        );
        // A long line is read from its end; the cut entry is dropped, not misread.
        let long = format!("{}, 203.0.113.9", "9".repeat(MAX_SCANNED_BYTES * 2));
        assert_eq!(resolve(&xff, "10.9.9.9", &[&long]), ip("203.0.113.9"));
        // The window starts inside "203.0.113.9": its "3.0.113.9" is not believed.
        let cut = format!("203.0.113.9,{}10.0.0.2", " ".repeat(MAX_SCANNED_BYTES - 18));
        assert_eq!(resolve(&xff, "10.9.9.9", &[&cut]), ip("10.0.0.2"));
    }

    #[test]
    fn trusted_nets_parse_cidrs_and_addresses() {
        let net = |t: &str| t.parse::<TrustedNet>().map(String::from);
        assert_eq!(net("10.0.0.0/8"), Ok("10.0.0.0/8".into()));
        assert_eq!(net("10.1.2.3/8"), Ok("10.0.0.0/8".into()));
        assert_eq!(net("192.0.2.7"), Ok("192.0.2.7/32".into()));
        assert_eq!(net("2001:db8::/32"), Ok("2001:db8::/32".into()));
        for bad in ["10.0.0.0/33", "localhost", "", "10.0.0.0/8/8"] {
            assert_eq!(net(bad), Err(BadCidr(bad.into())));
        }
    }
}
