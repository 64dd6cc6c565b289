//! Authentication: tokens made with `strata token` (on the data directory, while the
//! service runs) and `/v1/tokens`, each scope against a representative operation of
//! every group, refusals (401 with a challenge, 403 naming the scope, 429 after too
//! many failures), revocation and expiry taking effect at once, `requested_by` on
//! jobs, and the refusal to serve a non-loopback address with no token. Every request
//! goes to 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use reqwest::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

/// `strata token ARGS` on the service's data directory; its stdout.
fn token_cli(app: &TestApp, args: &[&str]) -> String {
    token_cli_in(&app.data_dir, args)
}

/// `strata token ARGS` on `data_dir`, which must succeed; its stdout.
fn token_cli_in(data_dir: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("token")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .expect("run strata token");
    assert!(
        output.status.success(),
        "strata token {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

pub(crate) fn create_token(app: &TestApp, name: &str, scope: &str) -> String {
    token_cli(app, &["create", "--name", name, "--scope", scope])
}

/// Send as `token` (none: no Authorization header).
async fn as_token(
    app: &mut TestApp,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Reply {
    app.token = token.map(str::to_owned);
    let reply = match body {
        Some(body) => send_json(app, method, path, &body).await,
        None => send(app, method, path, None, None).await,
    };
    app.token = None;
    reply
}

#[tokio::test]
async fn without_a_token_defined_a_loopback_service_serves_everyone_and_records_no_requester() {
    let app = TestApp::spawn().await;
    let vm = app.create_vm("open", &[("root", MIB)]).await;
    let (_, jobs) = app.get(&format!("/v1/jobs?vm_id={}", vm.id)).await;
    assert_eq!(jobs["items"][0]["requested_by"], Value::Null, "{jobs}");
}

#[tokio::test]
async fn each_scope_may_do_its_operations_and_is_refused_the_others_with_the_scope_named() {
    let mut app = TestApp::spawn().await;
    let vm = app.create_vm("scoped", &[("root", MIB)]).await.id;
    let read = create_token(&app, "reader", "read");
    let operate = create_token(&app, "orchestrator", "operate");
    let admin = create_token(&app, "root", "admin");

    // No token, now that tokens exist: 401 with the challenge. Health stays open.
    let reply = as_token(&mut app, None, Method::GET, "/v1/vms", None).await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        reply.headers.get(WWW_AUTHENTICATE).unwrap(),
        "Bearer realm=\"strata\""
    );
    for open in ["/healthz", "/readyz", "/v1/openapi.json"] {
        let reply = as_token(&mut app, None, Method::GET, open, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{open}");
    }

    // One operation of each group, with the scope below it refused and its own allowed.
    let snapshot_body = json!({"name": "s1"});
    let schedule_body =
        json!({"name": "nightly", "vm_id": vm, "cron": "0 3 * * *", "retention": {"keep_last": 3}});
    // (method, path, body, scope needed, a token one scope below it, a token with it)
    type Case<'a> = (Method, String, Option<Value>, &'a str, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            format!("/v1/vms/{vm}"),
            None,
            "read",
            "",
            &read,
        ),
        (Method::GET, "/v1/jobs".into(), None, "read", "", &read),
        (
            Method::POST,
            format!("/v1/vms/{vm}/snapshots"),
            Some(snapshot_body),
            "operate",
            &read,
            &operate,
        ),
        (
            Method::PATCH,
            format!("/v1/vms/{vm}"),
            Some(json!({"description": "web"})),
            "operate",
            &read,
            &operate,
        ),
        (
            Method::POST,
            "/v1/schedules".into(),
            Some(schedule_body),
            "admin",
            &operate,
            &admin,
        ),
        (
            Method::GET,
            "/v1/tokens".into(),
            None,
            "admin",
            &operate,
            &admin,
        ),
        (
            Method::DELETE,
            format!("/v1/vms/{vm}"),
            None,
            "admin",
            &operate,
            &admin,
        ),
    ];
    for (method, path, body, needed, below, allowed) in cases {
        if !below.is_empty() {
            let reply = as_token(&mut app, Some(below), method.clone(), &path, body.clone()).await;
            assert_problem(&reply, StatusCode::FORBIDDEN, "forbidden");
            assert_eq!(reply.body["required_scope"], needed, "{method} {path}");
            assert!(reply.body["detail"].as_str().unwrap().contains(needed));
        }
        let reply = as_token(&mut app, Some(allowed), method.clone(), &path, body).await;
        assert!(
            reply.status.is_success(),
            "{method} {path} with scope {needed}: {} {}",
            reply.status,
            reply.body
        );
    }

    // Jobs record who asked, and can be listed by it.
    let path = format!("/v1/jobs?vm_id={vm}");
    let jobs = as_token(&mut app, Some(&read), Method::GET, &path, None).await;
    let requesters: Vec<&str> = jobs.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["requested_by"].as_str().unwrap_or("-"))
        .collect();
    // Newest first: the VM's deletion, the snapshot, then its creation (anonymous).
    assert_eq!(requesters, ["root", "orchestrator", "-"], "{}", jobs.body);
    let mine = as_token(
        &mut app,
        Some(&read),
        Method::GET,
        "/v1/jobs?requested_by=orchestrator",
        None,
    )
    .await;
    let items = mine.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", mine.body);
    assert_eq!(items[0]["kind"], "snapshot_create");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_a_reason_and_repeated_failures_are_slowed_down() {
    let mut app = TestApp::spawn().await;
    let good = create_token(&app, "good", "read");
    let wrong_secret = format!("{}{}", &good[..good.len() - 4], "0000");
    let other_id = format!("strata_0000000000000000{}", &good[23..]);
    let cases = [
        ("Basic dXNlcjpwYXNz", "must read Bearer"),
        ("Bearer short", "characters long"),
    ];
    for (header, reason) in cases {
        let reply = send_with_header(&app, header).await;
        assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
        assert!(
            reply.body["detail"].as_str().unwrap().contains(reason),
            "{header}: {}",
            reply.body
        );
    }
    for token in [&wrong_secret, &other_id] {
        let reply = as_token(&mut app, Some(token), Method::GET, "/v1/vms", None).await;
        assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(reply.body["detail"], "unknown token");
    }
    // Four failures so far; six more, and the address must wait, good token or not.
    for _ in 0..6 {
        let reply = as_token(&mut app, Some(&wrong_secret), Method::GET, "/v1/vms", None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = as_token(&mut app, Some(&wrong_secret), Method::GET, "/v1/vms", None).await;
    assert_problem(&reply, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
    let wait: u64 = reply.headers[RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(reply.body["retry_after_seconds"], wait);
    // A valid token from the same address is never locked out (clients behind one
    // proxy share it); the scheme's name is case-insensitive.
    let reply = as_token(&mut app, Some(&good), Method::GET, "/v1/vms", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let lower = send_with_header(&app, &format!("bearer {good}")).await;
    assert_eq!(lower.status, StatusCode::OK);
}

async fn send_with_header(app: &TestApp, header: &str) -> Reply {
    let response = app
        .client
        .get(format!("{}/v1/vms", app.base))
        .header(reqwest::header::AUTHORIZATION, header)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body: Value = response.json().await.unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

#[tokio::test]
async fn a_token_revoked_or_expired_while_the_service_runs_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "2030-01-01T00:00:00Z").unwrap();
    let clock_path = clock.to_str().unwrap().to_owned();
    let mut app = TestApp::spawn_with(&[("STRATA_CLOCK_FILE", &clock_path)]).await;
    let admin = create_token(&app, "admin", "admin");

    // Made through the API: the text is in this answer only.
    let body = json!({"name": "ci", "scope": "operate", "expires_at": "2030-01-01T01:00:00Z"});
    let created = as_token(
        &mut app,
        Some(&admin),
        Method::POST,
        "/v1/tokens",
        Some(body),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let ci = created.body["token"].as_str().unwrap().to_owned();
    assert_eq!(created.body["status"], "active");
    let reply = as_token(&mut app, Some(&ci), Method::GET, "/v1/vms", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let listed = as_token(&mut app, Some(&admin), Method::GET, "/v1/tokens", None).await;
    assert!(
        !listed.body.to_string().contains(&ci[8..]),
        "no secret listed"
    );

    // An hour and a second later it has expired.
    std::fs::write(&clock, "2030-01-01T01:00:01Z").unwrap();
    let reply = as_token(&mut app, Some(&ci), Method::GET, "/v1/vms", None).await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(reply.body["detail"].as_str().unwrap().contains("expired"));

    // Revoked by the command line while the service runs: refused from the next request.
    let reader = create_token(&app, "reader", "read");
    let reply = as_token(&mut app, Some(&reader), Method::GET, "/v1/vms", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    token_cli(&app, &["revoke", "reader"]);
    let reply = as_token(&mut app, Some(&reader), Method::GET, "/v1/vms", None).await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(reply.body["detail"].as_str().unwrap().contains("revoked"));
    // The name is free again; revoking through the API works the same.
    let again = create_token(&app, "reader", "read");
    let path = "/v1/tokens/reader";
    let reply = as_token(&mut app, Some(&admin), Method::DELETE, path, None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let reply = as_token(&mut app, Some(&again), Method::GET, "/v1/vms", None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = as_token(&mut app, Some(&admin), Method::DELETE, path, None).await;
    assert_problem(&reply, StatusCode::NOT_FOUND, "token_not_found");

    // Every token revoked or expired: the service does not open again.
    token_cli(&app, &["revoke", "admin"]);
    let reply = as_token(&mut app, None, Method::GET, "/v1/vms", None).await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn before_any_token_only_loopback_requests_are_served_and_no_token_can_be_minted_anonymously()
{
    let mut app = TestApp::spawn().await;
    // The first token comes from the command line, never from an anonymous request.
    let body = json!({"name": "mine", "scope": "admin"});
    let reply = as_token(&mut app, None, Method::POST, "/v1/tokens", Some(body)).await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    // A page that points a name of its own at 127.0.0.1 sends that name as Host.
    let rebound = app
        .client
        .get(format!("{}/v1/vms", app.base))
        .header(reqwest::header::HOST, "evil.example:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::UNAUTHORIZED);
    let local = app
        .client
        .get(format!("{}/v1/vms", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(local.status(), StatusCode::OK);
    // HEAD is a GET without the body.
    let head = app
        .client
        .head(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let reader = create_token(&app, "reader", "read");
    let head = app
        .client
        .head(format!("{}/v1/vms", app.base))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_token_requests_are_clear_errors_that_change_nothing() {
    let mut app = TestApp::spawn().await;
    let admin = create_token(&app, "admin", "admin");
    for (body, code) in [
        (json!({"name": "x", "scope": "root"}), "validation_failed"),
        (json!({"name": "", "scope": "read"}), "validation_failed"),
        (
            json!({"name": "scheduler", "scope": "read"}),
            "validation_failed",
        ),
        (
            json!({"name": "old", "scope": "read", "expires_at": "2001-01-01T00:00:00Z"}),
            "validation_failed",
        ),
        (json!({"name": "admin", "scope": "read"}), "name_taken"),
    ] {
        let reply = as_token(
            &mut app,
            Some(&admin),
            Method::POST,
            "/v1/tokens",
            Some(body.clone()),
        )
        .await;
        assert_eq!(reply.body["code"], code, "{body}: {}", reply.body);
    }
    let listed = as_token(&mut app, Some(&admin), Method::GET, "/v1/tokens", None).await;
    assert_eq!(
        listed.body["items"].as_array().unwrap().len(),
        1,
        "{}",
        listed.body
    );

    // The command line refuses the same, changing nothing.
    let output = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["token", "--data-dir"])
        .arg(&app.data_dir)
        .args(["create", "--name", "x", "--scope", "superuser"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown scope"));
    assert_eq!(token_cli(&app, &["list"]).lines().count(), 2);
}

/// Start the service on `listen` with extra arguments; its first line of output and,
/// when it exited, its status.
fn start_on(
    data_dir: &std::path::Path,
    listen: &str,
    extra: &[&str],
) -> (
    String,
    Option<std::process::ExitStatus>,
    std::process::Child,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("STRATA_LOG", "warn")
        .env_remove("STRATA_INSECURE_NO_AUTH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let status = if line.is_empty() {
        Some(child.wait().unwrap())
    } else {
        None
    };
    (line, status, child)
}

#[tokio::test]
async fn a_non_loopback_address_needs_a_token_or_an_explicit_insecure_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (line, status, child) = start_on(&data, "0.0.0.0:0", &[]);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(line.is_empty() && !status.unwrap().success(), "{line}");
    assert!(stderr.contains("strata token create"), "{stderr}");

    let (line, _, mut insecure) = start_on(&data, "0.0.0.0:0", &["--insecure-no-auth"]);
    assert!(line.starts_with("strata listening on"), "{line}");
    insecure.kill().unwrap();
    insecure.wait().unwrap();

    // With a token it starts, and wants the token even from this host.
    let token = token_cli_in(&data, &["create", "--name", "ops", "--scope", "read"]);
    let (line, _, mut served) = start_on(&data, "0.0.0.0:0", &[]);
    let port = line.trim().rsplit(':').next().unwrap().to_owned();
    let url = format!("http://127.0.0.1:{port}/v1/vms");
    let client = reqwest::Client::new();
    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let with_token = client.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(with_token.status(), StatusCode::OK);
    // Revoking the last token does not open it: it is not a loopback service.
    token_cli_in(&data, &["revoke", "ops"]);
    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    served.kill().unwrap();
    served.wait().unwrap();
}

#[test]
fn the_readme_shows_the_scope_of_every_operation_as_the_code_decides_it() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let begin = "<!-- scopes:begin (generated from src/api/auth.rs; a test checks it) -->\n";
    let end = "<!-- scopes:end -->";
    let start = readme
        .find(begin)
        .expect("the README marks the scope table")
        + begin.len();
    let stop = readme[start..].find(end).expect("the table's end marker") + start;
    let expected = strata::api::auth::scope_table_markdown();
    assert!(
        readme[start..stop] == expected,
        "the README's scope table is stale: put the output of `cargo run -- scopes` between the markers:\n{expected}"
    );
}

#[tokio::test]
async fn the_openapi_document_declares_the_bearer_scheme_and_each_operations_scope() {
    let app = TestApp::spawn().await;
    let (_, doc) = app.get("/v1/openapi.json").await;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut scoped = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let security = operation["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path}: no security"));
            if security.is_empty() {
                assert!(
                    ["/healthz", "/readyz", "/v1/openapi.json"].contains(&path.as_str()),
                    "{path}"
                );
                continue;
            }
            scoped += 1;
            let scope = security[0]["bearer"][0].as_str().unwrap();
            assert_eq!(operation["x-required-scope"], scope, "{method} {path}");
            for status in ["401", "403", "429"] {
                assert!(
                    operation["responses"][status].is_object(),
                    "{method} {path} {status}"
                );
            }
        }
    }
    assert!(scoped > 40, "{scoped}");
}

#[tokio::test]
async fn a_browser_download_uses_a_one_time_ticket_never_the_token_in_the_url() {
    let mut app = TestApp::spawn().await;
    let vm = app.create_vm("golden", &[("root", MIB)]).await.id;
    let job = app
        .run_job(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "golden-t", "from_vm_id": vm})),
        )
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let template = job.target.id;
    let reader = create_token(&app, "browser", "read");
    let export = format!("{}/v1/templates/{template}/export", app.base);

    let ticket = as_token(&mut app, Some(&reader), Method::POST, "/v1/tickets", None).await;
    assert_eq!(ticket.status, StatusCode::CREATED, "{}", ticket.body);
    let ticket = ticket.body["ticket"].as_str().unwrap().to_owned();
    assert!(!ticket.contains(&reader[23..]), "a ticket is not the token");
    let download = app
        .client
        .get(format!("{export}?ticket={ticket}"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    let bytes = download.bytes().await.unwrap();
    assert_eq!(&bytes[..4], b"QFI\xfb", "a qcow2 file");

    // Used once; and only where a browser cannot send the header.
    let again = app
        .client
        .get(format!("{export}?ticket={ticket}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
    let fresh = as_token(&mut app, Some(&reader), Method::POST, "/v1/tickets", None).await;
    let fresh = fresh.body["ticket"].as_str().unwrap().to_owned();
    let elsewhere = app
        .client
        .get(format!("{}/v1/vms?ticket={fresh}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), StatusCode::UNAUTHORIZED);
    // A ticket of a token revoked since it was issued is refused.
    let other = as_token(&mut app, Some(&reader), Method::POST, "/v1/tickets", None).await;
    let other = other.body["ticket"].as_str().unwrap().to_owned();
    token_cli(&app, &["revoke", "browser"]);
    let revoked = app
        .client
        .get(format!("{export}?ticket={other}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
}

/// Upload an image to `POST /v1/templates/import` as `token`.
async fn import_as(
    app: &TestApp,
    token: &str,
    name: &str,
    image: &std::path::Path,
) -> (StatusCode, Value) {
    let response = app
        .client
        .post(format!(
            "{}/v1/templates/import?name={name}&format=qcow2",
            app.base
        ))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .body(std::fs::read(image).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn clones_templates_imports_schedule_runs_and_cancels_check_their_scope_and_record_who_asked()
{
    let mut app = TestApp::spawn().await;
    let read = create_token(&app, "viewer", "read");
    let op = create_token(&app, "ops", "operate");
    let admin = create_token(&app, "root", "admin");
    let requester = |reply: &Reply| {
        reply.body["requested_by"]
            .as_str()
            .unwrap_or("-")
            .to_owned()
    };

    let vm = as_token(
        &mut app,
        Some(&op),
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "src", "disks": [{"name": "root", "size_bytes": MIB}]})),
    )
    .await;
    assert_eq!(vm.status, StatusCode::ACCEPTED, "{}", vm.body);
    let vm_id = vm.body["target"]["id"].as_str().unwrap().to_owned();
    assert_eq!(requester(&vm), "ops");
    app.token = Some(admin.clone());
    app.wait_job(vm.body["id"].as_str().unwrap()).await;

    // Clones: operate.
    let clone_path = format!("/v1/vms/{vm_id}/clone");
    let body = json!({"name": "copy", "mode": "linked"});
    let refused = as_token(
        &mut app,
        Some(&read),
        Method::POST,
        &clone_path,
        Some(body.clone()),
    )
    .await;
    assert_problem(&refused, StatusCode::FORBIDDEN, "forbidden");
    let clone = as_token(&mut app, Some(&op), Method::POST, &clone_path, Some(body)).await;
    assert_eq!(
        (clone.status, requester(&clone)),
        (StatusCode::ACCEPTED, "ops".into()),
        "{}",
        clone.body
    );

    // Templates: made by admin, deployed by operate.
    let body = json!({"name": "golden", "from_vm_id": vm_id});
    let refused = as_token(
        &mut app,
        Some(&op),
        Method::POST,
        "/v1/templates",
        Some(body.clone()),
    )
    .await;
    assert_eq!(refused.body["required_scope"], "admin");
    let template = as_token(
        &mut app,
        Some(&admin),
        Method::POST,
        "/v1/templates",
        Some(body),
    )
    .await;
    assert_eq!(
        (template.status, requester(&template)),
        (StatusCode::ACCEPTED, "root".into())
    );
    app.token = Some(admin.clone());
    let done = app.wait_job(template.body["id"].as_str().unwrap()).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    let deploy_path = format!("/v1/templates/{}/deploy", done.target.id);
    let body = json!({"name": "web", "mode": "linked", "count": 2});
    let refused = as_token(
        &mut app,
        Some(&read),
        Method::POST,
        &deploy_path,
        Some(body.clone()),
    )
    .await;
    assert_problem(&refused, StatusCode::FORBIDDEN, "forbidden");
    let deploy = as_token(&mut app, Some(&op), Method::POST, &deploy_path, Some(body)).await;
    assert_eq!(
        (deploy.status, requester(&deploy)),
        (StatusCode::ACCEPTED, "ops".into()),
        "{}",
        deploy.body
    );

    // Imports: admin.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1M")
        .status()
        .unwrap();
    assert!(made.success());
    let (status, refused) = import_as(&app, &op, "imported", &image).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (status, imported) = import_as(&app, &admin, "imported", &image).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{imported}");
    assert_eq!(imported["requested_by"], "root");

    // A schedule: made by admin, run now by operate, whose snapshot job is the runner's.
    let body = json!({"name": "hourly", "vm_id": vm_id, "cron": "0 * * * *", "retention": {"keep_last": 2}});
    let schedule = as_token(
        &mut app,
        Some(&admin),
        Method::POST,
        "/v1/schedules",
        Some(body),
    )
    .await;
    assert_eq!(schedule.status, StatusCode::CREATED, "{}", schedule.body);
    let run_path = format!(
        "/v1/schedules/{}/run",
        schedule.body["id"].as_str().unwrap()
    );
    let refused = as_token(&mut app, Some(&read), Method::POST, &run_path, None).await;
    assert_problem(&refused, StatusCode::FORBIDDEN, "forbidden");
    let run = as_token(&mut app, Some(&op), Method::POST, &run_path, None).await;
    assert_eq!(run.status, StatusCode::ACCEPTED, "{}", run.body);
    let snapshot_job = run.body["targets"][0]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no job in the run: {}", run.body))
        .to_owned();
    let job = as_token(
        &mut app,
        Some(&read),
        Method::GET,
        &format!("/v1/jobs/{snapshot_job}"),
        None,
    )
    .await;
    assert_eq!(requester(&job), "ops", "{}", job.body);

    // Cancelling a job: operate (this one may have ended already: then it is refused
    // as no longer cancellable, not for its scope).
    let cancel_path = format!("/v1/jobs/{snapshot_job}/cancel");
    let refused = as_token(&mut app, Some(&read), Method::POST, &cancel_path, None).await;
    assert_problem(&refused, StatusCode::FORBIDDEN, "forbidden");
    let cancel = as_token(&mut app, Some(&op), Method::POST, &cancel_path, None).await;
    assert!(
        cancel.status.is_success() || cancel.body["code"] == "job_not_cancellable",
        "{} {}",
        cancel.status,
        cancel.body
    );
}

/// The database alone cannot check a token: its digest is keyed by `token.key`, which
/// survives restarts; a digest kept the old, unkeyed way is brought under the key at
/// the next start and its token keeps working.
#[tokio::test]
async fn stored_digests_are_keyed_by_the_data_directorys_key_and_old_ones_are_upgraded() {
    use sha2::{Digest, Sha256};
    use sqlx::{Connection, Row};
    use std::os::unix::fs::PermissionsExt;

    let logs = tempfile::tempdir().unwrap();
    let mut app = TestApp::launch(Launch {
        log: Some(logs.path().join("service.log")),
        ..Launch::default()
    })
    .await;
    app.wait_ready().await;
    let admin = create_token(&app, "admin", "admin");
    let key_path = app.data_dir.join("token.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the service's user reads the key");
    let key = std::fs::read(&key_path).unwrap();
    assert_eq!(key.len(), 32);

    let options =
        sqlx::sqlite::SqliteConnectOptions::new().filename(app.data_dir.join("strata.db"));
    let mut db = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let secret_digest = |text: &str| {
        let secret: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&text[24 + 2 * i..26 + 2 * i], 16).unwrap())
            .collect();
        Sha256::digest(&secret).to_vec()
    };
    let row = sqlx::query("SELECT digest, digest_kind FROM tokens WHERE name = 'admin'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let stored: Vec<u8> = row.get("digest");
    assert_eq!(row.get::<String, _>("digest_kind"), "keyed");
    assert_ne!(stored, secret_digest(&admin), "not the plain digest");

    // A token of the release before: its plain SHA-256 digest, no key. The running
    // service brought the old rows under the key at its start; this one is refused
    // until the next start does.
    let legacy = format!("strata_00112233aabbccdd_{}", "5a".repeat(32));
    sqlx::query(
        "INSERT INTO tokens (id, name, scope, digest, digest_kind, created_at)
         VALUES ('00112233aabbccdd', 'legacy', 'read', ?, 'sha256', '2026-01-01T00:00:00Z')",
    )
    .bind(secret_digest(&legacy))
    .execute(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    let reply = as_token(&mut app, Some(&legacy), Method::GET, "/v1/vms", None).await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");

    app.restart(&[]).await;
    for token in [&admin, &legacy] {
        let reply = as_token(&mut app, Some(token), Method::GET, "/v1/vms", None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    assert_eq!(std::fs::read(&key_path).unwrap(), key, "the key is kept");
    let mut db = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let plain: i64 = sqlx::query("SELECT count(*) AS n FROM tokens WHERE digest_kind = 'sha256'")
        .fetch_one(&mut db)
        .await
        .unwrap()
        .get("n");
    assert_eq!(plain, 0);
    db.close().await.unwrap();

    // A lost key: the tokens made under it stop working (a new key is made, and the
    // service says why in its log); restoring the key brings them back.
    app.kill();
    std::fs::remove_file(&key_path).unwrap();
    app.restart(&[]).await;
    let reply = as_token(&mut app, Some(&admin), Method::GET, "/v1/vms", None).await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        app.log_tail(200).contains("token key was missing"),
        "{}",
        app.log_tail(50)
    );
    app.kill();
    std::fs::write(&key_path, &key).unwrap();
    app.restart(&[]).await;
    let reply = as_token(&mut app, Some(&admin), Method::GET, "/v1/vms", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// CORS is off unless origins are configured; then a page of such an origin may send
/// the token (`Authorization` is named: a wildcard would not cover it) and read the
/// headers the API answers with.
#[tokio::test]
async fn a_configured_origin_may_send_the_token_and_no_other_origin_is_let_in() {
    let preflight = |app: &TestApp, origin: &str| {
        app.client
            .request(Method::OPTIONS, format!("{}/v1/vms", app.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let app = TestApp::spawn().await;
    let reply = preflight(&app, "https://dash.example").await.unwrap();
    assert!(
        reply.headers().get("access-control-allow-origin").is_none(),
        "off by default"
    );

    let app = TestApp::spawn_with(&[("STRATA_CORS_ORIGINS", "https://dash.example")]).await;
    let reply = preflight(&app, "https://dash.example").await.unwrap();
    let header = |name: &str| {
        reply
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
    };
    assert_eq!(
        header("access-control-allow-origin").as_deref(),
        Some("https://dash.example")
    );
    let allowed = header("access-control-allow-headers").unwrap();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    let other = preflight(&app, "https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let token = create_token(&app, "dash", "read");
    let reply = app
        .client
        .get(format!("{}/v1/vms", app.base))
        .header("origin", "https://dash.example")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let exposed = reply.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("www-authenticate") && exposed.contains("location"),
        "{exposed}"
    );
}
