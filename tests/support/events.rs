//! A Server-Sent Events client for `/v1/events`: opens the stream (with the app's
//! token, optionally resuming), and reads events one by one, skipping keep-alive
//! comments.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use super::TestApp;

/// One event as the stream sent it.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub id: i64,
    pub event: String,
    pub data: Value,
}

pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    /// `GET /v1/events?{query}` as the app's token, resuming after `last_event_id`
    /// when given.
    pub async fn open(app: &TestApp, query: &str, last_event_id: Option<i64>) -> Self {
        let token = app.token.as_deref();
        Self::connect(&app.client, &app.base, token, query, last_event_id)
            .await
            .unwrap()
    }

    pub async fn connect(
        client: &reqwest::Client,
        base: &str,
        token: Option<&str>,
        query: &str,
        last_event_id: Option<i64>,
    ) -> Result<Self, String> {
        let mut request = client
            .get(format!("{base}/v1/events?{query}"))
            .header("accept", "text/event-stream");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("open the event stream: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("the event stream answered {}", response.status()));
        }
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap_or_default();
        if content_type != "text/event-stream" {
            return Err(format!("the event stream is {content_type}"));
        }
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// The next event, or none within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(at) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..at + 2).collect();
                if let Some(event) = parse(&block) {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .ok()??;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
        }
    }

    /// The next event (within 60 s, or the test fails).
    pub async fn next(&mut self) -> SseEvent {
        self.next_within(Duration::from_secs(60))
            .await
            .expect("an event within 60 s")
    }

    /// Events up to and including the first `until` accepts.
    pub async fn until(&mut self, until: impl Fn(&SseEvent) -> bool) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        loop {
            let event = self.next().await;
            let last = until(&event);
            seen.push(event);
            if last {
                return seen;
            }
        }
    }
}

/// An event block; none for a comment-only block (keep-alive).
fn parse(block: &str) -> Option<SseEvent> {
    let (mut id, mut event, mut data) = (None, None, Vec::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.parse().expect("numeric event id")),
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    let event = event?;
    Some(SseEvent {
        id: id.expect("every event has an id"),
        event,
        data: serde_json::from_str(&data.join("\n")).expect("JSON data"),
    })
}

impl SseEvent {
    /// `data.id` as text.
    pub fn resource(&self) -> &str {
        self.data["id"].as_str().unwrap_or_default()
    }
}

/// Where a resource of an event is read back.
fn get_path(event: &SseEvent) -> String {
    let kind = event.event.split('.').next().unwrap_or_default();
    let id = event.resource();
    match kind {
        "vm" => format!("/v1/vms/{id}"),
        "template" => format!("/v1/templates/{id}"),
        "disk" => format!(
            "/v1/vms/{}/disks/{id}",
            event.data["vm_id"].as_str().unwrap_or_default()
        ),
        "snapshot" => format!("/v1/snapshots/{id}"),
        "job" => format!("/v1/jobs/{id}"),
        "schedule" => format!("/v1/schedules/{id}"),
        "run" => format!(
            "/v1/schedules/{}/runs/{id}",
            event.data["schedule_id"].as_str().unwrap_or_default()
        ),
        other => panic!("an event about an unknown kind {other}"),
    }
}

/// The whole kept history (from the first event) replays to the present: the last
/// event of every resource is its view as `GET` answers it now, or its deletion when
/// `GET` finds nothing. So no event was published for a change that did not happen,
/// and none is missing for one that did. Call it with no job left running; it reads
/// up to the newest event the database holds.
pub async fn assert_history_replays_to_the_present(app: &TestApp) {
    if let Err(e) =
        history_replays_to_the_present(&app.client, &app.base, app.token.as_deref(), &app.data_dir)
            .await
    {
        panic!("{e}");
    }
}

/// `assert_history_replays_to_the_present` for any client of the service over
/// `data_dir`; every difference found, or the stream's failure.
pub async fn history_replays_to_the_present(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<(), String> {
    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data_dir.join("strata.db"))
        .read_only(true);
    let mut db = sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| format!("open strata.db: {e}"))?;
    let newest: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM events")
        .fetch_one(&mut db)
        .await
        .map_err(|e| format!("read the newest event: {e}"))?;
    let _ = db.close().await;
    let Some(newest) = newest else {
        return Ok(());
    };
    let mut stream = EventStream::connect(client, base, token, "", Some(0)).await?;
    let mut events = Vec::new();
    while events.last().is_none_or(|e: &SseEvent| e.id < newest) {
        let event = stream
            .next_within(Duration::from_secs(60))
            .await
            .ok_or_else(|| {
                format!(
                    "no event {newest} within 60 s; read {} events",
                    events.len()
                )
            })?;
        if event.event == "reset" {
            return Err(format!("the history from the start is gone: {event:?}"));
        }
        events.push(event);
    }
    let mut problems = Vec::new();
    if !events.windows(2).all(|w| w[0].id < w[1].id) {
        problems.push("event ids do not only grow".to_owned());
    }
    let mut last = std::collections::BTreeMap::new();
    for event in events {
        let kind = event.event.split('.').next().unwrap_or_default().to_owned();
        last.insert((kind, event.resource().to_owned()), event);
    }
    for ((kind, id), event) in last {
        let mut request = client.get(format!("{base}{}", get_path(&event)));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let reply = request
            .send()
            .await
            .map_err(|e| format!("GET {kind} {id}: {e}"))?;
        let status = reply.status();
        let mut now: Value = reply.json().await.unwrap_or(Value::Null);
        if event.event.ends_with(".deleted") {
            if status != StatusCode::NOT_FOUND {
                problems.push(format!(
                    "{kind} {id}: its last event is {} but GET answers {status}",
                    event.event
                ));
            }
            continue;
        }
        if status != StatusCode::OK {
            problems.push(format!(
                "{kind} {id}: its last event is {} but GET answers {status}: {now}",
                event.event
            ));
            continue;
        }
        let mut data = event.data.clone();
        // Who asked is in an event even where the view has no such field.
        if now.get("requested_by").is_none()
            && let Some(object) = data.as_object_mut()
        {
            object.remove("requested_by");
        }
        for view in [&mut data, &mut now] {
            forget_allocation(view);
        }
        if data != now {
            problems.push(format!(
                "{kind} {id}: its last event ({} {}) is not the present\n  event: {data}\n  GET:   {now}",
                event.id, event.event
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Allocation figures move with every write a guest makes, without an event.
pub fn forget_allocation(view: &mut Value) {
    match view {
        Value::Object(map) => {
            map.remove("allocated_bytes");
            map.values_mut().for_each(forget_allocation);
        }
        Value::Array(items) => items.iter_mut().for_each(forget_allocation),
        _ => {}
    }
}
