//! The event stream's history in the database: sealing a transaction's events before
//! it commits (folding them, rendering each resource's view, recording who asked),
//! reading committed ones back in order, and pruning the oldest.
//!
//! Triggers (migration 0017) write a row for every change inside the transaction that
//! makes it; `seal` runs last in that transaction, on the one writer connection, so
//! what it renders is exactly what the transaction commits, and the ids follow commit
//! order. An event exists exactly when its change does: a crash before `COMMIT` takes
//! both away.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use sqlx::{Row, SqliteConnection};

use super::views::{Applied, View, ViewCache};
use super::{get_ts, ts};
use crate::domain::Timestamp;
use crate::error::Result;

/// One committed event, as the stream sends it.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: i64,
    /// `vm.created`, `job.finished`, ...
    pub event_type: String,
    pub resource_id: String,
    /// The VM it concerns, for `?vm_id=` (none for a schedule over a selector).
    pub vm_id: Option<String>,
    pub requested_by: Option<String>,
    pub at: Timestamp,
    /// The resource's API view (JSON) after the change, or `{"id": ...}` for a deletion.
    pub data: String,
}

/// A resource's view as the renderer made it: its JSON, for the event, and the typed
/// view itself, for the read model (`store::views`).
pub struct Rendered {
    /// None for a view no event carries (one composed of several resources).
    pub json: Option<serde_json::Value>,
    pub view: View,
}

impl Rendered {
    /// A view for the read model only.
    pub fn typed<V: Send + Sync + 'static>(view: V) -> Self {
        Self {
            json: None,
            view: Arc::new(view),
        }
    }
}

/// A future rendering a resource's view.
pub type Rendering<'a> = Pin<Box<dyn Future<Output = Result<Option<Rendered>>> + Send + 'a>>;

/// Renders the API view of a resource (`kind`: `vm`, `disk`, `job`, ...) as the
/// connection's transaction sees it; none when it is not there. The API layer provides
/// it, so the views in events are the views its GETs answer.
pub trait Render: Send + Sync {
    fn render<'a>(
        &'a self,
        conn: &'a mut SqliteConnection,
        kind: &'a str,
        id: &'a str,
    ) -> Rendering<'a>;
}

/// What every write transaction shares: the renderer (set once at start; without one,
/// as in `strata token`, an event carries only its resource's id), the signal that a
/// transaction with events committed, and the read model its views go to.
#[derive(Default)]
pub struct Outbox {
    render: OnceLock<Arc<dyn Render>>,
    pub committed: tokio::sync::Notify,
    pub views: ViewCache,
    /// The newest event whose transaction's views the read model has: the stream
    /// publishes no event past it, so a client reading what an event announces finds
    /// it (a commit lands before its views are applied).
    pub applied_through: std::sync::atomic::AtomicI64,
}

/// What sealing a transaction's events gives its commit: the views for the read
/// model, and the newest event id it keeps.
#[derive(Default)]
pub struct Sealed {
    pub applied: Vec<Applied>,
    pub last_event: Option<i64>,
}

impl Outbox {
    pub fn set_renderer(&self, render: Arc<dyn Render>) {
        let _ = self.render.set(render);
    }
}

/// A change's kind, the part of an event type after the dot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    Created,
    Updated,
    Finished,
    Deleted,
}

fn split(event_type: &str) -> (&str, Action) {
    let (kind, action) = event_type
        .split_once('.')
        .unwrap_or((event_type, "updated"));
    let action = match action {
        "created" => Action::Created,
        "finished" => Action::Finished,
        "deleted" => Action::Deleted,
        _ => Action::Updated,
    };
    (kind, action)
}

/// An event row of the transaction in progress: id, type, resource id, who asked when
/// its trigger knew (a job's rows name their requester), and the VM it concerns.
type Pending = (i64, String, String, Option<String>, Option<String>);

