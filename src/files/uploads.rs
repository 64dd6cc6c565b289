//! Uploaded images waiting in `<data>/imports/` for their `template_import` job. An
//! upload belongs to its job: removed when the job ends (imported, failed or
//! cancelled); at start, any upload no unfinished job names (left by a crash while it
//! was being received or checked, or after its job ended) is removed.

use crate::domain::{JobKind, Uuid};
use crate::error::Result;
use crate::store;

use super::Files;

pub async fn remove(files: &Files, upload: Uuid) {
    let path = super::upload_path(&files.volumes_dir, upload);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "removing an upload failed"),
    }
}

/// At start: remove every file in the imports directory that no queued or running
/// import job needs and that is older than `started` (an upload begun since is being
/// received right now).
pub async fn prune(files: &Files, started: std::time::SystemTime) -> Result<usize> {
    let dir = super::data_subdir(&files.volumes_dir, "imports");
    let mut entries = match tokio::fs::read_dir(&dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let pending =
        store::jobs::pending_of_kind(&mut *files.db.reader().await?, JobKind::TemplateImport)
            .await?;
    let needed: Vec<Uuid> = pending.iter().filter_map(|job| job.spec.upload()).collect();
    let mut removed = 0;
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let upload: Option<Uuid> = name.strip_suffix(".upload").and_then(|id| id.parse().ok());
        let recent = entry
            .metadata()
            .await
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified >= started);
        if !recent && upload.is_none_or(|u| !needed.contains(&u)) {
            tokio::fs::remove_file(entry.path()).await?;
            removed += 1;
        }
    }
    Ok(removed)
}
