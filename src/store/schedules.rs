//! Schedules and their runs.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{
    get_enum, get_id, get_opt_enum, get_opt_id, get_opt_ts, get_ts, id_text, opt_id_text, ts,
};
use crate::domain::{
    Consistency, Quiesce, RunStatus, RunTrigger, Schedule, ScheduleRun, ScheduleTarget, Timestamp,
    Uuid,
};
use crate::error::{Error, Result};

fn from_row(row: &SqliteRow) -> Result<Schedule> {
    let target = match (
        get_opt_id(row, "vm_id")?,
        row.try_get::<Option<String>, _>("selector")?,
    ) {
        (Some(vm), _) => ScheduleTarget::Vm(vm),
        (None, Some(selector)) => {
            let (key, value) = selector
                .split_once('=')
                .ok_or_else(|| Error::Internal(format!("bad selector {selector:?}")))?;
            ScheduleTarget::Selector {
                key: key.to_owned(),
                value: value.to_owned(),
            }
        }
        (None, None) => return Err(Error::Internal("schedule without a target".into())),
    };
    Ok(Schedule {
        id: get_id(row, "id")?,
        name: row.try_get("name")?,
        target,
        cron: row.try_get("cron")?,
        timezone: row.try_get("timezone")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        name_template: row.try_get("name_template")?,
        retention: serde_json::from_str(&row.try_get::<String, _>("retention")?)
            .map_err(|e| Error::Internal(format!("bad retention JSON: {e}")))?,
        consistency: get_opt_enum(row, "consistency", Consistency::parse)?,
        quiesce: get_opt_enum(row, "quiesce", Quiesce::parse)?,
        next_run_at: get_opt_ts(row, "next_run_at")?,
        created_at: get_ts(row, "created_at")?,
        updated_at: get_ts(row, "updated_at")?,
    })
}

fn target_columns(target: &ScheduleTarget) -> (Option<String>, Option<String>) {
    match target {
        ScheduleTarget::Vm(vm) => (Some(id_text(*vm)), None),
        ScheduleTarget::Selector { key, value } => (None, Some(format!("{key}={value}"))),
    }
}

