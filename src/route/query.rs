//! Parsing a raw query into a route's normalized key: `name=value` pairs
//! decoded (bytes that are not UTF-8 refused), unknown names ignored, each
//! value normalized by its kind and form-encoded in the route's order.

use std::{borrow::Cow, cell::RefCell, sync::Arc};

use smallvec::{SmallVec, smallvec};

use super::{KeyError, Route};
use crate::cache::CacheKey;

impl Route {
    /// Normalizes a raw query string (without `?`) into the canonical
    /// upstream request of this route.
    pub fn parse(&self, raw_query: Option<&str>) -> Result<CacheKey, KeyError> {
        // A route has a handful of parameters: their raw values live on the stack.
        let mut raw: SmallVec<[Option<Cow<'_, str>>; 8]> = smallvec![None; self.params.len()];
        for (name, value) in query_pairs(raw_query.unwrap_or("")) {
            let Some(index) = self.params.iter().position(|p| *p.name == *name) else {
                continue;
            };
            let Ok(value) = value else {
                return Err(KeyError::NotUtf8(Arc::clone(&self.params[index].name)));
            };
            if raw[index].replace(value).is_some() {
                return Err(KeyError::Repeated(Arc::clone(&self.params[index].name)));
            }
        }
        SCRATCH.with(|scratch| {
            // Not reentrant, so the buffer is always free; a fresh one would do.
            let (mut borrowed, mut fresh) = (scratch.try_borrow_mut(), String::new());
            let key = match &mut borrowed {
                Ok(buffer) => {
                    buffer.clear();
                    &mut **buffer
                }
                Err(_) => &mut fresh,
            };
            self.assemble(&raw, key)?;
            Ok(CacheKey::copied(key))
        })
    }

    /// Writes the key of these raw values (by parameter) into `key`.
    fn assemble(&self, raw: &[Option<Cow<'_, str>>], key: &mut String) -> Result<(), KeyError> {
        key.push_str(self.path);
        let mut first = true;
        for (param, raw) in self.params.iter().zip(raw) {
            let given = raw.as_deref().map(str::trim).filter(|g| !g.is_empty());
            // Absent: the default; empty: the default only where empty means it.
            let default = match (raw, given) {
                (_, Some(_)) => None,
                (None, None) => param.default_in_key.as_deref(),
                (Some(_), None) => param
                    .default_in_key
                    .as_deref()
                    .filter(|_| param.kind.empty_means_default()),
            };
            if given.is_none() && default.is_none() {
                let (name, example) = (Arc::clone(&param.name), Arc::clone(&param.example));
                return match raw {
                    None if !param.required => continue,
                    Some(_) if !param.required && param.default.is_none() => continue,
                    None => Err(KeyError::Missing { name, example }),
                    Some(_) => Err(KeyError::Empty { name, example }),
                };
            }
            key.push_str(&param.key_prefix[usize::from(!first)]);
            first = false;
            if let Some(given) = given {
                let start = key.len();
                param.normalize_into(given, key)?;
                if needs_encoding(&key[start..]) {
                    let value = key.split_off(start);
                    push_encoded(key, &value);
                }
            } else if let Some(default) = default {
                key.push_str(default);
            }
        }
        Ok(())
    }

    /// Whether `key` is one of this route's.
    pub fn owns(&self, key: &CacheKey) -> bool {
        key.path_and_query()
            .strip_prefix(self.path)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
    }

    /// The normalized parameters of one of this route's keys, in order.
    pub fn params_of(key: &CacheKey) -> Vec<(String, String)> {
        let query = key.path_and_query().split_once('?').map_or("", |(_, q)| q);
        form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

thread_local! {
    /// Where [`Route::parse`] assembles a key: one buffer per thread, so a
    /// parse allocates only the key itself.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A value whose percent-decoded bytes are not UTF-8.
struct NotUtf8;

/// A decoded name and its value (or [`NotUtf8`]).
type Pair<'q> = (Cow<'q, str>, Result<Cow<'q, str>, NotUtf8>);

/// The `name=value` pairs of a query, decoded as `application/x-www-form-urlencoded`,
/// except that a value whose bytes are not UTF-8 is an error rather than
/// U+FFFD (names are decoded lossily: no parameter's name holds one).
/// Pairs without `%` or `+` (the common case) are borrowed, not decoded.
fn query_pairs(query: &str) -> impl Iterator<Item = Pair<'_>> {
    let mut rest = query;
    // One pass over the bytes (a query is short; no searcher set-up).
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let (mut end, mut equals, mut encoded) = (rest.len(), None, false);
            for (i, b) in rest.bytes().enumerate() {
                match b {
                    b'&' => {
                        end = i;
                        break;
                    }
                    b'=' if equals.is_none() => equals = Some(i),
                    b'%' | b'+' => encoded = true,
                    _ => {}
                }
            }
            let pair = &rest[..end];
            rest = rest.get(end + 1..).unwrap_or("");
            if pair.is_empty() {
                continue;
            }
            let (name, value) = equals.map_or((pair, ""), |i| (&pair[..i], &pair[i + 1..]));
            if encoded {
                let name = form_decode(name).unwrap_or_else(|bytes| {
                    Cow::Owned(String::from_utf8_lossy(&bytes).into_owned())
                });
                return Some((name, form_decode(value).map_err(|_| NotUtf8)));
            }
            return Some((Cow::Borrowed(name), Ok(Cow::Borrowed(value))));
        }
        None
    })
}

/// One form-encoded name or value decoded (`+` is a space), or its bytes
/// when they are not UTF-8.
fn form_decode(raw: &str) -> Result<Cow<'_, str>, Vec<u8>> {
    if raw.contains('+') {
        let spaced = raw.replace('+', " ");
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(&spaced).collect();
        return String::from_utf8(decoded)
            .map(Cow::Owned)
            .map_err(|e| e.into_bytes());
    }
    match Cow::from(percent_encoding::percent_decode_str(raw)) {
        Cow::Borrowed(bytes) => std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|_| bytes.to_vec()),
        Cow::Owned(bytes) => String::from_utf8(bytes)
            .map(Cow::Owned)
            .map_err(|e| e.into_bytes()),
    }
}

/// Whether `value` has anything but ASCII letters, digits and `_`.
fn needs_encoding(value: &str) -> bool {
    !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Appends `value` form-encoded. Letters, digits and `_` in ASCII need no
/// encoding (the common case); anything else is encoded as a form serializer would.
pub(super) fn push_encoded(out: &mut String, value: &str) {
    if !needs_encoding(value) {
        out.push_str(value);
    } else {
        out.extend(form_urlencoded::byte_serialize(value.as_bytes()));
    }
}
