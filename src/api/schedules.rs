//! `/v1/schedules`: scheduled snapshots with retention, their runs, manual runs and the
//! retention preview. Handlers validate and write records; runs and prunes are started
//! by `scheduler`, which this module calls for manual runs and previews.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::extract::{Json, Query, parse_id};
use super::problem::problems;
use super::{AppState, PageQuery, located, page};
use crate::domain::JobSpec;
use crate::domain::job_spec::SnapshotDelete;
use crate::domain::retention::{self, Decision, KeepReason, MaxAge, PruneReason};
use crate::domain::schedule::{self, CronSpec};
use crate::domain::{
    self, Consistency, Quiesce, RunStatus, RunTrigger, Schedule, ScheduleRun, ScheduleTarget,
    TargetOutcome, Uuid, new_id, validate,
};
use crate::error::{Error, ErrorCode, Result};
use crate::jobs::accept::{self, name_taken};
use crate::scheduler::{prune, runs};
use crate::store;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_schedules, create_schedule))
        .routes(routes!(get_schedule, patch_schedule, delete_schedule))
        .routes(routes!(list_runs))
        .routes(routes!(trigger_run))
        .routes(routes!(get_run))
        .routes(routes!(preview))
}

/// A new schedule: what to snapshot (`vm_id` or `selector`), when (`cron` in
/// `timezone`), how to name the snapshots, and which to keep.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "web-nightly", "selector": "tier=web", "cron": "0 3 * * *", "timezone": "Europe/Paris",
    "retention": {"keep_daily": 7, "keep_weekly": 4, "max_age": "60d"}
}))]
pub struct CreateSchedule {
    pub name: String,
    /// Snapshot this one VM. Give either `vm_id` or `selector`.
    pub vm_id: Option<Uuid>,
    /// Snapshot every VM carrying this label (`key=value`) at the time of each run.
    pub selector: Option<String>,
    /// 5 fields (minute hour day-of-month month day-of-week) or `@hourly`, `@daily`,
    /// `@weekly`, `@monthly`, `@yearly`.
    pub cron: String,
    /// IANA zone the cron fields, snapshot names and calendar retention rules are read
    /// in (default `UTC`).
    pub timezone: Option<String>,
    /// Default true. A disabled schedule keeps its snapshots and policy but never runs
    /// on its own.
    pub enabled: Option<bool>,
    /// Snapshot names: strftime fields plus `{vm}` and `{schedule}` (default
    /// `auto-%Y%m%d-%H%M%S`).
    pub name_template: Option<String>,
    /// Default: keep everything (only `expires_at` prunes).
    #[serde(default)]
    pub retention: RetentionPolicy,
    /// What each snapshot of a running VM asks for, as on `POST
    /// /v1/vms/{id}/snapshots`; left out, each VM's default (`filesystem` when it has a
    /// guest-agent socket, else `crash`).
    pub consistency: Option<Consistency>,
    /// With `filesystem`: `required` or `best_effort` (the default). A VM a required
    /// freeze cannot be tried on (no guest-agent socket) is skipped by the run, with
    /// `guest_agent_unavailable`.
    pub quiesce: Option<Quiesce>,
}

