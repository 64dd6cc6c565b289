//! The read model: the API views of resources, kept in memory in step with the one
//! writer, so a `GET` of a VM, job or snapshot is a map lookup instead of a handful of
//! queries.
//!
//! Only a write transaction changes a view, and every change it makes to a resource a
//! client can see is an event (`store::events`: triggers write a row per change, and
//! `seal` renders each changed resource's view inside the transaction). After its
//! `COMMIT` succeeds, and before the writer connection is released, the transaction
//! puts those views here (`apply`): the model changes in commit order, and a request
//! that got its answer from a commit (a 202) finds the change here. The model is
//! memory only and starts empty; a view missing here is rendered from the database by
//! the reader and kept (`fill`), unless a commit was applied meanwhile (its rendering
//! may predate that commit). Entries past `CAPACITY` per kind are evicted: a miss is
//! never wrong, only slower.
//!
//! Views are stored typed (the API layer's structs, behind `Any`): the API refreshes
//! what changes without a write (a volume's allocation, a running VM's monitor
//! contact, a running job's copy) on each read.
//!
//! Some views are composed of several resources of one VM (`VM_SNAPSHOTS`: every
//! snapshot of a VM, which its snapshot tree and list are cut from). No event renders
//! them: a reader renders and keeps them like any other, and a commit drops them
//! whenever it changes anything of their VM (every event names the VM it concerns),
//! so the next read renders them again.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::domain::Uuid;

/// A resource's view, typed by the API layer.
pub type View = Arc<dyn Any + Send + Sync>;

/// Views kept per kind before some are evicted.
const CAPACITY: usize = 200_000;

/// The kind of the view of all of a VM's snapshots, kept by the VM's id.
pub const VM_SNAPSHOTS: &str = "vm_snapshots";

/// Kinds composed of a VM's resources, kept by the VM's id and dropped by any change
/// to the VM.
const PER_VM: &[&str] = &[VM_SNAPSHOTS];

/// One change a committed transaction made: the view after it, or none (deleted).
pub struct Applied {
    pub kind: String,
    pub id: Uuid,
    /// The VM the changed resource belongs to, if any.
    pub vm: Option<Uuid>,
    pub view: Option<View>,
}

#[derive(Default)]
pub struct ViewCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    views: HashMap<String, HashMap<Uuid, View>>,
    /// Counts the commits applied (and clears): a reader's rendering is kept only if
    /// this did not move while it rendered.
    applied: u64,
}

/// Where the model stood when a reader started rendering a view from the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(u64);

impl ViewCache {
    /// The view of `kind` `id`, if the model has it.
    pub fn get(&self, kind: &str, id: Uuid) -> Option<View> {
        let inner = self.inner.lock().expect("view cache lock");
        inner.views.get(kind)?.get(&id).cloned()
    }

    /// Take this before rendering a view from the database, to `fill` it after.
    pub fn mark(&self) -> Mark {
        Mark(self.inner.lock().expect("view cache lock").applied)
    }

    /// Keep a view a reader rendered from the database, unless a commit was applied
    /// since `mark`: that rendering may show the state before it, which the commit's
    /// own view (already applied, or about to be) must not be overwritten by.
    pub fn fill(&self, kind: &str, id: Uuid, view: View, mark: Mark) {
        let mut inner = self.inner.lock().expect("view cache lock");
        if inner.applied != mark.0 {
            return;
        }
        insert(&mut inner, kind, id, view);
    }

    /// A committed transaction's changes, in its order. Called with the writer still
    /// held, so commits are applied in the order they were made.
    pub fn apply(&self, changes: Vec<Applied>) {
        let mut inner = self.inner.lock().expect("view cache lock");
        inner.applied += 1;
        for change in changes {
            if let Some(vm) = change.vm {
                for kind in PER_VM {
                    if let Some(views) = inner.views.get_mut(*kind) {
                        views.remove(&vm);
                    }
                }
            }
            match change.view {
                Some(view) => insert(&mut inner, &change.kind, change.id, view),
                None => {
                    if let Some(views) = inner.views.get_mut(&change.kind) {
                        views.remove(&change.id);
                    }
                }
            }
        }
    }

