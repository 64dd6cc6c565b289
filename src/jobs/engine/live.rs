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
use crate::domain::{Quiesce, SnapshotConsistency, Uuid, VmState};
use crate::error::{Error, ErrorCode, Result};
use crate::live::{DiskChain, match_disks};
use crate::qemu::guest_agent::{AgentError, FreezeStatus, GuestAgent};
use crate::qemu::qmp::{BlockNode, Qmp, QmpError};
use crate::store;

/// Bounds every exchange with a monitor. Graph changes are quick; a QEMU that does not
/// answer within this is treated as hung, and the step is tried again.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A thaw is tried this many times, `THAW_PAUSE` apart, before it is reported.
const THAW_ATTEMPTS: u32 = 3;
const THAW_PAUSE: Duration = Duration::from_secs(1);

/// What a live step can know of the VM's QEMU.
pub(super) enum Reach {
    Reached(Qmp),
    /// The orchestrator marked the VM stopped: its QEMU is gone (a VM cannot be marked
    /// running again while the job is pending).
    Stopped,
    /// Recorded running, but its monitor cannot be asked now: nothing can be concluded
    /// (a QEMU restarting, or a socket path removed while QEMU runs).
    Unreachable(Error),
}

/// A `FileOp::LiveSwitch` to run: which job, which VM, which overlays, and whether an
/// earlier attempt may have run it.
pub(super) struct Switch<'a> {
    pub job: Uuid,
    pub vm: Uuid,
    pub overlays: &'a [LiveOverlay],
    pub snapshot: Option<Uuid>,
    pub freeze: Option<Quiesce>,
    pub again: bool,
}

fn thaw_failed() -> Error {
    Error::problem(
        ErrorCode::ThawFailed,
        "the guest's file systems could not be thawed (see thaw_error); the job tries again",
    )
}

/// A transaction to run with the guest frozen around it (`transaction_frozen`): for
/// which job and VM, whether to freeze, and the snapshot whose consistency it records
/// (none for a clone's).
pub(super) struct Frozen {
    pub job: Uuid,
    pub vm: Uuid,
    pub freeze: Option<Quiesce>,
    pub snapshot: Option<Uuid>,
}

/// Why a freeze failed: before the freeze command was sent (nothing can be frozen),
/// or after (the guest may be frozen, or become so: it must be thawed).
enum FreezeFailure {
    NotSent(String),
    Sent(String),
}

impl FreezeFailure {
    fn reason(&self) -> &str {
        match self {
            FreezeFailure::NotSent(reason) | FreezeFailure::Sent(reason) => reason,
        }
    }
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
                    format!(
                        "VM {vm} was stopped before its new layers were switched in: ask again (it runs offline now)"
                    ),
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

