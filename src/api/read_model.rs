//! Views served from the read model (`store::views`): a view found there is brought up
//! to date in what changes without a write (the allocation of each volume file, a
//! running VM's last monitor contact, a running job's copy), and one missing is
//! rendered from one consistent read of the database by the same renderer the events
//! use, then kept.
//!
//! With `--verify-reads` (the test suite's setting) every view served from memory is
//! also rendered from the database with writes held, and any difference fails the
//! request: a change some event does not report would show up there.

use std::sync::Arc;

use serde::Serialize;

use super::events::ViewRenderer;
use crate::domain::Uuid;
use crate::error::{Error, Result};
use crate::store::events::Render as _;
use crate::store::{Db, views::ViewCache};

/// A view's parts that come from outside the database when it is rendered (a file's
/// allocation, a QEMU's last contact): `--verify-reads` blanks them on both sides.
pub trait Outside {
    fn blank_outside(&mut self);
}

impl Outside for super::vms::VmView {
    fn blank_outside(&mut self) {
        for disk in &mut self.disks {
            for entry in &mut disk.chain {
                entry.allocated_bytes = 0;
            }
        }
        if let Some(runtime) = &mut self.runtime {
            runtime.connected = None;
        }
    }
}

impl Outside for super::snapshots::SnapshotView {
    fn blank_outside(&mut self) {
        for volume in &mut self.volumes {
            volume.allocated_bytes = 0;
        }
    }
}

impl Outside for super::snapshots::VmSnapshots {
    fn blank_outside(&mut self) {
        self.items.iter_mut().for_each(Outside::blank_outside);
    }
}

/// A job's row holds all of its view; only a read adds the running copy's figures.
impl Outside for super::jobs::JobView {
    fn blank_outside(&mut self) {}
}

#[derive(Clone)]
pub struct ReadModel {
    db: Db,
    renderer: Arc<ViewRenderer>,
    verify: bool,
}

impl ReadModel {
    pub fn new(db: &Db, renderer: Arc<ViewRenderer>, verify: bool) -> Self {
        Self {
            db: db.clone(),
            renderer,
            verify,
        }
    }

    fn cache(&self) -> &ViewCache {
        &self.db.outbox().views
    }

    /// The view of `kind` `id` (`vm`, `template`, `disk`, `snapshot`, `job`, ...),
    /// brought up to date by `refresh`; none when there is no such resource of that
    /// kind (a template asked for as a VM included).
    pub async fn view<V>(&self, kind: &str, id: Uuid, refresh: impl Fn(&mut V)) -> Result<Option<V>>
    where
        V: Clone + Serialize + Send + Sync + Outside + 'static,
    {
        if let Some(kept) = self.cache().get(kind, id)
            && let Some(view) = kept.downcast_ref::<V>()
        {
            let mut view = view.clone();
            refresh(&mut view);
            if self.verify {
                self.verify::<V>(kind, id).await?;
            }
            return Ok(Some(view));
        }
        let mark = self.cache().mark();
        let mut read = self.db.read_tx().await?;
        let rendered = self
            .renderer
            .render(&mut read, kind, &id.hyphenated().to_string())
            .await?;
        read.finish().await;
        let Some(rendered) = rendered else {
            return Ok(None);
        };
        let Some(mut view) = rendered.view.downcast_ref::<V>().cloned() else {
            return Ok(None);
        };
        self.cache().fill(kind, id, rendered.view, mark);
        refresh(&mut view);
        Ok(Some(view))
    }

    /// Render the view from the database with no write under way (the writer is held,
    /// so the read model has every commit applied) and compare it with the read
    /// model's, both as stored: what a read refreshes comes from outside the database
    /// (files, QEMU, a running copy) and moves between two looks, so it is left out.
    async fn verify<V>(&self, kind: &str, id: Uuid) -> Result<()>
    where
        V: Clone + Serialize + Send + Sync + Outside + 'static,
    {
        let mut writer = self.db.begin().await?;
        let rendered = self
            .renderer
            .render(&mut writer, kind, &id.hyphenated().to_string())
            .await?;
        // The read model as it stands now, with the writer held: the served view may
        // predate a commit applied since it was looked up.
        let now = self
            .cache()
            .get(kind, id)
            .and_then(|kept| kept.downcast_ref::<V>().cloned());
        writer.rollback().await;
        let fresh = rendered.and_then(|r| r.view.downcast_ref::<V>().cloned());
        let (Some(mut now), Some(mut fresh)) = (now, fresh) else {
            // Deleted since the lookup, or evicted: nothing to compare.
            return Ok(());
        };
        now.blank_outside();
        fresh.blank_outside();
        let json =
            |view: &V| serde_json::to_value(view).map_err(|e| Error::Internal(e.to_string()));
        let (now, fresh) = (json(&now)?, json(&fresh)?);
        if now != fresh {
            tracing::error!(%kind, %id, memory = %now, database = %fresh, "the read model diverged from the database");
            return Err(Error::Internal(format!(
                "read model diverged for {kind} {id}: memory {now}, database {fresh}"
            )));
        }
        Ok(())
    }
}