/// One event per change a client can see: the rows one transaction's statements
/// produced, folded. A resource created and then changed is one `created` (its view is
/// rendered as the transaction leaves it), changes in a row are one `updated`, a change
/// followed by a deletion is the deletion alone, and a resource created and deleted
/// again was never seen. A job's `finished` stays apart from its `created`: a client
/// waits for it. What remains keeps the order of its first row. Returns the rows kept
/// and the ids of those folded away.
fn fold(rows: Vec<Pending>) -> (Vec<Pending>, Vec<i64>) {
    enum Seen {
        At(usize),
        Gone,
    }
    let mut seen: std::collections::HashMap<(String, String), Seen> = Default::default();
    let mut out: Vec<Option<Pending>> = Vec::with_capacity(rows.len());
    let mut dropped = Vec::new();
    for row in rows {
        let (kind, action) = split(&row.1);
        let key = (kind.to_owned(), row.2.clone());
        let earlier = match seen.get(&key) {
            None => None,
            Some(Seen::Gone) => {
                dropped.push(row.0);
                continue;
            }
            Some(Seen::At(i)) => Some(*i),
        };
        let Some(i) = earlier else {
            seen.insert(key, Seen::At(out.len()));
            out.push(Some(row));
            continue;
        };
        let prev = split(&out[i].as_ref().expect("a seen row is kept").1).1;
        match (prev, action) {
            (Action::Created, Action::Deleted) => {
                dropped.extend([out[i].take().expect("kept").0, row.0]);
                seen.insert(key, Seen::Gone);
            }
            (Action::Deleted, _) => dropped.push(row.0),
            (_, Action::Deleted) | (Action::Updated, Action::Finished) => {
                dropped.push(out[i].take().expect("kept").0);
                seen.insert(key, Seen::At(out.len()));
                out.push(Some(row));
            }
            (Action::Created, Action::Finished) => {
                seen.insert(key, Seen::At(out.len()));
                out.push(Some(row));
            }
            _ => dropped.push(row.0),
        }
    }
    (out.into_iter().flatten().collect(), dropped)
}

/// An event's row as sealing leaves it: its view's JSON and who asked.
struct SealedRow {
    id: i64,
    kind: String,
    resource_id: String,
    updated: bool,
    data: String,
    requested_by: Option<String>,
}

/// Seal the events of the transaction `conn` has open: fold them, render each one's
/// view, stamp it with `at` and (unless a job's own row named its requester) `actor`.
/// Returns the views for the read model, to apply once the transaction commits.
///
/// Apart from the renders, sealing costs at most four statements however many events
/// the transaction made (each statement is a round trip to SQLite's thread, and this
/// runs on the one writer): read them, find the updates that are no news, delete
/// those and the folded ones, write the rest.
pub async fn seal(
    conn: &mut SqliteConnection,
    outbox: &Outbox,
    actor: Option<&str>,
    at: Timestamp,
) -> Result<Sealed> {
    let rows: Vec<Pending> = sqlx::query_as(
        "SELECT id, type, resource_id, requested_by, vm_id FROM events WHERE data IS NULL ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(Sealed::default());
    }
    // Without a caller of its own, a transaction that writes a job's rows acts for
    // whoever asked for the job: a snapshot's events say who asked for the snapshot.
    let job_actor = rows
        .iter()
        .filter(|(_, event_type, _, _, _)| event_type.starts_with("job."))
        .find_map(|(_, _, _, by, _)| by.clone());
    let actor = actor.map(str::to_owned).or(job_actor);
    let (kept, mut dropped) = fold(rows);
    let mut applied = Vec::with_capacity(kept.len());
    let last_event = kept.iter().map(|row| row.0).max();
    let mut sealed = Vec::with_capacity(kept.len());
    for (id, event_type, resource_id, requested_by, vm_id) in kept {
        let (kind, action) = split(&event_type);
        let rendered: Option<Rendered> = match (action, outbox.render.get()) {
            (Action::Deleted, _) | (_, None) => None,
            // A view that cannot be rendered must not fail the change it reports: the
            // event then carries the id alone (and a broken transaction still fails
            // at its COMMIT).
            (_, Some(render)) => match render.render(conn, kind, &resource_id).await {
                Ok(view) => view,
                Err(e) => {
                    tracing::warn!(error = %e, %event_type, %resource_id, "cannot render an event's view");
                    None
                }
            },
        };
        // Not rendered (deleted, gone, or not renderable): the read model drops what it
        // had, and a read renders it again from the database.
        if let Ok(resource) = resource_id.parse() {
            applied.push(Applied {
                kind: kind.to_owned(),
                id: resource,
                vm: vm_id.as_deref().and_then(|vm| vm.parse().ok()),
                view: rendered.as_ref().map(|r| Arc::clone(&r.view)),
            });
        }
        let mut data = rendered
            .and_then(|r| r.json)
            .unwrap_or_else(|| serde_json::json!({ "id": resource_id }));
        let requested_by = requested_by.or_else(|| actor.clone());
        // Who asked, also where the view itself does not say (a job's does).
        if let (Some(by), Some(object)) = (&requested_by, data.as_object_mut()) {
            object
                .entry("requested_by")
                .or_insert_with(|| by.clone().into());
        }
        sealed.push(SealedRow {
            id,
            kind: kind.to_owned(),
            resource_id,
            updated: action == Action::Updated,
            data: data.to_string(),
            requested_by,
        });
    }
    // A change that leaves the view as the resource's last event showed it (a
    // journal write, a status set again) is not news. (Folding keeps an `updated`
    // event only as the one event of its resource in this transaction, so "last" is
    // an earlier transaction's, or an earlier member's of the same group commit.)
    let no_news = repeated_views(conn, &sealed).await?;
    if !no_news.is_empty() {
        let no_news: std::collections::HashSet<i64> = no_news.iter().copied().collect();
        sealed.retain(|row| !no_news.contains(&row.id));
    }
    dropped.extend(no_news);
    if !dropped.is_empty() {
        sqlx::query("DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))")
            .bind(serde_json::to_string(&dropped).expect("ids serialise"))
            .execute(&mut *conn)
            .await?;
    }
    if !sealed.is_empty() {
        let rows: Vec<_> = sealed
            .iter()
            .map(|row| (row.id, &row.data, &row.requested_by))
            .collect();
        sqlx::query(
            "UPDATE events SET data = u.value ->> 1, at = ?, requested_by = u.value ->> 2
               FROM json_each(?) u WHERE events.id = u.value ->> 0",
        )
        .bind(ts(at))
        .bind(serde_json::to_string(&rows).expect("rows serialise"))
        .execute(&mut *conn)
        .await?;
    }
    Ok(Sealed {
        applied,
        last_event,
    })
}

