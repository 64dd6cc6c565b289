//! `GET /v1/events`: the event stream (Server-Sent Events), and the renderer that puts
//! each changed resource's API view into its event (see `store::events`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::Query;
use super::problem::problems;
use super::read_model::{Kept, Parts};
use super::{AppState, Views};
use crate::domain::{Uuid, VmKind};
use crate::error::{Error, ErrorCode, Result};
use crate::events::{Hub, Since};
use crate::store::events::{Event, Render, Rendered, Rendering};
use crate::store::{self};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_events))
}

/// The kinds of resource events are about, and the changes of each.
const KINDS: &[(&str, &[&str])] = &[
    ("vm", &["created", "updated", "deleted"]),
    ("template", &["created", "updated", "deleted"]),
    ("disk", &["created", "updated", "deleted"]),
    ("snapshot", &["created", "updated", "deleted"]),
    ("job", &["created", "updated", "finished", "deleted"]),
    ("schedule", &["created", "updated", "deleted"]),
    ("run", &["created", "updated", "deleted"]),
];

/// Events sent per read of the history.
const BATCH: usize = 256;
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const KEEP_ALIVE_FRAME: &[u8] = b":\n\n";
/// How long a subscriber woken by new events waits for more before it writes. A job's
/// events span a few milliseconds; so, at 100 subscribers, one write per subscriber
/// every 10 ms still slowed a 6 ms snapshot 1.6 times (bench `--only-events`): each
/// write is a trip through the loopback TCP stack, on the cores the jobs run on.
/// 50 ms gathers several jobs' events, and a person at a dashboard does not notice it.
const GATHER: Duration = Duration::from_millis(50);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events about this VM or template: itself, its disks, snapshots, jobs and
    /// its own schedules' runs.
    pub vm_id: Option<Uuid>,
    /// Only these event types, comma-separated; `kind.*` stands for every type of a
    /// kind.
    #[param(example = "job.*,snapshot.created")]
    pub types: Option<String>,
    /// Resume after this event id, for a client that cannot send `Last-Event-ID` (the
    /// header wins when both are given).
    #[param(minimum = 0, example = 1042)]
    pub last_event_id: Option<i64>,
    /// Instead of the `Authorization` header, which a browser's `EventSource` cannot
    /// send: a ticket from `POST /v1/tickets` (used once, within a minute). Never the
    /// token itself.
    pub ticket: Option<String>,
}

/// Which event types a subscriber asked for.
struct TypeFilter(Vec<String>);

impl TypeFilter {
    fn parse(text: Option<&str>) -> Result<Self> {
        let Some(text) = text else {
            return Ok(Self(Vec::new()));
        };
        let mut patterns = Vec::new();
        for pattern in text.split(',').map(str::trim) {
            let (kind, action) = pattern.split_once('.').unwrap_or((pattern, ""));
            let known = KINDS
                .iter()
                .find(|(k, _)| *k == kind)
                .is_some_and(|(_, actions)| action == "*" || actions.contains(&action));
            if !known {
                return Err(Error::validation(format!(
                    "unknown event type {pattern:?} in types: use kind.change or kind.* with kind one of {}",
                    KINDS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                )));
            }
            patterns.push(pattern.trim_end_matches('*').to_owned());
        }
        Ok(Self(patterns))
    }

    /// A pattern ending in `.` (from `kind.*`) matches by prefix.
    fn admits(&self, event_type: &str) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|p| {
                if p.ends_with('.') {
                    event_type.starts_with(p.as_str())
                } else {
                    event_type == p
                }
            })
    }
}

problems!(StreamEventsProblems = VM; ValidationFailed);

/// Follow every change as it is committed (Server-Sent Events).
///
/// Each event reads `id: <n>`, `event: <type>` and `data: <JSON>`: the changed
/// resource's view, the same JSON as its `GET` (with `requested_by`, the token that
/// asked for the change, where the view has no such field), or `{"id": ...}` for a
/// deletion. Types: `vm.*`, `template.*`, `disk.*`, `snapshot.*`, `schedule.*`,
/// `run.*` (`created`, `updated`, `deleted`) and `job.created`, `job.updated`,
/// `job.finished`, `job.deleted`. Events come in commit order, only for committed
/// changes; ids only grow. A client reconnecting with `Last-Event-ID` gets every
/// event it missed, or, when those are no longer kept (`--event-history`), an event
/// `reset` (`data: {"last_event_id": n}`): reload, and the stream goes on after `n`. A
/// comment line every 15 seconds keeps an idle stream open through proxies. A browser's
/// `EventSource`, which cannot send `Authorization`, passes `?ticket=` (see
/// `POST /v1/tickets`).
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(EventQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (sent by `EventSource` when it reconnects)")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String,
            example = json!("id: 1043\nevent: job.finished\ndata: {\"id\":\"0193f5d2-7c1e-7a51-9f3b-2d6c1e0a9b41\",\"status\":\"succeeded\"}\n\n")),
        StreamEventsProblems,
    ))]
