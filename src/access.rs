//! Who is calling: optional client tokens from the `[[clients]]` section.
//!
//! A client sends `Authorization: Bearer <token>` or `X-Api-Key: <token>`. The
//! token is hashed (SHA-256) and compared in constant time with every
//! configured hash — the configuration never holds a token, and the time a
//! check takes does not depend on which client (if any) matched. With no
//! client configured the proxy is open. The client's token is only read here;
//! nothing of the client's request is forwarded upstream.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, header::AUTHORIZATION};
use prometheus_client::metrics::counter::Counter;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::{
    clock::SharedClock,
    config::ClientConfig,
    digest,
    ledger::{Account, Budget, DaySpend},
    limits::RateLimit,
    metrics::{Metrics, Scope},
    redis_conn::RedisConn,
    spend::SpendHistory,
};

/// Longest token accepted, in bytes. Issued tokens (`kp_` + 64 hex digits)
/// have 67; anything longer is refused before it is hashed, so a client
/// cannot make us hash kilobytes per request.
pub const MAX_TOKEN_BYTES: usize = 256;

/// `X-Api-Key`: the alternative to `Authorization: Bearer`.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// A configured, authenticated caller.
#[derive(Debug)]
pub struct Client {
    /// Configured id: a log field and a bounded metric label.
    pub id: Arc<str>,
    /// May force a refetch with `Cache-Control: no-cache`.
    pub may_refresh: bool,
    /// May use the `/admin` endpoints (`admin = true`).
    pub is_admin: bool,
    /// `client_requests_total{client}`, resolved at start-up.
    pub requests: Counter,
    /// This client's request rate limit, if any.
    pub rate: Option<RateLimit>,
    /// What its requests' fetches are charged to: its budget, its spend.
    pub account: Arc<Account>,
    /// SHA-256 of the token as four words: compared word-wise in constant time.
    token_sha256: [u64; 4],
    /// Its `[[clients]]` entry: a reload that leaves it as it is keeps the client.
    config: ClientConfig,
}

impl Client {
    /// A client from its (validated) entry; `None` if its hash is unreadable.
    fn new(
        c: &ClientConfig,
        metrics: &Metrics,
        clock: &SharedClock,
        redis: Option<&Arc<RedisConn>>,
        spend: &SpendHistory,
        previous: Option<&Account>,
    ) -> Option<Self> {
        let id = Arc::<str>::from(c.id.as_str());
        // Its rate limit and budget counters in Redis.
        let name = format!("client:{id}");
        let counters = metrics.client(&id);
        Some(Self {
            may_refresh: c.refresh,
            is_admin: c.admin,
            requests: counters.requests,
            rate: c.rate_per_minute.and_then(|rate| {
                RateLimit::new(rate, c.burst.unwrap_or(0), Scope::Client, clock)
                    .map(|l| l.shared(redis, &name))
            }),
            account: Arc::new(
                Account {
                    budget: c
                        .daily_budget
                        .and_then(|limit| Budget::new(limit, Scope::Client, name.clone())),
                    charged: counters.credits_spent,
                    spent: DaySpend::default(),
                    tally: spend.tally(&name),
                }
                .continuing(previous),
            ),
            token_sha256: words(&digest::parse_sha256_hex(&c.token_sha256)?),
            config: c.clone(),
            id,
        })
    }
}

/// Why a request is not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "The client token is missing or wrong; send it as Authorization: Bearer <token> or as X-Api-Key: <token>."
    )]
    Unauthorized,
    #[error(
        "This client token may not use the admin endpoints; its [[clients]] entry needs admin = true."
    )]
    Forbidden,
}

/// The configured clients.
#[derive(Debug)]
pub struct Access {
    clients: Vec<Arc<Client>>,
}

impl Access {
    /// Clients from (validated) configuration. With `previous` (a reload),
    /// a client whose entry is unchanged is kept as it is (limits and
    /// counts); a changed one starts from its predecessor's budget count of
    /// today, so a new limit is not a new day.
    pub fn new(
        config: &[ClientConfig],
        metrics: &Metrics,
        clock: &SharedClock,
        redis: Option<&Arc<RedisConn>>,
        spend: &SpendHistory,
        previous: Option<&Access>,
    ) -> Self {
        let before = |id: &str| previous?.clients.iter().find(|c| &*c.id == id);
        let clients = config
            .iter()
            .filter_map(|c| match before(&c.id) {
                Some(old) if old.config == *c => Some(Arc::clone(old)),
                old => {
                    let previous = old.map(|old| &*old.account);
                    let client = Client::new(c, metrics, clock, redis, spend, previous)?;
                    Some(Arc::new(client))
                }
            })
            .collect();
        Self { clients }
    }

    /// Every configured client, in configuration order.
    pub fn clients(&self) -> &[Arc<Client>] {
        &self.clients
    }

    /// True when no client is configured: everyone is let in anonymously.
    pub fn is_open(&self) -> bool {
        self.clients.is_empty()
    }

