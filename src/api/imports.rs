//! `POST /v1/templates/import`: a new template from an image file, sent as the request
//! body (streamed to disk, never held in memory) or named by a path inside the
//! operator's import directory.
//!
//! Every imported file is hostile until proven otherwise. It is staged in
//! `<data>/imports/`, then, before a qemu tool opens it, its header is read by
//! `domain::image` (declared format, backing file, external data file, encryption,
//! virtual size, truncation); then `qemu-img info` and `check` run on it as the
//! declared format only, under CPU and memory limits. Only then is the template
//! recorded and a job converts the upload into a fresh qcow2 file. Any rejection is a
//! 4xx problem with a specific code and leaves nothing behind.

use std::path::{Component, Path as FsPath, PathBuf};

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::Query;
use super::problem::problems;
use super::{AppState, accepted};
use crate::domain::image::ImageFormat;
use crate::domain::{Disk, JobSpec, ResourceStatus, Vm, VmKind, job_spec, new_id, validate};
use crate::error::{Error, ErrorCode, Result};
use crate::files as storage;
use crate::jobs::{NewRecords, Request};
use crate::store;

pub const IMPORT_PATH: &str = "/v1/templates/import";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(import_template))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// The new template's name.
    pub name: String,
    /// What the file is: `qcow2` or `raw`. It must match the content.
    pub format: ImageFormat,
    /// Import this file, relative to the service's `--import-dir`, instead of the body.
    pub path: Option<String>,
    /// Name of the template's disk (default `root`).
    pub disk_name: Option<String>,
    #[serde(default)]
    pub description: String,
}

/// Removes the staged upload unless the import job took it over.
struct Staged {
    path: PathBuf,
    keep: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

problems!(ImportTemplateProblems = NAMED; ValidationFailed, ImportPathRefused, RequestTimeout, PayloadTooLarge, ImageFormatMismatch, ImageHasBackingFile, ImageHasDataFile, ImageEncrypted, ImageTooLarge, ImageTruncated, ImageCorrupt, ImageInvalid, ImportsBusy);

/// Import an image as a new template. Send the file as the body
/// (`curl -X POST -T disk.qcow2 -H 'Content-Type: application/octet-stream'
/// "$API/v1/templates/import?name=debian&format=qcow2"`: `-T` streams the file, and
/// alone would send PUT; up to
/// `--import-max-bytes`; the upload has no overall time limit, but may not stall for
/// longer than `--request-timeout-secs`) or give `path` inside `--import-dir`. The template exists at
/// once with status `creating`; the job converts the image into a fresh qcow2 file.
#[utoipa::path(post, path = "/v1/templates/import", tag = "templates", params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The image file (leave empty with `path`)"),
    responses(
        (status = 202, description = "The `template_import` job; `target.id` is the template", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        ImportTemplateProblems,
    ))]
async fn import_template(
    State(state): State<AppState>,
    caller: super::auth::Caller,
    Query(query): Query<ImportQuery>,
    body: Body,
) -> Result<Response> {
    validate::name("name", &query.name).map_err(Error::validation)?;
    let disk_name = query.disk_name.clone().unwrap_or_else(|| "root".into());
    validate::name("disk_name", &disk_name).map_err(Error::validation)?;
    validate::description(&query.description).map_err(Error::validation)?;
    let volumes_dir = state.files.volumes_dir();
    let upload = new_id();
    let path = storage::upload_path(volumes_dir, upload);
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut staged = Staged { path, keep: false };
    match &query.path {
        Some(relative) => stage_from_dir(&state, relative, &staged.path).await?,
        None => {
            stage_body(
                body,
                &staged.path,
                state.import.max_bytes,
                state.request_timeout,
            )
            .await?
        }
    }

    // Reading an untrusted image costs CPU and memory (capped per run): only so many
    // at once, the rest come back later.
    let _slot = state.engine.try_import_slot()?;
    let inspection = state
        .files
        .inspect_image(&staged.path, query.format, state.max_disk_size)
        .await?;
    let copy_bytes = state
        .files
        .measure_image(&staged.path, query.format)
        .await?;
    state.files.require_room_for_copy(copy_bytes)?;

    let now = store::now();
    let template = Vm {
        kind: VmKind::Template,
        ..Vm::new(query.name.clone(), query.description.clone(), now)
    };
    let disk = Disk {
        id: new_id(),
        vm_id: template.id,
        name: disk_name,
        size_bytes: inspection.virtual_size,
        status: ResourceStatus::Creating,
        active_volume_id: None,
        created_at: now,
    };
    let spec = JobSpec::TemplateImport(job_spec::TemplateImport {
        template: template.id,
        upload,
        format: inspection.format,
        copy_bytes,
    });
    let template_id = template.id;
    let records = NewRecords::Vms(vec![(template, vec![disk])]);
    let request = Request::creating(spec, records).by(caller.name());
    let job = crate::jobs::accept(&state.engine, request).await?;
    // From here the job owns the upload and removes it when it ends.
    staged.keep = true;
    tracing::info!(template = %template_id, copy_bytes, virtual_size = inspection.virtual_size, "image accepted for import");
    Ok(accepted(job.into()))
}

