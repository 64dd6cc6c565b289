//! Linked and full clones: what each sees, that writes never leak between source and
//! clone, that the source's files a linked clone reads are protected (refused, or kept
//! until the clone is flattened), and that cloning the present state leaves the
//! source's snapshot tree as it was.

use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 32 * MIB;

async fn clone(app: &TestApp, source: &str, body: Value) -> Value {
    let job = app
        .expect_job(app.post(&format!("/v1/vms/{source}/clone"), body).await)
        .await;
    assert_eq!(job["kind"], "vm_clone");
    assert_eq!(job["detail"]["vm_ids"][0], job["target"]["id"]);
    let vm = app.vm(job["target"]["id"].as_str().unwrap()).await;
    assert_eq!(vm["status"], "ready");
    vm
}

fn problem_code(reply: &(StatusCode, Value)) -> (StatusCode, String) {
    (
        reply.0,
        reply.1["code"].as_str().unwrap_or_default().to_owned(),
    )
}

fn root_disk(vm: &Value) -> &Value {
    &vm["disks"][0]
}

#[tokio::test]
async fn a_linked_clone_of_a_snapshot_reads_it_and_writes_only_to_itself() {
    let app = TestApp::spawn().await;
    let source = id(&app.create_vm("golden", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0xa1, 0, 2);
    let s1 = app.snapshot(&source, "s1").await;
    write(&app.active_path(&source, "root").await, 0xa2, 2, 1);

    let clone_vm = clone(
        &app,
        &source,
        json!({"name": "linked", "mode": "linked", "snapshot_id": s1}),
    )
    .await;
    let clone_id = id(&clone_vm);
    assert_eq!(clone_vm["source_vm_id"], source.as_str());
    let frozen = app.snapshot_path(&source, &s1, "root").await;
    let clone_disk = root_disk(&clone_vm);
    assert_eq!(clone_disk["chain"].as_array().unwrap().len(), 1);
    let base_volume = frozen
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".qcow2");
    assert_eq!(clone_disk["source_volume_id"], base_volume);
    let clone_path = clone_disk["active_path"].as_str().unwrap().to_owned();
    // The clone sees the snapshot, not what the source wrote after it.
    expect_all(&clone_path, &[(0xa1, 0, 2), (0, 2, 1)]);
    assert_eq!(chain(&clone_path).len(), 2);

    // Writes on either side stay there.
    write(&clone_path, 0xb1, 4, 1);
    write(&app.active_path(&source, "root").await, 0xa3, 5, 1);
    expect_all(&frozen, &[(0xa1, 0, 2), (0, 2, 4)]);
    expect_all(
        &app.active_path(&source, "root").await,
        &[(0xa1, 0, 2), (0xa2, 2, 1), (0, 4, 1), (0xa3, 5, 1)],
    );
    expect_all(&clone_path, &[(0xa1, 0, 2), (0xb1, 4, 1), (0, 5, 1)]);
    let view = app.vm(&source).await;
    assert_eq!(view["dependent_vm_ids"], json!([clone_id]));

    // The layer the clone reads is protected: the snapshot and the VM cannot go.
    let refused = app.delete(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(
        problem_code(&refused),
        (StatusCode::CONFLICT, "has_dependents".into())
    );
    assert_eq!(refused.1["dependent_vms"][0]["id"], clone_id.as_str());
    assert_eq!(refused.1["dependent_vms"][0]["name"], "linked");
    let refused = app.delete(&format!("/v1/vms/{source}")).await;
    assert_eq!(
        problem_code(&refused),
        (StatusCode::CONFLICT, "has_dependents".into())
    );
    let refused = app.delete(&format!("/v1/vms/{source}/snapshots")).await;
    assert_eq!(
        problem_code(&refused),
        (StatusCode::CONFLICT, "has_dependents".into())
    );
    let (_, snap) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snap["status"], "ready", "a refusal changed the snapshot");
    expect_all(&clone_path, &[(0xa1, 0, 2), (0xb1, 4, 1)]);

    // Flattened, the clone stands alone and the source is free again.
    let disk_id = clone_disk["id"].as_str().unwrap();
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{clone_id}/disks/{disk_id}/flatten"),
                json!({}),
            )
            .await,
        )
        .await;
    assert_eq!(job["kind"], "disk_flatten");
    let flat = app.vm(&clone_id).await;
    assert!(root_disk(&flat)["source_volume_id"].is_null());
    assert_eq!(chain(&clone_path).len(), 1);
    let again = app
        .post(
            &format!("/v1/vms/{clone_id}/disks/{disk_id}/flatten"),
            json!({}),
        )
        .await;
    assert_eq!(
        problem_code(&again),
        (StatusCode::CONFLICT, "disk_not_linked".into())
    );
    app.delete_snapshot(&s1).await;
    app.expect_job(app.delete(&format!("/v1/vms/{source}")).await)
        .await;
    expect_all(&clone_path, &[(0xa1, 0, 2), (0, 2, 2), (0xb1, 4, 1)]);
    check_clean(&clone_path);
    assert_eq!(app.volume_files().len(), 1);
}