/// Change a schedule: fields left out stay; `retention` replaces the whole policy;
/// `vm_id` or `selector` replaces the target.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"enabled": false}))]
pub struct PatchSchedule {
    pub name: Option<String>,
    pub vm_id: Option<Uuid>,
    pub selector: Option<String>,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub enabled: Option<bool>,
    pub name_template: Option<String>,
    pub retention: Option<RetentionPolicy>,
    /// A value sets it; `null` goes back to each VM's default.
    #[serde(default, deserialize_with = "super::extract::present")]
    #[schema(value_type = Option<Consistency>)]
    pub consistency: Option<Option<Consistency>>,
    /// A value sets it; `null` goes back to `best_effort`.
    #[serde(default, deserialize_with = "super::extract::present")]
    #[schema(value_type = Option<Quiesce>)]
    pub quiesce: Option<Option<Quiesce>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "id": "019a6f5e-8888-7b3e-9f2a-3c4d5e6f7a8b", "name": "web-nightly", "vm_id": null, "selector": "tier=web",
    "cron": "0 3 * * *", "timezone": "Europe/Paris", "enabled": true, "name_template": "auto-%Y%m%d-%H%M%S",
    "retention": {"keep_last": null, "keep_hourly": null, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": null,
        "keep_yearly": null, "max_age": "60d"},
    "consistency": "filesystem", "quiesce": "best_effort",
    "next_run_at": "2026-11-22T02:00:00Z",
    "last_run": {"id": "019a6f5e-9999-7b3e-9f2a-3c4d5e6f7a8b", "at": "2026-11-21T02:00:00Z", "status": "succeeded",
        "job_id": "019a6f5e-aaaa-7b3e-9f2a-3c4d5e6f7a8b", "reason": null},
    "created_at": "2026-11-01T10:00:00Z", "updated_at": "2026-11-01T10:00:00Z"
}))]
pub struct ScheduleView {
    pub id: Uuid,
    pub name: String,
    pub vm_id: Option<Uuid>,
    pub selector: Option<String>,
    pub cron: String,
    pub timezone: String,
    pub enabled: bool,
    pub name_template: String,
    pub retention: RetentionPolicy,
    /// Null: each VM's default.
    pub consistency: Option<Consistency>,
    /// Null: `best_effort` (with `filesystem`).
    pub quiesce: Option<Quiesce>,
    /// When the next run is due (absent while disabled).
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run: Option<LastRun>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The newest run, in short.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LastRun {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub status: RunStatus,
    /// The snapshot job of the run (the first one, for a selector reaching several VMs).
    pub job_id: Option<Uuid>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    pub items: Vec<ScheduleView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "id": "019a6f5e-9999-7b3e-9f2a-3c4d5e6f7a8b", "schedule_id": "019a6f5e-8888-7b3e-9f2a-3c4d5e6f7a8b",
    "trigger": "cron", "started_at": "2026-11-21T02:00:00Z", "finished_at": "2026-11-21T02:00:01Z",
    "status": "succeeded", "reason": "1 of 2 VMs skipped", "job_ids": ["019a6f5e-aaaa-7b3e-9f2a-3c4d5e6f7a8b"],
    "targets": [
        {"vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "vm_name": "web-01", "outcome": "succeeded",
         "snapshot_id": "019a6f5e-bbbb-7b3e-9f2a-3c4d5e6f7a8b", "job_id": "019a6f5e-aaaa-7b3e-9f2a-3c4d5e6f7a8b",
         "code": null, "reason": null},
        {"vm_id": "019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a8b", "vm_name": "web-02", "outcome": "skipped",
         "snapshot_id": null, "job_id": null, "code": "vm_running",
         "reason": "VM web-02 is running and strata has no QMP socket for it: stop it first, or give its QMP socket (PATCH qmp_socket, inside --runtime-dir) to snapshot it live"}],
    "retention": {"pruned": [{"snapshot_id": "019a6f5e-cccc-7b3e-9f2a-3c4d5e6f7a8b", "snapshot_name": "auto-20261114-030000",
        "vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "why_pruned": "outside_policy",
        "job_id": "019a6f5e-dddd-7b3e-9f2a-3c4d5e6f7a8b", "code": null, "reason": null}],
        "held": [], "deferred": []}
}))]
pub struct RunView {
    pub id: Uuid,
    pub schedule_id: Uuid,
    pub trigger: RunTrigger,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `running` until its snapshot jobs end; `skipped` when it took no snapshot.
    pub status: RunStatus,
    pub reason: Option<String>,
    /// The snapshot jobs the run queued.
    pub job_ids: Vec<Uuid>,
    /// One entry per VM the run reached.
    pub targets: Vec<RunTarget>,
    /// The retention pass made when the run ended.
    pub retention: Option<PruneReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunList {
    pub items: Vec<RunView>,
    pub next_cursor: Option<String>,
}

/// What the policy would do now, without doing it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "evaluated_at": "2026-11-21T12:00:00Z", "next_runs": ["2026-11-22T03:00:00+01:00", "2026-11-23T03:00:00+01:00"], "keep_count": 1, "prune_count": 1,
    "items": [
        {"vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "snapshot_id": "019a6f5e-cccc-7b3e-9f2a-3c4d5e6f7a8b",
         "snapshot_name": "auto-20261114-030000", "created_at": "2026-11-14T02:00:00Z", "hold": false,
         "expires_at": null, "action": "prune", "keep_reasons": [], "prune_reason": "outside_policy",
         "held": {"code": "has_dependents", "reason": "linked clones read these files: web-test; delete or flatten them first"}},
        {"vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "snapshot_id": "019a6f5e-bbbb-7b3e-9f2a-3c4d5e6f7a8b",
         "snapshot_name": "auto-20261121-030000", "created_at": "2026-11-21T02:00:00Z", "hold": false,
         "expires_at": null, "action": "keep", "keep_reasons": ["last", "daily"], "prune_reason": null, "held": null}]
}))]
pub struct Preview {
    pub evaluated_at: DateTime<Utc>,
    /// The schedule's next five runs, in its time zone (empty while it is disabled).
    pub next_runs: Vec<DateTime<chrono::FixedOffset>>,
    pub keep_count: usize,
    pub prune_count: usize,
    /// The schedule's snapshots, by VM and oldest first.
    pub items: Vec<PreviewItem>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PreviewAction {
    Keep,
    Prune,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PreviewItem {
    pub vm_id: Uuid,
    pub snapshot_id: Uuid,
    pub snapshot_name: String,
    pub created_at: DateTime<Utc>,
    pub hold: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub action: PreviewAction,
    /// For `keep`: every rule that keeps the snapshot.
    pub keep_reasons: Vec<KeepReason>,
    /// For `prune`: `expired` or `outside_policy`.
    pub prune_reason: Option<PruneReason>,
    /// For `prune`: why the deletion would be held now (`vm_running`,
    /// `insufficient_storage`...), if it would.
    pub held: Option<Held>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Held {
    pub code: String,
    pub reason: String,
}

/// Which snapshots of a schedule to keep. Every field is optional and they combine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot younger than this: a number with a unit, `s`, `m`, `h`, `d`
    /// or `w`, or several of them (`7d`, `36h`, `1d12h`).
    #[schema(value_type = Option<String>, example = "7d")]
    pub max_age: Option<MaxAge>,
}

impl From<retention::RetentionPolicy> for RetentionPolicy {
    fn from(policy: retention::RetentionPolicy) -> Self {
        let retention::RetentionPolicy {
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            max_age,
        } = policy;
        Self {
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            max_age,
        }
    }
}

impl From<RetentionPolicy> for retention::RetentionPolicy {
    fn from(policy: RetentionPolicy) -> Self {
        let RetentionPolicy {
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            max_age,
        } = policy;
        Self {
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            max_age,
        }
    }
}

/// One VM of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunTarget {
    pub vm_id: Uuid,
    pub vm_name: String,
    pub outcome: TargetOutcome,
    /// The snapshot the run took, absent when skipped.
    pub snapshot_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    /// Why the VM was skipped or its job failed: an error code such as `vm_running`.
    pub code: Option<String>,
    pub reason: Option<String>,
}

impl From<domain::RunTarget> for RunTarget {
    fn from(target: domain::RunTarget) -> Self {
        let domain::RunTarget {
            vm_id,
            vm_name,
            outcome,
            snapshot_id,
            job_id,
            code,
            reason,
        } = target;
        Self {
            vm_id,
            vm_name,
            outcome,
            snapshot_id,
            job_id,
            code,
            reason,
        }
    }
}

/// What a pruning pass (after a run, or the periodic sweep) did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneReport {
    /// Deletions queued, oldest snapshot first.
    pub pruned: Vec<PruneEntry>,
    /// Snapshots the policy prunes that cannot be deleted now (a running VM, a linked
    /// clone depending on them, short of space...): `code` and `reason` say why. They
    /// are tried again by every later pass.
    pub held: Vec<PruneEntry>,
    /// Snapshots left for a later pass so that merges do not all start at once.
    pub deferred: Vec<PruneEntry>,
}

