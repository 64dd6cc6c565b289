//! Crash recovery: the service is aborted (like kill -9) at journal points of a job,
//! restarted over the same data directory, and must finish or roll back the job so
//! that metadata and files agree and no snapshot's bytes are lost.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

const DISK: u64 = 64 * MIB;

/// Two disks, snapshots s1 and s2 in turn, and a small present layer on top.
async fn two_disk_chain(app: &TestApp) -> (Uuid, Uuid, Uuid) {
    let vm = app
        .create_vm("crashy", &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(app.active_path(vm, "root").await, 0x11, 0, 8);
    write(app.active_path(vm, "data").await, 0x61, 0, 8);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x22, 1, 1);
    write(app.active_path(vm, "data").await, 0x62, 1, 1);
    let s2 = app.snapshot(vm, "s2").await.id;
    write(app.active_path(vm, "root").await, 0x33, 2, 1);
    write(app.active_path(vm, "data").await, 0x63, 2, 1);
    (vm, s1, s2)
}

async fn assert_two_disk_present(app: &TestApp, vm: Uuid) {
    let root = app.active_path(vm, "root").await;
    let data = app.active_path(vm, "data").await;
    expect_all(
        &root,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 1), (0x11, 3, 5)],
    );
    expect_all(
        &data,
        &[(0x61, 0, 1), (0x62, 1, 1), (0x63, 2, 1), (0x61, 3, 5)],
    );
    check_clean(&root);
    check_clean(&data);
}

/// Every file in volumes/ belongs to some chain the API shows, and every chain opens.
pub(crate) async fn assert_files_match_metadata(app: &TestApp, vm: Uuid) {
    let known = known_files(app, vm, true).await;
    assert_files_are(app, known);
}

/// `assert_files_match_metadata` for the files of several VMs (a source and its linked
/// clones, whose chains go on into the source's files).
pub(crate) async fn assert_files_match_metadata_of(app: &TestApp, vms: &[Uuid]) {
    let mut known: Vec<String> = Vec::new();
    for &vm in vms {
        known.extend(known_files(app, vm, false).await);
    }
    assert_files_are(app, known);
}

/// The files in volumes/ are exactly `known`.
fn assert_files_are(app: &TestApp, mut known: Vec<String>) {
    known.sort();
    known.dedup();
    let on_disk: Vec<String> = app
        .volume_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(
        on_disk, known,
        "files on disk differ from what the metadata references"
    );
}

/// The files the API shows for `vm` (its disks' chains and its snapshots' layers),
/// each checked to open.
async fn known_files(app: &TestApp, vm: Uuid, own_chain_only: bool) -> Vec<String> {
    let view = app.vm(vm).await;
    let mut known: Vec<String> = Vec::new();
    for disk in &view.disks {
        // The view lists the VM's own layers; a linked clone's file chain goes on into
        // its source's, which are checked as the source's.
        let files = chain(disk.path());
        let own: Vec<&String> = disk.chain.iter().map(|e| &e.path).collect();
        assert!(files.len() >= own.len(), "{disk:?}");
        assert_eq!(
            files[..own.len()].iter().collect::<Vec<_>>(),
            own,
            "{disk:?}"
        );
        if own_chain_only {
            assert_eq!(files.len(), own.len(), "{disk:?}");
        }
        for entry in &disk.chain {
            known.push(entry.path.clone());
            assert_eq!(entry.status, VolumeStatus::Ready, "{entry:?}");
        }
    }
    let list: SnapshotList = app.get_as(&format!("/v1/vms/{vm}/snapshots")).await;
    for snapshot in &list.items {
        assert_eq!(snapshot.status, ResourceStatus::Ready, "{snapshot:?}");
        for volume in &snapshot.volumes {
            let path = &volume.path;
            assert!(exists(path), "snapshot layer {path} is missing");
            chain(path);
            known.push(path.clone());
        }
    }
    known
}

/// Wait for the injected abort, then start a new process over the same data.
async fn restart_after_crash(app: &mut TestApp) {
    let status = app.wait_exit();
    assert!(!status.success(), "the injected fault aborts the process");
    app.restart(&[]).await;
}

#[tokio::test]
async fn a_crash_at_any_point_of_a_snapshot_delete_is_finished_at_the_next_start() {
    // Commit direction on two disks: steps are commit(root), commit(data), then the
    // metadata switch; each point is a different state of the journal.
    for point in ["planned", "after-step-0", "after-step-1", "committed"] {
        let mut app =
            TestApp::spawn_with(&[("STRATA_FAULT", &format!("snapshot_delete:{point}"))]).await;
        let (vm, s1, s2) = two_disk_chain(&app).await;
        let job = app
            .accept(Method::DELETE, &format!("/v1/snapshots/{s1}"), None)
            .await;
        restart_after_crash(&mut app).await;

        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{point}: {job:?}");
        assert_eq!(
            job.merges()[0].action,
            MergeAction::Commit,
            "{point}: {job:?}"
        );
        let (status, _) = app.get(&format!("/v1/snapshots/{s1}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{point}");
        assert_two_disk_present(&app, vm).await;
        expect_all(
            app.snapshot_path(vm, s2, "root").await,
            &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 6)],
        );
        expect_all(
            app.snapshot_path(vm, s2, "data").await,
            &[(0x61, 0, 1), (0x62, 1, 1), (0x61, 2, 6)],
        );
        assert_files_match_metadata(&app, vm).await;
    }
}

