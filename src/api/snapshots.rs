//! `/v1/vms/{id}/snapshots` and `/v1/snapshots/{id}`: the snapshot tree of a VM.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse as _, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::extract::{Json, Query, parse_id};
use super::problem::problems;
use super::vms::find_vm;
use super::{AppState, PageQuery, Views, accept_job, page};
use crate::domain::{
    Consistency, JobSpec, Quiesce, ResourceStatus, Snapshot, SnapshotConsistency, Uuid, Vm,
    job_spec, plan, validate,
};
use crate::error::{Error, ErrorCode, Result};
use crate::files as storage;
use crate::jobs::accept::name_taken;
use crate::jobs::{NewSnapshot, Request};
use crate::store;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(
            list_snapshots,
            create_snapshot,
            delete_all_snapshots
        ))
        .routes(routes!(get_snapshot, patch_snapshot, delete_snapshot))
        .routes(routes!(revert_snapshot))
}

/// The layer a snapshot froze on one disk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotVolume {
    pub disk_id: Uuid,
    pub volume_id: Uuid,
    /// Absolute path of the frozen qcow2 file.
    pub path: String,
    /// Bytes the file takes on disk: what the snapshot keeps on this disk, since the
    /// file holds only what the guest changed after the snapshot before it (a merge
    /// into it grows it). Measured at most a second ago.
    pub allocated_bytes: u64,
}

/// A restore point covering every disk the VM had when it was taken.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "id": "019a6f5e-1111-7b3e-9f2a-3c4d5e6f7a8b", "vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b",
    "name": "before-upgrade", "description": "", "parent_id": null, "created_at": "2026-11-21T10:00:00Z",
    "status": "ready", "is_current": true, "expires_at": null, "hold": false, "schedule_id": null,
    "consistency": "filesystem", "volumes": [{"disk_id": "019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a8b", "volume_id": "019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a8b",
        "path": "/var/lib/strata/volumes/019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a8b.qcow2", "allocated_bytes": 1048576}]
}))]
pub struct SnapshotView {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub name: String,
    pub description: String,
    /// The snapshot this one was taken after (its parent in the tree).
    pub parent_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// `error`: a deletion failed part-way; the snapshot cannot be reverted to, only
    /// deleted again.
    pub status: ResourceStatus,
    /// True for the snapshot the VM's present state grows from.
    pub is_current: bool,
    /// When the periodic sweep deletes the snapshot (unless `hold`).
    pub expires_at: Option<DateTime<Utc>>,
    /// Never pruned, by expiry or by a retention policy, while set.
    pub hold: bool,
    /// The schedule that took the snapshot; absent for manual snapshots, which no
    /// retention policy prunes (only their own `expires_at`).
    pub schedule_id: Option<Uuid>,
    /// `stopped`: taken while the VM was stopped; `crash`: from a running VM, as
    /// after a power loss; `filesystem`: while the guest's file systems were frozen.
    pub consistency: SnapshotConsistency,
    pub volumes: Vec<SnapshotVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub items: Vec<SnapshotView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// The snapshot the present state grows from.
    pub current_snapshot_id: Option<Uuid>,
}

/// A snapshot with the snapshots taken after it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotNode {
    #[serde(flatten)]
    pub snapshot: SnapshotView,
    #[schema(no_recursion)]
    pub children: Vec<SnapshotNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotTree {
    pub vm_id: Uuid,
    pub current_snapshot_id: Option<Uuid>,
    /// Snapshots without a parent (normally one), each with its subtree.
    pub roots: Vec<SnapshotNode>,
}

/// Every snapshot of a VM in creation order, as the read model keeps it
/// (`store::views::VM_SNAPSHOTS`): both listings are cut from it. Not an API type.
#[derive(Debug, Clone, Serialize)]
pub struct VmSnapshots {
    pub current_snapshot_id: Option<Uuid>,
    pub items: Vec<SnapshotView>,
}

/// `?view=list` (default) or `?view=tree`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SnapshotListing {
    List(SnapshotList),
    Tree(SnapshotTree),
}

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListView {
    #[default]
    List,
    Tree,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListSnapshotsQuery {
    /// `list` (flat, paginated) or `tree` (nested, whole tree).
    pub view: Option<ListView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "before-upgrade", "description": "kernel 6.12 upgrade", "expires_at": "2099-01-01T00:00:00Z"}))]
