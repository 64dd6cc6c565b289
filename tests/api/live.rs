//! Live snapshots of running VMs through their QMP monitor. `qemu-storage-daemon`
//! stands in for the VM's QEMU: it opens the disks' active chains, serves its monitor
//! in `--runtime-dir`, and exports each disk over NBD, so the test writes into the
//! "guest" disks while the job runs and checks every byte afterwards.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use strata::qemu::qmp::Qmp;

pub(crate) use crate::support::live::{RunningVm, guest_write, try_guest_write};

use crate::recovery::assert_files_match_metadata;
use crate::support::*;

pub(crate) const DISK: u64 = 64 << 20;
pub(crate) const MIB: u64 = 1 << 20;

pub(crate) async fn spawn(run_dir: &Path, fault: Option<&str>) -> TestApp {
    let mut env = vec![("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap())];
    if let Some(fault) = fault {
        env.push(("STRATA_FAULT", fault));
    }
    let app = TestApp::spawn_with(&env).await;
    app.wait_ready().await;
    app
}

/// A two-disk VM, running in a daemon, marked running with its QMP socket. Before it
/// ran, `root` got 0x11 over its first MiB (offline).
pub(crate) async fn running_vm(app: &TestApp, run_dir: &Path, name: &str) -> (Uuid, RunningVm) {
    let vm = app
        .create_vm(name, &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(&app.active_path(vm, "root").await, 0x11, 0, 1);
    let actives = vec![
        app.active_path(vm, "root").await,
        app.active_path(vm, "data").await,
    ];
    let process = RunningVm::start(run_dir, &actives);
    mark_running(app, vm, &process).await;
    (vm, process)
}

/// The orchestrator's word that the VM runs in `process`, with its monitor socket.
pub(crate) async fn mark_running(app: &TestApp, vm: Uuid, process: &RunningVm) {
    let (status, body) = app
        .patch(
            &format!("/v1/vms/{vm}"),
            json!({"state": "running", "qmp_socket": process.qmp}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The orchestrator's word that the VM stopped (its QEMU is gone).
pub(crate) async fn mark_stopped(app: &TestApp, vm: Uuid) {
    let (status, body) = app
        .patch(&format!("/v1/vms/{vm}"), json!({"state": "stopped"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

pub(crate) fn run_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let canonical = std::fs::canonicalize(dir.path()).unwrap();
    (dir, canonical)
}

#[tokio::test]
async fn a_live_snapshot_switches_every_disk_at_once_and_loses_no_guest_write() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "live-snap").await;
    let old_root = app.active_path(vm, "root").await;
    let old_data = app.active_path(vm, "data").await;
    process.write(0, 0x22, MIB, MIB);
    process.write(1, 0x61, 0, MIB);

    // A guest that keeps writing while the snapshot is taken: each write goes to a
    // MiB of its own, past the areas the checks below look at.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let nbd = process.nbd.clone();
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 40 {
                let (disk, offset, pattern) = (n % 2, (8 + n) * MIB, 0x80 + n as u8);
                let written_now = try_guest_write(&nbd, disk as usize, pattern, offset, MIB);
                assert!(
                    written_now.is_ok(),
                    "a guest write failed during the snapshot"
                );
                written.push((disk, offset, pattern));
                n += 1;
            }
            written
        })
    };
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{vm}/snapshots"),
                json!({"name": "live-1"}),
            )
            .await,
        )
        .await;
    stop.store(true, Ordering::Relaxed);
    let concurrent = writer.join().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let snapshot = job.target.id;

    // The API shows the new active layers at once; QEMU writes into them.
    let new_root = app.active_path(vm, "root").await;
    let new_data = app.active_path(vm, "data").await;
    assert_ne!(new_root, old_root);
    assert_ne!(new_data, old_data);
    assert_eq!(
        process.top_files().await,
        [new_root.clone(), new_data.clone()]
    );
    assert_eq!(app.snapshot_path(vm, snapshot, "root").await, old_root);

    // After the snapshot, the guest overwrites the first MiB of root.
    process.write(0, 0x33, 0, MIB);
    process.stop();
    mark_stopped(&app, vm).await;

    // The snapshot holds what the guest wrote before it, and nothing after.
    expect_all(&old_root, &[(0x11, 0, 1), (0x22, 1, 1)]);
    expect_all(&old_data, &[(0x61, 0, 1)]);
    // The present holds everything, the concurrent writes included.
    expect_all(&new_root, &[(0x33, 0, 1), (0x22, 1, 1)]);
    expect_all(&new_data, &[(0x61, 0, 1)]);
    for (disk, offset, pattern) in concurrent {
        let path = if disk == 0 { &new_root } else { &new_data };
        expect_bytes(path, pattern, offset, MIB);
    }
    for path in [&old_root, &old_data, &new_root, &new_data] {
        check_clean(path);
    }
    assert_eq!(chain(&new_root), [new_root.clone(), old_root.clone()]);
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn a_qemu_reading_other_files_than_the_records_is_refused_and_nothing_changes() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let vm = app.create_vm("live-mismatch", &[("root", DISK)]).await.id;
    let active = app.active_path(vm, "root").await;
    // QEMU runs the VM from a copy strata does not know.
    let stray = run_dir.join("stray.qcow2");
    std::fs::copy(&active, &stray).unwrap();
    let process = RunningVm::start(&run_dir, &[stray.display().to_string()]);
    mark_running(&app, vm, &process).await;
    let files_before = app.volume_files();

    let (status, job) = app
        .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job = app.wait_job(&job["id"].as_str().unwrap()).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let error = job.error.as_ref().unwrap();
    assert_eq!(error.code, "runtime_mismatch", "{job:?}");
    assert!(error.message.contains("has not opened"), "{job:?}");
    let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
    assert_eq!(list["items"], json!([]));
    assert_eq!(app.active_path(vm, "root").await, active);
    assert_eq!(app.volume_files(), files_before);
    assert_eq!(process.top_files().await, [stray.display().to_string()]);
}

#[tokio::test]
async fn a_crash_at_any_point_of_a_live_snapshot_ends_with_the_snapshot_or_nothing_lost() {
    // Steps: create(root), create(data), open the overlays in QEMU (2), switch (3).
    // `ran-step-N`: the step's work is done, its journal entry is not (a resumed job
    // must not make again a file QEMU already holds).
    for point in [
        "planned",
        "after-step-1",
        "ran-step-2",
        "after-step-2",
        "ran-step-3",
        "committed",
    ] {
        let (_run, run_dir) = run_dir();
        let fault = format!("snapshot_create:{point}");
        let mut app = spawn(&run_dir, Some(&fault)).await;
        let (vm, mut process) = running_vm(&app, &run_dir, "live-crash").await;
        let old_root = app.active_path(vm, "root").await;
        process.write(0, 0x22, MIB, MIB);
        let (status, job) = app
            .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s"}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let exit = app.wait_exit();
        assert!(
            !exit.success(),
            "{point}: the injected fault aborts the process"
        );
        // The guest goes on writing while strata is down.
        process.write(0, 0x44, 2 * MIB, MIB);
        app.restart(&[("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap())])
            .await;

        let job = app.wait_job(job["id"].as_str().unwrap()).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{point}: {job:?}");
        let new_root = app.active_path(vm, "root").await;
        assert_ne!(new_root, old_root, "{point}");
        assert_eq!(process.top_files().await[0], new_root, "{point}");
        process.write(0, 0x33, 0, MIB);
        process.stop();
        expect_all(&old_root, &[(0x11, 0, 1), (0x22, 1, 1)]);
        expect_all(&new_root, &[(0x33, 0, 1), (0x22, 1, 1), (0x44, 2, 1)]);
        check_clean(&new_root);
        check_clean(&old_root);
        mark_stopped(&app, vm).await;
        assert_files_match_metadata(&app, vm).await;
    }
}

#[tokio::test]
async fn a_schedule_run_snapshots_a_running_vm_live_and_skips_one_without_a_socket() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (live, mut process) = running_vm(&app, &run_dir, "sched-live").await;
    let old_root = app.active_path(live, "root").await;
    let unreachable = app.create_vm("sched-no-socket", &[("root", DISK)]).await.id;
    let (status, body) = app
        .patch(
            &format!("/v1/vms/{unreachable}"),
            json!({"state": "running"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (vm, name) in [(live, "every-hour-live"), (unreachable, "every-hour-off")] {
        let (status, schedule) = app
            .post(
                "/v1/schedules",
                json!({"name": name, "vm_id": vm, "cron": "@hourly"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{schedule}");
        let id = schedule["id"].as_str().unwrap();
        let (status, run) = app
            .post(&format!("/v1/schedules/{id}/run"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let target = &run["targets"][0];
        if vm == live {
            assert_eq!(target["outcome"], "queued", "{run}");
            let job = app.wait_job(target["job_id"].as_str().unwrap()).await;
            assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        } else {
            assert_eq!(run["status"], "skipped", "{run}");
            assert_eq!(target["code"], "vm_running", "{run}");
            assert!(
                target["reason"].as_str().unwrap().contains("qmp_socket"),
                "{run}"
            );
        }
    }
    let new_root = app.active_path(live, "root").await;
    assert_ne!(new_root, old_root);
    assert_eq!(process.top_files().await[0], new_root);
    process.write(0, 0x33, 0, MIB);
    process.stop();
    expect_all(&old_root, &[(0x11, 0, 1)]);
    expect_all(&new_root, &[(0x33, 0, 1)]);
}

#[tokio::test]
async fn a_qemu_that_stops_answering_before_the_switch_holds_the_job_until_the_vm_is_marked_stopped()
 {
    let (_run, run_dir) = run_dir();
    // The job pauses once its overlays are open in QEMU, before the switch.
    let app = spawn(&run_dir, Some("snapshot_create:after-step-2:pause=4000")).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "live-gone").await;
    let old_root = app.active_path(vm, "root").await;
    process.write(0, 0x22, MIB, MIB);
    let (status, job) = app
        .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    // Until the overlays are open in QEMU (step 2 journaled: the job pauses there).
    let mut waited = 0;
    while app.job(&job_id).await.progress < 74 {
        waited += 1;
        assert!(waited < 300, "the job never opened its overlays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Pointing strata at another monitor while the job works is refused.
    let other = run_dir.join("other.qmp");
    let _other = std::os::unix::net::UnixListener::bind(&other).unwrap();
    let reply = send_json(
        &app,
        reqwest::Method::PATCH,
        &format!("/v1/vms/{vm}"),
        &json!({"qmp_socket": other}),
    )
    .await;
    assert_problem(&reply, StatusCode::CONFLICT, "vm_busy");

    // QEMU goes away while the VM is still recorded running: a refused connection
    // proves nothing (QEMU may be restarting), so the job waits.
    process.write(0, 0x44, 2 * MIB, MIB);
    process.stop();
    let mut waited = 0;
    loop {
        let job = app.job(&job_id).await;
        assert_eq!(job.status, JobStatus::Running, "{job:?}");
        if job.error.is_some() {
            break;
        }
        waited += 1;
        assert!(
            waited < 200,
            "the job never said what it waits for: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The orchestrator says the VM stopped: no QEMU writes any layer now, and the
    // overlays are recorded (they read exactly as the layers below them).
    mark_stopped(&app, vm).await;
    let job = app.wait_job(&job_id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let new_root = app.active_path(vm, "root").await;
    assert_ne!(new_root, old_root);
    assert_eq!(app.snapshot_path(vm, job.target.id, "root").await, old_root);
    expect_all(&old_root, &[(0x11, 0, 1), (0x22, 1, 1), (0x44, 2, 1)]);
    expect_all(&new_root, &[(0x11, 0, 1), (0x22, 1, 1), (0x44, 2, 1)]);
    check_clean(&new_root);
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn a_running_vm_disk_grows_through_its_qemu_and_the_guest_writes_past_the_old_end() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "live-grow").await;
    let root = app.vm(vm).await.disk("root").id;

    // QEMU's NBD export forbids resizing the node it serves (a guest's virtio-blk
    // device allows it): QEMU refuses, the grow did not happen, and the job fails
    // rather than waiting.
    let path = format!("/v1/vms/{vm}/disks/{root}/resize");
    let body = json!({"size_bytes": 2 * DISK});
    let accepted = app.accept(Method::POST, &path, Some(body)).await;
    let refused = app.wait_job(accepted.id).await;
    assert_eq!(refused.status, JobStatus::Failed, "{refused:?}");
    assert_eq!(refused.error.as_ref().unwrap().code, "qemu_failed");
    let view = app.vm(vm).await;
    let disk = view.disk("root");
    assert_eq!(
        (disk.size_bytes, disk.status),
        (DISK, ResourceStatus::Ready)
    );

    let mut qmp = Qmp::connect(&process.qmp, Duration::from_secs(10))
        .await
        .unwrap();
    let export = json!({"type": "nbd", "id": "exp0", "node-name": "disk0", "name": "disk0", "writable": true});
    qmp.execute::<Value>("block-export-del", json!({"id": "exp0"}))
        .await
        .unwrap();
    drop(qmp);
    let job = app.resize(vm, root, 2 * DISK).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(app.vm(vm).await.disk("root").size_bytes, 2 * DISK);
    let mut qmp = Qmp::connect(&process.qmp, Duration::from_secs(10))
        .await
        .unwrap();
    let node = qmp
        .block_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node_name == "disk0")
        .unwrap();
    assert_eq!(node.image.virtual_size, 2 * DISK);
    // The guest sees the new size: it writes past the old end.
    qmp.execute::<Value>("block-export-add", export)
        .await
        .unwrap();
    drop(qmp);
    process.write(0, 0x77, DISK + MIB, MIB);
    process.stop();
    let active = app.active_path(vm, "root").await;
    expect_bytes(&active, 0x77, DISK + MIB, MIB);
    expect_all(&active, &[(0x11, 0, 1)]);
    check_clean(&active);
}
