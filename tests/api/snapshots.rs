//! The snapshot tree: create, revert, the four delete cases in both merge directions,
//! branches, multiple disks, conflicts and free-space refusals. Bytes are checked with
//! qemu-io on the present state and on every remaining snapshot's frozen layer.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

const DISK: u64 = 64 * MIB;

/// A one-disk VM with snapshots s1 and s2 taken in turn (the DOMAIN.md example):
/// L0 holds `base` MiB of 0x11, L1 holds 0x22 over [1, 1+mid) MiB, the present 0x33
/// over [2, 2+top) MiB.
async fn chain_of_three(
    app: &TestApp,
    name: &str,
    base: u64,
    mid: u64,
    top: u64,
) -> (Uuid, Uuid, Uuid) {
    let vm = app.create_vm(name, &[("root", DISK)]).await.id;
    write(app.active_path(vm, "root").await, 0x11, 0, base);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x22, 1, mid);
    let s2 = app.snapshot(vm, "s2").await.id;
    write(app.active_path(vm, "root").await, 0x33, 2, top);
    (vm, s1, s2)
}

/// How the job's deletion merged the (one) disk.
fn merge_action(job: &JobView) -> MergeAction {
    job.merges()
        .first()
        .unwrap_or_else(|| panic!("no merge in {job:?}"))
        .action
}

/// The VM's snapshots, as the flat list shows them.
async fn snapshots_of(app: &TestApp, vm: Uuid) -> Vec<SnapshotView> {
    let list: SnapshotList = app.get_as(&format!("/v1/vms/{vm}/snapshots")).await;
    list.items
}

/// The VM's snapshot tree (`?view=tree`).
async fn tree_of(app: &TestApp, vm: Uuid) -> SnapshotTree {
    let path = format!("/v1/vms/{vm}/snapshots?view=tree");
    match app.get_as(&path).await {
        SnapshotListing::Tree(tree) => tree,
        SnapshotListing::List(list) => panic!("{path} answered a list: {list:?}"),
    }
}

/// `method path` must be refused with 409 `vm_running`.
async fn refused_while_running(
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) {
    app.expect_problem(method, path, body, StatusCode::CONFLICT, "vm_running")
        .await;
}

#[tokio::test]
async fn taking_a_snapshot_freezes_the_active_layer_and_adds_an_empty_overlay() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("snap-basic", &[("root", DISK)]).await.id;
    let before = app.active_path(vm, "root").await;
    write(&before, 0x5a, 0, 2);
    let snap = app.snapshot(vm, "first").await;

    let view = app.vm(vm).await;
    assert_eq!(view.current_snapshot_id, Some(snap.id));
    let chain_view = &view.disks[0].chain;
    assert_eq!(chain_view.len(), 2);
    assert!(matches!(chain_view[0].role, VolumeRole::Active));
    assert!(matches!(chain_view[1].role, VolumeRole::Snapshot));
    assert_eq!(chain_view[1].snapshot_id, Some(snap.id));
    assert_eq!(chain_view[1].path, before);
    let after = app.active_path(vm, "root").await;
    assert_ne!(after, before);
    assert_eq!(chain(&after).len(), 2);
    expect(&after, 0x5a, 0, 2);
    check_clean(&after);

    assert_eq!(snap.status, ResourceStatus::Ready);
    assert!(snap.is_current);
    assert_eq!(snap.parent_id, None);
}

#[tokio::test]
async fn deleting_the_snapshot_before_the_current_one_commits_a_small_child_down() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "case1-commit", 16, 1, 1).await;
    let files_before = app.volume_files().len();
    let present_before = reference_copy(app.active_path(vm, "root").await, "case1-present");
    let s2_before = reference_copy(app.snapshot_path(vm, s2, "root").await, "case1-s2");
    let job = app.delete_snapshot(s1).await;
    compare(app.active_path(vm, "root").await, &present_before);
    compare(app.snapshot_path(vm, s2, "root").await, &s2_before);
    let _ = (
        std::fs::remove_file(present_before),
        std::fs::remove_file(s2_before),
    );
    assert_eq!(merge_action(&job), MergeAction::Commit, "{job:?}");
    assert!(job.merges()[0].bytes_to_copy < 4 * MIB);

    let present = app.active_path(vm, "root").await;
    expect_all(
        &present,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 1), (0x11, 3, 13)],
    );
    let s2_path = app.snapshot_path(vm, s2, "root").await;
    expect_all(&s2_path, &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 14)]);
    assert_eq!(chain(&present).len(), 2);
    check_clean(&present);
    assert_eq!(app.volume_files().len(), files_before - 1);
    let (status, _) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(app.get_snapshot(s2).await.parent_id, None);

    // Reached by revert, s2 still reads exactly as it did.
    app.revert(s2).await;
    expect_all(
        app.active_path(vm, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 14)],
    );
}

