//! The HTTP surface: one file per endpoint group, assembled into one router.

mod hashtag;
mod health;

use axum::{Extension, Router, response::Response, routing::get};

use crate::{app::AppState, error::ApiError, key::HASHTAG_DETAIL_PATH, observe::RequestId};

/// All routes. Layers (request ids, panics) are added by [`crate::app`].
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            HASHTAG_DETAIL_PATH,
            get(hashtag::hashtag_detail).fallback(method_not_allowed),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(Extension(id): Extension<RequestId>) -> Response {
    ApiError::NotFound.to_response(&id)
}

async fn method_not_allowed(Extension(id): Extension<RequestId>) -> Response {
    ApiError::MethodNotAllowed.to_response(&id)
}
