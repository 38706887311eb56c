//! Parameter kinds: how one value is checked and normalized (`one_of`,
//! `int`, `region`, `hashtag`, `text`), and the JSON Schema patterns that
//! describe exactly what each kind accepts.

use std::{
    borrow::Cow,
    fmt,
    sync::{Arc, LazyLock},
};

use regex_lite::Regex;
use unicode_normalization::{IsNormalized, UnicodeNormalization as _, is_nfc_quick};

use super::error::{KeyError, clip};

/// Longest value a `hashtag` parameter accepts, in characters, after normalization.
pub const MAX_HASHTAG_CHARS: usize = 100;
/// Longest value a `text` parameter accepts when its `max_len` is not set.
pub const DEFAULT_TEXT_MAX_LEN: usize = 100;
const ALL_REGIONS: &str = "all_regions";

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
    pub(super) fn empty_means_default(&self) -> bool {
        matches!(self, Self::OneOf(_) | Self::Int { .. } | Self::Region)
    }
}

/// One compiled parameter.
#[derive(Debug, Clone)]
pub struct Param {
    pub(super) name: Arc<str>,
    pub(super) kind: Kind,
    pub(super) required: bool,
    /// Normalized default, if any.
    pub(super) default: Option<String>,
    /// The default as it stands in a key (form-encoded), built once.
    pub(super) default_in_key: Option<Box<str>>,
    /// What a key holds before this parameter's value: `?name=` when it
    /// comes first, `&name=` after another (built once).
    pub(super) key_prefix: [Box<str>; 2],
    pub(super) example: Arc<str>,
    /// What the kind allows, for messages and the OpenAPI description.
    pub(super) rule: Arc<str>,
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
    pub(super) fn normalize(&self, raw: &str) -> Result<String, KeyError> {
        let mut value = String::new();
        self.normalize_into(raw, &mut value)?;
        Ok(value)
    }

    /// [`Param::normalize`], appending to `out`: the common values (ASCII
    /// letters, digits, `_`) go straight into a key, with no string of their own.
    pub(super) fn normalize_into(&self, raw: &str, out: &mut String) -> Result<(), KeyError> {
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