/// Insert or replace a schedule's row.
pub async fn save(conn: &mut SqliteConnection, schedule: &Schedule) -> Result<()> {
    let (vm, selector) = target_columns(&schedule.target);
    sqlx::query(
        "INSERT INTO schedules (id, name, vm_id, selector, cron, timezone, enabled, name_template, retention, next_run_at, created_at, updated_at, consistency, quiesce)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (id) DO UPDATE SET name = ?2, vm_id = ?3, selector = ?4, cron = ?5, timezone = ?6, enabled = ?7,
           name_template = ?8, retention = ?9, next_run_at = ?10, updated_at = ?12, consistency = ?13, quiesce = ?14",
    )
    .bind(id_text(schedule.id))
    .bind(&schedule.name)
    .bind(vm)
    .bind(selector)
    .bind(&schedule.cron)
    .bind(&schedule.timezone)
    .bind(schedule.enabled as i64)
    .bind(&schedule.name_template)
    .bind(serde_json::to_string(&schedule.retention).expect("policy serialises"))
    .bind(schedule.next_run_at.map(ts))
    .bind(ts(schedule.created_at))
    .bind(ts(schedule.updated_at))
    .bind(schedule.consistency.map(Consistency::as_str))
    .bind(schedule.quiesce.map(Quiesce::as_str))
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Schedule>> {
    let row = sqlx::query("SELECT * FROM schedules WHERE id = ?")
        .bind(id_text(id))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// Schedules in id order after `after`, optionally only those targeting VM `vm`.
pub async fn list(
    conn: &mut SqliteConnection,
    vm: Option<Uuid>,
    after: Option<Uuid>,
    limit: u32,
) -> Result<Vec<Schedule>> {
    let rows = sqlx::query(
        "SELECT * FROM schedules WHERE (?1 IS NULL OR vm_id = ?1) AND id > coalesce(?2, '')
         ORDER BY id LIMIT ?3",
    )
    .bind(opt_id_text(vm))
    .bind(opt_id_text(after))
    .bind(limit as i64)
    .fetch_all(conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Every schedule (the retention sweep judges them all).
pub async fn all(conn: &mut SqliteConnection) -> Result<Vec<Schedule>> {
    let rows = sqlx::query("SELECT * FROM schedules ORDER BY id")
        .fetch_all(conn)
        .await?;
    rows.iter().map(from_row).collect()
}

/// Ids of the enabled schedules whose next run is due at `now`, soonest first. One
/// range scan of a partial index; only ids, since each run re-reads its schedule in its
/// own write transaction anyway.
pub async fn due(conn: &mut SqliteConnection, now: Timestamp) -> Result<Vec<Uuid>> {
    let rows = sqlx::query(
        "SELECT id FROM schedules WHERE enabled = 1 AND next_run_at <= ? ORDER BY next_run_at, id",
    )
    .bind(ts(now))
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| get_id(row, "id")).collect()
}

/// Delete a schedule and its run history. The snapshots it took stay and count as
/// manual from now on: no policy prunes them any more.
pub async fn delete(conn: &mut SqliteConnection, id: Uuid) -> Result<()> {
    sqlx::query("UPDATE snapshots SET schedule_id = NULL WHERE schedule_id = ?")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM schedules WHERE id = ?")
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

fn run_from_row(row: &SqliteRow) -> Result<ScheduleRun> {
    Ok(ScheduleRun {
        id: get_id(row, "id")?,
        schedule_id: get_id(row, "schedule_id")?,
        trigger: get_enum(row, "trigger", RunTrigger::parse)?,
        started_at: get_ts(row, "started_at")?,
        finished_at: get_opt_ts(row, "finished_at")?,
        status: get_enum(row, "status", RunStatus::parse)?,
        reason: row.try_get("reason")?,
        detail: serde_json::from_str(&row.try_get::<String, _>("detail")?)
            .map_err(|e| Error::Internal(format!("bad run detail: {e}")))?,
    })
}

pub async fn save_run(conn: &mut SqliteConnection, run: &ScheduleRun) -> Result<()> {
    sqlx::query(
        "INSERT INTO schedule_runs (id, schedule_id, trigger, started_at, finished_at, status, reason, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (id) DO UPDATE SET finished_at = ?5, status = ?6, reason = ?7, detail = ?8",
    )
    .bind(id_text(run.id))
    .bind(id_text(run.schedule_id))
    .bind(run.trigger.as_str())
    .bind(ts(run.started_at))
    .bind(run.finished_at.map(ts))
    .bind(run.status.as_str())
    .bind(&run.reason)
    .bind(serde_json::to_string(&run.detail).expect("run detail serialises"))
    .execute(conn)
    .await?;
    Ok(())
}

/// A schedule's runs, newest first, after the run `before` (ids are UUIDv7, so id
/// order is start order even when a test clock gives runs the same start time).
pub async fn runs(
    conn: &mut SqliteConnection,
    schedule: Uuid,
    before: Option<Uuid>,
    limit: u32,
) -> Result<Vec<ScheduleRun>> {
    let rows = sqlx::query(
        "SELECT * FROM schedule_runs WHERE schedule_id = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3",
    )
    .bind(id_text(schedule))
    .bind(opt_id_text(before))
    .bind(limit as i64)
    .fetch_all(conn)
    .await?;
    rows.iter().map(run_from_row).collect()
}

pub async fn get_run(
    conn: &mut SqliteConnection,
    schedule: Uuid,
    run: Uuid,
) -> Result<Option<ScheduleRun>> {
    let row = sqlx::query("SELECT * FROM schedule_runs WHERE schedule_id = ? AND id = ?")
        .bind(id_text(schedule))
        .bind(id_text(run))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(run_from_row).transpose()
}

/// A run by its id alone, whatever its schedule.
pub async fn find_run(conn: &mut SqliteConnection, run: Uuid) -> Result<Option<ScheduleRun>> {
    let row = sqlx::query("SELECT * FROM schedule_runs WHERE id = ?")
        .bind(id_text(run))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(run_from_row).transpose()
}

pub async fn last_run(conn: &mut SqliteConnection, schedule: Uuid) -> Result<Option<ScheduleRun>> {
    Ok(runs(conn, schedule, None, 1).await?.pop())
}

/// The schedule's run still waiting for its snapshot jobs, if any.
pub async fn running_run(
    conn: &mut SqliteConnection,
    schedule: Uuid,
) -> Result<Option<ScheduleRun>> {
    let row = sqlx::query(
        "SELECT * FROM schedule_runs WHERE status = 'running' AND schedule_id = ? ORDER BY id LIMIT 1",
    )
    .bind(id_text(schedule))
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(run_from_row).transpose()
}

/// Runs still waiting for their snapshot jobs, of every schedule.
pub async fn running_runs(conn: &mut SqliteConnection) -> Result<Vec<ScheduleRun>> {
    let rows = sqlx::query("SELECT * FROM schedule_runs WHERE status = 'running' ORDER BY id")
        .fetch_all(conn)
        .await?;
    rows.iter().map(run_from_row).collect()
}

/// Forget all but the newest `keep` finished runs of a schedule.
pub async fn trim_runs(conn: &mut SqliteConnection, schedule: Uuid, keep: u32) -> Result<()> {
    sqlx::query(
        "DELETE FROM schedule_runs WHERE schedule_id = ?1 AND status <> 'running' AND id NOT IN
           (SELECT id FROM schedule_runs WHERE schedule_id = ?1 ORDER BY id DESC LIMIT ?2)",
    )
    .bind(id_text(schedule))
    .bind(keep as i64)
    .execute(conn)
    .await?;
    Ok(())
}
