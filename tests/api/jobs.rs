//! Background jobs: listing with filters and pages, long polls, cancelling a queued job
//! and a running one (rolled back with no file left behind), and the system endpoints.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::header::LOCATION;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

const DISK: u64 = 64 * MIB;
const PAUSE_SNAPSHOT: (&str, &str) = ("STRATA_FAULT", "snapshot_create:planned:pause");

/// Ids of a job list page, in the order given.
fn ids(list: &JobList) -> Vec<Uuid> {
    list.items.iter().map(|job| job.id).collect()
}

async fn list(app: &TestApp, query: &str) -> JobList {
    app.get_as(&format!("/v1/jobs?{query}")).await
}

/// Poll until the job has journaled its plan (`detail` is set). Under the pause fault
/// it then sits before its first step for two seconds.
async fn wait_planned(app: &TestApp, job: Uuid) -> JobView {
    for _ in 0..500 {
        let view = app.job(job).await;
        assert!(
            matches!(view.status, JobStatus::Queued | JobStatus::Running),
            "{view:?}"
        );
        if view.status == JobStatus::Running && view.detail.is_some() {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {job} never journaled a plan");
}

/// `POST /v1/jobs/{id}/cancel`, with the answer's headers.
async fn cancel(app: &TestApp, job: Uuid) -> Reply {
    send(
        app,
        Method::POST,
        &format!("/v1/jobs/{job}/cancel"),
        None,
        None,
    )
    .await
}

/// The jobs `jobs_are_listed...` queues on VMs a and b after their creation, newest
/// last (all ended when this returns).
struct Queued {
    a_create: Uuid,
    b_create: Uuid,
    a_snapshot: Uuid,
    a_grow: Uuid,
    a_grow_again: Uuid,
    b_disk: Uuid,
}

impl Queued {
    fn newest_first(&self) -> Vec<Uuid> {
        vec![
            self.b_disk,
            self.a_grow_again,
            self.a_grow,
            self.a_snapshot,
            self.b_create,
            self.a_create,
        ]
    }
}

/// A snapshot of a (held by the pause), two resizes of a's disk to the same size
/// (both accepted; the second fails when it runs, the disk having grown) and a new
/// disk on b.
async fn queue_jobs_on_two_vms(app: &TestApp, a: &VmView, b: &VmView) -> Queued {
    let resize = format!("/v1/vms/{}/disks/{}/resize", a.id, a.disks[0].id);
    let creates = ids(&list(app, "").await);
    let (b_create, a_create) = (creates[0], creates[1]);
    let post = async |path: String, body| app.accept(Method::POST, &path, Some(body)).await;
    let a_snapshot = post(format!("/v1/vms/{}/snapshots", a.id), json!({"name": "s1"})).await;
    let a_grow = post(resize.clone(), json!({"size_bytes": 2 * DISK})).await;
    let a_grow_again = post(resize, json!({"size_bytes": 2 * DISK})).await;
    let b_disk = post(
        format!("/v1/vms/{}/disks", b.id),
        json!({"name": "data", "size_bytes": DISK}),
    )
    .await;
    for job in [&a_snapshot, &a_grow, &a_grow_again, &b_disk] {
        app.wait_job(job.id).await;
    }
    Queued {
        a_create,
        b_create,
        a_snapshot: a_snapshot.id,
        a_grow: a_grow.id,
        a_grow_again: a_grow_again.id,
        b_disk: b_disk.id,
    }
}

/// Every filter, alone and combined, lists exactly its jobs, newest first.
async fn filters_list_exactly_their_jobs(app: &TestApp, a: Uuid, b: Uuid, jobs: &Queued) {
    let all = list(app, "").await;
    assert_eq!(ids(&all), jobs.newest_first());
    assert!(all.next_cursor.is_none());
    let created: Vec<_> = all.items.iter().map(|j| j.created_at).collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");

    let expected = [
        (
            format!("vm_id={a}"),
            vec![
                jobs.a_grow_again,
                jobs.a_grow,
                jobs.a_snapshot,
                jobs.a_create,
            ],
        ),
        (format!("vm_id={b}"), vec![jobs.b_disk, jobs.b_create]),
        ("kind=vm_create".into(), vec![jobs.b_create, jobs.a_create]),
        (
            "kind=disk_resize".into(),
            vec![jobs.a_grow_again, jobs.a_grow],
        ),
        ("kind=snapshot_delete".into(), vec![]),
        ("status=failed".into(), vec![jobs.a_grow_again]),
        (
            "status=succeeded".into(),
            vec![
                jobs.b_disk,
                jobs.a_grow,
                jobs.a_snapshot,
                jobs.b_create,
                jobs.a_create,
            ],
        ),
        ("status=queued".into(), vec![]),
        (
            format!("status=succeeded&kind=disk_resize&vm_id={a}"),
            vec![jobs.a_grow],
        ),
        (format!("kind=disk_create&vm_id={a}"), vec![]),
    ];
    for (query, jobs) in expected {
        assert_eq!(ids(&list(app, &query).await), jobs, "{query}");
    }
    let failed = list(app, "status=failed").await;
    let error = failed.items[0].error.as_ref();
    assert_eq!(
        error.map(|e| e.code.as_str()),
        Some("disk_shrink_refused"),
        "{failed:?}"
    );
}

/// Pages: newest first, each job once, the last page without a cursor.
async fn pages_give_each_job_once_newest_first(app: &TestApp, a: Uuid, jobs: &Queued) {
    let newest_first = jobs.newest_first();
    let first = list(app, "limit=4").await;
    assert_eq!(ids(&first), newest_first[..4]);
    let cursor = first.next_cursor.expect("a cursor after a full page");
    let second = list(app, &format!("limit=4&cursor={cursor}")).await;
    assert_eq!(ids(&second), newest_first[4..]);
    assert!(second.next_cursor.is_none(), "{second:?}");
    let mut seen = Vec::new();
    let mut query = format!("vm_id={a}&limit=1");
    loop {
        let page = list(app, &query).await;
        assert!(page.items.len() <= 1);
        seen.extend(ids(&page));
        match page.next_cursor {
            Some(next) => query = format!("vm_id={a}&limit=1&cursor={next}"),
            None => break,
        }
        assert!(seen.len() <= 10, "pagination does not end");
    }
    assert_eq!(
        seen,
        [
            jobs.a_grow_again,
            jobs.a_grow,
            jobs.a_snapshot,
            jobs.a_create
        ]
    );
}

async fn bad_filters_and_cursors_are_refused(app: &TestApp) {
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
            &send(app, Method::GET, &format!("/v1/jobs?{query}"), None, None).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        );
    }
    assert_problem(
        &send(app, Method::GET, "/v1/jobs?cursor=garbage", None, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    );
}

#[tokio::test]
async fn jobs_are_listed_newest_first_and_filtered_by_status_vm_and_kind() {
    // The pause holds VM a's snapshot so that two resizes to the same size are both
    // accepted; the second then fails when it runs (the disk has already grown).
    let app = TestApp::spawn_with(&[PAUSE_SNAPSHOT]).await;
    let a = app.create_vm("a", &[("root", DISK)]).await;
    let b = app.create_vm("b", &[("root", DISK)]).await;
    let jobs = queue_jobs_on_two_vms(&app, &a, &b).await;

    filters_list_exactly_their_jobs(&app, a.id, b.id, &jobs).await;
    // The failed resize changed nothing: the disk has the size the first one gave it.
    let path = app.active_path(a.id, "root").await;
    assert_eq!(app.vm(a.id).await.disks[0].size_bytes, 2 * DISK);
    assert_eq!(chain(&path).len(), 2);
    check_clean(&path);

    pages_give_each_job_once_newest_first(&app, a.id, &jobs).await;
    bad_filters_and_cursors_are_refused(&app).await;
}

#[tokio::test]
async fn a_long_poll_on_an_ended_job_answers_at_once_and_bad_waits_or_ids_are_refused() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("poll", &[("root", DISK)]).await;
    let job = ids(&list(&app, &format!("vm_id={}", vm.id)).await)[0].to_string();

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
    let vm = app.create_vm("long-poll", &[("root", DISK)]).await.id;
    let job = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{vm}/snapshots"),
            Some(json!({"name": "s1"})),
        )
        .await
        .id;
    wait_planned(&app, job).await;

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