async fn stream_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<EventQuery>,
) -> Result<Response> {
    let types = TypeFilter::parse(query.types.as_deref())?;
    let resume = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|id| *id >= 0)
                .ok_or_else(|| {
                    Error::validation("Last-Event-ID must be an event id this stream sent")
                })?,
        ),
        None => query.last_event_id,
    };
    if resume.is_some_and(|id| id < 0) {
        return Err(Error::validation("last_event_id must be 0 or more"));
    }
    let vm_id = match query.vm_id {
        Some(id) => {
            let found = store::vms::get_vm(&mut *state.db.reader().await?, id).await?;
            if found.is_none() {
                return Err(Error::problem(
                    ErrorCode::VmNotFound,
                    format!("no VM or template {id}"),
                ));
            }
            Some(id.hyphenated().to_string())
        }
        None => None,
    };
    let hub = Arc::clone(&state.events);
    let subscription = Subscription {
        updates: hub.subscribe(),
        after: resume.unwrap_or_else(|| hub.latest()),
        hub,
        types,
        vm_id,
        ready: VecDeque::new(),
    };
    let stream = futures_util::stream::unfold(subscription, |mut s| async move {
        let frame = s.next().await?;
        Some((Ok::<_, Infallible>(frame), s))
    });
    // The frames are encoded once per event by the hub and shared by every
    // subscriber, so the body is written by hand rather than with axum's `Sse`, which
    // would encode each event again for each subscriber.
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// One subscriber's place in the history and what it asked for.
struct Subscription {
    hub: Arc<Hub>,
    updates: tokio::sync::watch::Receiver<i64>,
    after: i64,
    types: TypeFilter,
    vm_id: Option<String>,
    ready: VecDeque<Bytes>,
}

impl Subscription {
    /// What to send next: the events ready, in one write (a commit's events are
    /// appended together, and each write is a system call here and a read at the
    /// subscriber, for every subscriber), or a keep-alive comment after a quiet
    /// `KEEP_ALIVE`; none once the service stops.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frames) = self.take_ready() {
                return Some(frames);
            }
            // `next_after` only reads the history, so dropping it for the keep-alive
            // loses nothing: the next call reads from `after` again.
            let found = tokio::select! {
                found = self.hub.next_after(self.after, BATCH, &mut self.updates) => found?,
                _ = tokio::time::sleep(KEEP_ALIVE) => {
                    return Some(Bytes::from_static(KEEP_ALIVE_FRAME));
                }
            };
            self.queue(found);
            // A job commits several transactions a few milliseconds apart: waiting a
            // moment sends them in one write. Each write is a system call here and a
            // read at the subscriber, for every subscriber, on the cores the jobs run on.
            if !self.ready.is_empty() {
                tokio::time::sleep(GATHER).await;
                let more = self.hub.since(self.after, BATCH);
                self.queue(more);
            }
        }
    }

    /// Queue the frames of what the history gave.
    fn queue(&mut self, found: Since) {
        match found {
            Since::Gone { latest } => {
                self.after = latest;
                let data = serde_json::json!({ "last_event_id": latest });
                self.ready.push_back(Bytes::from(format!(
                    "id: {latest}\nevent: reset\ndata: {data}\n\n"
                )));
            }
            Since::Events(events) => {
                self.after = events.last().map_or(self.after, |e| e.id);
                let wanted: Vec<Bytes> = events
                    .iter()
                    .filter(|e| self.admits(e))
                    .map(|e| e.frame.clone())
                    .collect();
                self.ready.extend(wanted);
            }
        }
    }

    /// Everything queued, as one buffer (a single event is the hub's own, uncopied).
    fn take_ready(&mut self) -> Option<Bytes> {
        let frames = match self.ready.len() {
            0 => return None,
            1 => self.ready.pop_front()?,
            _ => {
                let size = self.ready.iter().map(Bytes::len).sum();
                let mut joined = bytes::BytesMut::with_capacity(size);
                for frame in self.ready.drain(..) {
                    joined.extend_from_slice(&frame);
                }
                joined.freeze()
            }
        };
        Some(frames)
    }

    fn admits(&self, event: &Event) -> bool {
        self.types.admits(&event.event_type)
            && self
                .vm_id
                .as_ref()
                .is_none_or(|vm| event.vm_id.as_ref() == Some(vm))
    }
}