#[tokio::test]
async fn a_linked_clone_of_the_present_state_leaves_the_source_tree_as_it_was() {
    let app = TestApp::spawn().await;
    let source = id(&app
        .create_vm("present", &[("root", DISK), ("data", DISK)])
        .await);
    write(&app.active_path(&source, "root").await, 0x11, 0, 1);
    let s1 = app.snapshot(&source, "s1").await;
    write(&app.active_path(&source, "root").await, 0x12, 1, 1);
    write(&app.active_path(&source, "data").await, 0x21, 0, 1);
    let before = app.vm(&source).await;
    let (_, tree_before) = app
        .get(&format!("/v1/vms/{source}/snapshots?view=tree"))
        .await;

    // The present state of a running VM cannot be frozen offline.
    app.patch(&format!("/v1/vms/{source}"), json!({"state": "running"}))
        .await;
    let refused = app
        .post(
            &format!("/v1/vms/{source}/clone"),
            json!({"name": "x", "mode": "linked"}),
        )
        .await;
    assert_eq!(
        problem_code(&refused),
        (StatusCode::CONFLICT, "vm_running".into())
    );
    let name = app.vm(&source).await["name"].as_str().unwrap().to_owned();
    assert_eq!(
        refused.1["detail"],
        format!("VM {name} is running; stop it first to clone its present state"),
        "the message names the VM and what to do"
    );
    app.patch(&format!("/v1/vms/{source}"), json!({"state": "stopped"}))
        .await;

    let clone_vm = clone(&app, &source, json!({"name": "now", "mode": "linked"})).await;
    let clone_id = id(&clone_vm);
    let (_, tree_after) = app
        .get(&format!("/v1/vms/{source}/snapshots?view=tree"))
        .await;
    assert_eq!(
        tree_after, tree_before,
        "the source's snapshot tree changed"
    );
    let after = app.vm(&source).await;
    assert_eq!(after["current_snapshot_id"], before["current_snapshot_id"]);
    // Each source disk got a new writable layer over the frozen present state.
    let roles: Vec<&str> = after["disks"][0]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["active", "shared", "snapshot"]);

    let clone_root = app.active_path(&clone_id, "root").await;
    let clone_data = app.active_path(&clone_id, "data").await;
    expect_all(&clone_root, &[(0x11, 0, 1), (0x12, 1, 1)]);
    expect_all(&clone_data, &[(0x21, 0, 1)]);
    write(&app.active_path(&source, "root").await, 0x13, 2, 1);
    write(&clone_root, 0x31, 3, 1);
    expect_all(
        &clone_root,
        &[(0x11, 0, 1), (0x12, 1, 1), (0, 2, 1), (0x31, 3, 1)],
    );
    expect_all(
        &app.active_path(&source, "root").await,
        &[(0x11, 0, 1), (0x12, 1, 1), (0x13, 2, 1), (0, 3, 1)],
    );

    // s1 lies under the shared layer the clone reads: protected.
    let refused = app.delete(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(
        problem_code(&refused),
        (StatusCode::CONFLICT, "has_dependents".into())
    );
    // Without the clone, s1 merges normally and every byte of the source stays.
    app.expect_job(app.delete(&format!("/v1/vms/{clone_id}")).await)
        .await;
    app.delete_snapshot(&s1).await;
    let present = app.active_path(&source, "root").await;
    expect_all(&present, &[(0x11, 0, 1), (0x12, 1, 1), (0x13, 2, 1)]);
    check_clean(&present);
    assert_eq!(app.vm(&source).await["dependent_vm_ids"], json!([]));
}

