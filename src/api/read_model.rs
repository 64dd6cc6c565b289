//! Views served from the read model (`store::views`): a view found there is brought up
//! to date in what changes without a write (the allocation of each volume file, a
//! running VM's last monitor contact, a running job's copy), and one missing is
//! rendered from one consistent read of the database by the same renderer the events
//! use, then kept.
//!
//! A view is kept with its JSON (`Kept`), serialised once with a hole where each part
//! from outside the database goes: a read answers the JSON with those few figures
//! written in, without copying or serialising the view.
//!
//! With `--verify-reads` (the test suite's setting) every view served from memory is
//! also rendered from the database with writes held, and any difference fails the
//! request: a change some event does not report would show up there. Its kept JSON,
//! filled with markers, must also be the view serialised with the same markers.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::events::ViewRenderer;
use crate::domain::Uuid;
use crate::error::{Error, Result};
use crate::store::events::Render as _;
use crate::store::{Db, views::ViewCache};

/// A part of a view that comes from outside the database when it is read: a file's
/// allocation, or whether a running VM's QEMU answered strata's last contact.
///
/// The file's allocation is held, not its path: a read takes its figure without a
/// look-up (`files::Allocation`).
#[derive(Debug, Clone)]
pub enum Outside {
    Allocation(Arc<crate::files::Allocation>),
    Contact(Uuid),
}

impl Outside {
    /// The JSON a view holds there when its parts are marked (`true`) or blank: a
    /// number (`1`, `0`) or a flag (`true`, `null`), as long either way.
    fn marker_len(&self) -> usize {
        match self {
            Outside::Allocation(_) => 1,
            Outside::Contact(_) => 4,
        }
    }
}

/// The parts of a view that come from outside the database (`--verify-reads` blanks
/// them on both sides; a kept view's JSON leaves holes for them).
pub trait Parts {
    /// Set every part from outside the database to a marker (`marked`: each
    /// allocation 1 and each contact that can be shown `true`; else 0 and null), and
    /// list them in the order they appear in the view's JSON. None when a read
    /// refreshes more of the view than these (a running job's copy).
    fn mark_outside(&mut self, marked: bool) -> Option<Vec<Outside>>;

    fn blank_outside(&mut self) {
        let _ = self.mark_outside(false);
    }
}

fn allocation(path: &str) -> Arc<crate::files::Allocation> {
    crate::files::allocation(std::path::Path::new(path))
}

impl Parts for super::vms::VmView {
    fn mark_outside(&mut self, marked: bool) -> Option<Vec<Outside>> {
        let mut parts = Vec::new();
        for disk in &mut self.disks {
            for entry in &mut disk.chain {
                entry.allocated_bytes = u64::from(marked);
                parts.push(Outside::Allocation(allocation(&entry.path)));
            }
        }
        if let Some(runtime) = &mut self.runtime {
            // Shown only with a monitor's socket (see `vms::refresh_vm`).
            runtime.connected = None;
            if runtime.qmp_socket.is_some() {
                runtime.connected = marked.then_some(true);
                parts.push(Outside::Contact(self.id));
            }
        }
        Some(parts)
    }
}

impl Parts for super::snapshots::SnapshotView {
    fn mark_outside(&mut self, marked: bool) -> Option<Vec<Outside>> {
        let mut parts = Vec::new();
        for volume in &mut self.volumes {
            volume.allocated_bytes = u64::from(marked);
            parts.push(Outside::Allocation(allocation(&volume.path)));
        }
        Some(parts)
    }
}

/// Served in pages and trees cut from it, never whole.
impl Parts for super::snapshots::VmSnapshots {
    fn mark_outside(&mut self, marked: bool) -> Option<Vec<Outside>> {
        for item in &mut self.items {
            item.mark_outside(marked);
        }
        None
    }
}

/// A job's row holds all of its view; only a read of a running job adds the figures
/// of its copy.
impl Parts for super::jobs::JobView {
    fn mark_outside(&mut self, _: bool) -> Option<Vec<Outside>> {
        (self.status != crate::domain::JobStatus::Running).then(Vec::new)
    }
}

