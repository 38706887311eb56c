//! What can be wrong: a route's configuration (one line naming the route
//! and the field, at start-up), or a client's query, in words the client
//! reads in the 400 envelope, with any echoed value clipped and made printable.

use std::sync::Arc;

/// A route configuration that cannot be served. The message names the route and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routes[{index}] ({path}): {problem}")]
pub struct RouteConfigError {
    pub(super) index: usize,
    pub(super) path: String,
    pub(super) problem: String,
}

/// A client request a route cannot answer. Messages are plain sentences
/// saying what is wrong and what is allowed; they go to the client in the
/// 400 envelope. Echoed values are quoted, clipped and free of control
/// characters (see `clip`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("The parameter \"{0}\" is given more than once; give it at most once.")]
    Repeated(Arc<str>),
    #[error("The parameter \"{name}\" is required, for example {name}={example}.")]
    Missing { name: Arc<str>, example: Arc<str> },
    #[error("The parameter \"{name}\" is empty; give a value, for example {name}={example}.")]
    Empty { name: Arc<str>, example: Arc<str> },
    #[error("The parameter \"{name}\" must be {rule}, but it is \"{got}\".")]
    Invalid {
        name: Arc<str>,
        rule: Arc<str>,
        got: String,
    },
    /// Its percent-decoded bytes are not UTF-8 (decoding them lossily
    /// would make different inputs one key).
    #[error("The parameter \"{0}\" is not UTF-8 text once percent-decoded; send UTF-8.")]
    NotUtf8(Arc<str>),
    /// A parameter the request does not take (where a typo would change
    /// what it does, as in an admin purge).
    #[error("The parameter \"{name}\" is not one this request takes; it takes {takes}.")]
    Unknown { name: String, takes: Arc<str> },
    /// An admin purge naming nothing: purging everything must be asked for.
    #[error("Say what to purge: all=true purges everything; a route's parameters purge one key.")]
    PurgeUnnamed,
    /// An admin purge with `all=true` and a key's parameters too.
    #[error("The parameter \"all\" purges everything; give it alone, without a key's parameters.")]
    PurgeAllWithKey,
    /// A `text` value holding a control or bidirectional formatting character.
    #[error(
        "The parameter \"{0}\" holds a control or bidirectional formatting character; \
         send printable text only."
    )]
    Unprintable(Arc<str>),
}

/// Echoes at most 40 characters of a bad value back to the client, each
/// control or invisible formatting character shown as `�` (a message is for
/// reading; the raw bytes are nobody's business).
pub(crate) fn clip(raw: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = raw
        .chars()
        .take(MAX)
        .map(|c| if is_printable(c) { c } else { '\u{FFFD}' })
        .collect();
    if raw.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// Not a control character, not a private-use, unassigned-plane or
/// formatting code point that would print as nothing or as a box.
fn is_printable(c: char) -> bool {
    !c.is_control()
        && !matches!(c,
            '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}' | '\u{E000}'..='\u{F8FF}' | '\u{40000}'..)
}