#[tokio::test]
async fn deleting_the_snapshot_before_the_current_one_streams_a_small_parent_up() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "case1-stream", 1, 16, 1).await;
    let job = app.delete_snapshot(s1).await;
    assert_eq!(merge_action(&job), MergeAction::Stream, "{job:?}");

    let present = app.active_path(vm, "root").await;
    expect_all(
        &present,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 1), (0x22, 3, 14)],
    );
    let s2_path = app.snapshot_path(vm, s2, "root").await;
    expect_all(&s2_path, &[(0x11, 0, 1), (0x22, 1, 16)]);
    assert_eq!(chain(&present).len(), 2);
    assert_eq!(chain(&s2_path).len(), 1, "the streamed layer stands alone");
    check_clean(&present);
}

#[tokio::test]
async fn deleting_the_current_snapshot_commits_a_small_present_into_it() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "case2-commit", 8, 8, 1).await;
    let job = app.delete_snapshot(s2).await;
    assert_eq!(merge_action(&job), MergeAction::Commit, "{job:?}");

    let view = app.vm(vm).await;
    assert_eq!(
        view.current_snapshot_id,
        Some(s1),
        "s1 becomes the current snapshot"
    );
    let present = app.active_path(vm, "root").await;
    expect_all(
        &present,
        &[
            (0x11, 0, 1),
            (0x22, 1, 1),
            (0x33, 2, 1),
            (0x22, 3, 6),
            (0x11, 9, 0),
        ],
    );
    expect_all(app.snapshot_path(vm, s1, "root").await, &[(0x11, 0, 8)]);
    assert_eq!(chain(&present).len(), 2);
    check_clean(&present);
}

#[tokio::test]
async fn deleting_the_current_snapshot_streams_it_into_a_large_present() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "case2-stream", 8, 1, 16).await;
    let present_before = reference_copy(app.active_path(vm, "root").await, "case2-present");
    let job = app.delete_snapshot(s2).await;
    compare(app.active_path(vm, "root").await, &present_before);
    let _ = std::fs::remove_file(present_before);
    assert_eq!(merge_action(&job), MergeAction::Stream, "{job:?}");

    let present = app.active_path(vm, "root").await;
    expect_all(&present, &[(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 16)]);
    expect_all(app.snapshot_path(vm, s1, "root").await, &[(0x11, 0, 8)]);
    assert_eq!(chain(&present).len(), 2);
    check_clean(&present);
    assert_eq!(app.vm(vm).await.current_snapshot_id, Some(s1));
}

#[tokio::test]
async fn deleting_a_snapshot_on_a_branch_the_vm_left_drops_its_file_without_merging() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "case3", 4, 1, 1).await;
    app.revert(s1).await;
    let present = app.active_path(vm, "root").await;
    expect_all(&present, &[(0x11, 0, 4)]);
    write(&present, 0x44, 3, 1);
    let s2_path = app.snapshot_path(vm, s2, "root").await;
    let files_before = app.volume_files().len();

    let job = app.delete_snapshot(s2).await;
    assert_eq!(merge_action(&job), MergeAction::Drop, "{job:?}");
    assert_eq!(job.merges()[0].bytes_to_copy, 0);
    assert!(!exists(&s2_path));
    assert_eq!(app.volume_files().len(), files_before - 1);
    expect_all(&present, &[(0x11, 0, 3), (0x44, 3, 1)]);
    expect_all(app.snapshot_path(vm, s1, "root").await, &[(0x11, 0, 4)]);
    check_clean(&present);
}

