//! The one path a request that touches files takes to become a queued job. In one
//! write transaction (the single writer, so nothing changes between a check and the
//! write it allows): the kind's checks on the records as committed (`Run::admit`),
//! its plan where the kind is planned at accept (refusing now, 409 or 507, what the job
//! would refuse), the records the request creates, the status flags, the job; then
//! commit and wake the workers. Handlers and the scheduler only build a `Request`.

use sqlx::SqliteConnection;

use super::{Engine, run};
use crate::domain::{
    Consistency, Disk, Job, JobSpec, Quiesce, ResourceStatus, Snapshot, SnapshotConsistency,
    Timestamp, Uuid, Vm, VmKind, job_spec, new_id,
};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

/// A job to accept, with the records it makes (status `creating`) and what its view
/// shows from the start.
pub struct Request {
    pub spec: JobSpec,
    pub records: NewRecords,
    /// The job's `detail` from the start (e.g. the VMs a deploy makes).
    pub detail: Option<serde_json::Value>,
    /// Who asked (a token's name, or `scheduler`); none for an anonymous request.
    pub requested_by: Option<String>,
}

impl Request {
    pub fn new(spec: JobSpec) -> Self {
        Self::creating(spec, NewRecords::None)
    }

    pub fn creating(spec: JobSpec, records: NewRecords) -> Self {
        Self {
            spec,
            records,
            detail: None,
            requested_by: None,
        }
    }

    /// The same request, recorded as made by `requested_by`.
    pub fn by(self, requested_by: Option<&str>) -> Self {
        Self {
            requested_by: requested_by.map(str::to_owned),
            ..self
        }
    }
}

/// What a new snapshot carries besides its place in the tree.
pub struct NewSnapshot {
    pub name: String,
    pub description: String,
    pub expires_at: Option<Timestamp>,
    pub hold: bool,
    /// The schedule taking it; `None` for a manual snapshot.
    pub schedule_id: Option<Uuid>,
    /// As requested (see `SnapshotCreate`).
    pub consistency: Option<Consistency>,
    pub quiesce: Option<Quiesce>,
}

impl NewSnapshot {
    /// The snapshot of `vm` (status `creating`) and the job that takes it.
    pub fn request(self, vm: &Vm) -> Request {
        let snapshot = Snapshot {
            id: new_id(),
            vm_id: vm.id,
            name: self.name,
            description: self.description,
            // Read when the record is inserted, inside the accept transaction.
            parent_id: None,
            status: ResourceStatus::Creating,
            created_at: store::now(),
            expires_at: self.expires_at,
            hold: self.hold,
            schedule_id: self.schedule_id,
            // The column's default; a live job records what it achieved.
            consistency: SnapshotConsistency::Stopped,
            volumes: Vec::new(),
        };
        let spec = JobSpec::SnapshotCreate(job_spec::SnapshotCreate {
            vm: vm.id,
            snapshot: snapshot.id,
            consistency: self.consistency,
            quiesce: self.quiesce,
        });
        Request::creating(spec, NewRecords::Snapshot(snapshot))
    }
}

/// Records a request creates together with its job.
pub enum NewRecords {
    None,
    /// VMs or templates with their disks.
    Vms(Vec<(Vm, Vec<Disk>)>),
    Disk(Disk),
    Snapshot(Snapshot),
}

impl NewRecords {
    /// Insert them; a name already in use is `409 name_taken`.
    async fn insert(&self, conn: &mut SqliteConnection) -> Result<()> {
        match self {
            NewRecords::None => {}
            NewRecords::Vms(vms) => {
                for (vm, disks) in vms {
                    store::vms::insert_vm(conn, vm).await.map_err(|e| {
                        name_taken(e, || {
                            format!("a VM or template named {} already exists", vm.name)
                        })
                    })?;
                    for disk in disks {
                        store::vms::insert_disk(conn, disk).await.map_err(|e| {
                            name_taken(e, || format!("disk name {} is used twice", disk.name))
                        })?;
                    }
                }
            }
            NewRecords::Disk(disk) => {
                store::vms::insert_disk(conn, disk).await.map_err(|e| {
                    name_taken(e, || {
                        format!("the VM already has a disk named {}", disk.name)
                    })
                })?;
            }
            NewRecords::Snapshot(snapshot) => {
                // The VM's current snapshot now (a deletion may have committed since
                // the request read the VM): provisional, the job sets the parent again
                // when it runs, but it must exist.
                let mut snapshot = snapshot.clone();
                snapshot.parent_id = store::vms::get_vm(conn, snapshot.vm_id)
                    .await?
                    .and_then(|vm| vm.current_snapshot_id);
                store::snapshots::insert(conn, &snapshot)
                    .await
                    .map_err(|e| {
                        name_taken(e, || {
                            format!("the VM already has a snapshot named {}", snapshot.name)
                        })
                    })?;
            }
        }
        Ok(())
    }
}

