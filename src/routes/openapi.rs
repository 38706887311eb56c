//! `GET /openapi.json`: the document rendered at start-up, served as stored bytes.

use axum::{body::Body, extract::State, http::header::CONTENT_TYPE, response::Response};

use crate::{error::APPLICATION_JSON, state::AppState};

pub(super) async fn openapi_json(State(state): State<AppState>) -> Response {
    let mut response = Response::new(Body::from(state.openapi().clone()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON);
    response
}
