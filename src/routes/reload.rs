//! `POST /admin/reload` (an admin client's token): reads the configuration
//! file, the environment and the key file again, like `SIGHUP`, and answers
//! what the reload did — `200` with the report (`applied` or `unchanged`,
//! the keys that apply now, those that need a restart, whether the key
//! changed), or `422` in the error envelope when the configuration is
//! invalid and nothing changed.

use axum::{
    Json,
    extract::State,
    response::{IntoResponse, Response},
};

use super::admin::Admin;
use crate::{
    error::ApiError,
    live::{ReloadOutcome, ReloadTrigger},
    state::AppState,
};

pub(super) async fn reload(
    Admin(admin): Admin,
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    tracing::info!(client = &*admin.id, "configuration reload asked");
    let trigger = ReloadTrigger::Admin(admin.id.clone());
    match state.reloads().request(trigger).await {
        None => Err(ApiError::Stopping),
        Some(report) if report.outcome == ReloadOutcome::Rejected => {
            Err(ApiError::ReloadRejected(report.error.unwrap_or_default()))
        }
        Some(report) => Ok(Json(report).into_response()),
    }
}
