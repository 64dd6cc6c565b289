//! Upgrade: a data directory written by the release at commit 2233c89 is read, resumed
//! and drained by the service under test exactly as that release does.
//!
//! The fixture (`tests/fixtures/upgrade-v1/`, made by `scripts/make-upgrade-fixture.py`;
//! its README says what it holds and how to remake it) is the release's SQLite database
//! and volume files, frozen by a kill -9 with:
//! - for every job kind, at least one job still **queued** (accepted while every worker
//!   was held), with every shape of parameters the release writes: `previous_status`
//!   (`ready` and `error`), `flatten_dependents` + `locked_vms`, sizes, clone
//!   parameters (linked and full, of a snapshot and of the present, deploys of several
//!   VMs), snapshot lists, uploads;
//! - for every kind but one, a job **interrupted** mid-job: its plan journaled and, where
//!   the kind has file steps, at least one step run (a journal with `next_step` past it,
//!   or, for one-step plans, the step run but not yet journaled). `disk_delete` (never a
//!   file step) was held by the fault switch right after journaling its plan.
//!   `template_to_vm` is only queued and finished, never interrupted: its plan has no
//!   file step either, and the fault switch holds one kind per process (it was spent on
//!   `disk_delete`, which has parameters); interrupted jobs can only be made in the last
//!   run, since every start first resumes what a crash left. For the same reason the
//!   fixture has no job interrupted after its final commit (only file removals left);
//! - finished jobs: succeeded (every kind), failed (`qemu_failed`,
//!   `disk_shrink_refused`) and cancelled (queued and running).
//!
//! `expected.json` records what the release did with a fresh copy: every job's final
//! status and error code, the job listings, every VM, template, disk and snapshot, and
//! the guest bytes of every disk and snapshot (pattern runs per 64 KiB). The database
//! stores no paths (a layer's backing file is its bare file name), so the tarball is
//! unpacked into any temporary directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upgrade-v1");

#[tokio::test]
async fn a_data_directory_of_the_previous_release_ends_every_job_as_that_release_did() {
    let recorded = recorded();
    assert_fixture_holds_every_kind(&recorded);
    let app = TestApp::spawn_in(unpack_fixture(), &[]).await;
    settle(&app).await;

    assert_jobs_end_as_recorded(&app, &recorded).await;
    assert_job_listings_as_recorded(&app, &recorded).await;
    assert_resources_as_recorded(&app, &recorded).await;
    assert_deleted_vms_are_gone(&app, &recorded).await;
    let references = assert_guest_bytes_as_recorded(&app, &recorded).await;
    assert_files_are_the_referenced_ones(&app, &references);
}

/// What the release did with the fixture (`expected.json`).
fn recorded() -> Value {
    let text = std::fs::read_to_string(Path::new(FIXTURE).join("expected.json"))
        .expect("read expected.json");
    serde_json::from_str(&text).expect("expected.json is JSON")
}

