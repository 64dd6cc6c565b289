//! The HTTP API: one router per resource, request/response types with OpenAPI
//! derives, and the OpenAPI document itself. Handlers validate, write the records and
//! the job in one transaction and answer 202; they never run qemu-img.

pub mod auth;
pub mod clones;
mod dashboard;
pub mod events;
mod extract;
pub mod imports;
pub mod jobs;
pub mod openapi;
pub mod problem;
mod query_check;
pub mod read_model;
pub mod schedules;
mod schemas;
pub mod snapshots;
pub mod system;
pub mod templates;
pub mod tokens;
pub mod vms;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi as _};
use utoipa_axum::router::OpenApiRouter;

use crate::domain::Uuid;
use crate::error::{Error, ErrorCode, Result};
use crate::jobs::Engine;

/// What handlers share: cloned for every request (axum's `State`), so one reference
/// count, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of `AppState`.
pub struct Shared {
    /// Reads of the records views show; every change goes through `engine`.
    pub db: crate::store::Db,
    /// Exports, and the inspection of an uploaded image.
    pub files: crate::files::Files,
    pub engine: Arc<Engine>,
    /// Largest disk size accepted, in bytes.
    pub max_disk_size: u64,
    /// Turns true once interrupted jobs have been recovered.
    pub ready: Arc<AtomicBool>,
    /// Runs kept per schedule (`--run-history`).
    pub run_history: u32,
    /// Largest JSON body (`--body-limit`) and longest request (`--request-timeout-secs`)
    /// of every endpoint but the image import, which streams large files.
    pub body_limit: usize,
    pub request_timeout: std::time::Duration,
    pub import: ImportSettings,
    /// Running VMs' sockets: their checks and the last contact with each.
    pub live: Arc<crate::live::Live>,
    /// Whether requests need tokens, and the failed attempts per client address.
    pub auth: Arc<auth::Auth>,
    /// The committed events, for `/v1/events`.
    pub events: Arc<crate::events::Hub>,
    /// The first line of `qemu-img --version`, for `/v1/version`.
    pub qemu_img_version: Arc<str>,
    /// What `/metrics` reports.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Views served from memory (`store::views`).
    pub read_model: read_model::ReadModel,
}

/// What rendering a view needs beyond the database: where the volume files are (their
/// paths and allocation are shown) and when each running VM's QEMU last answered. Both
/// the handlers and the event stream's renderer (`events::ViewRenderer`) have one.
#[derive(Clone, Copy)]
pub struct Views<'a> {
    pub volumes_dir: &'a std::path::Path,
    pub live: &'a crate::live::Live,
}

impl AppState {
    pub fn views(&self) -> Views<'_> {
        Views {
            volumes_dir: self.files.volumes_dir(),
            live: &self.live,
        }
    }
}

/// Where imports may come from and how large they may be.
#[derive(Clone, Debug)]
pub struct ImportSettings {
    /// `--import-dir`: files `?path=` may name (off when unset).
    pub dir: Option<std::path::PathBuf>,
    /// `--import-max-bytes`.
    pub max_bytes: u64,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "strata",
        description = "Manage VM disks, snapshot trees, clones and templates on qcow2 files. \
            Every operation that touches disk files answers 202 with a job (`Location: /v1/jobs/{id}`); \
            errors are RFC 9457 problem documents with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    tags(
        (name = "vms", description = "VMs and their disks"),
        (name = "clones", description = "Linked and full clones of VMs, and flattening linked disks"),
        (name = "snapshots", description = "Snapshot trees: create, revert, delete (with merges)"),
        (name = "schedules", description = "Scheduled snapshots with retention: runs, manual runs, previews"),
        (name = "templates", description = "Templates: read-only golden images, conversion both ways, batch deploys"),
        (name = "jobs", description = "Background jobs that touch disk files"),
        (name = "tokens", description = "API tokens (admin scope)"),
        (name = "events", description = "The stream of committed changes (Server-Sent Events)"),
        (name = "system", description = "Health and the API description"),
    ),
    // Query parameter types utoipa names but does not collect.
    components(schemas(snapshots::ListView, crate::domain::image::ImageFormat))
)]
struct ApiDoc;

/// Every endpoint but the image import.
fn json_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(vms::routes())
        .merge(snapshots::routes())
        .merge(clones::routes())
        .merge(templates::routes())
        .merge(schedules::routes())
        .merge(jobs::routes())
        .merge(tokens::routes())
        .merge(events::routes())
        .merge(system::routes())
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(json_routes())
        .merge(imports::routes())
}

