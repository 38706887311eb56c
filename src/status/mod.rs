//! The proxy's own status, one concern under one name: the [`Stats`] that
//! `/stats` and `/` show (recomputed at most once per [`stats::REFRESH`]),
//! gathered from the metrics (and their last hour, [`crate::metrics::History`]),
//! the ledger and the cache, and the HTML page drawn from them ([`page`]).
//! The axum handlers live in [`crate::routes`].

pub(crate) mod page;
pub(crate) mod stats;

pub(crate) use stats::{Stats, StatsCell};
