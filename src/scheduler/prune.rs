//! Pruning: which snapshots go (expired ones, and those outside their schedule's
//! retention policy), and queueing their deletion as ordinary snapshot-delete jobs,
//! oldest first and spread out.
//!
//! Spreading: a pass queues at most one deletion per VM, none on a VM that still has
//! jobs in flight, and never lets more deletions be in flight at once than there are
//! workers. What is left is `deferred` and taken by a later pass (the scheduler runs one
//! whenever jobs have finished and a backlog remains), so a thousand prunes become a
//! steady stream of merges instead of a storm.
//!
//! A snapshot the policy prunes but that cannot be deleted now (its VM runs and the
//! merge touches the live chain, a linked clone depends on it, short of space...) is
//! reported as `held` with the refusal's code and reason, and tried again next pass.

use std::collections::HashMap;

use chrono_tz::Tz;

use crate::domain::job_spec::SnapshotDelete;
use crate::domain::retention::{self, Candidate, Decision, PruneReason};
use crate::domain::{
    JobKind, JobSpec, PruneEntry, PruneReport, Schedule, Snapshot, Timestamp, Uuid,
};
use crate::error::{Error, ErrorCode, Result};
use crate::jobs::{Engine, Request, accept};
use crate::store::{self, Db};

/// The zone a schedule's calendar rules count days in (validated on write).
pub fn schedule_zone(schedule: &Schedule) -> Tz {
    schedule.timezone.parse().unwrap_or(Tz::UTC)
}

/// Judge one schedule's snapshots on one VM (oldest first) with its policy.
pub fn judge(schedule: &Schedule, snapshots: &[Snapshot], now: Timestamp) -> Vec<Decision> {
    let candidates: Vec<Candidate> = snapshots
        .iter()
        .map(|s| Candidate {
            id: s.id,
            created_at: s.created_at,
            scheduled: s.schedule_id == Some(schedule.id),
            hold: s.hold,
            expires_at: s.expires_at,
        })
        .collect();
    retention::evaluate(
        &schedule.retention,
        &candidates,
        now,
        &schedule_zone(schedule),
    )
    .into_iter()
    .map(|(_, decision)| decision)
    .collect()
}

/// A schedule's snapshots with the decision for each, grouped by VM, oldest first.
pub async fn decisions(
    db: &Db,
    schedule: &Schedule,
    now: Timestamp,
) -> Result<Vec<(Snapshot, Decision)>> {
    let snapshots =
        store::snapshots::scheduled(&mut *db.reader().await?, Some(schedule.id), None).await?;
    Ok(judge_all(std::slice::from_ref(schedule), snapshots, now))
}

/// Decide for snapshots sorted by schedule and VM, each group under its schedule.
fn judge_all(
    schedules: &[Schedule],
    snapshots: Vec<Snapshot>,
    now: Timestamp,
) -> Vec<(Snapshot, Decision)> {
    let by_id: HashMap<Uuid, &Schedule> = schedules.iter().map(|s| (s.id, s)).collect();
    let mut out = Vec::with_capacity(snapshots.len());
    for group in snapshots.chunk_by(|a, b| a.schedule_id == b.schedule_id && a.vm_id == b.vm_id) {
        let Some(schedule) = group[0].schedule_id.and_then(|id| by_id.get(&id)) else {
            continue;
        };
        let decided = judge(schedule, group, now);
        out.extend(group.iter().cloned().zip(decided));
    }
    out
}

