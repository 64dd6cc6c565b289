//! `/v1/jobs`: follow, long-poll and cancel background jobs.

use chrono::{DateTime, Utc};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse as _, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{Query, parse_id};
use super::problem::problems;
use super::{AppState, PageQuery, accepted, page};
use crate::domain::plan::MergeAction;
use crate::domain::{CopyProgress, Job, JobKind, JobStatus, SnapshotConsistency, TargetType, Uuid};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
}

/// The resource a job works on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobTarget {
    #[serde(rename = "type")]
    pub target_type: TargetType,
    pub id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// Same codes as problem answers (e.g. `insufficient_storage`, `vm_running`, `qemu_failed`).
    pub code: String,
    pub message: String,
}

/// A background job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "id": "019a6f5e-7c1d-7b3e-9f2a-3c4d5e6f7a8b",
    "kind": "snapshot_delete",
    "status": "running",
    "progress": 41,
    "bytes_done": 222298112u64,
    "bytes_total": 536870912u64,
    "eta_seconds": 7,
    "bytes_copied": 0,
    "target": {"type": "snapshot", "id": "019a6f5e-1111-7b3e-9f2a-3c4d5e6f7a8b"},
    "vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b",
    "created_at": "2026-11-21T10:00:00Z",
    "started_at": "2026-11-21T10:00:00.010Z",
    "finished_at": null,
    "cancel_requested": false,
    "requested_by": "ops",
    "cancelled_by": null,
    "error": null,
    "detail": {"merges": [{"disk_id": "019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a8b", "action": "stream",
        "commit_bytes": 2147483648u64, "stream_bytes": 536870912, "bytes_to_copy": 536870912}],
        "space_needed_bytes": 536870912}
}))]
pub struct JobView {
    pub id: Uuid,
    pub kind: JobKind,
    pub status: JobStatus,
    /// 0 to 100.
    pub progress: u8,
    /// Bytes the copy the job is making now (one step's: a merge, a full clone's or an
    /// import's copy) has moved; null when no copy is running.
    #[schema(example = 222298112u64)]
    pub bytes_done: Option<u64>,
    /// What that copy moves in all, an estimate fixed when it starts (the allocated
    /// bytes of the layers it copies, or QEMU's own figure for a copy a running VM's
    /// QEMU makes): it does not change while the copy runs and is never below
    /// `bytes_done`. Null when no copy is running.
    #[schema(example = 536870912u64)]
    pub bytes_total: Option<u64>,
    /// Seconds that copy needs yet at the rate it kept since it began; null when no copy
    /// is running or it has not run long enough to tell.
    #[schema(example = 7)]
    pub eta_seconds: Option<u64>,
    /// Bytes the job's copies moved so far, counted as each copying step ends (its
    /// `bytes_total` when it completed, else as far as it got).
    pub bytes_copied: u64,
    pub target: JobTarget,
    pub vm_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    /// The name of the token whose request made the job (`scheduler` for the
    /// scheduler's runs and prunes); null when the request was anonymous.
    pub requested_by: Option<String>,
    /// The name of the token whose request cancelled the job; null when none did (or
    /// the request was anonymous).
    pub cancelled_by: Option<String>,
    pub error: Option<JobError>,
    /// What the job makes and what its planner chose once it started.
    pub detail: Option<JobDetail>,
}

/// What a job makes (known when it is accepted) and what its planner chose (once it
/// started).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    /// The VMs (or templates) a clone, deploy or template copy makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_ids: Option<Vec<Uuid>>,
    /// Per disk, how a snapshot deletion merges its layers: `drop`, `commit` or
    /// `stream`, with the byte estimates compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merges: Option<Vec<MergeChoice>>,
    /// Free space the plan needs on the data file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_needed_bytes: Option<u64>,
    /// A live snapshot's consistency, once its switch is made (also on the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<SnapshotConsistency>,
    /// How long the guest's file systems were frozen, from the freeze's answer to the
    /// thaw's (only for a `filesystem`-consistent snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<u64>,
    /// Why a best-effort freeze failed: the snapshot was taken crash-consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce_error: Option<String>,
    /// Why the guest could not be thawed after a snapshot: it may need thawing by hand
    /// (`guest-fsfreeze-thaw`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thaw_error: Option<String>,
    /// How long a live deletion paused the guest (`stop` to `cont`): around the pivot
    /// of an active commit, or to make QEMU write a merge's tables to disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_ms: Option<u64>,
}