/// What the module doc promises of the fixture (as the recording read it from the
/// database): every kind queued, every kind but `template_to_vm` interrupted, and
/// finished jobs of each final status.
fn assert_fixture_holds_every_kind(recorded: &Value) {
    let held = |state: &str| -> BTreeSet<String> {
        recorded["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["in_fixture"] == state)
            .map(|j| j["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    let every: BTreeSet<String> = KINDS.iter().map(|k| k.to_string()).collect();
    assert_eq!(held("queued"), every, "kinds queued in the fixture");
    let mut interrupted = every.clone();
    interrupted.remove("template_to_vm");
    assert_eq!(
        held("running"),
        interrupted,
        "kinds interrupted in the fixture"
    );
    for status in ["succeeded", "failed", "cancelled"] {
        assert!(!held(status).is_empty(), "no {status} job in the fixture");
    }
}

const KINDS: [&str; 16] = [
    "vm_create",
    "vm_delete",
    "disk_create",
    "disk_delete",
    "disk_resize",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_delete_all",
    "snapshot_revert",
    "vm_clone",
    "disk_flatten",
    "template_create",
    "template_deploy",
    "vm_to_template",
    "template_to_vm",
    "template_import",
];

/// The fixture's data directory, unpacked as `<temp>/data`.
fn unpack_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new("tar")
        .arg("-xzf")
        .arg(Path::new(FIXTURE).join("data.tar.gz"))
        .arg("-C")
        .arg(dir.path())
        .output()
        .expect("run tar");
    assert!(
        output.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("data/strata.db").is_file());
    dir
}

/// Every job of the service (at most 1000, one page).
async fn all_jobs(app: &TestApp, query: &str) -> Vec<Value> {
    let (status, page) = app.get(&format!("/v1/jobs?limit=1000{query}")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page["next_cursor"].is_null(), "more than one page of jobs");
    page["items"].as_array().unwrap().clone()
}

/// Wait until no job is queued or running: interrupted jobs are resumed before the
/// service is ready, queued ones run after.
async fn settle(app: &TestApp) {
    loop {
        // One listing, so that a job claimed between two queries is not missed.
        let pending: Vec<Value> = all_jobs(app, "")
            .await
            .into_iter()
            .filter(|j| j["status"] == "queued" || j["status"] == "running")
            .collect();
        if pending.is_empty() {
            return;
        }
        for job in &pending {
            app.wait_job(id(job)).await;
        }
    }
}

/// What a job view shows that the recording kept.
fn job_outcome(job: &Value) -> Value {
    let merges: Vec<&Value> = job["detail"]["merges"]
        .as_array()
        .map(|m| m.iter().map(|m| &m["action"]).collect())
        .unwrap_or_default();
    json!({
        "kind": job["kind"], "target": job["target"], "vm_id": job["vm_id"],
        "status": job["status"], "error_code": job["error"]["code"],
        "cancel_requested": job["cancel_requested"], "merges": merges,
    })
}

async fn assert_jobs_end_as_recorded(app: &TestApp, recorded: &Value) {
    for expected in recorded["jobs"].as_array().unwrap() {
        let id = expected["id"].as_str().unwrap();
        let (status, job) = app.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        let mut want = expected.clone();
        for key in ["id", "in_fixture", "label"] {
            want.as_object_mut().unwrap().remove(key);
        }
        assert_eq!(
            job_outcome(&job),
            want,
            "job {id} ({} in the fixture: {})",
            expected["in_fixture"],
            expected["label"]
        );
    }
}

fn ids(jobs: &[Value]) -> Vec<String> {
    jobs.iter().map(id).collect()
}

/// `GET /v1/jobs` lists every job as the release did: all of them newest first, and
/// filtered by kind and by VM (every VM a job locks).
async fn assert_job_listings_as_recorded(app: &TestApp, recorded: &Value) {
    let listing = &recorded["listing"];
    let all = all_jobs(app, "").await;
    assert_eq!(ids(&all), strings(&listing["newest_first"]));
    for job in &all {
        let expected = recorded["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == job["id"])
            .unwrap();
        let shown = job_outcome(job);
        for key in ["kind", "status", "target", "vm_id", "error_code"] {
            assert_eq!(shown[key], expected[key], "listed {key} of {}", job["id"]);
        }
    }
    for (kind, expected) in listing["by_kind"].as_object().unwrap() {
        let jobs = all_jobs(app, &format!("&kind={kind}")).await;
        assert_eq!(ids(&jobs), strings(expected), "jobs of kind {kind}");
    }
    for (vm, expected) in listing["by_vm"].as_object().unwrap() {
        let jobs = all_jobs(app, &format!("&vm_id={vm}")).await;
        assert_eq!(ids(&jobs), strings(expected), "jobs of VM {vm}");
    }
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Every VM and template by name, shaped like `resources` in expected.json.
async fn resources(app: &TestApp) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (kind, path) in [("vm", "/v1/vms"), ("template", "/v1/templates")] {
        let (status, page) = app.get(&format!("{path}?limit=1000")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page["next_cursor"].is_null());
        for item in page["items"].as_array().unwrap() {
            let mut entry = json!({"id": item["id"], "kind": kind, "status": item["status"]});
            let mut disks = serde_json::Map::new();
            for disk in item["disks"].as_array().unwrap() {
                let mut d = json!({"id": disk["id"], "size_bytes": disk["size_bytes"]});
                if kind == "vm" {
                    // A template's disks show neither.
                    d["status"] = disk["status"].clone();
                    d["chain_length"] = json!(disk["chain"].as_array().unwrap().len());
                }
                disks.insert(disk["name"].as_str().unwrap().to_owned(), d);
            }
            entry["disks"] = Value::Object(disks);
            if kind == "vm" {
                entry["state"] = item["state"].clone();
                entry["snapshots"] = snapshots(app, &id(item)).await;
            }
            out.insert(item["name"].as_str().unwrap().to_owned(), entry);
        }
    }
    out
}

/// A VM's snapshots by name: id and status.
async fn snapshots(app: &TestApp, vm: &str) -> Value {
    let (status, page) = app.get(&format!("/v1/vms/{vm}/snapshots?limit=1000")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let mut out = serde_json::Map::new();
    for snapshot in page["items"].as_array().unwrap() {
        out.insert(
            snapshot["name"].as_str().unwrap().to_owned(),
            json!({"id": snapshot["id"], "status": snapshot["status"]}),
        );
    }
    Value::Object(out)
}

async fn assert_resources_as_recorded(app: &TestApp, recorded: &Value) {
    let actual = resources(app).await;
    let expected = recorded["resources"].as_object().unwrap();
    let names = |keys: Vec<&String>| keys.into_iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        names(actual.keys().collect()),
        names(expected.keys().collect())
    );
    for (name, entry) in expected {
        assert_eq!(&actual[name], entry, "{name}");
    }
}

/// VMs (and templates) the jobs deleted are gone from both collections.
async fn assert_deleted_vms_are_gone(app: &TestApp, recorded: &Value) {
    for vm in strings(&recorded["gone_vm_ids"]) {
        for path in ["/v1/vms", "/v1/templates"] {
            let (status, body) = app.get(&format!("{path}/{vm}")).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}/{vm}: {body}");
        }
    }
}

/// The file of each (VM or template, disk) present state.
async fn present_files(app: &TestApp, recorded: &Value) -> BTreeMap<(String, String), String> {
    let mut present = BTreeMap::new();
    for (name, entry) in recorded["resources"].as_object().unwrap() {
        let vm = id(entry);
        if entry["kind"] == "vm" {
            for disk in entry["disks"].as_object().unwrap().keys() {
                let path = app.active_path(&vm, disk).await;
                present.insert((name.clone(), disk.clone()), path);
            }
            continue;
        }
        let (_, view) = app.get(&format!("/v1/templates/{vm}")).await;
        for disk in view["disks"].as_array().unwrap() {
            let key = (name.clone(), disk["name"].as_str().unwrap().to_owned());
            present.insert(key, disk["path"].as_str().unwrap().to_owned());
        }
    }
    present
}

/// Each run of `[pattern, offset, length]` (bytes) reads back, and the chain is clean.
fn assert_regions(path: &str, regions: &Value) {
    for region in regions.as_array().unwrap() {
        let [pattern, offset, length] = [0, 1, 2].map(|i| region[i].as_u64().unwrap());
        expect_bytes(path, pattern as u8, offset, length);
    }
    check_clean(path);
}

/// The guest bytes of every disk's present and of every snapshot are the recorded
/// ones. Returns every file they read (their backing chains).
async fn assert_guest_bytes_as_recorded(app: &TestApp, recorded: &Value) -> BTreeSet<String> {
    let mut read = assert_present_bytes(app, recorded).await;
    read.extend(assert_snapshot_bytes(app, recorded).await);
    read
}

async fn assert_present_bytes(app: &TestApp, recorded: &Value) -> BTreeSet<String> {
    let present = present_files(app, recorded).await;
    let mut read = BTreeSet::new();
    let mut modelled = BTreeSet::new();
    for (vm, disks) in recorded["content"]["present"].as_object().unwrap() {
        for (disk, regions) in disks.as_object().unwrap() {
            let path = &present[&(vm.clone(), disk.clone())];
            assert_regions(path, regions);
            read.extend(chain(path));
            modelled.insert((vm.clone(), disk.clone()));
        }
    }
    let every: BTreeSet<_> = present.into_keys().collect();
    assert_eq!(modelled, every, "disks without recorded bytes");
    read
}

async fn assert_snapshot_bytes(app: &TestApp, recorded: &Value) -> BTreeSet<String> {
    let resources = recorded["resources"].as_object().unwrap();
    let mut read = BTreeSet::new();
    let mut modelled = BTreeSet::new();
    for snapshot in recorded["content"]["snapshots"].as_array().unwrap() {
        let [vm, name] = ["vm", "snapshot"].map(|k| snapshot[k].as_str().unwrap().to_owned());
        let vm_id = id(&resources[&vm]);
        let snapshot_id = id(&resources[&vm]["snapshots"][&name]);
        for (disk, regions) in snapshot["disks"].as_object().unwrap() {
            let path = app.snapshot_path(&vm_id, &snapshot_id, disk).await;
            assert_regions(&path, regions);
            read.extend(chain(&path));
        }
        modelled.insert((vm, name));
    }
    let every: BTreeSet<(String, String)> = resources
        .iter()
        .flat_map(|(vm, entry)| {
            let snapshots = entry["snapshots"].as_object().into_iter().flatten();
            snapshots.map(|(name, _)| (vm.clone(), name.clone()))
        })
        .collect();
    assert_eq!(modelled, every, "snapshots without recorded bytes");
    read
}

/// No file is left behind and none is missing: the volumes are exactly the layers the
/// disks and snapshots read, and no upload waits any more.
fn assert_files_are_the_referenced_ones(app: &TestApp, references: &BTreeSet<String>) {
    let on_disk: BTreeSet<String> = app
        .volume_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(&on_disk, references);
    let uploads = app.data_dir.join("imports");
    let left: Vec<_> = std::fs::read_dir(&uploads)
        .map(|dir| dir.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "uploads left: {left:?}");
}
