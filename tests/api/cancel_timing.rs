//! Cancel timing: for every job kind that HTTP can start, cancel the job at a sweep of
//! delays after its 202 and check what it left. A job must end either `succeeded`,
//! with the change made whole, or `cancelled`, with nothing changed: the same records
//! (snapshots, chains down to the volume ids, sizes, statuses), the same files in the
//! volume directory and the same guest bytes in every present state, snapshot and
//! template. A cancel accepted with 202 must be followed by `cancelled` (a job whose
//! last step ends after the cancel rolls it back), one refused with
//! `409 job_not_cancellable` by success. After every round the files of the VMs involved are checked against the
//! records (chains, `qemu-img check`), and after every kind's sweep the whole data
//! directory is (no orphan, nothing missing).
//!
//! To spread the sweep over the steps of a job with small images, the service runs
//! qemu-img through a wrapper that sleeps before each call
//! (`STRATA_CANCEL_QEMU_DELAY_MS`, default 40; 0 runs qemu-img directly). The delays
//! come from `STRATA_CANCEL_DELAYS` (comma-separated milliseconds, default
//! 0,5,20,60,150).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::stress::{
    Api, Contract, Journal, World, clip, copy_image, difference, env_u64, file_chain, file_name,
    report, same_content, text, volume_files,
};
use crate::support::*;

fn delays() -> Vec<u64> {
    match std::env::var("STRATA_CANCEL_DELAYS") {
        Ok(list) => list
            .split(',')
            .map(|d| {
                d.trim()
                    .parse()
                    .expect("STRATA_CANCEL_DELAYS: milliseconds")
            })
            .collect(),
        Err(_) => vec![0, 5, 20, 60, 150],
    }
}

/// How a job ended, as far as the checks go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Cancelled,
    Succeeded,
    /// Already reported as wrong; nothing more to compare.
    Broken,
}

/// What the records, files and bytes were before a request.
struct Capture {
    world: World,
    files: BTreeSet<String>,
    /// image key (see `images`) -> standalone copy of its bytes.
    copies: BTreeMap<String, String>,
    involved: BTreeSet<String>,
}

/// What they are after it.
struct After {
    world: World,
    files: BTreeSet<String>,
}

/// The images a VM or template shows, by key: `present:{vm}:{disk}`,
/// `snap:{snapshot}:{disk}` and `tpl:{template}:{disk}` (disk names).
fn images(world: &World, id: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(vm) = world.vm(id) {
        for disk in vm["disks"].as_array().into_iter().flatten() {
            if let Some(path) = disk["active_path"].as_str() {
                out.insert(
                    format!("present:{id}:{}", text(&disk["name"])),
                    path.to_owned(),
                );
            }
        }
        for snapshot in world.snapshots_of(id) {
            for (disk, path) in world.snapshot_images(snapshot) {
                out.insert(format!("snap:{}:{disk}", text(&snapshot["id"])), path);
            }
        }
    }
    if let Some(template) = world.template(id) {
        for disk in template["disks"].as_array().into_iter().flatten() {
            if let Some(path) = disk["path"].as_str() {
                out.insert(format!("tpl:{id}:{}", text(&disk["name"])), path.to_owned());
            }
        }
    }
    out
}

/// What a cancelled job must leave exactly as it was (allocation figures and
/// timestamps aside).
fn shape(world: &World, id: &str, with_dependents: bool) -> Value {
    if let Some(vm) = world.vm(id) {
        let disks: Vec<Value> = vm["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let chain: Vec<Value> = d["chain"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| json!([e["volume_id"], e["role"], e["status"], e["snapshot_id"], e["size_bytes"]]))
                    .collect();
                json!({"id": d["id"], "name": d["name"], "size_bytes": d["size_bytes"], "status": d["status"],
                    "source_volume_id": d["source_volume_id"], "chain": chain})
            })
            .collect();
        let snapshots: Vec<Value> = world
            .snapshots_of(id)
            .iter()
            .map(|s| {
                let volumes: Vec<Value> = s["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| json!({"disk_id": v["disk_id"], "volume_id": v["volume_id"], "path": v["path"]}))
                    .collect();
                json!({"id": s["id"], "name": s["name"], "parent_id": s["parent_id"], "status": s["status"],
                    "volumes": volumes})
            })
            .collect();
        let mut view = json!({"vm": {"name": vm["name"], "status": vm["status"], "state": vm["state"],
            "current_snapshot_id": vm["current_snapshot_id"], "source_vm_id": vm["source_vm_id"],
            "template_id": vm["template_id"], "disks": disks}, "snapshots": snapshots});
        if with_dependents {
            view["vm"]["dependent_vm_ids"] = vm["dependent_vm_ids"].clone();
        }
        view
    } else if let Some(template) = world.template(id) {
        let disks: Vec<Value> = template["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| json!([d["id"], d["name"], d["size_bytes"], d["path"]]))
            .collect();
        let mut view = json!({"template": {"name": template["name"], "status": template["status"], "disks": disks}});
        if with_dependents {
            view["template"]["linked_vm_ids"] = template["linked_vm_ids"].clone();
        }
        view
    } else {
        Value::Null
    }
}

fn disks(world: &World, vm: &str) -> Vec<Value> {
    world
        .vm(vm)
        .and_then(|v| v["disks"].as_array().cloned())
        .unwrap_or_default()
}

fn disk_named(world: &World, vm: &str, name: &str) -> Option<Value> {
    disks(world, vm).into_iter().find(|d| d["name"] == name)
}

fn chain_ids(disk: &Value) -> Vec<String> {
    disk["chain"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| text(&e["volume_id"]))
        .collect()
}

/// The ids a job creates: its target and, for clones and deploys, `detail.vm_ids`.
fn made_by(job: &Value) -> BTreeSet<String> {
    let mut ids: BTreeSet<String> = job["detail"]["vm_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    ids.insert(text(&job["target"]["id"]));
    ids
}

/// The file names of a VM's or template's chains and snapshot layers.
fn files_of(world: &World, id: &str) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    for disk in disks(world, id) {
        files.extend(chain_ids(&disk).into_iter().map(|v| format!("{v}.qcow2")));
    }
    for path in images(world, id).values() {
        files.insert(file_name(path));
    }
    files
}

fn virtual_size(path: &str) -> Result<u64, String> {
    let output = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2", path])
        .output()
        .map_err(|e| e.to_string())?;
    let info: Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("qemu-img info {path}: {e}"))?;
    info["virtual-size"]
        .as_u64()
        .ok_or_else(|| format!("qemu-img info {path}: no virtual-size"))
}