impl From<domain::PruneReport> for PruneReport {
    fn from(report: domain::PruneReport) -> Self {
        let entries = |list: Vec<domain::PruneEntry>| list.into_iter().map(Into::into).collect();
        Self {
            pruned: entries(report.pruned),
            held: entries(report.held),
            deferred: entries(report.deferred),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneEntry {
    pub snapshot_id: Uuid,
    pub snapshot_name: String,
    pub vm_id: Uuid,
    /// Why the policy prunes it.
    pub why_pruned: PruneReason,
    /// The deletion job, for queued deletions.
    pub job_id: Option<Uuid>,
    /// For held and deferred snapshots: an error code (`vm_running`, `snapshot_in_use`,
    /// `insufficient_storage`...) or `spread` / `vm_busy`.
    pub code: Option<String>,
    pub reason: Option<String>,
}

impl From<domain::PruneEntry> for PruneEntry {
    fn from(entry: domain::PruneEntry) -> Self {
        let domain::PruneEntry {
            snapshot_id,
            snapshot_name,
            vm_id,
            why_pruned,
            job_id,
            code,
            reason,
        } = entry;
        Self {
            snapshot_id,
            snapshot_name,
            vm_id,
            why_pruned,
            job_id,
            code,
            reason,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScheduleFilter {
    /// Only schedules that target this VM by id.
    pub vm_id: Option<Uuid>,
}

fn view(schedule: Schedule, last: Option<ScheduleRun>) -> ScheduleView {
    let (vm_id, selector) = match schedule.target {
        ScheduleTarget::Vm(id) => (Some(id), None),
        ScheduleTarget::Selector { key, value } => (None, Some(format!("{key}={value}"))),
    };
    ScheduleView {
        id: schedule.id,
        name: schedule.name,
        vm_id,
        selector,
        cron: schedule.cron,
        timezone: schedule.timezone,
        enabled: schedule.enabled,
        name_template: schedule.name_template,
        retention: schedule.retention.into(),
        consistency: schedule.consistency,
        quiesce: schedule.quiesce,
        next_run_at: schedule.next_run_at,
        last_run: last.map(|run| LastRun {
            id: run.id,
            at: run.started_at,
            status: run.status,
            job_id: run.detail.targets.iter().find_map(|t| t.job_id),
            reason: run.reason,
        }),
        created_at: schedule.created_at,
        updated_at: schedule.updated_at,
    }
}

pub(crate) fn run_view(run: ScheduleRun) -> RunView {
    RunView {
        id: run.id,
        schedule_id: run.schedule_id,
        trigger: run.trigger,
        started_at: run.started_at,
        finished_at: run.finished_at,
        status: run.status,
        reason: run.reason,
        job_ids: run.detail.targets.iter().filter_map(|t| t.job_id).collect(),
        targets: run.detail.targets.into_iter().map(Into::into).collect(),
        retention: run.detail.retention.map(Into::into),
    }
}

async fn view_with_last(state: &AppState, schedule: Schedule) -> Result<ScheduleView> {
    schedule_view(&mut *state.db.reader().await?, schedule).await
}

/// A schedule's view, with its last run.
pub(crate) async fn schedule_view(
    conn: &mut sqlx::SqliteConnection,
    schedule: Schedule,
) -> Result<ScheduleView> {
    let last = store::schedules::last_run(conn, schedule.id).await?;
    Ok(view(schedule, last))
}

async fn find_schedule(conn: &mut sqlx::SqliteConnection, id: &str) -> Result<Schedule> {
    let id = parse_id(id, ErrorCode::ScheduleNotFound, "schedule")?;
    store::schedules::get(conn, id).await?.ok_or_else(|| {
        Error::problem(
            ErrorCode::ScheduleNotFound,
            format!("schedule {id} does not exist"),
        )
    })
}

/// The target from `vm_id` / `selector`, exactly one of which must be given.
async fn target(
    conn: &mut sqlx::SqliteConnection,
    vm_id: Option<Uuid>,
    selector: Option<&str>,
) -> Result<ScheduleTarget> {
    match (vm_id, selector) {
        (Some(id), None) => {
            if store::vms::get_vm(conn, id).await?.is_none() {
                return Err(Error::problem(
                    ErrorCode::VmNotFound,
                    format!("VM {id} does not exist"),
                ));
            }
            Ok(ScheduleTarget::Vm(id))
        }
        (None, Some(text)) => {
            let (key, value) = validate::selector(text).map_err(Error::validation)?;
            Ok(ScheduleTarget::Selector { key, value })
        }
        _ => Err(Error::validation(
            "give exactly one of vm_id (one VM) and selector (every VM with a label)",
        )),
    }
}

/// Check every rule of a schedule and compute its next run from now.
fn validate_schedule(schedule: &mut Schedule) -> Result<()> {
    validate::name("name", &schedule.name).map_err(Error::validation)?;
    let spec = CronSpec::parse(&schedule.cron, &schedule.timezone).map_err(Error::validation)?;
    schedule::validate_template(&schedule.name_template).map_err(Error::validation)?;
    // The template must make a valid snapshot name for a typical VM.
    let sample = schedule::render_name(
        &schedule.name_template,
        store::now(),
        spec.timezone(),
        "vm",
        &schedule.name,
    );
    validate::name("the snapshot name from name_template", &sample)
        .map_err(|e| Error::validation(format!("{e} (it gives {sample:?})")))?;
    validate::retention(&schedule.retention).map_err(Error::validation)?;
    if schedule.quiesce.is_some() && schedule.consistency == Some(Consistency::Crash) {
        return Err(Error::validation(
            "quiesce applies to filesystem consistency; leave it out with consistency crash",
        ));
    }
    schedule.next_run_at = if schedule.enabled {
        spec.next_after(store::now())
    } else {
        None
    };
    Ok(())
}

problems!(CreateScheduleProblems = JSON_BODY, NAMED, VM);

/// Create a schedule.
#[utoipa::path(post, path = "/v1/schedules", tag = "schedules", request_body = CreateSchedule,
    responses(
        (status = 201, description = "The schedule", body = ScheduleView,
            headers(("Location" = String, description = "/v1/schedules/{id}"))),
        CreateScheduleProblems,
    ))]
async fn create_schedule(
    caller: Caller,
    State(state): State<AppState>,
    Json(body): Json<CreateSchedule>,
) -> Result<Response> {
    let now = store::now();
    let mut tx = state.db.begin().await?;
    tx.act_for(caller.name());
    let mut schedule = Schedule {
        id: new_id(),
        name: body.name,
        target: target(&mut tx, body.vm_id, body.selector.as_deref()).await?,
        cron: body.cron.trim().to_owned(),
        timezone: body.timezone.unwrap_or_else(|| "UTC".into()),
        enabled: body.enabled.unwrap_or(true),
        name_template: body
            .name_template
            .unwrap_or_else(|| schedule::DEFAULT_NAME_TEMPLATE.into()),
        retention: body.retention.into(),
        consistency: body.consistency,
        quiesce: body.quiesce,
        next_run_at: None,
        created_at: now,
        updated_at: now,
    };
    validate_schedule(&mut schedule)?;
    store::schedules::save(&mut tx, &schedule)
        .await
        .map_err(|e| name_taken(e, || format!("a schedule named {} exists", schedule.name)))?;
    tx.commit().await?;
    let location = format!("/v1/schedules/{}", schedule.id);
    Ok(located(
        StatusCode::CREATED,
        view(schedule, None),
        &location,
    ))
}

problems!(ListSchedulesProblems = PAGED);

/// List schedules.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules", params(ScheduleFilter, PageQuery),
    responses(
        (status = 200, description = "One page of schedules in id order", body = ScheduleList),
        ListSchedulesProblems,
    ))]
async fn list_schedules(
    State(state): State<AppState>,
    Query(filter): Query<ScheduleFilter>,
    Query(page_query): Query<PageQuery>,
) -> Result<axum::Json<ScheduleList>> {
    let (limit, cursor) = page_query.parse()?;
    let mut conn = state.db.reader().await?;
    let rows = store::schedules::list(&mut conn, filter.vm_id, cursor, limit + 1).await?;
    let (rows, next_cursor) = page(rows, limit, |s| s.id);
    let mut items = Vec::with_capacity(rows.len());
    for schedule in rows {
        let last = store::schedules::last_run(&mut conn, schedule.id).await?;
        items.push(view(schedule, last));
    }
    Ok(axum::Json(ScheduleList { items, next_cursor }))
}

problems!(GetScheduleProblems = SCHEDULE);

/// Get a schedule with its next and last run.
#[utoipa::path(get, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleView),
        GetScheduleProblems,
    ))]