/// The `updated` events among `rows` whose view is the one the last sealed event of
/// their resource carried, in one statement.
async fn repeated_views(conn: &mut SqliteConnection, rows: &[SealedRow]) -> Result<Vec<i64>> {
    let updates: Vec<_> = rows
        .iter()
        .filter(|row| row.updated)
        .map(|row| (row.id, &row.kind, &row.resource_id, &row.data))
        .collect();
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "SELECT u.value ->> 0 FROM json_each(?) u
          WHERE (SELECT e.data FROM events e
                  WHERE e.resource_id = u.value ->> 2 AND e.id < u.value ->> 0
                    AND e.data IS NOT NULL
                    AND substr(e.type, 1, length(u.value ->> 1) + 1) = (u.value ->> 1) || '.'
                  ORDER BY e.id DESC LIMIT 1) = u.value ->> 3",
    )
    .bind(serde_json::to_string(&updates).expect("rows serialise"))
    .fetch_all(&mut *conn)
    .await?)
}

fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Event> {
    Ok(Event {
        id: row.try_get("id")?,
        event_type: row.try_get("type")?,
        resource_id: row.try_get("resource_id")?,
        vm_id: row.try_get("vm_id")?,
        requested_by: row.try_get("requested_by")?,
        at: get_ts(row, "at")?,
        data: row.try_get("data")?,
    })
}

/// Committed events after `after`, oldest first, at most `limit`.
pub async fn after(conn: &mut SqliteConnection, after: i64, limit: i64) -> Result<Vec<Event>> {
    let rows =
        sqlx::query("SELECT * FROM events WHERE id > ? AND data IS NOT NULL ORDER BY id LIMIT ?")
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
    rows.iter().map(from_row).collect()
}

/// The newest event id pruned from the history (0: none yet).
pub async fn pruned_through(conn: &mut SqliteConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT through_id FROM events_pruned")
        .fetch_one(&mut *conn)
        .await?)
}

