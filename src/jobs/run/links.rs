//! Plan parts about linked clones that several kinds add to their own plans: streaming
//! the shared data into dependents first (`?flatten_dependents=true`), dropping a
//! source's layer once its last linked disk leaves, and measuring what flattening
//! copies.

use std::collections::HashSet;

use super::Planning;
use super::guards::{refuse_if_readers_running, require_stopped, volume_ids};
use crate::domain::job_spec::Flatten;
use crate::domain::plan::{self, DiskGraph, MetaOp, Plan};
use crate::domain::{Uuid, VmKind};
use crate::error::{Error, Result};
use crate::{files, store};

/// With `flatten.flatten_dependents`, make each linked clone that reads files `plan`
/// rewrites or removes standalone first (stream the shared data in, cut the link). The
/// clones must be stopped; their bytes never change. Only the clones the job locked
/// when it was accepted may be flattened; one linked since makes the job refuse (the
/// caller's dependents check). A shared layer only the flattened clones read goes too.
pub async fn flatten_dependents_first(
    cx: &mut Planning<'_>,
    plan: Plan,
    flatten: &Flatten,
) -> Result<Plan> {
    if !flatten.flatten_dependents {
        return Ok(plan);
    }
    let endangered = plan.endangered_dependents(&cx.graphs);
    if endangered.is_empty() {
        return Ok(plan);
    }
    let ours = volume_ids(&cx.graphs);
    let mut first = Plan::default();
    let mut flattened = Vec::new();
    for dependent in endangered {
        if let Some(locked) = &flatten.locked_vms
            && !locked.contains(&dependent)
        {
            continue;
        }
        flattened.push(dependent);
        let vm = store::vms::get_vm(cx.conn, dependent)
            .await?
            .ok_or_else(|| Error::Internal(format!("dependent VM {dependent} vanished")))?;
        require_stopped(&vm, "flatten its linked disks")?;
        refuse_if_readers_running(cx.conn, &vm).await?;
        if vm.kind == VmKind::Template {
            // Its exports were made from the linked file: a new generation.
            first.finish.push(MetaOp::TouchVm { vm: vm.id });
        }
        for disk in store::vms::disk_graphs(cx.conn, dependent).await? {
            if !disk.link_sources().iter().any(|s| ours.contains(s)) {
                continue;
            }
            let copy_bytes = links_bytes(cx, &disk).await?;
            if let Some(part) = plan::plan_flatten(&disk, copy_bytes) {
                first.steps.extend(part.steps);
                first.space_needed += part.space_needed;
            }
        }
    }
    // The flattened links are gone once those steps ran: the plan's own steps follow.
    let mut plan = plan;
    first.steps.append(&mut plan.steps);
    plan.steps = first.steps;
    plan.finish.extend(first.finish);
    plan.space_needed += first.space_needed;
    for graph in &cx.graphs {
        plan.drop_unread_shared_layers(graph, &flattened);
    }
    Ok(plan)
}

/// A linked clone's disks that are deleted or flattened (`leaving`: the disk ids, or
/// every disk of the VM) stop reading the source layer they sat on. When that was a
/// shared layer (the source's present, frozen for the clone) and nothing else reads
/// it, it goes too, once this job's records are committed: its file would otherwise
/// stay for good, shown by no view. Nothing can start reading it meanwhile: clones
/// start from snapshots and present states, never from a shared layer.
pub async fn drop_unread_source_layers(
    cx: &mut Planning<'_>,
    mut plan: Plan,
    leaving: Option<Uuid>,
) -> Result<Plan> {
    let (leaving, staying): (Vec<&DiskGraph>, Vec<&DiskGraph>) = cx
        .graphs
        .iter()
        .partition(|g| leaving.is_none_or(|disk| g.disk_id == disk));
    // Every link of the leaving disks is cut (removed, or streamed standalone); the VM
    // stops reading a source disk unless one of its other disks still links into it.
    let still_read: HashSet<Uuid> = staying.iter().flat_map(|g| g.link_sources()).collect();
    let sources: Vec<Uuid> = leaving.iter().flat_map(|g| g.link_sources()).collect();
    let mut done: HashSet<Uuid> = HashSet::new();
    for source in sources {
        let Some(owner) = store::vms::volume_owner(cx.conn, source).await? else {
            continue;
        };
        let source_graphs = store::vms::disk_graphs(cx.conn, owner.id).await?;
        let Some(source_disk) = source_graphs.iter().find(|g| g.get(source).is_some()) else {
            continue;
        };
        if !done.insert(source_disk.disk_id)
            || source_disk
                .volumes
                .iter()
                .any(|v| still_read.contains(&v.id))
        {
            continue;
        }
        plan.drop_unread_shared_layers(source_disk, &[cx.vm.id]);
    }
    Ok(plan)
}

/// Upper bound of what flattening `disk` copies: each link streams in the whole source
/// chain it reads.
pub async fn links_bytes(cx: &mut Planning<'_>, disk: &DiskGraph) -> Result<u64> {
    let mut bytes = 0;
    for source in disk.links().iter().filter_map(|link| link.parent) {
        bytes += files::chain_bytes(cx.engine.volumes_dir(), cx.conn, source).await?;
    }
    Ok(bytes)
}
