//! A copy's progress: while a full clone's copy or a merge runs, the job's view and its
//! `job.updated` events show `bytes_done` growing towards a `bytes_total` that does not
//! move, and an `eta_seconds`; once the job ends they are null, the bytes are counted in
//! `bytes_copied` and in `strata_job_bytes_copied_total`; figures a crash left in the
//! job's row are not shown as live after the restart.
//!
//! The figures are written at most once a second, so each copy must last a few
//! seconds: the images hold a few hundred MiB, and qemu-img runs through a wrapper that
//! caps its copy rate (its own `-r`), so that a fast machine does not finish first. No
//! assertion is about time: only about the values seen, with generous timeouts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

/// A qemu-img that copies (convert, commit) at most `rate` bytes a second.
pub(crate) fn rate_capped_qemu_img(dir: &Path, rate: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let wrapper = dir.join("qemu-img");
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in\n  convert|commit) op=\"$1\"; shift; exec qemu-img \"$op\" -r {rate} \"$@\" ;;\nesac\nexec qemu-img \"$@\"\n"
    );
    std::fs::write(&wrapper, script).expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the wrapper");
    wrapper
}

/// A service whose copies last a few seconds.
async fn slow_copies(scratch: &Path) -> TestApp {
    let wrapper = rate_capped_qemu_img(scratch, "64M");
    TestApp::spawn_with(&[("STRATA_QEMU_IMG", wrapper.to_str().unwrap())]).await
}

/// The figures of one view (or event): done, total, ETA; none when it shows no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Figures {
    done: u64,
    total: u64,
    eta: Option<u64>,
}

fn figures_of(view: &Value) -> Option<Figures> {
    let done = view["bytes_done"].as_u64();
    let total = view["bytes_total"].as_u64();
    let eta = view["eta_seconds"].as_u64();
    match (done, total) {
        (Some(done), Some(total)) => Some(Figures { done, total, eta }),
        (None, None) => {
            assert!(eta.is_none(), "an ETA without a copy: {view}");
            None
        }
        _ => panic!("half the figures of a copy: {view}"),
    }
}

/// No figures, in a view of a job that ended (the fields are there, null).
fn assert_no_copy(view: &Value) {
    for field in ["bytes_done", "bytes_total", "eta_seconds"] {
        assert!(
            view.get(field).is_some_and(Value::is_null),
            "{field} of an ended job: {view}"
        );
    }
}