#[tokio::test]
async fn deleting_all_snapshots_collapses_every_chain_into_one_file_with_the_present_state() {
    let app = TestApp::spawn().await;
    let vm = app
        .create_vm("case4", &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(app.active_path(vm, "root").await, 0x11, 0, 4);
    write(app.active_path(vm, "data").await, 0x61, 0, 4);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x22, 1, 1);
    let _s2 = app.snapshot(vm, "s2").await.id;
    write(app.active_path(vm, "root").await, 0x33, 2, 1);
    // A second branch from s1, so delete-all also has an off-chain layer to drop.
    app.revert(s1).await;
    write(app.active_path(vm, "data").await, 0x62, 1, 1);
    let _s3 = app.snapshot(vm, "s3").await.id;
    write(app.active_path(vm, "root").await, 0x34, 3, 1);

    let job = app
        .run_job(Method::DELETE, &format!("/v1/vms/{vm}/snapshots"), None)
        .await;
    assert_eq!(job.kind, JobKind::SnapshotDeleteAll);
    let view = app.vm(vm).await;
    assert_eq!(view.current_snapshot_id, None);
    assert_eq!(snapshots_of(&app, vm).await.len(), 0);
    let root = app.active_path(vm, "root").await;
    let data = app.active_path(vm, "data").await;
    assert_eq!(chain(&root).len(), 1);
    assert_eq!(chain(&data).len(), 1);
    assert_eq!(app.volume_files().len(), 2, "one file per disk remains");
    expect_all(&root, &[(0x11, 0, 3), (0x34, 3, 1)]);
    expect_all(&data, &[(0x61, 0, 1), (0x62, 1, 1), (0x61, 2, 2)]);
    check_clean(&root);
    check_clean(&data);
}

#[tokio::test]
async fn a_revert_opens_a_new_branch_and_the_tree_view_shows_both() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "branches", 4, 1, 1).await;
    app.revert(s1).await;
    write(app.active_path(vm, "root").await, 0x55, 0, 1);
    let s3 = app.snapshot(vm, "s3").await.id;

    let tree = tree_of(&app, vm).await;
    assert_eq!(tree.current_snapshot_id, Some(s3));
    assert_eq!(tree.roots.len(), 1);
    assert_eq!(tree.roots[0].snapshot.id, s1);
    let mut children: Vec<Uuid> = tree.roots[0]
        .children
        .iter()
        .map(|c| c.snapshot.id)
        .collect();
    children.sort();
    let mut expected = vec![s2, s3];
    expected.sort();
    assert_eq!(children, expected);

    // Both branches keep their bytes.
    expect_all(
        app.snapshot_path(vm, s2, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 2)],
    );
    expect_all(
        app.snapshot_path(vm, s3, "root").await,
        &[(0x55, 0, 1), (0x11, 1, 3)],
    );
    app.revert(s2).await;
    expect_all(
        app.active_path(vm, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 2)],
    );
}

#[tokio::test]
async fn deleting_a_branch_point_streams_it_into_every_child_and_never_commits() {
    let app = TestApp::spawn().await;
    // s1's layer holds 16 MiB; both children are tiny, so a commit would be "cheaper",
    // but a layer with two children must never be committed into.
    let (vm, s1, s2) = chain_of_three(&app, "branch-point", 16, 1, 1).await;
    app.revert(s1).await;
    write(app.active_path(vm, "root").await, 0x55, 0, 1);
    let s3 = app.snapshot(vm, "s3").await.id;
    write(app.active_path(vm, "root").await, 0x66, 5, 1);

    let job = app.delete_snapshot(s1).await;
    assert_eq!(merge_action(&job), MergeAction::Stream, "{job:?}");
    expect_all(
        app.snapshot_path(vm, s2, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 14)],
    );
    expect_all(
        app.snapshot_path(vm, s3, "root").await,
        &[(0x55, 0, 1), (0x11, 1, 15)],
    );
    let present = app.active_path(vm, "root").await;
    expect_all(
        &present,
        &[(0x55, 0, 1), (0x11, 1, 4), (0x66, 5, 1), (0x11, 6, 10)],
    );
    check_clean(&present);
    check_clean(app.snapshot_path(vm, s2, "root").await);
    let tree = tree_of(&app, vm).await;
    assert_eq!(tree.roots.len(), 2, "s2 and s3 are roots now: {tree:?}");
}

