//! `/v1/templates`: read-only golden images VMs are deployed from. A template is a VM
//! record of kind `template`, so converting either way copies nothing; its disks are
//! single files that linked VMs sit on.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::clones::{CloneRequest, clone_request};
use super::extract::{Json, Query, parse_id};
use super::problem::problems;
use super::vms::find_vm;
use super::{AppState, PageQuery, Views, accept_job, page};
use crate::domain::plan::CloneMode;
use crate::domain::{ExportKey, JobSpec, ResourceStatus, Uuid, Vm, VmKind, job_spec, validate};
use crate::error::{Error, ErrorCode, Result};
use crate::files as storage;
use crate::files::exports;
use crate::jobs::{Request, require_ready};
use crate::store;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_templates, create_template))
        .routes(routes!(get_template, delete_template))
        .routes(routes!(convert_to_template))
        .routes(routes!(convert_to_vm))
        .routes(routes!(deploy))
        .routes(routes!(export))
        .routes(routes!(manifest))
}

/// Most VMs one deploy request makes.
pub const MAX_DEPLOY: u32 = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateDisk {
    pub id: Uuid,
    pub name: String,
    /// Guest-visible size.
    pub size_bytes: u64,
    /// The template's file for this disk (read-only: VMs deployed linked sit on it).
    pub path: Option<String>,
    pub allocated_bytes: u64,
}

/// A template.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "name": "debian-13", "description": "generalised",
    "status": "ready", "disks": [{"id": "019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a8b", "name": "root",
        "size_bytes": 10737418240u64, "path": "/var/lib/strata/volumes/019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a8b.qcow2",
        "allocated_bytes": 1503657984u64}],
    "source_vm_id": "019a6f5e-5555-7b3e-9f2a-3c4d5e6f7a8b", "linked_vm_count": 2,
    "linked_vm_ids": ["019a6f5e-6666-7b3e-9f2a-3c4d5e6f7a8b", "019a6f5e-7777-7b3e-9f2a-3c4d5e6f7a8b"],
    "created_at": "2026-11-21T10:00:00Z", "updated_at": "2026-11-21T10:00:00Z"
}))]
pub struct TemplateView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// `creating` while a job makes or converts it.
    pub status: ResourceStatus,
    pub disks: Vec<TemplateDisk>,
    /// The VM the template was made from.
    pub source_vm_id: Option<Uuid>,
    /// VMs whose disks sit on the template's files (deployed linked): while any exist,
    /// the template cannot be deleted or converted back.
    pub linked_vm_count: usize,
    pub linked_vm_ids: Vec<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub items: Vec<TemplateView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TemplateFilter {
    /// Only the template with this name.
    pub name: Option<String>,
}

/// A new template from a full copy of a VM (which stays).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "web-golden", "from_vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b"}))]
pub struct CreateTemplate {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub from_vm_id: Uuid,
    /// Copy this snapshot of the VM (which may then be running); without one, its
    /// present state: a stopped VM's files, or a running VM's disks as its QEMU copies
    /// them at one instant (as a full clone does; with a guest-agent socket the guest's
    /// file systems are frozen around that instant, best effort).
    pub snapshot_id: Option<Uuid>,
}

/// VMs to deploy from a template.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "web", "mode": "linked", "count": 3}))]
pub struct Deploy {
    /// The VM's name, or with `count` the prefix: `name-1` .. `name-N`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `linked`: disks are overlays on the template's files (instant); `full`:
    /// standalone copies.
    pub mode: CloneMode,
    /// Deploy a batch of this many VMs in one job (1 to 1000).
    pub count: Option<u32>,
}

