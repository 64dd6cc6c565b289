//! The core promise under the faults no fault point was planted for: strata or its
//! qemu-img killed at an arbitrary instant of a data-moving step, and a cancel racing
//! the end of a step. Each test pins down a way bytes were once lost.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

const DISK: u64 = 384 * MIB;

/// What the present state of `stream_setup`'s disk reads.
const STREAMED: &[(u8, u64, u64)] = &[
    (0x11, 0, 100),
    (0, 100, 20),
    (0x22, 120, 150),
    (0, 270, 114),
];

/// A VM whose snapshot `s0` holds 100 MiB under a bigger present layer, so deleting
/// `s0` streams those 100 MiB up into the present layer (a safe rebase). Returns the
/// VM and the snapshot.
async fn stream_setup(app: &TestApp, name: &str) -> (Uuid, Uuid) {
    let vm = app.create_vm(name, &[("root", DISK)]).await.id;
    write(app.active_path(vm, "root").await, 0x11, 0, 100);
    let s0 = app.snapshot(vm, "s0").await.id;
    write(app.active_path(vm, "root").await, 0x22, 120, 150);
    (vm, s0)
}

/// The VM's one disk reads `regions`, every file is clean and the chain on disk is
/// the one the API shows.
async fn assert_present(app: &TestApp, vm: Uuid, regions: &[(u8, u64, u64)]) {
    let view = app.vm(vm).await;
    let disk = &view.disks[0];
    let active = disk.path();
    expect_all(active, regions);
    check_clean(active);
    let file_chain = chain(active);
    assert_eq!(file_chain.len(), disk.chain.len(), "{disk:?}");
    for entry in &disk.chain {
        assert_eq!(entry.status, VolumeStatus::Ready, "{entry:?}");
    }
}

