//! The durable job queue and its journal (plan, next step, phase).

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{get_enum, get_id, get_opt_id, get_opt_ts, get_ts, get_u64, id_text, opt_id_text, ts};
use crate::domain::plan::Plan;
use crate::domain::{
    CopyProgress, Job, JobKind, JobPhase, JobSpec, JobStatus, TargetType, Timestamp, Uuid,
};
use crate::error::{Error, Result};

fn json_column<T: serde::de::DeserializeOwned>(row: &SqliteRow, column: &str) -> Result<Option<T>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| Error::Internal(format!("bad JSON in jobs.{column}: {e}")))
    })
    .transpose()
}

/// The job's typed spec, from its `kind` and `params` columns. Parameters that cannot
/// be read are kept as `Unreadable` (that job fails alone when it runs) rather than
/// failing every query that reads the row.
fn spec_column(row: &SqliteRow) -> Result<JobSpec> {
    let kind = get_enum(row, "kind", JobKind::parse)?;
    let params: String = row.try_get("params")?;
    let vm = get_opt_id(row, "vm_id")?.unwrap_or(get_id(row, "target_id")?);
    let spec = JobSpec::decode_or_keep(kind, vm, &params);
    if let JobSpec::Unreadable(unreadable) = &spec {
        tracing::warn!(job = %get_id(row, "id")?, %kind, error = %unreadable.error, "stored job parameters cannot be read");
    }
    Ok(spec)
}

/// The figures of the copy a running job is making, as its last progress write left
/// them; none unless they can still be live. The engine clears them when a copying step
/// ends and at start, but those writes may fail (a full disk) or a crash may come
/// first: figures are live only while the job runs (not parked) in the step they
/// describe, before the journal moved past it.
fn copy_columns(
    row: &SqliteRow,
    status: JobStatus,
    phase: Option<JobPhase>,
    next_step: usize,
) -> Result<Option<CopyProgress>> {
    let step: Option<i64> = row.try_get("copy_step")?;
    let done: Option<i64> = row.try_get("bytes_done")?;
    let total: Option<i64> = row.try_get("bytes_total")?;
    let eta: Option<i64> = row.try_get("eta_seconds")?;
    let parked: Option<String> = row.try_get("retry_at")?;
    let live = status == JobStatus::Running
        && phase == Some(JobPhase::Executing)
        && parked.is_none()
        && step.is_some_and(|step| step >= next_step as i64);
    let (Some(done), Some(total), true) = (done, total, live) else {
        return Ok(None);
    };
    let total = total.max(0) as u64;
    Ok(Some(CopyProgress {
        bytes_done: (done.max(0) as u64).min(total),
        bytes_total: total,
        eta_seconds: eta.map(|eta| eta.max(0) as u64),
    }))
}

fn from_row(row: &SqliteRow) -> Result<Job> {
    let phase: Option<String> = row.try_get("phase")?;
    let phase = phase.as_deref().and_then(JobPhase::parse);
    let status = get_enum(row, "status", JobStatus::parse)?;
    let next_step = row.try_get::<i64, _>("next_step")? as usize;
    Ok(Job {
        seq: row.try_get("seq")?,
        id: get_id(row, "id")?,
        kind: get_enum(row, "kind", JobKind::parse)?,
        status,
        progress: row.try_get::<i64, _>("progress")?.clamp(0, 100) as u8,
        target_type: get_enum(row, "target_type", TargetType::parse)?,
        target_id: get_id(row, "target_id")?,
        vm_id: get_opt_id(row, "vm_id")?,
        spec: spec_column(row)?,
        phase,
        plan: json_column::<Plan>(row, "plan")?,
        next_step,
        detail: json_column(row, "detail")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        past_no_return: row.try_get::<i64, _>("past_no_return")? != 0,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        created_at: get_ts(row, "created_at")?,
        started_at: get_opt_ts(row, "started_at")?,
        finished_at: get_opt_ts(row, "finished_at")?,
        requested_by: row.try_get("requested_by")?,
        cancelled_by: row.try_get("cancelled_by")?,
        copy: copy_columns(row, status, phase, next_step)?,
        bytes_copied: get_u64(row, "bytes_copied")?,
    })
}

/// A queued job doing `spec`, ready to insert.
pub fn new_job(spec: JobSpec) -> Job {
    let (target_type, target_id) = spec.target();
    Job {
        seq: 0,
        id: crate::domain::new_id(),
        kind: spec.kind(),
        status: JobStatus::Queued,
        progress: 0,
        target_type,
        target_id,
        vm_id: Some(spec.vm()),
        spec,
        phase: None,
        plan: None,
        next_step: 0,
        detail: None,
        cancel_requested: false,
        past_no_return: false,
        error_code: None,
        error_message: None,
        created_at: super::now(),
        started_at: None,
        finished_at: None,
        requested_by: None,
        cancelled_by: None,
        copy: None,
        bytes_copied: 0,
    }
}