#[tokio::test]
async fn a_crash_during_a_streaming_delete_is_finished_at_the_next_start() {
    for point in ["after-step-0", "committed"] {
        let mut app =
            TestApp::spawn_with(&[("STRATA_FAULT", &format!("snapshot_delete:{point}"))]).await;
        let vm = app.create_vm("stream-crash", &[("root", DISK)]).await.id;
        write(app.active_path(vm, "root").await, 0x11, 0, 1);
        let s1 = app.snapshot(vm, "s1").await.id;
        write(app.active_path(vm, "root").await, 0x22, 1, 16);
        let s2 = app.snapshot(vm, "s2").await.id;
        let job = app
            .accept(Method::DELETE, &format!("/v1/snapshots/{s1}"), None)
            .await;
        restart_after_crash(&mut app).await;

        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{point}: {job:?}");
        assert_eq!(
            job.merges()[0].action,
            MergeAction::Stream,
            "{point}: {job:?}"
        );
        expect_all(
            app.snapshot_path(vm, s2, "root").await,
            &[(0x11, 0, 1), (0x22, 1, 16)],
        );
        expect_all(
            app.active_path(vm, "root").await,
            &[(0x11, 0, 1), (0x22, 1, 16)],
        );
        assert_files_match_metadata(&app, vm).await;
    }
}

#[tokio::test]
async fn a_crash_while_taking_a_snapshot_leaves_either_the_snapshot_or_nothing() {
    for point in ["planned", "after-step-0", "committed"] {
        let mut app =
            TestApp::spawn_with(&[("STRATA_FAULT", &format!("snapshot_create:{point}"))]).await;
        let vm = app
            .create_vm("create-crash", &[("root", DISK), ("data", DISK)])
            .await
            .id;
        write(app.active_path(vm, "root").await, 0x11, 0, 2);
        write(app.active_path(vm, "data").await, 0x61, 0, 2);
        let job = app
            .accept(
                Method::POST,
                &format!("/v1/vms/{vm}/snapshots"),
                Some(json!({"name": "s1"})),
            )
            .await;
        restart_after_crash(&mut app).await;

        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{point}: {job:?}");
        let snapshot = job.target.id;
        expect(app.snapshot_path(vm, snapshot, "root").await, 0x11, 0, 2);
        let root = app.active_path(vm, "root").await;
        assert_eq!(chain(&root).len(), 2);
        expect(&root, 0x11, 0, 2);
        expect(app.active_path(vm, "data").await, 0x61, 0, 2);
        assert_files_match_metadata(&app, vm).await;
    }
}

#[tokio::test]
async fn a_crash_during_a_revert_or_a_delete_all_is_finished_at_the_next_start() {
    for (kind, point) in [
        ("snapshot_revert", "after-step-0"),
        ("snapshot_revert", "committed"),
        ("snapshot_delete_all", "planned"),
        ("snapshot_delete_all", "committed"),
    ] {
        let mut app = TestApp::spawn_with(&[("STRATA_FAULT", &format!("{kind}:{point}"))]).await;
        let (vm, s1, _s2) = two_disk_chain(&app).await;
        let job = if kind == "snapshot_revert" {
            let revert = format!("/v1/snapshots/{s1}/revert");
            app.accept(Method::POST, &revert, Some(json!({}))).await
        } else {
            let snapshots = format!("/v1/vms/{vm}/snapshots");
            app.accept(Method::DELETE, &snapshots, None).await
        };
        restart_after_crash(&mut app).await;
        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{kind} {point}: {job:?}");
        if kind == "snapshot_revert" {
            expect_all(app.active_path(vm, "root").await, &[(0x11, 0, 8)]);
            expect_all(app.active_path(vm, "data").await, &[(0x61, 0, 8)]);
        } else {
            assert_two_disk_present(&app, vm).await;
            assert_eq!(app.volume_files().len(), 2, "{kind} {point}");
        }
        assert_files_match_metadata(&app, vm).await;
    }
}

#[tokio::test]
async fn killing_the_service_while_qemu_img_merges_loses_nothing() {
    let mut app = TestApp::spawn().await;
    let vm = app.create_vm("kill-9", &[("root", 1024 * MIB)]).await.id;
    write(app.active_path(vm, "root").await, 0x11, 0, 384);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x22, 64, 320);
    let s2 = app.snapshot(vm, "s2").await.id;
    write(app.active_path(vm, "root").await, 0x33, 0, 1);
    let job = app
        .accept(Method::DELETE, &format!("/v1/snapshots/{s1}"), None)
        .await;
    // Kill as soon as the plan is journaled, i.e. while the commit copies data (the
    // exact moment varies from run to run; every moment must be safe).
    for _ in 0..400 {
        let current = app.job(job.id).await;
        if current.detail.is_some() || current.status.is_terminal() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    app.kill();
    app.restart(&[]).await;

    let job = app.wait_job(job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    expect_all(
        app.active_path(vm, "root").await,
        &[(0x33, 0, 1), (0x11, 1, 63), (0x22, 64, 320)],
    );
    expect_all(
        app.snapshot_path(vm, s2, "root").await,
        &[(0x11, 0, 64), (0x22, 64, 320)],
    );
    check_clean(app.active_path(vm, "root").await);
    assert_files_match_metadata(&app, vm).await;
}