fn reads_zero(path: &str, size_bytes: u64) -> Result<(), String> {
    let command = format!("read -P 0 0 {size_bytes}");
    let output = Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", &command, path])
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && !stdout.contains("failed") {
        Ok(())
    } else {
        Err(format!(
            "{path} does not read zeros: {}",
            clip(&stdout, 300)
        ))
    }
}

struct Lab {
    app: TestApp,
    api: Api,
    scratch: tempfile::TempDir,
    copies: usize,
    problems: Vec<String>,
    /// (kind, delay, outcome) of every attempt.
    table: Vec<(String, u64, String)>,
}

impl Lab {
    async fn start() -> Self {
        let scratch = tempfile::tempdir().expect("scratch dir");
        let pause = env_u64("STRATA_CANCEL_QEMU_DELAY_MS", 40);
        let app = if pause > 0 {
            let wrapper = scratch.path().join("qemu-img");
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\n# Widens every step so cancels land inside jobs.\nsleep {}.{:03}\nexec qemu-img \"$@\"\n",
                    pause / 1000,
                    pause % 1000
                ),
            )
            .expect("write wrapper");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
                .expect("chmod wrapper");
            TestApp::spawn_with(&[("STRATA_QEMU_IMG", wrapper.to_str().unwrap())]).await
        } else {
            TestApp::spawn().await
        };
        app.wait_ready().await;
        let contract = Arc::new(Contract::load(&app).await);
        let api = Api::new(&app, contract, Journal::new());
        Self {
            app,
            api,
            scratch,
            copies: 0,
            problems: Vec::new(),
            table: Vec::new(),
        }
    }

    fn fail(&mut self, label: &str, text: String) {
        self.problems.push(format!("{label}: {text}"));
    }

    /// A stopped VM whose disks went through `layers` (disk index, pattern, offset
    /// MiB, length MiB), with a snapshot between consecutive layers. Its id and the
    /// snapshots.
    async fn vm_with(
        &self,
        name: &str,
        disk_sizes: &[(&str, u64)],
        layers: &[&[(usize, u8, u64, u64)]],
    ) -> (String, Vec<String>) {
        let sizes: Vec<(&str, u64)> = disk_sizes.iter().map(|(n, s)| (*n, s * MIB)).collect();
        let vm = self.app.create_vm(name, &sizes).await.id.to_string();
        let mut snapshots = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            for &(disk, pattern, offset, len) in layer.iter() {
                write(
                    &self.app.active_path(&vm, disk_sizes[disk].0).await,
                    pattern,
                    offset,
                    len,
                );
            }
            if i + 1 < layers.len() {
                snapshots.push(
                    self.app
                        .snapshot(&vm, &format!("h{i}"))
                        .await
                        .id
                        .to_string(),
                );
            }
        }
        (vm, snapshots)
    }

    async fn world(&self, involved: &BTreeSet<String>) -> World {
        World::load_for(&self.api, &self.app.data_dir, Some(involved))
            .await
            .expect("load the records")
    }

    /// Records, files and copies of every image of the involved VMs and templates.
    async fn capture(&mut self, involved: &[&str]) -> Capture {
        let involved: BTreeSet<String> = involved.iter().map(|s| (*s).to_owned()).collect();
        let world = self.world(&involved).await;
        let files = volume_files(&world.volumes_dir);
        let mut copies = BTreeMap::new();
        for id in &involved {
            for (key, path) in images(&world, id) {
                self.copies += 1;
                let copy = self
                    .scratch
                    .path()
                    .join(format!("copy-{}.qcow2", self.copies));
                copy_image(&path, &copy).expect("copy an image");
                copies.insert(key, copy.display().to_string());
            }
        }
        Capture {
            world,
            files,
            copies,
            involved,
        }
    }

    async fn after(&self, involved: &BTreeSet<String>) -> After {
        let world = self.world(involved).await;
        let files = volume_files(&world.volumes_dir);
        After { world, files }
    }

    /// Send the request, cancel its job `delay` ms after the 202, wait for the end.
    async fn attempt(
        &mut self,
        kind: &str,
        delay: u64,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<(Value, End)> {
        let label = format!("{kind} cancelled {delay} ms after the 202");
        let accepted = self.api.call(method, path, body).await;
        let Some(job) = accepted.job_id() else {
            self.fail(&label, format!("the request was not accepted: {accepted}"));
            return None;
        };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let cancel = self.api.post_empty(&format!("/v1/jobs/{job}/cancel")).await;
        let end = match self.api.wait_job(&job).await {
            Ok(end) => end,
            Err(e) => {
                self.fail(&label, e);
                return None;
            }
        };
        let ended = text(&end["status"]);
        let at_once = cancel.body["status"] == "cancelled";
        let (outcome, result) = match (cancel.status, cancel.code(), ended.as_str()) {
            (202, _, "cancelled") if at_once => ("cancelled while queued", End::Cancelled),
            (202, _, "cancelled") => ("cancelled while running", End::Cancelled),
            (409, "job_not_cancellable", "succeeded") => {
                ("succeeded after 409 job_not_cancellable", End::Succeeded)
            }
            _ => {
                self.fail(
                    &label,
                    format!(
                        "the job must end cancelled after a 202, or succeeded after a 409 when the cancel came too late; got:\n    {accepted}\n    cancel: {cancel}\n    job at the end: {}",
                        clip(&end.to_string(), 900)
                    ),
                );
                ("WRONG", End::Broken)
            }
        };
        self.table
            .push((kind.to_owned(), delay, outcome.to_owned()));
        Some((end, result))
    }

    /// A cancelled job changed nothing: records, files, bytes; and made nothing.
    fn unchanged(&mut self, label: &str, before: &Capture, after: &After, job: &Value) {
        for id in &before.involved {
            let (was, is) = (
                shape(&before.world, id, true),
                shape(&after.world, id, true),
            );
            if was != is {
                self.fail(
                    label,
                    format!(
                        "cancelled, yet the records of {id} changed:\n      before {was}\n      after  {is}"
                    ),
                );
            }
            self.same_images(label, before, &after.world, id, &BTreeSet::new());
        }
        for id in made_by(job) {
            if before.involved.contains(&id) {
                continue;
            }
            if after.world.vm(&id).is_some() || after.world.template(&id).is_some() {
                self.fail(
                    label,
                    format!("cancelled, yet {id}, which the job was to make, exists"),
                );
            }
        }
        if job["kind"] == "snapshot_create" {
            let snapshot = text(&job["target"]["id"]);
            if after.world.snapshot(&snapshot).is_some() {
                self.fail(label, format!("cancelled, yet snapshot {snapshot} exists"));
            }
        }
        let ids = |w: &World| -> BTreeSet<String> {
            w.vms
                .iter()
                .chain(&w.templates)
                .map(|v| text(&v["id"]))
                .collect()
        };
        if ids(&before.world) != ids(&after.world) {
            self.fail(
                label,
                "cancelled, yet the set of VMs and templates changed".into(),
            );
        }
        if before.files != after.files {
            let added: Vec<&String> = after.files.difference(&before.files).collect();
            let removed: Vec<&String> = before.files.difference(&after.files).collect();
            self.fail(
                label,
                format!("cancelled, yet the volume directory changed: added {added:?}, removed {removed:?}"),
            );
        }
    }

    /// Every image `id` showed before (but the keys in `skip`) still shows the same
    /// bytes.
    fn same_images(
        &mut self,
        label: &str,
        before: &Capture,
        after: &World,
        id: &str,
        skip: &BTreeSet<String>,
    ) {
        let now = images(after, id);
        for key in images(&before.world, id).keys() {
            if skip.contains(key) {
                continue;
            }
            let copy = &before.copies[key];
            self.expect_bytes(label, now.get(key).cloned(), copy, key);
        }
    }

    /// `path` (an image now) shows the bytes of `copy`.
    fn expect_bytes(&mut self, label: &str, path: Option<String>, copy: &str, what: &str) {
        let Some(path) = path else {
            self.fail(label, format!("{what} is gone"));
            return;
        };
        match same_content(&path, copy) {
            Ok(true) => {}
            Ok(false) => self.fail(
                label,
                format!(
                    "{what} ({}) changed its bytes: {}",
                    file_name(&path),
                    difference(&path, copy)
                ),
            ),
            Err(e) => self.fail(label, format!("{what}: {e}")),
        }
    }

    /// Files against records for the VMs and templates involved, and the directory
    /// change against the records: every new file referenced, no removed one still
    /// referenced.
    fn files_agree(
        &mut self,
        label: &str,
        before: &Capture,
        after: &After,
        made: &BTreeSet<String>,
    ) {
        let mut involved = before.involved.clone();
        involved.extend(made.iter().cloned());
        let report = after.world.file_report(Some(&involved));
        for problem in report.problems {
            self.fail(label, format!("files: {problem}"));
        }
        let refs = after.world.referenced();
        for added in after.files.difference(&before.files) {
            if !refs.contains_key(added) {
                self.fail(
                    label,
                    format!("files: new file {added} is referenced by no record"),
                );
            }
        }
        for removed in before.files.difference(&after.files) {
            if let Some(who) = refs.get(removed) {
                self.fail(
                    label,
                    format!("files: {removed} was removed but {who} references it"),
                );
            }
        }
        for problem in after.world.status_problems() {
            self.fail(label, format!("record: {problem}"));
        }
    }

    /// The whole directory against every record, after a kind's sweep.
    async fn global_check(&mut self, kind: &str) {
        let label = format!("{kind} (after its sweep)");
        if let Err(e) = self.api.wait_quiet(Duration::from_secs(60)).await {
            self.fail(&label, e);
        }
        match World::load(&self.api, &self.app.data_dir).await {
            Ok(world) => {
                let report = world.file_report(None);
                for problem in report.problems {
                    self.fail(&label, format!("files: {problem}"));
                }
                for note in report.notes {
                    println!("note: {label}: {note}");
                }
                for problem in world.status_problems() {
                    self.fail(&label, format!("record: {problem}"));
                }
            }
            Err(e) => self.fail(&label, e),
        }
    }

    /// One round: capture, request and cancel, then the generic checks; the
    /// kind-specific success check gets the job.
    async fn round(
        &mut self,
        kind: &str,
        delay: u64,
        involved: &[&str],
        request: (Method, String, Option<Value>),
    ) -> Option<(Capture, After, Value)> {
        let before = self.capture(involved).await;
        let (method, path, body) = request;
        let (job, end) = self.attempt(kind, delay, method, &path, body).await?;
        let made = made_by(&job);
        let mut everything = before.involved.clone();
        everything.extend(made.iter().cloned());
        let after = self.after(&everything).await;
        let label = format!(
            "{kind} cancelled {delay} ms after the 202 ({})",
            text(&job["status"])
        );
        match end {
            End::Cancelled => self.unchanged(&label, &before, &after, &job),
            End::Succeeded => {}
            End::Broken => return None,
        }
        self.files_agree(&label, &before, &after, &made);
        (end == End::Succeeded).then_some((before, after, job))
    }

    fn label(kind: &str, delay: u64) -> String {
        format!("{kind} cancelled {delay} ms after the 202 (succeeded)")
    }

    // ------------------------------------------------------------------------------
    // Snapshot jobs.

    async fn snapshot_create(&mut self) {
        let kind = "snapshot_create";
        let (vm, _) = self
            .vm_with(
                "sc",
                &[("root", 32), ("data", 16)],
                &[&[(0, 0x11, 0, 4), (1, 0x12, 0, 2)]],
            )
            .await;
        for delay in delays() {
            let request = (
                Method::POST,
                format!("/v1/vms/{vm}/snapshots"),
                Some(json!({"name": format!("c{delay}")})),
            );
            let Some((before, after, job)) = self.round(kind, delay, &[&vm], request).await else {
                continue;
            };
            let label = Self::label(kind, delay);
            let snapshot = text(&job["target"]["id"]);
            if after
                .world
                .vm(&vm)
                .map(|v| v["current_snapshot_id"].clone())
                != Some(json!(snapshot))
            {
                self.fail(
                    &label,
                    format!("the new snapshot {snapshot} is not the current one"),
                );
            }
            for disk in disks(&before.world, &vm) {
                let name = text(&disk["name"]);
                let was = chain_ids(&disk);
                let is = disk_named(&after.world, &vm, &name)
                    .map(|d| chain_ids(&d))
                    .unwrap_or_default();
                if is.len() != was.len() + 1 || is[1..] != was[..] {
                    self.fail(&label, format!("disk {name}: the chain did not gain one layer on top: {was:?} -> {is:?}"));
                }
                let frozen = after
                    .world
                    .snapshot(&snapshot)
                    .map(|s| world_snapshot_path(&after.world, s, &name));
                let copy = before.copies[&format!("present:{vm}:{name}")].clone();
                self.expect_bytes(
                    &label,
                    frozen.flatten(),
                    &copy,
                    &format!("the new snapshot's layer of {name}"),
                );
            }
            self.same_images(&label, &before, &after.world, &vm, &BTreeSet::new());
        }
        self.global_check(kind).await;
    }

    /// Delete the snapshot `snapshot` of `vm`; on success it is gone, each disk's
    /// chain lost one layer (`shrinks`), the planner chose `action` and every other
    /// image reads as before.
    async fn delete_round(
        &mut self,
        kind: &str,
        delay: u64,
        vm: &str,
        snapshot: &str,
        action: &str,
        shrinks: bool,
    ) -> End {
        let request = (Method::DELETE, format!("/v1/snapshots/{snapshot}"), None);
        let Some((before, after, job)) = self.round(kind, delay, &[vm], request).await else {
            // Cancelled (or already reported): a snapshot still there can be tried again.
            let exists = self
                .api
                .get(&format!("/v1/snapshots/{snapshot}"))
                .await
                .status
                == 200;
            return if exists { End::Cancelled } else { End::Broken };
        };
        let label = Self::label(kind, delay);
        if after.world.snapshot(snapshot).is_some() {
            self.fail(&label, format!("snapshot {snapshot} still exists"));
        }
        for merge in job["detail"]["merges"].as_array().into_iter().flatten() {
            if merge["action"] != action {
                self.fail(
                    &label,
                    format!(
                        "the planner chose {} where the documented rule gives {action}: {merge}",
                        merge["action"]
                    ),
                );
            }
        }
        if shrinks {
            for disk in disks(&before.world, vm) {
                let name = text(&disk["name"]);
                let was = chain_ids(&disk).len();
                let is = disk_named(&after.world, vm, &name)
                    .map(|d| chain_ids(&d).len())
                    .unwrap_or(0);
                if is + 1 != was {
                    self.fail(
                        &label,
                        format!(
                            "disk {name}: the chain went from {was} to {is} layers, not one fewer"
                        ),
                    );
                }
            }
        }
        let skip: BTreeSet<String> = before
            .copies
            .keys()
            .filter(|k| k.starts_with(&format!("snap:{snapshot}:")))
            .cloned()
            .collect();
        self.same_images(&label, &before, &after.world, vm, &skip);
        End::Succeeded
    }

    async fn snapshot_delete_commit(&mut self) {
        let kind = "snapshot_delete (commit)";
        // An 8 MiB layer under a 3 MiB present: the present is committed down.
        let (vm, snapshots) = self
            .vm_with(
                "commit",
                &[("root", 64)],
                &[&[(0, 0x21, 0, 8)], &[(0, 0x22, 8, 3)]],
            )
            .await;
        let mut target = Some(snapshots[0].clone());
        for (round, delay) in delays().into_iter().enumerate() {
            let snapshot = match target.take() {
                Some(snapshot) => snapshot,
                None => {
                    // The last one went: a new layer under a smaller present again.
                    let snapshot = self
                        .app
                        .snapshot(&vm, &format!("t{round}"))
                        .await
                        .id
                        .to_string();
                    write(
                        &self.app.active_path(&vm, "root").await,
                        0x23 + round as u8,
                        11 + 3 * round as u64,
                        3,
                    );
                    snapshot
                }
            };
            if self
                .delete_round(kind, delay, &vm, &snapshot, "commit", true)
                .await
                == End::Cancelled
            {
                target = Some(snapshot);
            }
        }
        self.global_check(kind).await;
    }

    async fn snapshot_delete_stream(&mut self) {
        let kind = "snapshot_delete (stream)";
        for delay in delays() {
            // A 2 MiB layer under a 12 MiB present: the layer is streamed up.
            let (vm, snapshots) = self
                .vm_with(
                    &format!("stream-{delay}"),
                    &[("root", 48)],
                    &[&[(0, 0x31, 0, 2)], &[(0, 0x32, 4, 12)]],
                )
                .await;
            self.delete_round(kind, delay, &vm, &snapshots[0], "stream", true)
                .await;
        }
        self.global_check(kind).await;
    }

    async fn snapshot_delete_branch_point(&mut self) {
        let kind = "snapshot_delete (branch point)";
        for delay in delays() {
            let (vm, snapshots) = self
                .vm_with(
                    &format!("branch-{delay}"),
                    &[("root", 32)],
                    &[&[(0, 0x41, 0, 4)], &[(0, 0x42, 4, 4)], &[]],
                )
                .await;
            // h0 gets a second child: the present after a revert.
            self.app.revert(&snapshots[0]).await;
            write(&self.app.active_path(&vm, "root").await, 0x43, 8, 4);
            self.delete_round(kind, delay, &vm, &snapshots[0], "stream", true)
                .await;
        }
        self.global_check(kind).await;
    }

    async fn snapshot_delete_all(&mut self) {
        let kind = "snapshot_delete_all";
        let (vm, _) = self
            .vm_with("collapse", &[("root", 64)], &[&[(0, 0x51, 0, 4)]])
            .await;
        for (round, delay) in delays().into_iter().enumerate() {
            let round = round as u64;
            self.app.snapshot(&vm, &format!("a{round}")).await;
            write(
                &self.app.active_path(&vm, "root").await,
                0x52,
                4 + 2 * round,
                1,
            );
            self.app.snapshot(&vm, &format!("b{round}")).await;
            write(
                &self.app.active_path(&vm, "root").await,
                0x53,
                5 + 2 * round,
                1,
            );
            let request = (Method::DELETE, format!("/v1/vms/{vm}/snapshots"), None);
            let Some((before, after, _)) = self.round(kind, delay, &[&vm], request).await else {
                continue;
            };
            let label = Self::label(kind, delay);
            if !after.world.snapshots_of(&vm).is_empty() {
                self.fail(
                    &label,
                    format!("snapshots are left: {:?}", after.world.snapshots_of(&vm)),
                );
            }
            for disk in disks(&after.world, &vm) {
                if chain_ids(&disk).len() != 1 {
                    self.fail(
                        &label,
                        format!(
                            "disk {} was not collapsed into one file: {:?}",
                            disk["name"],
                            chain_ids(&disk)
                        ),
                    );
                }
            }
            let copy = before.copies[&format!("present:{vm}:root")].clone();
            self.expect_bytes(
                &label,
                after.world.active_path(&vm, "root"),
                &copy,
                "the present state",
            );
        }
        self.global_check(kind).await;
    }

    async fn snapshot_revert(&mut self) {
        let kind = "snapshot_revert";
        let (vm, snapshots) = self
            .vm_with(
                "revert",
                &[("root", 32), ("data", 16)],
                &[&[(0, 0x61, 0, 4), (1, 0x62, 0, 2)], &[(0, 0x63, 4, 2)]],
            )
            .await;
        let target = snapshots[0].clone();
        let mut reverted = false;
        for (round, delay) in delays().into_iter().enumerate() {
            if reverted {
                // Make the present differ from the snapshot again.
                write(
                    &self.app.active_path(&vm, "root").await,
                    0x64 + round as u8,
                    4,
                    2,
                );
            }
            let request = (Method::POST, format!("/v1/snapshots/{target}/revert"), None);
            let Some((before, after, _)) = self.round(kind, delay, &[&vm], request).await else {
                reverted = false;
                continue;
            };
            reverted = true;
            let label = Self::label(kind, delay);
            if after
                .world
                .vm(&vm)
                .map(|v| v["current_snapshot_id"].clone())
                != Some(json!(target))
            {
                self.fail(&label, format!("the current snapshot is not {target}"));
            }
            let frozen = before
                .world
                .snapshot(&target)
                .map(|s| before.world.snapshot_images(s))
                .unwrap_or_default();
            for (disk, path) in frozen {
                let now = disk_named(&after.world, &vm, &disk);
                let chain = now.as_ref().map(chain_ids).unwrap_or_default();
                if chain.get(1).map(|v| format!("{v}.qcow2")) != Some(file_name(&path)) {
                    self.fail(&label, format!("disk {disk}: the new present does not sit on the snapshot's layer {}: {chain:?}", file_name(&path)));
                }
                let copy = before.copies[&format!("snap:{target}:{disk}")].clone();
                self.expect_bytes(
                    &label,
                    after.world.active_path(&vm, &disk),
                    &copy,
                    &format!("the present of {disk} (must read as the snapshot)"),
                );
            }
            let skip: BTreeSet<String> = before
                .copies
                .keys()
                .filter(|k| k.starts_with("present:"))
                .cloned()
                .collect();
            self.same_images(&label, &before, &after.world, &vm, &skip);
        }
        self.global_check(kind).await;
    }

    // ------------------------------------------------------------------------------
    // Disk jobs.

    /// A VM with one disk that has a snapshot and a present layer.
    async fn disks_vm(&self, name: &str) -> String {
        self.vm_with(
            name,
            &[("root", 16)],
            &[&[(0, 0x81, 0, 2)], &[(0, 0x82, 2, 2)]],
        )
        .await
        .0
    }

    async fn disk_create(&mut self) {
        let kind = "disk_create";
        let vm = &self.disks_vm("dcreate").await;
        for delay in delays() {
            let name = format!("n{delay}");
            let size = 8 * MIB;
            let request = (
                Method::POST,
                format!("/v1/vms/{vm}/disks"),
                Some(json!({"name": name, "size_bytes": size})),
            );
            let Some((before, after, job)) = self.round(kind, delay, &[vm], request).await else {
                continue;
            };
            let label = Self::label(kind, delay);
            match disk_named(&after.world, vm, &name) {
                None => self.fail(&label, format!("disk {name} is missing")),
                Some(disk) => {
                    if disk["id"] != job["target"]["id"]
                        || disk["size_bytes"] != size
                        || chain_ids(&disk).len() != 1
                    {
                        self.fail(
                            &label,
                            format!("disk {name} is not one new {size}-byte layer: {disk}"),
                        );
                    }
                    if let Err(e) = reads_zero(&text(&disk["active_path"]), size) {
                        self.fail(&label, e);
                    }
                }
            }
            self.same_images(&label, &before, &after.world, vm, &BTreeSet::new());
            if shape(&before.world, vm, true)["snapshots"]
                != shape(&after.world, vm, true)["snapshots"]
            {
                self.fail(&label, "the snapshots changed".into());
            }
        }
        self.global_check(kind).await;
    }

    async fn disk_resize(&mut self) {
        let kind = "disk_resize";
        let vm = &self.disks_vm("dresize").await;
        for delay in delays() {
            let disk =
                disk_named(&self.world(&BTreeSet::new()).await, vm, "root").expect("root disk");
            let old = disk["size_bytes"].as_u64().unwrap();
            let new = old + MIB;
            let path = format!("/v1/vms/{vm}/disks/{}/resize", text(&disk["id"]));
            let before_path = text(&disk["active_path"]);
            let request = (Method::POST, path, Some(json!({"size_bytes": new})));
            let outcome = self.round(kind, delay, &[vm], request).await;
            let Some((before, after, _)) = outcome else {
                // Cancelled (or wrong, already reported): the file kept its size too.
                if let Ok(size) = virtual_size(&before_path)
                    && size != old
                {
                    self.fail(
                        &format!("{kind} cancelled {delay} ms after the 202"),
                        format!("the file is {size} bytes, the API still says {old}"),
                    );
                }
                continue;
            };
            let label = Self::label(kind, delay);
            let now = disk_named(&after.world, vm, "root").expect("root disk");
            if now["size_bytes"] != new {
                self.fail(
                    &label,
                    format!("the API size is {} not {new}", now["size_bytes"]),
                );
            }
            match virtual_size(&text(&now["active_path"])) {
                Ok(size) if size == new => {}
                Ok(size) => self.fail(
                    &label,
                    format!("the file is {size} bytes, the API says {new}"),
                ),
                Err(e) => self.fail(&label, e),
            }
            if chain_ids(&now) != chain_ids(&disk) {
                self.fail(
                    &label,
                    format!(
                        "the chain changed: {:?} -> {:?}",
                        chain_ids(&disk),
                        chain_ids(&now)
                    ),
                );
            }
            self.same_images(&label, &before, &after.world, vm, &BTreeSet::new());
        }
        self.global_check(kind).await;
    }

    async fn disk_delete(&mut self) {
        let kind = "disk_delete";
        for delay in delays() {
            let vm = &self.disks_vm(&format!("ddelete-{delay}")).await;
            let name = format!("x{delay}");
            let job = self
                .app
                .expect_job(
                    self.app
                        .post(
                            &format!("/v1/vms/{vm}/disks"),
                            json!({"name": name, "size_bytes": 8 * MIB}),
                        )
                        .await,
                )
                .await;
            let disk_id = job.target.id.to_string();
            write(&self.app.active_path(vm, &name).await, 0x83, 0, 1);
            // The disk gets a layer in a snapshot too.
            self.app.snapshot(vm, &format!("with-{name}")).await;
            let request = (
                Method::DELETE,
                format!("/v1/vms/{vm}/disks/{disk_id}"),
                None,
            );
            let Some((before, after, _)) = self.round(kind, delay, &[vm], request).await else {
                continue;
            };
            let label = Self::label(kind, delay);
            if disk_named(&after.world, vm, &name).is_some() {
                self.fail(&label, format!("disk {name} is still there"));
            }
            for snapshot in after.world.snapshots_of(vm) {
                if snapshot["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|v| v["disk_id"] == disk_id.as_str())
                {
                    self.fail(
                        &label,
                        format!(
                            "snapshot {} still has a layer of the deleted disk",
                            text(&snapshot["name"])
                        ),
                    );
                }
            }
            // Exactly the disk's files went.
            let mut its = BTreeSet::new();
            if let Some(disk) = disk_named(&before.world, vm, &name) {
                its.extend(chain_ids(&disk).into_iter().map(|v| format!("{v}.qcow2")));
            }
            for snapshot in before.world.snapshots_of(vm) {
                for volume in snapshot["volumes"].as_array().into_iter().flatten() {
                    if volume["disk_id"] == disk_id.as_str() {
                        its.insert(format!("{}.qcow2", text(&volume["volume_id"])));
                    }
                }
            }
            let removed: BTreeSet<String> =
                before.files.difference(&after.files).cloned().collect();
            if removed != its || after.files.difference(&before.files).next().is_some() {
                self.fail(
                    &label,
                    format!("the files removed {removed:?} are not exactly the disk's {its:?}"),
                );
            }
            let skip: BTreeSet<String> = before
                .copies
                .keys()
                .filter(|k| k.ends_with(&format!(":{name}")))
                .cloned()
                .collect();
            self.same_images(&label, &before, &after.world, vm, &skip);
        }
        self.global_check(kind).await;
    }

    // ------------------------------------------------------------------------------
    // Clones, VM deletion and templates.

    /// The source of the clone rounds: two disks, a snapshot and a present state.
    async fn clone_source(&self) -> (String, String) {
        let (vm, snapshots) = self
            .vm_with(
                "source",
                &[("root", 32), ("data", 16)],
                &[
                    &[(0, 0x71, 0, 4), (1, 0x72, 0, 2)],
                    &[(0, 0x73, 4, 4), (1, 0x74, 2, 2)],
                ],
            )
            .await;
        (vm, snapshots[0].clone())
    }

    /// Image key of what a point of `source` shows on `disk`.
    fn point_key(source: &str, snapshot: Option<&str>, disk: &str) -> String {
        match snapshot {
            Some(s) => format!("snap:{s}:{disk}"),
            None => format!("present:{source}:{disk}"),
        }
    }

    async fn clone(&mut self, mode: &str, source: &str, snapshot: &str) {
        let kind = format!("vm_clone ({mode})");
        for (round, delay) in delays().into_iter().enumerate() {
            // Alternately a snapshot and the present state.
            let point = (round % 2 == 0).then_some(snapshot);
            let mut body = json!({"name": format!("{}-{delay}", &mode[..2]), "mode": mode});
            if let Some(point) = point {
                body["snapshot_id"] = json!(point);
            }
            let kind = format!(
                "{kind} of the {}",
                if point.is_some() {
                    "snapshot"
                } else {
                    "present"
                }
            );
            let request = (Method::POST, format!("/v1/vms/{source}/clone"), Some(body));
            let Some((before, after, job)) = self.round(&kind, delay, &[source], request).await
            else {
                continue;
            };
            let label = Self::label(&kind, delay);
            let clone = text(&job["target"]["id"]);
            if after.world.vm(&clone).is_none() {
                self.fail(&label, format!("the clone {clone} is missing"));
                continue;
            }
            for disk in disks(&before.world, source) {
                let name = text(&disk["name"]);
                let Some(new) = disk_named(&after.world, &clone, &name) else {
                    self.fail(&label, format!("the clone has no disk {name}"));
                    continue;
                };
                let copy = before.copies[&Self::point_key(source, point, &name)].clone();
                self.expect_bytes(
                    &label,
                    new["active_path"].as_str().map(str::to_owned),
                    &copy,
                    &format!("the clone's {name}"),
                );
                let sits_on = match (mode, point) {
                    ("full", _) => Value::Null,
                    (_, Some(s)) => before
                        .world
                        .snapshot(s)
                        .and_then(|s| {
                            s["volumes"]
                                .as_array()?
                                .iter()
                                .find(|v| v["disk_id"] == disk["id"])
                                .map(|v| v["volume_id"].clone())
                        })
                        .unwrap_or(Value::Null),
                    (_, None) => json!(chain_ids(&disk)[0]),
                };
                if new["source_volume_id"] != sits_on
                    || (mode == "full" && chain_ids(&new).len() != 1)
                {
                    self.fail(
                        &label,
                        format!("the clone's {name} should sit on {sits_on} ({mode}): {new}"),
                    );
                }
                // The source: a linked clone of its present freezes the active layer
                // under a new one; anything else leaves its chain as it was.
                let now = disk_named(&after.world, source, &name)
                    .map(|d| chain_ids(&d))
                    .unwrap_or_default();
                let was = chain_ids(&disk);
                let expected_len = if mode == "linked" && point.is_none() {
                    was.len() + 1
                } else {
                    was.len()
                };
                if now.len() != expected_len || now[now.len() - was.len()..] != was[..] {
                    self.fail(
                        &label,
                        format!("the source's chain of {name} went {was:?} -> {now:?}"),
                    );
                }
            }
            if mode == "full"
                && shape(&before.world, source, true) != shape(&after.world, source, true)
            {
                self.fail(
                    &label,
                    format!(
                        "a full clone changed its source's records: {} -> {}",
                        shape(&before.world, source, true),
                        shape(&after.world, source, true)
                    ),
                );
            }
            self.same_images(&label, &before, &after.world, source, &BTreeSet::new());
        }
        self.global_check(&kind).await;
    }

    async fn flatten(&mut self, source: &str, snapshot: &str) {
        let kind = "disk_flatten";
        for delay in delays() {
            let job = self
                .app
                .expect_job(self.app.post(&format!("/v1/vms/{source}/clone"), json!({"name": format!("fl-{delay}"), "mode": "linked", "snapshot_id": snapshot})).await)
                .await;
            let clone = job.target.id.to_string();
            write(&self.app.active_path(&clone, "root").await, 0x75, 20, 4);
            let disk = to_json(self.app.vm(&clone).await.disk("root"));
            let request = (
                Method::POST,
                format!("/v1/vms/{clone}/disks/{}/flatten", text(&disk["id"])),
                None,
            );
            let Some((before, after, _)) =
                self.round(kind, delay, &[&clone, source], request).await
            else {
                continue;
            };
            let label = Self::label(kind, delay);
            let now = disk_named(&after.world, &clone, "root").unwrap_or(Value::Null);
            if !now["source_volume_id"].is_null() || chain_ids(&now) != chain_ids(&disk) {
                self.fail(
                    &label,
                    format!(
                        "the disk should be standalone with the same layers {:?}: {now}",
                        chain_ids(&disk)
                    ),
                );
            }
            self.same_images(&label, &before, &after.world, &clone, &BTreeSet::new());
            self.same_images(&label, &before, &after.world, source, &BTreeSet::new());
            if shape(&before.world, source, false) != shape(&after.world, source, false) {
                self.fail(
                    &label,
                    "flattening a clone changed its source's records".into(),
                );
            }
        }
        self.global_check(kind).await;
    }

    async fn vm_delete(&mut self) {
        let kind = "vm_delete";
        for delay in delays() {
            let (vm, _) = self
                .vm_with(
                    &format!("gone-{delay}"),
                    &[("root", 16), ("data", 8)],
                    &[&[(0, 0x91, 0, 2), (1, 0x92, 0, 1)], &[(0, 0x93, 2, 2)]],
                )
                .await;
            let request = (Method::DELETE, format!("/v1/vms/{vm}"), None);
            let Some((before, after, _)) = self.round(kind, delay, &[&vm], request).await else {
                continue;
            };
            let label = Self::label(kind, delay);
            if after.world.vm(&vm).is_some() {
                self.fail(&label, format!("VM {vm} still exists"));
            }
            let its = files_of(&before.world, &vm);
            let removed: BTreeSet<String> =
                before.files.difference(&after.files).cloned().collect();
            if removed != its || after.files.difference(&before.files).next().is_some() {
                self.fail(
                    &label,
                    format!("the files removed {removed:?} are not exactly the VM's {its:?}"),
                );
            }
        }
        self.global_check(kind).await;
    }

    /// Checks that `template` is ready and shows, disk by disk, the copies `keys`
    /// (disk name -> copy key), each a standalone file.
    fn template_shows(
        &mut self,
        label: &str,
        world: &World,
        template: &str,
        keys: &BTreeMap<String, String>,
        before: &Capture,
    ) {
        let Some(view) = world.template(template) else {
            self.fail(label, format!("template {template} is missing"));
            return;
        };
        let disks: Vec<Value> = view["disks"].as_array().cloned().unwrap_or_default();
        let names: BTreeSet<String> = disks.iter().map(|d| text(&d["name"])).collect();
        if names != keys.keys().cloned().collect() {
            self.fail(
                label,
                format!(
                    "template {template} has disks {names:?}, expected {:?}",
                    keys.keys()
                ),
            );
        }
        for disk in disks {
            let name = text(&disk["name"]);
            let Some(key) = keys.get(&name) else { continue };
            let path = text(&disk["path"]);
            match file_chain(&path) {
                Ok(chain) if chain.len() == 1 => {}
                Ok(chain) => self.fail(
                    label,
                    format!("template disk {name} is not one standalone file: {chain:?}"),
                ),
                Err(e) => self.fail(label, e),
            }
            let copy = before.copies[key].clone();
            self.expect_bytes(label, Some(path), &copy, &format!("template disk {name}"));
        }
    }

    async fn template_create(&mut self, source: &str, snapshot: &str) {
        let kind = "template_create";
        for (round, delay) in delays().into_iter().enumerate() {
            let point = (round % 2 == 1).then_some(snapshot);
            let mut body = json!({"name": format!("tc-{delay}"), "from_vm_id": source});
            if let Some(point) = point {
                body["snapshot_id"] = json!(point);
            }
            let kind = format!(
                "{kind} from the {}",
                if point.is_some() {
                    "snapshot"
                } else {
                    "present"
                }
            );
            let Some((before, after, job)) = self
                .round(
                    &kind,
                    delay,
                    &[source],
                    (Method::POST, "/v1/templates".into(), Some(body)),
                )
                .await
            else {
                continue;
            };
            let label = Self::label(&kind, delay);
            let keys: BTreeMap<String, String> = disks(&before.world, source)
                .iter()
                .map(|d| {
                    (
                        text(&d["name"]),
                        Self::point_key(source, point, &text(&d["name"])),
                    )
                })
                .collect();
            self.template_shows(
                &label,
                &after.world,
                &text(&job["target"]["id"]),
                &keys,
                &before,
            );
            if shape(&before.world, source, true) != shape(&after.world, source, true) {
                self.fail(
                    &label,
                    format!(
                        "copying into a template changed the VM's records: {} -> {}",
                        shape(&before.world, source, true),
                        shape(&after.world, source, true)
                    ),
                );
            }
            self.same_images(&label, &before, &after.world, source, &BTreeSet::new());
        }
        self.global_check(kind).await;
    }

    async fn convert_to_template(&mut self) {
        let kind = "vm_to_template";
        for delay in delays() {
            let (vm, _) = self
                .vm_with(
                    &format!("cv-{delay}"),
                    &[("root", 16)],
                    &[&[(0, 0xa1, 0, 2)], &[(0, 0xa2, 2, 3)]],
                )
                .await;
            let request = (
                Method::POST,
                format!("/v1/vms/{vm}/convert-to-template"),
                None,
            );
            let Some((before, after, _)) = self.round(kind, delay, &[&vm], request).await else {
                continue;
            };
            let label = Self::label(kind, delay);
            if after.world.vm(&vm).is_some() {
                self.fail(&label, format!("{vm} is still a VM"));
            }
            let keys = BTreeMap::from([("root".to_owned(), format!("present:{vm}:root"))]);
            self.template_shows(&label, &after.world, &vm, &keys, &before);
        }
        self.global_check(kind).await;
    }

    async fn deploy(&mut self, source: &str) {
        let kind = "template_deploy";
        let job = self
            .app
            .expect_job(
                self.app
                    .post(
                        "/v1/templates",
                        json!({"name": "golden", "from_vm_id": source}),
                    )
                    .await,
            )
            .await;
        let template = job.target.id.to_string();
        for (round, delay) in delays().into_iter().enumerate() {
            let mode = if round % 2 == 0 { "linked" } else { "full" };
            let kind = format!("{kind} ({mode}, 2 VMs)");
            let body = json!({"name": format!("dp-{delay}"), "mode": mode, "count": 2});
            let request = (
                Method::POST,
                format!("/v1/templates/{template}/deploy"),
                Some(body),
            );
            let Some((before, after, job)) = self.round(&kind, delay, &[&template], request).await
            else {
                continue;
            };
            let label = Self::label(&kind, delay);
            let made: Vec<String> = job["detail"]["vm_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            if made.len() != 2 {
                self.fail(
                    &label,
                    format!("the job names {} VMs, not 2: {made:?}", made.len()),
                );
            }
            let template_disks: Vec<Value> = before
                .world
                .template(&template)
                .and_then(|t| t["disks"].as_array().cloned())
                .unwrap_or_default();
            for vm in &made {
                for disk in &template_disks {
                    let name = text(&disk["name"]);
                    let Some(new) = disk_named(&after.world, vm, &name) else {
                        self.fail(&label, format!("deployed VM {vm} has no disk {name}"));
                        continue;
                    };
                    let sits_on = if mode == "linked" {
                        json!(file_name(&text(&disk["path"])).trim_end_matches(".qcow2"))
                    } else {
                        Value::Null
                    };
                    if new["source_volume_id"] != sits_on || chain_ids(&new).len() != 1 {
                        self.fail(
                            &label,
                            format!("deployed disk {name} should be one layer on {sits_on}: {new}"),
                        );
                    }
                    let copy = before.copies[&format!("tpl:{template}:{name}")].clone();
                    self.expect_bytes(
                        &label,
                        new["active_path"].as_str().map(str::to_owned),
                        &copy,
                        &format!("deployed VM {vm} disk {name}"),
                    );
                }
            }
            if shape(&before.world, &template, false) != shape(&after.world, &template, false) {
                self.fail(&label, "deploying changed the template's records".into());
            }
            self.same_images(&label, &before, &after.world, &template, &BTreeSet::new());
        }
        self.global_check(kind).await;
    }

    async fn convert_to_vm(&mut self, source: &str, snapshot: &str) {
        let kind = "template_to_vm";
        for delay in delays() {
            let job = self
                .app
                .expect_job(self.app.post("/v1/templates", json!({"name": format!("tv-{delay}"), "from_vm_id": source, "snapshot_id": snapshot})).await)
                .await;
            let template = job.target.id.to_string();
            let request = (
                Method::POST,
                format!("/v1/templates/{template}/convert-to-vm"),
                None,
            );
            let Some((before, after, _)) = self.round(kind, delay, &[&template], request).await
            else {
                continue;
            };
            let label = Self::label(kind, delay);
            if after.world.template(&template).is_some() {
                self.fail(&label, format!("{template} is still a template"));
            }
            for (key, copy) in &before.copies {
                let disk = key.rsplit(':').next().unwrap_or_default();
                let copy = copy.clone();
                self.expect_bytes(
                    &label,
                    after.world.active_path(&template, disk),
                    &copy,
                    &format!("the VM's disk {disk}"),
                );
            }
            if after
                .world
                .vm(&template)
                .is_some_and(|vm| vm["state"] != "stopped")
            {
                self.fail(&label, "the VM is not stopped".into());
            }
        }
        self.global_check(kind).await;
    }

    /// The outcome table and every problem.
    fn finish(self, name: &str, started: Instant) {
        let mut kinds: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (kind, delay, outcome) in &self.table {
            kinds
                .entry(kind)
                .or_default()
                .push(format!("{delay} ms: {outcome}"));
        }
        let mut out = String::new();
        for (kind, outcomes) in &kinds {
            let _ = writeln!(out, "  {kind}: {}", outcomes.join("; "));
        }
        println!(
            "{name}: outcomes by kind and cancel delay:\n{out}{name}: done in {:?}",
            started.elapsed()
        );
        let mut problems = self.api.journal.violations();
        problems.extend(self.problems);
        if !problems.is_empty() {
            let dump = self.api.journal.dump(name);
            panic!(
                "{name}: {} problem(s); every request and answer is in {dump}:\n{}",
                problems.len(),
                report(&problems)
            );
        }
    }
}

/// The path of a snapshot's layer of the disk named `disk`.
fn world_snapshot_path(world: &World, snapshot: &Value, disk: &str) -> Option<String> {
    world
        .snapshot_images(snapshot)
        .into_iter()
        .find(|(name, _)| name == disk)
        .map(|(_, path)| path)
}

#[tokio::test]
async fn cancelling_snapshot_and_disk_jobs_at_any_moment_leaves_them_whole_or_untouched() {
    let started = Instant::now();
    let mut lab = Lab::start().await;
    lab.snapshot_create().await;
    lab.snapshot_delete_commit().await;
    lab.snapshot_delete_stream().await;
    lab.snapshot_delete_branch_point().await;
    lab.snapshot_delete_all().await;
    lab.snapshot_revert().await;
    lab.disk_create().await;
    lab.disk_resize().await;
    lab.disk_delete().await;
    lab.finish("cancel_timing-snapshots-disks", started);
}

#[tokio::test]
async fn cancelling_clone_vm_and_template_jobs_at_any_moment_leaves_them_whole_or_untouched() {
    let started = Instant::now();
    let mut lab = Lab::start().await;
    let (source, snapshot) = lab.clone_source().await;
    lab.clone("linked", &source, &snapshot).await;
    lab.clone("full", &source, &snapshot).await;
    lab.flatten(&source, &snapshot).await;
    lab.vm_delete().await;
    lab.template_create(&source, &snapshot).await;
    lab.convert_to_template().await;
    lab.deploy(&source).await;
    lab.convert_to_vm(&source, &snapshot).await;
    lab.finish("cancel_timing-clones-templates", started);
}
