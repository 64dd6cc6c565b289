//! VMs, their disks and the volumes (qcow2 files) of each disk.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{get_enum, get_id, get_opt_id, get_ts, get_u64, id_text, opt_id_text, ts};
use crate::domain::plan::{DiskGraph, Owner, VolumeNode};
use crate::domain::{
    Disk, ExportKey, ResourceStatus, Uuid, Vm, VmKind, VmRuntime, VmState, Volume, VolumeStatus,
};
use crate::error::{Error, Result};

fn vm_from_row(row: &SqliteRow) -> Result<Vm> {
    Ok(Vm {
        id: get_id(row, "id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        labels: serde_json::from_str(&row.try_get::<String, _>("labels")?)
            .map_err(|e| Error::Internal(format!("bad labels JSON: {e}")))?,
        state: get_enum(row, "state", VmState::parse)?,
        status: get_enum(row, "status", ResourceStatus::parse)?,
        current_snapshot_id: get_opt_id(row, "current_snapshot_id")?,
        kind: get_enum(row, "kind", VmKind::parse)?,
        source_vm_id: get_opt_id(row, "source_vm_id")?,
        template_id: get_opt_id(row, "template_id")?,
        runtime: VmRuntime {
            qmp_socket: row.try_get("qmp_socket")?,
            guest_agent_socket: row.try_get("guest_agent_socket")?,
            qemu_version: row.try_get("qemu_version")?,
            can_pause: row.try_get("qemu_can_pause")?,
        },
        created_at: get_ts(row, "created_at")?,
        updated_at: get_ts(row, "updated_at")?,
    })
}

fn disk_from_row(row: &SqliteRow) -> Result<Disk> {
    Ok(Disk {
        id: get_id(row, "id")?,
        vm_id: get_id(row, "vm_id")?,
        name: row.try_get("name")?,
        size_bytes: get_u64(row, "size_bytes")?,
        status: get_enum(row, "status", ResourceStatus::parse)?,
        active_volume_id: get_opt_id(row, "active_volume_id")?,
        created_at: get_ts(row, "created_at")?,
    })
}

fn labels_json(vm: &Vm) -> String {
    serde_json::to_string(&vm.labels).expect("a string map serialises")
}

pub async fn get_vm(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Vm>> {
    let row = sqlx::query("SELECT * FROM vms WHERE id = ?")
        .bind(id_text(id))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(vm_from_row).transpose()
}

/// What selects a page of VMs (or templates): see `list_vms`.
pub struct VmPage<'a> {
    pub kind: VmKind,
    pub name: Option<&'a str>,
    pub label: Option<(&'a str, &'a str)>,
    pub after: Option<Uuid>,
    pub limit: u32,
}

/// The page's rows, the columns given.
macro_rules! page_of_vms {
    ($columns:literal) => {
        // The cursor is a plain range, so SQLite walks the (kind, id) index from it:
        // written `?2 IS NULL OR id > ?2`, each page scanned every VM before it (a page
        // deep into 10,000 VMs took 20 ms). The same in every paged list.
        concat!(
            "SELECT ", $columns, " FROM vms WHERE kind = ?6 AND (?1 IS NULL OR name = ?1) AND id > coalesce(?2, '')
             AND (?4 IS NULL OR EXISTS (SELECT 1 FROM json_each(vms.labels) WHERE key = ?4 AND value = ?5))
             ORDER BY id LIMIT ?3"
        )
    };
}

impl VmPage<'_> {
    async fn fetch(
        &self,
        conn: &mut SqliteConnection,
        sql: &'static str,
    ) -> Result<Vec<SqliteRow>> {
        Ok(sqlx::query(sql)
            .bind(self.name)
            .bind(opt_id_text(self.after))
            .bind(self.limit as i64)
            .bind(self.label.map(|l| l.0))
            .bind(self.label.map(|l| l.1))
            .bind(self.kind.as_str())
            .fetch_all(conn)
            .await?)
    }
}

/// VMs (or templates: `kind`) in id (creation) order after `after`, optionally only
/// the one named `name` and only those carrying the label `(key, value)`.
pub async fn list_vms(conn: &mut SqliteConnection, page: VmPage<'_>) -> Result<Vec<Vm>> {
    let rows = page.fetch(conn, page_of_vms!("*")).await?;
    rows.iter().map(vm_from_row).collect()
}

