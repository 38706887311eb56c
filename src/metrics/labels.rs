//! Label sets of the metric families, each bounded: route templates, cache
//! states, outcome kinds, reasons and scopes from fixed sets, and client and
//! issuer names from configuration only.

use prometheus_client::encoding::EncodeLabelSet;

/// Declares label sets: each field is one label, named as the field.
macro_rules! label_sets {
    ($($(#[$doc:meta])* $name:ident { $($label:ident: $ty:ty),+ })*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
        pub(super) struct $name {
            $(pub(super) $label: $ty),+
        }
    )*};
}

label_sets! {
    /// `requests_total`.
    RequestLabels { route: &'static str, status: u16, cache: &'static str }
    /// `upstream_calls_total`.
    OutcomeLabels { outcome: &'static str }
    /// `tokens_rejected_total`, `upstream_refused_total`, `connections_closed_total`,
    /// `trace_spans_dropped_total`.
    ReasonLabels { reason: &'static str }
    /// `redis_errors_total`.
    KindLabels { kind: &'static str }
    /// `cache_entries_rejected_total`.
    RejectedLabels { source: &'static str, reason: &'static str }
    /// `credits_spent_by_total`.
    PayerLabels { payer: &'static str }
    /// `rate_limited_total`, `budget_refused_total`.
    ScopeLabels { scope: &'static str }
    /// A configured client's families.
    ClientLabels { client: String }
    /// A configured issuer's families.
    IssuerLabels { issuer: String }
}

/// Who a limit or budget belonged to (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole proxy.
    Global,
    /// One configured client.
    Client,
    /// One configured warm-up.
    Warmup,
    /// One subject (`sub`) of a signed visitor token.
    Subject,
    /// One visitor (a caller without a token, by address prefix).
    Visitor,
}

impl Scope {
    /// Bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Client => "client",
            Self::Warmup => "warmup",
            Self::Subject => "subject",
            Self::Visitor => "visitor",
        }
    }

    /// Whose limit it is, for messages: "the proxy's", "this client's".
    pub fn possessive(&self) -> &'static str {
        match self {
            Self::Global => "the proxy's",
            Self::Client => "this client's",
            Self::Warmup => "this warm-up's",
            Self::Subject => "this token subject's",
            Self::Visitor => "this visitor's",
        }
    }
}