/// The planner's choice for one disk, with the estimates it compared.
// Read from the job's stored detail, where the engine writes `domain::plan::MergeChoice`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MergeChoice {
    pub disk_id: Uuid,
    pub action: MergeAction,
    /// Upper bound of bytes copied by committing the upper side down.
    pub commit_bytes: u64,
    /// Upper bound of bytes copied by streaming the lower side up (all children).
    pub stream_bytes: u64,
    /// What the chosen action copies (0 for a drop).
    pub bytes_to_copy: u64,
}

/// A job's view with the live progress of its current step, as the engine keeps it in
/// memory: fresher than what the job's row holds (written at most once a second), and,
/// while this process runs the job, what its copy is (none between copies).
fn live_view(state: &AppState, job: Job) -> JobView {
    let mut view = JobView::from(job);
    refresh_job(state, &mut view);
    view
}

/// Bring a job's view up to date with the copy it runs, whose figures are written to
/// its row at most once a second.
fn refresh_job(state: &AppState, view: &mut JobView) {
    if view.status != JobStatus::Running {
        return;
    }
    if let Some(live) = state.engine.progress_of(view.id) {
        view.progress = view.progress.max(live.progress);
        view.show_copy(live.copy);
    }
}

impl JobView {
    fn show_copy(&mut self, copy: Option<CopyProgress>) {
        self.bytes_done = copy.map(|c| c.bytes_done);
        self.bytes_total = copy.map(|c| c.bytes_total);
        self.eta_seconds = copy.and_then(|c| c.eta_seconds);
    }
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        let error = job.error_code.map(|code| JobError {
            code,
            message: job.error_message.unwrap_or_default(),
        });
        // The row's figures are live ones only (see `store::jobs`).
        let copy = job.copy;
        let mut view = Self {
            id: job.id,
            kind: job.kind,
            status: job.status,
            progress: job.progress,
            bytes_done: None,
            bytes_total: None,
            eta_seconds: None,
            bytes_copied: job.bytes_copied,
            target: JobTarget {
                target_type: job.target_type,
                id: job.target_id,
            },
            vm_id: job.vm_id,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            cancel_requested: job.cancel_requested,
            requested_by: job.requested_by,
            cancelled_by: job.cancelled_by,
            error,
            // Written only by this service (`store::jobs`): a shape it cannot read is
            // shown as no detail rather than failing the view.
            detail: job
                .detail
                .and_then(|detail| serde_json::from_value(detail).ok()),
        };
        view.show_copy(copy);
        view
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub items: Vec<JobView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobFilterQuery {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs of this VM.
    pub vm_id: Option<Uuid>,
    /// Only jobs of this kind.
    pub kind: Option<JobKind>,
    /// Only jobs asked for with the token of this name (`scheduler`: the scheduler's
    /// own).
    pub requested_by: Option<String>,
}

problems!(ListJobsProblems = PAGED);

/// List jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(JobFilterQuery, PageQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        ListJobsProblems,
    ))]
