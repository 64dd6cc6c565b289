//! Linked and full clones: what each sees, that writes never leak between source and
//! clone, that the source's files a linked clone reads are protected (refused, or kept
//! until the clone is flattened), and that cloning the present state leaves the
//! source's snapshot tree as it was.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 32 * MIB;

async fn clone(app: &TestApp, source: Uuid, body: Value) -> VmView {
    let path = format!("/v1/vms/{source}/clone");
    let job = app.run_job(Method::POST, &path, Some(body)).await;
    assert_eq!(job.kind, JobKind::VmClone);
    assert_eq!(job.vm_ids().first(), Some(&job.target.id), "{job:?}");
    let vm = app.vm(job.target.id).await;
    assert_eq!(vm.status, ResourceStatus::Ready);
    vm
}

/// Start a clone of `source` (202) without waiting for it.
async fn start_clone(app: &TestApp, source: Uuid, body: Value) -> JobView {
    let path = format!("/v1/vms/{source}/clone");
    app.accept(Method::POST, &path, Some(body)).await
}

/// `method path` must be refused with 409 `code` (a POST sends `{}`).
async fn conflict(app: &TestApp, method: Method, path: &str, code: &str) -> Problem {
    let body = (method == Method::POST).then(|| json!({}));
    app.expect_problem(method, path, body, StatusCode::CONFLICT, code)
        .await
}

/// Flatten the VM's disk and wait for the job.
async fn flatten(app: &TestApp, vm: Uuid, disk: Uuid) -> JobView {
    let path = format!("/v1/vms/{vm}/disks/{disk}/flatten");
    app.run_job(Method::POST, &path, Some(json!({}))).await
}

#[tokio::test]
async fn a_linked_clone_of_a_snapshot_reads_it_and_writes_only_to_itself() {
    let app = TestApp::spawn().await;
    let source = app.create_vm("golden", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0xa1, 0, 2);
    let s1 = app.snapshot(source, "s1").await.id;
    write(app.active_path(source, "root").await, 0xa2, 2, 1);

    let clone_vm = clone(
        &app,
        source,
        json!({"name": "linked", "mode": "linked", "snapshot_id": s1}),
    )
    .await;
    let clone_id = clone_vm.id;
    assert_eq!(clone_vm.source_vm_id, Some(source));
    let frozen = app.snapshot_path(source, s1, "root").await;
    let clone_disk = &clone_vm.disks[0];
    assert_eq!(clone_disk.chain.len(), 1);
    let base_volume = frozen
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".qcow2");
    assert_eq!(
        clone_disk
            .source_volume_id
            .map(|v| v.to_string())
            .as_deref(),
        Some(base_volume)
    );
    let clone_path = clone_disk.path().to_owned();
    // The clone sees the snapshot, not what the source wrote after it.
    expect_all(&clone_path, &[(0xa1, 0, 2), (0, 2, 1)]);
    assert_eq!(chain(&clone_path).len(), 2);

    // Writes on either side stay there.
    write(&clone_path, 0xb1, 4, 1);
    write(app.active_path(source, "root").await, 0xa3, 5, 1);
    expect_all(&frozen, &[(0xa1, 0, 2), (0, 2, 4)]);
    expect_all(
        app.active_path(source, "root").await,
        &[(0xa1, 0, 2), (0xa2, 2, 1), (0, 4, 1), (0xa3, 5, 1)],
    );
    expect_all(&clone_path, &[(0xa1, 0, 2), (0xb1, 4, 1), (0, 5, 1)]);
    let view = app.vm(source).await;
    assert_eq!(view.dependent_vm_ids, [clone_id]);

    // The layer the clone reads is protected: the snapshot and the VM cannot go.
    let snapshot = format!("/v1/snapshots/{s1}");
    let refused = conflict(&app, Method::DELETE, &snapshot, "has_dependents").await;
    let dependents = refused.dependent_vms.unwrap_or_default();
    assert_eq!(dependents[0].id, clone_id);
    assert_eq!(dependents[0].name, "linked");
    for path in [
        format!("/v1/vms/{source}"),
        format!("/v1/vms/{source}/snapshots"),
    ] {
        conflict(&app, Method::DELETE, &path, "has_dependents").await;
    }
    assert_eq!(
        app.get_snapshot(s1).await.status,
        ResourceStatus::Ready,
        "a refusal changed the snapshot"
    );
    expect_all(&clone_path, &[(0xa1, 0, 2), (0xb1, 4, 1)]);

    // Flattened, the clone stands alone and the source is free again.
    let disk_id = clone_disk.id;
    let job = flatten(&app, clone_id, disk_id).await;
    assert_eq!(job.kind, JobKind::DiskFlatten);
    let flat = app.vm(clone_id).await;
    assert_eq!(flat.disks[0].source_volume_id, None);
    assert_eq!(chain(&clone_path).len(), 1);
    let again = format!("/v1/vms/{clone_id}/disks/{disk_id}/flatten");
    conflict(&app, Method::POST, &again, "disk_not_linked").await;
    app.delete_snapshot(s1).await;
    app.delete_vm(source).await;
    expect_all(&clone_path, &[(0xa1, 0, 2), (0, 2, 2), (0xb1, 4, 1)]);
    check_clean(&clone_path);
    assert_eq!(app.volume_files().len(), 1);
}