async fn get_schedule(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<ScheduleView>> {
    let schedule = find_schedule(&mut *state.db.reader().await?, &id).await?;
    Ok(axum::Json(view_with_last(&state, schedule).await?))
}

problems!(PatchScheduleProblems = JSON_BODY, NAMED, VM, SCHEDULE);

/// Change a schedule. A new cron expression, time zone or `enabled: true` computes the
/// next run from now (missed runs are not caught up).
#[utoipa::path(patch, path = "/v1/schedules/{id}", tag = "schedules", request_body = PatchSchedule,
    params(("id" = Uuid, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "The updated schedule", body = ScheduleView),
        PatchScheduleProblems,
    ))]
async fn patch_schedule(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<PatchSchedule>,
) -> Result<axum::Json<ScheduleView>> {
    let mut tx = state.db.begin().await?;
    tx.act_for(caller.name());
    let mut schedule = find_schedule(&mut tx, &id).await?;
    let timing_before = (
        schedule.cron.clone(),
        schedule.timezone.clone(),
        schedule.enabled,
    );
    if body.vm_id.is_some() || body.selector.is_some() {
        schedule.target = target(&mut tx, body.vm_id, body.selector.as_deref()).await?;
    }
    if let Some(name) = body.name {
        schedule.name = name;
    }
    if let Some(cron) = body.cron {
        schedule.cron = cron.trim().to_owned();
    }
    if let Some(timezone) = body.timezone {
        schedule.timezone = timezone;
    }
    if let Some(enabled) = body.enabled {
        schedule.enabled = enabled;
    }
    if let Some(template) = body.name_template {
        schedule.name_template = template;
    }
    if let Some(retention) = body.retention {
        schedule.retention = retention.into();
    }
    if let Some(consistency) = body.consistency {
        schedule.consistency = consistency;
    }
    if let Some(quiesce) = body.quiesce {
        schedule.quiesce = quiesce;
    }
    let next_run_at = schedule.next_run_at;
    validate_schedule(&mut schedule)?;
    let timing_after = (
        schedule.cron.clone(),
        schedule.timezone.clone(),
        schedule.enabled,
    );
    if timing_before == timing_after {
        // Same timing: keep the run that was due, even one already missed.
        schedule.next_run_at = next_run_at;
    }
    schedule.updated_at = store::now();
    store::schedules::save(&mut tx, &schedule)
        .await
        .map_err(|e| name_taken(e, || format!("a schedule named {} exists", schedule.name)))?;
    tx.commit().await?;
    Ok(axum::Json(view_with_last(&state, schedule).await?))
}

