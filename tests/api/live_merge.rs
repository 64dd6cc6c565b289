//! Deleting snapshots of running VMs: the merges run inside the VM's QEMU (the
//! qemu-storage-daemon stand-in of `live.rs`) while a guest writer keeps writing, in each
//! of the four delete cases, for all snapshots at once, and through crashes of strata
//! and of QEMU around the pivot. Every byte is checked afterwards.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::live::{
    DISK, MIB, RunningVm, mark_running, mark_stopped, run_dir, spawn, try_guest_write,
};
use crate::recovery::{assert_files_match_metadata, assert_files_match_metadata_of};
use crate::support::*;

/// A one-disk VM running on a chain built live: s1 froze `layers[0]` (0x11 over
/// `mib[0]` MiB at 0), s2 froze `layers[1]` (0x22 over `mib[1]` MiB at 16 MiB), and the
/// guest then wrote 0x33 over `mib[2]` MiB at 32 MiB into the active `layers[2]`.
struct LiveChain {
    vm: Uuid,
    process: RunningVm,
    s1: Uuid,
    s2: Uuid,
    layers: [String; 3],
    mib: [u64; 3],
}

async fn live_chain(app: &TestApp, run_dir: &Path, pausable: bool, mib: [u64; 3]) -> LiveChain {
    let vm = app.create_vm("live-merge", &[("root", DISK)]).await.id;
    let base = app.active_path(vm, "root").await;
    write(&base, 0x11, 0, mib[0]);
    let process = if pausable {
        RunningVm::start_pausable(run_dir, std::slice::from_ref(&base))
    } else {
        RunningVm::start(run_dir, std::slice::from_ref(&base))
    };
    mark_running(app, vm, &process).await;
    let s1 = app.snapshot(vm, "s1").await.id;
    process.write(0, 0x22, 16 * MIB, mib[1] * MIB);
    let s2 = app.snapshot(vm, "s2").await.id;
    process.write(0, 0x33, 32 * MIB, mib[2] * MIB);
    let layers = [
        app.snapshot_path(vm, s1, "root").await,
        app.snapshot_path(vm, s2, "root").await,
        app.active_path(vm, "root").await,
    ];
    LiveChain {
        vm,
        process,
        s1,
        s2,
        layers,
        mib,
    }
}

impl LiveChain {
    /// What s1, s2 and the present read, each as far as it goes.
    fn regions(&self, upto: usize) -> Vec<(u8, u64, u64)> {
        [(0x11, 0), (0x22, 16), (0x33, 32)]
            .into_iter()
            .zip(self.mib)
            .take(upto)
            .map(|((pattern, at), len)| (pattern, at, len))
            .collect()
    }
}

/// A guest that writes a MiB of its own at a time (from 48 MiB on) until told to stop,
/// or until its QEMU is gone; it returns the writes that succeeded.
fn guest_writer(process: &RunningVm) -> (Arc<AtomicBool>, JoinHandle<Vec<(u8, u64)>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::clone(&process.gate);
    let nbd = process.nbd.clone();
    let stopping = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let mut written = Vec::new();
        for n in 0..15u64 {
            if stopping.load(Ordering::Relaxed) {
                break;
            }
            let (pattern, offset) = (0x80 + n as u8, (48 + n) * MIB);
            let _running = gate.enter();
            let ok = try_guest_write(&nbd, 0, pattern, offset, MIB).is_ok();
            if !ok {
                break;
            }
            written.push((pattern, offset));
            std::thread::sleep(Duration::from_millis(30));
        }
        written
    });
    (stop, handle)
}

/// Stop the VM and check every byte: the present holds the chain's data and every
/// write the guest made, and the files are clean and as the records say.
async fn expect_present(app: &TestApp, chain: &mut LiveChain, written: &[(u8, u64)]) {
    expect_present_with(app, chain, written, &[]).await;
}

