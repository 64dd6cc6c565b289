//! SQLite access: typed queries returning domain records, and the one function that
//! applies planner metadata changes. Knows nothing of HTTP.
//!
//! Writes go through a single writer connection (`writer`), so SQLite never sees two
//! writers and a read-check-write sequence inside one transaction is atomic; concurrent
//! transactions share one fsync through group commit. Reads use their own pool and see
//! WAL snapshots.

pub mod events;
pub mod jobs;
pub mod schedules;
pub mod snapshots;
pub mod tokens;
pub mod views;
pub mod vms;
mod writer;

pub use writer::Tx;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::domain::plan::MetaOp;
use crate::domain::{Timestamp, Uuid};
use crate::error::{Error, Result};

/// A read transaction (see `Db::read_tx`). `finish` ends it; dropped unfinished (an
/// early return, a cancelled request), its connection is closed rather than pooled
/// inside a transaction that would pin an old snapshot for every later reader.
pub struct ReadTx {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>,
}

impl ReadTx {
    pub async fn finish(mut self) {
        let mut conn = self
            .conn
            .take()
            .expect("an open transaction has its connection");
        if sqlx::raw_sql("COMMIT").execute(&mut *conn).await.is_err() {
            discard(conn);
        }
    }
}

impl Drop for ReadTx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            discard(conn);
        }
    }
}

impl std::ops::Deref for ReadTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("an open transaction has its connection")
    }
}

impl std::ops::DerefMut for ReadTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("an open transaction has its connection")
    }
}

/// Close a connection whose transaction state is not known to be clean; SQLite rolls
/// back an open transaction when its connection closes.
fn discard(conn: sqlx::pool::PoolConnection<sqlx::Sqlite>) {
    drop(conn.detach());
}

#[derive(Clone)]
pub struct Db {
    read: SqlitePool,
    write: SqlitePool,
    writer: Arc<tokio::sync::Mutex<writer::Writer>>,
    outbox: Arc<events::Outbox>,
    /// `tokens.changed` beside the database file (see `mark_tokens_changed`).
    tokens_marker: Arc<std::path::PathBuf>,
}

impl Db {
    /// Open (creating if needed) `<data_dir>/strata.db` and run pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // The job journal must survive power loss, not just a process crash.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            read,
            writer: writer::Writer::new(write.clone()),
            write,
            outbox: Arc::default(),
            tokens_marker: Arc::new(path.with_file_name("tokens.changed")),
        })
    }

    /// A file replaced (a new one renamed over it) after every change to the tokens
    /// table, by this process or another (`strata token`): a running service that
    /// keeps token rows in memory sees its inode change and reads them again.
    pub fn tokens_marker(&self) -> &Path {
        &self.tokens_marker
    }

    /// Replace `tokens_marker` (after a committed change to the tokens table).
    pub fn mark_tokens_changed(&self) -> std::io::Result<()> {
        let fresh = self
            .tokens_marker
            .with_file_name(format!("tokens.changed.{}", std::process::id()));
        std::fs::write(&fresh, b"")?;
        std::fs::rename(&fresh, &*self.tokens_marker)
    }

    pub async fn reader(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        Ok(self.read.acquire().await?)
    }

    /// A read connection inside one transaction: every query sees the same committed
    /// state (WAL snapshot), so a job committing between two queries cannot tear what
    /// is read (a disk's volumes without its active layer).
    pub async fn read_tx(&self) -> Result<ReadTx> {
        let mut conn = self.read.acquire().await?;
        if let Err(e) = sqlx::raw_sql("BEGIN").execute(&mut *conn).await {
            discard(conn);
            return Err(e.into());
        }
        Ok(ReadTx { conn: Some(conn) })
    }

    pub async fn begin(&self) -> Result<Tx> {
        Tx::begin(&self.writer, &self.outbox, false).await
    }

    /// A write transaction that begins after every transaction waiting for its group
    /// commit has committed: what it reads is durable, and the read model has it.
    pub async fn begin_settled(&self) -> Result<Tx> {
        Tx::begin(&self.writer, &self.outbox, true).await
    }

    /// What write transactions share for the event stream.
    pub fn outbox(&self) -> &Arc<events::Outbox> {
        &self.outbox
    }

    pub async fn close(&self) {
        // After the commits already queued for the writer; its connection goes back
        // to the pool, which waits for it.
        self.writer.lock().await.release();
        self.read.close().await;
        self.write.close().await;
    }
}