problems!(DeleteScheduleProblems = SCHEDULE);

/// Delete a schedule and its run history. Its snapshots stay, as manual snapshots that
/// no policy prunes any more; a run in progress finishes its snapshots.
#[utoipa::path(delete, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path, description = "Schedule id")),
    responses(
        (status = 204, description = "Deleted"),
        DeleteScheduleProblems,
    ))]
async fn delete_schedule(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let mut tx = state.db.begin().await?;
    tx.act_for(caller.name());
    let schedule = find_schedule(&mut tx, &id).await?;
    store::schedules::delete(&mut tx, schedule.id).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

problems!(ListRunsProblems = PAGED, SCHEDULE);

/// A schedule's runs, newest first.
#[utoipa::path(get, path = "/v1/schedules/{id}/runs", tag = "schedules",
    params(("id" = Uuid, Path, description = "Schedule id"), PageQuery),
    responses(
        (status = 200, description = "One page of runs, newest first", body = RunList),
        ListRunsProblems,
    ))]
async fn list_runs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(page_query): Query<PageQuery>,
) -> Result<axum::Json<RunList>> {
    let (limit, cursor) = page_query.parse()?;
    let mut conn = state.db.reader().await?;
    let schedule = find_schedule(&mut conn, &id).await?;
    let rows = store::schedules::runs(&mut conn, schedule.id, cursor, limit + 1).await?;
    let (rows, next_cursor) = page(rows, limit, |r| r.id);
    Ok(axum::Json(RunList {
        items: rows.into_iter().map(run_view).collect(),
        next_cursor,
    }))
}

