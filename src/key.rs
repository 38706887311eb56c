//! Parse, don't validate: the raw query of a hashtag-detail request becomes a
//! [`HashtagKey`] — or a client error — once, and nothing after this module
//! sees raw strings.
//!
//! Normalization makes equivalent questions one key: `#UFC324`, `ufc324` and
//! `UFC324&region=ALL_REGIONS` are the same question and are paid for once.
//! Unknown parameters (cache busters such as `_=123`) are ignored and never
//! forwarded.

use std::{borrow::Cow, fmt::Write as _, time::Duration};

use unicode_normalization::{IsNormalized, UnicodeNormalization as _, is_nfc_quick};

use crate::{cache::CacheKey, config::Config};

/// Path of the proxied KeyAPI route (identical on both sides).
pub const HASHTAG_DETAIL_PATH: &str = "/v1/tiktok/trending/hashtag/detail";
/// The query parameters the route reads; everything else is ignored.
pub const PARAMETERS: [&str; 3] = ["hashtag_name", "period", "region"];
/// Longest hashtag accepted, in characters, after normalization.
pub const MAX_HASHTAG_CHARS: usize = 100;
const ALL_REGIONS: &str = "all_regions";

/// A client request the route cannot answer. Messages say what is wrong and
/// what is allowed; they go to the client in the 400 envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("parameter `{0}` is given more than once; give it at most once")]
    Repeated(&'static str),
    #[error("parameter `hashtag_name` is required, e.g. hashtag_name=ufc324")]
    MissingHashtag,
    #[error(
        "parameter `hashtag_name` must be 1-{MAX_HASHTAG_CHARS} letters, digits or `_` \
         (one leading `#` allowed), got {0:?}"
    )]
    InvalidHashtag(String),
    #[error("parameter `period` must be one of {allowed}, got {got:?}")]
    InvalidPeriod { allowed: String, got: String },
    #[error(
        "parameter `region` must be `all_regions` or a 2-letter country code such as US, got {0:?}"
    )]
    InvalidRegion(String),
}

/// Where the answer's data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    /// `all_regions`: every region.
    All,
    /// An upper-case ASCII 2-letter country code.
    Code([u8; 2]),
}

impl Region {
    /// The form sent upstream: `all_regions` or e.g. `US`.
    pub fn as_str(&self) -> &str {
        match self {
            Region::All => ALL_REGIONS,
            // Always two ASCII letters by construction.
            Region::Code(c) => std::str::from_utf8(c).unwrap_or(ALL_REGIONS),
        }
    }
}

/// The route's description, taken from configuration once: which parameters
/// are allowed, their defaults, and how long answers stay fresh.
#[derive(Debug, Clone)]
pub struct HashtagRules {
    periods: Vec<u32>,
    default_period: u32,
    lowercase: bool,
    /// TTL per allowed period, resolved at start-up so a request does no lookup work.
    ttls: Vec<(u32, Duration)>,
    default_ttl: Duration,
}

impl HashtagRules {
    /// Rules from the `[hashtag]`, `[normalize]` and `[cache]` sections.
    pub fn from_config(config: &Config) -> Self {
        let ttls = config
            .hashtag
            .periods
            .iter()
            .map(|&p| {
                let ttl = config
                    .cache
                    .ttl_by_period
                    .get(&p.to_string())
                    .map_or(config.cache.ttl, |t| t.into_inner());
                (p, ttl)
            })
            .collect();
        Self {
            periods: config.hashtag.periods.clone(),
            default_period: config.hashtag.default_period,
            lowercase: config.normalize.lowercase,
            ttls,
            default_ttl: config.cache.ttl,
        }
    }

    /// Freshness lifetime of answers for `period`.
    pub fn ttl(&self, period: u32) -> Duration {
        self.ttls
            .iter()
            .find(|(p, _)| *p == period)
            .map_or(self.default_ttl, |(_, t)| *t)
    }

    /// Allowed `period` values.
    pub fn periods(&self) -> &[u32] {
        &self.periods
    }

    /// `period` when the client gives none.
    pub fn default_period(&self) -> u32 {
        self.default_period
    }

    fn allowed_periods(&self) -> String {
        let mut out = String::new();
        for (i, p) in self.periods.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(out, "{sep}{p}");
        }
        out
    }
}

