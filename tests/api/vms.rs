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

fn disk<'a>(vm: &'a Value, name: &str) -> &'a Value {
    vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {vm}"))
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn creating_a_vm_answers_202_with_a_job_and_its_disks_become_empty_qcow2_files_of_the_asked_size()
 {
    let app = TestApp::spawn().await;
    let body = json!({"name": "web-01", "description": "front end", "disks": [
        {"name": "root", "size_bytes": DISK}, {"name": "data", "size_bytes": 32 * MIB + 512}]});
    let reply = send_json(&app, Method::POST, "/v1/vms", &body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let job = reply.body;
    let job_id = id(&job);
    assert_eq!(
        reply.headers.get(LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{job_id}").as_str())
    );
    assert_eq!(job["kind"], "vm_create");
    assert_eq!(job["target"]["type"], "vm");
    assert_eq!(job["cancel_requested"], false);
    let vm_id = job["target"]["id"].as_str().unwrap().to_owned();
    assert_eq!(job["vm_id"], vm_id.as_str());

    // The record exists at once, before (or just as) the job creates the files.
    let early = app.vm(&vm_id).await;
    assert!(
        matches!(early["status"].as_str(), Some("creating" | "ready")),
        "{early}"
    );
    assert_eq!(early["name"], "web-01");
    assert_eq!(early["disks"].as_array().unwrap().len(), 2);

    // The Location header leads to the job.
    let (status, followed) = app.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(followed["id"], job_id.as_str());
    let job = app.wait_job_end(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"], 100);

    let vm = app.vm(&vm_id).await;
    assert_eq!(vm["status"], "ready");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["description"], "front end");
    assert_eq!(vm["current_snapshot_id"], Value::Null);
    for (name, size) in [("root", DISK), ("data", 32 * MIB + 512)] {
        let disk = disk(&vm, name);
        assert_eq!(disk["format"], "qcow2");
        assert_eq!(disk["status"], "ready");
        assert_eq!(disk["size_bytes"], size);
        assert_eq!(disk["vm_id"], vm_id.as_str());
        let path = disk["active_path"].as_str().unwrap();
        assert!(exists(path), "{path}");
        assert!(
            PathBuf::from(path).starts_with(app.data_dir.canonicalize().unwrap().join("volumes")),
            "{path}"
        );
        assert_eq!(virtual_size(path), size);
        assert_eq!(chain(path).len(), 1);
        let chain_view = disk["chain"].as_array().unwrap();
        assert_eq!(chain_view.len(), 1);
        assert_eq!(chain_view[0]["role"], "active");
        assert_eq!(chain_view[0]["path"], path);
        assert_eq!(chain_view[0]["size_bytes"], size);
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
        created.push(id(&app.create_vm(&format!("page-{i}"), &[]).await));
    }

    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/vms?limit=2&cursor={c}"),
            None => "/v1/vms?limit=2".to_owned(),
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        pages.push(items.len());
        seen.extend(items.iter().map(id));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages, vec![2, 2, 1]);
    assert_eq!(seen, created, "every VM once, in creation order");

    let (_, all) = app.get("/v1/vms").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
    assert!(all["next_cursor"].is_null(), "{all}");

    let (status, one) = app.get("/v1/vms?name=page-3").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names(&one), vec!["page-3"]);
    assert_eq!(one["items"][0]["id"], created[3].as_str());
    assert!(one["next_cursor"].is_null());
    let (_, none) = app.get("/v1/vms?name=page").await;
    assert_eq!(
        names(&none),
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
    let vm_id = id(&vm);
    let path = format!("/v1/vms/{vm_id}");

    let (status, patched) = app
        .patch(&path, json!({"name": "patch-b", "description": "renamed"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["name"], "patch-b");
    assert_eq!(patched["description"], "renamed");
    assert_eq!(patched["state"], "stopped");
    assert!(patched["updated_at"].as_str().unwrap() >= vm["updated_at"].as_str().unwrap());
    let (_, by_old) = app.get("/v1/vms?name=patch-a").await;
    assert_eq!(names(&by_old), Vec::<String>::new());
    let (_, by_new) = app.get("/v1/vms?name=patch-b").await;
    assert_eq!(names(&by_new), vec!["patch-b"]);

    // Only the fields sent change.
    let (status, patched) = app.patch(&path, json!({"state": "running"})).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(
        (
            patched["state"].as_str(),
            patched["name"].as_str(),
            patched["description"].as_str()
        ),
        (Some("running"), Some("patch-b"), Some("renamed"))
    );
    assert_eq!(app.vm(&vm_id).await["state"], "running");
    let (status, patched) = app.patch(&path, json!({"description": ""})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (patched["state"].as_str(), patched["description"].as_str()),
        (Some("running"), Some(""))
    );
    let (status, patched) = app.patch(&path, json!({"state": "stopped"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["state"], "stopped");

    // Disks and files are untouched by a PATCH.
    let after = app.vm(&vm_id).await;
    assert_eq!(after["disks"], vm["disks"]);
}

#[tokio::test]
async fn renaming_a_vm_to_a_name_another_vm_has_is_a_conflict_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.create_vm("taken", &[]).await;
    let other = id(&app.create_vm("other", &[("root", DISK)]).await);
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
    let vm = app.vm(&other).await;
    assert_eq!(
        (
            vm["name"].as_str(),
            vm["description"].as_str(),
            vm["state"].as_str()
        ),
        (Some("other"), Some(""), Some("stopped"))
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
    let (_, list) = app.get("/v1/vms").await;
    assert_eq!(names(&list), vec!["exists"]);

    // The limits themselves are accepted: 128 characters, and exactly 16 TiB (qcow2 is sparse).
    let vm = app.create_vm(&"y".repeat(128), &[("huge", 16 * TIB)]).await;
    let path = disk(&vm, "huge")["active_path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(virtual_size(&path), 16 * TIB);
}

#[tokio::test]
async fn invalid_patches_are_refused_with_problems_and_change_nothing() {
    let app = TestApp::spawn().await;
    let vm_id = id(&app.create_vm("patch-me", &[("root", DISK)]).await);
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
    let vm_id = id(&app.create_vm("known", &[("root", DISK)]).await);
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
    for path in ["/v1/nothing", "/v1/vms/x/y/z", "/v2/vms", "/"] {
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
    assert_eq!(vm["status"], "ready");
    assert_eq!(vm["disks"], json!([]));
    let vm_id = id(&vm);
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
    let (_, list) = app.get(&format!("/v1/vms/{vm_id}/snapshots")).await;
    assert_eq!(list["items"], json!([]));
    assert_eq!(app.volume_files(), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn snapshot_names_are_unique_within_a_vm_but_may_repeat_across_vms() {
    let app = TestApp::spawn().await;
    let first = id(&app.create_vm("first", &[("root", DISK)]).await);
    let second = id(&app.create_vm("second", &[("root", DISK)]).await);
    let path = app.active_path(&first, "root").await;
    write(&path, 0x17, 0, 1);
    let s1 = app.snapshot(&first, "nightly").await;
    let before = world(&app).await;

    let reply = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{first}/snapshots"),
        &json!({"name": "nightly", "description": "again"}),
    )
    .await;
    assert_problem(&reply, StatusCode::CONFLICT, "name_taken");
    assert_eq!(world(&app).await, before);
    let (_, list) = app.get(&format!("/v1/vms/{first}/snapshots")).await;
    assert_eq!(names(&list), vec!["nightly"]);
    assert_eq!(list["current_snapshot_id"], s1.as_str());

    let s2 = app.snapshot(&second, "nightly").await;
    assert_ne!(s1, s2);
    let (_, list) = app.get(&format!("/v1/vms/{second}/snapshots")).await;
    assert_eq!(names(&list), vec!["nightly"]);
    expect(&app.snapshot_path(&first, &s1, "root").await, 0x17, 0, 1);
    expect(&app.active_path(&first, "root").await, 0x17, 0, 1);
}

#[tokio::test]
async fn a_json_array_body_is_not_taken_for_an_object() {
    let app = TestApp::spawn().await;
    let vm_id = id(&app.create_vm("exists", &[("root", DISK)]).await);
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
    let (_, list) = app.get("/v1/vms").await;
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn adding_a_disk_creates_its_file_and_another_disk_with_the_same_name_is_a_conflict() {
    let app = TestApp::spawn().await;
    let vm_id = id(&app.create_vm("grow-disks", &[("root", DISK)]).await);
    let root = app.active_path(&vm_id, "root").await;
    write(&root, 0x31, 0, 1);

    let reply = send_json(
        &app,
        Method::POST,
        &format!("/v1/vms/{vm_id}/disks"),
        &json!({"name": "data", "size_bytes": 32 * MIB}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let job_id = id(&reply.body);
    assert_eq!(
        reply.headers.get(LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{job_id}").as_str())
    );
    assert_eq!(reply.body["kind"], "disk_create");
    assert_eq!(reply.body["target"]["type"], "disk");
    let disk_id = reply.body["target"]["id"].as_str().unwrap().to_owned();
    app.expect_job((reply.status, reply.body)).await;

    let (status, view) = app.get(&format!("/v1/vms/{vm_id}/disks/{disk_id}")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        (
            view["name"].as_str(),
            view["status"].as_str(),
            view["format"].as_str()
        ),
        (Some("data"), Some("ready"), Some("qcow2"))
    );
    assert_eq!(view["size_bytes"], 32 * MIB);
    let data = view["active_path"].as_str().unwrap().to_owned();
    assert!(exists(&data));
    assert_eq!(virtual_size(&data), 32 * MIB);
    assert_eq!(chain(&data).len(), 1);
    check_clean(&data);
    let (status, disks) = app.get(&format!("/v1/vms/{vm_id}/disks")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(disks["items"].as_array().unwrap().len(), 2);
    assert_eq!(disks["next_cursor"], Value::Null);
    let (_, first) = app.get(&format!("/v1/vms/{vm_id}/disks?limit=1")).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 1);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let (_, second) = app
        .get(&format!("/v1/vms/{vm_id}/disks?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert_ne!(second["items"][0]["id"], first["items"][0]["id"]);
    assert_eq!(second["next_cursor"], Value::Null);
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
    let (vm_id, disk_id) = (id(&vm), id(disk(&vm, "root")));
    let path = app.active_path(&vm_id, "root").await;
    write(&path, 0x5a, 0, 2);
    write(&path, 0x5b, 62, 2);
    let resize = format!("/v1/vms/{vm_id}/disks/{disk_id}/resize");

    let job = app
        .expect_job(app.post(&resize, json!({"size_bytes": 2 * DISK})).await)
        .await;
    assert_eq!(job["kind"], "disk_resize");
    assert_eq!(job["target"]["id"], disk_id.as_str());
    let grown = app.active_path(&vm_id, "root").await;
    assert_eq!(grown, path, "a resize grows the file in place");
    assert_eq!(virtual_size(&grown), 2 * DISK);
    assert_eq!(app.vm(&vm_id).await["disks"][0]["size_bytes"], 2 * DISK);
    expect_all(
        &grown,
        &[(0x5a, 0, 2), (0, 2, 60), (0x5b, 62, 2), (0, 64, 64)],
    );
    write(&grown, 0x5c, 120, 8);
    expect(&grown, 0x5c, 120, 8);
    check_clean(&grown);

    let before = world(&app).await;
    for size in [DISK, 2 * DISK, 2 * DISK - 512, 512] {
        let reply = send_json(&app, Method::POST, &resize, &json!({"size_bytes": size})).await;
        assert_problem(&reply, StatusCode::CONFLICT, "disk_shrink_refused");
        assert_eq!(reply.body["current_size_bytes"], 2 * DISK, "{}", reply.body);
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
    let (vm_id, data_id) = (id(&vm), id(disk(&vm, "data")));
    write(&app.active_path(&vm_id, "root").await, 0x11, 0, 2);
    write(&app.active_path(&vm_id, "data").await, 0x21, 0, 2);
    let s1 = app.snapshot(&vm_id, "s1").await;
    write(&app.active_path(&vm_id, "root").await, 0x12, 1, 1);
    let data_frozen = app.snapshot_path(&vm_id, &s1, "data").await;
    let data_active = app.active_path(&vm_id, "data").await;
    let root_frozen = app.snapshot_path(&vm_id, &s1, "root").await;
    let root_active = app.active_path(&vm_id, "root").await;
    assert_eq!(app.volume_files().len(), 4);

    let job = app
        .expect_job(
            app.delete(&format!("/v1/vms/{vm_id}/disks/{data_id}"))
                .await,
        )
        .await;
    assert_eq!(job["kind"], "disk_delete");
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

    let view = app.vm(&vm_id).await;
    assert_eq!(view["disks"].as_array().unwrap().len(), 1);
    assert_eq!(view["disks"][0]["name"], "root");
    let (status, _) = app.get(&format!("/v1/vms/{vm_id}/disks/{data_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, snap) = app.get(&format!("/v1/snapshots/{s1}")).await;
    assert_eq!(snap["status"], "ready");
    assert_eq!(snap["volumes"].as_array().unwrap().len(), 1, "{snap}");
    assert_eq!(snap["volumes"][0]["path"], root_frozen.as_str());

    // The other disk's snapshot layer and present state still read back, and reverting
    // to the snapshot still works.
    expect(&root_frozen, 0x11, 0, 2);
    expect_all(&root_active, &[(0x11, 0, 1), (0x12, 1, 1)]);
    check_clean(&root_active);
    app.revert(&s1).await;
    let reverted = app.active_path(&vm_id, "root").await;
    expect(&reverted, 0x11, 0, 2);
    assert_eq!(chain(&reverted).len(), 2);
    assert_eq!(app.vm(&vm_id).await["disks"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_disk_of_another_vm_is_not_found_through_this_vm() {
    let app = TestApp::spawn().await;
    let mine = id(&app.create_vm("mine", &[("root", DISK)]).await);
    let theirs = app.create_vm("theirs", &[("root", DISK)]).await;
    let their_disk = id(disk(&theirs, "root"));
    write(&app.active_path(&id(&theirs), "root").await, 0x66, 0, 1);
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
    expect(&app.active_path(&id(&theirs), "root").await, 0x66, 0, 1);
}

#[tokio::test]
async fn deleting_a_vm_with_snapshots_removes_all_its_files_and_records() {
    let app = TestApp::spawn().await;
    let keep = id(&app.create_vm("keep", &[("root", DISK)]).await);
    write(&app.active_path(&keep, "root").await, 0x44, 0, 1);
    let keep_files = app.volume_files();

    let vm_id = id(&app
        .create_vm("doomed", &[("root", DISK), ("data", 32 * MIB)])
        .await);
    write(&app.active_path(&vm_id, "root").await, 0x11, 0, 2);
    let s1 = app.snapshot(&vm_id, "s1").await;
    write(&app.active_path(&vm_id, "data").await, 0x22, 0, 2);
    let s2 = app.snapshot(&vm_id, "s2").await;
    app.revert(&s1).await;
    let s3 = app.snapshot(&vm_id, "s3").await;
    assert!(app.volume_files().len() > keep_files.len() + 2);

    let (status, job) = app.delete(&format!("/v1/vms/{vm_id}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["kind"], "vm_delete");
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
    let job = app.wait_job_end(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");

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
    let (_, list) = app.get("/v1/vms").await;
    assert_eq!(names(&list), vec!["keep"]);

    // The name is free again, and the other VM is intact.
    app.create_vm("doomed", &[]).await;
    expect(&app.active_path(&keep, "root").await, 0x44, 0, 1);
    check_clean(&app.active_path(&keep, "root").await);
}

#[tokio::test]
async fn a_vm_cannot_be_marked_running_while_a_job_still_works_on_its_files() {
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "snapshot_create:planned:pause")]).await;
    let vm_id = id(&app.create_vm("busy", &[("root", DISK)]).await);
    write(&app.active_path(&vm_id, "root").await, 0x77, 0, 1);
    let path = format!("/v1/vms/{vm_id}");

    let (status, job) = app
        .post(&format!("/v1/vms/{vm_id}/snapshots"), json!({"name": "s1"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let refused = send_json(
        &app,
        Method::PATCH,
        &path,
        &json!({"state": "running", "description": "started"}),
    )
    .await;
    assert_problem(&refused, StatusCode::CONFLICT, "vm_busy");
    assert_eq!(
        refused.body["job_ids"],
        json!([job["id"]]),
        "{}",
        refused.body
    );
    let vm = app.vm(&vm_id).await;
    assert_eq!(
        (vm["state"].as_str(), vm["description"].as_str()),
        (Some("stopped"), Some(""))
    );

    // Other edits are fine while the job runs.
    let (status, _) = app.patch(&path, json!({"description": "waiting"})).await;
    assert_eq!(status, StatusCode::OK);

    let (_, current) = app.get(&format!("/v1/jobs/{}", id(&job))).await;
    assert!(
        matches!(current["status"].as_str(), Some("queued" | "running")),
        "the pause keeps the job going: {current}"
    );
    let job = app.wait_job_end(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    let (status, vm) = app.patch(&path, json!({"state": "running"})).await;
    assert_eq!(status, StatusCode::OK, "{vm}");
    assert_eq!(
        (vm["state"].as_str(), vm["description"].as_str()),
        (Some("running"), Some("waiting"))
    );
    expect(&app.active_path(&vm_id, "root").await, 0x77, 0, 1);
}

#[tokio::test]
async fn labels_are_set_on_creation_replaced_by_patch_and_select_vms_in_listings() {
    let app = TestApp::spawn().await;
    let (status, job) = app
        .post("/v1/vms", json!({"name": "web-1", "labels": {"tier": "web", "example.com/team": "blue"}, "disks": []}))
        .await;
    let web1 = app.expect_job((status, job)).await["target"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let web2 = id(&app.create_vm("web-2", &[]).await);
    let db = id(&app.create_vm("db-1", &[]).await);
    let (status, vm) = app
        .patch(
            &format!("/v1/vms/{web2}"),
            json!({"labels": {"tier": "web"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{vm}");
    assert_eq!(vm["labels"], json!({"tier": "web"}));
    app.patch(&format!("/v1/vms/{db}"), json!({"labels": {"tier": "db"}}))
        .await;

    let names = |list: &Value| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let (_, list) = app.get("/v1/vms?label=tier=web").await;
    assert_eq!(names(&list), vec!["web-1", "web-2"]);
    let (_, list) = app.get("/v1/vms?label=example.com/team=blue").await;
    assert_eq!(names(&list), vec!["web-1"]);
    let (_, list) = app.get("/v1/vms?label=tier=web&limit=1").await;
    assert_eq!(names(&list), vec!["web-1"]);
    assert!(list["next_cursor"].is_string());
    let (_, one) = app.get(&format!("/v1/vms/{web1}")).await;
    assert_eq!(one["labels"]["example.com/team"], "blue");

    // Replacing with an empty map clears them; bad shapes are refused and change nothing.
    app.patch(&format!("/v1/vms/{web2}"), json!({"labels": {}}))
        .await;
    let (_, list) = app.get("/v1/vms?label=tier=web").await;
    assert_eq!(names(&list), vec!["web-1"]);
    let (status, problem) = app
        .patch(
            &format!("/v1/vms/{db}"),
            json!({"labels": {"bad key": "x"}}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("validation_failed"))
    );
    assert_eq!(app.vm(&db).await["labels"], json!({"tier": "db"}));
    let (status, problem) = app.get("/v1/vms?label=tier").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
}

#[tokio::test]
async fn unknown_query_parameters_are_refused_with_the_parameter_named() {
    let app = TestApp::spawn().await;
    let vm = id(&app.create_vm("queried", &[("root", DISK)]).await);
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
    let (status, page) = app.get("/v1/vms?limit=5&name=queried").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(world(&app).await, before);
}

#[tokio::test]
async fn a_disk_can_be_added_to_a_running_vm_but_not_removed_or_grown() {
    let app = TestApp::spawn().await;
    let vm = id(&app.create_vm("hot", &[("root", MIB)]).await);
    write(&app.active_path(&vm, "root").await, 0x44, 0, 1);
    app.patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
        .await;
    // A new empty file the hypervisor does not use yet: hot-adding it is safe.
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{vm}/disks"),
                json!({"name": "scratch", "size_bytes": MIB}),
            )
            .await,
        )
        .await;
    assert_eq!(job["kind"], "disk_create");
    let scratch = app.active_path(&vm, "scratch").await;
    expect(&scratch, 0, 0, 1);
    check_clean(&scratch);
    // Removing or growing one changes a file the guest may have open.
    let disk = job["target"]["id"].as_str().unwrap();
    let (status, problem) = app.delete(&format!("/v1/vms/{vm}/disks/{disk}")).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("vm_running"))
    );
    let (status, problem) = app
        .post(
            &format!("/v1/vms/{vm}/disks/{disk}/resize"),
            json!({"size_bytes": 2 * MIB}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("vm_running"))
    );
    expect(&app.active_path(&vm, "root").await, 0x44, 0, 1);
}
