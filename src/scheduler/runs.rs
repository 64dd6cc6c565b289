//! Schedule runs: starting one when a schedule is due (or triggered by hand), following
//! its snapshot jobs, and closing it with a retention pass once they have ended.
//!
//! A run is written in the same transaction as the snapshot jobs it queues, so after a
//! crash it is never half-started: either the run and all its jobs exist, or neither.
//! A run in `running` state is simply picked up again after a restart.

use super::prune;
use crate::domain::schedule::{self, CronSpec};
use crate::domain::{
    JobStatus, RunDetail, RunStatus, RunTarget, RunTrigger, Schedule, ScheduleRun, ScheduleTarget,
    TargetOutcome, Timestamp, Uuid, Vm, VmKind, new_id, validate,
};
use crate::error::{Error, ErrorCode, Result};
use crate::jobs::Engine;
use crate::jobs::{NewSnapshot, accept_in};
use crate::store::{self, Db};

/// Most VMs a selector can reach in one run, read a page at a time.
const SELECTOR_PAGE: u32 = 1000;

/// A new name is tried with `-2`, `-3`... when two runs render the same name (a manual
/// run in the same second as a tick); past this the VM is skipped.
const NAME_RETRIES: u32 = 20;

/// Start the runs of every enabled schedule due at `now`. However many ticks were
/// missed while the service was down, a due schedule runs once and continues from
/// `now`. Returns the runs started (skipped ones included).
pub async fn start_due(
    db: &Db,
    engine: &Engine,
    now: Timestamp,
    run_history: u32,
) -> Result<Vec<ScheduleRun>> {
    let due = store::schedules::due(&mut *db.reader().await?, now).await?;
    let mut started = Vec::with_capacity(due.len());
    for id in due {
        match start(
            db,
            engine,
            id,
            RunTrigger::Cron,
            now,
            run_history,
            Some(super::SCHEDULER),
        )
        .await
        {
            Ok(run) => started.extend(run),
            // One schedule's trouble must not hold back the others.
            Err(e @ Error::Problem { .. }) => {
                tracing::warn!(schedule = %id, error = %e, "schedule not run");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(started)
}

/// Start one run of schedule `id` at `now`. A cron run happens only if the schedule is
/// still enabled and due (checked in the write transaction, so a PATCH racing the tick
/// wins) and moves `next_run_at` in the same transaction; a previous run still in
/// progress makes it `skipped` (runs never stack). A manual run is refused with
/// `schedule_busy` instead. The schedule's history is trimmed to `run_history` runs.
pub async fn start(
    db: &Db,
    engine: &Engine,
    id: Uuid,
    trigger: RunTrigger,
    now: Timestamp,
    run_history: u32,
    requested_by: Option<&str>,
) -> Result<Option<ScheduleRun>> {
    let mut tx = db.begin().await?;
    tx.act_for(requested_by);
    let mut schedule = store::schedules::get(&mut tx, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let spec = match CronSpec::parse(&schedule.cron, &schedule.timezone) {
        Ok(spec) => spec,
        Err(reason) => {
            // Validated on write; only a change of the time zone database can get here.
            // Stop the schedule rather than failing every tick.
            tracing::error!(schedule = %schedule.id, %reason, "schedule no longer parses; disabling it");
            schedule.enabled = false;
            schedule.next_run_at = None;
            store::schedules::save(&mut tx, &schedule).await?;
            tx.commit().await?;
            return Err(Error::validation(format!(
                "schedule {} was disabled: {reason}",
                schedule.name
            )));
        }
    };
    if trigger == RunTrigger::Cron {
        let due_at = schedule.next_run_at.filter(|_| schedule.enabled);
        match due_at.map(|at| schedule::advance(&spec, at, now)) {
            Some((true, next)) => schedule.next_run_at = next,
            _ => return Ok(None),
        }
    }
    let mut stacked = false;
    let mut run = ScheduleRun {
        id: new_id(),
        schedule_id: schedule.id,
        trigger,
        started_at: now,
        finished_at: None,
        status: RunStatus::Running,
        reason: None,
        detail: RunDetail::default(),
    };
    if let Some(previous) = store::schedules::running_run(&mut tx, schedule.id).await? {
        let reason = format!(
            "the previous run {} (started {}) is still in progress",
            previous.id, previous.started_at
        );
        if trigger == RunTrigger::Manual {
            return Err(Error::with_extra(
                ErrorCode::ScheduleBusy,
                reason,
                serde_json::json!({ "run_id": previous.id }),
            ));
        }
        run.status = RunStatus::Skipped;
        run.finished_at = Some(now);
        run.reason = Some(reason);
        stacked = true;
    } else {
        let vms = target_vms(&mut tx, &schedule.target).await?;
        let tz = spec.timezone();
        for vm in &vms {
            let target = snapshot_vm(engine, &mut tx, &schedule, vm, now, tz, requested_by).await?;
            run.detail.targets.push(target);
        }
        if run
            .detail
            .targets
            .iter()
            .all(|t| t.outcome == TargetOutcome::Skipped)
        {
            run.status = RunStatus::Skipped;
            run.finished_at = Some(now);
            run.reason = Some(match (&schedule.target, run.detail.targets.as_slice()) {
                (ScheduleTarget::Selector { key, value }, []) => {
                    format!("no VM carries the label {key}={value}")
                }
                (_, [only]) => only.reason.clone().unwrap_or_default(),
                (_, all) => format!("all {} VMs were skipped", all.len()),
            });
        }
    }
    store::schedules::save_run(&mut tx, &run).await?;
    store::schedules::trim_runs(&mut tx, schedule.id, run_history).await?;
    if trigger == RunTrigger::Cron {
        store::schedules::save(&mut tx, &schedule).await?;
    }
    tx.commit().await?;
    if run.status == RunStatus::Running {
        engine.notify_enqueued();
    } else if !stacked {
        // A run that took nothing still applies the policy (it may have changed, or
        // time moved on), so what it holds back is reported with the run.
        run.detail.retention =
            Some(prune::prune(db, engine, now, prune::Scope::Schedule(&schedule)).await?);
        save_if_scheduled(db, &run).await?;
    }
    tracing::info!(schedule = %schedule.name, run = %run.id, status = %run.status, reason = run.reason.as_deref().unwrap_or(""), "schedule run started");
    Ok(Some(run))
}

fn not_found(id: Uuid) -> Error {
    Error::problem(
        ErrorCode::ScheduleNotFound,
        format!("schedule {id} does not exist"),
    )
}

/// The VMs a schedule reaches now: its VM, or every VM carrying its label.
async fn target_vms(conn: &mut sqlx::SqliteConnection, target: &ScheduleTarget) -> Result<Vec<Vm>> {
    match target {
        ScheduleTarget::Vm(id) => Ok(store::vms::get_vm(conn, *id).await?.into_iter().collect()),
        ScheduleTarget::Selector { key, value } => {
            let mut vms = Vec::new();
            let mut after = None;
            loop {
                let selected = store::vms::VmPage {
                    kind: VmKind::Vm,
                    name: None,
                    label: Some((key.as_str(), value.as_str())),
                    after,
                    limit: SELECTOR_PAGE,
                };
                let page = store::vms::list_vms(conn, selected).await?;
                after = page.last().map(|vm| vm.id);
                let full = page.len() == SELECTOR_PAGE as usize;
                vms.extend(page);
                if !full {
                    return Ok(vms);
                }
            }
        }
    }
}

/// Queue one VM's snapshot, or record why it is skipped (running, not ready, no
/// disks): a skip is an answer, not a failure.
async fn snapshot_vm(
    engine: &Engine,
    tx: &mut sqlx::SqliteConnection,
    schedule: &Schedule,
    vm: &Vm,
    now: Timestamp,
    tz: chrono_tz::Tz,
    requested_by: Option<&str>,
) -> Result<RunTarget> {
    let mut target = RunTarget {
        vm_id: vm.id,
        vm_name: vm.name.clone(),
        outcome: TargetOutcome::Skipped,
        snapshot_id: None,
        job_id: None,
        code: None,
        reason: None,
    };
    if vm.kind != VmKind::Vm {
        target.code = Some(ErrorCode::VmNotFound.as_str().to_owned());
        target.reason = Some(format!(
            "{} was converted to a template; templates take no snapshots",
            vm.name
        ));
        return Ok(target);
    }
    let base = schedule::render_name(&schedule.name_template, now, tz, &vm.name, &schedule.name);
    let name = match free_name(tx, vm.id, &base).await? {
        Ok(name) => name,
        Err(skip) => {
            target.code = Some(skip.code().as_str().to_owned());
            target.reason = Some(skip.to_string());
            return Ok(target);
        }
    };
    let new = NewSnapshot {
        name,
        description: format!("taken by schedule {}", schedule.name),
        expires_at: None,
        hold: false,
        schedule_id: Some(schedule.id),
        consistency: schedule.consistency,
        quiesce: schedule.quiesce,
    };
    match accept_in(engine, tx, new.request(vm).by(requested_by)).await {
        Ok(job) => {
            target.outcome = TargetOutcome::Queued;
            target.snapshot_id = Some(job.target_id);
            target.job_id = Some(job.id);
        }
        Err(e @ Error::Problem { .. }) => {
            target.code = Some(e.code().as_str().to_owned());
            // The refusal says what to do (e.g. give a running VM's QMP socket).
            target.reason = Some(e.to_string());
        }
        Err(e) => return Err(e),
    }
    Ok(target)
}

/// `base`, or `base-2`, `base-3`... whichever the VM does not use yet; `Err` holds the
/// problem that makes the VM skipped (a name the template made invalid, or none free).
async fn free_name(
    conn: &mut sqlx::SqliteConnection,
    vm: Uuid,
    base: &str,
) -> Result<std::result::Result<String, Error>> {
    if let Err(reason) = validate::name("snapshot name", base) {
        return Ok(Err(Error::validation(format!(
            "the name template gives {base:?}: {reason}"
        ))));
    }
    for attempt in 1..=NAME_RETRIES {
        let name = if attempt == 1 {
            base.to_owned()
        } else {
            format!("{base}-{attempt}")
        };
        if !store::snapshots::name_exists(conn, vm, &name).await? {
            return Ok(Ok(name));
        }
    }
    Ok(Err(Error::problem(
        ErrorCode::NameTaken,
        format!("the VM already has snapshots named {base} to {base}-{NAME_RETRIES}"),
    )))
}

/// Close every running run whose snapshot jobs have all ended, with a retention pass
/// for its schedule. Returns the runs closed.
pub async fn finish_ended(db: &Db, engine: &Engine, now: Timestamp) -> Result<Vec<ScheduleRun>> {
    let running = store::schedules::running_runs(&mut *db.reader().await?).await?;
    let mut finished = Vec::new();
    for mut run in running {
        if !follow_jobs(db, &mut run).await? {
            continue;
        }
        let outcomes = || run.detail.targets.iter().map(|t| t.outcome);
        let failed = outcomes()
            .filter(|o| matches!(o, TargetOutcome::Failed | TargetOutcome::Cancelled))
            .count();
        let skipped = outcomes().filter(|o| *o == TargetOutcome::Skipped).count();
        (run.status, run.reason) = match (failed, skipped) {
            (0, 0) => (RunStatus::Succeeded, None),
            (0, n) => (
                RunStatus::Succeeded,
                Some(format!("{n} of {} VMs skipped", run.detail.targets.len())),
            ),
            (n, _) => (
                RunStatus::Failed,
                Some(format!(
                    "{n} of {} snapshots failed",
                    run.detail.targets.len()
                )),
            ),
        };
        let schedule = store::schedules::get(&mut *db.reader().await?, run.schedule_id).await?;
        if let Some(schedule) = schedule {
            run.detail.retention =
                Some(prune::prune(db, engine, now, prune::Scope::Schedule(&schedule)).await?);
        }
        run.finished_at = Some(now);
        save_if_scheduled(db, &run).await?;
        tracing::info!(run = %run.id, status = %run.status, "schedule run finished");
        finished.push(run);
    }
    Ok(finished)
}

/// Record a run's new state, unless its schedule was deleted meanwhile (its runs with
/// it): then there is nothing to record.
async fn save_if_scheduled(db: &Db, run: &ScheduleRun) -> Result<()> {
    let mut tx = db.begin().await?;
    tx.act_for(Some(crate::scheduler::SCHEDULER));
    if store::schedules::get(&mut tx, run.schedule_id)
        .await?
        .is_some()
    {
        store::schedules::save_run(&mut tx, run).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Bring the run's per-VM outcomes up to date with its jobs; true once all have ended.
async fn follow_jobs(db: &Db, run: &mut ScheduleRun) -> Result<bool> {
    let mut conn = db.reader().await?;
    let mut all_ended = true;
    for target in &mut run.detail.targets {
        let (TargetOutcome::Queued, Some(job_id)) = (target.outcome, target.job_id) else {
            continue;
        };
        let Some(job) = store::jobs::get(&mut conn, job_id).await? else {
            target.outcome = TargetOutcome::Failed;
            target.reason = Some(format!("job {job_id} is gone"));
            continue;
        };
        match job.status {
            JobStatus::Queued | JobStatus::Running => all_ended = false,
            JobStatus::Succeeded => target.outcome = TargetOutcome::Succeeded,
            JobStatus::Cancelled => {
                target.outcome = TargetOutcome::Cancelled;
                target.reason = Some("the snapshot job was cancelled".into());
            }
            JobStatus::Failed => {
                target.outcome = TargetOutcome::Failed;
                target.code = job.error_code.clone();
                target.reason = job.error_message.clone();
            }
        }
    }
    Ok(all_ended)
}
