//! The typed client: answers read as strata's own view types (`VmView`,
//! `SnapshotView`, `JobView`...), a refusal as a [`Problem`], and the calls the tests
//! repeat (create a VM and wait for it, take a snapshot, run a job to its end...). A
//! view that no longer matches what the service sends fails the call that reads it.

use std::fmt::Display;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::views::{
    DiskViewExt, JobStatus, JobView, SnapshotView, SnapshotViewExt, TemplateView, Uuid, VmView,
    VmViewExt,
};
use super::{Reply, TestApp, assert_problem, send, send_json};

/// An RFC 9457 problem answer, with the members some codes add. Read from the wire
/// rather than as `strata::api::problem::Problem`, which only serialises and keeps
/// those members as untyped JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: String,
    /// `has_dependents`: the linked clones that read the files.
    pub dependent_vms: Option<Vec<DependentVm>>,
    /// `vm_busy`, `snapshot_busy`: the jobs in the way.
    pub job_ids: Option<Vec<Uuid>>,
    /// `insufficient_storage`.
    pub needed_bytes: Option<u64>,
    pub available_bytes: Option<u64>,
    /// `disk_shrink_refused`.
    pub current_size_bytes: Option<u64>,
    /// `schedule_busy`: the run still in progress.
    pub run_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DependentVm {
    pub id: Uuid,
    pub name: String,
}

/// Read a JSON answer as `T`; a mismatch fails with the answer.
fn read<T: DeserializeOwned>(what: &str, value: Value) -> T {
    match serde_json::from_value(value.clone()) {
        Ok(read) => read,
        Err(e) => panic!(
            "{what}: not a {} ({e}): {value}",
            std::any::type_name::<T>()
        ),
    }
}

impl Reply {
    /// The body read as `T` (a job, a view or a problem).
    pub fn read<T: DeserializeOwned>(&self) -> T {
        read(&format!("a {} answer", self.status), self.body.clone())
    }
}

impl TestApp {
    /// A request whose success (any 2xx) is read as `T`, and whose refusal as a problem.
    pub async fn try_call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, Problem> {
        let what = format!("{method} {path}");
        let (status, value) = self.request(method, path, body).await;
        if status.is_success() {
            return Ok(read(&what, value));
        }
        let problem: Problem = read(&format!("{what} ({status})"), value);
        assert_eq!(problem.status, status.as_u16(), "{what}: {problem:?}");
        Err(problem)
    }

    /// A request that must succeed, its answer read as `T`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> T {
        let what = format!("{method} {path}");
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|problem| panic!("{what} refused: {problem:?}"))
    }

    /// `GET path`, which must succeed, read as `T`.
    pub async fn get_as<T: DeserializeOwned>(&self, path: &str) -> T {
        self.call(Method::GET, path, None).await
    }

    /// A request that must be refused with `status` and `code`: the problem, after
    /// `assert_problem`'s checks of the whole answer (content type, type URI...).
    pub async fn expect_problem(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        status: StatusCode,
        code: &str,
    ) -> Problem {
        let what = format!("{method} {path}");
        let reply: Reply = match &body {
            Some(body) => send_json(self, method, path, body).await,
            None => send(self, method, path, None, None).await,
        };
        assert_problem(&reply, status, code);
        read(&what, reply.body)
    }

    /// A request that queues a job: 202 with the job.
    pub async fn accept(&self, method: Method, path: &str, body: Option<Value>) -> JobView {
        let what = format!("{method} {path}");
        let (status, job) = self.request(method, path, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{what}: {job}");
        read(&what, job)
    }

    /// A request that queues a job, which must then succeed; the ended job.
    pub async fn run_job(&self, method: Method, path: &str, body: Option<Value>) -> JobView {
        self.expect_job(self.request(method, path, body).await)
            .await
    }

    /// Expect a 202 with a job, wait for it and require success.
    pub async fn expect_job(&self, (status, job): (StatusCode, Value)) -> JobView {
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let job: JobView = read("a 202 answer", job);
        let job = self.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        job
    }

    pub async fn job(&self, id: impl Display) -> JobView {
        self.get_as(&format!("/v1/jobs/{id}")).await
    }

    /// Long-poll a job until it ends (succeeded, failed or cancelled) and return it.
    pub async fn wait_job(&self, id: impl Display) -> JobView {
        for _ in 0..20 {
            let job: JobView = self.get_as(&format!("/v1/jobs/{id}?wait=30")).await;
            if job.status.is_terminal() {
                return job;
            }
        }
        panic!("job {id} did not end");
    }

    /// Create a VM with `disks` (name, size) and wait until it is ready.
    pub async fn create_vm(&self, name: &str, disks: &[(&str, u64)]) -> VmView {
        let disks: Vec<Value> = disks
            .iter()
            .map(|(n, s)| json!({"name": n, "size_bytes": s}))
            .collect();
        let body = json!({"name": name, "disks": disks});
        let job = self.run_job(Method::POST, "/v1/vms", Some(body)).await;
        self.vm(job.target.id).await
    }

    pub async fn vm(&self, id: impl Display) -> VmView {
        self.get_as(&format!("/v1/vms/{id}")).await
    }

    /// Delete a VM (its disks, snapshots and files) and wait for the job.
    pub async fn delete_vm(&self, id: impl Display) -> JobView {
        self.run_job(Method::DELETE, &format!("/v1/vms/{id}"), None)
            .await
    }

    /// Take a snapshot, wait for the job and return the snapshot.
    pub async fn snapshot(&self, vm: impl Display, name: &str) -> SnapshotView {
        let path = format!("/v1/vms/{vm}/snapshots");
        let job = self
            .run_job(Method::POST, &path, Some(json!({"name": name})))
            .await;
        self.get_snapshot(job.target.id).await
    }

    pub async fn get_snapshot(&self, id: impl Display) -> SnapshotView {
        self.get_as(&format!("/v1/snapshots/{id}")).await
    }

    pub async fn revert(&self, snapshot: impl Display) -> JobView {
        let path = format!("/v1/snapshots/{snapshot}/revert");
        self.run_job(Method::POST, &path, Some(json!({}))).await
    }

    /// Grow a disk and wait for the job.
    pub async fn resize(&self, vm: impl Display, disk: impl Display, size_bytes: u64) -> JobView {
        let path = format!("/v1/vms/{vm}/disks/{disk}/resize");
        let body = json!({ "size_bytes": size_bytes });
        self.run_job(Method::POST, &path, Some(body)).await
    }

    /// Delete a snapshot and return the finished job (with its merge detail).
    pub async fn delete_snapshot(&self, snapshot: impl Display) -> JobView {
        self.run_job(Method::DELETE, &format!("/v1/snapshots/{snapshot}"), None)
            .await
    }

    pub async fn template(&self, id: impl Display) -> TemplateView {
        self.get_as(&format!("/v1/templates/{id}")).await
    }

    /// Active path of the VM's disk named `disk`.
    pub async fn active_path(&self, vm: impl Display, disk: &str) -> String {
        self.vm(vm).await.disk(disk).path().to_owned()
    }

    /// Path of the layer a snapshot froze for `disk` (its chain is the snapshot's content).
    pub async fn snapshot_path(
        &self,
        vm: impl Display,
        snapshot: impl Display,
        disk: &str,
    ) -> String {
        let disk = self.vm(vm).await.disk(disk).id;
        let snapshot = self.get_snapshot(snapshot).await;
        snapshot.volume_of(disk).path.clone()
    }
}