pub struct CreateSnapshot {
    /// Unique among the VM's snapshots.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// When the periodic sweep deletes the snapshot (must be in the future).
    pub expires_at: Option<DateTime<Utc>>,
    /// Keep the snapshot whatever its expiry says.
    #[serde(default)]
    pub hold: bool,
    /// For a running VM: freeze its file systems through the guest agent around the
    /// snapshot (`filesystem`), or not (`crash`). Default: `filesystem` when the VM
    /// has a guest-agent socket, else `crash`. A stopped VM's snapshot is `stopped`
    /// whatever is asked.
    pub consistency: Option<Consistency>,
    /// With `filesystem`: `required` fails the job (changing nothing) when the freeze
    /// fails; `best_effort` (the default) takes the snapshot crash-consistent and says
    /// why in the job's `quiesce_error`. Giving it implies `filesystem`.
    pub quiesce: Option<Quiesce>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"expires_at": null, "hold": true}))]
pub struct PatchSnapshot {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A future time to set the expiry, or `null` to clear it.
    #[serde(default, deserialize_with = "super::extract::present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// Put the snapshot on hold (never pruned) or release it.
    pub hold: Option<bool>,
}

/// An expiry must lie ahead: a snapshot to remove now is deleted, not expired.
fn validate_expiry(expires_at: Option<DateTime<Utc>>) -> Result<()> {
    if let Some(at) = expires_at
        && at <= store::now()
    {
        return Err(Error::validation(format!(
            "expires_at {at} is not in the future"
        )));
    }
    Ok(())
}

pub(crate) fn snapshot_view(views: Views, vm: &Vm, snapshot: Snapshot) -> SnapshotView {
    let dir = views.volumes_dir;
    SnapshotView {
        is_current: vm.current_snapshot_id == Some(snapshot.id),
        id: snapshot.id,
        vm_id: snapshot.vm_id,
        name: snapshot.name,
        description: snapshot.description,
        parent_id: snapshot.parent_id,
        created_at: snapshot.created_at,
        status: snapshot.status,
        expires_at: snapshot.expires_at,
        hold: snapshot.hold,
        schedule_id: snapshot.schedule_id,
        consistency: snapshot.consistency,
        volumes: snapshot
            .volumes
            .into_iter()
            .map(|(disk_id, volume_id)| {
                let path = storage::volume_path(dir, volume_id);
                SnapshotVolume {
                    disk_id,
                    volume_id,
                    allocated_bytes: storage::shown_allocation(&path),
                    path: path.display().to_string(),
                }
            })
            .collect(),
    }
}

/// The snapshots as a forest, each node's children in the order given (creation
/// order). Snapshots whose parent is not among them are left out, as unreachable.
fn build_tree(views: Vec<SnapshotView>) -> Vec<SnapshotNode> {
    let mut children: HashMap<Option<Uuid>, Vec<SnapshotView>> = HashMap::new();
    for view in views {
        children.entry(view.parent_id).or_default().push(view);
    }
    fn nodes(
        parent: Option<Uuid>,
        children: &mut HashMap<Option<Uuid>, Vec<SnapshotView>>,
    ) -> Vec<SnapshotNode> {
        let mine = children.remove(&parent).unwrap_or_default();
        mine.into_iter()
            .map(|snapshot| {
                let children = nodes(Some(snapshot.id), children);
                SnapshotNode { snapshot, children }
            })
            .collect()
    }
    nodes(None, &mut children)
}

async fn find_snapshot(conn: &mut sqlx::SqliteConnection, id: &str) -> Result<(Snapshot, Vm)> {
    crate::jobs::find_snapshot(conn, parse_id(id, ErrorCode::SnapshotNotFound, "snapshot")?).await
}

problems!(CreateSnapshotProblems = JSON_BODY, NAMED, VM, CHAIN_JOB; VmHasNoDisks, GuestAgentUnavailable);

/// Take a snapshot of every disk of a (stopped) VM at once.
#[utoipa::path(post, path = "/v1/vms/{id}/snapshots", tag = "snapshots", request_body = CreateSnapshot,
    params(("id" = Uuid, Path, description = "VM id")),
    responses(
        (status = 202, description = "The snapshot exists with status `creating`", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        CreateSnapshotProblems,
    ))]
