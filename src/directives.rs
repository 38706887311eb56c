//! A client's freshness directives (RFC 9111 §5.2.1): the request's
//! `Cache-Control` read once into [`Directives`], and the rule saying whether
//! a kept copy meets them ([`Directives::accepts`]). What the proxy then does
//! — serve the copy, call KeyAPI, or answer 504 — is decided in
//! [`crate::proxy`], always within the proxy's own policy: a directive can
//! make the proxy refuse a copy, never serve one its windows do not keep nor
//! spend where its refresh permission says no.
//!
//! The parser is bounded and forgiving, as a recipient should be: names are
//! case-insensitive; values may be tokens or quoted strings (a comma inside
//! quotes does not split); unknown directives and malformed values are
//! ignored; a repeated directive keeps its most restrictive value; and at most
//! [`MAX_READ`] bytes of the header (all its lines together) are read, a
//! directive cut by that cap being dropped rather than misread.

use std::time::Duration;

use axum::http::{HeaderMap, header::CACHE_CONTROL};

use crate::cache::Freshness;

/// Bytes of `Cache-Control` read per request, all its lines together: real
/// clients send a few dozen; the rest is not looked at.
pub const MAX_READ: usize = 1024;

/// delta-seconds beyond this are read as this (RFC 9111 §1.2.2: 2^31).
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// The request directives the proxy honours; everything else is ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    /// `no-cache`: a new answer is wanted (honoured only for a client that
    /// may refresh: it spends credits on a key whose copy is fresh).
    pub no_cache: bool,
    /// `only-if-cached`: answer from a kept copy, else 504; never call.
    pub only_if_cached: bool,
    /// `max-age=N`: no copy older than N.
    pub max_age: Option<Duration>,
    /// `max-stale[=N]`: stale copies up to N past their freshness will do
    /// (`Duration::MAX` when bare), within the proxy's stale windows.
    pub max_stale: Option<Duration>,
    /// `min-fresh=N`: only a copy that stays fresh for N more.
    pub min_fresh: Option<Duration>,
}

/// What one request asks of the cache: its directives, and whether it may
/// make the proxy call for a key whose copy is still fresh (its client's
/// refresh permission, or `cache.allow_client_refresh`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask {
    pub directives: Directives,
    pub may_refresh: bool,
}

impl Ask {
    /// `no-cache`, honoured: skip the cache and fetch a new answer.
    pub fn refresh(&self) -> bool {
        self.may_refresh && self.directives.no_cache
    }
}

impl Directives {
    /// The directives of a request with these `headers`: one lookup, and
    /// nothing more when the request has no `Cache-Control`.
    pub fn of(headers: &HeaderMap) -> Self {
        let mut directives = Self::default();
        let mut budget = MAX_READ;
        for value in headers.get_all(CACHE_CONTROL) {
            let bytes = value.as_bytes();
            let cut = bytes.len() > budget;
            let (read, _) = bytes.split_at(bytes.len().min(budget));
            budget -= read.len();
            for (member, ended) in Members(Some(read)) {
                // The last member of a cut line may be cut too (`max-age=1|00`).
                if ended || !cut {
                    directives.apply(member);
                }
            }
            if budget == 0 {
                break;
            }
        }
        directives
    }

    /// Reads one list member (`name` or `name=value`) into these directives.
    fn apply(&mut self, member: &[u8]) {
        let (name, value) = match member.iter().position(|b| *b == b'=') {
            Some(eq) => {
                let (name, value) = member.split_at(eq);
                (trim(name), Some(trim(value.get(1..).unwrap_or_default())))
            }
            None => (trim(member), None),
        };
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        if is("no-cache") {
            self.no_cache = true;
        } else if is("only-if-cached") {
            self.only_if_cached = true;
        } else if is("max-age") {
            if let Some(n) = value.and_then(delta_seconds) {
                self.max_age = Some(self.max_age.map_or(n, |m| m.min(n)));
            }
        } else if is("max-stale") {
            // A malformed value widens nothing: the directive is ignored.
            let n = match value {
                None => Some(Duration::MAX),
                Some(value) => delta_seconds(value),
            };
            if let Some(n) = n {
                self.max_stale = Some(self.max_stale.map_or(n, |m| m.min(n)));
            }
        } else if is("min-fresh")
            && let Some(n) = value.and_then(delta_seconds)
        {
            self.min_fresh = Some(self.min_fresh.map_or(n, |m| m.max(n)));
        }
    }

