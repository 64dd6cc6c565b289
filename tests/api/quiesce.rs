//! File-system-consistent live snapshots: the guest agent (a double: a real qemu-ga
//! must never run on the host) freezes the guest's file systems around the switch.
//! The double's hooks write through the VM's NBD export as the guest would: its last
//! write before the freeze must land in the snapshot, its first after the thaw in the
//! present, which proves the switch fell inside the freeze.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use reqwest::StatusCode;
use serde_json::json;
use strata::domain::{JobStatus, SnapshotConsistency};

use crate::guest_agent::{AgentDouble, Behaviour};
use crate::live::{MIB, RunningVm, guest_write, mark_stopped, run_dir, running_vm, spawn};
use crate::recovery::assert_files_match_metadata;
use crate::support::*;

const FREEZE: &str = "guest-fsfreeze-freeze";
const THAW: &str = "guest-fsfreeze-thaw";

/// A guest agent for the VM, given to strata; the guest writes 0xa1 over root's
/// fourth MiB as it freezes and 0xb2 over it once thawed.
async fn agent_for(
    app: &TestApp,
    vm: impl std::fmt::Display,
    run_dir: &Path,
    process: &RunningVm,
) -> AgentDouble {
    let agent = AgentDouble::start(run_dir);
    let (status, body) = app
        .patch(
            &format!("/v1/vms/{vm}"),
            json!({"guest_agent_socket": agent.socket}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (command, pattern) in [(FREEZE, 0xa1), (THAW, 0xb2)] {
        let nbd = process.nbd.clone();
        agent.on(command, move || guest_write(&nbd, 0, pattern, 4 * MIB, MIB));
    }
    agent
}

/// The position of the first call of `command`, which must have been made.
fn called(agent: &AgentDouble, command: &str) -> usize {
    let calls = agent.calls();
    calls
        .iter()
        .position(|c| c == command)
        .unwrap_or_else(|| panic!("no {command} in {calls:?}"))
}

async fn post_snapshot(
    app: &TestApp,
    vm: impl std::fmt::Display,
    body: serde_json::Value,
) -> JobView {
    let (status, job) = app.post(&format!("/v1/vms/{vm}/snapshots"), body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    app.wait_job(job["id"].as_str().unwrap()).await
}

#[tokio::test]
async fn a_guest_with_an_agent_is_frozen_for_the_switch_and_thawed_after() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "quiesced").await;
    let agent = agent_for(&app, vm, &run_dir, &process).await;
    let old_root = app.active_path(vm, "root").await;

    // No consistency asked: a VM with a guest agent is frozen by default.
    let job = post_snapshot(&app, vm, json!({"name": "frozen"})).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let detail = job.detail.as_ref().unwrap();
    assert_eq!(detail.consistency, Some(SnapshotConsistency::Filesystem));
    assert!(detail.frozen_ms.is_some(), "{job:?}");
    assert!(detail.quiesce_error.is_none() && detail.thaw_error.is_none());
    let snapshot = app.get_snapshot(job.target.id).await;
    assert_eq!(snapshot.consistency, SnapshotConsistency::Filesystem);
    assert!(called(&agent, FREEZE) < called(&agent, THAW));
    assert!(!agent.frozen());

    let new_root = app.active_path(vm, "root").await;
    process.stop();
    // The write made as the guest froze is in the snapshot; the one made once it was
    // thawed only in the present.
    expect_all(&old_root, &[(0x11, 0, 1), (0xa1, 4, 1)]);
    expect_all(&new_root, &[(0x11, 0, 1), (0xb2, 4, 1)]);
    check_clean(&new_root);
}

#[tokio::test]
async fn a_required_freeze_that_fails_fails_the_job_and_changes_nothing() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "must-freeze").await;
    let agent = agent_for(&app, vm, &run_dir, &process).await;
    agent.set(FREEZE, Behaviour::Fail);
    let actives = process.top_files().await;
    let files_before = app.volume_files();

    let body = json!({"name": "s", "consistency": "filesystem", "quiesce": "required"});
    let job = post_snapshot(&app, vm, body).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let error = job.error.as_ref().unwrap();
    assert_eq!(error.code, "quiesce_failed", "{job:?}");
    assert!(error.message.contains("refused by the test"), "{job:?}");
    // Thawed all the same, and nothing changed: no snapshot, no file, no node.
    assert!(called(&agent, FREEZE) < called(&agent, THAW));
    let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
    assert_eq!(list["items"], json!([]));
    assert_eq!(app.volume_files(), files_before);
    assert_eq!(process.top_files().await, actives);
    process.stop();
    mark_stopped(&app, vm).await;
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn a_best_effort_freeze_that_times_out_gives_a_crash_consistent_snapshot_and_a_thaw() {
    let (_run, run_dir) = run_dir();
    let app = TestApp::spawn_with(&[
        ("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap()),
        ("STRATA_FREEZE_TIMEOUT", "1"),
    ])
    .await;
    app.wait_ready().await;
    let (vm, mut process) = running_vm(&app, &run_dir, "stuck-guest").await;
    let agent = agent_for(&app, vm, &run_dir, &process).await;
    // A guest stuck in its freeze hook never answers.
    agent.set(FREEZE, Behaviour::Hang);

    let job = post_snapshot(&app, vm, json!({"name": "s", "quiesce": "best_effort"})).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let detail = job.detail.as_ref().unwrap();
    assert_eq!(detail.consistency, Some(SnapshotConsistency::Crash));
    assert!(detail.frozen_ms.is_none(), "{job:?}");
    let reason = detail.quiesce_error.as_deref().unwrap_or_default();
    assert!(reason.contains("did not answer"), "{job:?}");
    let snapshot = app.get_snapshot(job.target.id).await;
    assert_eq!(snapshot.consistency, SnapshotConsistency::Crash);
    // The thaw is sent even though the freeze never answered.
    assert!(called(&agent, FREEZE) < called(&agent, THAW));
    process.stop();
}

#[tokio::test]
async fn consistency_is_checked_at_accept_and_recorded_on_every_snapshot() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "no-agent").await;
    let path = format!("/v1/vms/{vm}/snapshots");
    let before = app.volume_files();
    // A freeze that must happen cannot without an agent; quiesce means nothing
    // without a freeze.
    let refusals = [
        (
            json!({"name": "s", "consistency": "filesystem", "quiesce": "required"}),
            StatusCode::CONFLICT,
            "guest_agent_unavailable",
        ),
        (
            json!({"name": "s", "consistency": "crash", "quiesce": "best_effort"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            json!({"name": "s", "consistency": "app"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
    ];
    for (body, status, code) in refusals {
        app.expect_problem(reqwest::Method::POST, &path, Some(body), status, code)
            .await;
    }
    assert_eq!(app.volume_files(), before);
    let (_, jobs) = app
        .get(&format!("/v1/jobs?vm_id={vm}&kind=snapshot_create"))
        .await;
    assert_eq!(jobs["items"], json!([]), "{jobs}");

    // Without an agent, a running VM's snapshot is crash-consistent (a best-effort
    // filesystem request says why); a stopped VM's is `stopped`.
    let job = post_snapshot(&app, vm, json!({"name": "crash"})).await;
    let detail = job.detail.as_ref().unwrap();
    assert_eq!(detail.consistency, Some(SnapshotConsistency::Crash));
    assert!(detail.quiesce_error.is_none(), "{job:?}");
    let job = post_snapshot(&app, vm, json!({"name": "fs", "consistency": "filesystem"})).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let detail = job.detail.as_ref().unwrap();
    assert_eq!(detail.consistency, Some(SnapshotConsistency::Crash));
    assert!(
        detail
            .quiesce_error
            .as_deref()
            .unwrap()
            .contains("no guest-agent socket")
    );
    process.stop();
    mark_stopped(&app, vm).await;
    let stopped = app.snapshot(vm, "offline").await;
    assert_eq!(stopped.consistency, SnapshotConsistency::Stopped);
}

#[tokio::test]
async fn strata_killed_while_the_guest_is_frozen_thaws_it_on_restart_and_keeps_the_snapshot() {
    // `frozen`: strata is killed as the guest freezes (the guest frozen, nothing
    // switched): the restart thaws it first, and the resumed switch freezes again.
    // `ran-step-3`: the switch done and the guest thawed, its journal entry not: the
    // restart keeps the consistency the switch recorded.
    for point in ["frozen", "ran-step-3"] {
        let (_run, run_dir) = run_dir();
        let fault = format!("snapshot_create:{point}");
        let mut app = spawn(&run_dir, (point != "frozen").then_some(fault.as_str())).await;
        let (vm, mut process) = running_vm(&app, &run_dir, "frozen-crash").await;
        let agent = agent_for(&app, vm, &run_dir, &process).await;
        if point == "frozen" {
            let pid = app.pid().unwrap();
            let killed = Arc::new(AtomicBool::new(false));
            agent.on(FREEZE, move || {
                if !killed.swap(true, Ordering::SeqCst) {
                    kill_process(pid);
                }
            });
        }
        let old_root = app.active_path(vm, "root").await;
        let (status, job) = app
            .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s"}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        assert!(!app.wait_exit().success(), "{point}: strata died");

        app.restart(&[("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap())])
            .await;
        let job = app.wait_job(job["id"].as_str().unwrap()).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{point}: {job:?}");
        assert!(!agent.frozen(), "{point}: thawed after the restart");
        let calls: Vec<String> = agent
            .calls()
            .into_iter()
            .filter(|c| c == FREEZE || c == THAW)
            .collect();
        let expected = match point {
            // Frozen when strata died; thawed at start; frozen and thawed again.
            "frozen" => [FREEZE, THAW, FREEZE, THAW].as_slice(),
            // Frozen and thawed; thawed again at start and by the resumed switch.
            _ => [FREEZE, THAW, THAW, THAW].as_slice(),
        };
        assert_eq!(calls, expected, "{point}");
        let snapshot = app.get_snapshot(job.target.id).await;
        assert_eq!(
            snapshot.consistency,
            SnapshotConsistency::Filesystem,
            "{point}"
        );
        let new_root = app.active_path(vm, "root").await;
        assert_eq!(process.top_files().await[0], new_root, "{point}");
        process.stop();
        expect_all(&old_root, &[(0x11, 0, 1), (0xa1, 4, 1)]);
        expect_all(&new_root, &[(0x11, 0, 1), (0xb2, 4, 1)]);
        check_clean(&new_root);
        mark_stopped(&app, vm).await;
        assert_files_match_metadata(&app, vm).await;
    }
}

#[tokio::test]
async fn a_schedule_asks_every_snapshot_for_its_consistency_and_skips_a_vm_it_cannot_freeze() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (with_agent, without_agent) = (run_dir.join("a"), run_dir.join("b"));
    std::fs::create_dir(&with_agent).unwrap();
    std::fs::create_dir(&without_agent).unwrap();
    let (frozen, mut frozen_process) = running_vm(&app, &with_agent, "db-1").await;
    let agent = agent_for(&app, frozen, &with_agent, &frozen_process).await;
    let (bare, mut bare_process) = running_vm(&app, &without_agent, "db-2").await;
    for vm in [frozen, bare] {
        let (status, body) = app
            .patch(&format!("/v1/vms/{vm}"), json!({"labels": {"tier": "db"}}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, schedule) = app
        .post(
            "/v1/schedules",
            json!({"name": "db-hourly", "selector": "tier=db", "cron": "@hourly",
                   "consistency": "filesystem", "quiesce": "required"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    assert_eq!(
        (&schedule["consistency"], &schedule["quiesce"]),
        (&json!("filesystem"), &json!("required"))
    );
    let path = format!("/v1/schedules/{}", schedule["id"].as_str().unwrap());

    let (status, run) = app.post(&format!("{path}/run"), json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    for target in run["targets"].as_array().unwrap() {
        if target["vm_id"] == json!(frozen) {
            assert_eq!(target["outcome"], "queued", "{run}");
            let job = app.wait_job(target["job_id"].as_str().unwrap()).await;
            assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
            let snapshot = app.get_snapshot(job.target.id).await;
            assert_eq!(snapshot.consistency, SnapshotConsistency::Filesystem);
        } else {
            assert_eq!(target["outcome"], "skipped", "{run}");
            assert_eq!(target["code"], "guest_agent_unavailable", "{run}");
        }
    }
    assert!(called(&agent, FREEZE) < called(&agent, THAW));

    // Back to each VM's default; a quiesce without a freeze is refused.
    let (status, body) = app
        .patch(&path, json!({"consistency": null, "quiesce": null}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["consistency"], &body["quiesce"]),
        (&json!(null), &json!(null))
    );
    app.expect_problem(
        reqwest::Method::PATCH,
        &path,
        Some(json!({"consistency": "crash", "quiesce": "required"})),
        StatusCode::BAD_REQUEST,
        "validation_failed",
    )
    .await;
    frozen_process.stop();
    bare_process.stop();
}

async fn post_clone(app: &TestApp, vm: impl std::fmt::Display, body: serde_json::Value) -> JobView {
    let (status, job) = app.post(&format!("/v1/vms/{vm}/clone"), body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    app.wait_job(job["id"].as_str().unwrap()).await
}

#[tokio::test]
async fn clones_of_a_running_vms_present_freeze_the_guest_around_their_instant() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "quiesced-source").await;
    let agent = agent_for(&app, vm, &run_dir, &process).await;

    // A linked clone, frozen by default (the VM has an agent), and a full clone that
    // requires the freeze: each holds the write the guest made as it froze, not the
    // one it made once thawed.
    let linked = post_clone(&app, vm, json!({"name": "linked", "mode": "linked"})).await;
    let full_body = json!({"name": "full", "mode": "full", "quiesce": "required"});
    let full = post_clone(&app, vm, full_body).await;
    for job in [&linked, &full] {
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        let detail = job.detail.as_ref().unwrap();
        assert_eq!(detail.consistency, Some(SnapshotConsistency::Filesystem));
        assert!(detail.frozen_ms.is_some(), "{job:?}");
    }
    let calls = agent.calls();
    let freezes: Vec<usize> = (0..calls.len()).filter(|&i| calls[i] == FREEZE).collect();
    let thaws: Vec<usize> = (0..calls.len()).filter(|&i| calls[i] == THAW).collect();
    assert_eq!((freezes.len(), thaws.len()), (2, 2), "{calls:?}");
    assert!(freezes[0] < thaws[0] && thaws[0] < freezes[1] && freezes[1] < thaws[1]);
    assert!(!agent.frozen());

    process.stop();
    mark_stopped(&app, vm).await;
    for job in [&linked, &full] {
        let clone = job.target.id;
        let root = app.active_path(clone, "root").await;
        expect_all(&root, &[(0x11, 0, 1), (0xa1, 4, 1)]);
        check_clean(&root);
    }
    let present = app.active_path(vm, "root").await;
    expect_all(&present, &[(0x11, 0, 1), (0xb2, 4, 1)]);
    crate::recovery::assert_files_match_metadata_of(&app, &[vm, linked.target.id, full.target.id])
        .await;
}

#[tokio::test]
async fn a_clone_whose_required_freeze_fails_makes_nothing_and_a_snapshots_clone_takes_no_consistency()
 {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "clone-must-freeze").await;
    let agent = agent_for(&app, vm, &run_dir, &process).await;
    agent.set(FREEZE, Behaviour::Fail);
    let files_before = app.volume_files();

    let body = json!({"name": "full", "mode": "full", "quiesce": "required"});
    let job = post_clone(&app, vm, body).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    assert_eq!(
        job.error.as_ref().unwrap().code,
        "quiesce_failed",
        "{job:?}"
    );
    assert!(called(&agent, FREEZE) < called(&agent, THAW));
    assert!(!agent.frozen());
    let (status, _) = app.get(&format!("/v1/vms/{}", job.target.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(app.volume_files(), files_before);

    // A snapshot's layers never change: asking for a consistency is a contradiction.
    agent.set(FREEZE, Behaviour::Answer);
    let snapshot = post_snapshot(&app, vm, json!({"name": "s", "consistency": "crash"})).await;
    assert_eq!(snapshot.status, JobStatus::Succeeded, "{snapshot:?}");
    let body = json!({"name": "c", "mode": "linked", "snapshot_id": snapshot.target.id, "consistency": "filesystem"});
    let reply = send_json(
        &app,
        reqwest::Method::POST,
        &format!("/v1/vms/{vm}/clone"),
        &body,
    )
    .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "validation_failed");
    let (_, vms) = app.get("/v1/vms").await;
    assert_eq!(vms["items"].as_array().unwrap().len(), 1, "{vms}");
    process.stop();
    mark_stopped(&app, vm).await;
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn a_live_full_clone_whose_thaw_fails_waits_and_finishes_once_the_guest_thaws() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "thaw-fails").await;
    let agent = agent_for(&app, vm, &run_dir, &process).await;
    agent.set(THAW, Behaviour::Fail);

    let body = json!({"name": "full", "mode": "full", "quiesce": "required"});
    let (status, job) = app.post(&format!("/v1/vms/{vm}/clone"), body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    // The copy started under the freeze, but the guest cannot be thawed: the job waits
    // (it neither ends nor throws the copy away), and says why.
    let mut waited = 0;
    let view = loop {
        let view = app.job(&id).await;
        let thaw_error = view.detail.as_ref().and_then(|d| d.thaw_error.clone());
        if thaw_error.is_some() {
            break view;
        }
        assert!(waited < 300, "no thaw_error: {view:?}");
        waited += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(view.status, JobStatus::Running, "{view:?}");
    assert!(agent.frozen());

    agent.set(THAW, Behaviour::Answer);
    let done = app.wait_job(&id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert!(!agent.frozen());
    assert!(
        done.detail.as_ref().unwrap().thaw_error.is_none(),
        "{done:?}"
    );
    process.stop();
    mark_stopped(&app, vm).await;
    let root = app.active_path(done.target.id, "root").await;
    expect_all(&root, &[(0x11, 0, 1), (0xa1, 4, 1)]);
    crate::recovery::assert_files_match_metadata_of(&app, &[vm, done.target.id]).await;
}