/// What `cancelling_a_queued_job...` sets up: a VM with two disks of known content,
/// a snapshot job paused after journaling its plan, and two jobs queued behind it.
struct CancelScene {
    vm: Uuid,
    root: String,
    data: String,
    files_before: Vec<PathBuf>,
    running: JobView,
    queued: JobView,
    queued_disk: JobView,
}

async fn one_job_paused_and_two_queued_behind_it(app: &TestApp) -> CancelScene {
    let vm = app
        .create_vm("cancel", &[("root", DISK), ("data", 32 * MIB)])
        .await
        .id;
    let root = app.active_path(vm, "root").await;
    let data = app.active_path(vm, "data").await;
    write(&root, 0x11, 0, 2);
    write(&data, 0x22, 1, 1);
    let files_before: Vec<PathBuf> = app.volume_files();
    assert_eq!(files_before.len(), 2);

    // The first snapshot runs and pauses after journaling its plan; everything queued
    // behind it on the same VM waits.
    let snapshots = format!("/v1/vms/{vm}/snapshots");
    let running = app
        .accept(Method::POST, &snapshots, Some(json!({"name": "s1"})))
        .await;
    wait_planned(app, running.id).await;
    let queued = app
        .accept(Method::POST, &snapshots, Some(json!({"name": "s2"})))
        .await;
    let queued_disk = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{vm}/disks"),
            Some(json!({"name": "extra", "size_bytes": DISK})),
        )
        .await;
    let view = app.job(queued.id).await;
    assert_eq!(
        view.status,
        JobStatus::Queued,
        "jobs of one VM run one at a time: {view:?}"
    );
    CancelScene {
        vm,
        root,
        data,
        files_before,
        running,
        queued,
        queued_disk,
    }
}

