//! The single writer connection, and the write transaction (`Tx`) that borrows it,
//! with group commit: transactions that finish while others wait for the writer are
//! made durable by one `COMMIT`, so one WAL fsync serves all of them.
//!
//! A transaction runs inside the writer's open SQLite transaction, as a savepoint (the
//! first one opens the transaction). `Tx::commit` seals its events, releases
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
    /// The service is stopping: its connection went back to the pool, which waits
    /// for it; no transaction begins any more.
    closed: bool,
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
            closed: false,
        }))
    }

    /// Give the connection back to its pool for good (at shutdown). A group still
    /// waiting (a member's commit task not yet queued) is rolled back and fails.
    pub(super) fn release(&mut self) {
        self.closed = true;
        if self.group.is_some() || self.member_open {
            self.discard(&Error::Internal("the service is stopping".into()));
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
        if self.member_open {
            // A transaction after the group's members vanished half way (cancelled in
            // its RELEASE or ROLLBACK TO): its changes may sit in the open transaction
            // beside theirs, and must not be committed with them.
            self.discard(&Error::Internal(
                "a transaction was left unfinished in the group".into(),
            ));
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
    /// Earlier transactions wait in the writer's open transaction: this one rolls
    /// back to its savepoint alone (else it rolls back the whole transaction).
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
        while settled && let Some(number) = guard.group.as_ref().map(|g| g.number) {
            // Committed by a task of its own, which the caller's cancellation cannot
            // cut off between the COMMIT and telling its members.
            let committer = Arc::clone(outbox);
            let committing = tokio::spawn(async move {
                guard.commit_group(number, &committer).await;
            });
            if committing.await.is_err() {
                outbox.views.clear();
            }
            guard = Arc::clone(writer).lock_owned().await;
        }
        if guard.closed {
            return Err(Error::Internal("the service is stopping".into()));
        }
        if guard.member_open {
            guard.discard(&Error::Internal(
                "a transaction before it was left unfinished".into(),
            ));
        }
        if guard.conn.is_none() {
            let conn = guard.pool.acquire().await?;
            guard.conn = Some(conn);
        }
        let in_group = guard.group.is_some();
        // Every transaction is a savepoint, the first inside the BEGIN: its RELEASE at
        // commit fails if SQLite rolled the whole transaction back on its own (after
        // SQLITE_IOERR or SQLITE_FULL) behind an error its caller did not pass on.
        let open = if in_group {
            "SAVEPOINT member"
        } else {
            "BEGIN IMMEDIATE; SAVEPOINT member"
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
        // Cancelled in here, `member_open` stays set: the next holder of the writer
        // discards the connection rather than commit what this left.
        writer.run_or_discard("RELEASE member").await?;
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

/// Group commit when a member is cancelled or its transaction vanishes: whatever
/// happens, a member told Ok has its changes committed and in the read model's count,
/// and a member told Err has none of them committed. (From the data-loss review of
/// the group commit, which found each of these broken.)
#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::task::Poll;
    use std::time::Duration;

    use crate::store::Db;

    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
    }

    async fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("strata.db")).await.unwrap();
        let mut tx = db.begin().await.unwrap();
        sqlx::raw_sql("CREATE TABLE t (v TEXT)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (dir, db)
    }

    async fn insert(tx: &mut super::Tx, v: &str) {
        sqlx::query("INSERT INTO t (v) VALUES (?)")
            .bind(v)
            .execute(&mut **tx)
            .await
            .unwrap();
        // an event row, so seal has something to do and a view/last_event results
        sqlx::query("INSERT INTO events (type, resource_id) VALUES ('vm.created', ?)")
            .bind(v)
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    async fn committed(db: &Db) -> (Vec<String>, i64) {
        let mut conn = db.reader().await.unwrap();
        let vs = sqlx::query_scalar("SELECT v FROM t ORDER BY v")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let max: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM events")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        (vs, max.unwrap_or(0))
    }

    /// A: first member, pending. B joins (savepoint) and its commit is cancelled
    /// after `polls` polls. Returns A's result and what is committed.
    async fn cancel_b_commit_after(polls: usize) -> (String, Vec<String>, i64, i64) {
        let (_dir, db) = open().await;
        let mut a = db.begin().await.unwrap();
        insert(&mut a, "a").await;
        let db2 = db.clone();
        let b_task = tokio::spawn(async move { db2.begin().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(20)).await; // B queued for the writer
        let a_commit = tokio::spawn(a.commit()); // A's commit task queues behind B
        // Normally B joins A's group; on a loaded machine A may have committed alone
        // first, or B's commit may end within the polls: the promise checked below
        // holds whichever way it went.
        let mut b = b_task.await.unwrap();
        insert(&mut b, "b").await;
        {
            let mut fut = Box::pin(b.commit());
            for _ in 0..polls {
                if poll_once(&mut fut).await.is_ready() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(fut);
        }
        let a_result = format!("{:?}", a_commit.await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (vs, max_event) = committed(&db).await;
        let applied = db.outbox().applied_through.load(Ordering::SeqCst);
        (a_result, vs, max_event, applied)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_cancelled_in_its_commit_commits_nothing_unannounced() {
        for polls in 1..4 {
            let (a, vs, max_event, applied) = cancel_b_commit_after(polls).await;
            let context = format!(
                "polls={polls}: A -> {a}; rows {vs:?}; max event {max_event}; applied {applied}"
            );
            assert_eq!(
                a.starts_with("Ok"),
                vs.contains(&"a".to_owned()),
                "{context}"
            );
            assert!(
                applied >= max_event,
                "a committed event is not applied: {context}"
            );
        }
    }

    /// begin_settled cancelled while it commits the waiting group.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_settled_begin_cancelled_while_it_commits_the_group_tells_the_truth() {
        for wait_us in [0u64, 100, 300, 1000, 5000] {
            let (_dir, db) = open().await;
            let mut a = db.begin().await.unwrap();
            insert(&mut a, "a").await;
            let mut s = Box::pin(db.begin_settled());
            assert!(poll_once(&mut s).await.is_pending()); // queued behind A
            let a_commit = tokio::spawn(a.commit());
            tokio::time::sleep(Duration::from_millis(50)).await;
            // S now holds the lock (granted FIFO); this poll sends COMMIT and waits.
            let p = poll_once(&mut s).await;
            let ready = p.is_ready();
            drop(p);
            std::thread::sleep(Duration::from_micros(wait_us));
            drop(s);
            let a_result = a_commit.await.unwrap();
            let (vs, _) = committed(&db).await;
            let next = async {
                let mut c = db.begin().await?;
                insert(&mut c, "c").await;
                c.commit().await
            }
            .await;
            let (vs2, _) = committed(&db).await;
            let context = format!(
                "wait {wait_us}us (s ready={ready}): A -> {a_result:?}; rows {vs:?}; next tx -> {next:?}; then {vs2:?}"
            );
            assert_eq!(a_result.is_ok(), vs.contains(&"a".to_owned()), "{context}");
            assert!(next.is_ok() && vs2.contains(&"c".to_owned()), "{context}");
        }
    }

    /// The first member's transaction is rolled back by SQLite on its own (simulated by
    /// a ROLLBACK, the state SQLITE_FULL/IOERR leaves) and the error was swallowed
    /// (e.g. `claim`'s `if let Ok(plan) = plan_in(..)`, or `seal`'s render errors).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_member_rolled_back_by_sqlite_fails_and_takes_nobody_along() {
        let (_dir, db) = open().await;
        let mut a = db.begin().await.unwrap();
        insert(&mut a, "a").await;
        sqlx::raw_sql("ROLLBACK").execute(&mut *a).await.unwrap(); // what SQLite does on SQLITE_FULL
        let db2 = db.clone();
        let b_task = tokio::spawn(async move { db2.begin().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let a_commit = tokio::spawn(a.commit());
        let mut b = b_task.await.unwrap();
        insert(&mut b, "b").await;
        let b_result = b.commit().await;
        let a_result = a_commit.await.unwrap();
        let (vs, _) = committed(&db).await;
        let context = format!("A -> {a_result:?}; B -> {b_result:?}; rows {vs:?}");
        assert!(a_result.is_err(), "{context}");
        assert!(!vs.contains(&"a".to_owned()), "{context}");
        assert_eq!(b_result.is_ok(), vs.contains(&"b".to_owned()), "{context}");
    }
}