/// What the metrics count at each scrape.
pub struct Inventory {
    pub vms: i64,
    pub templates: i64,
    pub snapshots: i64,
    pub jobs_queued: i64,
    pub jobs_running: i64,
    /// Layers of the longest chain of any disk, from its active layer down.
    pub longest_chain: i64,
}

pub async fn inventory(conn: &mut SqliteConnection) -> Result<Inventory> {
    let (vms, templates, snapshots, jobs_queued, jobs_running): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM vms WHERE kind = 'vm'),
                    (SELECT count(*) FROM vms WHERE kind = 'template'),
                    (SELECT count(*) FROM snapshots),
                    (SELECT count(*) FROM jobs WHERE status = 'queued'),
                    (SELECT count(*) FROM jobs WHERE status = 'running')",
        )
        .fetch_one(&mut *conn)
        .await?;
    let longest_chain: Option<i64> = sqlx::query_scalar(
        "WITH RECURSIVE chain(volume, depth) AS (
             SELECT active_volume_id, 1 FROM disks WHERE active_volume_id IS NOT NULL
             UNION ALL
             SELECT v.parent_id, c.depth + 1 FROM chain c JOIN volumes v ON v.id = c.volume
             WHERE v.parent_id IS NOT NULL
         )
         SELECT max(depth) FROM chain",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Inventory {
        vms,
        templates,
        snapshots,
        jobs_queued,
        jobs_running,
        longest_chain: longest_chain.unwrap_or(0),
    })
}

/// The newest migration applied to the database.
pub async fn schema_version(conn: &mut SqliteConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(conn)
            .await?,
    )
}

/// The current time (see `crate::clock`) at the precision stored.
pub fn now() -> Timestamp {
    crate::clock::now()
}

pub(crate) fn ts(value: Timestamp) -> String {
    value.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn id_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

pub(crate) fn opt_id_text(id: Option<Uuid>) -> Option<String> {
    id.map(id_text)
}

pub(crate) fn get_id(row: &SqliteRow, column: &str) -> Result<Uuid> {
    let text: String = row.try_get(column)?;
    Uuid::from_str(&text).map_err(|e| Error::Internal(format!("bad id in {column}: {e}")))
}

pub(crate) fn get_opt_id(row: &SqliteRow, column: &str) -> Result<Option<Uuid>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| {
        Uuid::from_str(&t).map_err(|e| Error::Internal(format!("bad id in {column}: {e}")))
    })
    .transpose()
}

pub(crate) fn get_ts(row: &SqliteRow, column: &str) -> Result<Timestamp> {
    let text: String = row.try_get(column)?;
    parse_ts(&text)
}

pub(crate) fn get_opt_ts(row: &SqliteRow, column: &str) -> Result<Option<Timestamp>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| parse_ts(&t)).transpose()
}

fn parse_ts(text: &str) -> Result<Timestamp> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| Error::Internal(format!("bad timestamp {text}: {e}")))
}

pub(crate) fn get_enum<T>(
    row: &SqliteRow,
    column: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<T> {
    let text: String = row.try_get(column)?;
    parse(&text).ok_or_else(|| Error::Internal(format!("unknown value {text:?} in {column}")))
}

pub(crate) fn get_opt_enum<T>(
    row: &SqliteRow,
    column: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|text| {
        parse(&text).ok_or_else(|| Error::Internal(format!("unknown value {text:?} in {column}")))
    })
    .transpose()
}

pub(crate) fn get_u64(row: &SqliteRow, column: &str) -> Result<u64> {
    let value: i64 = row.try_get(column)?;
    u64::try_from(value).map_err(|_| Error::Internal(format!("negative {column}")))
}

/// True when a query failed on a UNIQUE constraint (turned into `name_taken`).
pub fn is_unique_violation(error: &Error) -> bool {
    matches!(error, Error::Database(sqlx::Error::Database(db)) if db.is_unique_violation())
}