pub(crate) async fn template_view(
    views: Views<'_>,
    conn: &mut sqlx::SqliteConnection,
    template: Vm,
) -> Result<TemplateView> {
    let disks = store::vms::list_disks(conn, template.id).await?;
    let dir = views.volumes_dir;
    let mut linked: Vec<Uuid> = store::vms::dependents_of(conn, template.id)
        .await?
        .into_iter()
        .map(|(_, vm)| vm)
        .collect();
    linked.sort();
    linked.dedup();
    Ok(TemplateView {
        id: template.id,
        name: template.name,
        description: template.description,
        status: template.status,
        disks: disks
            .into_iter()
            .map(|disk| {
                let path = disk.active_volume_id.map(|v| storage::volume_path(dir, v));
                TemplateDisk {
                    id: disk.id,
                    name: disk.name,
                    size_bytes: disk.size_bytes,
                    allocated_bytes: path.as_deref().map_or(0, storage::shown_allocation),
                    path: path.map(|p| p.display().to_string()),
                }
            })
            .collect(),
        source_vm_id: template.source_vm_id,
        linked_vm_count: linked.len(),
        linked_vm_ids: linked,
        created_at: template.created_at,
        updated_at: template.updated_at,
    })
}

pub(crate) async fn find_template(conn: &mut sqlx::SqliteConnection, id: &str) -> Result<Vm> {
    let id = parse_id(id, ErrorCode::TemplateNotFound, "template")?;
    match store::vms::get_vm(conn, id).await? {
        Some(vm) if vm.kind == VmKind::Template => Ok(vm),
        _ => Err(Error::problem(
            ErrorCode::TemplateNotFound,
            format!("template {id} does not exist"),
        )),
    }
}

problems!(ListTemplatesProblems = PAGED);

/// List templates.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", params(TemplateFilter, PageQuery),
    responses(
        (status = 200, description = "One page of templates in creation order", body = TemplateList),
        ListTemplatesProblems,
    ))]
async fn list_templates(
    State(state): State<AppState>,
    Query(filter): Query<TemplateFilter>,
    Query(page_query): Query<PageQuery>,
) -> Result<axum::Json<TemplateList>> {
    let (limit, cursor) = page_query.parse()?;
    let mut conn = state.db.reader().await?;
    let selected = store::vms::VmPage {
        kind: VmKind::Template,
        name: filter.name.as_deref(),
        label: None,
        after: cursor,
        limit: limit + 1,
    };
    let rows = store::vms::list_vms(&mut conn, selected).await?;
    let (rows, next_cursor) = page(rows, limit, |t| t.id);
    let mut items = Vec::with_capacity(rows.len());
    for template in rows {
        items.push(template_view(state.views(), &mut conn, template).await?);
    }
    Ok(axum::Json(TemplateList { items, next_cursor }))
}

problems!(GetTemplateProblems = TEMPLATE);

/// Get a template with its disks and the VMs linked to it.
#[utoipa::path(get, path = "/v1/templates/{id}", tag = "templates",
    params(("id" = Uuid, Path, description = "Template id")),
    responses(
        (status = 200, description = "The template", body = TemplateView),
        GetTemplateProblems,
    ))]
async fn get_template(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<TemplateView>> {
    let mut conn = state.db.reader().await?;
    let template = find_template(&mut conn, &id).await?;
    Ok(axum::Json(
        template_view(state.views(), &mut conn, template).await?,
    ))
}

problems!(CreateTemplateProblems = JSON_BODY, NAMED, VM, SNAPSHOT, CHAIN_JOB; VmHasNoDisks, SnapshotNotReady);

/// Make a template from a full copy of a VM (or of one of its snapshots); the VM
/// stays. The template exists at once with status `creating`.
#[utoipa::path(post, path = "/v1/templates", tag = "templates", request_body = CreateTemplate,
    responses(
        (status = 202, description = "The `template_create` job; `target.id` is the template", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        CreateTemplateProblems,
    ))]