problems!(GetRunProblems = SCHEDULE; RunNotFound);

/// One run, with what it did per VM and what retention decided after it.
#[utoipa::path(get, path = "/v1/schedules/{id}/runs/{run_id}", tag = "schedules",
    params(("id" = Uuid, Path, description = "Schedule id"), ("run_id" = Uuid, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = RunView),
        GetRunProblems,
    ))]
async fn get_run(
    State(state): State<AppState>,
    Path((id, run_id)): Path<(String, String)>,
) -> Result<axum::Json<RunView>> {
    let mut conn = state.db.reader().await?;
    let schedule = find_schedule(&mut conn, &id).await?;
    let run_id = parse_id(&run_id, ErrorCode::RunNotFound, "run")?;
    let run = store::schedules::get_run(&mut conn, schedule.id, run_id)
        .await?
        .ok_or_else(|| {
            Error::problem(
                ErrorCode::RunNotFound,
                format!("run {run_id} does not exist"),
            )
        })?;
    Ok(axum::Json(run_view(run)))
}

problems!(TriggerRunProblems = SCHEDULE; ScheduleBusy);

/// Run a schedule now (enabled or not). The run is recorded like a cron run; a VM that
/// cannot be snapshotted now (running, not ready) is skipped with the reason. The
/// schedule's next cron run is unchanged.
#[utoipa::path(post, path = "/v1/schedules/{id}/run", tag = "schedules",
    params(("id" = Uuid, Path, description = "Schedule id")),
    responses(
        (status = 202, description = "The run: `running` with its snapshot jobs queued, or `skipped` with the reason", body = RunView,
            headers(("Location" = String, description = "/v1/schedules/{id}/runs/{run_id}"))),
        TriggerRunProblems,
    ))]