/// Poll the job's view until it ends: the figures of every answer that showed some,
/// and the view it ended with.
async fn follow(app: &TestApp, job: Uuid) -> (Vec<Figures>, Value) {
    let mut seen = Vec::new();
    for _ in 0..6000 {
        let (_, view) = app.get(&format!("/v1/jobs/{job}")).await;
        if view["status"] != "running" && view["status"] != "queued" {
            return (seen, view);
        }
        if let Some(figures) = figures_of(&view) {
            seen.push(figures);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job} did not end");
}

/// What a copy's figures must be, seen in order: a total that never moves and is never
/// passed, bytes done that only grow (and did grow), and an ETA at some point.
fn assert_one_copy(what: &str, seen: &[Figures]) {
    assert!(
        seen.len() >= 2,
        "{what}: too few figures to see a copy move: {seen:?}"
    );
    let total = seen[0].total;
    assert!(total > 0, "{what}: {seen:?}");
    for figures in seen {
        assert_eq!(figures.total, total, "{what}: the total moved: {seen:?}");
        assert!(
            figures.done <= total,
            "{what}: done passed the total: {seen:?}"
        );
    }
    assert!(
        seen.windows(2).all(|w| w[0].done <= w[1].done),
        "{what}: bytes_done went back: {seen:?}"
    );
    assert!(
        seen.last().unwrap().done > seen[0].done,
        "{what}: bytes_done never grew: {seen:?}"
    );
    assert!(
        seen.iter().any(|f| f.eta.is_some()),
        "{what}: never an ETA: {seen:?}"
    );
}

/// The events of `job` up to its `job.finished`, from a stream opened before it began.
async fn events_of(stream: &mut EventStream, job: Uuid) -> Vec<SseEvent> {
    let job = job.to_string();
    stream
        .until(|e| e.event == "job.finished" && e.resource() == job)
        .await
        .into_iter()
        .filter(|e| e.resource() == job)
        .collect()
}

/// The figures the `job.updated` events carried, in order.
fn figures_in(events: &[SseEvent]) -> Vec<Figures> {
    events
        .iter()
        .filter(|e| e.event == "job.updated")
        .filter_map(|e| figures_of(&e.data))
        .collect()
}

/// `strata_job_bytes_copied_total{kind}` once the job's end has been counted.
async fn bytes_copied_metric(app: &TestApp, kind: &str) -> u64 {
    let series = format!("strata_job_bytes_copied_total{{kind=\"{kind}\"}} ");
    for _ in 0..600 {
        let text = app
            .client
            .get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if let Some(value) = text.lines().find_map(|l| l.strip_prefix(series.as_str())) {
            return value.trim().parse::<f64>().expect("a number") as u64;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {series}in the metrics");
}

#[tokio::test]
async fn a_full_clone_shows_its_copy_moving_in_its_view_and_events_and_counts_its_bytes() {
    let scratch = tempfile::tempdir().unwrap();
    let app = slow_copies(scratch.path()).await;
    let source = app.create_vm("big", &[("root", 4096 * MIB)]).await.id;
    // Sparse, with 256 MiB of data spread over the disk.
    let root = app.active_path(source, "root").await;
    for (i, pattern) in [0x51u8, 0x52, 0x53, 0x54].into_iter().enumerate() {
        write(&root, pattern, i as u64 * 1024, 64);
    }
    let mut stream = EventStream::open(&app, "types=job.*", None).await;
    let path = format!("/v1/vms/{source}/clone");
    let job = app
        .accept(
            Method::POST,
            &path,
            Some(json!({"name": "copy", "mode": "full"})),
        )
        .await;

    let (seen, ended) = follow(&app, job.id).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_one_copy("the view", &seen);
    let total = seen[0].total;
    // What the copy is measured against: the source chain's allocated bytes, at least
    // the data written.
    assert!(total >= 256 * MIB, "{total}");
    assert_no_copy(&ended);
    assert_eq!(ended["bytes_copied"], total, "{ended}");

    let events = events_of(&mut stream, job.id).await;
    let in_events = figures_in(&events);
    assert_one_copy("the events", &in_events);
    assert_eq!(in_events[0].total, total, "{in_events:?}");
    // Written at most once a second, only when changed: no two alike in a row.
    assert!(in_events.windows(2).all(|w| w[0] != w[1]), "{in_events:?}");
    let finished = events.last().unwrap();
    assert_eq!(finished.event, "job.finished");
    assert_no_copy(&finished.data);
    assert_eq!(finished.data["bytes_copied"], total);
    // The update that ended the copy cleared its figures before the job finished.
    let after_copy = events
        .iter()
        .rposition(|e| figures_of(&e.data).is_some())
        .unwrap();
    assert!(
        events[after_copy + 1..]
            .iter()
            .all(|e| figures_of(&e.data).is_none()),
        "{events:?}"
    );

    assert_eq!(bytes_copied_metric(&app, "vm_clone").await, total);
    let clone = app.vm(job.target.id).await;
    let copy = app.active_path(clone.id, "root").await;
    expect_all(
        &copy,
        &[
            (0x51, 0, 64),
            (0x52, 1024, 64),
            (0x53, 2048, 64),
            (0x54, 3072, 64),
        ],
    );
    assert_history_replays_to_the_present(&app).await;
}

#[tokio::test]
async fn a_merge_shows_its_copy_against_the_planners_estimate() {
    let scratch = tempfile::tempdir().unwrap();
    let app = slow_copies(scratch.path()).await;
    let vm = app.create_vm("merge", &[("root", 4096 * MIB)]).await.id;
    write(app.active_path(vm, "root").await, 0x61, 0, 320);
    let s1 = app.snapshot(vm, "s1").await.id;
    // Less above s1 than in it: the deletion commits the present down into s1's layer.
    write(app.active_path(vm, "root").await, 0x62, 1024, 192);
    let mut stream = EventStream::open(&app, "types=job.*", None).await;
    let job = app
        .accept(Method::DELETE, &format!("/v1/snapshots/{s1}"), None)
        .await;

    let (seen, ended) = follow(&app, job.id).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_eq!(ended["detail"]["merges"][0]["action"], "commit", "{ended}");
    assert_one_copy("the view", &seen);
    // The copy is measured against the planner's estimate of it.
    let planned = ended["detail"]["merges"][0]["bytes_to_copy"]
        .as_u64()
        .unwrap();
    assert_eq!(seen[0].total, planned, "{seen:?}");
    assert_no_copy(&ended);
    assert_eq!(ended["bytes_copied"], planned);

    let events = events_of(&mut stream, job.id).await;
    let in_events = figures_in(&events);
    assert_one_copy("the events", &in_events);
    assert_eq!(in_events[0].total, planned);
    assert_no_copy(&events.last().unwrap().data);
    assert_eq!(bytes_copied_metric(&app, "snapshot_delete").await, planned);
    expect_all(
        app.active_path(vm, "root").await,
        &[(0x61, 0, 320), (0x62, 1024, 192)],
    );
}

/// The copy figures the job's row holds, and the newest event, read from the database
/// of a service that is not running.
async fn left_in_the_database(data_dir: &Path, job: &str) -> (Option<(i64, i64)>, i64) {
    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data_dir.join("strata.db"))
        .read_only(true);
    let mut db = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let (done, total): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT bytes_done, bytes_total FROM jobs WHERE id = ?")
            .bind(job)
            .fetch_one(&mut db)
            .await
            .unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT max(id) FROM events WHERE data IS NOT NULL")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let _ = db.close().await;
    (done.zip(total), newest)
}

#[tokio::test]
async fn figures_a_crash_left_are_not_shown_as_live_after_the_restart() {
    let scratch = tempfile::tempdir().unwrap();
    let mut app = slow_copies(scratch.path()).await;
    let source = app.create_vm("big", &[("root", 4096 * MIB)]).await.id;
    write(app.active_path(source, "root").await, 0x71, 0, 256);
    let mut stream = EventStream::open(&app, "types=job.*", None).await;
    let path = format!("/v1/vms/{source}/clone");
    let job = app
        .accept(
            Method::POST,
            &path,
            Some(json!({"name": "copy", "mode": "full"})),
        )
        .await;
    let id = job.id.to_string();
    // Killed once the row holds the copy's figures.
    stream
        .until(|e| e.resource() == id && figures_of(&e.data).is_some())
        .await;
    app.kill();
    let (left, last_before) = left_in_the_database(&app.data_dir, &id).await;
    assert!(
        left.is_some_and(|(done, total)| done <= total),
        "the crash left the copy's figures in the job's row: {left:?}"
    );

    let wrapper = rate_capped_qemu_img(scratch.path(), "64M");
    app.restart(&[("STRATA_QEMU_IMG", wrapper.to_str().unwrap())])
        .await;
    let mut stream = EventStream::open(&app, "types=job.*", Some(last_before)).await;
    let events = events_of(&mut stream, job.id).await;
    // Recovery's first word on the job: no copy runs (the old figures are gone), before
    // the resumed copy shows its own.
    let first = events
        .iter()
        .find(|e| e.event == "job.updated")
        .expect("an update after the restart");
    assert_eq!(first.data["status"], "running", "{first:?}");
    assert_no_copy(&first.data);
    let finished = events.last().unwrap();
    assert_eq!(finished.data["status"], "succeeded", "{finished:?}");
    assert_no_copy(&finished.data);
    // Only the copy that completed is counted.
    let total = figures_in(&events)
        .last()
        .map(|f| f.total)
        .expect("the resumed copy's figures");
    assert_eq!(finished.data["bytes_copied"], total);
    let clone = app.vm(job.target.id).await;
    expect(app.active_path(clone.id, "root").await, 0x71, 0, 256);
    assert_history_replays_to_the_present(&app).await;
}

#[tokio::test]
async fn a_copy_redone_after_a_crash_before_its_journal_entry_is_counted_once() {
    // Killed when the merge's copy is done and its journal entry is not: the resumed
    // job copies again, and only that copy, the one journaled, is counted.
    let mut app = TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_delete:ran-step-0")]).await;
    let vm = app.create_vm("redo", &[("root", 1024 * MIB)]).await.id;
    write(app.active_path(vm, "root").await, 0x31, 0, 64);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x32, 256, 16);
    let job = app
        .accept(Method::DELETE, &format!("/v1/snapshots/{s1}"), None)
        .await;
    assert!(!app.wait_exit().success(), "the fault aborts strata");
    app.restart(&[]).await;

    let (status, ended) = app.get(&format!("/v1/jobs/{}?wait=60", job.id)).await;
    assert!(status.is_success(), "{ended}");
    assert_eq!(ended["status"], "succeeded", "{ended}");
    let planned = ended["detail"]["merges"][0]["bytes_to_copy"]
        .as_u64()
        .unwrap();
    assert!(planned > 0, "{ended}");
    assert_eq!(ended["bytes_copied"], planned, "{ended}");
    assert_no_copy(&ended);
    assert_eq!(bytes_copied_metric(&app, "snapshot_delete").await, planned);
    expect_all(
        app.active_path(vm, "root").await,
        &[(0x31, 0, 64), (0x32, 256, 16)],
    );
}