/// `expect_present` where `clones` of the VM own the other files.
async fn expect_present_with(
    app: &TestApp,
    chain: &mut LiveChain,
    written: &[(u8, u64)],
    clones: &[Uuid],
) {
    chain.process.stop();
    mark_stopped(app, chain.vm).await;
    let present = app.active_path(chain.vm, "root").await;
    expect_all(&present, &chain.regions(3));
    for &(pattern, offset) in written {
        expect_bytes(&present, pattern, offset, MIB);
    }
    for file in crate::support::chain(&present) {
        check_clean(&file);
    }
    let mut vms = vec![chain.vm];
    vms.extend_from_slice(clones);
    assert_files_match_metadata_of(app, &vms).await;
}

/// The job's detail as JSON.
fn detail(job: &JobView) -> serde_json::Value {
    serde_json::to_value(&job.detail).unwrap()
}

/// Delete `snapshot` with the guest writing throughout; the job's view and the writes.
async fn delete_under_writes(
    app: &TestApp,
    chain: &LiveChain,
    snapshot: Uuid,
) -> (JobView, Vec<(u8, u64)>) {
    let (stop, writer) = guest_writer(&chain.process);
    let job = app
        .expect_job(app.delete(&format!("/v1/snapshots/{snapshot}")).await)
        .await;
    stop.store(true, Ordering::Relaxed);
    (job, writer.join().unwrap())
}

#[tokio::test]
async fn deleting_a_middle_snapshot_of_a_running_vm_commits_inside_qemu() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let mut chain = live_chain(&app, &run_dir, false, [4, 1, 1]).await;
    // s1's layer is the bigger: s2's layer is committed down into it, under the active
    // layer (QEMU points the active layer at s1's file itself).
    let (job, written) = delete_under_writes(&app, &chain, chain.s1).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(detail(&job)["merges"][0]["action"], "commit", "{job:?}");
    let [l0, l1, l2] = chain.layers.clone();
    assert_eq!(app.snapshot_path(chain.vm, chain.s2, "root").await, l0);
    assert_eq!(app.active_path(chain.vm, "root").await, l2);
    assert_eq!(crate::support::chain(&l2), [l2.clone(), l0.clone()]);
    assert_eq!(chain.process.top_files().await, std::slice::from_ref(&l2));
    assert!(!Path::new(&l1).exists(), "s2's old layer is removed");
    expect_all(&l0, &chain.regions(2));
    expect_present(&app, &mut chain, &written).await;
}

#[tokio::test]
async fn deleting_the_newest_snapshot_pivots_the_disk_onto_it_with_the_guest_paused() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let mut chain = live_chain(&app, &run_dir, true, [1, 4, 1]).await;
    let (job, written) = delete_under_writes(&app, &chain, chain.s2).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(detail(&job)["merges"][0]["action"], "commit", "{job:?}");
    assert!(detail(&job)["paused_ms"].is_u64(), "{job:?}");
    let commands = chain.process.commands();
    let at = |name: &str| commands.iter().position(|c| c == name).unwrap();
    assert!(
        at("stop") < at("job-complete") && at("job-complete") < at("cont"),
        "{commands:?}"
    );
    assert!(!chain.process.gate.paused());
    // The disk now is s2's old layer; the old active layer is gone.
    let [l0, l1, l2] = chain.layers.clone();
    assert_eq!(app.active_path(chain.vm, "root").await, l1);
    assert_eq!(chain.process.top_files().await, std::slice::from_ref(&l1));
    assert_eq!(crate::support::chain(&l1), [l1.clone(), l0.clone()]);
    assert!(!Path::new(&l2).exists());
    expect_all(&l0, &chain.regions(1));
    expect_present(&app, &mut chain, &written).await;
}

#[tokio::test]
async fn without_a_pause_the_newest_snapshot_is_streamed_into_the_active_layer() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    // Committing would be cheaper, but this QEMU cannot pause its guest for a pivot.
    let mut chain = live_chain(&app, &run_dir, false, [1, 4, 1]).await;
    let (job, written) = delete_under_writes(&app, &chain, chain.s2).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(detail(&job)["merges"][0]["action"], "stream", "{job:?}");
    let [l0, l1, l2] = chain.layers.clone();
    assert_eq!(app.active_path(chain.vm, "root").await, l2);
    assert_eq!(crate::support::chain(&l2), [l2.clone(), l0.clone()]);
    assert!(!Path::new(&l1).exists());
    expect_all(&l0, &chain.regions(1));
    expect_present(&app, &mut chain, &written).await;
}