#[tokio::test]
async fn a_snapshot_covers_every_disk_and_a_revert_restores_them_all() {
    let app = TestApp::spawn().await;
    let vm = app
        .create_vm(
            "multi",
            &[("root", DISK), ("data", DISK), ("logs", 32 * MIB)],
        )
        .await
        .id;
    for (disk, pattern) in [("root", 0x71), ("data", 0x72), ("logs", 0x73)] {
        write(app.active_path(vm, disk).await, pattern, 0, 2);
    }
    let snap = app.snapshot(vm, "all-disks").await;
    assert_eq!(snap.volumes.len(), 3);
    let s1 = snap.id;
    for disk in ["root", "data", "logs"] {
        write(app.active_path(vm, disk).await, 0xee, 0, 2);
    }
    app.revert(s1).await;
    for (disk, pattern) in [("root", 0x71), ("data", 0x72), ("logs", 0x73)] {
        let path = app.active_path(vm, disk).await;
        expect(&path, pattern, 0, 2);
        assert_eq!(chain(&path).len(), 2);
        check_clean(&path);
    }
    // The discarded present layers are gone: 3 frozen + 3 new active files.
    assert_eq!(app.volume_files().len(), 6);
}

#[tokio::test]
async fn a_revert_restores_the_disk_size_the_snapshot_had() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("resize-revert", &[("root", DISK)]).await;
    let (vm_id, disk_id) = (vm.id, vm.disks[0].id);
    write(app.active_path(vm_id, "root").await, 0x21, 0, 1);
    let s1 = app.snapshot(vm_id, "small").await.id;
    app.resize(vm_id, disk_id, 2 * DISK).await;
    let path = app.active_path(vm_id, "root").await;
    write(&path, 0x22, 100, 1);
    assert_eq!(app.vm(vm_id).await.disks[0].size_bytes, 2 * DISK);
    app.revert(s1).await;
    assert_eq!(app.vm(vm_id).await.disks[0].size_bytes, DISK);
    expect(app.active_path(vm_id, "root").await, 0x21, 0, 1);
}

#[tokio::test]
async fn operations_that_would_fight_a_running_guest_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "running", 2, 1, 1).await;
    let present = app.active_path(vm, "root").await;
    let (status, _) = app
        .patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let revert = format!("/v1/snapshots/{s1}/revert");
    refused_while_running(&app, Method::POST, &revert, Some(json!({}))).await;
    let snapshot = format!("/v1/snapshots/{s2}");
    refused_while_running(&app, Method::DELETE, &snapshot, None).await;
    let snapshots = format!("/v1/vms/{vm}/snapshots");
    refused_while_running(&app, Method::DELETE, &snapshots, None).await;
    let body = Some(json!({"name": "live"}));
    refused_while_running(&app, Method::POST, &snapshots, body).await;
    refused_while_running(&app, Method::DELETE, &format!("/v1/vms/{vm}"), None).await;

    assert_eq!(app.active_path(vm, "root").await, present);
    let list = snapshots_of(&app, vm).await;
    assert!(
        list.iter().all(|s| s.status == ResourceStatus::Ready),
        "{list:?}"
    );
    expect_all(&present, &[(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 1)]);

    app.patch(&format!("/v1/vms/{vm}"), json!({"state": "stopped"}))
        .await;
    app.revert(s1).await;
}

#[tokio::test]
async fn dropping_a_layer_on_another_branch_is_allowed_while_the_vm_runs() {
    let app = TestApp::spawn().await;
    let (vm, s1, s2) = chain_of_three(&app, "running-drop", 2, 1, 1).await;
    app.revert(s1).await;
    app.patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
        .await;
    let job = app.delete_snapshot(s2).await;
    assert_eq!(merge_action(&job), MergeAction::Drop);
    expect(app.active_path(vm, "root").await, 0x11, 0, 2);
}

#[tokio::test]
async fn deleting_a_snapshot_that_is_already_being_deleted_is_a_conflict() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_delete:planned:pause")]).await;
    let (vm, s1, _s2) = chain_of_three(&app, "double-delete", 2, 1, 1).await;
    let snapshot = format!("/v1/snapshots/{s1}");
    let first = app.accept(Method::DELETE, &snapshot, None).await;
    app.expect_problem(
        Method::DELETE,
        &snapshot,
        None,
        StatusCode::CONFLICT,
        "snapshot_busy",
    )
    .await;
    app.expect_problem(
        Method::POST,
        &format!("{snapshot}/revert"),
        Some(json!({})),
        StatusCode::CONFLICT,
        "snapshot_not_ready",
    )
    .await;
    let job = app.wait_job(first.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    expect_all(
        app.active_path(vm, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 1)],
    );
}

