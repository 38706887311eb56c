//! `GET /admin/spend?from=YYYY-MM-DD&to=YYYY-MM-DD` (an admin client's
//! token): the spend history, one entry per UTC day from `from` to `to`
//! (both included; by default the last 30 days to today, and never beyond
//! the days kept), each day's total and each payer's credits spent, calls,
//! credits saved and refusals. JSON; CSV (one line per day and payer) with
//! `format=csv` or `Accept: text/csv`. A date that is not one, `from` after
//! `to`, or another parameter is a 400.

use std::fmt::Write as _;

use axum::{
    Json,
    extract::{RawQuery, State},
    http::{
        HeaderMap, HeaderValue,
        header::{ACCEPT, CONTENT_DISPOSITION, CONTENT_TYPE},
    },
    response::{IntoResponse, Response},
};
use serde::Serialize;

use super::admin::Admin;
use crate::{
    clock,
    error::ApiError,
    route::{self, KeyError},
    spend::{Counts, Day},
    state::AppState,
};

/// What the query takes.
const TAKES: &str = "from, to (YYYY-MM-DD, UTC) and format (json or csv)";

/// The history as JSON.
#[derive(Debug, Serialize)]
struct History {
    from: String,
    to: String,
    days: Vec<DayJson>,
}

#[derive(Debug, Serialize)]
struct DayJson {
    day: String,
    total: Counts,
    payers: Vec<PayerJson>,
}

#[derive(Debug, Serialize)]
struct PayerJson {
    payer: String,
    #[serde(flatten)]
    counts: Counts,
}

/// How the answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
}

/// What the query asks for.
#[derive(Debug)]
struct Query {
    from: Option<u64>,
    to: Option<u64>,
    format: Option<Format>,
}

pub(super) async fn spend(
    Admin(admin): Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = parse(query.as_deref().unwrap_or(""))?;
    if let (Some(from), Some(to)) = (query.from, query.to)
        && from > to
    {
        let error = KeyError::Invalid {
            name: "from".into(),
            rule: format!("a day on or before to ({})", clock::utc_date(to)).into(),
            got: clock::utc_date(from),
        };
        return Err(error.into());
    }
    let history = state.spend();
    let today = history.today();
    let to = query.to.unwrap_or(today).min(today);
    let from = match query.from {
        Some(from) => from.max(history.first_kept()),
        None => history.recent_from(to),
    };
    // Days before the oldest kept or after today are not an error: none is kept.
    let days = if from > to {
        Vec::new()
    } else {
        history.days(from, to).await?
    };
    tracing::info!(client = &*admin.id, from, to, "spend history read");
    let csv = match query.format {
        Some(format) => format == Format::Csv,
        None => headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/csv")),
    };
    if csv {
        return Ok(csv_response(from, to, &days));
    }
    Ok(Json(History {
        from: clock::utc_date(from),
        to: clock::utc_date(to),
        days: days.iter().map(day_json).collect(),
    })
    .into_response())
}

fn day_json(day: &Day) -> DayJson {
    DayJson {
        day: clock::utc_date(day.day),
        total: day.total(),
        payers: day
            .payers
            .iter()
            .map(|(payer, counts)| PayerJson {
                payer: payer.to_string(),
                counts: *counts,
            })
            .collect(),
    }
}

/// `day,payer,credits_spent,calls,credits_saved,refusals`, one line per day
/// and payer (payer names are configured labels: no quoting needed).
fn csv_response(from: u64, to: u64, days: &[Day]) -> Response {
    let mut body = String::from("day,payer,credits_spent,calls,credits_saved,refusals\n");
    for day in days {
        let date = clock::utc_date(day.day);
        for (payer, c) in &day.payers {
            let _ = writeln!(
                body,
                "{date},{payer},{},{},{},{}",
                c.credits_spent, c.calls, c.credits_saved, c.refusals
            );
        }
    }
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    let name = format!(
        "attachment; filename=\"spend-{}-{}.csv\"",
        clock::utc_date(from),
        clock::utc_date(to)
    );
    if let Ok(value) = HeaderValue::from_str(&name) {
        headers.insert(CONTENT_DISPOSITION, value);
    }
    response
}

/// Reads the query; anything it does not take is refused, as in a purge.
fn parse(raw: &str) -> Result<Query, KeyError> {
    let mut query = Query {
        from: None,
        to: None,
        format: None,
    };
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
        if seen.iter().any(|s| *s == name) {
            return Err(KeyError::Repeated(name.into()));
        }
        let invalid = |rule: &str| KeyError::Invalid {
            name: name.as_ref().into(),
            rule: rule.into(),
            got: route::clip(&value),
        };
        match &*name {
            "from" | "to" => {
                let day = clock::parse_utc_date(&value)
                    .ok_or_else(|| invalid("a date like 2025-01-31"))?;
                match &*name {
                    "from" => query.from = Some(day),
                    _ => query.to = Some(day),
                }
            }
            "format" => {
                query.format = Some(match &*value {
                    "json" => Format::Json,
                    "csv" => Format::Csv,
                    _ => return Err(invalid("json or csv")),
                });
            }
            _ => {
                return Err(KeyError::Unknown {
                    name: route::clip(&name),
                    takes: TAKES.into(),
                });
            }
        }
        seen.push(name.into_owned());
    }
    Ok(query)
}