/// A queued job is cancelled at once, with its records, and no file appears.
async fn queued_jobs_are_cancelled_at_once_with_their_records(app: &TestApp, scene: &CancelScene) {
    let reply = cancel(app, scene.queued.id).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["status"], "cancelled", "{}", reply.body);
    assert_eq!(
        reply.headers.get(LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{}", scene.queued.id).as_str())
    );
    assert_problem(
        &send(
            app,
            Method::GET,
            &format!("/v1/snapshots/{}", scene.queued.target.id),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "snapshot_not_found",
    );
    let reply = cancel(app, scene.queued_disk.id).await;
    assert_eq!(
        (reply.status, reply.body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("cancelled")),
        "{}",
        reply.body
    );
    assert_problem(
        &send(
            app,
            Method::GET,
            &format!("/v1/vms/{}/disks/{}", scene.vm, scene.queued_disk.target.id),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "disk_not_found",
    );
    assert_eq!(
        app.volume_files(),
        scene.files_before,
        "no file appeared for the cancelled jobs"
    );
}

/// The running job, paused before its first step, accepts the request and rolls back:
/// no snapshot, the same files, chains and bytes as before.
async fn the_paused_running_job_rolls_back(app: &TestApp, scene: &CancelScene) {
    let reply = cancel(app, scene.running.id).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["cancel_requested"], true, "{}", reply.body);
    assert_eq!(reply.body["status"], "running", "{}", reply.body);
    let ended = app.wait_job(scene.running.id).await;
    assert_eq!(ended.status, JobStatus::Cancelled, "{ended:?}");
    assert!(ended.error.is_none(), "{ended:?}");

    assert_problem(
        &send(
            app,
            Method::GET,
            &format!("/v1/snapshots/{}", scene.running.target.id),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "snapshot_not_found",
    );
    let snapshots: SnapshotList = app.get_as(&format!("/v1/vms/{}/snapshots", scene.vm)).await;
    assert!(snapshots.items.is_empty(), "{snapshots:?}");
    let view = app.vm(scene.vm).await;
    assert_eq!(view.current_snapshot_id, None);
    assert_eq!(view.status, ResourceStatus::Ready);
    assert_eq!(view.disks.len(), 2, "{view:?}");
    assert_eq!(app.volume_files(), scene.files_before, "no leftover files");
    assert_eq!(app.active_path(scene.vm, "root").await, scene.root);
    assert_eq!(app.active_path(scene.vm, "data").await, scene.data);
    for path in [&scene.root, &scene.data] {
        assert_eq!(chain(path).len(), 1, "the chain is unchanged");
        check_clean(path);
    }
    expect(&scene.root, 0x11, 0, 2);
    expect_all(&scene.data, &[(0, 0, 1), (0x22, 1, 1)]);
}

/// Ended jobs cannot be cancelled, whatever their outcome.
async fn ended_jobs_cannot_be_cancelled(app: &TestApp, scene: &CancelScene) {
    let created = list(app, &format!("vm_id={}&kind=vm_create", scene.vm)).await;
    for job in [scene.running.id, scene.queued.id, created.items[0].id] {
        assert_problem(
            &cancel(app, job).await,
            StatusCode::CONFLICT,
            "job_not_cancellable",
        );
    }
    let cancelled = list(app, "status=cancelled").await;
    assert_eq!(cancelled.items.len(), 3, "{cancelled:?}");
}

#[tokio::test]
async fn cancelling_a_queued_job_drops_it_and_cancelling_a_paused_running_job_rolls_it_back() {
    let app = TestApp::spawn_with(&[PAUSE_SNAPSHOT]).await;
    let scene = one_job_paused_and_two_queued_behind_it(&app).await;
    queued_jobs_are_cancelled_at_once_with_their_records(&app, &scene).await;
    the_paused_running_job_rolls_back(&app, &scene).await;
    ended_jobs_cannot_be_cancelled(&app, &scene).await;

    // The cancelled snapshot's name is free again and the VM works as before.
    let vm = scene.vm;
    let s1 = app.snapshot(vm, "s1").await.id;
    expect(app.snapshot_path(vm, s1, "root").await, 0x11, 0, 2);
    let (status, _) = app
        .patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
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
    let a = app.create_vm("side-a", &[("root", DISK)]).await.id;
    let b = app.create_vm("side-b", &[("root", DISK)]).await.id;
    let snapshot = async |vm: Uuid, name: &str| {
        let path = format!("/v1/vms/{vm}/snapshots");
        app.accept(Method::POST, &path, Some(json!({"name": name})))
            .await
    };
    let first_a = snapshot(a, "one").await;
    let second_a = snapshot(a, "two").await;
    let first_b = snapshot(b, "one").await;

    // Both VMs' first jobs are inside their pause at the same moment...
    wait_planned(&app, first_a.id).await;
    wait_planned(&app, first_b.id).await;
    let a_view = app.job(first_a.id).await;
    assert_eq!(a_view.status, JobStatus::Running, "{a_view:?}");
    // ...while the second job of VM a has not started.
    let queued = app.job(second_a.id).await;
    assert_eq!(queued.status, JobStatus::Queued, "{queued:?}");

    for job in [&first_a, &second_a, &first_b] {
        let job = app.wait_job(job.id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    }
    // The second snapshot of a grew from the first: they ran in order.
    let second = app.get_snapshot(second_a.target.id).await;
    assert_eq!(second.parent_id, Some(first_a.target.id));
}

#[tokio::test]
async fn cancelling_a_delete_before_its_commit_starts_leaves_the_snapshot_usable() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_delete:planned:pause=3000")]).await;
    let vm = app.create_vm("cancel-merge", &[("root", DISK)]).await.id;
    write(app.active_path(vm, "root").await, 0x11, 0, 8);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x22, 1, 1);
    let s2 = app.snapshot(vm, "s2").await.id;
    let job = app
        .accept(Method::DELETE, &format!("/v1/snapshots/{s1}"), None)
        .await;
    let planned = wait_planned(&app, job.id).await;
    assert_eq!(
        planned.merges()[0].action,
        MergeAction::Commit,
        "{planned:?}"
    );
    let (status, cancelled) = app
        .post(&format!("/v1/jobs/{}/cancel", job.id), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
    let ended = app.wait_job(job.id).await;
    assert_eq!(ended.status, JobStatus::Cancelled, "{ended:?}");

    let snap = app.get_snapshot(s1).await;
    assert_eq!(
        snap.status,
        ResourceStatus::Ready,
        "no byte was merged: {snap:?}"
    );
    let view = app.vm(vm).await;
    assert!(
        view.disks[0]
            .chain
            .iter()
            .all(|c| c.status == VolumeStatus::Ready),
        "{view:?}"
    );
    expect_all(app.snapshot_path(vm, s1, "root").await, &[(0x11, 0, 8)]);
    expect_all(
        app.snapshot_path(vm, s2, "root").await,
        &[(0x11, 0, 1), (0x22, 1, 1), (0x11, 2, 6)],
    );
    app.revert(s1).await;
    expect_all(app.active_path(vm, "root").await, &[(0x11, 0, 8)]);
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
    let job = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{}/snapshots", vm.id),
            Some(json!({"name": "held"})),
        )
        .await;
    let (status, view) = app.get(&format!("/v1/jobs/{}?wait=30", job.id)).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "running", "{view}");
    assert_eq!(app.wait_job(job.id).await.status, JobStatus::Succeeded);
}

