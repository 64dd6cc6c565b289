//! The QMP client against a real QEMU block layer: `qemu-storage-daemon` stands in for
//! a running VM (same QMP block commands), and small sockets stand in for monitors
//! that are not QEMU's or do not answer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use strata::qemu::qmp::{Qmp, QmpError};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A qemu-storage-daemon serving one disk's chain, with its monitor at `socket`.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
}

impl Daemon {
    pub(crate) fn start(dir: &Path, top: &Path) -> Self {
        let socket = dir.join("qmp.sock");
        let blockdev = json!({
            "driver": "qcow2", "node-name": "disk0",
            "file": {"driver": "file", "filename": top, "auto-read-only": true}
        });
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(blockdev.to_string())
            .arg("--chardev")
            .arg(format!(
                "socket,id=mon0,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["--monitor", "chardev=mon0"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Self { child, socket }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_img(args: &[&str]) {
    let status = Command::new("qemu-img").args(args).status().unwrap();
    assert!(status.success(), "qemu-img {args:?}");
}

/// base.qcow2 <- top.qcow2 (a relative backing name, as strata writes them).
pub(crate) fn chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "64M",
    ]);
    top
}

#[tokio::test]
async fn the_client_negotiates_queries_the_graph_and_reports_command_errors() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let daemon = Daemon::start(dir.path(), &top);
    let mut qmp = Qmp::connect(&daemon.socket, TIMEOUT).await.unwrap();
    assert!(qmp.version().major >= 6, "{}", qmp.version());

    let nodes = qmp.block_nodes().await.unwrap();
    let disk = nodes
        .iter()
        .find(|n| n.node_name == "disk0")
        .expect("disk0");
    assert_eq!(disk.drv, "qcow2");
    assert_eq!(Path::new(&disk.image.filename), top);
    assert_eq!(disk.image.virtual_size, 64 << 20);
    assert_eq!(disk.image.backing_filename.as_deref(), Some("base.qcow2"));
    // The chain QEMU has open, as live jobs compare it with the records.
    let base = dir.path().join("base.qcow2");
    assert_eq!(
        disk.image.chain(),
        [top.to_str().unwrap(), base.to_str().unwrap()]
    );
    // The backing layer is open as its own node, reading base.qcow2.
    assert!(
        nodes
            .iter()
            .any(|n| n.drv == "qcow2" && n.file.ends_with("/base.qcow2"))
    );

    assert!(qmp.jobs().await.unwrap().is_empty());
    let refused = qmp.execute::<Value>("no-such-command", json!({})).await;
    match refused {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("{other:?}"),
    }
    // The connection stays usable after a refusal.
    let refused = qmp
        .execute::<Value>("blockdev-del", json!({"node-name": "nope"}))
        .await;
    assert!(
        matches!(refused, Err(QmpError::Command { .. })),
        "{refused:?}"
    );
    assert!(qmp.block_nodes().await.is_ok());
}

#[tokio::test]
async fn a_qemu_that_goes_away_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let mut daemon = Daemon::start(dir.path(), &top);
    let mut qmp = Qmp::connect(&daemon.socket, TIMEOUT).await.unwrap();
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let result = qmp.jobs().await;
    assert!(
        matches!(result, Err(QmpError::Closed | QmpError::Io(_))),
        "{result:?}"
    );
    assert!(Qmp::connect(&daemon.socket, TIMEOUT).await.is_err());
}

#[tokio::test]
async fn a_socket_that_is_not_qmp_or_stays_silent_is_refused_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let chatty = dir.path().join("chatty.sock");
    let listener = UnixListener::bind(&chatty).unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"{\"hello\": \"world\"}\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let result = Qmp::connect(&chatty, TIMEOUT).await;
    assert!(
        matches!(result, Err(QmpError::NotQmp(_))),
        "{:?}",
        result.err()
    );

    let silent = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).unwrap();
    tokio::spawn(async move {
        let (_stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let result = Qmp::connect(&silent, Duration::from_millis(300)).await;
    assert!(
        matches!(result, Err(QmpError::Timeout { .. })),
        "{:?}",
        result.err()
    );
}
