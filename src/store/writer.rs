//! The single writer connection, and the write transaction (`Tx`) that borrows it,
//! with group commit: transactions that finish while others wait for the writer are
//! made durable by one `COMMIT`, so one WAL fsync serves all of them.
//!
//! A transaction runs inside the writer's open SQLite transaction, as a savepoint when
//! earlier ones wait there for their commit. `Tx::commit` seals its events, releases
//! its savepoint, adds itself to the open group and lets the writer go; a task of its
//! own then queues for the writer again and, when its turn comes and the group is still
//! open, commits the whole group. The writer's queue is first come, first served, so
//! every transaction that was waiting for the writer by then has joined the group. Each
//! member's `commit` returns only when its group's `COMMIT` has landed (or failed: then
//! every member fails, and none was acknowledged). A lone transaction commits at once.
//!
//! A member that does not commit (an error, dropped early) rolls back to its savepoint
//! and leaves the others' work alone. When that is not possible (SQLite rolled the
//! whole transaction back on its own after `SQLITE_FULL` or `SQLITE_IOERR`: the
//! savepoint is gone), the whole group fails and the connection is closed, which rolls
//! back whatever it still had open; the pool opens a fresh one for the next writer.
//! Nothing is ever acknowledged from a connection in an unknown state.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

use super::events::{self, Outbox, Sealed};
use crate::error::{Error, Result};

/// The writer connection and the group of transactions waiting in it for their commit.
pub(super) struct Writer {
    pool: SqlitePool,
    conn: Option<PoolConnection<Sqlite>>,
    group: Option<Group>,
    /// Numbers groups, so a member's commit task knows whether its group is still open.
    groups_opened: u64,
    /// A transaction began and has not committed or rolled back. Still set when the
    /// next one begins, the last one vanished half way (its rollback task never ran,
    /// or it was cancelled inside a statement): what the connection holds is unknown.
    member_open: bool,
}

/// Transactions done with their work, their changes in the writer's open transaction,
/// each waiting for the `COMMIT` that makes them durable.
struct Group {
    number: u64,
    members: Vec<Member>,
}

struct Member {
    sealed: Sealed,
    done: oneshot::Sender<Result<()>>,
}

impl Group {
    /// Tell every member its group failed: nothing of it is committed.
    fn fail(self, cause: &Error) {
        for member in self.members {
            let _ = member.done.send(Err(cause.shared()));
        }
    }
}

impl Writer {
    pub(super) fn new(pool: SqlitePool) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            pool,
            conn: None,
            group: None,
            groups_opened: 0,
            member_open: false,
        }))
    }

    /// Give the connection back to its pool (at shutdown, after every queued commit).
    pub(super) fn release(&mut self) {
        if let Some(group) = self.group.take() {
            // Not reached: each member's commit task queued before the caller.
            group.fail(&Error::Internal("the service is stopping".into()));
        }
        self.conn = None;
    }

    fn conn(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("the writer holds a connection while a transaction is open")
    }

    /// Close the connection, rolling back whatever it had open, and fail the group
    /// that was waiting in it.
    fn discard(&mut self, cause: &Error) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
        self.member_open = false;
        if let Some(group) = self.group.take() {
            group.fail(cause);
        }
    }

    /// Run `sql`; on an error the connection and its group go (see `discard`).
    async fn run_or_discard(&mut self, sql: &'static str) -> Result<()> {
        match sqlx::raw_sql(sql).execute(self.conn()).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = Error::from(e);
                self.discard(&e);
                Err(e)
            }
        }
    }

    /// Commit the open group if it is `number` (an earlier member's task may have
    /// committed it already), then apply its members' views in commit order and tell
    /// each it is durable.
    async fn commit_group(&mut self, number: u64, outbox: &Outbox) {
        if self.group.as_ref().map(|g| g.number) != Some(number) {
            return;
        }
        let group = self.group.take().expect("checked above");
        match sqlx::raw_sql("COMMIT").execute(self.conn()).await {
            Ok(_) => {
                let mut told = Vec::with_capacity(group.members.len());
                for Member { sealed, done } in group.members {
                    if !sealed.applied.is_empty() {
                        outbox.views.apply(sealed.applied);
                    }
                    if let Some(last) = sealed.last_event {
                        outbox.applied_through.fetch_max(last, Ordering::SeqCst);
                    }
                    told.push(done);
                }
                outbox.committed.notify_one();
                for done in told {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                // Whether any of it took is not known here: the read model forgets
                // everything, and the connection goes.
                outbox.views.clear();
                self.group = Some(group);
                self.discard(&Error::from(e));
            }
        }
    }
}

/// A write transaction on the single writer connection (see the module's doc).
pub struct Tx {
    writer: Option<OwnedMutexGuard<Writer>>,
    /// Earlier transactions wait in the writer's open transaction: this one is a
    /// savepoint in it, and rolls back alone.
    in_group: bool,
    outbox: Arc<Outbox>,
    /// Who asked for the change: the events it makes say so.
    actor: Option<String>,
}

