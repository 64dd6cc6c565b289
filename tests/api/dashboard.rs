//! The web dashboard (`/`) and the API docs (`/docs`) in a real browser: Debian's
//! Chromium driven by playwright-core through `web/tests/e2e.mjs`, against the real
//! service. The browser does what a user does; this side prepares the service, then
//! checks the bytes the user's actions left. Also: the checked-in build (`web/dist`)
//! is what the sources build to, and the service serves it with the right headers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::auth::create_token;
use crate::support::*;

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

/// `web/node_modules` is installed by `npm ci --prefix web` (the README's
/// prerequisites; `.ci/run` does it).
fn require_node_modules() {
    assert!(
        web_dir().join("node_modules/playwright-core").is_dir(),
        "web/node_modules is missing: run `npm ci --prefix web` (see the README's prerequisites)"
    );
}

/// Run a scenario of web/tests/e2e.mjs against `app`; the JSON line it prints.
fn browse(app: &TestApp, scenario: &str, tokens: Value) -> Value {
    require_node_modules();
    let screenshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    let output = Command::new("node")
        .arg("tests/e2e.mjs")
        .arg(scenario)
        .current_dir(web_dir())
        .env("STRATA_URL", &app.base)
        .env("STRATA_SCREENSHOTS", &screenshots)
        .env("STRATA_TOKENS", tokens.to_string())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the {scenario} scenario failed:\n{}\n{stdout}\n--- service log ---\n{}",
        String::from_utf8_lossy(&output.stderr),
        app.log_tail(30)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON result")
}

