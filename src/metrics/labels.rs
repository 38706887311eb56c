//! Label sets of the metric families, each bounded: route templates, cache
//! states, outcome kinds, reasons and scopes from fixed sets, and client and
//! issuer names from configuration only.

use prometheus_client::encoding::EncodeLabelSet;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub(super) route: &'static str,
    pub(super) status: u16,
    pub(super) cache: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct OutcomeLabels {
    pub(super) outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub(super) reason: &'static str,
}
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RejectedLabels {
    pub(super) source: &'static str,
    pub(super) reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct PayerLabels {
    pub(super) payer: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ScopeLabels {
    pub(super) scope: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ClientLabels {
    pub(super) client: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct IssuerLabels {
    pub(super) issuer: String,
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