/// A normalized hashtag-detail question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HashtagKey {
    pub hashtag: String,
    pub period: u32,
    pub region: Region,
}

impl HashtagKey {
    /// Normalizes a raw query string (without `?`).
    pub fn parse(raw_query: Option<&str>, rules: &HashtagRules) -> Result<Self, KeyError> {
        let mut hashtag = None;
        let mut period = None;
        let mut region = None;
        for (name, value) in form_urlencoded::parse(raw_query.unwrap_or("").as_bytes()) {
            let (slot, name) = match &*name {
                "hashtag_name" => (&mut hashtag, "hashtag_name"),
                "period" => (&mut period, "period"),
                "region" => (&mut region, "region"),
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(KeyError::Repeated(name));
            }
        }
        let hashtag = normalize_hashtag(hashtag.as_deref(), rules.lowercase)?;
        let period = match period.as_deref().map(str::trim) {
            None | Some("") => rules.default_period,
            Some(raw) => raw
                .parse::<u32>()
                .ok()
                .filter(|p| rules.periods.contains(p))
                .ok_or_else(|| KeyError::InvalidPeriod {
                    allowed: rules.allowed_periods(),
                    got: clip(raw),
                })?,
        };
        let region = match region.as_deref().map(str::trim) {
            None | Some("") => Region::All,
            Some(raw) => parse_region(raw)?,
        };
        Ok(Self {
            hashtag,
            period,
            region,
        })
    }

    /// The canonical upstream request this question maps to, used as cache key:
    /// fixed parameter order, percent-encoded.
    pub fn cache_key(&self) -> CacheKey {
        // Built in one buffer (this runs on every request, hits included).
        let mut key = String::with_capacity(HASHTAG_DETAIL_PATH.len() + 48 + self.hashtag.len());
        key.push_str(HASHTAG_DETAIL_PATH);
        key.push_str("?period=");
        key.push_str(itoa::Buffer::new().format(self.period));
        key.push_str("&region=");
        key.push_str(self.region.as_str());
        key.push_str("&hashtag_name=");
        // Letters, digits and `_` in ASCII need no encoding (the common case);
        // anything else is percent-encoded exactly as a form serializer would.
        if self
            .hashtag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            key.push_str(&self.hashtag);
        } else {
            key.extend(form_urlencoded::byte_serialize(self.hashtag.as_bytes()));
        }
        CacheKey::new(key)
    }
}

impl HashtagKey {
    /// The question a cache key of this route stands for (`None` for other routes).
    pub fn from_cache_key(key: &CacheKey) -> Option<Self> {
        let query = key
            .path_and_query()
            .strip_prefix(HASHTAG_DETAIL_PATH)?
            .strip_prefix('?')?;
        let (mut hashtag, mut period, mut region) = (None, None, None);
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "hashtag_name" => hashtag = Some(value.into_owned()),
                "period" => period = value.parse().ok(),
                "region" => region = parse_region(&value).ok(),
                _ => {}
            }
        }
        Some(Self {
            hashtag: hashtag?,
            period: period?,
            region: region?,
        })
    }
}

/// A hashtag prefix normalized like a hashtag (trimmed, one `#` dropped,
/// lower-cased when the rules say so, NFC), for matching stored keys.
pub fn normalize_prefix(raw: &str, rules: &HashtagRules) -> String {
    canonical(strip_hash(raw.trim()), rules.lowercase)
}

fn strip_hash(trimmed: &str) -> &str {
    trimmed.strip_prefix('#').unwrap_or(trimmed)
}

/// Lower-cased when the rules say so, then NFC: canonically equivalent
/// spellings (`é` as one code point or as `e` + U+0301) are one key, and so
/// are the forms lower-casing produces (`É` → `é`). Compatibility forms
/// (fullwidth `ＵＦＣ`, ligatures) are deliberately not folded: they are
/// different text that KeyAPI may answer differently.
fn canonical(name: &str, lowercase: bool) -> String {
    if lowercase {
        nfc(Cow::Owned(name.to_lowercase()))
    } else {
        nfc(Cow::Borrowed(name))
    }
}

/// `text` in Unicode Normalization Form C; no copy when it already is (ASCII always is).
fn nfc(text: Cow<'_, str>) -> String {
    if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        text.into_owned()
    } else {
        text.nfc().collect()
    }
}