    /// Forget every view: a transaction whose outcome is not known (its commit was
    /// cancelled or failed) may have changed any of them.
    pub fn clear(&self) {
        let mut inner = self.inner.lock().expect("view cache lock");
        inner.applied += 1;
        inner.views.clear();
    }
}

fn insert(inner: &mut Inner, kind: &str, id: Uuid, view: View) {
    let views = match inner.views.get_mut(kind) {
        Some(views) => views,
        None => inner.views.entry(kind.to_owned()).or_default(),
    };
    if views.len() >= CAPACITY && !views.contains_key(&id) {
        // Any entry will do: the next read of it renders it again.
        let evicted = views.keys().next().copied();
        if let Some(evicted) = evicted {
            views.remove(&evicted);
        }
    }
    views.insert(id, view);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(text: &str) -> View {
        Arc::new(text.to_owned())
    }

    fn text(cache: &ViewCache, id: Uuid) -> Option<String> {
        cache
            .get("vm", id)
            .map(|v| v.downcast_ref::<String>().unwrap().clone())
    }

    #[test]
    fn a_rendering_older_than_a_commit_is_not_kept() {
        let cache = ViewCache::default();
        let id = Uuid::now_v7();
        let mark = cache.mark();
        // A commit changes the VM while the reader renders the state before it.
        cache.apply(vec![Applied {
            kind: "vm".into(),
            id,
            vm: None,
            view: Some(view("after")),
        }]);
        cache.fill("vm", id, view("before"), mark);
        assert_eq!(text(&cache, id).as_deref(), Some("after"));
        // With no commit in between, the rendering is kept.
        let other = Uuid::now_v7();
        let mark = cache.mark();
        cache.fill("vm", other, view("rendered"), mark);
        assert_eq!(text(&cache, other).as_deref(), Some("rendered"));
    }

    #[test]
    fn a_deletion_removes_the_view_and_a_clear_refuses_renderings_begun_before_it() {
        let cache = ViewCache::default();
        let id = Uuid::now_v7();
        cache.apply(vec![Applied {
            kind: "vm".into(),
            id,
            vm: None,
            view: Some(view("v")),
        }]);
        cache.apply(vec![Applied {
            kind: "vm".into(),
            id,
            vm: None,
            view: None,
        }]);
        assert_eq!(text(&cache, id), None);
        let mark = cache.mark();
        cache.clear();
        cache.fill("vm", id, view("stale"), mark);
        assert_eq!(text(&cache, id), None);
    }

    #[test]
    fn any_change_to_a_vm_drops_the_views_composed_of_its_resources() {
        let cache = ViewCache::default();
        let (vm, other, snapshot) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        for id in [vm, other] {
            let mark = cache.mark();
            cache.fill(VM_SNAPSHOTS, id, view("all snapshots"), mark);
        }
        cache.apply(vec![Applied {
            kind: "snapshot".into(),
            id: snapshot,
            vm: Some(vm),
            view: Some(view("renamed")),
        }]);
        assert!(cache.get(VM_SNAPSHOTS, vm).is_none());
        assert!(cache.get(VM_SNAPSHOTS, other).is_some());
        assert!(cache.get("snapshot", snapshot).is_some());
    }

    #[test]
    fn kinds_are_kept_apart() {
        let cache = ViewCache::default();
        let id = Uuid::now_v7();
        cache.apply(vec![Applied {
            kind: "template".into(),
            id,
            vm: None,
            view: Some(view("t")),
        }]);
        assert!(cache.get("vm", id).is_none());
        assert!(cache.get("template", id).is_some());
    }
}
