//! VMs and their disks: creation, listing, renaming, power state, disks added, grown
//! and removed, VM deletion, and every bad input answered with the right problem while
//! leaving records and files exactly as they were. Files are checked with qemu-img and
//! qemu-io, not only through the API.

use std::path::PathBuf;

use reqwest::header::LOCATION;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 64 * MIB;
const TIB: u64 = 1 << 40;

/// Everything a refused request must leave alone: VM records with their disks and
/// chains, the jobs, and every file with its size.
async fn world(app: &TestApp) -> (Value, Value, Vec<(PathBuf, u64)>) {
    let (status, vms) = app.get("/v1/vms?limit=1000").await;
    assert_eq!(status, StatusCode::OK, "{vms}");
    let (status, jobs) = app.get("/v1/jobs?limit=1000").await;
    assert_eq!(status, StatusCode::OK, "{jobs}");
    let files = app
        .volume_files()
        .into_iter()
        .map(|f| {
            let len = std::fs::metadata(&f).unwrap().len();
            (f, len)
        })
        .collect();
    (vms, jobs, files)
}

fn names(list: &VmList) -> Vec<&str> {
    list.items.iter().map(|vm| vm.name.as_str()).collect()
}

/// Names of the VMs `GET /v1/vms?{query}` lists, in order.
async fn vm_names(app: &TestApp, query: &str) -> Vec<String> {
    let list: VmList = app.get_as(&format!("/v1/vms?{query}")).await;
    list.items.into_iter().map(|vm| vm.name).collect()
}