fn normalize_hashtag(raw: Option<&str>, lowercase: bool) -> Result<String, KeyError> {
    let trimmed = raw.map(str::trim).unwrap_or("");
    if trimmed.is_empty() {
        return Err(KeyError::MissingHashtag);
    }
    // Composed first, so a decomposed `é` (a letter and a combining mark) validates.
    let name = nfc(Cow::Borrowed(strip_hash(trimmed)));
    let chars = name.chars().count();
    let valid = (1..=MAX_HASHTAG_CHARS).contains(&chars)
        && name.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !valid {
        return Err(KeyError::InvalidHashtag(clip(trimmed)));
    }
    Ok(canonical(&name, lowercase))
}

fn parse_region(raw: &str) -> Result<Region, KeyError> {
    if raw.eq_ignore_ascii_case(ALL_REGIONS) {
        return Ok(Region::All);
    }
    match raw.as_bytes() {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Ok(Region::Code([
            a.to_ascii_uppercase(),
            b.to_ascii_uppercase(),
        ])),
        _ => Err(KeyError::InvalidRegion(clip(raw))),
    }
}

/// Echoes at most 40 characters of a bad value back to the client.
fn clip(raw: &str) -> String {
    const MAX: usize = 40;
    match raw.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &raw[..cut]),
        None => raw.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn rules() -> HashtagRules {
        let config = Config::defaults().expect("defaults are valid");
        HashtagRules::from_config(&config)
    }

    fn key(q: &str) -> Result<String, KeyError> {
        HashtagKey::parse(Some(q), &rules()).map(|k| k.cache_key().to_string())
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
    fn bad_inputs_are_rejected() {
        let long = format!("hashtag_name={}", "a".repeat(101));
        type Check = fn(&KeyError) -> bool;
        let cases: [(&str, Check); 10] = [
            ("", |e| *e == KeyError::MissingHashtag),
            ("hashtag_name=", |e| *e == KeyError::MissingHashtag),
            ("hashtag_name=%23", |e| {
                matches!(e, KeyError::InvalidHashtag(_))
            }),
            ("hashtag_name=a-b", |e| {
                matches!(e, KeyError::InvalidHashtag(_))
            }),
            ("hashtag_name=%23%23ab", |e| {
                matches!(e, KeyError::InvalidHashtag(_))
            }),
            (&long, |e| matches!(e, KeyError::InvalidHashtag(_))),
            ("hashtag_name=a&hashtag_name=b", |e| {
                *e == KeyError::Repeated("hashtag_name")
            }),
            ("hashtag_name=a&period=8", |e| {
                matches!(e, KeyError::InvalidPeriod { .. })
            }),
            ("hashtag_name=a&region=USA", |e| {
                matches!(e, KeyError::InvalidRegion(_))
            }),
            ("hashtag_name=a&region=u1", |e| {
                matches!(e, KeyError::InvalidRegion(_))
            }),
        ];
        for (q, check) in cases {
            match key(q) {
                Err(e) => assert!(check(&e), "query {q:?} gave {e:?}"),
                Ok(k) => panic!("query {q:?} was accepted as {k}"),
            }
        }
    }

    #[test]
    fn lowercase_can_be_turned_off() {
        let rules = HashtagRules {
            lowercase: false,
            ..rules()
        };
        let k = HashtagKey::parse(Some("hashtag_name=UFC"), &rules).map(|k| k.hashtag);
        assert_eq!(k.as_deref(), Ok("UFC"));
    }

    #[test]
    fn ttl_follows_period_overrides() {
        let rules = rules();
        assert_eq!(rules.ttl(7), Duration::from_secs(3600));
        assert_eq!(rules.ttl(1095), Duration::from_secs(24 * 3600));
    }

    #[test]
    fn cache_keys_parse_back_into_questions() {
        let question =
            HashtagKey::parse(Some("hashtag_name=%C3%89t%C3%A9&region=fr"), &rules()).unwrap();
        assert_eq!(
            HashtagKey::from_cache_key(&question.cache_key()),
            Some(question)
        );
        assert_eq!(
            HashtagKey::from_cache_key(&CacheKey::new("/other?period=7".into())),
            None
        );
    }

    #[test]
    fn exactly_100_characters_is_accepted() {
        let q = format!("hashtag_name={}", "é".repeat(100));
        assert!(key(&q).is_ok());
    }
}