#[tokio::test]
async fn killing_strata_at_any_moment_of_a_stream_loses_no_byte() {
    let mut app = TestApp::spawn().await;
    for (round, delay_ms) in [0u64, 150, 400, 900].into_iter().enumerate() {
        let (vm, s0) = stream_setup(&app, &format!("streamed-{round}")).await;
        let job = app
            .accept(Method::DELETE, &format!("/v1/snapshots/{s0}"), None)
            .await;
        wait_for_child(app.pid().unwrap(), "qemu-img").await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        app.kill();
        app.restart(&[]).await;

        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "round {round}: {job:?}");
        assert_present(&app, vm, STREAMED).await;
        let (status, _) = app.get(&format!("/v1/snapshots/{s0}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // Nothing is left of the dropped layers.
    assert_eq!(app.volume_files().len(), 4);
}

#[tokio::test]
async fn a_killed_qemu_img_in_the_middle_of_a_stream_is_run_again() {
    let app = TestApp::spawn().await;
    for (round, delay_ms) in [50u64, 500].into_iter().enumerate() {
        let (vm, s0) = stream_setup(&app, &format!("retried-{round}")).await;
        let job = app
            .accept(Method::DELETE, &format!("/v1/snapshots/{s0}"), None)
            .await;
        let child = wait_for_child(app.pid().unwrap(), "qemu-img").await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        kill_process(child);

        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "round {round}: {job:?}");
        assert_present(&app, vm, STREAMED).await;
    }
}

#[tokio::test]
async fn killing_strata_while_a_linked_clone_is_flattened_loses_no_byte() {
    let mut app = TestApp::spawn().await;
    let source = app.create_vm("source", &[("root", 256 * MIB)]).await.id;
    write(app.active_path(source, "root").await, 0x44, 0, 128);
    let golden = app.snapshot(source, "golden").await.id;
    let body = json!({"name": "clone", "mode": "linked", "snapshot_id": golden});
    let clone = app
        .run_job(Method::POST, &format!("/v1/vms/{source}/clone"), Some(body))
        .await
        .target
        .id;
    write(app.active_path(clone, "root").await, 0x55, 200, 8);
    let disk = app.vm(clone).await.disks[0].id;

    let job = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{clone}/disks/{disk}/flatten"),
            Some(json!({})),
        )
        .await;
    wait_for_child(app.pid().unwrap(), "qemu-img").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.kill();
    app.restart(&[]).await;

    let job = app.wait_job(job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let regions = [(0x44, 0, 128), (0, 128, 72), (0x55, 200, 8), (0, 208, 48)];
    assert_present(&app, clone, &regions).await;
    assert_eq!(chain(app.active_path(clone, "root").await).len(), 1);
    // The source's snapshot is untouched and can go now.
    expect(
        app.snapshot_path(source, golden, "root").await,
        0x44,
        0,
        128,
    );
    app.delete_snapshot(golden).await;
}

#[tokio::test]
async fn a_cancel_racing_the_end_of_a_stream_leaves_files_and_records_agreeing() {
    let app = TestApp::spawn().await;
    let present = [(0x21, 0, 2), (0, 2, 6), (0x22, 8, 8), (0, 16, 48)];
    for round in 0..10u64 {
        // A small snapshot layer under a bigger present one: the delete streams.
        let vm = app
            .create_vm(&format!("racy-{round}"), &[("root", 64 * MIB)])
            .await
            .id;
        write(app.active_path(vm, "root").await, 0x21, 0, 2);
        let snapshot = app.snapshot(vm, "s").await.id;
        write(app.active_path(vm, "root").await, 0x22, 8, 8);

        let job = app
            .accept(Method::DELETE, &format!("/v1/snapshots/{snapshot}"), None)
            .await;
        tokio::time::sleep(Duration::from_millis(round * 6)).await;
        let (status, _) = app
            .post(&format!("/v1/jobs/{}/cancel", job.id), json!({}))
            .await;
        assert!(
            status == StatusCode::ACCEPTED || status == StatusCode::CONFLICT,
            "{status}"
        );
        let job = app.wait_job(job.id).await;
        let (status, _) = app.get(&format!("/v1/snapshots/{snapshot}")).await;
        match job.status {
            JobStatus::Succeeded => assert_eq!(status, StatusCode::NOT_FOUND),
            JobStatus::Cancelled => assert_eq!(status, StatusCode::OK),
            other => panic!("round {round}: job ended {other:?}: {job:?}"),
        }
        assert_present(&app, vm, &present).await;

        // The chain the records describe is the one on disk: collapsing it works.
        app.snapshot(vm, "later").await;
        app.run_job(Method::DELETE, &format!("/v1/vms/{vm}/snapshots"), None)
            .await;
        assert_present(&app, vm, &present).await;
        assert_eq!(chain(app.active_path(vm, "root").await).len(), 1);
    }
}

/// Raise the refcount of the first cluster past the end of a qcow2 file to 1, with
/// nothing referencing it: what a qemu-img killed between allocating a cluster and
/// writing it leaves (the refcount update reached the file, the cluster did not).
/// `qemu-img check` only scans clusters inside the file, so it finds nothing.
fn count_a_cluster_past_the_end(path: &str) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut header = [0u8; 56];
    file.read_exact(&mut header).unwrap();
    let cluster_bits = u32::from_be_bytes(header[20..24].try_into().unwrap());
    let refcount_table = u64::from_be_bytes(header[48..56].try_into().unwrap());
    let order = u32::from_be_bytes({
        // refcount_order, in a version 3 header at offset 96.
        let mut order = [0u8; 4];
        file.seek(SeekFrom::Start(96)).unwrap();
        file.read_exact(&mut order).unwrap();
        order
    });
    assert_eq!(order, 4, "16-bit refcounts");
    let mut block = [0u8; 8];
    file.seek(SeekFrom::Start(refcount_table)).unwrap();
    file.read_exact(&mut block).unwrap();
    let block = u64::from_be_bytes(block);
    let len = file.metadata().unwrap().len();
    let past_end = len.div_ceil(1 << cluster_bits);
    assert!(
        past_end < 1 << (cluster_bits - 1),
        "within the first refcount block"
    );
    file.seek(SeekFrom::Start(block + 2 * past_end)).unwrap();
    file.write_all(&1u16.to_be_bytes()).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test]
async fn a_cluster_a_killed_qemu_img_counted_past_the_end_of_a_layer_is_freed_by_its_next_merge() {
    // A cancel or a kill can stop a stream just after it counted a new cluster past the
    // end of the file; the repair that follows (`check -r leaks`) cannot see it. The
    // next stream into that file grew it over the cluster and left it a leak (stress
    // seed 2: "Leaked cluster 4 refcount=1 reference=0" in a layer flattened after a
    // cancelled flattening delete).
    let app = TestApp::spawn().await;
    let source = app.create_vm("counted", &[("root", 32 * MIB)]).await.id;
    write(&app.active_path(source, "root").await, 0x61, 0, 4);
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{source}/clone"),
                json!({"name": "reader", "mode": "linked"}),
            )
            .await,
        )
        .await;
    let clone = job.target.id;
    let layer = app.active_path(clone, "root").await;
    count_a_cluster_past_the_end(&layer);
    check_clean(&layer);

    let disk = app.vm(clone).await.disks[0].id;
    app.expect_job(
        app.post(&format!("/v1/vms/{clone}/disks/{disk}/flatten"), json!({}))
            .await,
    )
    .await;
    let flat = app.active_path(clone, "root").await;
    assert_eq!(flat, layer, "the link layer was streamed in place");
    assert_eq!(chain(&flat).len(), 1);
    expect_all(&flat, &[(0x61, 0, 4), (0, 4, 28)]);
    check_clean(&flat);
}