#[tokio::test]
async fn a_layer_qemu_has_not_open_is_dropped_without_asking_qemu() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    // Offline: s1, s2, then back to s1: s2's layer is a branch QEMU will not open.
    let vm = app.create_vm("live-drop", &[("root", DISK)]).await.id;
    write(&app.active_path(vm, "root").await, 0x11, 0, 1);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(&app.active_path(vm, "root").await, 0x22, 1, 1);
    let s2 = app.snapshot(vm, "s2").await.id;
    let branch = app.snapshot_path(vm, s2, "root").await;
    app.expect_job(
        app.post(&format!("/v1/snapshots/{s1}/revert"), json!({}))
            .await,
    )
    .await;
    let active = app.active_path(vm, "root").await;
    let process = RunningVm::start_pausable(&run_dir, std::slice::from_ref(&active));
    mark_running(&app, vm, &process).await;

    let job = app
        .expect_job(app.delete(&format!("/v1/snapshots/{s2}")).await)
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(detail(&job)["merges"][0]["action"], "drop", "{job:?}");
    assert!(!Path::new(&branch).exists());
    let commands = process.commands();
    assert!(
        !commands
            .iter()
            .any(|c| c.starts_with("block-") || c == "stop"),
        "{commands:?}"
    );
    drop(process);
    mark_stopped(&app, vm).await;
    expect_all(&active, &[(0x11, 0, 1)]);
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn deleting_every_snapshot_of_a_running_vm_collapses_each_chain_live() {
    // Committed into the base with a pivot where QEMU can pause, streamed into the
    // active layer where it cannot.
    for (pausable, action) in [(true, "commit"), (false, "stream")] {
        let (_run, run_dir) = run_dir();
        let app = spawn(&run_dir, None).await;
        let mut chain = live_chain(&app, &run_dir, pausable, [4, 1, 1]).await;
        let (stop, writer) = guest_writer(&chain.process);
        let job = app
            .expect_job(app.delete(&format!("/v1/vms/{}/snapshots", chain.vm)).await)
            .await;
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        assert_eq!(job.status, JobStatus::Succeeded, "{pausable}: {job:?}");
        assert_eq!(detail(&job)["merges"][0]["action"], action, "{job:?}");
        let present = app.active_path(chain.vm, "root").await;
        assert_eq!(
            crate::support::chain(&present),
            std::slice::from_ref(&present)
        );
        assert_eq!(
            chain.process.top_files().await,
            std::slice::from_ref(&present)
        );
        let (_, list) = app.get(&format!("/v1/vms/{}/snapshots", chain.vm)).await;
        assert_eq!(list["items"], json!([]));
        expect_present(&app, &mut chain, &written).await;
    }
}