#[tokio::test]
async fn creating_a_vm_answers_202_with_a_job_and_its_disks_become_empty_qcow2_files_of_the_asked_size()
 {
    let app = TestApp::spawn().await;
    let body = json!({"name": "web-01", "description": "front end", "disks": [
        {"name": "root", "size_bytes": DISK}, {"name": "data", "size_bytes": 32 * MIB + 512}]});
    let reply = send_json(&app, Method::POST, "/v1/vms", &body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let job: JobView = reply.read();
    assert_eq!(
        reply.headers.get(LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{}", job.id).as_str())
    );
    assert_eq!(job.kind, JobKind::VmCreate);
    assert_eq!(job.target.target_type, TargetType::Vm);
    assert!(!job.cancel_requested);
    let vm_id = job.target.id;
    assert_eq!(job.vm_id, Some(vm_id));

    // The record exists at once, before (or just as) the job creates the files.
    let early = app.vm(vm_id).await;
    assert!(
        matches!(
            early.status,
            ResourceStatus::Creating | ResourceStatus::Ready
        ),
        "{early:?}"
    );
    assert_eq!(early.name, "web-01");
    assert_eq!(early.disks.len(), 2);

    // The Location header leads to the job.
    assert_eq!(app.job(job.id).await.id, job.id);
    let job = app.wait_job(job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.progress, 100);

    let vm = app.vm(vm_id).await;
    assert_eq!(vm.status, ResourceStatus::Ready);
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(vm.description, "front end");
    assert_eq!(vm.current_snapshot_id, None);
    for (name, size) in [("root", DISK), ("data", 32 * MIB + 512)] {
        let disk = vm.disk(name);
        assert_eq!(disk.format, "qcow2");
        assert_eq!(disk.status, ResourceStatus::Ready);
        assert_eq!(disk.size_bytes, size);
        assert_eq!(disk.vm_id, vm_id);
        let path = disk.path();
        assert!(exists(path), "{path}");
        assert!(
            PathBuf::from(path).starts_with(app.data_dir.canonicalize().unwrap().join("volumes")),
            "{path}"
        );
        assert_eq!(virtual_size(path), size);
        assert_eq!(chain(path).len(), 1);
        assert_eq!(disk.chain.len(), 1);
        assert!(matches!(disk.chain[0].role, VolumeRole::Active));
        assert_eq!(disk.chain[0].path, path);
        assert_eq!(disk.chain[0].size_bytes, size);
        check_clean(path);
        // A fresh disk reads as zeros and takes writes.
        expect(path, 0, 0, 4);
        write(path, 0x42, 1, 1);
        expect(path, 0x42, 1, 1);
    }
    assert_eq!(app.volume_files().len(), 2);
}

#[tokio::test]
async fn listing_vms_pages_through_all_of_them_with_a_cursor_and_filters_by_name() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(app.create_vm(&format!("page-{i}"), &[]).await.id);
    }

    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/vms?limit=2&cursor={c}"),
            None => "/v1/vms?limit=2".to_owned(),
        };
        let page: VmList = app.get_as(&path).await;
        pages.push(page.items.len());
        seen.extend(page.items.iter().map(|vm| vm.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages, vec![2, 2, 1]);
    assert_eq!(seen, created, "every VM once, in creation order");

    let all: VmList = app.get_as("/v1/vms").await;
    assert_eq!(all.items.len(), 5);
    assert!(all.next_cursor.is_none(), "{all:?}");

    let one: VmList = app.get_as("/v1/vms?name=page-3").await;
    assert_eq!(names(&one), ["page-3"]);
    assert_eq!(one.items[0].id, created[3]);
    assert!(one.next_cursor.is_none());
    assert_eq!(
        vm_names(&app, "name=page").await,
        Vec::<String>::new(),
        "the name filter is exact"
    );

    for query in ["limit=0", "limit=1001", "limit=-1", "limit=two"] {
        assert_problem(
            &send(&app, Method::GET, &format!("/v1/vms?{query}"), None, None).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        );
    }
    assert_problem(
        &send(&app, Method::GET, "/v1/vms?cursor=not-a-cursor", None, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    );
    let (status, _) = app.get("/v1/vms?limit=1000").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn patching_a_vm_changes_its_name_description_and_power_state() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("patch-a", &[("root", DISK)]).await;
    let path = format!("/v1/vms/{}", vm.id);
    let patch = async |body| -> VmView { app.call(Method::PATCH, &path, Some(body)).await };

    let patched = patch(json!({"name": "patch-b", "description": "renamed"})).await;
    assert_eq!(patched.name, "patch-b");
    assert_eq!(patched.description, "renamed");
    assert_eq!(patched.state, VmState::Stopped);
    assert!(patched.updated_at >= vm.updated_at);
    assert_eq!(vm_names(&app, "name=patch-a").await, Vec::<String>::new());
    assert_eq!(vm_names(&app, "name=patch-b").await, ["patch-b"]);

    // Only the fields sent change.
    let patched = patch(json!({"state": "running"})).await;
    assert_eq!(
        (
            patched.state,
            patched.name.as_str(),
            patched.description.as_str()
        ),
        (VmState::Running, "patch-b", "renamed")
    );
    assert_eq!(app.vm(vm.id).await.state, VmState::Running);
    let patched = patch(json!({"description": ""})).await;
    assert_eq!(
        (patched.state, patched.description.as_str()),
        (VmState::Running, "")
    );
    let patched = patch(json!({"state": "stopped"})).await;
    assert_eq!(patched.state, VmState::Stopped);

    // Disks and files are untouched by a PATCH.
    let after = app.vm(vm.id).await;
    assert_eq!(to_json(&after.disks), to_json(&vm.disks));
}

#[tokio::test]
async fn renaming_a_vm_to_a_name_another_vm_has_is_a_conflict_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.create_vm("taken", &[]).await;
    let other = app.create_vm("other", &[("root", DISK)]).await.id;
    let before = world(&app).await;

    let reply = send_json(
        &app,
        Method::PATCH,
        &format!("/v1/vms/{other}"),
        &json!({"name": "taken", "description": "x", "state": "running"}),
    )
    .await;
    assert_problem(&reply, StatusCode::CONFLICT, "name_taken");
    assert_eq!(world(&app).await, before);
    let vm = app.vm(other).await;
    assert_eq!(
        (vm.name.as_str(), vm.description.as_str(), vm.state),
        ("other", "", VmState::Stopped)
    );

    // Renaming a VM to its own name is not a conflict.
    let (status, _) = app
        .patch(&format!("/v1/vms/{other}"), json!({"name": "other"}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_vm_creation_requests_are_refused_with_problems_and_change_nothing() {
    let app = TestApp::spawn().await;
    app.create_vm("exists", &[("root", DISK)]).await;
    let before = world(&app).await;

    let malformed = send(
        &app,
        Method::POST,
        "/v1/vms",
        Some("application/json"),
        Some(b"{\"name\": \"x\", ".to_vec()),
    )
    .await;
    assert_problem(&malformed, StatusCode::BAD_REQUEST, "invalid_json");
    let not_json = send(
        &app,
        Method::POST,
        "/v1/vms",
        Some("application/json"),
        Some(b"name=x".to_vec()),
    )
    .await;
    assert_problem(&not_json, StatusCode::BAD_REQUEST, "invalid_json");
    let untyped = send(
        &app,
        Method::POST,
        "/v1/vms",
        None,
        Some(json!({"name": "untyped"}).to_string().into_bytes()),
    )
    .await;
    assert_problem(
        &untyped,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let as_text = send(
        &app,
        Method::POST,
        "/v1/vms",
        Some("text/plain"),
        Some(json!({"name": "as-text"}).to_string().into_bytes()),
    )
    .await;
    assert_problem(
        &as_text,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    for (body, what) in [
        (json!({"name": "x", "colour": "red"}), "unknown field"),
        (
            json!({"name": "x", "disks": [{"name": "root", "size_bytes": DISK, "iops": 5}]}),
            "unknown disk field",
        ),
        (json!({"description": "no name"}), "missing name"),
        (json!({"name": 7}), "name of the wrong type"),
        (
            json!({"name": "x", "disks": [{"name": "root"}]}),
            "missing size",
        ),
        (json!("x"), "a string"),
        (json!(null), "null"),
    ] {
        let reply = send_json(&app, Method::POST, "/v1/vms", &body).await;
        assert_eq!(reply.body["code"], "invalid_json", "{what}: {}", reply.body);
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid_json");
    }
    // A value of the right JSON type that breaks a rule names its field.
    let body = json!({"name": "x", "disks": [{"name": "root", "size_bytes": -512}]});
    let reply = send_json(&app, Method::POST, "/v1/vms", &body).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "validation_failed");
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.starts_with("disks[0].size_bytes: "), "{detail}");
    assert_eq!(world(&app).await, before);
}

#[tokio::test]
async fn invalid_names_and_sizes_are_refused_with_problems_and_change_nothing() {
    let app = TestApp::spawn().await;
    app.create_vm("exists", &[("root", DISK)]).await;
    let before = world(&app).await;
    let long = "x".repeat(129);

    for (body, status, code, what) in [
        (
            json!({"name": ""}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "empty name",
        ),
        (
            json!({"name": "   "}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "blank name",
        ),
        (
            json!({"name": long}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "129 characters",
        ),
        (
            json!({"name": " web"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "leading space",
        ),
        (
            json!({"name": "web "}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "trailing space",
        ),
        (
            json!({"name": "a\nb"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "control character",
        ),
        (
            json!({"name": "ok", "description": "d".repeat(4097)}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "long description",
        ),
        (
            json!({"name": "exists"}),
            StatusCode::CONFLICT,
            "name_taken",
            "duplicate VM name",
        ),
        (
            json!({"name": "exists", "disks": [{"name": "root", "size_bytes": DISK}]}),
            StatusCode::CONFLICT,
            "name_taken",
            "duplicate VM name with disks",
        ),
        (
            json!({"name": "ok", "disks": [{"name": "d", "size_bytes": DISK}, {"name": "d", "size_bytes": DISK}]}),
            StatusCode::CONFLICT,
            "name_taken",
            "same disk name twice",
        ),
        (
            json!({"name": "ok", "disks": [{"name": "", "size_bytes": DISK}]}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "empty disk name",
        ),
        (
            json!({"name": "ok", "disks": [{"name": "d", "size_bytes": 0}]}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "size 0",
        ),
        (
            json!({"name": "ok", "disks": [{"name": "d", "size_bytes": MIB + 1}]}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "size not whole sectors",
        ),
        (
            json!({"name": "ok", "disks": [{"name": "d", "size_bytes": 1000}]}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "size 1000",
        ),
        (
            json!({"name": "ok", "disks": [{"name": "d", "size_bytes": 17 * TIB}]}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "size above the 16 TiB cap",
        ),
        (
            json!({"name": "ok", "disks": [{"name": "d", "size_bytes": DISK}, {"name": "e", "size_bytes": 0}]}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "second disk invalid",
        ),
    ] {
        let reply = send_json(&app, Method::POST, "/v1/vms", &body).await;
        assert_eq!(reply.body["code"], code, "{what}: {}", reply.body);
        assert_problem(&reply, status, code);
    }
    assert_eq!(world(&app).await, before);
    assert_eq!(vm_names(&app, "").await, ["exists"]);

    // The limits themselves are accepted: 128 characters, and exactly 16 TiB (qcow2 is sparse).
    let vm = app.create_vm(&"y".repeat(128), &[("huge", 16 * TIB)]).await;
    assert_eq!(virtual_size(vm.disk("huge").path()), 16 * TIB);
}

#[tokio::test]
async fn invalid_patches_are_refused_with_problems_and_change_nothing() {
    let app = TestApp::spawn().await;
    let vm_id = app.create_vm("patch-me", &[("root", DISK)]).await.id;
    let path = format!("/v1/vms/{vm_id}");
    let before = world(&app).await;

    for (body, code, what) in [
        (json!({"name": ""}), "validation_failed", "empty name"),
        (
            json!({"name": "z".repeat(129)}),
            "validation_failed",
            "129 characters",
        ),
        (
            json!({"name": " patch"}),
            "validation_failed",
            "leading space",
        ),
        (
            json!({"description": "d".repeat(4097)}),
            "validation_failed",
            "long description",
        ),
        (
            json!({"name": "fine", "size": 1}),
            "invalid_json",
            "unknown field",
        ),
        (
            json!({"state": "paused"}),
            "validation_failed",
            "unknown state",
        ),
        (
            json!({"name": null, "state": 1}),
            "invalid_json",
            "state of the wrong type",
        ),
    ] {
        let reply = send_json(&app, Method::PATCH, &path, &body).await;
        assert_eq!(reply.body["code"], code, "{what}: {}", reply.body);
        assert_problem(&reply, StatusCode::BAD_REQUEST, code);
    }
    let untyped = send(
        &app,
        Method::PATCH,
        &path,
        None,
        Some(json!({"name": "fine"}).to_string().into_bytes()),
    )
    .await;
    assert_problem(
        &untyped,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let broken = send(
        &app,
        Method::PATCH,
        &path,
        Some("application/json"),
        Some(b"{".to_vec()),
    )
    .await;
    assert_problem(&broken, StatusCode::BAD_REQUEST, "invalid_json");
    assert_eq!(world(&app).await, before);
}

#[tokio::test]
async fn unknown_ids_routes_and_methods_get_not_found_and_method_not_allowed_problems() {
    let app = TestApp::spawn().await;
    let vm_id = app.create_vm("known", &[("root", DISK)]).await.id;
    let before = world(&app).await;

    for vm in [UNKNOWN_ID, "not-a-uuid", "12345"] {
        let get = send(&app, Method::GET, &format!("/v1/vms/{vm}"), None, None).await;
        assert_problem(&get, StatusCode::NOT_FOUND, "vm_not_found");
        let patch = send_json(
            &app,
            Method::PATCH,
            &format!("/v1/vms/{vm}"),
            &json!({"description": "x"}),
        )
        .await;
        assert_problem(&patch, StatusCode::NOT_FOUND, "vm_not_found");
        let delete = send(&app, Method::DELETE, &format!("/v1/vms/{vm}"), None, None).await;
        assert_problem(&delete, StatusCode::NOT_FOUND, "vm_not_found");
        let disks = send(
            &app,
            Method::GET,
            &format!("/v1/vms/{vm}/disks"),
            None,
            None,
        )
        .await;
        assert_problem(&disks, StatusCode::NOT_FOUND, "vm_not_found");
        let add = send_json(
            &app,
            Method::POST,
            &format!("/v1/vms/{vm}/disks"),
            &json!({"name": "d", "size_bytes": DISK}),
        )
        .await;
        assert_problem(&add, StatusCode::NOT_FOUND, "vm_not_found");
        let snapshot = send_json(
            &app,
            Method::POST,
            &format!("/v1/vms/{vm}/snapshots"),
            &json!({"name": "s"}),
        )
        .await;
        assert_problem(&snapshot, StatusCode::NOT_FOUND, "vm_not_found");
    }
    // (`/` is the dashboard.)
    for path in ["/v1/nothing", "/v1/vms/x/y/z", "/v2/vms", "/nothing"] {
        assert_problem(
            &send(&app, Method::GET, path, None, None).await,
            StatusCode::NOT_FOUND,
            "route_not_found",
        );
    }
    assert_problem(
        &send_json(&app, Method::POST, "/v1/nothing", &json!({})).await,
        StatusCode::NOT_FOUND,
        "route_not_found",
    );
    for (method, path) in [
        (Method::PUT, "/v1/vms".to_owned()),
        (Method::DELETE, "/v1/vms".to_owned()),
        (Method::PATCH, "/v1/vms".to_owned()),
        (Method::PUT, format!("/v1/vms/{vm_id}")),
        (Method::POST, format!("/v1/vms/{vm_id}")),
        (
            Method::GET,
            format!("/v1/vms/{vm_id}/disks/{UNKNOWN_ID}/resize"),
        ),
    ] {
        let reply = send_json(&app, method.clone(), &path, &json!({"name": "x"})).await;
        assert_eq!(
            reply.body["code"], "method_not_allowed",
            "{method} {path}: {}",
            reply.body
        );
        assert_problem(&reply, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    }
    assert_eq!(world(&app).await, before);
}

#[tokio::test]
async fn a_snapshot_of_a_vm_without_disks_is_refused() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("diskless", &[]).await;
    assert_eq!(vm.status, ResourceStatus::Ready);
    assert!(vm.disks.is_empty(), "{vm:?}");
    let vm_id = vm.id;
    let before = world(&app).await;

    let reply = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{vm_id}/snapshots"),
        &json!({"name": "nothing"}),
    )
    .await;
    assert_problem(&reply, StatusCode::CONFLICT, "vm_has_no_disks");
    assert_eq!(world(&app).await, before);
    let list: SnapshotList = app.get_as(&format!("/v1/vms/{vm_id}/snapshots")).await;
    assert!(list.items.is_empty(), "{list:?}");
    assert_eq!(app.volume_files(), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn snapshot_names_are_unique_within_a_vm_but_may_repeat_across_vms() {
    let app = TestApp::spawn().await;
    let first = app.create_vm("first", &[("root", DISK)]).await.id;
    let second = app.create_vm("second", &[("root", DISK)]).await.id;
    let path = app.active_path(first, "root").await;
    write(&path, 0x17, 0, 1);
    let s1 = app.snapshot(first, "nightly").await.id;
    let before = world(&app).await;
    let snapshot_names = async |vm: Uuid| {
        let list: SnapshotList = app.get_as(&format!("/v1/vms/{vm}/snapshots")).await;
        let names: Vec<String> = list.items.into_iter().map(|s| s.name).collect();
        (names, list.current_snapshot_id)
    };

    let reply = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{first}/snapshots"),
        &json!({"name": "nightly", "description": "again"}),
    )
    .await;
    assert_problem(&reply, StatusCode::CONFLICT, "name_taken");
    assert_eq!(world(&app).await, before);
    assert_eq!(
        snapshot_names(first).await,
        (vec!["nightly".to_owned()], Some(s1))
    );

    let s2 = app.snapshot(second, "nightly").await.id;
    assert_ne!(s1, s2);
    assert_eq!(snapshot_names(second).await.0, ["nightly"]);
    expect(app.snapshot_path(first, s1, "root").await, 0x17, 0, 1);
    expect(app.active_path(first, "root").await, 0x17, 0, 1);
}

#[tokio::test]
async fn a_json_array_body_is_not_taken_for_an_object() {
    let app = TestApp::spawn().await;
    let vm_id = app.create_vm("exists", &[("root", DISK)]).await.id;
    let before = world(&app).await;
    for body in [json!(["x"]), json!(["y", "positional", [["root", DISK]]])] {
        let reply = send_json(&app, Method::POST, "/v1/vms", &body).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid_json");
    }
    let reply = send_json(
        &app,
        Method::PATCH,
        &format!("/v1/vms/{vm_id}"),
        &json!(["renamed"]),
    )
    .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid_json");
    assert_eq!(world(&app).await, before);
}

#[tokio::test]
async fn a_body_larger_than_the_limit_is_refused_with_413_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let before = world(&app).await;
    // The refusal comes from the declared length, before any of the body is read. A
    // client that sends the body anyway may find the connection closed under it (a
    // broken pipe, depending on timing), so this one asks first, as curl does for
    // large bodies.
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/vms HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        2 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("an answer without the body")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{answer}"
    );
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["code"], "payload_too_large", "{body}");
    assert_eq!(body["status"], 413, "{body}");
    assert_eq!(world(&app).await, before);
}

#[tokio::test]
async fn a_body_just_under_the_limit_reaches_validation() {
    // 1 MiB is accepted as a body; this one fails later, on the description length.
    let app = TestApp::spawn().await;
    let body = json!({"name": "big", "description": "d".repeat((1 << 20) - 64)});
    let reply = send_json(&app, Method::POST, "/v1/vms", &body).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(vm_names(&app, "").await, Vec::<String>::new());
}

#[tokio::test]
async fn adding_a_disk_creates_its_file_and_another_disk_with_the_same_name_is_a_conflict() {
    let app = TestApp::spawn().await;
    let vm_id = app.create_vm("grow-disks", &[("root", DISK)]).await.id;
    let root = app.active_path(vm_id, "root").await;
    write(&root, 0x31, 0, 1);

    let reply = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{vm_id}/disks"),
        &json!({"name": "data", "size_bytes": 32 * MIB}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let job: JobView = reply.read();
    assert_eq!(
        reply.headers.get(LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{}", job.id).as_str())
    );
    assert_eq!(job.kind, JobKind::DiskCreate);
    assert_eq!(job.target.target_type, TargetType::Disk);
    let disk_id = job.target.id;
    app.expect_job((reply.status, reply.body)).await;

    let view: DiskView = app
        .get_as(&format!("/v1/vms/{vm_id}/disks/{disk_id}"))
        .await;
    assert_eq!(
        (view.name.as_str(), view.status, view.format.as_str()),
        ("data", ResourceStatus::Ready, "qcow2")
    );
    assert_eq!(view.size_bytes, 32 * MIB);
    let data = view.path();
    assert!(exists(data));
    assert_eq!(virtual_size(data), 32 * MIB);
    assert_eq!(chain(data).len(), 1);
    check_clean(data);
    let disks = format!("/v1/vms/{vm_id}/disks");
    let all: DiskList = app.get_as(&disks).await;
    assert_eq!(all.items.len(), 2);
    assert_eq!(all.next_cursor, None);
    let first: DiskList = app.get_as(&format!("{disks}?limit=1")).await;
    assert_eq!(first.items.len(), 1);
    let cursor = first.next_cursor.expect("a second page");
    let second: DiskList = app
        .get_as(&format!("{disks}?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(second.items.len(), 1);
    assert_ne!(second.items[0].id, first.items[0].id);
    assert_eq!(second.next_cursor, None);
    assert_eq!(app.volume_files().len(), 2);

    let before = world(&app).await;
    let taken = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{vm_id}/disks"),
        &json!({"name": "root", "size_bytes": DISK}),
    )
    .await;
    assert_problem(&taken, StatusCode::CONFLICT, "name_taken");
    let zero = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{vm_id}/disks"),
        &json!({"name": "zero", "size_bytes": 0}),
    )
    .await;
    assert_problem(&zero, StatusCode::BAD_REQUEST, "validation_failed");
    let huge = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{vm_id}/disks"),
        &json!({"name": "huge", "size_bytes": 17 * TIB}),
    )
    .await;
    assert_problem(&huge, StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(world(&app).await, before);
    expect(&root, 0x31, 0, 1);
}

#[tokio::test]
async fn growing_a_disk_keeps_its_data_and_shrinking_or_keeping_its_size_is_refused() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("resize", &[("root", DISK)]).await;
    let (vm_id, disk_id) = (vm.id, vm.disk("root").id);
    let path = app.active_path(vm_id, "root").await;
    write(&path, 0x5a, 0, 2);
    write(&path, 0x5b, 62, 2);
    let resize = format!("/v1/vms/{vm_id}/disks/{disk_id}/resize");

    let job = app
        .expect_job(app.post(&resize, json!({"size_bytes": 2 * DISK})).await)
        .await;
    assert_eq!(job.kind, JobKind::DiskResize);
    assert_eq!(job.target.id, disk_id);
    let grown = app.active_path(vm_id, "root").await;
    assert_eq!(grown, path, "a resize grows the file in place");
    assert_eq!(virtual_size(&grown), 2 * DISK);
    assert_eq!(app.vm(vm_id).await.disks[0].size_bytes, 2 * DISK);
    expect_all(
        &grown,
        &[(0x5a, 0, 2), (0, 2, 60), (0x5b, 62, 2), (0, 64, 64)],
    );
    write(&grown, 0x5c, 120, 8);
    expect(&grown, 0x5c, 120, 8);
    check_clean(&grown);

    let before = world(&app).await;
    for size in [DISK, 2 * DISK, 2 * DISK - 512, 512] {
        let body = json!({"size_bytes": size});
        let problem = app
            .expect_problem(
                Method::POST,
                &resize,
                Some(body),
                StatusCode::CONFLICT,
                "disk_shrink_refused",
            )
            .await;
        assert_eq!(problem.current_size_bytes, Some(2 * DISK), "{problem:?}");
    }
    for size in [0, 2 * DISK + 1, 17 * TIB] {
        let reply = send_json(&app, Method::POST, &resize, &json!({"size_bytes": size})).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "validation_failed");
    }
    assert_problem(
        &send_json(&app, Method::POST, &resize, &json!({"size": 3 * DISK})).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_eq!(world(&app).await, before);
    assert_eq!(virtual_size(&grown), 2 * DISK);
    expect_all(&grown, &[(0x5a, 0, 2), (0x5b, 62, 2), (0x5c, 120, 8)]);
}

#[tokio::test]
async fn deleting_a_disk_removes_its_files_and_its_layers_in_snapshots_and_keeps_the_other_disks() {
    let app = TestApp::spawn().await;
    let vm = app
        .create_vm("drop-disk", &[("root", DISK), ("data", DISK)])
        .await;
    let (vm_id, data_id) = (vm.id, vm.disk("data").id);
    write(app.active_path(vm_id, "root").await, 0x11, 0, 2);
    write(app.active_path(vm_id, "data").await, 0x21, 0, 2);
    let s1 = app.snapshot(vm_id, "s1").await.id;
    write(app.active_path(vm_id, "root").await, 0x12, 1, 1);
    let data_frozen = app.snapshot_path(vm_id, s1, "data").await;
    let data_active = app.active_path(vm_id, "data").await;
    let root_frozen = app.snapshot_path(vm_id, s1, "root").await;
    let root_active = app.active_path(vm_id, "root").await;
    assert_eq!(app.volume_files().len(), 4);

    let job = app
        .run_job(
            Method::DELETE,
            &format!("/v1/vms/{vm_id}/disks/{data_id}"),
            None,
        )
        .await;
    assert_eq!(job.kind, JobKind::DiskDelete);
    assert!(
        !exists(&data_frozen),
        "the disk's layer in the snapshot is gone"
    );
    assert!(!exists(&data_active));
    let mut remaining: Vec<String> = app
        .volume_files()
        .iter()
        .map(|f| f.canonicalize().unwrap().display().to_string())
        .collect();
    remaining.sort();
    let mut expected = vec![root_frozen.clone(), root_active.clone()];
    expected.sort();
    assert_eq!(remaining, expected);

    let view = app.vm(vm_id).await;
    assert_eq!(view.disks.len(), 1);
    assert_eq!(view.disks[0].name, "root");
    let (status, _) = app.get(&format!("/v1/vms/{vm_id}/disks/{data_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let snap = app.get_snapshot(s1).await;
    assert_eq!(snap.status, ResourceStatus::Ready);
    assert_eq!(snap.volumes.len(), 1, "{snap:?}");
    assert_eq!(snap.volumes[0].path, root_frozen);

    // The other disk's snapshot layer and present state still read back, and reverting
    // to the snapshot still works.
    expect(&root_frozen, 0x11, 0, 2);
    expect_all(&root_active, &[(0x11, 0, 1), (0x12, 1, 1)]);
    check_clean(&root_active);
    app.revert(s1).await;
    let reverted = app.active_path(vm_id, "root").await;
    expect(&reverted, 0x11, 0, 2);
    assert_eq!(chain(&reverted).len(), 2);
    assert_eq!(app.vm(vm_id).await.disks.len(), 1);
}

#[tokio::test]
async fn a_disk_of_another_vm_is_not_found_through_this_vm() {
    let app = TestApp::spawn().await;
    let mine = app.create_vm("mine", &[("root", DISK)]).await.id;
    let theirs = app.create_vm("theirs", &[("root", DISK)]).await;
    let their_disk = theirs.disk("root").id.to_string();
    write(theirs.disk("root").path(), 0x66, 0, 1);
    let before = world(&app).await;

    for disk in [their_disk.as_str(), UNKNOWN_ID, "not-a-uuid"] {
        let base = format!("/v1/vms/{mine}/disks/{disk}");
        assert_problem(
            &send(&app, Method::GET, &base, None, None).await,
            StatusCode::NOT_FOUND,
            "disk_not_found",
        );
        assert_problem(
            &send(&app, Method::DELETE, &base, None, None).await,
            StatusCode::NOT_FOUND,
            "disk_not_found",
        );
        let resize = send_json(
            &app,
            Method::POST,
            &format!("{base}/resize"),
            &json!({"size_bytes": 2 * DISK}),
        )
        .await;
        assert_problem(&resize, StatusCode::NOT_FOUND, "disk_not_found");
    }
    let unknown_vm = send(
        &app,
        Method::GET,
        &format!("/v1/vms/{UNKNOWN_ID}/disks/{their_disk}"),
        None,
        None,
    )
    .await;
    assert_problem(&unknown_vm, StatusCode::NOT_FOUND, "vm_not_found");
    assert_eq!(world(&app).await, before);
    expect(app.active_path(theirs.id, "root").await, 0x66, 0, 1);
}

#[tokio::test]
async fn deleting_a_vm_with_snapshots_removes_all_its_files_and_records() {
    let app = TestApp::spawn().await;
    let keep = app.create_vm("keep", &[("root", DISK)]).await.id;
    write(app.active_path(keep, "root").await, 0x44, 0, 1);
    let keep_files = app.volume_files();

    let vm_id = app
        .create_vm("doomed", &[("root", DISK), ("data", 32 * MIB)])
        .await
        .id;
    write(app.active_path(vm_id, "root").await, 0x11, 0, 2);
    let s1 = app.snapshot(vm_id, "s1").await.id;
    write(app.active_path(vm_id, "data").await, 0x22, 0, 2);
    let s2 = app.snapshot(vm_id, "s2").await.id;
    app.revert(s1).await;
    let s3 = app.snapshot(vm_id, "s3").await.id;
    assert!(app.volume_files().len() > keep_files.len() + 2);

    let job = app
        .accept(Method::DELETE, &format!("/v1/vms/{vm_id}"), None)
        .await;
    assert_eq!(job.kind, JobKind::VmDelete);
    let again = send(
        &app,
        Method::DELETE,
        &format!("/v1/vms/{vm_id}"),
        None,
        None,
    )
    .await;
    match again.status {
        StatusCode::CONFLICT => assert_problem(&again, StatusCode::CONFLICT, "vm_not_ready"),
        _ => assert_problem(&again, StatusCode::NOT_FOUND, "vm_not_found"),
    }
    let job = app.wait_job(job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");

    assert_eq!(
        app.volume_files(),
        keep_files,
        "only the other VM's files remain"
    );
    assert_problem(
        &send(&app, Method::GET, &format!("/v1/vms/{vm_id}"), None, None).await,
        StatusCode::NOT_FOUND,
        "vm_not_found",
    );
    assert_problem(
        &send(
            &app,
            Method::GET,
            &format!("/v1/vms/{vm_id}/snapshots"),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "vm_not_found",
    );
    for snapshot in [&s1, &s2, &s3] {
        let reply = send(
            &app,
            Method::GET,
            &format!("/v1/snapshots/{snapshot}"),
            None,
            None,
        )
        .await;
        assert_problem(&reply, StatusCode::NOT_FOUND, "snapshot_not_found");
    }
    assert_problem(
        &send(
            &app,
            Method::DELETE,
            &format!("/v1/vms/{vm_id}"),
            None,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "vm_not_found",
    );
    assert_eq!(vm_names(&app, "").await, ["keep"]);

    // The name is free again, and the other VM is intact.
    app.create_vm("doomed", &[]).await;
    expect(app.active_path(keep, "root").await, 0x44, 0, 1);
    check_clean(app.active_path(keep, "root").await);
}

#[tokio::test]
async fn a_vm_cannot_be_marked_running_while_a_job_still_works_on_its_files() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_create:planned:pause")]).await;
    let vm_id = app.create_vm("busy", &[("root", DISK)]).await.id;
    write(app.active_path(vm_id, "root").await, 0x77, 0, 1);
    let path = format!("/v1/vms/{vm_id}");

    let job = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{vm_id}/snapshots"),
            Some(json!({"name": "s1"})),
        )
        .await;
    let refused = app
        .expect_problem(
            Method::PATCH,
            &path,
            Some(json!({"state": "running", "description": "started"})),
            StatusCode::CONFLICT,
            "vm_busy",
        )
        .await;
    assert_eq!(refused.job_ids, Some(vec![job.id]), "{refused:?}");
    let vm = app.vm(vm_id).await;
    assert_eq!((vm.state, vm.description.as_str()), (VmState::Stopped, ""));

    // Other edits are fine while the job runs.
    let (status, _) = app.patch(&path, json!({"description": "waiting"})).await;
    assert_eq!(status, StatusCode::OK);

    let current = app.job(job.id).await;
    assert!(
        matches!(current.status, JobStatus::Queued | JobStatus::Running),
        "the pause keeps the job going: {current:?}"
    );
    let job = app.wait_job(job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");

    let vm: VmView = app
        .call(Method::PATCH, &path, Some(json!({"state": "running"})))
        .await;
    assert_eq!(
        (vm.state, vm.description.as_str()),
        (VmState::Running, "waiting")
    );
    expect(app.active_path(vm_id, "root").await, 0x77, 0, 1);
}

#[tokio::test]
async fn labels_are_set_on_creation_replaced_by_patch_and_select_vms_in_listings() {
    let app = TestApp::spawn().await;
    let body = json!({"name": "web-1", "labels": {"tier": "web", "example.com/team": "blue"}, "disks": []});
    let web1 = app
        .run_job(Method::POST, "/v1/vms", Some(body))
        .await
        .target
        .id;
    let web2 = app.create_vm("web-2", &[]).await.id;
    let db = app.create_vm("db-1", &[]).await.id;
    let set_labels = async |vm: Uuid, labels| -> VmView {
        let path = format!("/v1/vms/{vm}");
        app.call(Method::PATCH, &path, Some(json!({ "labels": labels })))
            .await
    };
    let labels = |vm: &VmView| to_json(&vm.labels);
    let vm = set_labels(web2, json!({"tier": "web"})).await;
    assert_eq!(labels(&vm), json!({"tier": "web"}));
    set_labels(db, json!({"tier": "db"})).await;

    assert_eq!(vm_names(&app, "label=tier=web").await, ["web-1", "web-2"]);
    assert_eq!(
        vm_names(&app, "label=example.com/team=blue").await,
        ["web-1"]
    );
    let list: VmList = app.get_as("/v1/vms?label=tier=web&limit=1").await;
    assert_eq!(names(&list), ["web-1"]);
    assert!(list.next_cursor.is_some());
    let one = app.vm(web1).await;
    assert_eq!(one.labels["example.com/team"], "blue");

    // Replacing with an empty map clears them; bad shapes are refused and change nothing.
    set_labels(web2, json!({})).await;
    assert_eq!(vm_names(&app, "label=tier=web").await, ["web-1"]);
    app.expect_problem(
        Method::PATCH,
        &format!("/v1/vms/{db}"),
        Some(json!({"labels": {"bad key": "x"}})),
        StatusCode::BAD_REQUEST,
        "validation_failed",
    )
    .await;
    assert_eq!(labels(&app.vm(db).await), json!({"tier": "db"}));
    app.expect_problem(
        Method::GET,
        "/v1/vms?label=tier",
        None,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
}

#[tokio::test]
async fn unknown_query_parameters_are_refused_with_the_parameter_named() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("queried", &[("root", DISK)]).await.id;
    let before = world(&app).await;
    for (method, path, unknown) in [
        (Method::GET, "/v1/vms?colour=red".to_owned(), "colour"),
        (Method::GET, "/v1/vms?limit=5&nam=x".to_owned(), "nam"),
        (Method::GET, format!("/v1/vms/{vm}?verbose=1"), "verbose"),
        (
            Method::DELETE,
            format!("/v1/vms/{vm}?flatten_dependent=true"),
            "flatten_dependent",
        ),
    ] {
        let reply = send(&app, method.clone(), &path, None, None).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid_query");
        let detail = reply.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("`{unknown}`")),
            "{method} {path}: {detail}"
        );
    }
    // Documented parameters still work, and nothing was changed.
    assert_eq!(vm_names(&app, "limit=5&name=queried").await, ["queried"]);
    assert_eq!(world(&app).await, before);
}

#[tokio::test]
async fn a_disk_can_be_added_to_a_running_vm_but_not_removed_or_grown() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("hot", &[("root", MIB)]).await.id;
    write(app.active_path(vm, "root").await, 0x44, 0, 1);
    app.patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
        .await;
    // A new empty file the hypervisor does not use yet: hot-adding it is safe.
    let job = app
        .run_job(
            Method::POST,
            &format!("/v1/vms/{vm}/disks"),
            Some(json!({"name": "scratch", "size_bytes": MIB})),
        )
        .await;
    assert_eq!(job.kind, JobKind::DiskCreate);
    let scratch = app.active_path(vm, "scratch").await;
    expect(&scratch, 0, 0, 1);
    check_clean(&scratch);
    // Removing or growing one changes a file the guest may have open.
    let disk = format!("/v1/vms/{vm}/disks/{}", job.target.id);
    let conflict = (StatusCode::CONFLICT, "vm_running");
    app.expect_problem(Method::DELETE, &disk, None, conflict.0, conflict.1)
        .await;
    let resize = Some(json!({"size_bytes": 2 * MIB}));
    app.expect_problem(
        Method::POST,
        &format!("{disk}/resize"),
        resize,
        conflict.0,
        conflict.1,
    )
    .await;
    expect(app.active_path(vm, "root").await, 0x44, 0, 1);
}
