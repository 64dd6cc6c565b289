//! Health, readiness and the OpenAPI document.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::problem::problems;
use crate::error::{Error, ErrorCode, Result};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi_json))
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct Health {
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, description = "Alive", body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

problems!(ReadyzProblems = ; NotReady);

/// Readiness: the database answers and jobs interrupted by the last shutdown have been
/// finished or rolled back.
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses(
        (status = 200, description = "Ready", body = Health),
        ReadyzProblems,
    ))]
async fn readyz(State(state): State<AppState>) -> Result<axum::Json<Health>> {
    if !state.ready.load(Ordering::Acquire) {
        return Err(Error::problem(
            ErrorCode::NotReady,
            "recovering jobs interrupted by the last shutdown",
        ));
    }
    let mut conn = state
        .db
        .reader()
        .await
        .map_err(|e| Error::problem(ErrorCode::NotReady, e.to_string()))?;
    sqlx::query("SELECT 1")
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::problem(ErrorCode::NotReady, e.to_string()))?;
    Ok(axum::Json(Health {
        status: "ready".into(),
    }))
}

/// This OpenAPI 3.1 document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi_json() -> axum::Json<serde_json::Value> {
    static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();
    axum::Json(DOCUMENT.get_or_init(super::openapi_document).clone())
}