/// A view as the read model keeps it: typed, and as JSON with a hole where each part
/// from outside the database goes, so a read fills in a few numbers instead of
/// copying and serialising the view (the bulk of a read's own work once it came from
/// memory).
pub struct Kept<V> {
    pub view: V,
    json: Option<Template>,
}

/// `text` is the view's JSON with its outside parts blank; each hole is where one
/// goes (its offset and the blank marker's length).
struct Template {
    text: Vec<u8>,
    holes: Vec<(usize, usize, Outside)>,
}

impl<V: Parts + Serialize + Clone> Kept<V> {
    pub fn new(view: V) -> Self {
        let json = template(&view);
        Self { view, json }
    }
}

impl<V> Kept<V> {
    /// A view never answered whole (so without its JSON).
    pub fn plain(view: V) -> Self {
        Self { view, json: None }
    }
}

/// Where a view's outside parts are in its JSON: serialised with them blank and
/// marked, the two texts differ exactly there (markers of equal length). None when a
/// read refreshes more than those parts, or the texts do not match what the parts
/// listed (then reads serialise the view each time).
fn template<V: Parts + Serialize + Clone>(view: &V) -> Option<Template> {
    let mut blank = view.clone();
    let parts = blank.mark_outside(false)?;
    let mut marked = view.clone();
    marked.mark_outside(true)?;
    let text = serde_json::to_vec(&blank).ok()?;
    let other = serde_json::to_vec(&marked).ok()?;
    if text.len() != other.len() {
        return None;
    }
    let mut runs = Vec::with_capacity(parts.len());
    let mut at = 0;
    while at < text.len() {
        if text[at] == other[at] {
            at += 1;
            continue;
        }
        let start = at;
        while at < text.len() && text[at] != other[at] {
            at += 1;
        }
        runs.push((start, at - start));
    }
    if runs.len() != parts.len() {
        return None;
    }
    let mut holes = Vec::with_capacity(parts.len());
    for ((start, len), part) in runs.into_iter().zip(parts) {
        if len != part.marker_len() {
            return None;
        }
        holes.push((start, len, part));
    }
    Some(Template { text, holes })
}

impl Template {
    /// The JSON with each hole filled by `fill`.
    fn fill(&self, mut fill: impl FnMut(&Outside, &mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 16 * self.holes.len());
        let mut from = 0;
        for (start, len, part) in &self.holes {
            out.extend_from_slice(&self.text[from..*start]);
            fill(part, &mut out);
            from = start + len;
        }
        out.extend_from_slice(&self.text[from..]);
        out
    }
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

