//! The steps of live jobs: work on a running VM's QEMU through its QMP monitor.
//!
//! State is always learned by asking QEMU (its open graph), never from what an earlier
//! attempt remembers, so every step can be redone after a crash of strata or a lost
//! answer: each disk is found either on the chain the records describe ("before") or
//! on its overlay above that chain ("switched"), and anything else is a
//! `runtime_mismatch`, never a guess.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::super::Engine;
use crate::domain::plan::LiveOverlay;
use crate::domain::{SnapshotConsistency, Uuid, Vm, VmState};
use crate::error::{Error, ErrorCode, Result};
use crate::live::{DiskChain, match_disks};
use crate::qemu::guest_agent::{FreezeStatus, GuestAgent};
use crate::qemu::qmp::{BlockNode, Qmp};
use crate::store;

/// Bounds every exchange with a monitor. Graph changes are quick; a QEMU that does not
/// answer within this is treated as hung, and the step is tried again.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A thaw is tried this many times, `THAW_PAUSE` apart, before it is reported.
const THAW_ATTEMPTS: u32 = 3;
const THAW_PAUSE: Duration = Duration::from_secs(1);

/// What a live step can know of the VM's QEMU.
enum Reach {
    Reached(Qmp),
    /// The orchestrator marked the VM stopped: its QEMU is gone (a VM cannot be marked
    /// running again while the job is pending).
    Stopped,
    /// Recorded running, but its monitor cannot be asked now: nothing can be concluded
    /// (a QEMU restarting, or a socket path removed while QEMU runs).
    Unreachable(Error),
}

/// What a switch found or did.
enum Switch {
    Made,
    /// The VM was marked stopped: nothing to switch, the overlays are recorded as the
    /// layers QEMU's successor reads.
    VmStopped,
}

/// Where every disk of a live step stands in QEMU's graph.
#[derive(Debug, PartialEq, Eq)]
enum Graph {
    /// QEMU reads the recorded chains; the disks' nodes, in the overlays' order.
    Before(Vec<String>),
    /// Every disk already reads its overlay on top of the recorded chain.
    Switched,
}

impl Engine {
    /// Open the overlays in QEMU as nodes of their own (not yet read by anything).
    pub(super) async fn live_add(&self, vm: Uuid, overlays: &[LiveOverlay]) -> Result<()> {
        let mut qmp = match self.connect_live(vm).await? {
            Reach::Reached(qmp) => qmp,
            Reach::Stopped => {
                return Err(Error::problem(
                    ErrorCode::VmNotReady,
                    format!("VM {vm} was stopped: take the snapshot again, offline"),
                ));
            }
            Reach::Unreachable(e) => return Err(e),
        };
        let nodes = qmp.block_nodes().await?;
        if self.live_graph(&nodes, overlays).await? == Graph::Switched {
            return Ok(());
        }
        for overlay in overlays {
            let name = overlay_node(overlay.overlay);
            if nodes.iter().any(|n| n.node_name == name) {
                // Left by an attempt that died before its journal entry: not switched
                // in (the graph is still before), but it may hold a file made again
                // since. Opened afresh, it reads the file on disk now.
                qmp.execute::<Value>("blockdev-del", json!({"node-name": name}))
                    .await?;
            }
            let filename = self.volume_path(overlay.overlay);
            // `backing: null`: the switch attaches the disk's node as its backing;
            // opening the backing file again would fight QEMU's own lock on it.
            let node = json!({
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": filename},
                "backing": null
            });
            qmp.execute::<Value>("blockdev-add", node).await?;
        }
        Ok(())
    }

