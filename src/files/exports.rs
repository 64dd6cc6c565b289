//! Template exports: the self-contained qcow2 file a person downloads for each disk of
//! a template, and its digest for the manifest.
//!
//! A template never changes while it is a template, so an export is made once and
//! kept: a standalone, uncompressed template file is served as it is; anything else (a
//! compressed export, or a template whose disk sits on another template's file) is
//! written once by `qemu-img convert` into `<data>/exports/` and served from there.
//! Artifacts and digests carry the template's *generation* (its `updated_at`, which a
//! conversion to a VM and back changes), so one made before the template was a VM for
//! a while is never served again. Artifacts are written under a temporary name and
//! renamed, so a crash never leaves a partial one that looks finished; `prune` removes
//! those of templates that are gone or changed.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Files;
use crate::domain::{ExportKey, Uuid, VmKind, new_id};
use crate::error::{Error, Result};
use crate::store;

/// Where export artifacts live, beside the volumes.
pub fn exports_dir(files: &Files) -> PathBuf {
    super::data_subdir(&files.volumes_dir, "exports")
}

fn artifact_path(files: &Files, export: &ExportKey) -> PathBuf {
    let kind = if export.compress {
        "compressed"
    } else {
        "plain"
    };
    exports_dir(files).join(format!(
        "{}.{}.{kind}.qcow2",
        export.volume, export.generation
    ))
}

/// The file to serve, if it exists already.
pub async fn ready_artifact(files: &Files, export: ExportKey) -> Result<Option<PathBuf>> {
    let standalone = store::vms::volume_chain(&mut *files.db.reader().await?, export.volume)
        .await?
        .len()
        == 1;
    if standalone && !export.compress {
        return Ok(Some(files.volume_path(export.volume)));
    }
    let path = artifact_path(files, &export);
    Ok(tokio::fs::try_exists(&path).await?.then_some(path))
}

/// One export is written at a time: concurrent requests for the same file wait for
/// the first and then serve it, and many large exports cannot race for the disk.
static WRITING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The file to serve, written first if needed (refused with `insufficient_storage` if
/// the copy would not leave the configured reserve free).
pub async fn artifact(files: &Files, export: ExportKey) -> Result<PathBuf> {
    if let Some(path) = ready_artifact(files, export).await? {
        return Ok(path);
    }
    let _writing = WRITING.lock().await;
    if let Some(path) = ready_artifact(files, export).await? {
        return Ok(path);
    }
    check_room(files, export.volume).await?;
    let dir = exports_dir(files);
    tokio::fs::create_dir_all(&dir).await?;
    let path = artifact_path(files, &export);
    let temp = dir.join(format!("{}.partial", new_id()));
    let written = files
        .qemu
        .convert(
            &files.volume_path(export.volume),
            &temp,
            export.compress,
            None,
            None,
        )
        .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(e.into());
    }
    // Two exports racing write the same bytes; whichever renames last wins.
    tokio::fs::rename(&temp, &path).await?;
    Ok(path)
}

/// Refuse (`insufficient_storage`) when writing an export of `volume` could eat into
/// the reserve: a copy takes at most what its chain holds.
pub async fn check_room(files: &Files, volume: Uuid) -> Result<()> {
    let chain_bytes =
        super::chain_bytes(&files.volumes_dir, &mut *files.db.reader().await?, volume).await?;
    files.require_room_for_copy(chain_bytes)
}

/// Remove every export artifact made from `volume` (any generation), once the volume
/// itself is gone: nothing can ask for them any more, and their space comes back with
/// the template's instead of at the next prune.
pub async fn remove_of(files: &Files, volume: Uuid) -> Result<()> {
    let mut entries = match tokio::fs::read_dir(exports_dir(files)).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let prefix = format!("{volume}.");
    while let Some(entry) = entries.next_entry().await? {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            match tokio::fs::remove_file(entry.path()).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Size and SHA-256 (hex) of an export, computed once per generation and kept.
/// The work runs in its own task: if the request gives up (a large template can take
/// longer than the request timeout), the digest is still finished and kept, and a
/// later request gets it at once.
pub async fn digest(files: &Files, export: ExportKey) -> Result<(u64, String)> {
    if let Some(known) = store::vms::export_digest(&mut *files.db.reader().await?, &export).await? {
        return Ok(known);
    }
    let files = files.clone();
    tokio::spawn(async move {
        let path = artifact(&files, export).await?;
        let (bytes, sha256) = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| Error::Internal(format!("hashing task failed: {e}")))??;
        let mut tx = files.db.begin().await?;
        store::vms::save_export_digest(&mut tx, &export, bytes, &sha256).await?;
        tx.commit().await?;
        Ok((bytes, sha256))
    })
    .await
    .map_err(|e| Error::Internal(format!("digest task failed: {e}")))?
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        total += read as u64;
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((total, hex))
}

/// Remove artifacts no template needs any more (their template was deleted or turned
/// back into a VM) and, at start (`at_start`: no export can be in progress), partial
/// files a crash left.
pub async fn prune(files: &Files, at_start: bool) -> Result<usize> {
    let dir = exports_dir(files);
    let mut entries = match tokio::fs::read_dir(&dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut removed = 0;
    let mut conn = files.db.reader().await?;
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('.');
        let volume: Option<Uuid> = parts.next().and_then(|id| id.parse().ok());
        let generation: Option<i64> = parts.next().and_then(|g| g.parse().ok());
        let keep = match (volume, generation) {
            (Some(volume), Some(generation)) if name.ends_with(".qcow2") => {
                store::vms::volume_owner(&mut conn, volume)
                    .await?
                    .is_some_and(|owner| {
                        owner.kind == VmKind::Template
                            && owner.updated_at.timestamp_micros() == generation
                    })
            }
            _ => !at_start,
        };
        if !keep {
            tokio::fs::remove_file(entry.path()).await?;
            removed += 1;
        }
    }
    Ok(removed)
}
