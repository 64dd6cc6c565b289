//! Time-driven policies. They only ever enqueue ordinary jobs (through
//! `jobs::requests`), never touch files. For now: the expiry sweep, which deletes
//! snapshots past their `expires_at` unless they are on hold.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::{Timestamp, Uuid};
use crate::error::Result;
use crate::jobs::{Engine, requests};
use crate::store;

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Snapshots whose deletion was queued.
    pub queued: Vec<Uuid>,
    /// Expired snapshots left for a later sweep, with the reason (VM busy, running,
    /// short of space...).
    pub deferred: Vec<(Uuid, String)>,
}

/// Queue the deletion of expired snapshots, oldest expiry first. Merges are spread out:
/// at most one per VM, none on a VM that still has jobs in flight, and no more per
/// sweep than there are workers, so a backlog drains over several sweeps instead of
/// flooding the disks at once.
pub async fn sweep_expired(engine: &Engine, now: Timestamp) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let expired = store::snapshots::expired(&mut *engine.db.reader().await?, now).await?;
    let mut vms_seen = HashSet::new();
    for snapshot in expired {
        if !vms_seen.insert(snapshot.vm_id) {
            report.deferred.push((
                snapshot.id,
                "another expired snapshot of the VM goes first".into(),
            ));
            continue;
        }
        if report.queued.len() >= engine.config.workers.max(1) {
            report
                .deferred
                .push((snapshot.id, "the sweep's share of merges is used up".into()));
            continue;
        }
        let pending =
            store::jobs::pending_for_vm(&mut *engine.db.reader().await?, snapshot.vm_id).await?;
        if !pending.is_empty() {
            report
                .deferred
                .push((snapshot.id, "the VM has jobs in flight".into()));
            continue;
        }
        match requests::delete_snapshot(engine, snapshot.id).await {
            Ok(job) => {
                tracing::info!(snapshot = %snapshot.id, job = %job.id, "expired snapshot queued for deletion");
                report.queued.push(snapshot.id);
            }
            Err(e)
                if !e.code().status().is_server_error()
                    || e.code() == crate::error::ErrorCode::InsufficientStorage =>
            {
                tracing::info!(snapshot = %snapshot.id, reason = %e, "expired snapshot kept for now");
                report.deferred.push((snapshot.id, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Run the expiry sweep every `interval` until `shutdown` turns true.
pub fn spawn_expiry_sweep(
    engine: Arc<Engine>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            if let Err(e) = sweep_expired(&engine, store::now()).await {
                tracing::error!(error = %e, "expiry sweep failed");
            }
        }
    })
}