async fn set_labels(app: &TestApp, vm: impl std::fmt::Display, labels: Value) {
    let (status, body) = app
        .request(
            Method::PATCH,
            &format!("/v1/vms/{vm}"),
            Some(json!({ "labels": labels })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn wait_runs(app: &TestApp, schedule: &str, count: usize) {
    for _ in 0..600 {
        let (_, runs) = app.get(&format!("/v1/schedules/{schedule}/runs")).await;
        let runs = runs["items"].as_array().unwrap().clone();
        if runs.len() == count && runs[0]["status"] != "running" {
            assert_eq!(runs[0]["status"], "succeeded", "{runs:#?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {count} of schedule {schedule} never finished");
}

#[tokio::test]
async fn a_user_snapshots_reverts_merges_clones_and_deploys_in_the_dashboard() {
    let app = TestApp::launch(Launch {
        log: Some(
            std::env::temp_dir().join(format!("strata-dashboard-{}.log", std::process::id())),
        ),
        ..Launch::default()
    })
    .await;
    const MIB: u64 = 1 << 20;

    // What the user finds: two VMs with labels, a template, and a schedule that took
    // two snapshots of db-1 and now keeps only the last one.
    let web = app.create_vm("web-1", &[("root", 64 * MIB)]).await;
    set_labels(&app, web.id, json!({"env": "prod"})).await;
    let web_root = app.active_path(web.id, "root").await;
    write(&web_root, 0xaa, 0, 1);
    let db = app.create_vm("db-1", &[("root", 64 * MIB)]).await;
    set_labels(&app, db.id, json!({"env": "dev"})).await;
    let golden = app.create_vm("golden", &[("root", 64 * MIB)]).await;
    write(app.active_path(golden.id, "root").await, 0xee, 0, 1);
    let template = app
        .run_job(
            Method::POST,
            &format!("/v1/vms/{}/convert-to-template", golden.id),
            Some(json!({})),
        )
        .await;
    assert_eq!(template.status, JobStatus::Succeeded);
    let (status, schedule) = app
        .post(
            "/v1/schedules",
            json!({"name": "nightly", "vm_id": db.id, "cron": "0 3 * * *",
                   "timezone": "Europe/Paris", "retention": {"keep_last": 10}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    let schedule = schedule["id"].as_str().unwrap().to_owned();
    for count in 1..=2 {
        let (status, run) = app
            .post(&format!("/v1/schedules/{schedule}/run"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        wait_runs(&app, &schedule, count).await;
    }
    // A linked clone reads the older one: retention would prune it, but the prune is
    // held (has_dependents), so the preview shows a prune and why it waits.
    let older: Value = app.get_as(&format!("/v1/vms/{}/snapshots", db.id)).await;
    let older = older["items"][0]["id"].as_str().unwrap().to_owned();
    let clone = app
        .run_job(
            Method::POST,
            &format!("/v1/vms/{}/clone", db.id),
            Some(json!({"name": "db-1-test", "mode": "linked", "snapshot_id": older})),
        )
        .await;
    assert_eq!(clone.status, JobStatus::Succeeded);
    let (status, body) = app
        .request(
            Method::PATCH,
            &format!("/v1/schedules/{schedule}"),
            Some(json!({"retention": {"keep_last": 1}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    browse(&app, "dashboard", json!({}));

    // What the clicks left on disk. web-1: s1 (0xaa) and s2 (0xbb) kept; reverted to
    // s1, then s3 was taken, 0xdd written, and s3 deleted: its layer merged, the
    // present state still reads 0xdd.
    let snapshots: Value = app.get_as(&format!("/v1/vms/{}/snapshots", web.id)).await;
    let by_name = |name: &str| {
        snapshots["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("snapshot {name} in {snapshots:#}"))
            .clone()
    };
    let frozen = |name: &str| {
        by_name(name)["volumes"][0]["path"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    expect(frozen("s1"), 0xaa, 0, 1);
    expect(frozen("s2"), 0xbb, 0, 1);
    assert_eq!(
        snapshots["items"].as_array().unwrap().len(),
        2,
        "{snapshots:#}"
    );
    let web_root = app.active_path(web.id, "root").await;
    expect(&web_root, 0xdd, 0, 1);
    check_clean(&web_root);

    // The linked clone made from s1 reads s1's bytes.
    let (_, clones) = app.get("/v1/vms?name=web-1-clone").await;
    let clone = clones["items"][0]["id"]
        .as_str()
        .expect("the clone exists")
        .to_owned();
    let clone_root = app.active_path(&clone, "root").await;
    expect(&clone_root, 0xaa, 0, 1);
    check_clean(&clone_root);

    // Two VMs deployed from the template, reading its bytes.
    let (_, vms) = app.get("/v1/vms?limit=1000").await;
    let deployed: Vec<String> = vms["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| vm["template_id"] == json!(golden.id))
        .map(|vm| vm["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deployed.len(), 2, "{vms:#}");
    for vm in deployed {
        expect(app.active_path(&vm, "root").await, 0xee, 0, 1);
    }
}

#[tokio::test]
async fn the_dashboard_asks_for_a_token_and_shows_what_its_scope_allows() {
    let mut app = TestApp::spawn().await;
    app.create_vm("web-1", &[("root", 1 << 20)]).await;
    let read = create_token(&app, "viewer", "read");
    let operate = create_token(&app, "operator", "operate");
    app.token = Some(operate.clone());
    browse(&app, "auth", json!({ "read": read, "operate": operate }));
    let (_, jobs) = app.get("/v1/jobs?kind=snapshot_create").await;
    assert_eq!(jobs["items"][0]["requested_by"], "operator", "{jobs:#}");
}

#[tokio::test]
async fn the_api_docs_render_from_the_binary_with_every_operation() {
    let app = TestApp::spawn().await;
    let result = browse(&app, "docs", json!({}));
    let document = strata::api::openapi_document();
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| {
            ["get", "post", "put", "patch", "delete"]
                .iter()
                .filter(|m| item.get(**m).is_some())
                .count()
        })
        .sum();
    assert_eq!(result["operations"], operations);
}

#[tokio::test]
async fn the_dashboard_files_are_served_with_their_types_caching_and_policy() {
    let app = TestApp::spawn().await;
    let get = |path: &str| app.client.get(format!("{}{path}", app.base)).send();

    let index = get("/").await.unwrap();
    assert_eq!(index.status(), StatusCode::OK);
    let headers = index.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'self'") && policy.contains("frame-ancestors 'none'"));
    let html = index.text().await.unwrap();
    let script = html
        .split('"')
        .find(|part| part.starts_with("/assets/") && part.ends_with(".js"))
        .expect("index.html loads a built script");

    // Built files are named by their content: cached for good, and revalidated by ETag.
    let asset = get(script).await.unwrap();
    assert_eq!(asset.status(), StatusCode::OK);
    assert_eq!(
        asset.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(
        asset.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    let etag = asset.headers()["etag"].clone();
    let again = app
        .client
        .get(format!("{}{script}", app.base))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    // /docs and /ui lead to the pages; an unknown file is a problem answer.
    let docs = get("/docs").await.unwrap();
    assert_eq!(docs.url().path(), "/docs/");
    assert!(docs.text().await.unwrap().contains("swagger-ui-bundle.js"));
    assert_eq!(get("/ui").await.unwrap().url().path(), "/");
    let missing = get("/assets/nothing.js").await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
}

/// `web/dist` (checked in, embedded in the binary) is what `web/`'s sources build to,
/// with API types generated from the checked-in OpenAPI document: a change of either
/// without `npm run build --prefix web` fails here, as does a type error the API's
/// change causes in the dashboard.
#[test]
fn the_checked_in_dashboard_build_is_current() {
    require_node_modules();
    let output = Command::new("node")
        .arg("scripts/check-build.mjs")
        .current_dir(web_dir())
        .output()
        .expect("node runs");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_user_cancels_a_running_job_from_the_jobs_panel() {
    // The clone is held after its plan is journaled, long enough to be cancelled.
    let app = TestApp::spawn_with(&[("STRATA_FAULT", "vm_clone:planned:pause=15000")]).await;
    let vm = app.create_vm("src", &[("root", 1 << 20)]).await;
    write(app.active_path(vm.id, "root").await, 0xaa, 0, 1);
    let clone = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{}/clone", vm.id),
            Some(json!({"name": "copy", "mode": "full"})),
        )
        .await;
    browse(&app, "cancel", json!({}));
    let job = app.wait_job(clone.id).await;
    assert_eq!(job.status, JobStatus::Cancelled);
    let (status, _) = app.get(&format!("/v1/vms/{}", clone.target.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the cancelled clone is gone");
    let root = app.active_path(vm.id, "root").await;
    expect(&root, 0xaa, 0, 1);
    check_clean(&root);
}

#[tokio::test]
async fn the_jobs_panel_shows_a_copys_bytes_and_time_left() {
    let scratch = tempfile::tempdir().unwrap();
    // qemu-img copies at 32 MiB/s: the 256 MiB clone lasts several seconds.
    let wrapper = crate::progress::rate_capped_qemu_img(scratch.path(), "32M");
    let app = TestApp::spawn_with(&[("STRATA_QEMU_IMG", wrapper.to_str().unwrap())]).await;
    let vm = app.create_vm("big", &[("root", 512 << 20)]).await;
    write(app.active_path(vm.id, "root").await, 0x5a, 0, 256);
    let clone = app
        .accept(
            Method::POST,
            &format!("/v1/vms/{}/clone", vm.id),
            Some(json!({"name": "big-copy", "mode": "full"})),
        )
        .await;
    let result = browse(&app, "progress", json!({}));
    assert!(
        result["figures"].as_str().unwrap().contains(" of "),
        "{result}"
    );
    let job = app.wait_job(clone.id).await;
    assert_eq!(job.status, JobStatus::Succeeded);
    expect(app.active_path(clone.target.id, "root").await, 0x5a, 0, 256);
}