/// Apply planner metadata changes in order, inside the caller's transaction.
pub async fn apply(conn: &mut SqliteConnection, ops: &[MetaOp]) -> Result<()> {
    let now = ts(now());
    for op in ops {
        match *op {
            MetaOp::InsertVolume {
                volume,
                disk,
                parent,
                size_bytes,
            } => {
                sqlx::query("INSERT INTO volumes (id, disk_id, parent_id, size_bytes, status, created_at) VALUES (?, ?, ?, ?, 'ready', ?)")
                    .bind(id_text(volume))
                    .bind(id_text(disk))
                    .bind(opt_id_text(parent))
                    .bind(size_bytes as i64)
                    .bind(&now)
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetVolumeParent { volume, parent } => {
                sqlx::query("UPDATE volumes SET parent_id = ? WHERE id = ?")
                    .bind(opt_id_text(parent))
                    .bind(id_text(volume))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetVolumeStatus { volume, status } => {
                sqlx::query("UPDATE volumes SET status = ? WHERE id = ?")
                    .bind(status.as_str())
                    .bind(id_text(volume))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetVolumeSize { volume, size_bytes } => {
                sqlx::query("UPDATE volumes SET size_bytes = ? WHERE id = ?")
                    .bind(size_bytes as i64)
                    .bind(id_text(volume))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::RemoveVolume { volume } => {
                sqlx::query("DELETE FROM volumes WHERE id = ?")
                    .bind(id_text(volume))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetActiveVolume { disk, volume } => {
                sqlx::query("UPDATE disks SET active_volume_id = ? WHERE id = ?")
                    .bind(id_text(volume))
                    .bind(id_text(disk))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetSnapshotVolume {
                snapshot,
                disk,
                volume,
            } => {
                sqlx::query(
                    "INSERT INTO snapshot_volumes (snapshot_id, disk_id, volume_id) VALUES (?, ?, ?)
                     ON CONFLICT (snapshot_id, disk_id) DO UPDATE SET volume_id = excluded.volume_id",
                )
                .bind(id_text(snapshot))
                .bind(id_text(disk))
                .bind(id_text(volume))
                .execute(&mut *conn)
                .await?;
            }
            MetaOp::SetSnapshotStatus { snapshot, status } => {
                sqlx::query("UPDATE snapshots SET status = ? WHERE id = ?")
                    .bind(status.as_str())
                    .bind(id_text(snapshot))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetSnapshotParent { snapshot, parent } => {
                sqlx::query("UPDATE snapshots SET parent_id = ? WHERE id = ?")
                    .bind(opt_id_text(parent))
                    .bind(id_text(snapshot))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::DeleteSnapshot { snapshot } => snapshots::delete(conn, snapshot).await?,
            MetaOp::SetCurrentSnapshot { vm, snapshot } => {
                sqlx::query("UPDATE vms SET current_snapshot_id = ?, updated_at = ? WHERE id = ?")
                    .bind(opt_id_text(snapshot))
                    .bind(&now)
                    .bind(id_text(vm))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetDiskStatus { disk, status } => {
                sqlx::query("UPDATE disks SET status = ? WHERE id = ?")
                    .bind(status.as_str())
                    .bind(id_text(disk))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::SetDiskSize { disk, size_bytes } => {
                sqlx::query("UPDATE disks SET size_bytes = ? WHERE id = ?")
                    .bind(size_bytes as i64)
                    .bind(id_text(disk))
                    .execute(&mut *conn)
                    .await?;
                // The writable top carries the disk's size.
                sqlx::query("UPDATE volumes SET size_bytes = ? WHERE id = (SELECT active_volume_id FROM disks WHERE id = ?)")
                    .bind(size_bytes as i64)
                    .bind(id_text(disk))
                    .execute(&mut *conn)
                    .await?;
            }
            MetaOp::DeleteDisk { disk } => vms::delete_disk(conn, disk).await?,
            MetaOp::SetVmStatus { vm, status } => vms::set_vm_status(conn, vm, status).await?,
            MetaOp::DeleteVm { vm } => vms::delete_vm(conn, vm).await?,
            MetaOp::SetVmKind { vm, kind } => vms::set_vm_kind(conn, vm, kind).await?,
            MetaOp::TouchVm { vm } => vms::touch_vm(conn, vm).await?,
        }
    }
    Ok(())
}