#[tokio::test]
async fn qemu_killed_around_the_pivot_leaves_the_disk_whole() {
    // QEMU dies: while the commit copies; with the pivot asked but not yet answered;
    // right after QEMU answered it; once strata recorded the pivot, before the guest
    // runs again. The job waits for the orchestrator's word that the VM stopped, then
    // finishes offline: before the recorded pivot the old top over the base is the
    // disk, after it the base alone, and no write the guest made is lost either way.
    for (command, after_answer) in [
        ("block-commit", true),
        ("job-complete", false),
        ("job-complete", true),
        ("cont", false),
    ] {
        let (_run, run_dir) = run_dir();
        let app = spawn(&run_dir, None).await;
        let mut chain = live_chain(&app, &run_dir, true, [1, 4, 1]).await;
        chain.process.kill_on(command, after_answer);
        let (stop, writer) = guest_writer(&chain.process);
        let (status, job) = app.delete(&format!("/v1/snapshots/{}", chain.s2)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let mut waited = 0;
        while !chain.process.exited() {
            waited += 1;
            assert!(waited < 500, "{command}: QEMU was never killed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A writer the pause held finds its QEMU gone.
        stop.store(true, Ordering::Relaxed);
        chain.process.gate.open();
        let written = writer.join().unwrap();
        mark_stopped(&app, chain.vm).await;
        let job = app.wait_job(&id).await;
        assert_eq!(
            job.status,
            JobStatus::Succeeded,
            "{command}/{after_answer}: {job:?}"
        );
        assert_eq!(app.active_path(chain.vm, "root").await, chain.layers[1]);
        expect_all(&chain.layers[0], &chain.regions(1));
        expect_present(&app, &mut chain, &written).await;
    }
}

#[tokio::test]
async fn strata_killed_inside_a_live_merge_resumes_it_and_lets_the_guest_run() {
    // Inside the pivot: the guest paused; QEMU's job concluded, not recorded; recorded,
    // the guest still paused. Then the step's own journal points.
    for fault in [
        "live:started",
        "live:paused",
        "live:concluded",
        "live:recorded",
        "snapshot_delete:ran-step-0",
    ] {
        let (_run, run_dir) = run_dir();
        let mut app = spawn(&run_dir, Some(fault)).await;
        let mut chain = live_chain(&app, &run_dir, true, [1, 4, 1]).await;
        let (status, job) = app.delete(&format!("/v1/snapshots/{}", chain.s2)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        assert!(
            !app.wait_exit().success(),
            "{fault}: the fault aborts strata"
        );
        app.restart(&[("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap())])
            .await;
        let job = app.wait_job(job["id"].as_str().unwrap()).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{fault}: {job:?}");
        assert!(
            !chain.process.gate.paused(),
            "{fault}: the guest runs again"
        );
        assert_eq!(app.active_path(chain.vm, "root").await, chain.layers[1]);
        assert_eq!(chain.process.top_files().await, [chain.layers[1].clone()]);
        chain.process.write(0, 0x44, 8 * MIB, MIB);
        expect_present(&app, &mut chain, &[(0x44, 8 * MIB)]).await;
    }
}

#[tokio::test]
async fn a_schedule_prunes_the_snapshots_of_a_running_vm_live() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let vm = app.create_vm("live-prune", &[("root", DISK)]).await.id;
    let base = app.active_path(vm, "root").await;
    write(&base, 0x11, 0, 2);
    let process = RunningVm::start_pausable(&run_dir, std::slice::from_ref(&base));
    mark_running(&app, vm, &process).await;
    let (status, schedule) = app
        .post(
            "/v1/schedules",
            json!({"name": "hourly", "vm_id": vm, "cron": "@hourly", "retention": {"keep_last": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    let id = schedule["id"].as_str().unwrap().to_owned();
    // Two runs; the second one's retention prunes the first snapshot, live.
    let mut taken = Vec::new();
    for pattern in [0x22u8, 0x33] {
        let (status, run) = app
            .post(&format!("/v1/schedules/{id}/run"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let job = app
            .wait_job(run["targets"][0]["job_id"].as_str().unwrap())
            .await;
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        taken.push(job.target.id);
        let mut waited = 0;
        while app.get(&format!("/v1/schedules/{id}/runs")).await.1["items"][0]["status"]
            == "running"
        {
            waited += 1;
            assert!(waited < 600, "the run never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process.write(0, pattern, 16 * MIB, MIB);
    }
    let mut waited = 0;
    loop {
        let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
        let (_, jobs) = app.get("/v1/jobs?status=running").await;
        let (_, queued) = app.get("/v1/jobs?status=queued").await;
        let idle = jobs["items"].as_array().unwrap().is_empty()
            && queued["items"].as_array().unwrap().is_empty();
        if list["items"].as_array().unwrap().len() == 1 && idle {
            assert_eq!(list["items"][0]["id"], taken[1].to_string(), "{list}");
            break;
        }
        waited += 1;
        assert!(waited < 600, "the prune never ran: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(process.commands().iter().any(|c| c.starts_with("block-")));
    // The snapshot kept reads what the guest wrote before it; the present all of it.
    let kept = app.snapshot_path(vm, taken[1], "root").await;
    let present = app.active_path(vm, "root").await;
    drop(process);
    mark_stopped(&app, vm).await;
    expect_all(&kept, &[(0x11, 0, 2), (0x22, 16, 1)]);
    expect_all(&present, &[(0x11, 0, 2), (0x33, 16, 1)]);
    check_clean(&present);
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn a_revert_of_a_running_vm_is_refused_even_with_a_qmp_socket() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let chain = live_chain(&app, &run_dir, true, [1, 1, 1]).await;
    let files = app.volume_files();
    let problem = app
        .expect_problem(
            Method::POST,
            &format!("/v1/snapshots/{}/revert", chain.s1),
            Some(json!({})),
            StatusCode::CONFLICT,
            "vm_running",
        )
        .await;
    assert!(
        problem.detail.contains("cannot be done live"),
        "{}",
        problem.detail
    );
    assert_eq!(app.volume_files(), files);
    assert_eq!(app.active_path(chain.vm, "root").await, chain.layers[2]);
}

#[tokio::test]
async fn a_linked_clone_of_a_running_vms_present_switches_the_source_onto_a_new_layer() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let mut chain = live_chain(&app, &run_dir, true, [1, 1, 1]).await;
    let (stop, writer) = guest_writer(&chain.process);
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{}/clone", chain.vm),
                json!({"name": "live-linked", "mode": "linked"}),
            )
            .await,
        )
        .await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    // The source writes into a new layer on its old active one, which the clone reads.
    let shared = chain.layers[2].clone();
    let source_now = app.active_path(chain.vm, "root").await;
    assert_ne!(source_now, shared);
    assert_eq!(
        chain.process.top_files().await,
        std::slice::from_ref(&source_now)
    );
    let clone = job.target.id;
    let clone_path = app.active_path(clone, "root").await;
    assert_eq!(crate::support::chain(&clone_path)[1], shared);
    // The clone shows the source as it was at the switch: the chain's data, and some
    // prefix of the guest's writes.
    expect_all(&clone_path, &chain.regions(3));
    let (_, snapshots) = app.get(&format!("/v1/vms/{}/snapshots", chain.vm)).await;
    assert_eq!(snapshots["items"].as_array().unwrap().len(), 2);
    chain.process.stop();
    mark_stopped(&app, chain.vm).await;
    expect_all(&source_now, &chain.regions(3));
    for &(pattern, offset) in &written {
        expect_bytes(&source_now, pattern, offset, MIB);
    }
    check_clean(&source_now);
    check_clean(&clone_path);
    assert_files_match_metadata_of(&app, &[chain.vm, clone]).await;
}

/// Start a full clone of the running VM of `chain` (202).
async fn start_full_clone(app: &TestApp, chain: &LiveChain) -> String {
    let (status, job) = app
        .post(
            &format!("/v1/vms/{}/clone", chain.vm),
            json!({"name": "live-full", "mode": "full"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    job["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_full_clone_of_a_running_vm_is_a_copy_of_one_instant_made_by_qemu() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let mut chain = live_chain(&app, &run_dir, false, [1, 1, 1]).await;
    let (stop, writer) = guest_writer(&chain.process);
    let job = app.wait_job(start_full_clone(&app, &chain).await).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let clone = job.target.id;
    let copy = app.active_path(clone, "root").await;
    assert_eq!(crate::support::chain(&copy), std::slice::from_ref(&copy));
    // The source is untouched; the copy holds the chain, and of the guest's writes
    // exactly a prefix: the ones QEMU had before the instant of the copy.
    assert_eq!(app.active_path(chain.vm, "root").await, chain.layers[2]);
    expect_all(&copy, &chain.regions(3));
    let mut copied = true;
    for &(pattern, offset) in &written {
        let has = try_expect_bytes(&copy, &[(pattern, offset, MIB)]).is_ok();
        assert!(has || try_expect_bytes(&copy, &[(0, offset, MIB)]).is_ok());
        assert!(
            copied || !has,
            "the copy is not of one instant: {written:?}"
        );
        copied = has;
    }
    check_clean(&copy);
    expect_present_with(&app, &mut chain, &written, &[clone]).await;
}

#[tokio::test]
async fn a_cancelled_or_interrupted_live_full_clone_leaves_nothing_or_finishes() {
    let (_run, run_dir) = run_dir();
    // Cancelled while QEMU copies: its jobs and nodes go, and the new files.
    let app = spawn(&run_dir, Some("live:copying:pause=1500")).await;
    let chain = live_chain(&app, &run_dir, false, [1, 1, 1]).await;
    let files = app.volume_files();
    let id = start_full_clone(&app, &chain).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = app.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = app.wait_job(&id).await;
    assert_eq!(job.status, JobStatus::Cancelled, "{job:?}");
    assert_eq!(app.volume_files(), files);
    let mut qmp = strata::qemu::qmp::Qmp::connect(&chain.process.qmp, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(qmp.jobs().await.unwrap().is_empty());
    // QEMU reads only the source's files again (the live snapshots' overlay nodes are
    // named strata-* too).
    let known: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    for node in qmp.block_nodes().await.unwrap() {
        let file = node.image.file_name();
        assert!(known.contains(&file), "{file} not in {known:?}");
    }
    drop(qmp);
    drop(chain);
    drop(app);

    // strata killed while QEMU copies: the restarted job finds QEMU's jobs and ends.
    let (_run, run_dir) = crate::live::run_dir();
    let mut app = spawn(&run_dir, Some("live:copying")).await;
    let mut chain = live_chain(&app, &run_dir, false, [1, 1, 1]).await;
    let id = start_full_clone(&app, &chain).await;
    assert!(!app.wait_exit().success());
    app.restart(&[("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap())])
        .await;
    let job = app.wait_job(&id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let copy = app.active_path(job.target.id, "root").await;
    expect_all(&copy, &chain.regions(3));
    check_clean(&copy);
    expect_present_with(&app, &mut chain, &[], &[job.target.id]).await;
}

#[tokio::test]
async fn a_pivot_cancelled_by_another_client_is_not_taken_for_one() {
    // Someone else cancels the ready commit where strata asked for the pivot: QEMU ends
    // the job without an error and without switching. strata sees from the graph that
    // nothing pivoted, lets the guest run, and starts the commit again.
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let mut chain = live_chain(&app, &run_dir, true, [1, 4, 1]).await;
    chain.process.cancel_next_completion();
    let (job, written) = delete_under_writes(&app, &chain, chain.s2).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let commands = chain.process.commands();
    let commits = commands.iter().filter(|c| *c == "block-commit").count();
    assert_eq!(commits, 2, "{commands:?}");
    assert!(!chain.process.gate.paused());
    assert_eq!(app.active_path(chain.vm, "root").await, chain.layers[1]);
    assert_eq!(
        chain.process.top_files().await,
        std::slice::from_ref(&chain.layers[1])
    );
    expect_present(&app, &mut chain, &written).await;
}

#[tokio::test]
async fn a_first_merge_qemu_refuses_changes_nothing() {
    // QEMU refuses the commit that starts the deletion: the job fails, undone, and the
    // snapshot, its layers and the present are as they were.
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let mut chain = live_chain(&app, &run_dir, true, [4, 1, 1]).await;
    chain.process.refuse_next("block-commit");
    let files = app.volume_files();
    let (status, job) = app.delete(&format!("/v1/snapshots/{}", chain.s1)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job = app.wait_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let error = job.error.as_ref().unwrap();
    assert!(error.message.contains("refused by the test"), "{job:?}");
    let snapshot = app.get_snapshot(chain.s1).await;
    assert_eq!(snapshot.status, ResourceStatus::Ready, "{snapshot:?}");
    assert_eq!(app.volume_files(), files);
    assert_eq!(app.active_path(chain.vm, "root").await, chain.layers[2]);
    expect_all(&chain.layers[0], &chain.regions(1));
    expect_present(&app, &mut chain, &[]).await;
}