/// Insert a job. It locks its own VM (`vm_id`) and `other_vms`: it is claimed only when
/// none of them has a running job, and after every older queued job that shares one.
pub async fn insert(conn: &mut SqliteConnection, job: &Job, other_vms: &[Uuid]) -> Result<()> {
    sqlx::query("INSERT INTO jobs (id, kind, status, target_type, target_id, vm_id, params, detail, created_at, requested_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        .bind(id_text(job.id))
        .bind(job.kind.as_str())
        .bind(job.status.as_str())
        .bind(job.target_type.as_str())
        .bind(id_text(job.target_id))
        .bind(opt_id_text(job.vm_id))
        .bind(job.spec.params_json())
        .bind(job.detail.as_ref().map(|d| d.to_string()))
        .bind(ts(job.created_at))
        .bind(&job.requested_by)
        .execute(&mut *conn)
        .await?;
    for vm in job.vm_id.iter().chain(other_vms) {
        sqlx::query(
            "INSERT OR IGNORE INTO job_vms (job_seq, vm_id) SELECT seq, ? FROM jobs WHERE id = ?",
        )
        .bind(id_text(*vm))
        .bind(id_text(job.id))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

pub async fn get(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Job>> {
    let row = sqlx::query("SELECT * FROM jobs WHERE id = ?")
        .bind(id_text(id))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(from_row).transpose()
}

#[derive(Debug, Default, Clone)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub vm_id: Option<Uuid>,
    pub kind: Option<JobKind>,
    pub requested_by: Option<String>,
}

/// Jobs newest first, after the job `before` (the cursor), at most `limit`.
pub async fn list(
    conn: &mut SqliteConnection,
    filter: &JobFilter,
    before: Option<Uuid>,
    limit: u32,
) -> Result<Vec<Job>> {
    let rows = sqlx::query(
        "SELECT * FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?3 IS NULL OR kind = ?3)
         AND (?2 IS NULL OR EXISTS (SELECT 1 FROM job_vms v WHERE v.job_seq = jobs.seq AND v.vm_id = ?2))
         AND (?6 IS NULL OR requested_by = ?6)
         AND seq < coalesce((SELECT seq FROM jobs WHERE id = ?4), 9223372036854775807) ORDER BY seq DESC LIMIT ?5",
    )
    .bind(filter.status.map(|s| s.as_str()))
    .bind(opt_id_text(filter.vm_id))
    .bind(filter.kind.map(|k| k.as_str()))
    .bind(opt_id_text(before))
    .bind(limit as i64)
    .bind(filter.requested_by.as_deref())
    .fetch_all(conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Take the oldest queued job none of whose VMs has a running job or an older queued
/// job, and mark it running. Jobs of one VM therefore run one at a time, in the order
/// they were accepted, and a job over several VMs (a clone and its source) waits for
/// all of them.
pub async fn claim_next(conn: &mut SqliteConnection, now: Timestamp) -> Result<Option<Job>> {
    let row = sqlx::query(
        "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?1)
         WHERE seq = (SELECT q.seq FROM jobs q WHERE q.status = 'queued'
                      AND NOT EXISTS (SELECT 1 FROM job_vms qv JOIN job_vms ov ON ov.vm_id = qv.vm_id
                                      JOIN jobs o ON o.seq = ov.job_seq
                                      WHERE qv.job_seq = q.seq AND o.seq <> q.seq
                                      AND (o.status = 'running' OR (o.status = 'queued' AND o.seq < q.seq)))
                      ORDER BY q.seq LIMIT 1)
         RETURNING *",
    )
    .bind(ts(now))
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Park a running job until `retry_at`, with why it waits (shown as its error
/// meanwhile). It stays `running`: its VMs stay locked and it is never cancelled.
pub async fn park(
    conn: &mut SqliteConnection,
    id: Uuid,
    retry_at: Timestamp,
    error: (&str, &str),
) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET retry_at = ?, error_code = ?, error_message = ? WHERE id = ? AND status = 'running'",
    )
    .bind(ts(retry_at))
    .bind(error.0)
    .bind(error.1)
    .bind(id_text(id))
    .execute(conn)
    .await?;
    Ok(())
}

/// Take back the oldest parked job whose time has come.
pub async fn claim_parked(conn: &mut SqliteConnection, now: Timestamp) -> Result<Option<Job>> {
    let row = sqlx::query(
        "UPDATE jobs SET retry_at = NULL, error_code = NULL, error_message = NULL
         WHERE seq = (SELECT seq FROM jobs WHERE status = 'running' AND retry_at IS NOT NULL
                      AND retry_at <= ? ORDER BY seq LIMIT 1)
         RETURNING *",
    )
    .bind(ts(now))
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Journal the plan: from here on, a restart resumes the job instead of re-planning.
pub async fn save_plan(conn: &mut SqliteConnection, id: Uuid, plan: &Plan) -> Result<()> {
    let detail =
        serde_json::json!({ "merges": plan.merges, "space_needed_bytes": plan.space_needed });
    sqlx::query(
        "UPDATE jobs SET phase = 'executing', plan = ?, next_step = 0,
           detail = json_patch(COALESCE(detail, '{}'), ?) WHERE id = ?",
    )
    .bind(serde_json::to_string(plan).map_err(|e| Error::Internal(e.to_string()))?)
    .bind(detail.to_string())
    .bind(id_text(id))
    .execute(conn)
    .await?;
    Ok(())
}

/// Add members to the job's `detail` (what a step learned as it ran).
pub async fn add_detail(
    conn: &mut SqliteConnection,
    id: Uuid,
    detail: &serde_json::Value,
) -> Result<()> {
    sqlx::query("UPDATE jobs SET detail = json_patch(COALESCE(detail, '{}'), ?) WHERE id = ?")
        .bind(detail.to_string())
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_next_step(
    conn: &mut SqliteConnection,
    id: Uuid,
    next_step: usize,
    progress: u8,
) -> Result<()> {
    sqlx::query("UPDATE jobs SET next_step = ?, progress = MAX(progress, ?) WHERE id = ?")
        .bind(next_step as i64)
        .bind(progress as i64)
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Record how far the copy of step `step` has got (and the job's percentage, which
/// only grows), unless the job is no longer running that step: parked, stopping,
/// committed, ended, or journaled past it. A progress write landing late therefore
/// changes nothing. Not a journal write: nothing reads these figures back but views.
pub async fn set_copy_progress(
    conn: &mut SqliteConnection,
    id: Uuid,
    step: usize,
    progress: u8,
    copy: &CopyProgress,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET progress = MAX(progress, ?), copy_step = ?, bytes_done = ?,
           bytes_total = ?, eta_seconds = ?
         WHERE id = ? AND status = 'running' AND phase = 'executing' AND retry_at IS NULL
           AND next_step <= ?",
    )
    .bind(progress as i64)
    .bind(step as i64)
    .bind(i64::try_from(copy.bytes_done).unwrap_or(i64::MAX))
    .bind(i64::try_from(copy.bytes_total).unwrap_or(i64::MAX))
    .bind(
        copy.eta_seconds
            .map(|eta| i64::try_from(eta).unwrap_or(i64::MAX)),
    )
    .bind(id_text(id))
    .bind(step as i64)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A copying step ended: its live figures go, and the bytes it moved are added to the
/// job's count.
pub async fn end_copy(conn: &mut SqliteConnection, id: Uuid, copied: u64) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET copy_step = NULL, bytes_done = NULL, bytes_total = NULL,
           eta_seconds = NULL, bytes_copied = bytes_copied + ? WHERE id = ?",
    )
    .bind(i64::try_from(copied).unwrap_or(i64::MAX))
    .bind(id_text(id))
    .execute(conn)
    .await?;
    Ok(())
}

/// Clear the live figures a previous process left (it stopped while copying): no copy
/// runs before a job is resumed. The number of jobs that had some.
pub async fn clear_copy_progress(conn: &mut SqliteConnection) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE jobs SET copy_step = NULL, bytes_done = NULL, bytes_total = NULL,
           eta_seconds = NULL
         WHERE copy_step IS NOT NULL OR bytes_done IS NOT NULL OR bytes_total IS NOT NULL
           OR eta_seconds IS NOT NULL",
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

pub async fn set_phase(conn: &mut SqliteConnection, id: Uuid, phase: JobPhase) -> Result<()> {
    sqlx::query("UPDATE jobs SET phase = ? WHERE id = ?")
        .bind(phase.as_str())
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// End a job. Only a job that has not ended yet changes.
/// Journal that the job stops (rolls back, or records a failed merge) and why, before
/// any file is touched for it.
pub async fn begin_stopping(
    conn: &mut SqliteConnection,
    id: Uuid,
    error: Option<(&str, &str)>,
) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET phase = 'stopping', error_code = ?, error_message = ? WHERE id = ?",
    )
    .bind(error.map(|e| e.0))
    .bind(error.map(|e| e.1))
    .bind(id_text(id))
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn finish(
    conn: &mut SqliteConnection,
    id: Uuid,
    status: JobStatus,
    error: Option<(&str, &str)>,
    now: Timestamp,
) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET status = ?, error_code = ?, error_message = ?, finished_at = ?,
         progress = CASE WHEN ? = 'succeeded' THEN 100 ELSE progress END
         WHERE id = ? AND status IN ('queued', 'running')",
    )
    .bind(status.as_str())
    .bind(error.map(|e| e.0))
    .bind(error.map(|e| e.1))
    .bind(ts(now))
    .bind(status.as_str())
    .bind(id_text(id))
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn request_cancel(conn: &mut SqliteConnection, id: Uuid) -> Result<()> {
    sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = ?")
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Record whose request cancelled the job.
pub async fn set_cancelled_by(conn: &mut SqliteConnection, id: Uuid, by: &str) -> Result<()> {
    sqlx::query("UPDATE jobs SET cancelled_by = ? WHERE id = ?")
        .bind(by)
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Jobs left running by the previous process (it crashed or was killed), oldest first.
pub async fn list_running(conn: &mut SqliteConnection) -> Result<Vec<Job>> {
    let rows = sqlx::query("SELECT * FROM jobs WHERE status = 'running' ORDER BY seq")
        .fetch_all(conn)
        .await?;
    rows.iter().map(from_row).collect()
}

/// Unfinished jobs of these kinds that target `target`.
pub async fn pending_for_target(
    conn: &mut SqliteConnection,
    target: Uuid,
    kinds: &[JobKind],
) -> Result<Vec<Job>> {
    let rows = sqlx::query(
        "SELECT * FROM jobs WHERE target_id = ? AND status IN ('queued', 'running') ORDER BY seq",
    )
    .bind(id_text(target))
    .fetch_all(conn)
    .await?;
    let jobs = rows.iter().map(from_row).collect::<Result<Vec<_>>>()?;
    Ok(jobs
        .into_iter()
        .filter(|j| kinds.contains(&j.kind))
        .collect())
}

/// VMs with unfinished jobs.
pub async fn busy_vms(conn: &mut SqliteConnection) -> Result<std::collections::HashSet<Uuid>> {
    let rows = sqlx::query(
        "SELECT DISTINCT v.vm_id FROM job_vms v JOIN jobs j ON j.seq = v.job_seq
         WHERE j.status IN ('queued', 'running')",
    )
    .fetch_all(conn)
    .await?;
    rows.iter().map(|r| get_id(r, "vm_id")).collect()
}

/// Queued or running jobs of `kind`.
pub async fn pending_of_kind(conn: &mut SqliteConnection, kind: JobKind) -> Result<Vec<Job>> {
    let rows = sqlx::query(
        "SELECT * FROM jobs WHERE kind = ? AND status IN ('queued', 'running') ORDER BY seq",
    )
    .bind(kind.as_str())
    .fetch_all(conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// How many jobs of `kind` are queued or running.
pub async fn count_pending(conn: &mut SqliteConnection, kind: JobKind) -> Result<usize> {
    let count: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE kind = ? AND status IN ('queued', 'running')",
    )
    .bind(kind.as_str())
    .fetch_one(conn)
    .await?;
    Ok(count as usize)
}

/// Unfinished jobs that work on a VM (as their own or as a source), oldest first.
pub async fn pending_for_vm(conn: &mut SqliteConnection, vm: Uuid) -> Result<Vec<Job>> {
    let rows = sqlx::query(
        "SELECT j.* FROM jobs j JOIN job_vms v ON v.job_seq = j.seq
         WHERE v.vm_id = ? AND j.status IN ('queued', 'running') ORDER BY j.seq",
    )
    .bind(id_text(vm))
    .fetch_all(conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Record that the job starts its step of no return, unless a cancel was requested
/// first (then nothing changes and `false` is returned). One statement, so it cannot
/// interleave with a cancel request.
/// Undo `enter_no_return` for a job whose step of no return did nothing (journaled
/// with the stop, so a restart rolls it back too).
pub async fn leave_no_return(conn: &mut SqliteConnection, id: Uuid) -> Result<()> {
    sqlx::query("UPDATE jobs SET past_no_return = 0 WHERE id = ?")
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn enter_no_return(conn: &mut SqliteConnection, id: Uuid) -> Result<bool> {
    let done =
        sqlx::query("UPDATE jobs SET past_no_return = 1 WHERE id = ? AND cancel_requested = 0")
            .bind(id_text(id))
            .execute(conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::new_id;

    const COPY: CopyProgress = CopyProgress {
        bytes_done: 3 << 20,
        bytes_total: 8 << 20,
        eta_seconds: Some(4),
    };

    /// A running job, executing step `next_step` of its plan.
    async fn running_job(conn: &mut SqliteConnection, next_step: i64) -> Uuid {
        let id = new_id();
        sqlx::query(
            "INSERT INTO jobs (id, kind, status, target_type, target_id, created_at, phase, next_step)
             VALUES (?, 'vm_clone', 'running', 'vm', ?, ?, 'executing', ?)",
        )
        .bind(id_text(id))
        .bind(id_text(new_id()))
        .bind(ts(super::super::now()))
        .bind(next_step)
        .execute(conn)
        .await
        .unwrap();
        id
    }

    async fn copy_of(conn: &mut SqliteConnection, id: Uuid) -> Option<CopyProgress> {
        get(conn, id).await.unwrap().unwrap().copy
    }

    #[tokio::test]
    async fn copy_figures_are_live_only_while_the_job_runs_the_step_they_describe() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Db::open(&dir.path().join("strata.db"))
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        // Step 2 runs while the journal still says 0 (its Creates are not journaled).
        let id = running_job(&mut tx, 0).await;
        assert!(set_copy_progress(&mut tx, id, 2, 40, &COPY).await.unwrap());
        assert_eq!(copy_of(&mut tx, id).await, Some(COPY));
        assert_eq!(get(&mut tx, id).await.unwrap().unwrap().progress, 40);

        // Journaled past it: the figures are stale, and a late write changes nothing.
        set_next_step(&mut tx, id, 3, 60).await.unwrap();
        assert_eq!(copy_of(&mut tx, id).await, None);
        assert!(!set_copy_progress(&mut tx, id, 2, 50, &COPY).await.unwrap());
        assert_eq!(get(&mut tx, id).await.unwrap().unwrap().progress, 60);

        // Parked, stopping or ended: not live either.
        assert!(set_copy_progress(&mut tx, id, 3, 70, &COPY).await.unwrap());
        assert_eq!(copy_of(&mut tx, id).await, Some(COPY));
        park(
            &mut tx,
            id,
            super::super::now(),
            ("insufficient_storage", "full"),
        )
        .await
        .unwrap();
        assert_eq!(copy_of(&mut tx, id).await, None);
        assert!(!set_copy_progress(&mut tx, id, 3, 70, &COPY).await.unwrap());
        claim_parked(&mut tx, super::super::now()).await.unwrap();
        assert_eq!(copy_of(&mut tx, id).await, Some(COPY));
        begin_stopping(&mut tx, id, None).await.unwrap();
        assert_eq!(copy_of(&mut tx, id).await, None);
        finish(&mut tx, id, JobStatus::Cancelled, None, super::super::now())
            .await
            .unwrap();
        assert_eq!(copy_of(&mut tx, id).await, None);
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn ending_a_copy_clears_its_figures_and_counts_its_bytes_and_a_restart_clears_all() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Db::open(&dir.path().join("strata.db"))
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        let id = running_job(&mut tx, 1).await;
        set_copy_progress(&mut tx, id, 1, 10, &COPY).await.unwrap();
        end_copy(&mut tx, id, 8 << 20).await.unwrap();
        set_copy_progress(&mut tx, id, 1, 20, &COPY).await.unwrap();
        end_copy(&mut tx, id, 2 << 20).await.unwrap();
        let job = get(&mut tx, id).await.unwrap().unwrap();
        assert_eq!((job.copy, job.bytes_copied), (None, 10 << 20));

        // What a crash left goes at the next start, and only that.
        let other = running_job(&mut tx, 0).await;
        set_copy_progress(&mut tx, other, 0, 10, &COPY)
            .await
            .unwrap();
        assert_eq!(clear_copy_progress(&mut tx).await.unwrap(), 1);
        let other = get(&mut tx, other).await.unwrap().unwrap();
        assert_eq!((other.copy, other.progress), (None, 10));
        let left: Option<i64> = sqlx::query_scalar(
            "SELECT max(coalesce(copy_step, bytes_done, bytes_total, eta_seconds)) FROM jobs",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(left, None);
        assert_eq!(
            get(&mut tx, id).await.unwrap().unwrap().bytes_copied,
            10 << 20
        );
        tx.commit().await.unwrap();
    }
}