async fn create_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<CreateSnapshot>,
) -> Result<Response> {
    validate::name("name", &body.name).map_err(Error::validation)?;
    validate::description(&body.description).map_err(Error::validation)?;
    validate_expiry(body.expires_at)?;
    let mut conn = state.db.reader().await?;
    let vm = find_vm(&mut conn, &id).await?;
    // Refused now rather than accepted and failed later: each disk gets a new overlay.
    let disks = store::vms::list_disks(&mut conn, vm.id).await?.len() as u64;
    drop(conn);
    state
        .engine
        .require_free_space(disks.max(1) * plan::EMPTY_IMAGE_BYTES, 0)?;
    let new = NewSnapshot {
        name: body.name,
        description: body.description,
        expires_at: body.expires_at,
        hold: body.hold,
        schedule_id: None,
        consistency: body.consistency,
        quiesce: body.quiesce,
    };
    accept_job(&state, &caller, new.request(&vm)).await
}

problems!(ListSnapshotsProblems = PAGED, VM);

/// List a VM's snapshots (flat and paginated, or as a tree).
#[utoipa::path(get, path = "/v1/vms/{id}/snapshots", tag = "snapshots",
    params(("id" = Uuid, Path, description = "VM id"), ListSnapshotsQuery, PageQuery),
    responses(
        (status = 200, description = "`SnapshotList` for `view=list`, `SnapshotTree` for `view=tree`", body = SnapshotListing),
        ListSnapshotsProblems,
    ))]
async fn list_snapshots(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ListSnapshotsQuery>,
    Query(page_query): Query<PageQuery>,
) -> Result<axum::Json<SnapshotListing>> {
    let (limit, cursor) = page_query.parse()?;
    let vm_id = parse_id(&id, ErrorCode::VmNotFound, "VM")?;
    // Refreshed below, only for what is answered.
    let kept = state
        .read_model
        .view(store::views::VM_SNAPSHOTS, vm_id, |_: &mut VmSnapshots| {});
    let Some(all) = kept.await? else {
        // Not a VM: which answer (none, or a template).
        find_vm(&mut *state.db.reader().await?, &id).await?;
        return Err(Error::problem(
            ErrorCode::VmNotFound,
            format!("VM {id} does not exist"),
        ));
    };
    let VmSnapshots {
        current_snapshot_id,
        mut items,
    } = all;
    Ok(axum::Json(match query.view.unwrap_or_default() {
        ListView::List => {
            // Creation order is id order (UUIDv7): the page starts after the cursor.
            let start = cursor.map_or(0, |c| items.partition_point(|s| s.id <= c));
            let rows: Vec<SnapshotView> = items.drain(start..).take(limit as usize + 1).collect();
            let (mut rows, next_cursor) = page(rows, limit, |s| s.id);
            rows.iter_mut().for_each(refresh_snapshot);
            SnapshotListing::List(SnapshotList {
                items: rows,
                next_cursor,
                current_snapshot_id,
            })
        }
        ListView::Tree => {
            items.iter_mut().for_each(refresh_snapshot);
            SnapshotListing::Tree(SnapshotTree {
                vm_id,
                current_snapshot_id,
                roots: build_tree(items),
            })
        }
    }))
}

problems!(GetSnapshotProblems = SNAPSHOT);

/// Get one snapshot.
#[utoipa::path(get, path = "/v1/snapshots/{id}", tag = "snapshots", params(("id" = Uuid, Path, description = "Snapshot id")),
    responses(
        (status = 200, description = "The snapshot", body = SnapshotView),
        GetSnapshotProblems,
    ))]
async fn get_snapshot(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let snapshot_id = parse_id(&id, ErrorCode::SnapshotNotFound, "snapshot")?;
    let kept = state
        .read_model
        .kept::<SnapshotView>("snapshot", snapshot_id);
    if let Some(kept) = kept.await? {
        let json = state.read_model.json(&kept, refresh_snapshot)?;
        return Ok(super::json_answer(json));
    }
    let mut conn = state.db.reader().await?;
    let (snapshot, vm) = find_snapshot(&mut conn, &id).await?;
    Ok(axum::Json(snapshot_view(state.views(), &vm, snapshot)).into_response())
}

/// Each layer's allocation, as it is now (a merge into it grows it).
pub(crate) fn refresh_snapshot(view: &mut SnapshotView) {
    for volume in &mut view.volumes {
        volume.allocated_bytes = storage::shown_allocation(std::path::Path::new(&volume.path));
    }
}

problems!(DeleteSnapshotProblems = SNAPSHOT, CHAIN_JOB, READ_BY_CLONES; SnapshotBusy, SnapshotNotReady);

/// Delete a snapshot. Every other snapshot and the present state keep their exact
/// content: the layer is dropped if nothing sits on it, else merged with its child in
/// the cheaper direction (the job's `detail.merges` tells which).
#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots", params(("id" = Uuid, Path, description = "Snapshot id"), super::FlattenQuery),
    responses(
        (status = 202, description = "The snapshot is `deleting`", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        DeleteSnapshotProblems,
    ))]