/// What a pruning pass looks at.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One schedule's snapshots, after its run.
    Schedule(&'a Schedule),
    /// Every snapshot of these VMs: every schedule's policy and every expiry. The
    /// scheduler uses it to refill the deletions a full pass deferred, as soon as the
    /// VMs' jobs finish, without judging every schedule again.
    Vms(&'a [Uuid]),
    /// Every schedule and every expired snapshot: the periodic sweep.
    All,
}

/// Snapshots to delete now, oldest first: those outside the retention of the schedules
/// in scope, and, unless the scope is one schedule, every expired snapshot (manual ones
/// included).
async fn doomed(db: &Db, now: Timestamp, scope: Scope<'_>) -> Result<Vec<(Snapshot, PruneReason)>> {
    let mut conn = db.reader().await?;
    let (schedule, vms) = match scope {
        Scope::Schedule(schedule) => (Some(schedule.id), None),
        Scope::Vms(vms) => (None, Some(vms)),
        Scope::All => (None, None),
    };
    let snapshots = store::snapshots::scheduled(&mut conn, schedule, vms).await?;
    let schedules = match scope {
        Scope::Schedule(schedule) => vec![schedule.clone()],
        Scope::All => store::schedules::all(&mut conn).await?,
        Scope::Vms(_) => {
            let mut ids: Vec<Uuid> = snapshots.iter().filter_map(|s| s.schedule_id).collect();
            ids.dedup();
            let mut schedules = Vec::with_capacity(ids.len());
            for id in ids {
                schedules.extend(store::schedules::get(&mut conn, id).await?);
            }
            schedules
        }
    };
    let mut doomed: Vec<(Snapshot, PruneReason)> = judge_all(&schedules, snapshots, now)
        .into_iter()
        .filter_map(|(snapshot, decision)| match decision {
            Decision::Prune(why) => Some((snapshot, why)),
            Decision::Keep(_) => None,
        })
        .collect();
    if !matches!(scope, Scope::Schedule(_)) {
        for snapshot in store::snapshots::expired(&mut conn, now, vms).await? {
            // Scheduled snapshots were judged above, expiry included.
            if snapshot.schedule_id.is_none() {
                doomed.push((snapshot, PruneReason::Expired));
            }
        }
    }
    doomed.sort_by(|(a, _), (b, _)| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(doomed)
}

/// One pruning pass (see the module doc): queue what may go now, report the rest.
pub async fn prune(
    db: &Db,
    engine: &Engine,
    now: Timestamp,
    scope: Scope<'_>,
) -> Result<PruneReport> {
    let doomed = doomed(db, now, scope).await?;
    let mut report = PruneReport::default();
    if doomed.is_empty() {
        return Ok(report);
    }
    let (mut busy, in_flight) = {
        let mut conn = db.reader().await?;
        (
            store::jobs::busy_vms(&mut conn).await?,
            store::jobs::count_pending(&mut conn, JobKind::SnapshotDelete).await?,
        )
    };
    let workers = engine.workers();
    let mut budget = workers.saturating_sub(in_flight);
    for (snapshot, why) in doomed {
        let mut entry = PruneEntry {
            snapshot_id: snapshot.id,
            snapshot_name: snapshot.name.clone(),
            vm_id: snapshot.vm_id,
            why_pruned: why,
            job_id: None,
            code: None,
            reason: None,
        };
        if busy.contains(&snapshot.vm_id) {
            entry.code = Some("vm_busy".into());
            entry.reason = Some("the VM has jobs in flight; pruned once they end".into());
            report.deferred.push(entry);
            continue;
        }
        if budget == 0 {
            entry.code = Some("spread".into());
            entry.reason = Some(format!(
                "at most {workers} deletions run at once; the rest follow as they finish"
            ));
            report.deferred.push(entry);
            continue;
        }
        match accept(
            engine,
            Request::new(JobSpec::SnapshotDelete(SnapshotDelete::of(&snapshot)))
                .by(Some(super::SCHEDULER)),
        )
        .await
        {
            Ok(job) => {
                tracing::info!(snapshot = %snapshot.id, job = %job.id, why = ?why, "snapshot pruned");
                entry.job_id = Some(job.id);
                busy.insert(snapshot.vm_id);
                budget -= 1;
                report.pruned.push(entry);
            }
            Err(e) if is_hold(&e) => {
                tracing::info!(snapshot = %snapshot.id, reason = %e, "snapshot to prune is held");
                entry.code = Some(e.code().as_str().to_owned());
                entry.reason = Some(e.to_string());
                report.held.push(entry);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Refusals that hold a prune back until the state changes, as opposed to failures of
/// the service itself.
pub fn is_hold(error: &Error) -> bool {
    matches!(error, Error::Problem { .. }) || error.code() == ErrorCode::InsufficientStorage
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::{ResourceStatus, ScheduleTarget, new_id};

    fn schedule(keep_last: u32) -> Schedule {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        Schedule {
            id: new_id(),
            name: "s".into(),
            target: ScheduleTarget::Selector {
                key: "k".into(),
                value: "v".into(),
            },
            cron: "@hourly".into(),
            timezone: "UTC".into(),
            enabled: true,
            name_template: "x".into(),
            consistency: None,
            quiesce: None,
            retention: retention::RetentionPolicy {
                keep_last: Some(keep_last),
                ..Default::default()
            },
            next_run_at: None,
            created_at: at,
            updated_at: at,
        }
    }

    fn snapshot(schedule: Uuid, vm: Uuid, hour: u32) -> Snapshot {
        Snapshot {
            id: new_id(),
            vm_id: vm,
            name: format!("h{hour}"),
            description: String::new(),
            parent_id: None,
            status: ResourceStatus::Ready,
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, hour, 0, 0).unwrap(),
            expires_at: None,
            hold: false,
            schedule_id: Some(schedule),
            consistency: crate::domain::SnapshotConsistency::Stopped,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn each_schedule_judges_its_own_snapshots_separately_on_each_vm() {
        let (one, two) = (schedule(1), schedule(2));
        let (vm_a, vm_b) = (new_id(), new_id());
        let gone = new_id();
        // Sorted by schedule and VM, oldest first, as the store returns them.
        let mut snapshots = vec![
            snapshot(one.id, vm_a, 1),
            snapshot(one.id, vm_a, 2),
            snapshot(one.id, vm_b, 1),
            snapshot(one.id, vm_b, 2),
            snapshot(two.id, vm_a, 1),
            snapshot(two.id, vm_a, 2),
            snapshot(two.id, vm_a, 3),
            // A schedule not in the list (deleted between two reads): not judged.
            snapshot(gone, vm_a, 1),
        ];
        snapshots.sort_by_key(|s| (s.schedule_id, s.vm_id, s.created_at));
        let now = Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap();
        let decided = judge_all(&[one.clone(), two.clone()], snapshots, now);
        let pruned: Vec<(Uuid, Uuid, String)> = decided
            .iter()
            .filter(|(_, d)| d.is_prune())
            .map(|(s, _)| (s.schedule_id.unwrap(), s.vm_id, s.name.clone()))
            .collect();
        let mut expected = vec![
            (one.id, vm_a, "h1".to_owned()),
            (one.id, vm_b, "h1".to_owned()),
            (two.id, vm_a, "h1".to_owned()),
        ];
        let mut pruned_sorted = pruned.clone();
        pruned_sorted.sort();
        expected.sort();
        assert_eq!(pruned_sorted, expected);
        assert_eq!(
            decided.len(),
            7,
            "the unknown schedule's snapshot was judged"
        );
    }
}