async fn create_template(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateTemplate>,
) -> Result<Response> {
    validate::name("name", &body.name).map_err(Error::validation)?;
    validate::description(&body.description).map_err(Error::validation)?;
    let source = find_vm(&mut *state.db.reader().await?, &body.from_vm_id.to_string()).await?;
    let request = CloneRequest {
        snapshot_id: body.snapshot_id,
        mode: CloneMode::Full,
        names: vec![body.name],
        description: body.description,
        kind: VmKind::Template,
        consistency: None,
        quiesce: None,
    };
    let request = clone_request(&state, &source, request, JobSpec::TemplateCreate).await?;
    accept_job(&state, &caller, request).await
}

problems!(ConvertToTemplateProblems = VM, CHAIN_JOB, READ_BY_CLONES; SnapshotBusy, SnapshotNotReady);

/// Convert a VM into a template: it stops being a VM (same id, now under
/// /v1/templates), its snapshots are collapsed into its present state first (merges,
/// like deleting them all), and nothing is copied when each disk is one file.
#[utoipa::path(post, path = "/v1/vms/{id}/convert-to-template", tag = "templates",
    params(("id" = Uuid, Path, description = "VM id")),
    responses(
        (status = 202, description = "The `vm_to_template` job (the VM is `creating` until it ends)", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        ConvertToTemplateProblems,
    ))]
async fn convert_to_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let vm = find_vm(&mut *state.db.reader().await?, &id).await?;
    let spec = JobSpec::VmToTemplate(job_spec::VmToTemplate {
        vm: vm.id,
        // Listed by the accept transaction: exactly the snapshots it flags.
        snapshots: Vec::new(),
    });
    accept_job(&state, &caller, Request::new(spec)).await
}

problems!(ConvertToVmProblems = TEMPLATE, READ_BY_CLONES; VmNotReady);

/// Convert a template back into a VM (same id, under /v1/vms again, stopped).
/// Refused while VMs are linked to it: its files would become writable under them.
#[utoipa::path(post, path = "/v1/templates/{id}/convert-to-vm", tag = "templates",
    params(("id" = Uuid, Path, description = "Template id")),
    responses(
        (status = 202, description = "The `template_to_vm` job", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        ConvertToVmProblems,
    ))]
async fn convert_to_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let template = find_template(&mut *state.db.reader().await?, &id).await?;
    let spec = JobSpec::TemplateToVm(job_spec::TemplateToVm { vm: template.id });
    accept_job(&state, &caller, Request::new(spec)).await
}

problems!(DeployProblems = JSON_BODY, NAMED, TEMPLATE; VmNotReady, InsufficientStorage);

/// Deploy VMs from a template, linked (instant: each disk an overlay on the template's
/// file) or full (standalone copies). With `count`, one job makes `name-1` ..
/// `name-N`; every VM exists at once with status `creating`.
#[utoipa::path(post, path = "/v1/templates/{id}/deploy", tag = "templates", request_body = Deploy,
    params(("id" = Uuid, Path, description = "Template id")),
    responses(
        (status = 202, description = "The `template_deploy` job; `detail.vm_ids` lists the new VMs", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        DeployProblems,
    ))]
async fn deploy(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Deploy>,
) -> Result<Response> {
    let names = match body.count {
        None => vec![body.name.clone()],
        Some(count) if (1..=MAX_DEPLOY).contains(&count) => {
            (1..=count).map(|i| format!("{}-{i}", body.name)).collect()
        }
        Some(_) => {
            return Err(Error::validation(format!(
                "count must be between 1 and {MAX_DEPLOY}"
            )));
        }
    };
    for name in &names {
        validate::name("name", name).map_err(Error::validation)?;
    }
    validate::description(&body.description).map_err(Error::validation)?;
    let template = find_template(&mut *state.db.reader().await?, &id).await?;
    let request = CloneRequest {
        snapshot_id: None,
        mode: body.mode,
        names,
        description: body.description,
        kind: VmKind::Vm,
        consistency: None,
        quiesce: None,
    };
    let request = clone_request(&state, &template, request, JobSpec::TemplateDeploy).await?;
    accept_job(&state, &caller, request).await
}

