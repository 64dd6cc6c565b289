//! How strata learns to reach a running VM: `PATCH /v1/vms/{id}` with the QMP and
//! guest-agent sockets, each checked (inside `--runtime-dir`, a unix socket, a monitor
//! that greets as QEMU's) before anything is recorded. `qemu-storage-daemon` stands in
//! for the VM's QEMU.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::qmp::{Daemon, chain};
use crate::support::*;

async fn app_with_runtime_dir(dir: &Path) -> TestApp {
    let app = TestApp::spawn_with(&[("STRATA_RUNTIME_DIR", dir.to_str().unwrap())]).await;
    app.wait_ready().await;
    app
}

/// A socket that accepts and stays silent (a process that is not QEMU, or hung).
fn silent_socket(path: &Path) -> UnixListener {
    UnixListener::bind(path).unwrap()
}

/// A socket whose peer greets with something that is not QMP.
fn chatty_socket(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(b"{\"hello\": \"world\"}\n");
            std::thread::sleep(std::time::Duration::from_secs(10));
        }
    });
}

async fn patch(app: &TestApp, vm: Uuid, body: Value) -> Reply {
    send_json(app, Method::PATCH, &format!("/v1/vms/{vm}"), &body).await
}

/// The VM is as it was: stopped, no runtime.
async fn assert_unchanged(app: &TestApp, vm: Uuid) {
    let view = app.vm(vm).await;
    assert_eq!(view.state, VmState::Stopped, "{view:?}");
    assert!(view.runtime.is_none(), "{view:?}");
}

#[tokio::test]
async fn a_running_vm_records_its_sockets_and_shows_its_qemu() {
    let run = tempfile::tempdir().unwrap();
    let run_dir = std::fs::canonicalize(run.path()).unwrap();
    let app = app_with_runtime_dir(&run_dir).await;
    let vm = app.create_vm("live-01", &[("root", 64 << 20)]).await;
    let vm = vm.id;
    let top = chain(&run_dir);
    let daemon = Daemon::start(&run_dir, &top);
    let agent_path = run_dir.join("qga.sock");
    let _agent = silent_socket(&agent_path);

    let reply = patch(
        &app,
        vm,
        json!({"state": "running", "qmp_socket": daemon.socket, "guest_agent_socket": agent_path}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let runtime = &reply.body["runtime"];
    assert_eq!(runtime["qmp_socket"], daemon.socket.to_str().unwrap());
    assert_eq!(runtime["guest_agent_socket"], agent_path.to_str().unwrap());
    assert_eq!(runtime["connected"], true);
    let version = runtime["qemu_version"].as_str().unwrap();
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "{version}"
    );
    let (_, view) = app.get(&format!("/v1/vms/{vm}")).await;
    assert_eq!(view["runtime"], *runtime);

    // Giving the same socket again does not need the monitor (it serves one client at
    // a time, and a live job may hold it): the daemon is gone, and the PATCH still
    // succeeds.
    drop(daemon);
    let reply = patch(
        &app,
        vm,
        json!({"state": "running", "qmp_socket": run_dir.join("qmp.sock")}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["runtime"]["qemu_version"], version);

    // Stopped, the VM has no QEMU to reach.
    let reply = patch(&app, vm, json!({"state": "stopped"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["runtime"], Value::Null);
}

#[tokio::test]
async fn sockets_that_are_not_a_qemu_monitor_inside_the_runtime_dir_are_refused_and_change_nothing()
{
    let run = tempfile::tempdir().unwrap();
    let run_dir = std::fs::canonicalize(run.path()).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let app = app_with_runtime_dir(&run_dir).await;
    let vm = app.create_vm("live-02", &[("root", 64 << 20)]).await.id;

    let outside = elsewhere.path().join("qmp.sock");
    let _outside = silent_socket(&outside);
    let plain_file = run_dir.join("not-a-socket");
    std::fs::write(&plain_file, b"").unwrap();
    let link = run_dir.join("link.sock");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let escape = format!(
        "{}/../{}",
        run_dir.display(),
        outside.strip_prefix("/").unwrap().display()
    );
    let refused_paths: Vec<(String, &str)> = vec![
        (outside.display().to_string(), "outside"),
        (plain_file.display().to_string(), "not a socket"),
        ("run/qmp.sock".into(), "relative"),
        (link.display().to_string(), "a link leading outside"),
        (escape, "`..` leading outside"),
        (
            run_dir.join("missing.sock").display().to_string(),
            "missing",
        ),
    ];
    for (path, why) in &refused_paths {
        for field in ["qmp_socket", "guest_agent_socket"] {
            let reply = patch(&app, vm, json!({"state": "running", field: path})).await;
            assert_problem(&reply, StatusCode::BAD_REQUEST, "socket_refused");
            assert!(
                reply.body["detail"].as_str().unwrap().contains(field),
                "{why}: {}",
                reply.body
            );
            assert_unchanged(&app, vm).await;
        }
    }

    let chatty = run_dir.join("chatty.sock");
    chatty_socket(&chatty);
    let silent = run_dir.join("silent.sock");
    let _silent = silent_socket(&silent);
    for socket in [&chatty, &silent] {
        let reply = patch(&app, vm, json!({"state": "running", "qmp_socket": socket})).await;
        assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "qmp_unavailable");
        assert_unchanged(&app, vm).await;
    }

    // A real monitor, but for a VM that stays stopped.
    let top = chain(&run_dir);
    let daemon = Daemon::start(&run_dir, &top);
    let reply = patch(&app, vm, json!({"qmp_socket": daemon.socket})).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "socket_refused");
    assert_unchanged(&app, vm).await;
}

#[tokio::test]
async fn without_a_runtime_dir_sockets_are_refused() {
    let app = TestApp::spawn().await;
    app.wait_ready().await;
    let vm = app.create_vm("live-03", &[("root", 64 << 20)]).await.id;
    let run = tempfile::tempdir().unwrap();
    let top = chain(run.path());
    let daemon = Daemon::start(run.path(), &top);
    let reply = patch(
        &app,
        vm,
        json!({"state": "running", "qmp_socket": daemon.socket}),
    )
    .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "socket_refused");
    assert!(
        reply.body["detail"]
            .as_str()
            .unwrap()
            .contains("--runtime-dir"),
        "{}",
        reply.body
    );
    assert_unchanged(&app, vm).await;
}
