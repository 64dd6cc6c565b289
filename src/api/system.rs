//! Health, readiness, versions and the OpenAPI document.

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
        .routes(routes!(version))
        .routes(routes!(metrics))
}

/// Metrics in the Prometheus text format: HTTP requests by route template and status
/// with a latency histogram; jobs finished by kind and outcome with a duration
/// histogram; bytes the merges copied; jobs queued and running; the data file
/// system's free bytes and the volumes' bytes; VMs, templates, snapshots and the
/// longest chain. Scrape it with a `read` token (`authorization` in Prometheus'
/// `scrape_config`).
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "The metrics", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String,
        example = json!("# HELP strata_jobs Jobs queued or running now, by status.\n# TYPE strata_jobs gauge\nstrata_jobs{status=\"queued\"} 0\n"))))]
async fn metrics(State(state): State<AppState>) -> Result<axum::response::Response> {
    use axum::response::IntoResponse;
    let text = state
        .metrics
        .scrape(&state.db, state.files.volumes_dir())
        .await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// What is running.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
#[schema(example = json!({
    "version": "0.1.0",
    "git_commit": "e7775f6c0a1d2b3c4d5e6f708192a3b4c5d6e7f8",
    "qemu_img": "qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2)",
    "schema_version": 17
}))]
pub struct Version {
    /// strata's version (`strata --version` prints the same).
    pub version: String,
    /// The git commit strata was built from, when the build was told
    /// (`STRATA_GIT_COMMIT` at build time); null otherwise.
    pub git_commit: Option<String>,
    /// The first line of `qemu-img --version` of the qemu-img strata runs.
    pub qemu_img: String,
    /// The newest database migration applied (`migrations/NNNN_*.sql`).
    pub schema_version: i64,
}

/// Versions of strata, of the qemu-img it runs and of its database schema.
#[utoipa::path(get, path = "/v1/version", tag = "system",
    responses((status = 200, description = "What is running", body = Version)))]
async fn version(State(state): State<AppState>) -> Result<axum::Json<Version>> {
    let schema_version = crate::store::schema_version(&mut *state.db.reader().await?).await?;
    Ok(axum::Json(Version {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: option_env!("STRATA_GIT_COMMIT")
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        qemu_img: state.qemu_img_version.to_string(),
        schema_version,
    }))
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