/// A unique-constraint failure as the `name_taken` problem `detail` describes; any
/// other error as it is.
pub fn name_taken(error: Error, detail: impl FnOnce() -> String) -> Error {
    if store::is_unique_violation(&error) {
        Error::problem(ErrorCode::NameTaken, detail())
    } else {
        error
    }
}

/// Accept a request: check, record and queue it in one transaction, then wake the
/// workers. Nothing is written when it is refused.
pub async fn accept(engine: &Engine, request: Request) -> Result<Job> {
    let mut tx = engine.db.begin().await?;
    let job = accept_in(engine, &mut tx, request).await?;
    tx.commit().await?;
    engine.notify_enqueued();
    Ok(job)
}

/// `accept` inside the caller's transaction (a schedule run queues one job per VM in
/// one), which the caller commits before calling `Engine::notify_enqueued`. A refused
/// request leaves the transaction as it found it.
pub async fn accept_in(
    engine: &Engine,
    tx: &mut SqliteConnection,
    request: Request,
) -> Result<Job> {
    // A refusal after some writes (a request creating several VMs, one of whose names
    // is taken) takes them back, so the caller's transaction stays usable.
    sqlx::raw_sql("SAVEPOINT accept").execute(&mut *tx).await?;
    let accepted = accept_checked(engine, tx, request).await;
    let end = if accepted.is_ok() {
        "RELEASE accept"
    } else {
        "ROLLBACK TO accept; RELEASE accept"
    };
    match (sqlx::raw_sql(end).execute(&mut *tx).await, accepted) {
        (Ok(_), accepted) => accepted,
        // A refusal the caller would go on from, in a transaction that cannot: the
        // caller must stop using it.
        (Err(e), Err(Error::Problem { .. }) | Ok(_)) => Err(e.into()),
        // The transaction failed with the request (a full disk...): that is the answer.
        (Err(_), Err(e)) => Err(e),
    }
}

async fn accept_checked(
    engine: &Engine,
    tx: &mut SqliteConnection,
    request: Request,
) -> Result<Job> {
    let Request {
        mut spec,
        records,
        detail,
        requested_by,
    } = request;
    require_vm_kind(tx, &spec).await?;
    let admission = run::admit(&mut spec, tx).await?;
    if run::plans_at_accept(&spec) {
        run::plan_in(engine, tx, &spec, None).await?;
    }
    records.insert(tx).await?;
    store::apply(tx, &admission.flags).await?;
    let mut job = store::jobs::new_job(spec);
    job.detail = detail;
    job.requested_by = requested_by;
    store::jobs::insert(tx, &job, &admission.locks).await?;
    Ok(job)
}

/// The request found its VM (or template) a moment ago, outside this transaction: a
/// conversion may have turned one into the other since. A VM's job never touches a
/// template, nor the reverse.
async fn require_vm_kind(conn: &mut SqliteConnection, spec: &JobSpec) -> Result<()> {
    let Some(kind) = spec.vm_kind() else {
        return Ok(());
    };
    let id = spec.vm();
    // A record gone meanwhile is the kind's own not-found answer (`Run::admit`): a
    // snapshot's VM deleted is `snapshot_not_found` for a snapshot's job.
    let Some(found) = store::vms::get_vm(conn, id).await?.map(|vm| vm.kind) else {
        return Ok(());
    };
    match kind {
        _ if found == kind => Ok(()),
        VmKind::Vm => Err(Error::problem(
            ErrorCode::VmNotFound,
            format!("{id} is a template now, not a VM: see /v1/templates/{id}"),
        )),
        VmKind::Template => Err(Error::problem(
            ErrorCode::TemplateNotFound,
            format!("{id} is a VM now, not a template: see /v1/vms/{id}"),
        )),
    }
}

/// Whether a job of `spec` would be accepted now, and planned, without writing
/// anything (a retention preview shows which prunes would be held, and why).
pub async fn check(engine: &Engine, mut spec: JobSpec) -> Result<()> {
    let mut conn = engine.db.read_tx().await?;
    let checked = async {
        run::admit(&mut spec, &mut conn).await?;
        run::plan_in(engine, &mut conn, &spec, None).await?;
        Ok(())
    }
    .await;
    conn.finish().await;
    checked
}