async fn delete_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<super::FlattenQuery>,
) -> Result<Response> {
    let (snapshot, vm) = find_snapshot(&mut *state.db.reader().await?, &id).await?;
    let spec = JobSpec::SnapshotDelete(job_spec::SnapshotDelete {
        vm: vm.id,
        snapshot: snapshot.id,
        previous_status: snapshot.status,
        flatten: query.flatten(),
    });
    accept_job(&state, &caller, Request::new(spec)).await
}

problems!(DeleteAllSnapshotsProblems = VM, CHAIN_JOB, READ_BY_CLONES; SnapshotBusy, SnapshotNotReady);

/// Delete every snapshot of a VM: each disk collapses into one file holding the
/// present state.
#[utoipa::path(delete, path = "/v1/vms/{id}/snapshots", tag = "snapshots", params(("id" = Uuid, Path, description = "VM id")),
    responses(
        (status = 202, description = "All snapshots are `deleting`", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        DeleteAllSnapshotsProblems,
    ))]
async fn delete_all_snapshots(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let vm = find_vm(&mut *state.db.reader().await?, &id).await?;
    let spec = JobSpec::SnapshotDeleteAll(job_spec::SnapshotDeleteAll {
        vm: vm.id,
        // Listed by the accept transaction: exactly the snapshots it flags.
        snapshots: Vec::new(),
    });
    accept_job(&state, &caller, Request::new(spec)).await
}

problems!(RevertSnapshotProblems = SNAPSHOT, CHAIN_JOB; SnapshotNotReady);

/// Revert the VM to a snapshot: its present state is replaced by a new empty layer on
/// the snapshot. Later snapshots stay in the tree (writing now opens a new branch).
#[utoipa::path(post, path = "/v1/snapshots/{id}/revert", tag = "snapshots", params(("id" = Uuid, Path, description = "Snapshot id")),
    responses(
        (status = 202, description = "The revert job was queued", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        RevertSnapshotProblems,
    ))]
async fn revert_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let (snapshot, vm) = find_snapshot(&mut *state.db.reader().await?, &id).await?;
    let spec = JobSpec::SnapshotRevert(job_spec::SnapshotRevert {
        vm: vm.id,
        snapshot: snapshot.id,
    });
    accept_job(&state, &caller, Request::new(spec)).await
}

problems!(PatchSnapshotProblems = JSON_BODY, NAMED, SNAPSHOT; SnapshotBusy);

/// Rename a snapshot, change its description, set or clear its expiry, or put it on
/// hold. Touches no file.
#[utoipa::path(patch, path = "/v1/snapshots/{id}", tag = "snapshots", request_body = PatchSnapshot,
    params(("id" = Uuid, Path, description = "Snapshot id")),
    responses(
        (status = 200, description = "The updated snapshot", body = SnapshotView),
        PatchSnapshotProblems,
    ))]
async fn patch_snapshot(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<PatchSnapshot>,
) -> Result<axum::Json<SnapshotView>> {
    if let Some(name) = &body.name {
        validate::name("name", name).map_err(Error::validation)?;
    }
    if let Some(description) = &body.description {
        validate::description(description).map_err(Error::validation)?;
    }
    if let Some(expires_at) = body.expires_at {
        validate_expiry(expires_at)?;
    }
    let mut tx = state.db.begin().await?;
    tx.act_for(caller.name());
    let (mut snapshot, vm) = find_snapshot(&mut tx, &id).await?;
    if snapshot.status == ResourceStatus::Deleting {
        return Err(Error::problem(
            ErrorCode::SnapshotBusy,
            format!("snapshot {} is being deleted", snapshot.name),
        ));
    }
    if let Some(name) = body.name {
        snapshot.name = name;
    }
    if let Some(description) = body.description {
        snapshot.description = description;
    }
    if let Some(expires_at) = body.expires_at {
        snapshot.expires_at = expires_at;
    }
    if let Some(hold) = body.hold {
        snapshot.hold = hold;
    }
    store::snapshots::update(&mut tx, &snapshot)
        .await
        .map_err(|e| {
            name_taken(e, || {
                format!(
                    "VM {} already has a snapshot named {}",
                    vm.name, snapshot.name
                )
            })
        })?;
    tx.commit().await?;
    Ok(axum::Json(snapshot_view(state.views(), &vm, snapshot)))
}
