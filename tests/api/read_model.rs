//! The read model: views served from memory show every acknowledged write at once,
//! match the database (every test runs with `--verify-reads`, which renders each view
//! served from memory again from the database and fails the request on a difference),
//! start empty after a restart, and still show what changes without a write (a
//! guest's writes growing a volume file).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

/// GET `path`, which must answer 200.
async fn read(app: &TestApp, path: &str) -> Value {
    let (status, body) = app.get(path).await;
    assert!(status.is_success(), "GET {path}: {status} {body}");
    body
}

#[tokio::test]
async fn a_read_right_after_each_acknowledged_write_shows_it() {
    let app = TestApp::spawn().await;
    // Read before the write too, so a stale view would be in memory to be served.
    let vm = app.create_vm("before", &[("root", 64 * MIB)]).await.id;
    let path = format!("/v1/vms/{vm}");
    assert_eq!(read(&app, &path).await["name"], "before");

    let (status, body) = app
        .patch(&path, json!({"name": "after", "labels": {"tier": "web"}}))
        .await;
    assert!(status.is_success(), "{body}");
    let now = read(&app, &path).await;
    assert_eq!(
        (&now["name"], &now["labels"]["tier"]),
        (&json!("after"), &json!("web"))
    );
    let listed = read(&app, "/v1/vms?label=tier=web").await;
    assert_eq!(listed["items"][0]["name"], "after", "{listed}");

    // The VM's snapshots, read so that the (empty) listings are in memory.
    let tree_path = format!("/v1/vms/{vm}/snapshots?view=tree");
    let list_path = format!("/v1/vms/{vm}/snapshots");
    assert_eq!(read(&app, &tree_path).await["roots"], json!([]));
    assert_eq!(read(&app, &list_path).await["items"], json!([]));

    // The 202 of a snapshot: the job, the snapshot (creating or already ready), the
    // VM's count and its snapshot listings all show it in the very next reads.
    let job = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{vm}/snapshots"),
            Some(json!({"name": "s1"})),
        )
        .await;
    let job_view = read(&app, &format!("/v1/jobs/{}", job.id)).await;
    assert_eq!(job_view["kind"], "snapshot_create", "{job_view}");
    let snapshot = read(&app, &format!("/v1/snapshots/{}", job.target.id)).await;
    assert_eq!(snapshot["name"], "s1", "{snapshot}");
    assert_eq!(read(&app, &path).await["snapshot_count"], 1);
    let tree = read(&app, &tree_path).await;
    assert_eq!(tree["roots"][0]["name"], "s1", "{tree}");
    let list = read(&app, &list_path).await;
    assert_eq!(list["items"][0]["name"], "s1", "{list}");

    // The job's end, seen by its long-poll, is in every view read after it.
    let ended = app.wait_job(job.id).await;
    assert_eq!(ended.status, JobStatus::Succeeded);
    let now = read(&app, &path).await;
    assert_eq!(now["current_snapshot_id"], json!(job.target.id), "{now}");
    assert_eq!(
        now["disks"][0]["chain"].as_array().unwrap().len(),
        2,
        "{now}"
    );
    let snapshot = read(&app, &format!("/v1/snapshots/{}", job.target.id)).await;
    assert_eq!(
        (&snapshot["status"], &snapshot["is_current"]),
        (&json!("ready"), &json!(true))
    );
    let tree = read(&app, &tree_path).await;
    assert_eq!(
        (
            &tree["current_snapshot_id"],
            &tree["roots"][0]["is_current"]
        ),
        (&json!(job.target.id), &json!(true)),
        "{tree}"
    );

    // A change to the snapshot alone (no other resource of the VM changes).
    let (status, body) = app
        .patch(
            &format!("/v1/snapshots/{}", job.target.id),
            json!({"name": "renamed", "hold": true}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let tree = read(&app, &tree_path).await;
    assert_eq!(
        (&tree["roots"][0]["name"], &tree["roots"][0]["hold"]),
        (&json!("renamed"), &json!(true)),
        "{tree}"
    );
    let list = read(&app, &list_path).await;
    assert_eq!(list["items"][0]["name"], "renamed", "{list}");

    // A deletion: the snapshot goes, and the VM's view follows.
    app.run_job(
        Method::DELETE,
        &format!("/v1/snapshots/{}", job.target.id),
        None,
    )
    .await;
    let (status, _) = app.get(&format!("/v1/snapshots/{}", job.target.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let now = read(&app, &path).await;
    assert_eq!(
        (&now["snapshot_count"], &now["current_snapshot_id"]),
        (&json!(0), &Value::Null)
    );
    assert_eq!(read(&app, &tree_path).await["roots"], json!([]));
    assert_eq!(read(&app, &list_path).await["items"], json!([]));

    app.delete_vm(vm).await;
    let (status, _) = app.get(&path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get(&tree_path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_guest_writing_grows_the_allocation_shown_with_no_write_through_the_api() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("guest", &[("root", 256 * MIB)]).await.id;
    let path = format!("/v1/vms/{vm}");
    let allocated = |view: &Value| {
        view["disks"][0]["chain"][0]["allocated_bytes"]
            .as_u64()
            .unwrap()
    };
    // Twice: the second read is served from memory.
    let _ = read(&app, &path).await;
    let before = allocated(&read(&app, &path).await);
    write(app.active_path(vm, "root").await, 0x5a, 0, 32);
    // Views show an allocation measured at most a second ago.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let after = allocated(&read(&app, &path).await);
    assert!(
        after >= before + 32 * MIB,
        "32 MiB written by the guest: {before} then {after} bytes allocated"
    );
}

#[tokio::test]
async fn views_are_read_from_the_database_again_after_a_restart() {
    let mut app = TestApp::spawn().await;
    let vm = app
        .create_vm("restart", &[("root", 64 * MIB), ("data", 64 * MIB)])
        .await
        .id;
    let s1 = app.snapshot(vm, "s1").await.id;
    let path = format!("/v1/vms/{vm}");
    let before = read(&app, &path).await;
    let snapshot_before = read(&app, &format!("/v1/snapshots/{s1}")).await;
    app.restart(&[]).await;
    // The first read renders from the database, the second is served from memory.
    for _ in 0..2 {
        assert_eq!(read(&app, &path).await, before);
        assert_eq!(
            read(&app, &format!("/v1/snapshots/{s1}")).await,
            snapshot_before
        );
    }
}