    /// Switch every disk onto its overlay in one transaction (all or none), the guest
    /// frozen around it when asked, and record the snapshot's consistency.
    ///
    /// The graph is read first (switched already: only the thaw and the record are
    /// left); the freeze comes right before the transaction and the thaw right after
    /// its answer, on every path, so the guest is frozen for no more than the
    /// transaction. `filesystem` is recorded only when this attempt saw the freeze
    /// succeed and the thaw find file systems still frozen; anything else is `crash`
    /// (`stopped` when the VM was marked stopped before any attempt could switch).
    pub(super) async fn live_switch(&self, step: Switch<'_>) -> Result<()> {
        let Switch {
            job,
            vm,
            overlays,
            snapshot,
            freeze,
            again,
        } = step;
        let mut qmp = match self.connect_live(vm).await? {
            Reach::Reached(qmp) => qmp,
            Reach::Stopped => {
                tracing::warn!(%vm, "the VM was stopped; its overlays are recorded as they are");
                // Recorded by an attempt that switched; else an earlier attempt may
                // have switched, and the guest written since.
                if self.job_detail(job).await?.get("consistency").is_some() {
                    return Ok(());
                }
                let consistency = if again {
                    SnapshotConsistency::Crash
                } else {
                    SnapshotConsistency::Stopped
                };
                return self
                    .record_consistency(job, snapshot, consistency, None)
                    .await;
            }
            // Parked by the caller until QEMU answers or the VM is marked stopped.
            Reach::Unreachable(e) => return Err(e),
        };
        let nodes = qmp.block_nodes().await?;
        let disk_nodes = match self.live_graph(&nodes, overlays).await? {
            Graph::Switched => {
                // Switched by an earlier attempt, which may have died with the guest
                // frozen, or failed to thaw it (then this job waits until it can).
                let detail = self.job_detail(job).await?;
                if freeze.is_some() {
                    self.thaw_or_wait(job, vm).await?;
                }
                // Recorded by the attempt that switched, unless it died first.
                if detail.get("consistency").is_some() {
                    return Ok(());
                }
                return self
                    .record_consistency(job, snapshot, SnapshotConsistency::Crash, None)
                    .await;
            }
            Graph::Before(disk_nodes) => disk_nodes,
        };
        let actions: Vec<Value> = overlays
            .iter()
            .zip(&disk_nodes)
            .map(|(overlay, node)| {
                json!({"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay_node(overlay.overlay)}})
            })
            .collect();

        let frozen = Frozen {
            job,
            vm,
            freeze,
            snapshot,
        };
        self.transaction_frozen(&mut qmp, frozen, actions)
            .await?
            .map_err(Error::from_graph_change)?;
        let nodes = qmp.block_nodes().await?;
        match self.live_graph(&nodes, overlays).await? {
            Graph::Switched => Ok(()),
            Graph::Before(_) => Err(Error::Qmp(QmpError::Protocol {
                command: "transaction".into(),
                detail: "QEMU accepted the snapshot transaction but still reads the old layers"
                    .into(),
            })),
        }
    }

    /// Run `actions` in one QMP transaction, the guest's file systems frozen right
    /// before it and thawed right after its answer, on every path, when `freeze` asks
    /// (no journal write in between). A required freeze that fails is an error before
    /// the transaction is sent; a best-effort one records why and goes on. Once the
    /// transaction succeeded, what it captured is recorded: `filesystem` only when this
    /// attempt saw the freeze succeed and the thaw find file systems still frozen,
    /// else `crash`. The outer error is the freeze's or thaw's (a thaw that failed after
    /// a freeze parks the job, which tries it again); the inner one, QEMU's answer to
    /// the transaction.
    pub(super) async fn transaction_frozen(
        &self,
        qmp: &mut Qmp,
        frozen: Frozen,
        actions: Vec<Value>,
    ) -> Result<std::result::Result<(), QmpError>> {
        let Frozen {
            job,
            vm,
            freeze,
            snapshot,
        } = frozen;
        let mut must_thaw = false;
        let mut frozen_at = None;
        if let Some(quiesce) = freeze {
            match self.freeze_guest(vm).await {
                Ok(()) => {
                    must_thaw = true;
                    frozen_at = Some(Instant::now());
                }
                Err(failure) => {
                    // A freeze that timed out may still complete in the guest: it is
                    // thawed before anything else, or the job waits until it can be.
                    if let FreezeFailure::Sent(_) = failure {
                        self.thaw_or_wait(job, vm).await?;
                    }
                    if quiesce == Quiesce::Required {
                        return Err(Error::problem(
                            ErrorCode::QuiesceFailed,
                            format!(
                                "could not freeze the guest's file systems: {}",
                                failure.reason()
                            ),
                        ));
                    }
                    tracing::warn!(%job, %vm, error = failure.reason(), "the guest's file systems could not be frozen; going on crash-consistent");
                    let detail = json!({ "quiesce_error": failure.reason() });
                    self.add_detail(job, &detail).await?;
                }
            }
        }
        let sent = qmp
            .execute::<Value>("transaction", json!({"actions": actions}))
            .await;
        let thawed = if must_thaw {
            self.thaw_guest(job, vm).await?
        } else {
            None
        };
        let frozen_ms = frozen_at.map(|at| at.elapsed().as_millis() as u64);
        if let Err(e) = sent {
            // Nothing happened, but the guest must not stay frozen: the job waits
            // (parked) for a thaw before it is undone or fails.
            if must_thaw && thawed.is_none() {
                return Err(thaw_failed());
            }
            return Ok(Err(e));
        }
        let consistency = if thawed.is_some_and(|n| n > 0) {
            SnapshotConsistency::Filesystem
        } else {
            SnapshotConsistency::Crash
        };
        let frozen_ms = frozen_ms.filter(|_| consistency == SnapshotConsistency::Filesystem);
        self.record_consistency(job, snapshot, consistency, frozen_ms)
            .await?;
        if must_thaw && thawed.is_none() {
            // Done, but the guest may still be frozen: the job waits (parked) and
            // tries the thaw again.
            return Err(thaw_failed());
        }
        Ok(Ok(()))
    }

    /// Thaw a guest an attempt may have frozen; a thaw that fails is `thaw_failed`,
    /// which parks the job (it tries again) rather than letting it end or roll back
    /// with the guest frozen.
    pub(super) async fn thaw_or_wait(&self, job: Uuid, vm: Uuid) -> Result<()> {
        match self.thaw_guest(job, vm).await? {
            Some(_) => Ok(()),
            None => Err(thaw_failed()),
        }
    }

    /// Ask the guest agent to freeze every file system, within the freeze timeout (on
    /// the read of the answer itself). Found frozen (by an attempt that died), it stays
    /// frozen: the switch still falls inside a freeze.
    async fn freeze_guest(&self, vm: Uuid) -> std::result::Result<(), FreezeFailure> {
        let record = store::vms::get_vm(
            &mut *self
                .db
                .reader()
                .await
                .map_err(|e| FreezeFailure::NotSent(e.to_string()))?,
            vm,
        )
        .await
        .map_err(|e| FreezeFailure::NotSent(e.to_string()))?;
        let socket = record
            .and_then(|r| r.runtime.guest_agent_socket)
            .ok_or_else(|| FreezeFailure::NotSent("the VM has no guest-agent socket".into()))?;
        let timeout = self.config.freeze_timeout;
        let not_sent = |e: AgentError| FreezeFailure::NotSent(e.to_string());
        let mut agent = GuestAgent::connect(Path::new(&socket), timeout)
            .await
            .map_err(not_sent)?;
        if agent.freeze_status(timeout).await.map_err(not_sent)? == FreezeStatus::Frozen {
            return Ok(());
        }
        agent
            .freeze(timeout)
            .await
            .map(drop)
            .map_err(|e| FreezeFailure::Sent(e.to_string()))
    }

    /// Thaw the guest's file systems, a few times over if need be (a guest left frozen
    /// stops working). The number thawed (0: nothing was frozen, or the VM stopped);
    /// `None` when every try failed: that is logged as an error and put in the job's
    /// `thaw_error` (cleared by a later success).
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
                Ok(count) => {
                    let detail = self.job_detail(job).await?;
                    if detail.get("thaw_error").is_some_and(|e| !e.is_null()) {
                        self.add_detail(job, &json!({ "thaw_error": null })).await?;
                    }
                    return Ok(Some(count));
                }
                Err(e) => last = e.to_string(),
            }
            if attempt < THAW_ATTEMPTS {
                tokio::time::sleep(THAW_PAUSE).await;
            }
        }
        tracing::error!(%job, %vm, error = %last, "could not thaw the guest's file systems; thaw them by hand (guest-fsfreeze-thaw)");
        self.add_detail(job, &json!({ "thaw_error": last })).await?;
        Ok(None)
    }

    /// What the job's attempts recorded so far in its `detail`.
    pub(super) async fn job_detail(&self, job: Uuid) -> Result<Value> {
        let job = store::jobs::get(&mut *self.db.reader().await?, job).await?;
        Ok(job.and_then(|j| j.detail).unwrap_or(Value::Null))
    }

    /// Record the consistency of what the switch froze: on the job, and on the
    /// snapshot when there is one (a linked clone's shared layer has none).
    async fn record_consistency(
        &self,
        job: Uuid,
        snapshot: Option<Uuid>,
        consistency: SnapshotConsistency,
        frozen_ms: Option<u64>,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        if let Some(snapshot) = snapshot {
            store::snapshots::set_consistency(&mut tx, snapshot, consistency).await?;
        }
        let detail = json!({ "consistency": consistency, "frozen_ms": frozen_ms });
        store::jobs::add_detail(&mut tx, job, &detail).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn add_detail(&self, job: Uuid, detail: &Value) -> Result<()> {
        let mut tx = self.db.begin().await?;
        store::jobs::add_detail(&mut tx, job, detail).await?;
        tx.commit().await?;
        Ok(())
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
        // What is not a QMP error here fails the job (the records keep the old size),
        // unless an earlier attempt may have sent the grow: then nothing is known.
        let unsettled = |e: Error| match e {
            Error::Qmp(_) => e,
            other => Error::Qmp(QmpError::Protocol {
                command: "block_resize".into(),
                detail: other.to_string(),
            }),
        };
        let node = match self.live_node(&mut qmp, volume).await {
            Err(e) if again => return Err(unsettled(e)),
            found => found?,
        };
        if node.image.virtual_size < size_bytes {
            qmp.execute::<Value>(
                "block_resize",
                json!({"node-name": node.node_name, "size": size_bytes}),
            )
            .await
            .map_err(Error::from_graph_change)?;
        }
        // From here on QEMU may have grown the disk: every doubt parks the job.
        let grown = self.live_node(&mut qmp, volume).await.map_err(unsettled)?;
        if grown.image.virtual_size < size_bytes {
            return Err(unsettled(Error::Internal(format!(
                "QEMU accepted block_resize but the disk is {} bytes",
                grown.image.virtual_size
            ))));
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
    pub(super) async fn connect_live(&self, vm: Uuid) -> Result<Reach> {
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