problems!(DeleteTemplateProblems = TEMPLATE, CHAIN_JOB, READ_BY_CLONES);

/// Delete a template and its files. Refused while VMs are linked to it (the answer
/// lists them): flatten or delete them first, or pass `flatten_dependents=true` to
/// have the same job make every linked VM standalone first (they must be stopped).
#[utoipa::path(delete, path = "/v1/templates/{id}", tag = "templates",
    params(("id" = Uuid, Path, description = "Template id"), super::FlattenQuery),
    responses(
        (status = 202, description = "The template is `deleting`; the `vm_delete` job removes its files", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        DeleteTemplateProblems,
    ))]
async fn delete_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<super::FlattenQuery>,
) -> Result<Response> {
    let template = find_template(&mut *state.db.reader().await?, &id).await?;
    let spec = JobSpec::VmDelete(job_spec::VmDelete {
        vm: template.id,
        previous_status: template.status,
        flatten: query.flatten(),
    });
    accept_job(&state, &caller, Request::new(spec)).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// The disk to export, by name or id (may be left out when the template has only
    /// one disk).
    pub disk: Option<String>,
    /// Compress the qcow2 clusters: a smaller file that is slower to make.
    pub compress: Option<bool>,
    /// Instead of the `Authorization` header, which a browser's download link cannot
    /// send: a ticket from `POST /v1/tickets` (used once, within a minute). Never the
    /// token itself.
    pub ticket: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ManifestQuery {
    /// Describe the compressed exports.
    pub compress: Option<bool>,
}

/// What a template's export holds: one qcow2 file per disk, with its digest.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "template_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "name": "debian-13", "format": "qcow2", "compressed": false,
    "disks": [{"id": "019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a8b", "name": "root", "size_bytes": 10737418240u64,
        "export_bytes": 1504772096u64, "sha256": "9f2c6b0e4d9d1f5a5f1f0d6c3a1e2b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6",
        "url": "/v1/templates/019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b/export?disk=root"}]
}))]
pub struct Manifest {
    pub template_id: Uuid,
    pub name: String,
    pub format: String,
    pub compressed: bool,
    pub disks: Vec<ManifestDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ManifestDisk {
    pub id: Uuid,
    pub name: String,
    /// Guest-visible size.
    pub size_bytes: u64,
    /// Size of the exported file.
    pub export_bytes: u64,
    /// SHA-256 of the exported file, hex.
    pub sha256: String,
    /// Where to download it.
    pub url: String,
}

/// The template's disk a query names (by id or name), or its only disk.
async fn export_disk(
    conn: &mut sqlx::SqliteConnection,
    template: &Vm,
    wanted: Option<&str>,
) -> Result<(String, Uuid)> {
    let disks = store::vms::list_disks(conn, template.id).await?;
    let found = match wanted {
        Some(key) => disks
            .iter()
            .find(|d| d.name == key || d.id.to_string() == key)
            .ok_or_else(|| {
                Error::problem(
                    ErrorCode::DiskNotFound,
                    format!("template {} has no disk {key}", template.name),
                )
            })?,
        None => match disks.as_slice() {
            [only] => only,
            _ => {
                return Err(Error::problem(
                    ErrorCode::InvalidQuery,
                    format!(
                        "template {} has {} disks: name one with ?disk=",
                        template.name,
                        disks.len()
                    ),
                ));
            }
        },
    };
    let volume = found.active_volume_id.ok_or_else(|| {
        Error::problem(
            ErrorCode::DiskNotReady,
            format!("disk {} has no file yet", found.name),
        )
    })?;
    Ok((found.name.clone(), volume))
}

problems!(ExportProblems = TEMPLATE; DiskNotFound, VmNotReady, InsufficientStorage);

/// Download one disk of a template as a self-contained qcow2 file (no backing file),
/// to import on another host. A file already made is sent with `Content-Length`;
/// otherwise it is made while the answer streams (chunked) and kept for later
/// downloads. A failure while streaming aborts the transfer rather than ending it
/// short.
#[utoipa::path(get, path = "/v1/templates/{id}/export", tag = "templates",
    params(("id" = Uuid, Path, description = "Template id"), ExportQuery),
    responses(
        (status = 200, description = "The qcow2 file", content_type = "application/octet-stream", body = Vec<u8>,
            headers(("Content-Disposition" = String, description = "attachment; filename=\"<template>-<disk>.qcow2\""))),
        ExportProblems,
    ))]
