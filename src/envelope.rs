//! What a KeyAPI body must be before anyone is served it, whether it comes
//! from KeyAPI itself or back from a cache tier: a JSON envelope whose
//! `code` we can read ([`envelope_code`]), and free of our API key
//! ([`KeyEcho`]) — raw or as JSON escapes it (`sk\u002dlive…`, `\/`), since
//! a body is JSON and any character of a JSON string may be escaped.

use std::sync::Arc;

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The part of KeyAPI's envelope we read; parsing into it also validates the
/// whole body as JSON (serde skips the other fields but still parses them).
#[derive(Deserialize)]
struct EnvelopeHead {
    code: i64,
}

/// The envelope's `code`, if `body` is a JSON object with an integer `code`.
pub fn envelope_code(body: &[u8]) -> Result<i64, serde_json::Error> {
    serde_json::from_slice::<EnvelopeHead>(body).map(|head| head.code)
}

/// Finds the API key in a body: the current key and, after a rotation, the
/// one before it (still valid at KeyAPI for a while, so no less secret).
/// Holds the keys themselves, so it prints as `[redacted]` and never says
/// where (or whether) a key was found.
pub struct KeyEcho {
    /// The current key first, then the previous one.
    keys: ArcSwap<Vec<SecretString>>,
}

impl std::fmt::Debug for KeyEcho {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEcho([redacted])")
    }
}

impl KeyEcho {
    /// A search for `key`.
    pub fn new(key: &SecretString) -> Self {
        Self {
            keys: ArcSwap::from_pointee(vec![key.clone()]),
        }
    }

    /// Searches for `key` from now on, and for the key it replaces.
    pub fn rotate(&self, key: &SecretString) {
        let previous = self.keys.load().first().cloned();
        self.keys.store(Arc::new(
            std::iter::once(key.clone()).chain(previous).collect(),
        ));
    }

    /// Whether `body` holds a key, as is or with any of its characters
    /// JSON-escaped (`\uXXXX` in either case, `\/`, `\"`, `\\`).
    pub fn is_in(&self, body: &[u8]) -> bool {
        let keys = self.keys.load();
        let keys = keys
            .iter()
            .map(|k| k.expose_secret().as_bytes())
            .filter(|k| !k.is_empty());
        // Every escape starts with a backslash: without one, nothing hides.
        let unescaped = body.contains(&b'\\').then(|| unescaped(body));
        keys.into_iter()
            .any(|key| contains(body, key) || unescaped.as_ref().is_some_and(|u| contains(u, key)))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `body` with every escape of an ASCII character replaced by the character
/// (anywhere, string or not: a false match only refuses a body). A key is
/// visible ASCII, so other escapes (`\n`, non-ASCII `\u`) are left as they are.
fn unescaped(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some((&first, tail)) = rest.split_first() {
        match (first == b'\\').then(|| escape(rest)).flatten() {
            Some((byte, len)) => {
                out.push(byte);
                rest = &rest[len..];
            }
            None => {
                out.push(first);
                rest = tail;
            }
        }
    }
    out
}

/// The ASCII character the escape at the start of `s` stands for, and the
/// escape's length.
fn escape(s: &[u8]) -> Option<(u8, usize)> {
    match *s.get(1)? {
        b'u' => {
            let hex = s.get(2..6)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let value = u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            let byte = u8::try_from(value).ok().filter(u8::is_ascii)?;
            Some((byte, 6))
        }
        c @ (b'"' | b'\\' | b'/') => Some((c, 2)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(key: &str) -> KeyEcho {
        KeyEcho::new(&SecretString::from(key))
    }

    #[test]
    fn finds_the_key_raw_and_in_every_json_escaped_form() {
        let key = "sk-live/ab\"c\\d";
        let found = echo(key);
        let serde = serde_json::to_string(key).unwrap_or_default();
        let bodies = [
            format!("{{\"m\":\"{key}\"}}"),
            format!("{{\"m\":{serde}}}"),
            r#"{"m":"sk\u002dlive\/ab\"c\\d"}"#.to_owned(),
            r#"{"m":"\u0073k\u002Dlive\u002fab\u0022c\u005cd"}"#.to_owned(),
        ];
        for body in &bodies {
            assert!(found.is_in(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn leaves_bodies_without_the_key_alone() {
        let found = echo("sk-live-1");
        for body in [
            r#"{"m":"sk-live-2"}"#,
            r#"{"m":"sk\u002dlive\u002d2"}"#,
            r#"{"m":"sk\\u002dlive-1"}"#,
            r#"{"m":"\u00e9\u12"}"#,
            "",
        ] {
            assert!(!found.is_in(body.as_bytes()), "{body}");
        }
        assert!(!echo("").is_in(b"anything"));
        assert_eq!(format!("{found:?}"), "KeyEcho([redacted])");
    }

    #[test]
    fn after_a_rotation_finds_the_new_key_and_the_one_it_replaced() {
        let found = echo("sk-live-1");
        found.rotate(&SecretString::from("sk-live-2"));
        assert!(found.is_in(br#"{"m":"sk-live-1"}"#));
        assert!(found.is_in(br#"{"m":"sk\u002dlive\u002d2"}"#));
        found.rotate(&SecretString::from("sk-live-3"));
        assert!(
            !found.is_in(br#"{"m":"sk-live-1"}"#),
            "two keys back is forgotten"
        );
        assert!(found.is_in(br#"{"m":"sk-live-2"}"#) && found.is_in(br#"{"m":"sk-live-3"}"#));
    }
}
