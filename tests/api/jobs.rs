//! Background jobs: listing with filters and pages, long polls, cancelling a queued job
//! and a running one (rolled back with no file left behind), and the system endpoints.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::header::LOCATION;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 64 * MIB;
const PAUSE_SNAPSHOT: (&str, &str) = ("STRATA_FAULT", "snapshot_create:planned:pause");
/// Ids of a job list page, in the order given.
fn ids(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(id)
        .collect()
}

/// Owned copies of job ids, to compare with `ids`.
fn order(jobs: &[&String]) -> Vec<String> {
    jobs.iter().map(|j| (*j).clone()).collect()
}

async fn list(app: &TestApp, query: &str) -> Value {
    let (status, list) = app.get(&format!("/v1/jobs?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{query}: {list}");
    list
}

/// Expect a 202 with a job and return it without waiting.
fn accepted((status, job): (StatusCode, Value)) -> Value {
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    job
}

/// Poll until the job has journaled its plan (`detail` is set). Under the pause fault
/// it then sits before its first step for two seconds.
async fn wait_planned(app: &TestApp, job: &str) -> Value {
    for _ in 0..500 {
        let (_, view) = app.get(&format!("/v1/jobs/{job}")).await;
        assert!(
            matches!(view["status"].as_str(), Some("queued" | "running")),
            "{view}"
        );
        if view["status"] == "running" && !view["detail"].is_null() {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {job} never journaled a plan");
}

#[tokio::test]
async fn jobs_are_listed_newest_first_and_filtered_by_status_vm_and_kind() {
    // The pause holds VM a's snapshot so that two resizes to the same size are both
    // accepted; the second then fails when it runs (the disk has already grown).
    let app = TestApp::spawn_with(&[PAUSE_SNAPSHOT]).await;
    let a = app.create_vm("a", &[("root", DISK)]).await;
    let b = app.create_vm("b", &[("root", DISK)]).await;
    let (a_id, b_id) = (id(&a), id(&b));
    let a_disk = id(&a["disks"][0]);
    let resize = format!("/v1/vms/{a_id}/disks/{a_disk}/resize");
    let (_, creates) = app.get("/v1/jobs").await;
    let (b_create, a_create) = (ids(&creates)[0].clone(), ids(&creates)[1].clone());

    let a_snapshot = accepted(
        app.post(&format!("/v1/vms/{a_id}/snapshots"), json!({"name": "s1"}))
            .await,
    );
    let a_grow = accepted(app.post(&resize, json!({"size_bytes": 2 * DISK})).await);
    let a_grow_again = accepted(app.post(&resize, json!({"size_bytes": 2 * DISK})).await);
    let b_disk = accepted(
        app.post(
            &format!("/v1/vms/{b_id}/disks"),
            json!({"name": "data", "size_bytes": DISK}),
        )
        .await,
    );
    for job in [&a_snapshot, &a_grow, &a_grow_again, &b_disk] {
        app.wait_job_end(job).await;
    }
    let [a_snapshot, a_grow, a_grow_again, b_disk] =
        [a_snapshot, a_grow, a_grow_again, b_disk].map(|j| id(&j));

    let all = list(&app, "").await;
    let newest_first = vec![
        &b_disk,
        &a_grow_again,
        &a_grow,
        &a_snapshot,
        &b_create,
        &a_create,
    ];
    assert_eq!(ids(&all).iter().collect::<Vec<_>>(), newest_first);
    assert!(all["next_cursor"].is_null());
    let created: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["created_at"].as_str().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");

    assert_eq!(
        ids(&list(&app, &format!("vm_id={a_id}")).await),
        order(&[&a_grow_again, &a_grow, &a_snapshot, &a_create])
    );
    assert_eq!(
        ids(&list(&app, &format!("vm_id={b_id}")).await),
        order(&[&b_disk, &b_create])
    );
    assert_eq!(
        ids(&list(&app, "kind=vm_create").await),
        order(&[&b_create, &a_create])
    );
    assert_eq!(
        ids(&list(&app, "kind=disk_resize").await),
        order(&[&a_grow_again, &a_grow])
    );
    assert_eq!(
        ids(&list(&app, "kind=snapshot_delete").await),
        Vec::<String>::new()
    );
    let failed = list(&app, "status=failed").await;
    assert_eq!(ids(&failed), order(&[&a_grow_again]));
    assert_eq!(
        failed["items"][0]["error"]["code"], "disk_shrink_refused",
        "{failed}"
    );
    assert_eq!(
        ids(&list(&app, "status=succeeded").await),
        order(&[&b_disk, &a_grow, &a_snapshot, &b_create, &a_create])
    );
    assert_eq!(
        ids(&list(&app, "status=queued").await),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&list(
            &app,
            &format!("status=succeeded&kind=disk_resize&vm_id={a_id}")
        )
        .await),
        order(&[&a_grow])
    );
    assert_eq!(
        ids(&list(&app, &format!("kind=disk_create&vm_id={a_id}")).await),
        Vec::<String>::new()
    );
    // The failed resize changed nothing: the disk has the size the first one gave it.
    let path = app.active_path(&a_id, "root").await;
    assert_eq!(app.vm(&a_id).await["disks"][0]["size_bytes"], 2 * DISK);
    assert_eq!(chain(&path).len(), 2);
    check_clean(&path);

    // Pages: newest first, each job once, the last page without a cursor.
    let first = list(&app, "limit=4").await;
    assert_eq!(ids(&first).iter().collect::<Vec<_>>(), newest_first[..4]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a cursor after a full page")
        .to_owned();
    let second = list(&app, &format!("limit=4&cursor={cursor}")).await;
    assert_eq!(ids(&second).iter().collect::<Vec<_>>(), newest_first[4..]);
    assert!(second["next_cursor"].is_null(), "{second}");
    let mut seen = Vec::new();
    let mut query = format!("vm_id={a_id}&limit=1");
    loop {
        let page = list(&app, &query).await;
        assert!(ids(&page).len() <= 1);
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => query = format!("vm_id={a_id}&limit=1&cursor={next}"),
            None => break,
        }
        assert!(seen.len() <= 10, "pagination does not end");
    }
    assert_eq!(
        seen,
        order(&[&a_grow_again, &a_grow, &a_snapshot, &a_create])
    );

    for query in [
        "status=bogus",
        "status=",
        "kind=vm_explode",
        "vm_id=not-a-uuid",
        "limit=0",
        "limit=1001",
        "limit=x",
    ] {
        assert_problem(
            &send(&app, Method::GET, &format!("/v1/jobs?{query}"), None, None).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        );
    }
    assert_problem(
        &send(&app, Method::GET, "/v1/jobs?cursor=garbage", None, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    );
}

#[tokio::test]
async fn a_long_poll_on_an_ended_job_answers_at_once_and_bad_waits_or_ids_are_refused() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("poll", &[("root", DISK)]).await;
    let (_, jobs) = app.get(&format!("/v1/jobs?vm_id={}", id(&vm))).await;
    let job = ids(&jobs)[0].clone();

    for wait in [5, 60] {
        let started = Instant::now();
        let (status, view) = app.get(&format!("/v1/jobs/{job}?wait={wait}")).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["status"], "succeeded");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an ended job is answered at once, took {:?}",
            started.elapsed()
        );
    }
    let (status, view) = app.get(&format!("/v1/jobs/{job}?wait=0")).await;
    assert_eq!(
        (status, view["id"].as_str()),
        (StatusCode::OK, Some(job.as_str()))
    );

    for query in ["wait=61", "wait=3600", "wait=-1", "wait=soon"] {
        assert_problem(
            &send(
                &app,
                Method::GET,
                &format!("/v1/jobs/{job}?{query}"),
                None,
                None,
            )
            .await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        );
    }
    for unknown in [UNKNOWN_ID, "not-a-uuid"] {
        assert_problem(
            &send(
                &app,
                Method::GET,
                &format!("/v1/jobs/{unknown}"),
                None,
                None,
            )
            .await,
            StatusCode::NOT_FOUND,
            "job_not_found",
        );
        assert_problem(
            &send(
                &app,
                Method::GET,
                &format!("/v1/jobs/{unknown}?wait=1"),
                None,
                None,
            )
            .await,
            StatusCode::NOT_FOUND,
            "job_not_found",
        );
        assert_problem(
            &send(
                &app,
                Method::POST,
                &format!("/v1/jobs/{unknown}/cancel"),
                None,
                None,
            )
            .await,
            StatusCode::NOT_FOUND,
            "job_not_found",
        );
    }
    assert_problem(
        &send(&app, Method::DELETE, &format!("/v1/jobs/{job}"), None, None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn a_long_poll_on_a_running_job_waits_until_it_ends_or_the_wait_runs_out() {
    let app = TestApp::spawn_with(&[PAUSE_SNAPSHOT]).await;
    let vm = id(&app.create_vm("long-poll", &[("root", DISK)]).await);
    let job = id(&accepted(
        app.post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s1"}))
            .await,
    ));
    wait_planned(&app, &job).await;

    let started = Instant::now();
    let (status, view) = app.get(&format!("/v1/jobs/{job}?wait=1")).await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        view["status"], "running",
        "still paused after a one-second wait: {view}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(2),
        "waited {waited:?}"
    );

    let started = Instant::now();
    let (status, view) = app.get(&format!("/v1/jobs/{job}?wait=30")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["status"], "succeeded", "{view}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the poll returns when the job ends, took {:?}",
        started.elapsed()
    );
    assert!(
        view["finished_at"].is_string() && view["started_at"].is_string(),
        "{view}"
    );
}

#[tokio::test]
async fn cancelling_a_queued_job_drops_it_and_cancelling_a_paused_running_job_rolls_it_back() {
    let app = TestApp::spawn_with(&[PAUSE_SNAPSHOT]).await;
    let vm = app
        .create_vm("cancel", &[("root", DISK), ("data", 32 * MIB)])
        .await;
    let vm_id = id(&vm);
    let root = app.active_path(&vm_id, "root").await;
    let data = app.active_path(&vm_id, "data").await;
    write(&root, 0x11, 0, 2);
    write(&data, 0x22, 1, 1);
    let files_before: Vec<PathBuf> = app.volume_files();
    assert_eq!(files_before.len(), 2);

    // The first snapshot runs and pauses after journaling its plan; everything queued
    // behind it on the same VM waits.
    let running = accepted(
        app.post(&format!("/v1/vms/{vm_id}/snapshots"), json!({"name": "s1"}))
            .await,
    );
    let running_snapshot = running["target"]["id"].as_str().unwrap().to_owned();
    wait_planned(&app, &id(&running)).await;
    let queued = accepted(
        app.post(&format!("/v1/vms/{vm_id}/snapshots"), json!({"name": "s2"}))
            .await,
    );
    let queued_snapshot = queued["target"]["id"].as_str().unwrap().to_owned();
    let queued_disk = accepted(
        app.post(
            &format!("/v1/vms/{vm_id}/disks"),
            json!({"name": "extra", "size_bytes": DISK}),
        )
        .await,
    );
    let queued_disk_id = queued_disk["target"]["id"].as_str().unwrap().to_owned();
    let (_, view) = app.get(&format!("/v1/jobs/{}", id(&queued))).await;
    assert_eq!(
        view["status"], "queued",
        "jobs of one VM run one at a time: {view}"
    );

    // A queued job is cancelled at once, with its records.
    let reply = send(
        &app,
        Method::POST,
        &format!("/v1/jobs/{}/cancel", id(&queued)),
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["status"], "cancelled", "{}", reply.body);
    assert_eq!(
        reply.headers.get(LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{}", id(&queued)).as_str())
    );
    assert_problem(
        &send(
            &app,
            Method::GET,
            &format!("/v1/snapshots/{queued_snapshot}"),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "snapshot_not_found",
    );
    let reply = send(
        &app,
        Method::POST,
        &format!("/v1/jobs/{}/cancel", id(&queued_disk)),
        None,
        None,
    )
    .await;
    assert_eq!(
        (reply.status, reply.body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("cancelled")),
        "{}",
        reply.body
    );
    assert_problem(
        &send(
            &app,
            Method::GET,
            &format!("/v1/vms/{vm_id}/disks/{queued_disk_id}"),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "disk_not_found",
    );
    assert_eq!(
        app.volume_files(),
        files_before,
        "no file appeared for the cancelled jobs"
    );

    // The running job, paused before its first step, accepts the request and rolls back.
    let reply = send(
        &app,
        Method::POST,
        &format!("/v1/jobs/{}/cancel", id(&running)),
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["cancel_requested"], true, "{}", reply.body);
    assert_eq!(reply.body["status"], "running", "{}", reply.body);
    let ended = app.wait_job_end(&running).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(ended["error"], Value::Null, "{ended}");

    assert_problem(
        &send(
            &app,
            Method::GET,
            &format!("/v1/snapshots/{running_snapshot}"),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "snapshot_not_found",
    );
    let (_, snapshots) = app.get(&format!("/v1/vms/{vm_id}/snapshots")).await;
    assert_eq!(snapshots["items"], json!([]), "{snapshots}");
    let view = app.vm(&vm_id).await;
    assert_eq!(view["current_snapshot_id"], Value::Null);
    assert_eq!(view["status"], "ready");
    assert_eq!(view["disks"].as_array().unwrap().len(), 2, "{view}");
    assert_eq!(app.volume_files(), files_before, "no leftover files");
    assert_eq!(app.active_path(&vm_id, "root").await, root);
    assert_eq!(app.active_path(&vm_id, "data").await, data);
    for path in [&root, &data] {
        assert_eq!(chain(path).len(), 1, "the chain is unchanged");
        check_clean(path);
    }
    expect(&root, 0x11, 0, 2);
    expect_all(&data, &[(0, 0, 1), (0x22, 1, 1)]);

    // Ended jobs cannot be cancelled, whatever their outcome.
    let (_, created) = app
        .get(&format!("/v1/jobs?vm_id={vm_id}&kind=vm_create"))
        .await;
    for job in [id(&running), id(&queued), id(&created["items"][0])] {
        let reply = send(
            &app,
            Method::POST,
            &format!("/v1/jobs/{job}/cancel"),
            None,
            None,
        )
        .await;
        assert_problem(&reply, StatusCode::CONFLICT, "job_not_cancellable");
    }
    let (_, cancelled) = app.get("/v1/jobs?status=cancelled").await;
    assert_eq!(
        cancelled["items"].as_array().unwrap().len(),
        3,
        "{cancelled}"
    );

    // The cancelled snapshot's name is free again and the VM works as before.
    let s1 = app.snapshot(&vm_id, "s1").await;
    expect(&app.snapshot_path(&vm_id, &s1, "root").await, 0x11, 0, 2);
    let (status, _) = app
        .patch(&format!("/v1/vms/{vm_id}"), json!({"state": "running"}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn health_readiness_and_the_openapi_document_are_served() {
    let app = TestApp::spawn().await;
    let (status, health) = app.get("/healthz").await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    app.wait_ready().await;
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["status"], "ready");

    let reply = send(&app, Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let content_type = reply.content_type();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let document = reply.body;
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        document["openapi"]
    );
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    let paths = document["paths"].as_object().expect("paths");
    for path in [
        "/v1/vms",
        "/v1/vms/{id}",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    assert!(paths["/v1/vms"].get("post").is_some() && paths["/v1/vms"].get("get").is_some());
}

#[tokio::test]
async fn jobs_of_different_vms_run_side_by_side_while_jobs_of_one_vm_wait_their_turn() {
    // Every snapshot job pauses 5 s after journaling its plan; the harness runs 2 workers.
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_create:planned:pause=5000")]).await;
    let a = id(&app.create_vm("side-a", &[("root", DISK)]).await);
    let b = id(&app.create_vm("side-b", &[("root", DISK)]).await);
    let first_a = accepted(
        app.post(&format!("/v1/vms/{a}/snapshots"), json!({"name": "one"}))
            .await,
    );
    let second_a = accepted(
        app.post(&format!("/v1/vms/{a}/snapshots"), json!({"name": "two"}))
            .await,
    );
    let first_b = accepted(
        app.post(&format!("/v1/vms/{b}/snapshots"), json!({"name": "one"}))
            .await,
    );

    // Both VMs' first jobs are inside their pause at the same moment...
    wait_planned(&app, &id(&first_a)).await;
    wait_planned(&app, &id(&first_b)).await;
    let (_, a_view) = app.get(&format!("/v1/jobs/{}", id(&first_a))).await;
    assert_eq!(a_view["status"], "running", "{a_view}");
    // ...while the second job of VM a has not started.
    let (_, queued) = app.get(&format!("/v1/jobs/{}", id(&second_a))).await;
    assert_eq!(queued["status"], "queued", "{queued}");

    for job in [&first_a, &second_a, &first_b] {
        let job = app.wait_job_end(job).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // The second snapshot of a grew from the first: they ran in order.
    let (_, second) = app
        .get(&format!(
            "/v1/snapshots/{}",
            second_a["target"]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(second["parent_id"], first_a["target"]["id"]);
}

#[tokio::test]
async fn cancelling_a_delete_before_its_commit_starts_leaves_the_snapshot_usable() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_delete:planned:pause=3000")]).await;
    let vm = id(&app.create_vm("cancel-merge", &[("root", DISK)]).await);
    write(&app.active_path(&vm, "root").await, 0x11, 0, 8);
    let s1 = app.snapshot(&vm, "s1").await;
    write(&app.active_path(&vm, "root").await, 0x22, 1, 1);
    let s2 = app.snapshot(&vm, "s2").await;
    let job = accepted(app.delete(&format!("/v1/snapshots/{s1}")).await);
    let planned = wait_planned(&app, &id(&job)).await;
    assert_eq!(
        planned["detail"]["merges"][0]["action"], "commit",
        "{planned}"
    );
    let (status, cancelled) = app
        .post(&format!("/v1/jobs/{}/cancel", id(&job)), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
    let ended = app.wait_job_end(&job).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");

    let (_, snap) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snap["status"], "ready", "no byte was merged: {snap}");
    let view = app.vm(&vm).await;
    assert!(
        view["disks"][0]["chain"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "ready"),
        "{view}"
    );
    expect_all(&app.snapshot_path(&vm, &s1, "root").await, &[(0x11, 0, 8)]);
    expect_all(
        &app.snapshot_path(&vm, &s2, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 6)],
    );
    app.revert(&s1).await;
    expect_all(&app.active_path(&vm, "root").await, &[(0x11, 0, 8)]);
}

#[tokio::test]
async fn a_long_poll_answers_with_the_job_before_the_request_timeout() {
    let app = TestApp::spawn_with(&[
        ("STRATA_REQUEST_TIMEOUT", "4"),
        ("STRATA_FAULT", "snapshot_create:planned:pause=8000"),
    ])
    .await;
    app.wait_ready().await;
    let vm = app.create_vm("slow", &[("root", 16 * MIB)]).await;
    let (status, job) = app
        .post(
            &format!("/v1/vms/{}/snapshots", id(&vm)),
            json!({"name": "held"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let (status, view) = app.get(&format!("/v1/jobs/{}?wait=30", id(&job))).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "running", "{view}");
    assert_eq!(app.wait_job_end(&job).await["status"], "succeeded");
}

#[tokio::test]
async fn a_cancel_accepted_while_the_last_step_runs_rolls_that_step_back() {
    // Held after its only step (a stream) is done, before the result is committed.
    let app =
        TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_delete:after-step-0:pause=4000")]).await;
    let vm = id(&app.create_vm("late", &[("root", DISK)]).await);
    write(&app.active_path(&vm, "root").await, 0x11, 0, 2);
    let s1 = app.snapshot(&vm, "s1").await;
    write(&app.active_path(&vm, "root").await, 0x22, 2, 8);
    let regions = [(0x11, 0, 2), (0x22, 2, 8), (0, 10, 54)];
    let files_before = app.volume_files();

    let job = accepted(app.delete(&format!("/v1/snapshots/{s1}")).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, view) = app.get(&format!("/v1/jobs/{}", id(&job))).await;
        assert!(
            matches!(view["status"].as_str(), Some("queued" | "running")),
            "{view}"
        );
        if view["progress"].as_u64() >= Some(99) {
            assert_eq!(view["detail"]["merges"][0]["action"], "stream", "{view}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream never finished: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = send(
        &app,
        Method::POST,
        &format!("/v1/jobs/{}/cancel", id(&job)),
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["cancel_requested"], true, "{}", reply.body);

    // Accepted means honoured: the stream's result is rolled back, not committed.
    let ended = app.wait_job_end(&job).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    let (_, snapshot) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snapshot["status"], "ready", "{snapshot}");
    let active = app.active_path(&vm, "root").await;
    assert_eq!(
        chain(&active).len(),
        2,
        "the present sits on s1's layer again"
    );
    expect_all(&active, &regions);
    expect_all(
        &app.snapshot_path(&vm, &s1, "root").await,
        &[(0x11, 0, 2), (0, 2, 62)],
    );
    check_clean(&active);
    assert_eq!(app.volume_files(), files_before);
}

/// Queue a job whose stored parameters no reader knows, behind the service's back.
fn insert_unreadable_job(data_dir: &std::path::Path, vm: &str) -> String {
    let id = "01a00000-0000-7000-8000-0000000000aa";
    let script = format!(
        "import sqlite3; c = sqlite3.connect({db:?}); \
         c.execute(\"INSERT INTO jobs (id, kind, status, target_type, target_id, vm_id, params, created_at) \
         VALUES ('{id}', 'disk_resize', 'queued', 'vm', '{vm}', '{vm}', '{{\\\"size\\\": \\\"big\\\"}}', '2026-01-01T00:00:00.000000Z')\"); \
         c.execute(\"INSERT INTO job_vms (job_seq, vm_id) SELECT seq, vm_id FROM jobs WHERE id = '{id}'\"); \
         c.commit()",
        db = data_dir.join("strata.db").to_string_lossy(),
    );
    let status = std::process::Command::new("python3")
        .args(["-c", &script])
        .status()
        .expect("python3");
    assert!(status.success());
    id.to_owned()
}

#[tokio::test]
async fn a_job_whose_stored_parameters_cannot_be_read_fails_alone() {
    let mut app = TestApp::spawn().await;
    let vm = id(&app.create_vm("odd", &[("root", MIB)]).await);
    app.kill();
    let bad = insert_unreadable_job(&app.data_dir, &vm);
    app.restart(&[]).await;

    // Listed like any job, and failed alone when it would run.
    let job = app.wait_job_end(&json!({"id": bad})).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "internal_error", "{job}");
    let (status, list) = app.get("/v1/jobs").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    // Every other job goes on: on the same VM, and on another.
    app.snapshot(&vm, "after").await;
    let other = app.create_vm("other", &[("root", MIB)]).await;
    assert_eq!(app.vm(&id(&other)).await["status"], "ready");
}
