//! The event stream's fan-out: the newest committed events in memory, fed in commit
//! order from the database, for any number of subscribers.
//!
//! The database holds the truth (`store::events`: an event row is written and sealed
//! by the transaction that makes its change). One task follows the table: woken when a
//! transaction commits (and once a second, should a wake-up be lost to a cancelled
//! request), it reads the rows after the last one it has and appends them here.
//! Subscribers read from memory and wait on `latest`; none of them touches the database.
//! Each event's Server-Sent Events frame is encoded once, when it is appended, and
//! every subscriber sends that same buffer (a reference count, not a copy).

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::error::Result;
use crate::store::Db;
use crate::store::events::{self, Event};

/// Events read from the table at once.
const BATCH: i64 = 512;

pub struct Hub {
    db: Db,
    history: RwLock<History>,
    /// The id of the newest event in `history`.
    latest: watch::Sender<i64>,
    /// Events kept (`--event-history`).
    capacity: usize,
    /// Turns true when the service stops: streams end, so shutdown need not wait.
    shutdown: watch::Receiver<bool>,
}

/// A committed event and its encoded frame.
pub struct Published {
    pub event: Event,
    /// `id: <id>`, `event: <type>` and `data: <view>` lines and the blank line that
    /// ends an event (the view is compact JSON: it holds no line break).
    pub frame: Bytes,
}

impl Published {
    fn new(event: Event) -> Self {
        let mut frame = format!("id: {}\nevent: {}\n", event.id, event.event_type);
        // Compact JSON has no line break; were there one, each line is a `data:` line
        // of its own, as the format requires.
        for line in event.data.split('\n') {
            frame.push_str("data: ");
            frame.push_str(line);
            frame.push('\n');
        }
        frame.push('\n');
        Self {
            event,
            frame: Bytes::from(frame),
        }
    }
}

impl std::ops::Deref for Published {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

struct History {
    events: VecDeque<Arc<Published>>,
    /// The newest id no longer kept: a client resuming from an older one missed events.
    pruned_through: i64,
}

/// What a client resuming after an id gets.
pub enum Since {
    /// The events after it (possibly none yet).
    Events(Vec<Arc<Published>>),
    /// Events it missed are gone (pruned, or the id is not one of this history's); it
    /// must reload and go on from `latest`.
    Gone { latest: i64 },
}

impl Hub {
    /// Trim the stored history to `capacity` and load it.
    pub async fn load(
        db: Db,
        capacity: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>> {
        let capacity = capacity.max(1);
        // Trimming is housekeeping: on a full disk the service starts with the longer
        // history rather than not at all.
        let trimmed = async {
            let mut tx = db.begin().await?;
            events::prune(&mut tx, capacity as i64, i64::MAX).await?;
            tx.commit().await
        };
        if let Err(e) = trimmed.await {
            tracing::warn!(error = %e, "cannot trim the event history; keeping it whole");
        }
        let mut conn = db.reader().await?;
        let pruned_through = events::pruned_through(&mut conn).await?;
        let mut kept = VecDeque::new();
        let mut after = pruned_through;
        loop {
            let batch = events::after(&mut conn, after, BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = last.id;
            kept.extend(batch.into_iter().map(|e| Arc::new(Published::new(e))));
        }
        let latest = kept.back().map_or(pruned_through, |e| e.id);
        drop(conn);
        // Committed before this process made any: their views are in no read model,
        // which starts empty and renders from the database.
        db.outbox()
            .applied_through
            .fetch_max(latest, std::sync::atomic::Ordering::SeqCst);
        Ok(Arc::new(Self {
            db,
            history: RwLock::new(History {
                events: kept,
                pruned_through,
            }),
            latest: watch::channel(latest).0,
            capacity,
            shutdown,
        }))
    }

    /// Follow the table until `shutdown`.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let hub = Arc::clone(self);
        let mut shutdown = self.stopping();
        tokio::spawn(async move {
            let mut since_prune = 0usize;
            loop {
                match hub.pull().await {
                    Ok(pulled) => since_prune += pulled,
                    Err(e) => tracing::warn!(error = %e, "cannot read new events; retrying"),
                }
                // Keep the stored history near the one in memory, a batch at a time.
                if since_prune > hub.capacity / 4 {
                    since_prune = 0;
                    if let Err(e) = hub.prune_stored().await {
                        tracing::warn!(error = %e, "cannot prune the event history");
                    }
                }
                tokio::select! {
                    _ = hub.db.outbox().committed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        })
    }

    /// Append the events committed since the last pull; how many.
    async fn pull(&self) -> Result<usize> {
        let mut conn = self.db.reader().await?;
        let mut pulled = 0;
        loop {
            let after = *self.latest.borrow();
            // Only events whose views the read model has (see `applied_through`): a
            // subscriber that reads what an event announces finds it there.
            let applied = self
                .db
                .outbox()
                .applied_through
                .load(std::sync::atomic::Ordering::SeqCst);
            let mut batch = events::after(&mut conn, after, BATCH).await?;
            batch.retain(|e| e.id <= applied);
            let Some(last) = batch.last().map(|e| e.id) else {
                return Ok(pulled);
            };
            pulled += batch.len();
            // Encoded before taking the lock, which subscribers read under.
            let published: Vec<_> = batch
                .into_iter()
                .map(|e| Arc::new(Published::new(e)))
                .collect();
            let mut history = self.history.write().expect("event history lock");
            history.events.extend(published);
            while history.events.len() > self.capacity {
                let oldest = history.events.pop_front().expect("over capacity");
                history.pruned_through = oldest.id;
            }
            // Under the lock, so no subscriber sees the events before `latest` does.
            self.latest.send_replace(last);
        }
    }

    async fn prune_stored(&self) -> Result<()> {
        let mut tx = self.db.begin().await?;
        events::prune(&mut tx, self.capacity as i64, self.latest()).await?;
        tx.commit().await
    }

    /// Turns true when the service stops.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Changes whenever events are appended.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }

    /// The newest event's id: a new client starts after it.
    pub fn latest(&self) -> i64 {
        *self.latest.borrow()
    }

    /// Up to `limit` events after `after`, waiting until there are some; none once the
    /// service stops. `updates` is the caller's own `subscribe()`.
    pub async fn next_after(
        &self,
        after: i64,
        limit: usize,
        updates: &mut watch::Receiver<i64>,
    ) -> Option<Since> {
        let mut stopping = self.stopping();
        loop {
            // Marked seen before reading, so an append after the read wakes the wait.
            updates.borrow_and_update();
            match self.since(after, limit) {
                Since::Events(events) if events.is_empty() => {
                    tokio::select! {
                        changed = updates.changed() => changed.ok()?,
                        _ = stopping.wait_for(|stop| *stop) => return None,
                    }
                }
                found => return Some(found),
            }
        }
    }

    /// Up to `limit` events after `after`.
    pub fn since(&self, after: i64, limit: usize) -> Since {
        let history = self.history.read().expect("event history lock");
        let latest = history
            .events
            .back()
            .map_or(history.pruned_through, |e| e.id);
        if after < history.pruned_through || after > latest {
            return Since::Gone { latest };
        }
        let start = history.events.partition_point(|e| e.id <= after);
        Since::Events(history.events.range(start..).take(limit).cloned().collect())
    }
}