    /// Whether a copy whose fresh lifetime is `ttl`, now at `freshness`,
    /// meets these bounds: no older than `max-age`; if fresh, fresh for at
    /// least `min-fresh` more; if stale, no staler than `max-stale` — and,
    /// without `max-stale`, not for a request with a non-zero `min-fresh`
    /// (a stale copy has no freshness left). The proxy's own windows (what
    /// it keeps, what it serves without a call) are its caller's to apply.
    pub fn accepts(&self, ttl: Duration, freshness: Freshness) -> bool {
        let (age, fits) = match freshness {
            Freshness::Fresh { remaining } => (
                ttl.saturating_sub(remaining),
                self.min_fresh.is_none_or(|min| remaining >= min),
            ),
            Freshness::StaleWhileRevalidate { past } | Freshness::StaleIfError { past } => {
                let fits = match self.max_stale {
                    Some(max) => past <= max,
                    None => self.min_fresh.is_none_or(|min| min.is_zero()),
                };
                (ttl.saturating_add(past), fits)
            }
            Freshness::Expired => return false,
        };
        fits && self.max_age.is_none_or(|max| age <= max)
    }

    /// Whether a stale copy past stale-while-revalidate (kept only for
    /// stale-if-error) may answer without a call: the client said it takes
    /// stale copies (`max-stale`) or wants no call at all (`only-if-cached`).
    pub fn takes_stale_if_error_copies(&self) -> bool {
        self.only_if_cached || self.max_stale.is_some()
    }
}

/// The members of a comma-separated list (RFC 9110 §5.6.1), each with
/// whether a comma ended it; commas inside quoted strings (with `\` escapes)
/// do not split.
struct Members<'a>(Option<&'a [u8]>);

impl<'a> Iterator for Members<'a> {
    type Item = (&'a [u8], bool);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.0?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, byte) in rest.iter().enumerate() {
            match byte {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' if !quoted => {
                    let (member, tail) = rest.split_at(i);
                    self.0 = tail.get(1..);
                    return Some((member, true));
                }
                _ => {}
            }
        }
        self.0 = None;
        Some((rest, false))
    }
}