#[tokio::test]
async fn a_linked_clone_of_the_present_state_leaves_the_source_tree_as_it_was() {
    let app = TestApp::spawn().await;
    let source = app
        .create_vm("present", &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(app.active_path(source, "root").await, 0x11, 0, 1);
    let s1 = app.snapshot(source, "s1").await.id;
    write(app.active_path(source, "root").await, 0x12, 1, 1);
    write(app.active_path(source, "data").await, 0x21, 0, 1);
    let before = app.vm(source).await;
    let (_, tree_before) = app
        .get(&format!("/v1/vms/{source}/snapshots?view=tree"))
        .await;

    // The present state of a running VM cannot be frozen offline.
    app.patch(&format!("/v1/vms/{source}"), json!({"state": "running"}))
        .await;
    let refused = app
        .expect_problem(
            Method::POST,
            &format!("/v1/vms/{source}/clone"),
            Some(json!({"name": "x", "mode": "linked"})),
            StatusCode::CONFLICT,
            "vm_running",
        )
        .await;
    let name = app.vm(source).await.name;
    assert_eq!(
        refused.detail,
        format!("VM {name} is running; stop it first to clone its present state"),
        "the message names the VM and what to do"
    );
    app.patch(&format!("/v1/vms/{source}"), json!({"state": "stopped"}))
        .await;

    let clone_id = clone(&app, source, json!({"name": "now", "mode": "linked"}))
        .await
        .id;
    let (_, tree_after) = app
        .get(&format!("/v1/vms/{source}/snapshots?view=tree"))
        .await;
    assert_eq!(
        tree_after, tree_before,
        "the source's snapshot tree changed"
    );
    let after = app.vm(source).await;
    assert_eq!(after.current_snapshot_id, before.current_snapshot_id);
    // Each source disk got a new writable layer over the frozen present state.
    let roles: Vec<VolumeRole> = after.disks[0].chain.iter().map(|c| c.role).collect();
    assert!(
        matches!(
            roles[..],
            [VolumeRole::Active, VolumeRole::Shared, VolumeRole::Snapshot]
        ),
        "{roles:?}"
    );

    let clone_root = app.active_path(clone_id, "root").await;
    let clone_data = app.active_path(clone_id, "data").await;
    expect_all(&clone_root, &[(0x11, 0, 1), (0x12, 1, 1)]);
    expect_all(&clone_data, &[(0x21, 0, 1)]);
    write(app.active_path(source, "root").await, 0x13, 2, 1);
    write(&clone_root, 0x31, 3, 1);
    expect_all(
        &clone_root,
        &[(0x11, 0, 1), (0x12, 1, 1), (0, 2, 1), (0x31, 3, 1)],
    );
    expect_all(
        app.active_path(source, "root").await,
        &[(0x11, 0, 1), (0x12, 1, 1), (0x13, 2, 1), (0, 3, 1)],
    );

    // s1 lies under the shared layer the clone reads: protected.
    let snapshot = format!("/v1/snapshots/{s1}");
    conflict(&app, Method::DELETE, &snapshot, "has_dependents").await;
    // Without the clone, s1 merges normally and every byte of the source stays.
    app.delete_vm(clone_id).await;
    app.delete_snapshot(s1).await;
    let present = app.active_path(source, "root").await;
    expect_all(&present, &[(0x11, 0, 1), (0x12, 1, 1), (0x13, 2, 1)]);
    check_clean(&present);
    assert!(app.vm(source).await.dependent_vm_ids.is_empty());
}

#[tokio::test]
async fn a_full_clone_equals_its_source_and_outlives_it() {
    let app = TestApp::spawn().await;
    let source = app.create_vm("original", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x41, 0, 3);
    let s1 = app.snapshot(source, "s1").await.id;
    write(app.active_path(source, "root").await, 0x42, 8, 2);

    let chain_before = to_json(&app.vm(source).await.disks[0].chain);
    let copy = clone(&app, source, json!({"name": "copy", "mode": "full"})).await;
    // Its temporary layer merged back, the source's chain is exactly as it was.
    assert_eq!(to_json(&app.vm(source).await.disks[0].chain), chain_before);
    let of_snapshot = clone(
        &app,
        source,
        json!({"name": "copy-s1", "mode": "full", "snapshot_id": s1}),
    )
    .await;
    let copy_path = copy.disks[0].path();
    let snap_copy_path = of_snapshot.disks[0].path();
    assert_eq!(
        chain(copy_path).len(),
        1,
        "a full clone has no backing file"
    );
    assert_eq!(chain(snap_copy_path).len(), 1);
    assert_eq!(copy.disks[0].source_volume_id, None);
    compare(copy_path, app.active_path(source, "root").await);
    compare(snap_copy_path, app.snapshot_path(source, s1, "root").await);
    // Sparse: only the written 5 MiB (plus metadata) are allocated.
    let allocated = copy.disks[0].chain[0].allocated_bytes;
    assert!(
        allocated < 8 * MIB,
        "{allocated} bytes allocated for 5 MiB of data"
    );
    assert!(app.vm(source).await.dependent_vm_ids.is_empty());

    app.delete_vm(source).await;
    expect_all(copy_path, &[(0x41, 0, 3), (0, 3, 5), (0x42, 8, 2)]);
    expect_all(snap_copy_path, &[(0x41, 0, 3), (0, 3, 7)]);
    check_clean(copy_path);
    check_clean(snap_copy_path);
    assert_eq!(app.volume_files().len(), 2);
}

#[tokio::test]
async fn a_cancelled_full_clone_leaves_no_vm_and_no_file() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=1500")]).await;
    let source = app.create_vm("busy", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x51, 0, 4);
    let files_before = app.volume_files();
    let job = start_clone(&app, source, json!({"name": "doomed", "mode": "full"})).await;
    let new_vm = job.target.id;
    assert_eq!(app.vm(new_vm).await.status, ResourceStatus::Creating);
    // Jobs of both VMs list it.
    let listed: JobList = app.get_as(&format!("/v1/jobs?vm_id={new_vm}")).await;
    assert_eq!(listed.items[0].id, job.id);
    let (status, _) = app
        .post(&format!("/v1/jobs/{}/cancel", job.id), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let ended = app.wait_job(job.id).await;
    assert_eq!(ended.status, JobStatus::Cancelled, "{ended:?}");
    let (status, _) = app.get(&format!("/v1/vms/{new_vm}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(app.volume_files(), files_before);
    expect(app.active_path(source, "root").await, 0x51, 0, 4);
}

#[tokio::test]
async fn clone_requests_are_validated_and_change_nothing_when_refused() {
    let app = TestApp::spawn().await;
    let source = app.create_vm("src", &[("root", DISK)]).await.id;
    let other = app.create_vm("other", &[("root", DISK)]).await.id;
    let other_snapshot = app.snapshot(other, "theirs").await.id;
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"name": "", "mode": "linked"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            json!({"name": "c", "mode": "thin"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            json!({"name": "c"}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            json!({"name": "other", "mode": "linked"}),
            StatusCode::CONFLICT,
            "name_taken",
        ),
        (
            json!({"name": "c", "mode": "linked", "snapshot_id": UNKNOWN_ID}),
            StatusCode::NOT_FOUND,
            "snapshot_not_found",
        ),
        (
            json!({"name": "c", "mode": "full", "snapshot_id": other_snapshot}),
            StatusCode::NOT_FOUND,
            "snapshot_not_found",
        ),
    ];
    let path = format!("/v1/vms/{source}/clone");
    for (body, status, code) in cases {
        app.expect_problem(Method::POST, &path, Some(body), status, code)
            .await;
    }
    app.expect_problem(
        Method::POST,
        &format!("/v1/vms/{UNKNOWN_ID}/clone"),
        Some(json!({"name": "c", "mode": "linked"})),
        StatusCode::NOT_FOUND,
        "vm_not_found",
    )
    .await;
    let vms: VmList = app.get_as("/v1/vms").await;
    assert_eq!(vms.items.len(), 2, "a refused clone left a VM");
    let disk = app.vm(source).await.disks[0].id;
    let flatten = format!("/v1/vms/{source}/disks/{disk}/flatten");
    conflict(&app, Method::POST, &flatten, "disk_not_linked").await;
    app.expect_problem(
        Method::POST,
        &format!("/v1/vms/{source}/disks/{UNKNOWN_ID}/flatten"),
        Some(json!({})),
        StatusCode::NOT_FOUND,
        "disk_not_found",
    )
    .await;
}

#[tokio::test]
async fn flatten_dependents_streams_the_shared_data_into_clones_before_deleting() {
    let app = TestApp::spawn().await;
    let source = app.create_vm("base", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0xc1, 0, 2);
    let s1 = app.snapshot(source, "s1").await.id;
    write(app.active_path(source, "root").await, 0xc2, 2, 1);
    let s2 = app.snapshot(source, "s2").await.id;
    write(app.active_path(source, "root").await, 0xc3, 3, 1);
    let a = clone(
        &app,
        source,
        json!({"name": "a", "mode": "linked", "snapshot_id": s1}),
    )
    .await
    .id;
    let b = clone(
        &app,
        source,
        json!({"name": "b", "mode": "linked", "snapshot_id": s2}),
    )
    .await
    .id;
    write(app.active_path(a, "root").await, 0xa0, 5, 1);
    write(app.active_path(b, "root").await, 0xb0, 5, 1);

    // A running dependent cannot be flattened under its guest.
    app.patch(&format!("/v1/vms/{a}"), json!({"state": "running"}))
        .await;
    let flattening = format!("/v1/snapshots/{s1}?flatten_dependents=true");
    conflict(&app, Method::DELETE, &flattening, "vm_running").await;
    app.patch(&format!("/v1/vms/{a}"), json!({"state": "stopped"}))
        .await;

    // Deleting s1 merges s1's layer with s2's: both clones read it, both are flattened.
    let job = app.run_job(Method::DELETE, &flattening, None).await;
    assert_eq!(job.kind, JobKind::SnapshotDelete);
    for (vm, own) in [
        (a, [(0xc1, 0, 2), (0, 2, 2)]),
        (b, [(0xc1, 0, 2), (0xc2, 2, 1)]),
    ] {
        let view = app.vm(vm).await;
        assert_eq!(view.disks[0].source_volume_id, None, "{view:?}");
        let path = app.active_path(vm, "root").await;
        assert_eq!(chain(&path).len(), 1);
        expect_all(&path, &own);
        check_clean(&path);
    }
    expect(app.active_path(a, "root").await, 0xa0, 5, 1);
    expect(app.active_path(b, "root").await, 0xb0, 5, 1);
    assert!(app.vm(source).await.dependent_vm_ids.is_empty());

    // The same for a whole VM.
    let c = clone(
        &app,
        source,
        json!({"name": "c", "mode": "linked", "snapshot_id": s2}),
    )
    .await
    .id;
    let vm = format!("/v1/vms/{source}");
    conflict(&app, Method::DELETE, &vm, "has_dependents").await;
    let flattening = format!("{vm}?flatten_dependents=true");
    app.run_job(Method::DELETE, &flattening, None).await;
    let path = app.active_path(c, "root").await;
    expect_all(&path, &[(0xc1, 0, 2), (0xc2, 2, 1), (0, 3, 1)]);
    assert_eq!(chain(&path).len(), 1);
    assert_eq!(app.volume_files().len(), 3);
}

#[tokio::test]
async fn a_full_clone_reports_progress_and_a_cancel_between_disks_removes_every_copy() {
    // Steps: a temporary layer on each of the 2 source disks, then the 2 copies; the
    // job pauses after the first copy (step 2).
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:after-step-2:pause=1500")]).await;
    let source = app
        .create_vm("two", &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(app.active_path(source, "root").await, 0xd1, 0, 4);
    write(app.active_path(source, "data").await, 0xd2, 0, 4);
    let files_before = app.volume_files();
    let job = start_clone(&app, source, json!({"name": "half", "mode": "full"})).await;
    // The first disk is copied, the job pauses: its progress shows it.
    let mut progress = 0;
    for _ in 0..100 {
        progress = app.job(job.id).await.progress;
        if progress >= 70 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        progress >= 70,
        "progress {progress} after one of two copies"
    );
    app.post(&format!("/v1/jobs/{}/cancel", job.id), json!({}))
        .await;
    let ended = app.wait_job(job.id).await;
    assert_eq!(ended.status, JobStatus::Cancelled, "{ended:?}");
    assert_eq!(app.volume_files(), files_before, "a copy was left behind");
    let (status, _) = app.get(&format!("/v1/vms/{}", job.target.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_clone_interrupted_by_a_crash_completes_after_restart() {
    let mut app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:after-step-0")]).await;
    let source = app
        .create_vm("crash", &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(app.active_path(source, "root").await, 0xe1, 0, 2);
    write(app.active_path(source, "data").await, 0xe2, 0, 2);
    let job = start_clone(&app, source, json!({"name": "resumed", "mode": "full"})).await;
    assert!(!app.wait_exit().success());
    app.restart(&[]).await;
    let ended = app.wait_job(job.id).await;
    assert_eq!(ended.status, JobStatus::Succeeded, "{ended:?}");
    assert_eq!(ended.progress, 100);
    let clone_id = job.target.id;
    compare(
        app.active_path(clone_id, "root").await,
        app.active_path(source, "root").await,
    );
    compare(
        app.active_path(clone_id, "data").await,
        app.active_path(source, "data").await,
    );
    assert_eq!(app.volume_files().len(), 4);
}

#[tokio::test]
async fn a_linked_clone_not_made_yet_already_protects_its_source_and_itself() {
    // The clone job is held after planning: accepted, running, no file made yet.
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=4000")]).await;
    app.wait_ready().await;
    let source = app.create_vm("source", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x31, 0, 4);
    let golden = app.snapshot(source, "golden").await.id;
    let job = start_clone(
        &app,
        source,
        json!({"name": "early", "mode": "linked", "snapshot_id": golden}),
    )
    .await;
    let clone = job.target.id;

    // Everything that would rewrite or remove the layers the clone will read is
    // refused now, naming the clone, rather than accepted and failed later.
    for (method, path) in [
        (Method::DELETE, format!("/v1/snapshots/{golden}")),
        (Method::DELETE, format!("/v1/vms/{source}")),
        (Method::DELETE, format!("/v1/vms/{source}/snapshots")),
        (
            Method::POST,
            format!("/v1/vms/{source}/convert-to-template"),
        ),
    ] {
        let refused = conflict(&app, method, &path, "has_dependents").await;
        let dependents = refused.dependent_vms.clone().unwrap_or_default();
        assert_eq!(dependents[0].id, clone, "{refused:?}");
    }
    // The clone itself cannot be deleted while its creation runs: the job would set
    // it ready again afterwards.
    let path = format!("/v1/vms/{clone}");
    conflict(&app, Method::DELETE, &path, "vm_not_ready").await;

    let job = app.wait_job(job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(app.vm(clone).await.status, ResourceStatus::Ready);
    expect(app.active_path(clone, "root").await, 0x31, 0, 4);
    expect(app.snapshot_path(source, golden, "root").await, 0x31, 0, 4);
    // Once made, the clone is an ordinary VM: it can be deleted, and then the source's
    // snapshot too.
    app.delete_vm(clone).await;
    app.delete_snapshot(golden).await;
}

/// The volume files in the data directory are exactly those the present states and
/// snapshots of these VMs read.
async fn assert_only_referenced_files(app: &TestApp, vms: &[Uuid]) {
    let mut referenced: Vec<String> = Vec::new();
    for vm in vms {
        let view = app.vm(vm).await;
        for disk in &view.disks {
            // The whole backing chain: a linked clone's continues into its source's.
            referenced.extend(chain(disk.path()));
        }
        let list: SnapshotList = app.get_as(&format!("/v1/vms/{vm}/snapshots")).await;
        for snapshot in &list.items {
            for volume in &snapshot.volumes {
                referenced.extend(chain(&volume.path));
            }
        }
    }
    referenced.sort();
    referenced.dedup();
    let on_disk: Vec<String> = app
        .volume_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(on_disk, referenced, "files on disk against the records");
}

#[tokio::test]
async fn the_layer_a_linked_clone_of_the_present_sat_on_goes_with_its_last_reader() {
    let app = TestApp::spawn().await;
    for clone_goes_first in [false, true] {
        let source = app
            .create_vm(&format!("origin-{clone_goes_first}"), &[("root", DISK)])
            .await
            .id;
        write(app.active_path(source, "root").await, 0x61, 0, 2);
        let s0 = app.snapshot(source, "s0").await.id;
        write(app.active_path(source, "root").await, 0x62, 2, 2);
        // The present is frozen into a shared layer the clone sits on.
        let clone = clone(
            &app,
            source,
            json!({"name": format!("reader-{clone_goes_first}"), "mode": "linked"}),
        )
        .await
        .id;
        expect_all(
            app.active_path(clone, "root").await,
            &[(0x61, 0, 2), (0x62, 2, 2)],
        );
        if clone_goes_first {
            app.delete_vm(clone).await;
            app.revert(s0).await;
        } else {
            app.revert(s0).await;
            // Still read by the clone.
            assert_only_referenced_files(&app, &[source, clone]).await;
            app.delete_vm(clone).await;
        }
        // Nothing reads the shared layer any more: its file is gone too.
        assert_only_referenced_files(&app, &[source]).await;
        let active = app.active_path(source, "root").await;
        expect_all(&active, &[(0x61, 0, 2), (0, 2, 2)]);
        check_clean(&active);
        app.delete_vm(source).await;
    }
    assert!(app.volume_files().is_empty(), "{:?}", app.volume_files());
}

#[tokio::test]
async fn a_snapshot_a_pending_full_clone_copies_cannot_be_deleted_under_it() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=3000")]).await;
    app.wait_ready().await;
    let source = app.create_vm("copied", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x71, 0, 2);
    let golden = app.snapshot(source, "golden").await.id;
    let job = start_clone(
        &app,
        source,
        json!({"name": "copy", "mode": "full", "snapshot_id": golden}),
    )
    .await;
    let snapshot = format!("/v1/snapshots/{golden}");
    let refused = conflict(&app, Method::DELETE, &snapshot, "snapshot_busy").await;
    assert_eq!(
        refused.job_ids.as_deref(),
        Some(&[job.id][..]),
        "{refused:?}"
    );
    assert_eq!(app.wait_job(job.id).await.status, JobStatus::Succeeded);
    let copy = job.target.id;
    expect(app.active_path(copy, "root").await, 0x71, 0, 2);
    app.delete_snapshot(golden).await;
}

#[tokio::test]
async fn a_shared_layer_under_a_snapshot_goes_once_neither_the_clone_nor_the_snapshot_reads_it() {
    let app = TestApp::spawn().await;
    for (round, ending) in [
        "delete clone, then snapshot",
        "delete snapshot, then flatten clone",
    ]
    .into_iter()
    .enumerate()
    {
        let source = app
            .create_vm(&format!("origin-{round}"), &[("root", DISK)])
            .await
            .id;
        write(app.active_path(source, "root").await, 0x61, 0, 2);
        let s0 = app.snapshot(source, "s0").await.id;
        write(app.active_path(source, "root").await, 0x62, 2, 2);
        // The present is frozen into a shared layer the clone sits on; a snapshot is
        // then taken on top of it, and the source goes back to s0.
        let reader = clone(
            &app,
            source,
            json!({"name": format!("reader-{round}"), "mode": "linked"}),
        )
        .await
        .id;
        write(app.active_path(source, "root").await, 0x63, 4, 2);
        let s1 = app.snapshot(source, "s1").await.id;
        app.revert(s0).await;
        assert_only_referenced_files(&app, &[source, reader]).await;
        if round == 0 {
            app.delete_vm(reader).await;
            // s1 still reads the shared layer.
            assert_only_referenced_files(&app, &[source]).await;
            expect_all(
                app.snapshot_path(source, s1, "root").await,
                &[(0x61, 0, 2), (0x62, 2, 2), (0x63, 4, 2)],
            );
            app.delete_snapshot(s1).await;
            assert_only_referenced_files(&app, &[source]).await;
        } else {
            app.delete_snapshot(s1).await;
            // The clone still reads the shared layer.
            assert_only_referenced_files(&app, &[source, reader]).await;
            let disk = app.vm(reader).await.disks[0].id;
            flatten(&app, reader, disk).await;
            let flat = app.active_path(reader, "root").await;
            assert_eq!(chain(&flat).len(), 1, "{ending}: the clone is standalone");
            expect_all(&flat, &[(0x61, 0, 2), (0x62, 2, 2), (0, 4, 2)]);
            assert_only_referenced_files(&app, &[source, reader]).await;
            app.delete_vm(reader).await;
        }
        let active = app.active_path(source, "root").await;
        expect_all(&active, &[(0x61, 0, 2), (0, 2, 4)]);
        check_clean(&active);
        app.delete_vm(source).await;
        assert!(
            app.volume_files().is_empty(),
            "{ending}: {:?}",
            app.volume_files()
        );
    }
}

#[tokio::test]
async fn a_linked_disk_with_a_branch_on_its_source_is_flattened_whole() {
    let app = TestApp::spawn().await;
    let source = app.create_vm("trunk", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x61, 0, 2);
    let s0 = app.snapshot(source, "s0").await.id;
    write(app.active_path(source, "root").await, 0x62, 2, 2);
    let reader = clone(&app, source, json!({"name": "branchy", "mode": "linked"}))
        .await
        .id;
    app.revert(s0).await;

    // On the clone: s1 and s2 in a row, back to s1, then s1 deleted. Its layer (the
    // clone's lowest) is a branch point, streamed into both branches: the clone's disk
    // now sits on its source twice.
    write(app.active_path(reader, "root").await, 0x71, 4, 1);
    let s1 = app.snapshot(reader, "s1").await.id;
    write(app.active_path(reader, "root").await, 0x72, 5, 1);
    let s2 = app.snapshot(reader, "s2").await.id;
    app.revert(s1).await;
    write(app.active_path(reader, "root").await, 0x73, 6, 1);
    app.delete_snapshot(s1).await;
    let present = [
        (0x61, 0, 2),
        (0x62, 2, 2),
        (0x71, 4, 1),
        (0, 5, 1),
        (0x73, 6, 1),
    ];
    let at_s2 = [
        (0x61, 0, 2),
        (0x62, 2, 2),
        (0x71, 4, 1),
        (0x72, 5, 1),
        (0, 6, 1),
    ];
    expect_all(app.active_path(reader, "root").await, &present);
    expect_all(app.snapshot_path(reader, s2, "root").await, &at_s2);

    // Flattening cuts both links; the source's layer they sat on then goes.
    let disk = app.vm(reader).await.disks[0].id;
    let job = flatten(&app, reader, disk).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let active = app.active_path(reader, "root").await;
    let layer = app.snapshot_path(reader, s2, "root").await;
    assert_eq!(chain(&active).len(), 1, "the present is standalone");
    assert_eq!(chain(&layer).len(), 1, "s2's branch is standalone");
    expect_all(&active, &present);
    expect_all(&layer, &at_s2);
    check_clean(&active);
    check_clean(&layer);
    assert_only_referenced_files(&app, &[source, reader]).await;
    expect_all(
        app.active_path(source, "root").await,
        &[(0x61, 0, 2), (0, 2, 6)],
    );
}

#[tokio::test]
async fn a_clone_queued_behind_a_grow_gets_the_grown_size() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "disk_resize:planned:pause=1500")]).await;
    let source = app.create_vm("growing", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x51, 0, 2);
    let disk = app.vm(source).await.disks[0].id;
    let grown = 2 * DISK;
    let resize = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{source}/disks/{disk}/resize"),
            Some(json!({"size_bytes": grown})),
        )
        .await;
    let mut clones = Vec::new();
    for mode in ["linked", "full"] {
        let body = json!({"name": format!("after-grow-{mode}"), "mode": mode});
        clones.push(start_clone(&app, source, body).await);
    }
    assert_eq!(app.wait_job(resize.id).await.status, JobStatus::Succeeded);
    for job in &clones {
        let ended = app.wait_job(job.id).await;
        assert_eq!(ended.status, JobStatus::Succeeded, "{ended:?}");
        let clone = job.target.id;
        let view = app.vm(clone).await;
        assert_eq!(view.disks[0].size_bytes, grown, "{view:?}");
        let active = app.active_path(clone, "root").await;
        assert_eq!(virtual_size(&active), grown);
        expect_all(&active, &[(0x51, 0, 2), (0, 2, 62)]);
    }
}

#[tokio::test]
async fn a_clone_queued_behind_a_new_disk_of_its_source_gets_that_disk() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "disk_create:planned:pause=1500")]).await;
    let source = app.create_vm("widening", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x52, 0, 2);
    let added = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{source}/disks"),
            Some(json!({"name": "data", "size_bytes": DISK})),
        )
        .await;
    let mut clones = Vec::new();
    for mode in ["linked", "full"] {
        let body = json!({"name": format!("wide-{mode}"), "mode": mode});
        clones.push(start_clone(&app, source, body).await);
    }
    assert_eq!(app.wait_job(added.id).await.status, JobStatus::Succeeded);
    for job in &clones {
        let ended = app.wait_job(job.id).await;
        assert_eq!(ended.status, JobStatus::Succeeded, "{ended:?}");
        let clone = job.target.id;
        let mut names: Vec<String> = app
            .vm(clone)
            .await
            .disks
            .into_iter()
            .map(|d| d.name)
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["data", "root"],
            "the clone is of the present when it ran"
        );
        expect_all(app.active_path(clone, "root").await, &[(0x52, 0, 2)]);
        expect_all(app.active_path(clone, "data").await, &[(0, 0, 32)]);
    }
}