#[tokio::test]
async fn a_cancel_accepted_while_the_last_step_runs_rolls_that_step_back() {
    // Held after its only step (a stream) is done, before the result is committed.
    let app =
        TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_delete:after-step-0:pause=4000")]).await;
    let vm = app.create_vm("late", &[("root", DISK)]).await.id;
    write(app.active_path(vm, "root").await, 0x11, 0, 2);
    let s1 = app.snapshot(vm, "s1").await.id;
    write(app.active_path(vm, "root").await, 0x22, 2, 8);
    let regions = [(0x11, 0, 2), (0x22, 2, 8), (0, 10, 54)];
    let files_before = app.volume_files();

    let job = app
        .accept(Method::DELETE, &format!("/v1/snapshots/{s1}"), None)
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = app.job(job.id).await;
        assert!(
            matches!(view.status, JobStatus::Queued | JobStatus::Running),
            "{view:?}"
        );
        if view.progress >= 99 {
            assert_eq!(view.merges()[0].action, MergeAction::Stream, "{view:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream never finished: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = cancel(&app, job.id).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["cancel_requested"], true, "{}", reply.body);

    // Accepted means honoured: the stream's result is rolled back, not committed.
    let ended = app.wait_job(job.id).await;
    assert_eq!(ended.status, JobStatus::Cancelled, "{ended:?}");
    let snapshot = app.get_snapshot(s1).await;
    assert_eq!(snapshot.status, ResourceStatus::Ready, "{snapshot:?}");
    let active = app.active_path(vm, "root").await;
    assert_eq!(
        chain(&active).len(),
        2,
        "the present sits on s1's layer again"
    );
    expect_all(&active, &regions);
    expect_all(
        app.snapshot_path(vm, s1, "root").await,
        &[(0x11, 0, 2), (0, 2, 62)],
    );
    check_clean(&active);
    assert_eq!(app.volume_files(), files_before);
}

/// Queue a job whose stored parameters no reader knows, behind the service's back.
fn insert_unreadable_job(data_dir: &std::path::Path, vm: &Uuid) -> String {
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
    let vm = app.create_vm("odd", &[("root", MIB)]).await.id;
    app.kill();
    let bad = insert_unreadable_job(&app.data_dir, &vm);
    app.restart(&[]).await;

    // Listed like any job, and failed alone when it would run.
    let job = app.wait_job(&bad).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let error = job.error.as_ref().map(|e| e.code.as_str());
    assert_eq!(error, Some("internal_error"), "{job:?}");
    let (status, list) = app.get("/v1/jobs").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    // Every other job goes on: on the same VM, and on another.
    app.snapshot(&vm, "after").await;
    let other = app.create_vm("other", &[("root", MIB)]).await;
    assert_eq!(app.vm(other.id).await.status, ResourceStatus::Ready);
}

#[tokio::test]
async fn the_version_names_strata_the_qemu_img_it_runs_and_the_schema() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/v1/version").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let qemu = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .unwrap();
    let first_line = String::from_utf8(qemu.stdout).unwrap();
    assert_eq!(body["qemu_img"], first_line.lines().next().unwrap().trim());
    let newest_migration = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .split('_')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .unwrap();
    assert_eq!(body["schema_version"], newest_migration);
    assert!(body["git_commit"].is_null() || body["git_commit"].is_string());

    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(cli.stdout).unwrap().trim(),
        format!("strata {}", env!("CARGO_PKG_VERSION"))
    );
}