/// Stream the request body into `path`, refusing more than `limit` bytes. The upload
/// may take as long as it needs, but not stall: no data for `idle` ends it (408).
async fn stage_body(
    body: Body,
    path: &FsPath,
    limit: u64,
    idle: std::time::Duration,
) -> Result<()> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    loop {
        let Ok(next) = tokio::time::timeout(idle, stream.next()).await else {
            return Err(Error::problem(
                ErrorCode::RequestTimeout,
                format!("the upload sent nothing for {} s", idle.as_secs()),
            ));
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            Error::problem(
                ErrorCode::ValidationFailed,
                format!("reading the upload failed: {e}"),
            )
        })?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(too_large(limit));
        }
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    Ok(())
}

fn too_large(limit: u64) -> Error {
    Error::problem(
        ErrorCode::PayloadTooLarge,
        format!("the image is larger than the import limit of {limit} bytes (--import-max-bytes)"),
    )
}

/// Copy a file from the import directory. The file is opened once, without following
/// a symlink in its last component and without blocking on a FIFO; where the open
/// handle really leads is then read back from /proc and must lie inside the directory
/// (a component swapped for a symlink between a check and the open cannot lead out),
/// it must be a regular file with one link (a hard link could reach any file), and it
/// is copied from that same handle, at most `--import-max-bytes`. A copy, so the file
/// checked is the file converted even if the original changes afterwards.
async fn stage_from_dir(state: &AppState, relative: &str, target: &FsPath) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    let refused = |why: String| Error::problem(ErrorCode::ImportPathRefused, why);
    let Some(dir) = &state.import.dir else {
        return Err(refused(
            "imports from a path are off: the service runs without --import-dir".into(),
        ));
    };
    let relative_path = FsPath::new(relative);
    if relative.is_empty()
        || relative_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(refused(format!(
            "path {relative:?} must be relative to the import directory, without '..'"
        )));
    }
    let root = tokio::fs::canonicalize(dir).await?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(root.join(relative_path))
        .map_err(|_| refused(format!("no file {relative:?} in the import directory")))?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    if !real.starts_with(&root) {
        return Err(refused(format!(
            "path {relative:?} leads out of the import directory"
        )));
    }
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(refused(format!("{relative:?} is not a regular file")));
    }
    if metadata.nlink() != 1 {
        return Err(refused(format!(
            "{relative:?} has other hard links; copy it into the import directory instead"
        )));
    }
    let limit = state.import.max_bytes;
    if metadata.len() > limit {
        return Err(too_large(limit));
    }
    let mut source = tokio::fs::File::from_std(file).take(limit + 1);
    let mut staged = tokio::fs::File::create(target).await?;
    let copied = tokio::io::copy(&mut source, &mut staged).await?;
    if copied > limit {
        return Err(too_large(limit));
    }
    staged.sync_all().await?;
    Ok(())
}