#[tokio::test]
async fn a_collapse_behind_a_linked_clone_of_the_present_is_refused_at_once() {
    // The clone job is held after planning: it has not frozen the present yet.
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=3000")]).await;
    app.wait_ready().await;
    let source = app.create_vm("source", &[("root", DISK)]).await.id;
    write(app.active_path(source, "root").await, 0x35, 0, 2);
    let job = start_clone(&app, source, json!({"name": "present", "mode": "linked"})).await;
    let clone = job.target.id;

    // Once the clone runs, the present it froze is a layer it reads: collapsing the
    // source's (empty) snapshot tree would rewrite it. Refused now, naming the clone,
    // not accepted and failed when it runs (stress seed 2).
    let snapshots = format!("/v1/vms/{source}/snapshots");
    let refused = conflict(&app, Method::DELETE, &snapshots, "has_dependents").await;
    let dependents = refused.dependent_vms.clone().unwrap_or_default();
    assert_eq!(dependents[0].id, clone, "{refused:?}");

    let job = app.wait_job(job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    expect(app.active_path(clone, "root").await, 0x35, 0, 2);
    expect(app.active_path(source, "root").await, 0x35, 0, 2);
    // And once it exists, the same request is refused for the same reason.
    conflict(&app, Method::DELETE, &snapshots, "has_dependents").await;
}

/// File names (not paths) of a chain, top first.
fn chain_names(path: &str) -> Vec<String> {
    chain(path)
        .iter()
        .map(|p| p.rsplit('/').next().unwrap().to_owned())
        .collect()
}

/// The shape the stress test's seed 2 once left (four layers "shown by no record"):
/// linked clones of the present froze it into shared layers, a snapshot was taken on
/// top of them, the VM went back to an older snapshot and the clones were deleted. No
/// view shows those shared layers any more (a VM shows its present chain, a snapshot
/// only its own layer), but the snapshot's layer still reads them, so they must stay:
/// recorded in the volumes table with their parents, kept across a restart, and
/// dropped with the snapshot once nothing reads them.
#[tokio::test]
async fn shared_layers_under_a_snapshot_off_the_present_stay_recorded_though_no_view_shows_them() {
    let mut app = TestApp::spawn().await;
    let source = app.create_vm("stacked", &[("root", DISK)]).await.id;
    write(&app.active_path(source, "root").await, 0x41, 0, 2);
    let s0 = app.snapshot(source, "s0").await.id;
    let mut readers = Vec::new();
    for layer in 0..4u8 {
        write(
            &app.active_path(&source, "root").await,
            0x51 + layer,
            2 + u64::from(layer),
            1,
        );
        let reader = clone(
            &app,
            source,
            json!({"name": format!("reader-{layer}"), "mode": "linked"}),
        )
        .await;
        readers.push(reader.id);
    }
    write(&app.active_path(&source, "root").await, 0x5f, 6, 1);
    let s1 = app.snapshot(source, "s1").await.id;
    let s1_bytes = [
        (0x41, 0, 2),
        (0x51, 2, 1),
        (0x52, 3, 1),
        (0x53, 4, 1),
        (0x54, 5, 1),
        (0x5f, 6, 1),
    ];
    app.revert(s0).await;
    for reader in &readers {
        app.delete_vm(reader).await;
    }

    let s1_path = app.snapshot_path(source, s1, "root").await;
    let s1_chain = chain_names(&s1_path);
    let mut shown: Vec<String> = chain_names(&app.active_path(source, "root").await);
    for snapshot in [s0, s1] {
        let path = app.snapshot_path(source, snapshot, "root").await;
        shown.push(path.rsplit('/').next().unwrap().to_owned());
    }
    let hidden: Vec<&String> = s1_chain.iter().filter(|f| !shown.contains(f)).collect();
    assert_eq!(
        hidden.len(),
        4,
        "s1 reads {s1_chain:?}, the views show {shown:?}"
    );
    let rows = crate::stress::volume_rows(&app.data_dir).await.unwrap();
    for file in &hidden {
        let row = rows
            .get(*file)
            .unwrap_or_else(|| panic!("{file}, read by s1, has no volume row"));
        assert_eq!(row.role, "shared", "{file}");
        assert_eq!(row.vm, source.to_string(), "{file}");
    }
    // Every row has its file, every file its row, each row's parent is its backing.
    let on_disk: Vec<String> = app
        .volume_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        on_disk,
        rows.keys().cloned().collect::<Vec<_>>(),
        "files against rows"
    );
    for (file, row) in &rows {
        let files = chain_names(app.data_dir.join("volumes").join(file).to_str().unwrap());
        assert_eq!(
            files.get(1),
            row.parent.as_ref(),
            "{file}: backing against row"
        );
    }

    // A restart keeps them, and s1 reads as it did.
    app.restart(&[]).await;
    let after: Vec<String> = app
        .volume_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(after, on_disk, "a restart changes no file");
    expect_all(&s1_path, &s1_bytes);
    check_clean(&s1_path);

    // Once s1 goes, nothing reads them: they go with it.
    app.delete_snapshot(s1).await;
    assert_only_referenced_files(&app, &[source]).await;
    let rows = crate::stress::volume_rows(&app.data_dir).await.unwrap();
    assert!(
        hidden.iter().all(|f| !rows.contains_key(*f)),
        "{rows:?}",
        rows = rows.keys().collect::<Vec<_>>()
    );
    let active = app.active_path(source, "root").await;
    expect_all(&active, &[(0x41, 0, 2), (0, 2, 5)]);
}