#[tokio::test]
async fn a_full_clone_equals_its_source_and_outlives_it() {
    let app = TestApp::spawn().await;
    let source = id(&app.create_vm("original", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x41, 0, 3);
    let s1 = app.snapshot(&source, "s1").await;
    write(&app.active_path(&source, "root").await, 0x42, 8, 2);

    let chain_before = app.vm(&source).await["disks"][0]["chain"].clone();
    let copy = clone(&app, &source, json!({"name": "copy", "mode": "full"})).await;
    // Its temporary layer merged back, the source's chain is exactly as it was.
    assert_eq!(app.vm(&source).await["disks"][0]["chain"], chain_before);
    let of_snapshot = clone(
        &app,
        &source,
        json!({"name": "copy-s1", "mode": "full", "snapshot_id": s1}),
    )
    .await;
    let copy_path = root_disk(&copy)["active_path"].as_str().unwrap().to_owned();
    let snap_copy_path = root_disk(&of_snapshot)["active_path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        chain(&copy_path).len(),
        1,
        "a full clone has no backing file"
    );
    assert_eq!(chain(&snap_copy_path).len(), 1);
    assert!(root_disk(&copy)["source_volume_id"].is_null());
    compare(&copy_path, &app.active_path(&source, "root").await);
    compare(
        &snap_copy_path,
        &app.snapshot_path(&source, &s1, "root").await,
    );
    // Sparse: only the written 5 MiB (plus metadata) are allocated.
    let allocated = root_disk(&copy)["chain"][0]["allocated_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        allocated < 8 * MIB,
        "{allocated} bytes allocated for 5 MiB of data"
    );
    assert!(app.vm(&source).await["dependent_vm_ids"] == json!([]));

    app.expect_job(app.delete(&format!("/v1/vms/{source}")).await)
        .await;
    expect_all(&copy_path, &[(0x41, 0, 3), (0, 3, 5), (0x42, 8, 2)]);
    expect_all(&snap_copy_path, &[(0x41, 0, 3), (0, 3, 7)]);
    check_clean(&copy_path);
    check_clean(&snap_copy_path);
    assert_eq!(app.volume_files().len(), 2);
}

#[tokio::test]
async fn a_cancelled_full_clone_leaves_no_vm_and_no_file() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=1500")]).await;
    let source = id(&app.create_vm("busy", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x51, 0, 4);
    let files_before = app.volume_files();
    let (status, job) = app
        .post(
            &format!("/v1/vms/{source}/clone"),
            json!({"name": "doomed", "mode": "full"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let new_vm = job["target"]["id"].as_str().unwrap().to_owned();
    let (_, pending) = app.get(&format!("/v1/vms/{new_vm}")).await;
    assert_eq!(pending["status"], "creating");
    // Jobs of both VMs list it.
    let (_, listed) = app.get(&format!("/v1/jobs?vm_id={new_vm}")).await;
    assert_eq!(listed["items"][0]["id"], job["id"]);
    let (status, _) = app
        .post(
            &format!("/v1/jobs/{}/cancel", job["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let ended = app.wait_job_end(&job).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    let (status, _) = app.get(&format!("/v1/vms/{new_vm}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(app.volume_files(), files_before);
    expect(&app.active_path(&source, "root").await, 0x51, 0, 4);
}

#[tokio::test]
async fn clone_requests_are_validated_and_change_nothing_when_refused() {
    let app = TestApp::spawn().await;
    let source = id(&app.create_vm("src", &[("root", DISK)]).await);
    let other = id(&app.create_vm("other", &[("root", DISK)]).await);
    let other_snapshot = app.snapshot(&other, "theirs").await;
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
    for (body, status, code) in cases {
        let reply = app
            .post(&format!("/v1/vms/{source}/clone"), body.clone())
            .await;
        assert_eq!(
            problem_code(&reply),
            (status, code.to_owned()),
            "{body}: {}",
            reply.1
        );
    }
    let reply = app
        .post(
            &format!("/v1/vms/{UNKNOWN_ID}/clone"),
            json!({"name": "c", "mode": "linked"}),
        )
        .await;
    assert_eq!(
        problem_code(&reply),
        (StatusCode::NOT_FOUND, "vm_not_found".into())
    );
    let (_, vms) = app.get("/v1/vms").await;
    assert_eq!(
        vms["items"].as_array().unwrap().len(),
        2,
        "a refused clone left a VM"
    );
    let disk = root_disk(&app.vm(&source).await)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reply = app
        .post(&format!("/v1/vms/{source}/disks/{disk}/flatten"), json!({}))
        .await;
    assert_eq!(
        problem_code(&reply),
        (StatusCode::CONFLICT, "disk_not_linked".into())
    );
    let reply = app
        .post(
            &format!("/v1/vms/{source}/disks/{UNKNOWN_ID}/flatten"),
            json!({}),
        )
        .await;
    assert_eq!(
        problem_code(&reply),
        (StatusCode::NOT_FOUND, "disk_not_found".into())
    );
}

#[tokio::test]
async fn flatten_dependents_streams_the_shared_data_into_clones_before_deleting() {
    let app = TestApp::spawn().await;
    let source = id(&app.create_vm("base", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0xc1, 0, 2);
    let s1 = app.snapshot(&source, "s1").await;
    write(&app.active_path(&source, "root").await, 0xc2, 2, 1);
    let s2 = app.snapshot(&source, "s2").await;
    write(&app.active_path(&source, "root").await, 0xc3, 3, 1);
    let a = id(&clone(
        &app,
        &source,
        json!({"name": "a", "mode": "linked", "snapshot_id": s1}),
    )
    .await);
    let b = id(&clone(
        &app,
        &source,
        json!({"name": "b", "mode": "linked", "snapshot_id": s2}),
    )
    .await);
    write(&app.active_path(&a, "root").await, 0xa0, 5, 1);
    write(&app.active_path(&b, "root").await, 0xb0, 5, 1);

    // A running dependent cannot be flattened under its guest.
    app.patch(&format!("/v1/vms/{a}"), json!({"state": "running"}))
        .await;
    let refused = app
        .delete(&format!("/v1/snapshots/{s1}?flatten_dependents=true"))
        .await;
    assert_eq!(
        problem_code(&refused),
        (StatusCode::CONFLICT, "vm_running".into())
    );
    app.patch(&format!("/v1/vms/{a}"), json!({"state": "stopped"}))
        .await;

    // Deleting s1 merges s1's layer with s2's: both clones read it, both are flattened.
    let job = app
        .expect_job(
            app.delete(&format!("/v1/snapshots/{s1}?flatten_dependents=true"))
                .await,
        )
        .await;
    assert_eq!(job["kind"], "snapshot_delete");
    for (vm, own) in [
        (&a, [(0xc1, 0, 2), (0, 2, 2)]),
        (&b, [(0xc1, 0, 2), (0xc2, 2, 1)]),
    ] {
        let view = app.vm(vm).await;
        assert!(root_disk(&view)["source_volume_id"].is_null(), "{view}");
        let path = app.active_path(vm, "root").await;
        assert_eq!(chain(&path).len(), 1);
        expect_all(&path, &own);
        check_clean(&path);
    }
    expect(&app.active_path(&a, "root").await, 0xa0, 5, 1);
    expect(&app.active_path(&b, "root").await, 0xb0, 5, 1);
    assert_eq!(app.vm(&source).await["dependent_vm_ids"], json!([]));

    // The same for a whole VM.
    let c = id(&clone(
        &app,
        &source,
        json!({"name": "c", "mode": "linked", "snapshot_id": s2}),
    )
    .await);
    let refused = app.delete(&format!("/v1/vms/{source}")).await;
    assert_eq!(
        problem_code(&refused),
        (StatusCode::CONFLICT, "has_dependents".into())
    );
    app.expect_job(
        app.delete(&format!("/v1/vms/{source}?flatten_dependents=true"))
            .await,
    )
    .await;
    let path = app.active_path(&c, "root").await;
    expect_all(&path, &[(0xc1, 0, 2), (0xc2, 2, 1), (0, 3, 1)]);
    assert_eq!(chain(&path).len(), 1);
    assert_eq!(app.volume_files().len(), 3);
}

#[tokio::test]
async fn a_full_clone_reports_progress_and_a_cancel_between_disks_removes_every_copy() {
    // Steps: a temporary layer on each of the 2 source disks, then the 2 copies; the
    // job pauses after the first copy (step 2).
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:after-step-2:pause=1500")]).await;
    let source = id(&app
        .create_vm("two", &[("root", DISK), ("data", DISK)])
        .await);
    write(&app.active_path(&source, "root").await, 0xd1, 0, 4);
    write(&app.active_path(&source, "data").await, 0xd2, 0, 4);
    let files_before = app.volume_files();
    let (status, job) = app
        .post(
            &format!("/v1/vms/{source}/clone"),
            json!({"name": "half", "mode": "full"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // The first disk is copied, the job pauses: its progress shows it.
    let id_ = job["id"].as_str().unwrap().to_owned();
    let mut progress = 0;
    for _ in 0..100 {
        let (_, now) = app.get(&format!("/v1/jobs/{id_}")).await;
        progress = now["progress"].as_u64().unwrap();
        if progress >= 70 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        progress >= 70,
        "progress {progress} after one of two copies"
    );
    app.post(&format!("/v1/jobs/{id_}/cancel"), json!({})).await;
    let ended = app.wait_job_end(&job).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(app.volume_files(), files_before, "a copy was left behind");
    let (status, _) = app
        .get(&format!(
            "/v1/vms/{}",
            job["target"]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_clone_interrupted_by_a_crash_completes_after_restart() {
    let mut app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:after-step-0")]).await;
    let source = id(&app
        .create_vm("crash", &[("root", DISK), ("data", DISK)])
        .await);
    write(&app.active_path(&source, "root").await, 0xe1, 0, 2);
    write(&app.active_path(&source, "data").await, 0xe2, 0, 2);
    let (status, job) = app
        .post(
            &format!("/v1/vms/{source}/clone"),
            json!({"name": "resumed", "mode": "full"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(!app.wait_exit().success());
    app.restart(&[]).await;
    let ended = app.wait_job_end(&job).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_eq!(ended["progress"], 100);
    let clone_id = job["target"]["id"].as_str().unwrap();
    compare(
        &app.active_path(clone_id, "root").await,
        &app.active_path(&source, "root").await,
    );
    compare(
        &app.active_path(clone_id, "data").await,
        &app.active_path(&source, "data").await,
    );
    assert_eq!(app.volume_files().len(), 4);
}

#[tokio::test]
async fn a_linked_clone_not_made_yet_already_protects_its_source_and_itself() {
    // The clone job is held after planning: accepted, running, no file made yet.
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=4000")]).await;
    app.wait_ready().await;
    let source = id(&app.create_vm("source", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x31, 0, 4);
    let golden = app.snapshot(&source, "golden").await;
    let (status, job) = app
        .post(
            &format!("/v1/vms/{source}/clone"),
            json!({"name": "early", "mode": "linked", "snapshot_id": golden}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let clone = job["target"]["id"].as_str().unwrap().to_owned();

    // Everything that would rewrite or remove the layers the clone will read is
    // refused now, naming the clone, rather than accepted and failed later.
    let refusals = [
        app.delete(&format!("/v1/snapshots/{golden}")).await,
        app.delete(&format!("/v1/vms/{source}")).await,
        app.delete(&format!("/v1/vms/{source}/snapshots")).await,
        app.post(&format!("/v1/vms/{source}/convert-to-template"), json!({}))
            .await,
    ];
    for (status, body) in refusals {
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["code"], "has_dependents", "{body}");
        assert_eq!(body["dependent_vms"][0]["id"], clone.as_str(), "{body}");
    }
    // The clone itself cannot be deleted while its creation runs: the job would set
    // it ready again afterwards.
    let (status, body) = app.delete(&format!("/v1/vms/{clone}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "vm_not_ready", "{body}");

    let job = app.wait_job_end(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.vm(&clone).await["status"], "ready");
    expect(&app.active_path(&clone, "root").await, 0x31, 0, 4);
    expect(
        &app.snapshot_path(&source, &golden, "root").await,
        0x31,
        0,
        4,
    );
    // Once made, the clone is an ordinary VM: it can be deleted, and then the source's
    // snapshot too.
    app.expect_job(app.delete(&format!("/v1/vms/{clone}")).await)
        .await;
    app.delete_snapshot(&golden).await;
}

/// The volume files in the data directory are exactly those the present states and
/// snapshots of these VMs read.
async fn assert_only_referenced_files(app: &TestApp, vms: &[&str]) {
    let mut referenced: Vec<String> = Vec::new();
    for vm in vms {
        let view = app.vm(vm).await;
        for disk in view["disks"].as_array().unwrap() {
            // The whole backing chain: a linked clone's continues into its source's.
            referenced.extend(chain(disk["active_path"].as_str().unwrap()));
        }
        let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
        for snapshot in list["items"].as_array().unwrap() {
            for volume in snapshot["volumes"].as_array().unwrap() {
                for layer in chain(volume["path"].as_str().unwrap()) {
                    referenced.push(layer);
                }
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
        let source = id(&app
            .create_vm(&format!("origin-{clone_goes_first}"), &[("root", DISK)])
            .await);
        write(&app.active_path(&source, "root").await, 0x61, 0, 2);
        let s0 = app.snapshot(&source, "s0").await;
        write(&app.active_path(&source, "root").await, 0x62, 2, 2);
        // The present is frozen into a shared layer the clone sits on.
        let clone = clone(
            &app,
            &source,
            json!({"name": format!("reader-{clone_goes_first}"), "mode": "linked"}),
        )
        .await;
        let clone = id(&clone);
        expect_all(
            &app.active_path(&clone, "root").await,
            &[(0x61, 0, 2), (0x62, 2, 2)],
        );
        if clone_goes_first {
            app.expect_job(app.delete(&format!("/v1/vms/{clone}")).await)
                .await;
            app.revert(&s0).await;
        } else {
            app.revert(&s0).await;
            // Still read by the clone.
            assert_only_referenced_files(&app, &[&source, &clone]).await;
            app.expect_job(app.delete(&format!("/v1/vms/{clone}")).await)
                .await;
        }
        // Nothing reads the shared layer any more: its file is gone too.
        assert_only_referenced_files(&app, &[&source]).await;
        let active = app.active_path(&source, "root").await;
        expect_all(&active, &[(0x61, 0, 2), (0, 2, 2)]);
        check_clean(&active);
        app.expect_job(app.delete(&format!("/v1/vms/{source}")).await)
            .await;
    }
    assert!(app.volume_files().is_empty(), "{:?}", app.volume_files());
}

#[tokio::test]
async fn a_snapshot_a_pending_full_clone_copies_cannot_be_deleted_under_it() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=3000")]).await;
    app.wait_ready().await;
    let source = id(&app.create_vm("copied", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x71, 0, 2);
    let golden = app.snapshot(&source, "golden").await;
    let (status, job) = app
        .post(
            &format!("/v1/vms/{source}/clone"),
            json!({"name": "copy", "mode": "full", "snapshot_id": golden}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let (status, body) = app.delete(&format!("/v1/snapshots/{golden}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "snapshot_busy", "{body}");
    assert_eq!(body["job_ids"][0], job["id"], "{body}");
    assert_eq!(app.wait_job_end(&job).await["status"], "succeeded");
    let copy = job["target"]["id"].as_str().unwrap().to_owned();
    expect(&app.active_path(&copy, "root").await, 0x71, 0, 2);
    app.delete_snapshot(&golden).await;
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
        let source = id(&app
            .create_vm(&format!("origin-{round}"), &[("root", DISK)])
            .await);
        write(&app.active_path(&source, "root").await, 0x61, 0, 2);
        let s0 = app.snapshot(&source, "s0").await;
        write(&app.active_path(&source, "root").await, 0x62, 2, 2);
        // The present is frozen into a shared layer the clone sits on; a snapshot is
        // then taken on top of it, and the source goes back to s0.
        let reader = clone(
            &app,
            &source,
            json!({"name": format!("reader-{round}"), "mode": "linked"}),
        )
        .await;
        let reader = id(&reader);
        write(&app.active_path(&source, "root").await, 0x63, 4, 2);
        let s1 = app.snapshot(&source, "s1").await;
        app.revert(&s0).await;
        assert_only_referenced_files(&app, &[&source, &reader]).await;
        if round == 0 {
            app.expect_job(app.delete(&format!("/v1/vms/{reader}")).await)
                .await;
            // s1 still reads the shared layer.
            assert_only_referenced_files(&app, &[&source]).await;
            expect_all(
                &app.snapshot_path(&source, &s1, "root").await,
                &[(0x61, 0, 2), (0x62, 2, 2), (0x63, 4, 2)],
            );
            app.delete_snapshot(&s1).await;
            assert_only_referenced_files(&app, &[&source]).await;
        } else {
            app.delete_snapshot(&s1).await;
            // The clone still reads the shared layer.
            assert_only_referenced_files(&app, &[&source, &reader]).await;
            let disk = app.vm(&reader).await["disks"][0]["id"]
                .as_str()
                .unwrap()
                .to_owned();
            app.expect_job(
                app.post(&format!("/v1/vms/{reader}/disks/{disk}/flatten"), json!({}))
                    .await,
            )
            .await;
            let flat = app.active_path(&reader, "root").await;
            assert_eq!(chain(&flat).len(), 1, "{ending}: the clone is standalone");
            expect_all(&flat, &[(0x61, 0, 2), (0x62, 2, 2), (0, 4, 2)]);
            assert_only_referenced_files(&app, &[&source, &reader]).await;
            app.expect_job(app.delete(&format!("/v1/vms/{reader}")).await)
                .await;
        }
        let active = app.active_path(&source, "root").await;
        expect_all(&active, &[(0x61, 0, 2), (0, 2, 4)]);
        check_clean(&active);
        app.expect_job(app.delete(&format!("/v1/vms/{source}")).await)
            .await;
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
    let source = id(&app.create_vm("trunk", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x61, 0, 2);
    let s0 = app.snapshot(&source, "s0").await;
    write(&app.active_path(&source, "root").await, 0x62, 2, 2);
    let reader = id(&clone(&app, &source, json!({"name": "branchy", "mode": "linked"})).await);
    app.revert(&s0).await;

    // On the clone: s1 and s2 in a row, back to s1, then s1 deleted. Its layer (the
    // clone's lowest) is a branch point, streamed into both branches: the clone's disk
    // now sits on its source twice.
    write(&app.active_path(&reader, "root").await, 0x71, 4, 1);
    let s1 = app.snapshot(&reader, "s1").await;
    write(&app.active_path(&reader, "root").await, 0x72, 5, 1);
    let s2 = app.snapshot(&reader, "s2").await;
    app.revert(&s1).await;
    write(&app.active_path(&reader, "root").await, 0x73, 6, 1);
    app.delete_snapshot(&s1).await;
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
    expect_all(&app.active_path(&reader, "root").await, &present);
    expect_all(&app.snapshot_path(&reader, &s2, "root").await, &at_s2);

    // Flattening cuts both links; the source's layer they sat on then goes.
    let disk = app.vm(&reader).await["disks"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = app
        .expect_job(
            app.post(&format!("/v1/vms/{reader}/disks/{disk}/flatten"), json!({}))
                .await,
        )
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let active = app.active_path(&reader, "root").await;
    let layer = app.snapshot_path(&reader, &s2, "root").await;
    assert_eq!(chain(&active).len(), 1, "the present is standalone");
    assert_eq!(chain(&layer).len(), 1, "s2's branch is standalone");
    expect_all(&active, &present);
    expect_all(&layer, &at_s2);
    check_clean(&active);
    check_clean(&layer);
    assert_only_referenced_files(&app, &[&source, &reader]).await;
    expect_all(
        &app.active_path(&source, "root").await,
        &[(0x61, 0, 2), (0, 2, 6)],
    );
}

#[tokio::test]
async fn a_clone_queued_behind_a_grow_gets_the_grown_size() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "disk_resize:planned:pause=1500")]).await;
    let source = id(&app.create_vm("growing", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x51, 0, 2);
    let disk = app.vm(&source).await["disks"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let grown = 2 * DISK;
    let (status, resize) = app
        .post(
            &format!("/v1/vms/{source}/disks/{disk}/resize"),
            json!({"size_bytes": grown}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resize}");
    let mut clones = Vec::new();
    for mode in ["linked", "full"] {
        let (status, job) = app
            .post(
                &format!("/v1/vms/{source}/clone"),
                json!({"name": format!("after-grow-{mode}"), "mode": mode}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        clones.push(job);
    }
    assert_eq!(app.wait_job_end(&resize).await["status"], "succeeded");
    for job in &clones {
        let ended = app.wait_job_end(job).await;
        assert_eq!(ended["status"], "succeeded", "{ended}");
        let clone = job["target"]["id"].as_str().unwrap();
        let view = app.vm(clone).await;
        assert_eq!(view["disks"][0]["size_bytes"], grown, "{view}");
        let active = app.active_path(clone, "root").await;
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2", &active])
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], grown, "{info}");
        expect_all(&active, &[(0x51, 0, 2), (0, 2, 62)]);
    }
}

#[tokio::test]
async fn a_clone_queued_behind_a_new_disk_of_its_source_gets_that_disk() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "disk_create:planned:pause=1500")]).await;
    let source = id(&app.create_vm("widening", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x52, 0, 2);
    let (status, added) = app
        .post(
            &format!("/v1/vms/{source}/disks"),
            json!({"name": "data", "size_bytes": DISK}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{added}");
    let mut clones = Vec::new();
    for mode in ["linked", "full"] {
        let (status, job) = app
            .post(
                &format!("/v1/vms/{source}/clone"),
                json!({"name": format!("wide-{mode}"), "mode": mode}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        clones.push(job);
    }
    assert_eq!(app.wait_job_end(&added).await["status"], "succeeded");
    for job in &clones {
        let ended = app.wait_job_end(job).await;
        assert_eq!(ended["status"], "succeeded", "{ended}");
        let clone = job["target"]["id"].as_str().unwrap();
        let mut names: Vec<String> = app.vm(clone).await["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["data", "root"],
            "the clone is of the present when it ran"
        );
        expect_all(&app.active_path(clone, "root").await, &[(0x52, 0, 2)]);
        expect_all(&app.active_path(clone, "data").await, &[(0, 0, 32)]);
    }
}

#[tokio::test]
async fn a_collapse_behind_a_linked_clone_of_the_present_is_refused_at_once() {
    // The clone job is held after planning: it has not frozen the present yet.
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=3000")]).await;
    app.wait_ready().await;
    let source = id(&app.create_vm("source", &[("root", DISK)]).await);
    write(&app.active_path(&source, "root").await, 0x35, 0, 2);
    let (status, job) = app
        .post(
            &format!("/v1/vms/{source}/clone"),
            json!({"name": "present", "mode": "linked"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let clone = job["target"]["id"].as_str().unwrap().to_owned();

    // Once the clone runs, the present it froze is a layer it reads: collapsing the
    // source's (empty) snapshot tree would rewrite it. Refused now, naming the clone,
    // not accepted and failed when it runs (stress seed 2).
    let (status, body) = app.delete(&format!("/v1/vms/{source}/snapshots")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "has_dependents", "{body}");
    assert_eq!(body["dependent_vms"][0]["id"], clone.as_str(), "{body}");

    let job = app.wait_job_end(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    expect(&app.active_path(&clone, "root").await, 0x35, 0, 2);
    expect(&app.active_path(&source, "root").await, 0x35, 0, 2);
    // And once it exists, the same request is refused for the same reason.
    let (status, body) = app.delete(&format!("/v1/vms/{source}/snapshots")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("has_dependents")),
        "{body}"
    );
}
