//! Snapshot rows and the layers each one froze.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{get_enum, get_id, get_opt_id, get_ts, id_text, opt_id_text, ts};
use crate::domain::{ResourceStatus, Snapshot, SnapshotConsistency, Uuid};
use crate::error::Result;

fn from_row(row: &SqliteRow) -> Result<Snapshot> {
    Ok(Snapshot {
        id: get_id(row, "id")?,
        vm_id: get_id(row, "vm_id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        parent_id: get_opt_id(row, "parent_id")?,
        status: get_enum(row, "status", ResourceStatus::parse)?,
        created_at: get_ts(row, "created_at")?,
        expires_at: super::get_opt_ts(row, "expires_at")?,
        hold: row.try_get::<i64, _>("hold")? != 0,
        schedule_id: get_opt_id(row, "schedule_id")?,
        consistency: get_enum(row, "consistency", SnapshotConsistency::parse)?,
        volumes: Vec::new(),
    })
}

/// Fill each snapshot's volumes with one query, whatever their number: a tree of 500
/// snapshots read them one query each, 500 round trips through the connection's
/// worker thread (most of the time such a read took).
async fn with_volumes(
    conn: &mut SqliteConnection,
    mut snapshots: Vec<Snapshot>,
) -> Result<Vec<Snapshot>> {
    if snapshots.is_empty() {
        return Ok(snapshots);
    }
    let ids: Vec<Uuid> = snapshots.iter().map(|s| s.id).collect();
    let rows = sqlx::query(
        "SELECT snapshot_id, disk_id, volume_id FROM snapshot_volumes
         WHERE snapshot_id IN (SELECT value FROM json_each(?)) ORDER BY snapshot_id, disk_id",
    )
    .bind(id_list(&ids))
    .fetch_all(&mut *conn)
    .await?;
    let mut volumes: std::collections::HashMap<Uuid, Vec<(Uuid, Uuid)>> =
        std::collections::HashMap::with_capacity(snapshots.len());
    for row in &rows {
        volumes
            .entry(get_id(row, "snapshot_id")?)
            .or_default()
            .push((get_id(row, "disk_id")?, get_id(row, "volume_id")?));
    }
    for snapshot in &mut snapshots {
        snapshot.volumes = volumes.remove(&snapshot.id).unwrap_or_default();
    }
    Ok(snapshots)
}

pub async fn get(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Snapshot>> {
    let row = sqlx::query("SELECT * FROM snapshots WHERE id = ?")
        .bind(id_text(id))
        .fetch_optional(&mut *conn)
        .await?;
    let Some(snapshot) = row.as_ref().map(from_row).transpose()? else {
        return Ok(None);
    };
    Ok(with_volumes(conn, vec![snapshot]).await?.pop())
}

/// A VM's snapshots in creation order, after `after`, at most `limit`.
pub async fn list(
    conn: &mut SqliteConnection,
    vm_id: Uuid,
    after: Option<Uuid>,
    limit: u32,
) -> Result<Vec<Snapshot>> {
    let rows = sqlx::query(
        "SELECT * FROM snapshots WHERE vm_id = ?1 AND id > coalesce(?2, '') ORDER BY id LIMIT ?3",
    )
    .bind(id_text(vm_id))
    .bind(opt_id_text(after))
    .bind(limit as i64)
    .fetch_all(&mut *conn)
    .await?;
    let snapshots = rows.iter().map(from_row).collect::<Result<Vec<_>>>()?;
    with_volumes(conn, snapshots).await
}

pub async fn insert(conn: &mut SqliteConnection, snapshot: &Snapshot) -> Result<()> {
    sqlx::query(
        "INSERT INTO snapshots (id, vm_id, name, description, parent_id, status, created_at, expires_at, hold, schedule_id, consistency)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
        .bind(id_text(snapshot.id))
        .bind(id_text(snapshot.vm_id))
        .bind(&snapshot.name)
        .bind(&snapshot.description)
        .bind(opt_id_text(snapshot.parent_id))
        .bind(snapshot.status.as_str())
        .bind(ts(snapshot.created_at))
        .bind(snapshot.expires_at.map(ts))
        .bind(snapshot.hold as i64)
        .bind(opt_id_text(snapshot.schedule_id))
        .bind(snapshot.consistency.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_status(
    conn: &mut SqliteConnection,
    id: Uuid,
    status: ResourceStatus,
) -> Result<()> {
    sqlx::query("UPDATE snapshots SET status = ? WHERE id = ?")
        .bind(status.as_str())
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Remove a snapshot from the tree: children hang from its parent afterwards, and a VM
/// that grew from it now grows from that parent.
pub async fn delete(conn: &mut SqliteConnection, id: Uuid) -> Result<()> {
    let parent: Option<Option<String>> =
        sqlx::query_scalar("SELECT parent_id FROM snapshots WHERE id = ?")
            .bind(id_text(id))
            .fetch_optional(&mut *conn)
            .await?;
    let Some(parent) = parent else { return Ok(()) };
    sqlx::query("UPDATE snapshots SET parent_id = ? WHERE parent_id = ?")
        .bind(&parent)
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE vms SET current_snapshot_id = ? WHERE current_snapshot_id = ?")
        .bind(&parent)
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM snapshot_volumes WHERE snapshot_id = ?")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM snapshots WHERE id = ?")
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Write the editable fields of a snapshot (name, description, expiry, hold).
pub async fn update(conn: &mut SqliteConnection, snapshot: &Snapshot) -> Result<()> {
    sqlx::query(
        "UPDATE snapshots SET name = ?, description = ?, expires_at = ?, hold = ? WHERE id = ?",
    )
    .bind(&snapshot.name)
    .bind(&snapshot.description)
    .bind(snapshot.expires_at.map(ts))
    .bind(snapshot.hold as i64)
    .bind(id_text(snapshot.id))
    .execute(conn)
    .await?;
    Ok(())
}

/// Ready (or failed) snapshots past their expiry and not on hold, of some VMs or all,
/// oldest expiry first. Without their volumes: pruning needs only ids.
pub async fn expired(
    conn: &mut SqliteConnection,
    now: crate::domain::Timestamp,
    vms: Option<&[Uuid]>,
) -> Result<Vec<Snapshot>> {
    let rows = sqlx::query(
        "SELECT * FROM snapshots WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND hold = 0
         AND (?2 IS NULL OR vm_id IN (SELECT value FROM json_each(?2)))
         AND status IN ('ready', 'error') ORDER BY expires_at, id",
    )
    .bind(ts(now))
    .bind(vms.map(id_list))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Snapshots that schedules took and retention may judge (ready or failed; not those
/// being created or deleted): of one schedule, of some VMs, or all; grouped by schedule
/// and VM and oldest first. Without their volumes: retention needs only times and flags.
pub async fn scheduled(
    conn: &mut SqliteConnection,
    schedule: Option<Uuid>,
    vms: Option<&[Uuid]>,
) -> Result<Vec<Snapshot>> {
    let rows = sqlx::query(
        "SELECT * FROM snapshots WHERE schedule_id IS NOT NULL AND (?1 IS NULL OR schedule_id = ?1)
         AND (?2 IS NULL OR vm_id IN (SELECT value FROM json_each(?2)))
         AND status IN ('ready', 'error') ORDER BY schedule_id, vm_id, created_at, id",
    )
    .bind(opt_id_text(schedule))
    .bind(vms.map(id_list))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Ids as a JSON array, bound as one parameter and read back with `json_each`.
fn id_list(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(|id| id_text(*id)).collect::<Vec<_>>())
        .expect("ids serialise")
}

/// Whether a VM already has a snapshot with this name.
/// How many snapshots a VM has, in every branch of its tree.
pub async fn count_of_vm(conn: &mut SqliteConnection, vm: Uuid) -> Result<u32> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM snapshots WHERE vm_id = ?")
        .bind(id_text(vm))
        .fetch_one(conn)
        .await?;
    Ok(count as u32)
}

pub async fn name_exists(conn: &mut SqliteConnection, vm: Uuid, name: &str) -> Result<bool> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM snapshots WHERE vm_id = ? AND name = ?")
            .bind(id_text(vm))
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(found.is_some())
}

/// Record how consistent a live snapshot turned out (once its switch is made).
pub async fn set_consistency(
    conn: &mut SqliteConnection,
    id: Uuid,
    consistency: SnapshotConsistency,
) -> Result<()> {
    sqlx::query("UPDATE snapshots SET consistency = ? WHERE id = ?")
        .bind(consistency.as_str())
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}