    /// The view of `kind` `id` (`vm`, `snapshot`, `job`, ...) as kept (found in
    /// memory, or rendered from the database and kept); none when there is no such
    /// resource of that kind (a template asked for as a VM included). Not refreshed:
    /// see `json` and `view`.
    pub async fn kept<V>(&self, kind: &str, id: Uuid) -> Result<Option<Arc<Kept<V>>>>
    where
        V: Clone + Serialize + Send + Sync + Parts + 'static,
    {
        if let Some(kept) = self.cache().get(kind, id)
            && let Ok(kept) = kept.downcast::<Kept<V>>()
        {
            if self.verify {
                self.verify::<V>(kind, id).await?;
            }
            return Ok(Some(kept));
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
        let Ok(kept) = Arc::clone(&rendered.view).downcast::<Kept<V>>() else {
            return Ok(None);
        };
        self.cache().fill(kind, id, rendered.view, mark);
        Ok(Some(kept))
    }

    /// The view of `kind` `id`, brought up to date by `refresh`.
    pub async fn view<V>(&self, kind: &str, id: Uuid, refresh: impl Fn(&mut V)) -> Result<Option<V>>
    where
        V: Clone + Serialize + Send + Sync + Parts + 'static,
    {
        Ok(self.kept::<V>(kind, id).await?.map(|kept| {
            let mut view = kept.view.clone();
            refresh(&mut view);
            view
        }))
    }

    /// A kept view's JSON as a read answers it: its outside parts measured now
    /// (the same figures `refresh` would give), or, for a view whose read refreshes
    /// more, the view refreshed by `refresh` and serialised.
    pub fn json<V>(&self, kept: &Kept<V>, refresh: impl Fn(&mut V)) -> Result<Bytes>
    where
        V: Clone + Serialize + Parts,
    {
        let Some(template) = &kept.json else {
            let mut view = kept.view.clone();
            refresh(&mut view);
            return serde_json::to_vec(&view)
                .map(Bytes::from)
                .map_err(|e| Error::Internal(e.to_string()));
        };
        let live = &self.renderer.live;
        let text = template.fill(|part, out| match part {
            Outside::Allocation(file) => {
                out.extend_from_slice(file.shown().to_string().as_bytes());
            }
            Outside::Contact(vm) => out.extend_from_slice(match live.last_contact(*vm) {
                Some(true) => b"true",
                Some(false) => b"false",
                None => b"null",
            }),
        });
        if self.verify {
            verify_template(kept, template)?;
        }
        Ok(Bytes::from(text))
    }

    /// Render the view from the database with no write under way (the writer is held,
    /// every waiting group committed, so the read model has every commit applied) and
    /// compare it with the read
    /// model's, both as stored: what a read refreshes comes from outside the database
    /// (files, QEMU, a running copy) and moves between two looks, so it is left out.
    async fn verify<V>(&self, kind: &str, id: Uuid) -> Result<()>
    where
        V: Clone + Serialize + Send + Sync + Parts + 'static,
    {
        let mut writer = self.db.begin_settled().await?;
        let rendered = self
            .renderer
            .render(&mut writer, kind, &id.hyphenated().to_string())
            .await?;
        // The read model as it stands now, with the writer held: the served view may
        // predate a commit applied since it was looked up.
        let now = self
            .cache()
            .get(kind, id)
            .and_then(|kept| kept.downcast_ref::<Kept<V>>().map(|k| k.view.clone()));
        writer.rollback().await;
        let fresh = rendered.and_then(|r| r.view.downcast_ref::<Kept<V>>().map(|k| k.view.clone()));
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

/// The kept JSON, its holes filled with the markers, must be the view serialised with
/// its outside parts marked, byte for byte.
fn verify_template<V: Clone + Serialize + Parts>(
    kept: &Kept<V>,
    template: &Template,
) -> Result<()> {
    let filled = template.fill(|part, out| {
        out.extend_from_slice(match part {
            Outside::Allocation(_) => b"1",
            Outside::Contact(_) => b"true",
        })
    });
    let mut marked = kept.view.clone();
    marked.mark_outside(true);
    let expected = serde_json::to_vec(&marked).map_err(|e| Error::Internal(e.to_string()))?;
    if filled != expected {
        let (filled, expected) = (
            String::from_utf8_lossy(&filled),
            String::from_utf8_lossy(&expected),
        );
        tracing::error!(%filled, %expected, "a kept view's JSON does not match the view");
        return Err(Error::Internal(format!(
            "kept JSON {filled} is not the view's {expected}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::vms::VmView;

    fn vm(runtime: serde_json::Value) -> VmView {
        let layer = |id: &str, bytes: u64| {
            serde_json::json!({"volume_id": id, "path": format!("/data/volumes/{id}.qcow2"),
                "role": "snapshot", "snapshot_id": null, "size_bytes": 1024, "allocated_bytes": bytes,
                "status": "ready"})
        };
        let disk = |id: &str, layers: Vec<serde_json::Value>| {
            serde_json::json!({"id": id, "vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b",
                "name": "d\"1", "size_bytes": 1024, "format": "qcow2", "status": "ready",
                "active_path": null, "chain": layers, "source_volume_id": null,
                "created_at": "2026-11-21T10:00:00Z"})
        };
        serde_json::from_value(serde_json::json!({
            "id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "name": "web-01", "description": "0 1 null true",
            "labels": {"a": "1"}, "dependent_vm_ids": [], "runtime": runtime,
            "state": "running", "status": "ready", "current_snapshot_id": null, "snapshot_count": 10,
            "disks": [
                disk("019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a81", vec![
                    layer("019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a81", 7),
                    layer("019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a82", 0)]),
                disk("019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a82", vec![
                    layer("019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a83", 1)]),
            ],
            "source_vm_id": null, "template_id": null,
            "created_at": "2026-11-21T10:00:00Z", "updated_at": "2026-11-21T10:00:00Z"
        }))
        .unwrap()
    }

    /// Fill a template as a read does, with given figures instead of measured ones.
    fn filled(
        template: &Template,
        allocation: impl Fn(&Path) -> u64,
        contact: Option<bool>,
    ) -> String {
        let text = template.fill(|part, out| match part {
            Outside::Allocation(file) => {
                out.extend_from_slice(allocation(file.path()).to_string().as_bytes())
            }
            Outside::Contact(_) => {
                out.extend_from_slice(serde_json::to_string(&contact).unwrap().as_bytes())
            }
        });
        String::from_utf8(text).unwrap()
    }

    use std::path::Path;

    #[test]
    fn a_kept_views_json_filled_in_is_the_view_refreshed_and_serialised() {
        let allocation = |path: &Path| path.to_string_lossy().len() as u64 * 1000 + 3;
        for (runtime, contact) in [
            (serde_json::json!(null), None),
            (
                serde_json::json!({"qmp_socket": "/run/q", "guest_agent_socket": null, "connected": null,
                "qemu_version": "10", "can_pause": true}),
                Some(false),
            ),
            (
                serde_json::json!({"qmp_socket": null, "guest_agent_socket": "/run/g", "connected": null,
                "qemu_version": null, "can_pause": null}),
                Some(true),
            ),
        ] {
            let view = vm(runtime);
            let kept = Kept::new(view.clone());
            let template = kept.json.as_ref().expect("a VM's view has a template");
            let with_socket = view
                .runtime
                .as_ref()
                .is_some_and(|r| r.qmp_socket.is_some());
            assert_eq!(template.holes.len(), 3 + usize::from(with_socket));
            let mut refreshed = view.clone();
            for entry in refreshed.disks.iter_mut().flat_map(|d| d.chain.iter_mut()) {
                entry.allocated_bytes = allocation(Path::new(&entry.path));
            }
            if let Some(runtime) = &mut refreshed.runtime {
                runtime.connected = runtime.qmp_socket.as_ref().and(contact);
            }
            assert_eq!(
                filled(template, allocation, contact),
                serde_json::to_string(&refreshed).unwrap()
            );
            verify_template(&kept, template).unwrap();
        }
    }

    #[test]
    fn a_running_jobs_view_is_serialised_on_each_read() {
        let job = |status: &str| -> crate::api::jobs::JobView {
            serde_json::from_value(serde_json::json!({
                "id": "019a6f5e-7c1d-7b3e-9f2a-3c4d5e6f7a8b", "kind": "snapshot_delete",
                "status": status, "progress": 41, "bytes_done": null, "bytes_total": null,
                "eta_seconds": null, "bytes_copied": 0,
                "target": {"type": "snapshot", "id": "019a6f5e-1111-7b3e-9f2a-3c4d5e6f7a8b"},
                "vm_id": null, "created_at": "2026-11-21T10:00:00Z", "started_at": null,
                "finished_at": null, "cancel_requested": false, "requested_by": null,
                "cancelled_by": null, "error": null, "detail": null
            }))
            .unwrap()
        };
        assert!(Kept::new(job("running")).json.is_none());
        let done = Kept::new(job("succeeded"));
        let template = done.json.as_ref().expect("an ended job's JSON is kept");
        assert!(template.holes.is_empty());
        assert_eq!(template.text, serde_json::to_vec(&done.view).unwrap());
    }
}