#[tokio::test]
async fn a_merge_that_does_not_fit_in_free_space_is_refused_with_507_before_any_file_changes() {
    // A reserve larger than any disk makes every merge too big; drops still work.
    let app = TestApp::spawn_with(&[("STRATA_RESERVED_SPACE", "1125899906842624")]).await;
    let (vm, s1, s2) = chain_of_three(&app, "no-space", 2, 1, 1).await;
    let files = app.volume_files();
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    let problem = app
        .expect_problem(
            Method::DELETE,
            &format!("/v1/snapshots/{s1}"),
            None,
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
        )
        .await;
    assert!(
        problem.needed_bytes.unwrap() > problem.available_bytes.unwrap(),
        "{problem:?}"
    );
    let (status, _) = app.delete(&format!("/v1/vms/{vm}/snapshots")).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);

    assert_eq!(app.volume_files(), files);
    let sizes_after: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    assert_eq!(sizes, sizes_after);
    assert_eq!(app.get_snapshot(s1).await.status, ResourceStatus::Ready);
    expect_all(
        app.snapshot_path(vm, s2, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1)],
    );
}

#[tokio::test]
async fn a_commit_keeps_the_size_of_a_disk_that_grew_between_snapshots() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("grow-commit", &[("root", DISK)]).await;
    let (vm_id, disk_id) = (vm.id, vm.disks[0].id);
    write(app.active_path(vm_id, "root").await, 0x11, 0, 16);
    let s1 = app.snapshot(vm_id, "small").await.id;
    app.resize(vm_id, disk_id, 2 * DISK).await;
    write(app.active_path(vm_id, "root").await, 0x22, 100, 1);
    let s2 = app.snapshot(vm_id, "big").await.id;
    // s2's layer is small, so deleting s1 commits it into s1's 64 MiB layer.
    let job = app.delete_snapshot(s1).await;
    assert_eq!(merge_action(&job), MergeAction::Commit, "{job:?}");
    app.revert(s2).await;
    assert_eq!(app.vm(vm_id).await.disks[0].size_bytes, 2 * DISK);
    let present = app.active_path(vm_id, "root").await;
    expect_all(&present, &[(0x11, 0, 16), (0x22, 100, 1)]);
    check_clean(&present);
}

#[tokio::test]
async fn a_snapshot_requested_after_a_queued_delete_all_is_taken_after_the_collapse() {
    // A resize holds the VM's queue; delete-all and a new snapshot queue up behind it.
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "disk_resize:planned:pause=1500")]).await;
    let vm = app.create_vm("collapse-then-snap", &[("root", DISK)]).await;
    let (vm_id, disk_id) = (vm.id, vm.disks[0].id);
    write(app.active_path(vm_id, "root").await, 0x11, 0, 2);
    let _s1 = app.snapshot(vm_id, "s1").await.id;
    write(app.active_path(vm_id, "root").await, 0x22, 1, 1);
    let resize = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{vm_id}/disks/{disk_id}/resize"),
            Some(json!({"size_bytes": 2 * DISK})),
        )
        .await;
    let snapshots = format!("/v1/vms/{vm_id}/snapshots");
    let delete_all = app.accept(Method::DELETE, &snapshots, None).await;
    let create = app
        .accept(Method::POST, &snapshots, Some(json!({"name": "after"})))
        .await;
    for job in [&resize, &delete_all, &create] {
        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    }
    let items = snapshots_of(&app, vm_id).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].name, "after");
    assert_eq!(items[0].parent_id, None);
    let after = app.snapshot_path(vm_id, items[0].id, "root").await;
    assert_eq!(
        chain(&after).len(),
        1,
        "the snapshot froze the collapsed single file"
    );
    expect_all(&after, &[(0x11, 0, 1), (0x22, 1, 1)]);
    assert_eq!(app.volume_files().len(), 2);
    let (status, _) = app
        .patch(&format!("/v1/vms/{vm_id}"), json!({"state": "running"}))
        .await;
    assert_eq!(status, StatusCode::OK, "no job is left stuck on the VM");
}