/// The ids of the VMs `list_vms` gives, for a page served from the read model.
pub async fn list_vm_ids(conn: &mut SqliteConnection, page: VmPage<'_>) -> Result<Vec<Uuid>> {
    let rows = page.fetch(conn, page_of_vms!("id")).await?;
    rows.iter().map(|row| get_id(row, "id")).collect()
}

pub async fn insert_vm(conn: &mut SqliteConnection, vm: &Vm) -> Result<()> {
    sqlx::query(
        "INSERT INTO vms (id, name, description, labels, state, status, current_snapshot_id, kind, source_vm_id, template_id, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
        .bind(id_text(vm.id))
        .bind(&vm.name)
        .bind(&vm.description)
        .bind(labels_json(vm))
        .bind(vm.state.as_str())
        .bind(vm.status.as_str())
        .bind(opt_id_text(vm.current_snapshot_id))
        .bind(vm.kind.as_str())
        .bind(opt_id_text(vm.source_vm_id))
        .bind(opt_id_text(vm.template_id))
        .bind(ts(vm.created_at))
        .bind(ts(vm.updated_at))
        .execute(conn)
        .await?;
    Ok(())
}

/// Write the editable fields of a VM (name, description, state).
pub async fn update_vm(conn: &mut SqliteConnection, vm: &Vm) -> Result<()> {
    sqlx::query(
        "UPDATE vms SET name = ?, description = ?, labels = ?, state = ?, qmp_socket = ?,
         guest_agent_socket = ?, qemu_version = ?, qemu_can_pause = ?, updated_at = ?
         WHERE id = ?",
    )
    .bind(&vm.name)
    .bind(&vm.description)
    .bind(labels_json(vm))
    .bind(vm.state.as_str())
    .bind(&vm.runtime.qmp_socket)
    .bind(&vm.runtime.guest_agent_socket)
    .bind(&vm.runtime.qemu_version)
    .bind(vm.runtime.can_pause)
    .bind(ts(vm.updated_at))
    .bind(id_text(vm.id))
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_vm_status(
    conn: &mut SqliteConnection,
    id: Uuid,
    status: ResourceStatus,
) -> Result<()> {
    sqlx::query("UPDATE vms SET status = ?, updated_at = ? WHERE id = ?")
        .bind(status.as_str())
        .bind(ts(super::now()))
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_vm_kind(conn: &mut SqliteConnection, id: Uuid, kind: VmKind) -> Result<()> {
    sqlx::query("UPDATE vms SET kind = ?, updated_at = ? WHERE id = ?")
        .bind(kind.as_str())
        .bind(ts(super::now()))
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn touch_vm(conn: &mut SqliteConnection, id: Uuid) -> Result<()> {
    sqlx::query("UPDATE vms SET updated_at = ? WHERE id = ?")
        .bind(ts(super::now()))
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// The volume a volume's file reads through (its recorded parent), if any.
pub async fn volume_parent(conn: &mut SqliteConnection, volume: Uuid) -> Result<Option<Uuid>> {
    let row = sqlx::query("SELECT parent_id FROM volumes WHERE id = ?")
        .bind(id_text(volume))
        .fetch_optional(conn)
        .await?;
    row.map(|row| get_opt_id(&row, "parent_id"))
        .transpose()
        .map(Option::flatten)
}

/// A volume and every volume below it, following backing links across disks (a linked
/// clone's chain continues into its source's), top first.
pub async fn volume_chain(conn: &mut SqliteConnection, top: Uuid) -> Result<Vec<Uuid>> {
    let rows = sqlx::query(
        "WITH RECURSIVE chain(id, parent_id, depth) AS (
           SELECT id, parent_id, 0 FROM volumes WHERE id = ?1
           UNION ALL
           SELECT v.id, v.parent_id, c.depth + 1 FROM volumes v JOIN chain c ON v.id = c.parent_id
         ) SELECT id FROM chain ORDER BY depth",
    )
    .bind(id_text(top))
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| get_id(row, "id")).collect()
}

pub async fn delete_vm(conn: &mut SqliteConnection, id: Uuid) -> Result<()> {
    // Snapshot rows reference each other and volumes; clear them before the cascade.
    sqlx::query("DELETE FROM snapshot_volumes WHERE snapshot_id IN (SELECT id FROM snapshots WHERE vm_id = ?)")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE snapshots SET parent_id = NULL WHERE vm_id = ?")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM snapshots WHERE vm_id = ?")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    for disk in list_disks(conn, id).await? {
        delete_disk(conn, disk.id).await?;
    }
    sqlx::query("DELETE FROM vms WHERE id = ?")
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn list_disks(conn: &mut SqliteConnection, vm_id: Uuid) -> Result<Vec<Disk>> {
    let rows = sqlx::query("SELECT * FROM disks WHERE vm_id = ? ORDER BY id")
        .bind(id_text(vm_id))
        .fetch_all(conn)
        .await?;
    rows.iter().map(disk_from_row).collect()
}

/// Disks of many VMs at once (for list pages), in id order.
pub async fn list_disks_of(conn: &mut SqliteConnection, vm_ids: &[Uuid]) -> Result<Vec<Disk>> {
    let mut disks = Vec::new();
    for &vm in vm_ids {
        disks.extend(list_disks(conn, vm).await?);
    }
    Ok(disks)
}

pub async fn get_disk(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Disk>> {
    let row = sqlx::query("SELECT * FROM disks WHERE id = ?")
        .bind(id_text(id))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(disk_from_row).transpose()
}

pub async fn insert_disk(conn: &mut SqliteConnection, disk: &Disk) -> Result<()> {
    sqlx::query("INSERT INTO disks (id, vm_id, name, size_bytes, status, active_volume_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
        .bind(id_text(disk.id))
        .bind(id_text(disk.vm_id))
        .bind(&disk.name)
        .bind(disk.size_bytes as i64)
        .bind(disk.status.as_str())
        .bind(opt_id_text(disk.active_volume_id))
        .bind(ts(disk.created_at))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_disk_status(
    conn: &mut SqliteConnection,
    id: Uuid,
    status: ResourceStatus,
) -> Result<()> {
    sqlx::query("UPDATE disks SET status = ? WHERE id = ?")
        .bind(status.as_str())
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn delete_disk(conn: &mut SqliteConnection, id: Uuid) -> Result<()> {
    sqlx::query("DELETE FROM snapshot_volumes WHERE disk_id = ?")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    // Volumes reference their parents: drop the links first so any order deletes.
    sqlx::query("UPDATE volumes SET parent_id = NULL WHERE disk_id = ?")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM volumes WHERE disk_id = ?")
        .bind(id_text(id))
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM disks WHERE id = ?")
        .bind(id_text(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Every volume of a VM's disks, with the snapshot (if any) that froze it.
pub async fn list_volumes(conn: &mut SqliteConnection, vm_id: Uuid) -> Result<Vec<Volume>> {
    let rows = sqlx::query(
        "SELECT v.*, sv.snapshot_id FROM volumes v JOIN disks d ON d.id = v.disk_id
         LEFT JOIN snapshot_volumes sv ON sv.volume_id = v.id
         WHERE d.vm_id = ? ORDER BY v.id",
    )
    .bind(id_text(vm_id))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Volume {
                id: get_id(row, "id")?,
                disk_id: get_id(row, "disk_id")?,
                parent_id: get_opt_id(row, "parent_id")?,
                size_bytes: get_u64(row, "size_bytes")?,
                status: get_enum(row, "status", VolumeStatus::parse)?,
                snapshot_id: get_opt_id(row, "snapshot_id")?,
            })
        })
        .collect()
}

/// The volume trees of a VM's disks as the planner wants them, each volume with the
/// VMs whose disks sit directly on it (linked clones). Disks whose files were never
/// created (still queued, or their creation failed) have no tree and are left out.
/// Allocation is left at zero: the caller measures files.
pub async fn disk_graphs(conn: &mut SqliteConnection, vm_id: Uuid) -> Result<Vec<DiskGraph>> {
    let disks = list_disks(conn, vm_id).await?;
    let volumes = list_volumes(conn, vm_id).await?;
    let dependents = dependents_of(conn, vm_id).await?;
    Ok(disks
        .into_iter()
        .filter(|d| d.active_volume_id.is_some())
        .map(|disk| {
            let nodes = volumes
                .iter()
                .filter(|v| v.disk_id == disk.id)
                .map(|v| VolumeNode {
                    id: v.id,
                    parent: v.parent_id,
                    size_bytes: v.size_bytes,
                    allocated_bytes: 0,
                    owner: match v.snapshot_id {
                        Some(snapshot) => Owner::Snapshot(snapshot),
                        None if disk.active_volume_id == Some(v.id) => Owner::Active,
                        None => Owner::Shared,
                    },
                    status: v.status,
                    dependents: dependents
                        .iter()
                        .filter(|(volume, _)| *volume == v.id)
                        .map(|(_, vm)| *vm)
                        .collect(),
                })
                .collect();
            DiskGraph {
                disk_id: disk.id,
                size_bytes: disk.size_bytes,
                volumes: nodes,
            }
        })
        .collect())
}

/// (volume of `vm`, other VM) for every volume of another disk sitting directly on a
/// volume of `vm`'s disks: the linked clones (and deployed VMs) that read its files.
pub async fn dependents_of(conn: &mut SqliteConnection, vm: Uuid) -> Result<Vec<(Uuid, Uuid)>> {
    let rows = sqlx::query(
        "SELECT DISTINCT v.parent_id AS volume, d.vm_id AS vm
         FROM volumes v JOIN disks d ON d.id = v.disk_id
         JOIN volumes p ON p.id = v.parent_id JOIN disks pd ON pd.id = p.disk_id
         WHERE pd.vm_id = ?1 AND v.disk_id <> p.disk_id",
    )
    .bind(id_text(vm))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| Ok((get_id(row, "volume")?, get_id(row, "vm")?)))
        .collect()
}

/// The VMs (or templates) whose files the disks of `vm` (only `disk`, if given) sit
/// on directly: the sources of a linked clone. A job that deletes or flattens those
/// disks may drop a layer of theirs nothing reads any more, so it works on them too.
pub async fn sources_of(
    conn: &mut SqliteConnection,
    vm: Uuid,
    disk: Option<Uuid>,
) -> Result<Vec<Uuid>> {
    let rows = sqlx::query(
        "SELECT DISTINCT pd.vm_id AS vm
         FROM volumes v JOIN disks d ON d.id = v.disk_id
         JOIN volumes p ON p.id = v.parent_id JOIN disks pd ON pd.id = p.disk_id
         WHERE d.vm_id = ?1 AND (?2 IS NULL OR d.id = ?2) AND v.disk_id <> p.disk_id
         ORDER BY pd.vm_id",
    )
    .bind(id_text(vm))
    .bind(disk.map(id_text))
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| get_id(row, "vm")).collect()
}

/// The VM or template whose disk holds `volume`.
pub async fn volume_owner(conn: &mut SqliteConnection, volume: Uuid) -> Result<Option<Vm>> {
    let row = sqlx::query(
        "SELECT vm.* FROM volumes v JOIN disks d ON d.id = v.disk_id JOIN vms vm ON vm.id = d.vm_id
         WHERE v.id = ?",
    )
    .bind(id_text(volume))
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(vm_from_row).transpose()
}

pub async fn export_digest(
    conn: &mut SqliteConnection,
    export: &ExportKey,
) -> Result<Option<(u64, String)>> {
    let row = sqlx::query(
        "SELECT bytes, sha256 FROM export_digests WHERE volume_id = ? AND compressed = ? AND generation = ?",
    )
    .bind(id_text(export.volume))
    .bind(export.compress as i64)
    .bind(export.generation)
    .fetch_optional(conn)
    .await?;
    row.map(|row| Ok((get_u64(&row, "bytes")?, row.try_get("sha256")?)))
        .transpose()
}

pub async fn save_export_digest(
    conn: &mut SqliteConnection,
    export: &ExportKey,
    bytes: u64,
    sha256: &str,
) -> Result<()> {
    // Older generations are stale for good.
    sqlx::query("DELETE FROM export_digests WHERE volume_id = ? AND generation <> ?")
        .bind(id_text(export.volume))
        .bind(export.generation)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT OR REPLACE INTO export_digests (volume_id, compressed, generation, bytes, sha256)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id_text(export.volume))
    .bind(export.compress as i64)
    .bind(export.generation)
    .bind(bytes as i64)
    .bind(sha256)
    .execute(conn)
    .await?;
    Ok(())
}
