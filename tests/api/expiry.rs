//! Snapshot expiry and hold: the periodic sweep deletes expired snapshots through
//! ordinary delete jobs (with merges), never one on hold, and keeps every other byte.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

const DISK: u64 = 64 * MIB;

fn in_seconds(seconds: i64) -> String {
    (Utc::now() + chrono::Duration::seconds(seconds)).to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn snapshot_with(app: &TestApp, vm: &Uuid, body: serde_json::Value) -> String {
    let job = app
        .expect_job(app.post(&format!("/v1/vms/{vm}/snapshots"), body).await)
        .await;
    job.target.id.to_string()
}

/// Wait until the snapshot is gone (the sweep runs every second in these tests).
async fn wait_gone(app: &TestApp, snapshot: &str) {
    for _ in 0..300 {
        let (status, _) = app.get(&format!("/v1/snapshots/{snapshot}")).await;
        if status == StatusCode::NOT_FOUND {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("snapshot {snapshot} was never pruned");
}

#[tokio::test]
async fn an_expired_snapshot_is_merged_away_by_the_sweep_and_every_other_byte_stays() {
    let app = TestApp::spawn_with(&[("STRATA_SWEEP_INTERVAL", "1")]).await;
    let vm = app.create_vm("expiring", &[("root", DISK)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x11, 0, 4);
    let s1 = snapshot_with(&app, &vm, json!({"name": "keep"})).await;
    write(&app.active_path(&vm, "root").await, 0x22, 1, 1);
    let s2 = snapshot_with(
        &app,
        &vm,
        json!({"name": "short-lived", "expires_at": in_seconds(2)}),
    )
    .await;
    write(&app.active_path(&vm, "root").await, 0x33, 2, 1);
    let (_, view) = app.get(&format!("/v1/snapshots/{s2}")).await;
    assert!(view["expires_at"].is_string(), "{view}");
    assert_eq!(view["hold"], false);

    wait_gone(&app, &s2).await;
    let (_, jobs) = app
        .get(&format!("/v1/jobs?vm_id={vm}&kind=snapshot_delete"))
        .await;
    let job = &jobs["items"][0];
    assert_eq!(job["target"]["id"], s2.as_str(), "{jobs}");
    assert_eq!(app.wait_job(id(job)).await.status, JobStatus::Succeeded);
    let present = app.active_path(&vm, "root").await;
    expect_all(
        &present,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 1), (0x11, 3, 1)],
    );
    expect_all(&app.snapshot_path(&vm, &s1, "root").await, &[(0x11, 0, 4)]);
    assert_eq!(chain(&present).len(), 2);
    check_clean(&present);
}

#[tokio::test]
async fn a_snapshot_on_hold_outlives_its_expiry_until_released() {
    let app = TestApp::spawn_with(&[("STRATA_SWEEP_INTERVAL", "1")]).await;
    let vm = app.create_vm("held", &[("root", DISK)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x44, 0, 2);
    let held = snapshot_with(
        &app,
        &vm,
        json!({"name": "held", "expires_at": in_seconds(1), "hold": true}),
    )
    .await;
    // Several sweeps pass after the expiry; the hold keeps it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, view) = app.get(&format!("/v1/snapshots/{held}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (view["hold"].clone(), view["status"].clone()),
        (json!(true), json!("ready"))
    );
    let (_, jobs) = app
        .get(&format!("/v1/jobs?vm_id={vm}&kind=snapshot_delete"))
        .await;
    assert_eq!(jobs["items"], json!([]));

    let (status, view) = app
        .patch(&format!("/v1/snapshots/{held}"), json!({"hold": false}))
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    wait_gone(&app, &held).await;
    expect(&app.active_path(&vm, "root").await, 0x44, 0, 2);
}

#[tokio::test]
async fn expiry_can_be_set_changed_and_cleared_but_never_in_the_past() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("expiry-edit", &[("root", DISK)]).await.id;
    let (status, problem) = app
        .post(
            &format!("/v1/vms/{vm}/snapshots"),
            json!({"name": "old", "expires_at": in_seconds(-60)}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("validation_failed")),
        "{problem}"
    );
    let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
    assert_eq!(
        list["items"],
        json!([]),
        "a refused snapshot leaves nothing"
    );

    let snap = snapshot_with(&app, &vm, json!({"name": "s"})).await;
    let later = in_seconds(3600);
    let (status, view) = app
        .patch(
            &format!("/v1/snapshots/{snap}"),
            json!({"expires_at": later, "description": "nightly"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert!(view["expires_at"].is_string());
    assert_eq!(view["description"], "nightly");
    let (status, problem) = app
        .patch(
            &format!("/v1/snapshots/{snap}"),
            json!({"expires_at": in_seconds(-1)}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("validation_failed"))
    );
    let (_, view) = app.get(&format!("/v1/snapshots/{snap}")).await;
    assert!(
        view["expires_at"].is_string(),
        "a refused change changes nothing: {view}"
    );
    let (status, view) = app
        .patch(
            &format!("/v1/snapshots/{snap}"),
            json!({"expires_at": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["expires_at"], serde_json::Value::Null);
    assert_eq!(view["description"], "nightly", "absent fields stay");
    let (status, problem) = app
        .patch(
            &format!("/v1/snapshots/{UNKNOWN_ID}"),
            json!({"hold": true}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("snapshot_not_found"))
    );
    let (status, problem) = app
        .patch(
            &format!("/v1/snapshots/{snap}"),
            json!({"expires": "tomorrow"}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    // A string that is not a time is a value breaking a rule: it names its field.
    let (status, problem) = app
        .patch(
            &format!("/v1/snapshots/{snap}"),
            json!({"expires_at": "tomorrow"}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("validation_failed"))
    );
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.starts_with("expires_at: "), "{detail}");
}