async fn export(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ExportQuery>,
) -> Result<Response> {
    let mut conn = state.db.reader().await?;
    let template = find_template(&mut conn, &id).await?;
    require_ready(&template)?;
    let (disk_name, volume) = export_disk(&mut conn, &template, query.disk.as_deref()).await?;
    drop(conn);
    let export = ExportKey {
        volume,
        compress: query.compress.unwrap_or(false),
        generation: template.updated_at.timestamp_micros(),
    };
    let ready = exports::ready_artifact(&state.files, export).await?;
    if ready.is_none() {
        // Refused now, with a proper status, rather than after the 200 has been sent.
        exports::check_room(&state.files, volume).await?;
    }
    let length = match &ready {
        Some(path) => Some(tokio::fs::metadata(path).await?.len()),
        None => None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<axum::body::Bytes>>(4);
    let files = state.files.clone();
    tokio::spawn(async move {
        let sent = async {
            let path = match ready {
                Some(path) => path,
                None => exports::artifact(&files, export)
                    .await
                    .map_err(std::io::Error::other)?,
            };
            let mut file = tokio::fs::File::open(path).await?;
            loop {
                let mut chunk = vec![0u8; 256 << 10];
                let read = tokio::io::AsyncReadExt::read(&mut file, &mut chunk).await?;
                if read == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                chunk.truncate(read);
                if tx.send(Ok(chunk.into())).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
        }
        .await;
        if let Err(e) = sent {
            tracing::error!(%volume, error = %e, "export failed while streaming");
            let _ = tx.send(Err(e)).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(axum::body::Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let file_name: String = format!("{}-{disk_name}.qcow2", template.name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(response)
}

problems!(ManifestProblems = TEMPLATE; VmNotReady, InsufficientStorage);

/// Names, sizes and SHA-256 of each disk's export. The first call for a template makes
/// the exports (if needed) and hashes them; later calls answer from what was kept.
#[utoipa::path(get, path = "/v1/templates/{id}/manifest", tag = "templates",
    params(("id" = Uuid, Path, description = "Template id"), ManifestQuery),
    responses(
        (status = 200, description = "The manifest", body = Manifest),
        ManifestProblems,
    ))]
async fn manifest(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ManifestQuery>,
) -> Result<axum::Json<Manifest>> {
    let mut conn = state.db.reader().await?;
    let template = find_template(&mut conn, &id).await?;
    require_ready(&template)?;
    let disks = store::vms::list_disks(&mut conn, template.id).await?;
    drop(conn);
    let compressed = query.compress.unwrap_or(false);
    let mut items = Vec::with_capacity(disks.len());
    for disk in disks {
        let Some(volume) = disk.active_volume_id else {
            continue;
        };
        let export = ExportKey {
            volume,
            compress: compressed,
            generation: template.updated_at.timestamp_micros(),
        };
        let (export_bytes, sha256) = exports::digest(&state.files, export).await?;
        items.push(ManifestDisk {
            url: format!(
                "/v1/templates/{}/export?disk={}{}",
                template.id,
                disk.id,
                if compressed { "&compress=true" } else { "" }
            ),
            id: disk.id,
            name: disk.name,
            size_bytes: disk.size_bytes,
            export_bytes,
            sha256,
        });
    }
    Ok(axum::Json(Manifest {
        template_id: template.id,
        name: template.name,
        format: "qcow2".into(),
        compressed,
        disks: items,
    }))
}