impl Tx {
    /// Begin a transaction; `settled` first commits the group waiting in the writer,
    /// so that the transaction reads only what is durable and in the read model.
    pub(super) async fn begin(
        writer: &Arc<Mutex<Writer>>,
        outbox: &Arc<Outbox>,
        settled: bool,
    ) -> Result<Self> {
        let mut guard = Arc::clone(writer).lock_owned().await;
        if guard.member_open {
            guard.discard(&Error::Internal(
                "a transaction before it was left unfinished".into(),
            ));
        }
        if settled && let Some(number) = guard.group.as_ref().map(|g| g.number) {
            guard.commit_group(number, outbox).await;
        }
        if guard.conn.is_none() {
            let conn = guard.pool.acquire().await?;
            guard.conn = Some(conn);
        }
        let in_group = guard.group.is_some();
        let open = if in_group {
            "SAVEPOINT member"
        } else {
            "BEGIN IMMEDIATE"
        };
        guard.run_or_discard(open).await?;
        guard.member_open = true;
        Ok(Self {
            writer: Some(guard),
            in_group,
            outbox: Arc::clone(outbox),
            actor: None,
        })
    }

    /// Record `actor` (a token's name, `scheduler`) as who asked for this change.
    pub fn act_for(&mut self, actor: Option<&str>) {
        self.actor = actor.map(str::to_owned);
    }

    /// Seal the events of the transaction (see `events::seal`) and make it durable,
    /// with whatever other transactions its group commit takes along. On an error
    /// nothing of it is committed.
    pub async fn commit(mut self) -> Result<()> {
        // Sealed while the transaction still owns the writer: cancelled, failed or
        // panicking in here, the transaction is dropped and rolled back.
        let outbox = Arc::clone(&self.outbox);
        let actor = self.actor.take();
        let sealed = events::seal(&mut self, &outbox, actor.as_deref(), super::now()).await?;
        let mut writer = self.writer.take().expect("an open transaction");
        if self.in_group {
            writer.run_or_discard("RELEASE member").await?;
        }
        let (done, committed) = oneshot::channel();
        if writer.group.is_none() {
            // This transaction's BEGIN opened the writer's transaction.
            writer.groups_opened += 1;
            let number = writer.groups_opened;
            writer.group = Some(Group {
                number,
                members: Vec::new(),
            });
        }
        let group = writer.group.as_mut().expect("opened above");
        group.members.push(Member { sealed, done });
        let number = group.number;
        writer.member_open = false;
        let mutex = OwnedMutexGuard::mutex(&writer).clone();
        drop(writer);
        // The commit runs as a task of its own, which a caller dropped meanwhile (a
        // client gone, a request timed out) cannot stop: a commit that lands always
        // has its views applied, in commit order, before the writer is free again.
        let committer = Arc::clone(&outbox);
        tokio::spawn(async move {
            mutex.lock().await.commit_group(number, &committer).await;
        });
        match committed.await {
            Ok(result) => result,
            Err(_) => {
                // The commit task panicked: whether it committed or applied is not
                // known.
                outbox.views.clear();
                Err(Error::Internal("a group commit's task failed".into()))
            }
        }
    }

    /// End the transaction without changing anything (the group's other members keep
    /// their changes).
    pub async fn rollback(mut self) {
        let writer = self.writer.take().expect("an open transaction");
        roll_back(writer, self.in_group).await;
    }
}

async fn roll_back(mut writer: OwnedMutexGuard<Writer>, in_group: bool) {
    // An error discards the connection (and fails the group): either way nothing of
    // this transaction is left open.
    if in_group {
        // `ROLLBACK TO` keeps the savepoint open: it is released, empty, after.
        if writer.run_or_discard("ROLLBACK TO member").await.is_ok() {
            let _ = writer.run_or_discard("RELEASE member").await;
        }
    } else {
        // Nothing else waits in the writer's transaction: it goes whole.
        let _ = writer.run_or_discard("ROLLBACK").await;
    }
    writer.member_open = false;
}

impl Drop for Tx {
    fn drop(&mut self) {
        let Some(mut writer) = self.writer.take() else {
            return;
        };
        // Dropped unfinished (an error, a cancelled request). The writer goes with
        // the rollback, so no other transaction runs before it.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let in_group = self.in_group;
                runtime.spawn(roll_back(writer, in_group));
            }
            Err(_) => writer.discard(&Error::Internal(
                "a transaction was dropped outside the runtime".into(),
            )),
        }
    }
}

impl std::ops::Deref for Tx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.writer
            .as_ref()
            .and_then(|w| w.conn.as_deref())
            .expect("an open transaction has its connection")
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.writer.as_mut().expect("an open transaction").conn()
    }
}