async fn trigger_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let schedule = find_schedule(&mut *state.db.reader().await?, &id).await?;
    let run = runs::start(
        &state.db,
        &state.engine,
        schedule.id,
        RunTrigger::Manual,
        store::now(),
        state.run_history,
        caller.name(),
    )
    .await?
    .ok_or_else(|| Error::Internal("a manual run always starts or is refused".into()))?;
    let location = format!("/v1/schedules/{}/runs/{}", schedule.id, run.id);
    Ok(located(StatusCode::ACCEPTED, run_view(run), &location))
}

problems!(PreviewProblems = SCHEDULE);

/// Dry run of the retention policy: which of the schedule's snapshots it keeps (and by
/// which rules) and which it prunes now, and whether a prune would be held. Changes
/// nothing.
#[utoipa::path(get, path = "/v1/schedules/{id}/preview", tag = "schedules",
    params(("id" = Uuid, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "The decision for each snapshot of the schedule", body = Preview),
        PreviewProblems,
    ))]
async fn preview(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Preview>> {
    let schedule = find_schedule(&mut *state.db.reader().await?, &id).await?;
    let now = store::now();
    let decisions = prune::decisions(&state.db, &schedule, now).await?;
    let mut items = Vec::with_capacity(decisions.len());
    for (snapshot, decision) in decisions {
        let (action, keep_reasons, prune_reason) = match decision {
            Decision::Keep(reasons) => (PreviewAction::Keep, reasons, None),
            Decision::Prune(why) => (PreviewAction::Prune, Vec::new(), Some(why)),
        };
        let held = match action {
            PreviewAction::Prune => {
                match accept::check(
                    &state.engine,
                    JobSpec::SnapshotDelete(SnapshotDelete::of(&snapshot)),
                )
                .await
                {
                    Ok(_) => None,
                    Err(e) if prune::is_hold(&e) => Some(Held {
                        code: e.code().as_str().to_owned(),
                        reason: e.to_string(),
                    }),
                    Err(e) => return Err(e),
                }
            }
            PreviewAction::Keep => None,
        };
        items.push(PreviewItem {
            vm_id: snapshot.vm_id,
            snapshot_id: snapshot.id,
            snapshot_name: snapshot.name,
            created_at: snapshot.created_at,
            hold: snapshot.hold,
            expires_at: snapshot.expires_at,
            action,
            keep_reasons,
            prune_reason,
            held,
        });
    }
    let prune_count = items
        .iter()
        .filter(|i| matches!(i.action, PreviewAction::Prune))
        .count();
    let next_runs = match CronSpec::parse(&schedule.cron, &schedule.timezone) {
        Ok(spec) if schedule.enabled => spec.upcoming(now, 5),
        // A schedule's cron was checked when it was saved; one the parser no longer
        // takes has no runs to show (the scheduler skips it and says why in its runs).
        _ => Vec::new(),
    };
    Ok(axum::Json(Preview {
        evaluated_at: now,
        next_runs,
        keep_count: items.len() - prune_count,
        prune_count,
        items,
    }))
}