/// Renders events' views with the same functions the handlers answer with.
pub struct ViewRenderer {
    pub volumes_dir: std::path::PathBuf,
    pub live: Arc<crate::live::Live>,
}

impl Render for ViewRenderer {
    fn render<'a>(
        &'a self,
        conn: &'a mut sqlx::SqliteConnection,
        kind: &'a str,
        id: &'a str,
    ) -> Rendering<'a> {
        Box::pin(async move {
            let Ok(id) = id.parse::<Uuid>() else {
                return Ok(None);
            };
            let views = Views {
                volumes_dir: &self.volumes_dir,
                live: &self.live,
            };
            let view = match kind {
                "vm" | "template" => match store::vms::get_vm(conn, id).await? {
                    Some(vm) if vm.kind == VmKind::Vm => {
                        kept_json(super::vms::vm_view(views, conn, vm).await?)
                    }
                    Some(template) => {
                        to_json(super::templates::template_view(views, conn, template).await?)
                    }
                    None => None,
                },
                "disk" => match store::vms::get_disk(conn, id).await? {
                    Some(disk) => {
                        let volumes = store::vms::list_volumes(conn, disk.vm_id).await?;
                        to_json(super::vms::disk_view(views, disk, &volumes))
                    }
                    None => None,
                },
                "snapshot" => match store::snapshots::get(conn, id).await? {
                    Some(snapshot) => match store::vms::get_vm(conn, snapshot.vm_id).await? {
                        Some(vm) => {
                            kept_json(super::snapshots::snapshot_view(views, &vm, snapshot))
                        }
                        None => None,
                    },
                    None => None,
                },
                store::views::VM_SNAPSHOTS => match store::vms::get_vm(conn, id).await? {
                    Some(vm) if vm.kind == VmKind::Vm => {
                        let snapshots = store::snapshots::list(conn, id, None, u32::MAX).await?;
                        let items = snapshots
                            .into_iter()
                            .map(|s| super::snapshots::snapshot_view(views, &vm, s))
                            .collect();
                        Some(Rendered::typed(Kept::plain(
                            super::snapshots::VmSnapshots {
                                current_snapshot_id: vm.current_snapshot_id,
                                items,
                            },
                        )))
                    }
                    _ => None,
                },
                "job" => store::jobs::get(conn, id)
                    .await?
                    .and_then(|job| kept_json(super::jobs::JobView::from(job))),
                "schedule" => match store::schedules::get(conn, id).await? {
                    Some(schedule) => {
                        to_json(super::schedules::schedule_view(conn, schedule).await?)
                    }
                    None => None,
                },
                "run" => store::schedules::find_run(conn, id)
                    .await?
                    .and_then(|run| to_json(super::schedules::run_view(run))),
                _ => None,
            };
            Ok(view)
        })
    }
}

/// The view as the event's JSON and, kept with its own JSON, for the read model
/// (the kinds it serves: `read_model::Kept`).
fn kept_json<V>(view: V) -> Option<Rendered>
where
    V: serde::Serialize + Clone + Parts + Send + Sync + 'static,
{
    let json = serde_json::to_value(&view).ok()?;
    Some(Rendered {
        json: Some(json),
        view: Arc::new(Kept::new(view)),
    })
}

/// The view as the event's JSON and, typed, for what else reads it.
fn to_json<V: serde::Serialize + Send + Sync + 'static>(view: V) -> Option<Rendered> {
    let json = serde_json::to_value(&view).ok()?;
    Some(Rendered {
        json: Some(json),
        view: Arc::new(view),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_filters_take_exact_types_and_kind_wildcards_and_refuse_the_unknown() {
        let filter = TypeFilter::parse(Some("job.*, snapshot.created")).unwrap();
        assert!(filter.admits("job.finished"));
        assert!(filter.admits("snapshot.created"));
        assert!(!filter.admits("snapshot.deleted"));
        assert!(!filter.admits("jobs.created"));
        assert!(TypeFilter::parse(None).unwrap().admits("vm.updated"));
        for bad in ["", "job", "vm.finished", "volume.*", "job.*x", "*"] {
            assert!(TypeFilter::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