    /// The client presenting a valid token; `Ok(None)` when the proxy is open.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<Client>>, AuthError> {
        if self.is_open() {
            return Ok(None);
        }
        let token = presented_token(headers).ok_or(AuthError::Unauthorized)?;
        let presented = words(&digest::sha256(token));
        // Visit every client and select without branching on the comparison.
        let mut found = 0u32.ct_eq(&1);
        let mut index = 0u32;
        for (i, client) in self.clients.iter().enumerate() {
            let equal = client.token_sha256[..].ct_eq(&presented[..]);
            index.conditional_assign(&u32::try_from(i).unwrap_or(u32::MAX), equal);
            found |= equal;
        }
        if bool::from(found) {
            let client = self.clients.get(index as usize);
            client.cloned().map(Some).ok_or(AuthError::Unauthorized)
        } else {
            Err(AuthError::Unauthorized)
        }
    }

    /// The client presenting a valid token, or `Ok(None)` for a visitor:
    /// anyone when the proxy is open, else (when `visitors_allowed`, mixed
    /// mode) a caller presenting no token at all. A wrong token is never a visitor.
    pub fn authenticate_caller(
        &self,
        headers: &HeaderMap,
        visitors_allowed: bool,
    ) -> Result<Option<Arc<Client>>, AuthError> {
        let no_token = !headers.contains_key(AUTHORIZATION) && !headers.contains_key(&X_API_KEY);
        if visitors_allowed && no_token {
            return Ok(None);
        }
        self.authenticate(headers)
    }

    /// A client with `admin = true`, or why not.
    pub fn authenticate_admin(&self, headers: &HeaderMap) -> Result<Arc<Client>, AuthError> {
        if self.is_open() {
            // Without clients nobody can be an admin.
            return Err(AuthError::Forbidden);
        }
        let client = self.authenticate(headers)?.ok_or(AuthError::Unauthorized)?;
        if client.is_admin {
            Ok(client)
        } else {
            Err(AuthError::Forbidden)
        }
    }
}

/// A SHA-256 value as four machine words.
fn words(hash: &[u8; 32]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for (word, chunk) in out.iter_mut().zip(hash.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    out
}

/// The token of `Authorization: Bearer <token>`, else of `X-Api-Key`; none
/// when empty or longer than [`MAX_TOKEN_BYTES`].
fn presented_token(headers: &HeaderMap) -> Option<&[u8]> {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| {
        let value = v.as_bytes();
        let (scheme, rest) = value.split_at_checked(7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| rest.trim_ascii())
    });
    bearer
        .or_else(|| headers.get(&X_API_KEY).map(|v| v.as_bytes().trim_ascii()))
        .filter(|t| (1..=MAX_TOKEN_BYTES).contains(&t.len()))
}

/// A new random token (`kp_` + 64 hex digits) and its SHA-256 hex, for
/// `keyapi-proxy hash-token`.
pub fn new_token() -> Result<(String, String), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let token = format!("kp_{}", digest::hex(&secret));
    let hash = digest::hex(&digest::sha256(token.as_bytes()));
    Ok((token, hash))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn access(tokens: &[(&str, &str)]) -> Access {
        let config: Vec<ClientConfig> = tokens
            .iter()
            .map(|(id, token)| ClientConfig {
                id: (*id).into(),
                token_sha256: digest::hex(&digest::sha256(token.as_bytes())),
                refresh: false,
                admin: *id == "admin",
                rate_per_minute: None,
                burst: None,
                daily_budget: None,
            })
            .collect();
        let clock = SharedClock::new(std::sync::Arc::new(crate::clock::SystemClock));
        let spend = SpendHistory::new(90, clock.clone(), None);
        Access::new(
            &config,
            &Metrics::new(clock.clone()),
            &clock,
            None,
            &spend,
            None,
        )
    }

    fn with(name: HeaderName, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn tokens_select_their_client() {
        let access = access(&[("a", "tok-a"), ("b", "tok-b"), ("admin", "tok-c")]);
        let id = |h: &HeaderMap| access.authenticate(h).map(|c| c.map(|c| c.id.to_string()));
        assert_eq!(
            id(&with(AUTHORIZATION, "Bearer tok-b")),
            Ok(Some("b".into()))
        );
        assert_eq!(
            id(&with(AUTHORIZATION, "bearer  tok-a ")),
            Ok(Some("a".into()))
        );
        assert_eq!(id(&with(X_API_KEY, "tok-c")), Ok(Some("admin".into())));
        for bad in [
            with(AUTHORIZATION, "Bearer tok-x"),
            with(AUTHORIZATION, "Basic tok-a"),
            with(AUTHORIZATION, "Bearer "),
            with(X_API_KEY, "TOK-A"),
            with(X_API_KEY, &"a".repeat(MAX_TOKEN_BYTES + 1)),
            HeaderMap::new(),
        ] {
            assert_eq!(id(&bad), Err(AuthError::Unauthorized), "{bad:?}");
        }
        assert_eq!(
            access
                .authenticate_admin(&with(X_API_KEY, "tok-a"))
                .map(|c| c.id.to_string()),
            Err(AuthError::Forbidden)
        );
        assert!(access.authenticate_admin(&with(X_API_KEY, "tok-c")).is_ok());
    }

    #[test]
    fn open_when_no_client_is_configured() {
        let access = access(&[]);
        assert!(access.is_open());
        assert_eq!(
            access.authenticate(&HeaderMap::new()).map(|c| c.is_none()),
            Ok(true)
        );
        assert_eq!(
            access.authenticate_admin(&HeaderMap::new()).map(|_| ()),
            Err(AuthError::Forbidden)
        );
    }

    #[test]
    fn new_tokens_hash_to_their_printed_hash() {
        let (token, hash) = new_token().unwrap();
        assert!(token.starts_with("kp_") && token.len() == 67);
        assert_eq!(hash, digest::hex(&digest::sha256(token.as_bytes())));
        assert_ne!(new_token().unwrap().0, token);
    }
}
