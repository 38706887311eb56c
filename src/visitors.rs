//! Visitors: callers without a client token or signed token, known by their
//! address ([`ClientAddr`], believed from a forwarding header only behind
//! `server.trusted_proxies`) cut to `visitors.ipv4_prefix` /
//! `visitors.ipv6_prefix` bits, so one IPv6 host cannot rotate through its
//! /64. Each visitor is a [`KeyedPayer`] like a token subject: its own rate
//! limit and daily budget, drawn on together with the global budget.
//!
//! A visitor's ledger and Redis name is `visitor:<32 hex digits of
//! SHA-256(prefix)>`; its prefix is shown only in the access log (as the
//! caller's address) and in `/stats`'s top spenders, never in a metric label.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    caller::ClientAddr,
    clock::SharedClock,
    config::VisitorsConfig,
    digest,
    metrics::{Metrics, Scope},
    payers::{KeyedPayer, KeyedPayers, Limits, Spender},
    redis_conn::RedisConn,
    spend::SpendHistory,
};

/// Bytes of SHA-256(prefix) that name a visitor (32 hex digits).
const VISITOR_HASH_BYTES: usize = 16;

/// The configured visitor limits and the visitors seen lately.
pub struct Visitors {
    allow: bool,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    /// None when every limit is 0: visitors then share only the global limits.
    payers: Option<KeyedPayers<IpNet>>,
}

impl Visitors {
    /// Visitors per (validated) configuration.
    pub fn new(
        config: &VisitorsConfig,
        metrics: &Metrics,
        clock: &SharedClock,
        redis: Option<&Arc<RedisConn>>,
        spend: &SpendHistory,
    ) -> Self {
        let limits = Limits {
            rate_per_minute: config.rate_per_minute,
            burst: config.burst,
            daily_budget: config.daily_budget,
        };
        let limited = limits.rate_per_minute > 0 || limits.daily_budget > 0;
        Self {
            allow: config.allow,
            ipv4_prefix: config.ipv4_prefix,
            ipv6_prefix: config.ipv6_prefix,
            payers: limited.then(|| {
                KeyedPayers::new(
                    limits,
                    config.max_tracked,
                    Scope::Visitor,
                    metrics.visitors(),
                    Arc::clone(spend.visitors()),
                    clock,
                    redis,
                )
            }),
        }
    }

    /// True when callers without a token are let in although `[[clients]]` are configured.
    pub fn allowed_beside_clients(&self) -> bool {
        self.allow
    }

    /// The visitor calling from `addr` (the current request's caller when
    /// known), or none when visitors have no limits of their own.
    pub fn visitor(&self, addr: Option<ClientAddr>) -> Option<Arc<KeyedPayer>> {
        let payers = self.payers.as_ref()?;
        // Outside a request there is no caller; all such share one visitor.
        let ip = addr.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let net = self.prefix(ip);
        Some(payers.get(&net, || {
            let hash = digest::sha256(net.to_string().as_bytes());
            let name = format!("visitor:{}", digest::hex(&hash[..VISITOR_HASH_BYTES]));
            (name, net.to_string())
        }))
    }

    /// The held state of the visitor calling from `ip`, if any (not counted as a sighting).
    pub fn peek(&self, ip: IpAddr) -> Option<Arc<KeyedPayer>> {
        self.payers.as_ref()?.peek(&self.prefix(ip))
    }

    /// Visitors this replica holds state for (at most `visitors.max_tracked`).
    pub fn tracked(&self) -> usize {
        self.payers.as_ref().map_or(0, KeyedPayers::len)
    }

    /// Today's top spenders among visitors held by this replica, labelled by prefix.
    pub fn top_spenders(&self, n: usize) -> Vec<Spender> {
        self.payers
            .as_ref()
            .map_or_else(Vec::new, |p| p.top_spenders(n))
    }

    /// `ip` cut to the configured prefix length of its family.
    pub fn prefix(&self, ip: IpAddr) -> IpNet {
        prefix(ip, self.ipv4_prefix, self.ipv6_prefix)
    }
}

/// `ip` (IPv4-mapped IPv6 taken as IPv4) cut to its first `v4` or `v6` bits.
pub fn prefix(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    match ip.to_canonical() {
        // The lengths are clamped, so `new` cannot fail; the whole address is the fallback.
        IpAddr::V4(ip) => IpNet::V4(
            Ipv4Net::new(ip, v4.min(32)).map_or_else(|_| Ipv4Net::from(ip), |n| n.trunc()),
        ),
        IpAddr::V6(ip) => IpNet::V6(
            Ipv6Net::new(ip, v6.min(128)).map_or_else(|_| Ipv6Net::from(ip), |n| n.trunc()),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_cut_to_their_family_prefix() {
        let cut = |ip: &str| prefix(ip.parse().unwrap(), 24, 64).to_string();
        assert_eq!(cut("203.0.113.9"), "203.0.113.0/24");
        assert_eq!(cut("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(cut("2001:db8:1:2:ffff:1:2:3"), "2001:db8:1:2::/64");
        assert_ne!(cut("2001:db8:1:3::1"), cut("2001:db8:1:2::1"));
        assert_eq!(
            cut("::ffff:203.0.113.9"),
            "203.0.113.0/24",
            "mapped is IPv4"
        );
        assert_eq!(
            prefix("203.0.113.9".parse().unwrap(), 32, 64).to_string(),
            "203.0.113.9/32"
        );
    }
}