/// `bytes` without leading and trailing spaces and tabs (OWS).
fn trim(bytes: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// A delta-seconds value, as a token or a quoted string (`"60"`); only
/// digits, capped at 2^31 s. `None` if malformed.
fn delta_seconds(value: &[u8]) -> Option<Duration> {
    let digits = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10)
            .saturating_add(u64::from(d - b'0'))
            .min(MAX_DELTA_SECONDS)
    });
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn parse(lines: &[&str]) -> Directives {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(CACHE_CONTROL, HeaderValue::from_str(line).unwrap());
        }
        Directives::of(&headers)
    }

    const fn secs(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n))
    }

    #[test]
    fn no_header_is_no_directive() {
        assert_eq!(Directives::of(&HeaderMap::new()), Directives::default());
    }

    #[test]
    fn reads_every_known_directive() {
        let d = parse(&["no-cache, only-if-cached, max-age=60, max-stale=30, min-fresh=5"]);
        let expected = Directives {
            no_cache: true,
            only_if_cached: true,
            max_age: secs(60),
            max_stale: secs(30),
            min_fresh: secs(5),
        };
        assert_eq!(d, expected);
    }

    #[test]
    fn names_are_case_insensitive_and_whitespace_is_optional() {
        let d = parse(&["  ONLY-IF-CACHED ,Max-Age = 10\t,\tMAX-STALE"]);
        assert!(d.only_if_cached);
        assert_eq!(d.max_age, secs(10));
        assert_eq!(
            d.max_stale,
            Some(Duration::MAX),
            "bare max-stale: any staleness"
        );
    }

    #[test]
    fn several_lines_are_one_list() {
        let d = parse(&["max-age=10", "only-if-cached"]);
        assert!(d.only_if_cached);
        assert_eq!(d.max_age, secs(10));
    }

    #[test]
    fn quoted_values_are_read_and_quoted_commas_do_not_split() {
        let d = parse(&[r#"max-age="20", x-ext="a, only-if-cached, \"b", min-fresh="7""#]);
        assert_eq!(d.max_age, secs(20));
        assert_eq!(d.min_fresh, secs(7));
        assert!(!d.only_if_cached, "inside a quoted string, not a directive");
    }

    #[test]
    fn unknown_directives_and_malformed_values_are_ignored() {
        let d = parse(&[
            "private, foo=bar, max-age=abc, max-age=-1, max-age=1.5, max-age, max-stale=x, min-fresh=, ,,",
        ]);
        assert_eq!(d, Directives::default());
    }

    #[test]
    fn repeated_directives_keep_the_most_restrictive_value() {
        let d =
            parse(&["max-age=60, max-age=5, max-stale, max-stale=30, min-fresh=1, min-fresh=9"]);
        assert_eq!(d.max_age, secs(5));
        assert_eq!(d.max_stale, secs(30));
        assert_eq!(d.min_fresh, secs(9));
    }

    #[test]
    fn huge_numbers_saturate_at_2_pow_31() {
        let d = parse(&["max-age=99999999999999999999999999999999"]);
        assert_eq!(d.max_age, secs(1 << 31));
    }

    #[test]
    fn reads_at_most_max_read_bytes_and_drops_a_cut_directive() {
        // The cap falls inside `max-age=100`: read whole it would be 1 s.
        let padding = format!("x-pad=\"{}\", ", "y".repeat(MAX_READ - 20));
        let line = format!("{padding}max-age=100");
        assert!(line.len() > MAX_READ && padding.len() < MAX_READ - 3);
        assert_eq!(parse(&[&line]).max_age, None);
        // A later line beyond the cap is not read at all.
        let d = parse(&[&"x".repeat(MAX_READ), "only-if-cached"]);
        assert!(!d.only_if_cached);
        // Within the cap, everything is read.
        let d = parse(&[&format!("{}, only-if-cached", "x".repeat(MAX_READ - 20))]);
        assert!(d.only_if_cached);
    }

    #[test]
    fn non_ascii_bytes_do_not_stop_the_parse() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"x=\xff\xfe, only-if-cached").unwrap();
        headers.insert(CACHE_CONTROL, value);
        assert!(Directives::of(&headers).only_if_cached);
    }

    const TTL: Duration = Duration::from_secs(100);

    fn fresh(remaining: u64) -> Freshness {
        Freshness::Fresh {
            remaining: Duration::from_secs(remaining),
        }
    }

    fn stale(past: u64) -> Freshness {
        Freshness::StaleIfError {
            past: Duration::from_secs(past),
        }
    }

    #[test]
    fn no_directive_accepts_any_kept_copy() {
        let d = Directives::default();
        assert!(d.accepts(TTL, fresh(1)));
        assert!(d.accepts(TTL, stale(10_000)));
        assert!(!d.accepts(TTL, Freshness::Expired));
    }

    #[test]
    fn max_age_bounds_the_age_fresh_or_stale() {
        let d = parse(&["max-age=30"]);
        assert!(d.accepts(TTL, fresh(70)), "age 30");
        assert!(!d.accepts(TTL, fresh(69)), "age 31");
        assert!(!d.accepts(TTL, stale(1)));
        let d = parse(&["max-age=0"]);
        assert!(d.accepts(TTL, fresh(100)), "stored this instant");
        assert!(!d.accepts(TTL, fresh(99)));
        let d = parse(&["max-age=500"]);
        assert!(
            d.accepts(TTL, stale(400)),
            "age 500: max-age alone bounds the age only"
        );
    }

    #[test]
    fn min_fresh_wants_freshness_left() {
        let d = parse(&["min-fresh=10"]);
        assert!(d.accepts(TTL, fresh(10)));
        assert!(!d.accepts(TTL, fresh(9)));
        assert!(!d.accepts(TTL, stale(0)), "a stale copy has none left");
        assert!(parse(&["min-fresh=10, max-stale=5"]).accepts(TTL, stale(5)));
    }

    #[test]
    fn max_stale_bounds_the_staleness() {
        let d = parse(&["max-stale=60"]);
        assert!(d.accepts(TTL, stale(60)));
        assert!(!d.accepts(TTL, stale(61)));
        assert!(d.accepts(TTL, fresh(1)));
        assert!(parse(&["max-stale"]).accepts(TTL, stale(u64::from(u32::MAX))));
        assert!(!parse(&["max-stale, max-age=120"]).accepts(TTL, stale(21)));
    }

    #[test]
    fn only_max_stale_and_only_if_cached_take_stale_if_error_copies() {
        assert!(!Directives::default().takes_stale_if_error_copies());
        assert!(!parse(&["max-age=60, min-fresh=1"]).takes_stale_if_error_copies());
        assert!(parse(&["max-stale=1"]).takes_stale_if_error_copies());
        assert!(parse(&["only-if-cached"]).takes_stale_if_error_copies());
    }

    #[test]
    fn no_cache_is_a_refresh_only_with_permission() {
        let directives = parse(&["no-cache"]);
        let denied = Ask {
            directives,
            may_refresh: false,
        };
        assert!(!denied.refresh());
        let allowed = Ask {
            directives,
            may_refresh: true,
        };
        assert!(allowed.refresh());
        let permitted_without = Ask {
            may_refresh: true,
            ..Ask::default()
        };
        assert!(!permitted_without.refresh());
    }
}
