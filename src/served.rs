//! How a request of a proxied route was answered, as plain enums: the
//! access log's `cache` field, the `cache` metric label and the input of the
//! `Cache-Status` header. A leaf module, so every layer can name an outcome.

/// How a cached answer reached this client. Also a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    /// Served from the cache, no upstream call.
    Hit,
    /// This request's miss fetched and stored the answer.
    Stored,
    /// This request waited on another request's fetch (single flight).
    Collapsed,
    /// The client refused a fresh copy and may make the proxy call for it
    /// (`Cache-Control: no-cache`, `max-age`, `min-fresh`, when allowed).
    Refreshed,
    /// Served stale within stale-while-revalidate; a background refresh runs.
    Stale,
    /// Served stale because the upstream failed (stale-if-error).
    StaleIfError { fwd_status: Option<u16> },
    /// Served stale because a credit budget could not afford a new call.
    StaleOverBudget,
    /// Served stale without a call and without starting a refresh, because
    /// the request's directive took it (see [`Accepted`]).
    StaleAccepted(Accepted),
}

/// The request directive that took a stale copy as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// `Cache-Control: max-stale[=N]`, past stale-while-revalidate.
    MaxStale,
    /// `Cache-Control: only-if-cached`: no call at all, not even a refresh.
    OnlyIfCached,
}

impl Accepted {
    /// The directive's name (the `detail` of `Cache-Status`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::MaxStale => "max-stale",
            Self::OnlyIfCached => "only-if-cached",
        }
    }
}

impl CacheState {
    /// Bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stored => "stored",
            Self::Collapsed => "collapsed",
            Self::Refreshed => "refreshed",
            Self::Stale => "stale",
            Self::StaleIfError { .. } => "stale_if_error",
            Self::StaleOverBudget => "stale_budget",
            Self::StaleAccepted(_) => "stale_accepted",
        }
    }
}

/// How a request of a proxied route was answered: the access log's `cache`
/// field and the `cache` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// An answer from the cache, fetched or not (the state says how).
    Cached(CacheState),
    /// KeyAPI's own refusal, forwarded and not cached.
    Declined,
    /// `Cache-Control: only-if-cached` and no kept copy would do: a 504,
    /// nothing asked of KeyAPI.
    NotCached,
    /// An error answer (ours or the upstream's).
    Failed,
}

impl Served {
    /// Bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Cached(state) => state.as_str(),
            Self::Declined => "declined",
            Self::NotCached => "not_cached",
            Self::Failed => "error",
        }
    }

    /// Answered from the cache without looking upstream (fresh, or a stale
    /// copy served at once: stale-while-revalidate, or taken by a directive).
    pub fn is_hit(&self) -> bool {
        matches!(
            self,
            Self::Cached(CacheState::Hit | CacheState::Stale | CacheState::StaleAccepted(_))
        )
    }

    /// Answered without a call of its own that KeyAPI would have charged:
    /// a hit, or a request that joined another request's fetch.
    pub fn saved_a_call(&self) -> bool {
        self.is_hit() || matches!(self, Self::Cached(CacheState::Collapsed))
    }

    /// Answered from a stale copy (any window).
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            Self::Cached(
                CacheState::Stale
                    | CacheState::StaleIfError { .. }
                    | CacheState::StaleOverBudget
                    | CacheState::StaleAccepted(_)
            )
        )
    }
}