/// Keep the newest `keep` events up to `read_through` (the newest the stream has
/// read: younger ones are kept whatever their number, or it would never see them);
/// the new `pruned_through`.
pub async fn prune(conn: &mut SqliteConnection, keep: i64, read_through: i64) -> Result<i64> {
    let cut: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM events WHERE data IS NOT NULL AND id <= ? ORDER BY id DESC LIMIT 1 OFFSET ?",
    )
    .bind(read_through)
    .bind(keep)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(cut) = cut else {
        return pruned_through(conn).await;
    };
    sqlx::query("DELETE FROM events WHERE id <= ? AND data IS NOT NULL")
        .bind(cut)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE events_pruned SET through_id = max(through_id, ?)")
        .bind(cut)
        .execute(&mut *conn)
        .await?;
    pruned_through(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(types: &[(&str, &str)]) -> Vec<Pending> {
        types
            .iter()
            .enumerate()
            .map(|(i, (t, id))| (i as i64 + 1, t.to_string(), id.to_string(), None, None))
            .collect()
    }

    fn kept(types: &[(&str, &str)]) -> Vec<(String, String)> {
        fold(rows(types))
            .0
            .into_iter()
            .map(|(_, t, id, _, _)| (t, id))
            .collect()
    }

    fn pairs(types: &[(&str, &str)]) -> Vec<(String, String)> {
        types
            .iter()
            .map(|(t, id)| (t.to_string(), id.to_string()))
            .collect()
    }

    #[test]
    fn a_resource_made_and_then_changed_in_one_transaction_is_one_created_event() {
        let input = [
            ("vm.created", "v"),
            ("disk.created", "d"),
            ("disk.updated", "d"),
            ("vm.updated", "v"),
            ("job.created", "j"),
        ];
        assert_eq!(
            kept(&input),
            pairs(&[
                ("vm.created", "v"),
                ("disk.created", "d"),
                ("job.created", "j")
            ])
        );
    }

    #[test]
    fn changes_fold_into_one_update_and_a_deletion_ends_a_resource() {
        let input = [
            ("snapshot.updated", "s"),
            ("disk.updated", "d"),
            ("snapshot.updated", "s"),
            ("snapshot.deleted", "s"),
            // A cascade's rows after the deletion are not news.
            ("snapshot.updated", "s"),
            ("disk.updated", "d"),
        ];
        assert_eq!(
            kept(&input),
            pairs(&[("disk.updated", "d"), ("snapshot.deleted", "s")])
        );
        let (kept_rows, dropped) = fold(rows(&input));
        assert_eq!(kept_rows.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(dropped.len(), 4);
    }

    #[test]
    fn something_made_and_removed_in_one_transaction_was_never_seen() {
        let input = [
            ("vm.created", "v"),
            ("vm.updated", "v"),
            ("vm.deleted", "v"),
            ("vm.updated", "v"),
        ];
        assert!(kept(&input).is_empty());
    }

    #[test]
    fn a_job_finishing_stays_its_own_event_after_its_creation() {
        let input = [
            ("job.created", "j"),
            ("job.updated", "j"),
            ("job.finished", "j"),
            ("job.updated", "j"),
        ];
        assert_eq!(
            kept(&input),
            pairs(&[("job.created", "j"), ("job.finished", "j")])
        );
        let input = [
            ("job.updated", "j"),
            ("vm.updated", "v"),
            ("job.finished", "j"),
        ];
        assert_eq!(
            kept(&input),
            pairs(&[("vm.updated", "v"), ("job.finished", "j")])
        );
    }

    #[tokio::test]
    async fn pruning_keeps_what_the_stream_has_not_read_yet() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Db::open(&dir.path().join("strata.db"))
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        for i in 1..=10 {
            sqlx::query(
                "INSERT INTO events (type, resource_id, data) VALUES ('vm.updated', ?, '{}')",
            )
            .bind(i.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        // The stream has read up to 5: keep two of those, and everything after.
        assert_eq!(prune(&mut tx, 2, 5).await.unwrap(), 3);
        let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM events ORDER BY id")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(left, (4..=10).collect::<Vec<_>>());
        // Nothing older than the newest read beyond what to keep: nothing goes, and the
        // mark never moves back.
        assert_eq!(prune(&mut tx, 20, 10).await.unwrap(), 3);
        tx.commit().await.unwrap();
    }

    /// A commit cancelled while it seals (a request timed out, its client gone) takes
    /// its connection with it: the next writer is not handed a transaction still open.
    #[tokio::test]
    async fn a_commit_cancelled_while_sealing_leaves_the_writer_usable() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Db::open(&dir.path().join("strata.db"))
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        for i in 0..2000 {
            sqlx::query("INSERT INTO events (type, resource_id) VALUES ('vm.updated', ?)")
                .bind(i.to_string())
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_micros(1), tx.commit()).await;
        assert!(cancelled.is_err(), "the commit was still sealing");
        let mut next = db.begin().await.expect("a fresh writer");
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut *next)
            .await
            .unwrap();
        assert_eq!(
            count, 0,
            "nothing of the cancelled transaction was committed"
        );
        next.commit().await.unwrap();
    }

    #[test]
    fn a_vm_turned_template_is_the_vms_deletion_and_the_templates_creation() {
        let input = [
            ("vm.updated", "v"),
            ("vm.deleted", "v"),
            ("template.created", "v"),
        ];
        assert_eq!(
            kept(&input),
            pairs(&[("vm.deleted", "v"), ("template.created", "v")])
        );
    }
}