/// The service's routes, with problem answers for unknown paths and methods.
pub fn router(state: AppState) -> axum::Router {
    let (json, _) = json_routes().split_for_parts();
    // The body limit and the timeout guard every endpoint except the import, whose
    // body is an image file streamed to disk under its own limit.
    let json = json
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            state.body_limit,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.request_timeout,
        ));
    let (import, _) = imports::routes().split_for_parts();
    let documented = query_check::DocumentedQueries::from_document(&openapi_document());
    json.merge(import)
        .route_layer(axum::middleware::from_fn_with_state(
            documented,
            query_check::refuse_unknown_parameters,
        ))
        // Outside the query check: a request without a token learns nothing else.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // After the authentication layer, which applies only to the routes before it:
        // the dashboard's files are public (they hold no data), and are not API
        // operations to count.
        .merge(dashboard::routes())
        // Outermost, so refusals count too.
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            count_request,
        ))
        .fallback(|| async {
            Error::problem(
                ErrorCode::RouteNotFound,
                "no endpoint at this path; see /v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            Error::problem(
                ErrorCode::MethodNotAllowed,
                "this endpoint does not support the method; see /v1/openapi.json",
            )
        })
        .with_state(state)
}

/// Count every request to a route in the metrics, by its route's template.
async fn count_request(
    axum::extract::State(metrics): axum::extract::State<Arc<crate::metrics::Metrics>>,
    matched: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = matched.as_ref().map_or("unmatched", |m| m.as_str());
    metrics.observe_request(
        method.as_str(),
        route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// The OpenAPI document, generated from the same handler list as the router and
/// completed by `openapi`; served at /v1/openapi.json and checked in as
/// openapi/openapi.json.
pub fn openapi_document() -> serde_json::Value {
    openapi::document()
}

/// Deleting files linked clones read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FlattenQuery {
    /// Instead of refusing (`has_dependents`), first make every linked clone that reads
    /// the files standalone (streaming the shared data into it; the clones must be
    /// stopped), then delete. Default false.
    pub flatten_dependents: Option<bool>,
}

impl FlattenQuery {
    /// The spec's flattening choice; the clones it locks are recorded when accepted.
    pub fn flatten(&self) -> crate::domain::job_spec::Flatten {
        crate::domain::job_spec::Flatten {
            flatten_dependents: self.flatten_dependents.unwrap_or(false),
            locked_vms: None,
        }
    }
}

/// `limit` and `cursor` of every list endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

pub const MAX_PAGE: u32 = 1000;

impl PageQuery {
    /// The validated limit and the id the page starts after.
    pub fn parse(&self) -> Result<(u32, Option<Uuid>)> {
        let limit = self.limit.unwrap_or(100);
        if limit == 0 || limit > MAX_PAGE {
            return Err(Error::problem(
                ErrorCode::InvalidQuery,
                format!("limit must be between 1 and {MAX_PAGE}"),
            ));
        }
        let cursor = match self.cursor.as_deref() {
            None | Some("") => None,
            Some(text) => Some(text.parse().map_err(|_| {
                Error::problem(
                    ErrorCode::InvalidCursor,
                    "cursor must be the next_cursor of a previous page",
                )
            })?),
        };
        Ok((limit, cursor))
    }
}

/// Cut a page fetched with `limit + 1` rows to `limit` and give the next cursor.
pub fn page<T>(mut rows: Vec<T>, limit: u32, id: impl Fn(&T) -> Uuid) -> (Vec<T>, Option<String>) {
    if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        let next = rows.last().map(|r| id(r).to_string());
        (rows, next)
    } else {
        (rows, None)
    }
}

/// Accept a job (see `jobs::accept`), recorded as asked for by `caller`, and answer 202
/// with it.
pub async fn accept_job(
    state: &AppState,
    caller: &auth::Caller,
    request: crate::jobs::Request,
) -> Result<Response> {
    let request = request.by(caller.name());
    let job = crate::jobs::accept(&state.engine, request).await?;
    Ok(accepted(job.into()))
}

/// 202 Accepted with the job and where to follow it.
pub fn accepted(job: jobs::JobView) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    located(StatusCode::ACCEPTED, job, &location)
}

/// 200 with a body already serialised as JSON (a view the read model kept).
pub fn json_answer(body: bytes::Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// An answer with a JSON body and a `Location` header naming the resource.
pub fn located(status: StatusCode, body: impl serde::Serialize, location: &str) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The OpenAPI document as pretty JSON with a trailing newline (the checked-in form).
pub fn openapi_json_pretty() -> String {
    let mut text =
        serde_json::to_string_pretty(&openapi_document()).expect("the document serialises");
    text.push('\n');
    text
}