    /// Freeze the guest's file systems for the switch that follows. A failed freeze is
    /// the job's failure when `required` (nothing has changed: the stop closes the
    /// overlays and thaws); otherwise its reason goes into the job's `quiesce_error`
    /// and the snapshot is crash-consistent. The VM stopped: nothing to freeze.
    pub(super) async fn live_freeze(&self, job: Uuid, vm: Uuid, required: bool) -> Result<()> {
        let record = store::vms::get_vm(&mut *self.db.reader().await?, vm).await?;
        let Some(record) = record.filter(|r| r.state == VmState::Running) else {
            return Ok(());
        };
        match self.freeze_guest(&record).await {
            Ok(()) => {
                let mut freezes = self.freezes.lock().unwrap_or_else(|e| e.into_inner());
                freezes.insert(vm, Instant::now());
                Ok(())
            }
            Err(e) if required => Err(Error::problem(
                ErrorCode::QuiesceFailed,
                format!("could not freeze VM {}'s file systems: {e}", record.name),
            )),
            Err(e) => {
                tracing::warn!(%job, %vm, error = %e, "the guest's file systems could not be frozen; the snapshot is crash-consistent");
                let mut tx = self.db.begin().await?;
                store::jobs::add_detail(&mut tx, job, &json!({ "quiesce_error": e })).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Ask the guest agent to freeze every file system, within the freeze timeout (on
    /// the read of the answer itself). Found frozen (by an attempt that died before
    /// the switch), it stays frozen.
    async fn freeze_guest(&self, vm: &Vm) -> std::result::Result<(), String> {
        let socket = vm
            .runtime
            .guest_agent_socket
            .as_deref()
            .ok_or("the VM has no guest-agent socket")?;
        let timeout = self.config.freeze_timeout;
        let mut agent = GuestAgent::connect(Path::new(socket), timeout)
            .await
            .map_err(|e| e.to_string())?;
        if agent
            .freeze_status(timeout)
            .await
            .map_err(|e| e.to_string())?
            == FreezeStatus::Frozen
        {
            return Ok(());
        }
        agent.freeze(timeout).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Thaw the guest's file systems, a few times over if need be (a guest left frozen
    /// stops working). The number thawed (0: nothing was frozen, or the VM stopped). A
    /// thaw that keeps failing is logged as an error and put in the job's `thaw_error`:
    /// the guest may need thawing by hand.
    pub(super) async fn thaw_guest(&self, job: Uuid, vm: Uuid) -> Result<Option<u64>> {
        let record = store::vms::get_vm(&mut *self.db.reader().await?, vm).await?;
        let Some(socket) = record
            .filter(|r| r.state == VmState::Running)
            .and_then(|r| r.runtime.guest_agent_socket)
        else {
            return Ok(Some(0));
        };
        let timeout = self.config.freeze_timeout;
        let mut last = String::new();
        for attempt in 1..=THAW_ATTEMPTS {
            let thawed = async {
                let mut agent = GuestAgent::connect(Path::new(&socket), timeout).await?;
                agent.thaw(timeout).await
            };
            match thawed.await {
                Ok(count) => return Ok(Some(count)),
                Err(e) => last = e.to_string(),
            }
            if attempt < THAW_ATTEMPTS {
                tokio::time::sleep(THAW_PAUSE).await;
            }
        }
        tracing::error!(%job, %vm, error = %last, "could not thaw the guest's file systems; thaw them by hand (guest-fsfreeze-thaw)");
        let mut tx = self.db.begin().await?;
        store::jobs::add_detail(&mut tx, job, &json!({ "thaw_error": last })).await?;
        tx.commit().await?;
        Ok(None)
    }

    /// Switch every disk onto its overlay in one transaction (all or none), thaw the
    /// guest if it was frozen for it (on every path), and record the snapshot's
    /// consistency once the switch is made: `filesystem` only when this process saw
    /// the freeze succeed and the thaw find file systems still frozen (a guest that
    /// thawed itself, or a resumed job, cannot prove the switch fell inside a freeze).
    pub(super) async fn live_switch(
        &self,
        job: Uuid,
        vm: Uuid,
        overlays: &[LiveOverlay],
        snapshot: Uuid,
        thaw: bool,
    ) -> Result<()> {
        let switched = self.switch(vm, overlays).await;
        let frozen_at = self
            .freezes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm);
        let thawed = if thaw {
            self.thaw_guest(job, vm).await?
        } else {
            None
        };
        let consistency = match switched? {
            Switch::VmStopped => SnapshotConsistency::Stopped,
            Switch::Made if thawed.is_some_and(|n| n > 0) && frozen_at.is_some() => {
                SnapshotConsistency::Filesystem
            }
            Switch::Made => SnapshotConsistency::Crash,
        };
        let frozen_ms = frozen_at
            .filter(|_| consistency == SnapshotConsistency::Filesystem)
            .map(|at| at.elapsed().as_millis() as u64);
        let mut tx = self.db.begin().await?;
        store::snapshots::set_consistency(&mut tx, snapshot, consistency).await?;
        let detail = json!({ "consistency": consistency, "frozen_ms": frozen_ms });
        store::jobs::add_detail(&mut tx, job, &detail).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The switch itself. Done already, or no QEMU left: nothing to do.
    async fn switch(&self, vm: Uuid, overlays: &[LiveOverlay]) -> Result<Switch> {
        let mut qmp = match self.connect_live(vm).await? {
            Reach::Reached(qmp) => qmp,
            Reach::Stopped => {
                tracing::warn!(%vm, "the VM was stopped; its overlays are recorded as they are");
                return Ok(Switch::VmStopped);
            }
            // Parked by the caller until QEMU answers or the VM is marked stopped.
            Reach::Unreachable(e) => return Err(e),
        };
        let nodes = qmp.block_nodes().await?;
        let disk_nodes = match self.live_graph(&nodes, overlays).await? {
            Graph::Switched => return Ok(Switch::Made),
            Graph::Before(disk_nodes) => disk_nodes,
        };
        let actions: Vec<Value> = overlays
            .iter()
            .zip(&disk_nodes)
            .map(|(overlay, node)| {
                json!({"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay_node(overlay.overlay)}})
            })
            .collect();
        qmp.execute::<Value>("transaction", json!({"actions": actions}))
            .await?;
        let nodes = qmp.block_nodes().await?;
        match self.live_graph(&nodes, overlays).await? {
            Graph::Switched => Ok(Switch::Made),
            Graph::Before(_) => Err(Error::problem(
                ErrorCode::RuntimeMismatch,
                "QEMU accepted the snapshot transaction but still reads the old layers",
            )),
        }
    }

    /// Forget a freeze of a job that stopped, and thaw the guest.
    pub(super) async fn live_unfreeze(&self, job: Uuid, vm: Uuid) -> Result<()> {
        self.freezes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm);
        self.thaw_guest(job, vm).await.map(drop)
    }

    /// Grow a running VM's disk in its QEMU, so the guest sees the new size; done
    /// already (the node is that large), nothing to do; the VM stopped, offline.
    pub(super) async fn live_resize(
        &self,
        vm: Uuid,
        volume: Uuid,
        size_bytes: u64,
        again: bool,
    ) -> Result<()> {
        let mut qmp = match self.connect_live(vm).await? {
            Reach::Reached(qmp) => qmp,
            Reach::Stopped => {
                let path = self.volume_path(volume);
                if again {
                    self.qemu.repair_leaks(&path).await?;
                }
                return Ok(self.qemu.resize(&path, size_bytes).await?);
            }
            Reach::Unreachable(e) => return Err(e),
        };
        let node = self.live_node(&mut qmp, volume).await?;
        if node.image.virtual_size < size_bytes {
            qmp.execute::<Value>(
                "block_resize",
                json!({"node-name": node.node_name, "size": size_bytes}),
            )
            .await?;
        }
        let grown = self.live_node(&mut qmp, volume).await?;
        if grown.image.virtual_size < size_bytes {
            return Err(Error::problem(
                ErrorCode::QemuFailed,
                format!(
                    "QEMU accepted block_resize but the disk is {} bytes",
                    grown.image.virtual_size
                ),
            ));
        }
        Ok(())
    }

    /// The node QEMU reads the chain topped by `volume` through.
    async fn live_node(&self, qmp: &mut Qmp, volume: Uuid) -> Result<BlockNode> {
        let nodes = qmp.block_nodes().await?;
        let chain = store::vms::volume_chain(&mut *self.db.reader().await?, volume).await?;
        let disk = DiskChain {
            disk: volume,
            name: volume.to_string(),
            files: chain
                .iter()
                .map(|v| self.volume_path(*v).display().to_string())
                .collect(),
        };
        let found = match_disks(&nodes, &[disk]).map_err(|differences| {
            Error::problem(
                ErrorCode::RuntimeMismatch,
                format!(
                    "the VM's QEMU does not read the chain strata records: {}",
                    differences.join("; ")
                ),
            )
        })?;
        nodes
            .into_iter()
            .find(|n| n.node_name == found[0].node_name)
            .ok_or_else(|| Error::Internal("a matched node vanished".into()))
    }

    /// Close overlay nodes a stopped live job opened, before their files go. With no
    /// QEMU to ask, there is nothing to close; a node that reads nothing the guest
    /// writes is harmless to leave if closing it fails.
    pub(super) async fn live_remove(&self, vm: Uuid, overlays: &[LiveOverlay]) -> Result<()> {
        let mut qmp = match self.connect_live(vm).await? {
            Reach::Reached(qmp) => qmp,
            Reach::Stopped => return Ok(()),
            // Before the switch no overlay takes guest writes (the switch is journaled as
            // the point of no return before it is sent): its file may go, and a node
            // left open reads nothing anyone writes.
            Reach::Unreachable(e) => {
                tracing::warn!(%vm, error = %e, "cannot close the overlay nodes of a stopped live job");
                return Ok(());
            }
        };
        let nodes = qmp.block_nodes().await?;
        // Whatever else QEMU reads (a mismatch may be why the job stops), an overlay
        // with a backing attached has been switched in and takes the guest's writes.
        // Never reached (a stop past the switch goes forward); refuse rather than let
        // its file go.
        let switched = nodes.iter().find(|n| {
            let chain = n.image.chain();
            chain.len() > 1
                && overlays
                    .iter()
                    .any(|o| chain[0] == self.volume_path(o.overlay).display().to_string())
        });
        if let Some(node) = switched {
            return Err(Error::Internal(format!(
                "VM {vm}'s QEMU already writes into {}; it cannot be removed",
                node.image.file_name()
            )));
        }
        for overlay in overlays {
            let name = overlay_node(overlay.overlay);
            if nodes.iter().any(|n| n.node_name == name)
                && let Err(e) = qmp
                    .execute::<Value>("blockdev-del", json!({"node-name": name}))
                    .await
            {
                tracing::warn!(%vm, node = %name, error = %e, "could not close an overlay node");
            }
        }
        Ok(())
    }

    /// The VM's QEMU as far as a step can know it. Only the orchestrator's word that
    /// the VM stopped means its QEMU is gone: a refused connection or a missing socket
    /// may be a QEMU restarting, or one whose socket path was removed while it runs.
    async fn connect_live(&self, vm: Uuid) -> Result<Reach> {
        let record = store::vms::get_vm(&mut *self.db.reader().await?, vm).await?;
        let Some(record) = record.filter(|r| r.state == VmState::Running) else {
            return Ok(Reach::Stopped);
        };
        let Some(socket) = record.runtime.qmp_socket else {
            return Ok(Reach::Unreachable(Error::problem(
                ErrorCode::VmRunning,
                format!("VM {} is running with no QMP socket recorded", record.name),
            )));
        };
        Ok(match Qmp::connect(socket.as_ref(), QMP_TIMEOUT).await {
            Ok(qmp) => Reach::Reached(qmp),
            Err(e) => Reach::Unreachable(e.into()),
        })
    }

    /// Where the disks stand: on their recorded chains, or on their overlays above
    /// them; anything else is a mismatch listing what differs.
    async fn live_graph(&self, nodes: &[BlockNode], overlays: &[LiveOverlay]) -> Result<Graph> {
        let mut before = Vec::with_capacity(overlays.len());
        let mut switched = Vec::with_capacity(overlays.len());
        let mut conn = self.db.reader().await?;
        for overlay in overlays {
            let chain = store::vms::volume_chain(&mut conn, overlay.active).await?;
            let files: Vec<String> = chain
                .iter()
                .map(|v| self.volume_path(*v).display().to_string())
                .collect();
            let name = overlay.disk.to_string();
            let mut above = vec![self.volume_path(overlay.overlay).display().to_string()];
            above.extend(files.iter().cloned());
            before.push(DiskChain {
                disk: overlay.disk,
                name: name.clone(),
                files,
            });
            switched.push(DiskChain {
                disk: overlay.disk,
                name,
                files: above,
            });
        }
        if match_disks(nodes, &switched).is_ok() {
            return Ok(Graph::Switched);
        }
        match match_disks(nodes, &before) {
            Ok(found) => Ok(Graph::Before(
                found.into_iter().map(|d| d.node_name).collect(),
            )),
            Err(differences) => Err(Error::problem(
                ErrorCode::RuntimeMismatch,
                format!(
                    "the VM's QEMU does not read the chains strata records: {}",
                    differences.join("; ")
                ),
            )),
        }
    }
}

/// The node name of an overlay in QEMU: deterministic, so a redone step finds the node
/// an earlier attempt added, and within QEMU's 31-character limit (the UUIDv7's
/// random tail).
fn overlay_node(volume: Uuid) -> String {
    let hex = volume.simple().to_string();
    format!("strata-{}", &hex[8..])
}