async fn list_jobs(
    State(state): State<AppState>,
    Query(filter): Query<JobFilterQuery>,
    Query(page_query): Query<PageQuery>,
) -> Result<axum::Json<JobList>> {
    let (limit, cursor) = page_query.parse()?;
    let filter = store::jobs::JobFilter {
        status: filter.status,
        vm_id: filter.vm_id,
        kind: filter.kind,
        requested_by: filter.requested_by,
    };
    let mut conn = state.db.reader().await?;
    if let Some(cursor) = cursor
        && store::jobs::get(&mut conn, cursor).await?.is_none()
    {
        return Err(Error::problem(
            ErrorCode::InvalidCursor,
            "cursor must be the next_cursor of a previous page",
        ));
    }
    let rows = store::jobs::list(&mut conn, &filter, cursor, limit + 1).await?;
    let (rows, next_cursor) = page(rows, limit, |j| j.id);
    Ok(axum::Json(JobList {
        items: rows.into_iter().map(|job| live_view(&state, job)).collect(),
        next_cursor,
    }))
}

/// Longest long-poll accepted, in seconds.
pub const MAX_WAIT_SECONDS: u64 = 60;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Hold the answer until the job ends or this many seconds pass (0 to 60). The
    /// service answers before its `--request-timeout-secs` in any case, with the job as
    /// it stands then.
    #[param(maximum = 60, example = 30)]
    pub wait: Option<u64>,
}

problems!(GetJobProblems = JOB);

/// Get a job, optionally waiting for it to end.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"), WaitQuery),
    responses(
        (status = 200, description = "The job (ended, or as it stands when the wait ran out)", body = JobView),
        GetJobProblems,
    ))]
async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(wait): Query<WaitQuery>,
) -> Result<Response> {
    let id = parse_id(&id, ErrorCode::JobNotFound, "job")?;
    let wait = wait.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECONDS {
        return Err(Error::problem(
            ErrorCode::InvalidQuery,
            format!("wait must be at most {MAX_WAIT_SECONDS} seconds"),
        ));
    }
    // The answer must beat the request timeout, which would turn a long-poll into a
    // 408: wait at most until a little before it.
    let margin = (state.request_timeout / 10).max(Duration::from_millis(500));
    let wait = Duration::from_secs(wait).min(state.request_timeout.saturating_sub(margin));
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = state.engine.subscribe();
    loop {
        let refresh = |view: &mut JobView| refresh_job(&state, view);
        match state.read_model.kept::<JobView>("job", id).await? {
            Some(kept) => {
                if kept.view.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                    return Ok(super::json_answer(state.read_model.json(&kept, refresh)?));
                }
            }
            None => {
                let view = live_view(&state, load(&state, id).await?);
                if view.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                    return Ok(axum::Json(view).into_response());
                }
            }
        }
        // Wake on any job change, or poll now and then in case a change raced us.
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(500)),
            changes.changed(),
        )
        .await;
    }
}

async fn load(state: &AppState, id: Uuid) -> Result<Job> {
    let mut conn = state.db.reader().await?;
    store::jobs::get(&mut conn, id)
        .await?
        .ok_or_else(|| Error::problem(ErrorCode::JobNotFound, format!("job {id} does not exist")))
}

problems!(CancelJobProblems = JOB; JobNotCancellable);

/// Cancel a job. A queued job is cancelled at once; a running one stops at its next
/// safe point and rolls back, which is possible until it starts rewriting a file's own
/// content (a commit): after that it is refused.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancelled (queued job) or cancel requested (running job)", body = JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        CancelJobProblems,
    ))]
async fn cancel_job(
    State(state): State<AppState>,
    caller: super::auth::Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = parse_id(&id, ErrorCode::JobNotFound, "job")?;
    let job = state.engine.cancel(id, caller.name()).await?;
    Ok(accepted(job.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan;

    /// The view reads what the engine stores, field for field.
    #[test]
    fn merge_choice_reads_the_stored_choice_unchanged() {
        let stored = plan::MergeChoice {
            disk_id: crate::domain::new_id(),
            action: MergeAction::Stream,
            commit_bytes: 3 << 20,
            stream_bytes: 1 << 20,
            bytes_to_copy: 1 << 20,
        };
        let json = serde_json::to_value(&stored).unwrap();
        let view: MergeChoice = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(view).unwrap(), json);
    }
}
