//! Live snapshots of running VMs through their QMP monitor. `qemu-storage-daemon`
//! stands in for the VM's QEMU: it opens the disks' active chains, serves its monitor
//! in `--runtime-dir`, and exports each disk over NBD, so the test writes into the
//! "guest" disks while the job runs and checks every byte afterwards.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use strata::qemu::qmp::Qmp;

use crate::recovery::assert_files_match_metadata;
use crate::support::*;

pub(crate) const DISK: u64 = 64 << 20;
pub(crate) const MIB: u64 = 1 << 20;

/// The running VM: a qemu-storage-daemon with one node and one NBD export per disk.
pub(crate) struct RunningVm {
    child: Child,
    pub(crate) qmp: PathBuf,
    pub(crate) nbd: PathBuf,
    /// Writes made through `write` wait while the guest is paused (`pausable` only).
    pub(crate) gate: Arc<GuestGate>,
    /// Set when the stand-in serves its monitor through a proxy that pauses the guest.
    proxy: Option<Arc<MonitorProxy>>,
}

impl RunningVm {
    /// Open each disk's active chain (`disk0`, `disk1`, ... in the order given).
    pub(crate) fn start(run_dir: &Path, actives: &[String]) -> Self {
        Self::launch(run_dir, actives, run_dir.join("vm.qmp"))
    }

    /// Like `start`, but the monitor strata talks to also pauses and resumes the guest
    /// (`stop`, `cont`, `query-status`), as a VM's QEMU does and qemu-storage-daemon
    /// does not: the proxy in front of the daemon's own monitor holds the test's guest
    /// writes (those made through `write` and `gate`) while paused, and flushes every
    /// export when asked to pause, as QEMU flushes every image when it stops a guest.
    pub(crate) fn start_pausable(run_dir: &Path, actives: &[String]) -> Self {
        let mut vm = Self::launch(run_dir, actives, run_dir.join("vm.qsd.qmp"));
        let proxy = MonitorProxy::serve(
            run_dir.join("vm.qmp"),
            vm.qmp.clone(),
            Arc::clone(&vm.gate),
            vm.nbd.clone(),
            actives.len(),
            vm.child.id(),
        );
        vm.qmp = proxy.socket.clone();
        vm.proxy = Some(proxy);
        vm
    }

    /// Kill the daemon (kill -9, as a crashing QEMU) when strata sends `command` to
    /// its monitor: before it reaches QEMU, or right after QEMU answered it.
    pub(crate) fn kill_on(&self, command: &str, after_answer: bool) {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        *proxy.kill_on.lock().unwrap() = Some((command.to_owned(), after_answer));
    }

    /// Turn strata's next `job-complete` into a `block-job-cancel` of the same job, as
    /// another client of the monitor could: a ready active commit then ends without an
    /// error and without a pivot.
    pub(crate) fn cancel_next_completion(&self) {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        proxy.cancel_completion.store(true, Ordering::Relaxed);
    }

    /// Answer strata's next `command` with an error, as QEMU does when it refuses it
    /// (nothing reaches the daemon).
    pub(crate) fn refuse_next(&self, command: &str) {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        *proxy.refuse.lock().unwrap() = Some(command.to_owned());
    }

    /// The commands strata sent to the monitor so far (a pausable VM's).
    pub(crate) fn commands(&self) -> Vec<String> {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        proxy.commands.lock().unwrap().clone()
    }

    /// Whether the daemon has exited (killed by `kill_on`).
    pub(crate) fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    fn launch(run_dir: &Path, actives: &[String], qmp: PathBuf) -> Self {
        let nbd = run_dir.join("vm.nbd");
        let mut command = Command::new("qemu-storage-daemon");
        for (i, active) in actives.iter().enumerate() {
            let blockdev = json!({
                "driver": "qcow2", "node-name": format!("disk{i}"),
                "file": {"driver": "file", "filename": active, "auto-read-only": true}
            });
            command.arg("--blockdev").arg(blockdev.to_string());
        }
        command
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()));
        for i in 0..actives.len() {
            command.arg("--export").arg(format!(
                "type=nbd,id=exp{i},node-name=disk{i},name=disk{i},writable=on"
            ));
        }
        command
            .arg("--chardev")
            .arg(format!(
                "socket,id=mon0,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=mon0"])
            .stdout(Stdio::null());
        let child = command.spawn().expect("start qemu-storage-daemon");
        for _ in 0..400 {
            if qmp.exists() && nbd.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Self {
            child,
            qmp,
            nbd,
            gate: Arc::new(GuestGate::default()),
            proxy: None,
        }
    }

    /// Write `pattern` over [offset, offset + len) bytes of disk `index`, as the guest
    /// (held while the guest is paused).
    pub(crate) fn write(&self, index: usize, pattern: u8, offset: u64, len: u64) {
        let _running = self.gate.enter();
        guest_write(&self.nbd, index, pattern, offset, len);
    }

    /// The files QEMU has open on top of each disk node, as it reports them.
    pub(crate) async fn top_files(&self) -> Vec<String> {
        let mut qmp = Qmp::connect(&self.qmp, Duration::from_secs(10))
            .await
            .unwrap();
        let nodes = qmp.block_nodes().await.unwrap();
        let exports: Value = qmp.execute("query-block-exports", json!({})).await.unwrap();
        // In disk order (exports are listed in no set order).
        let mut exports = exports.as_array().unwrap().clone();
        exports.sort_by_key(|e| e["id"].as_str().unwrap().to_owned());
        exports
            .iter()
            .map(|export| {
                let node = export["node-name"].as_str().unwrap();
                nodes
                    .iter()
                    .find(|n| n.node_name == node)
                    .map(|n| n.image.file_name())
                    .unwrap()
            })
            .collect()
    }

    /// Stop the VM (its QEMU exits).
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `pattern` over [offset, offset + len) bytes of disk `index` of the VM
/// serving `nbd`, as its guest.
pub(crate) fn guest_write(nbd: &Path, index: usize, pattern: u8, offset: u64, len: u64) {
    if let Err(output) = try_guest_write(nbd, index, pattern, offset, len) {
        panic!("guest write failed: {output}");
    }
}

/// `guest_write` that reports a failure (qemu-io's output) instead of failing.
pub(crate) fn try_guest_write(
    nbd: &Path,
    index: usize,
    pattern: u8,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let url = format!("nbd+unix:///disk{index}?socket={}", nbd.display());
    let output = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern:#x} {offset} {len}"),
            &url,
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && !stdout.contains("error") {
        Ok(())
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop();
        if let Some(proxy) = &self.proxy {
            proxy.closed.store(true, Ordering::Relaxed);
        }
    }
}

/// Whether the test's guest may write: a pause waits for the writes under way and holds
/// new ones until the guest runs again.
#[derive(Default)]
pub(crate) struct GuestGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    writing: usize,
}

/// A guest write under way (ends when dropped).
pub(crate) struct Writing<'a>(&'a GuestGate);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().writing -= 1;
        self.0.changed.notify_all();
    }
}

impl GuestGate {
    pub(crate) fn enter(&self) -> Writing<'_> {
        let mut state = self.state.lock().unwrap();
        while state.paused {
            state = self.changed.wait(state).unwrap();
        }
        state.writing += 1;
        Writing(self)
    }

    fn pause(&self) {
        let mut state = self.state.lock().unwrap();
        state.paused = true;
        while state.writing > 0 {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn resume(&self) {
        self.state.lock().unwrap().paused = false;
        self.changed.notify_all();
    }

    /// Let held writes go (to a QEMU that is gone, after a kill).
    pub(crate) fn open(&self) {
        self.resume();
    }

    pub(crate) fn paused(&self) -> bool {
        self.state.lock().unwrap().paused
    }
}

/// A monitor in front of qemu-storage-daemon's: answers `stop`, `cont` and
/// `query-status` itself (pausing the test's guest), lists them in `query-commands`,
/// and passes everything else through. Like QEMU's monitor it serves one client at a
/// time; with the daemon gone, it closes each connection at once.
struct MonitorProxy {
    socket: PathBuf,
    commands: Mutex<Vec<String>>,
    kill_on: Mutex<Option<(String, bool)>>,
    cancel_completion: AtomicBool,
    refuse: Mutex<Option<String>>,
    closed: AtomicBool,
}

impl MonitorProxy {
    fn serve(
        socket: PathBuf,
        daemon: PathBuf,
        gate: Arc<GuestGate>,
        nbd: PathBuf,
        disks: usize,
        pid: u32,
    ) -> Arc<Self> {
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = Arc::new(Self {
            socket,
            commands: Mutex::new(Vec::new()),
            kill_on: Mutex::new(None),
            cancel_completion: AtomicBool::new(false),
            refuse: Mutex::new(None),
            closed: AtomicBool::new(false),
        });
        let serving = Arc::clone(&proxy);
        std::thread::spawn(move || {
            while !serving.closed.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(upstream) = UnixStream::connect(&daemon) else {
                            continue;
                        };
                        let _ = serving.relay(client, upstream, &gate, &nbd, disks, pid);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        proxy
    }

    fn relay(
        &self,
        client: UnixStream,
        upstream: UnixStream,
        gate: &GuestGate,
        nbd: &Path,
        disks: usize,
        pid: u32,
    ) -> std::io::Result<()> {
        let mut from_daemon = BufReader::new(upstream.try_clone()?);
        let mut to_daemon = upstream;
        let mut from_client = BufReader::new(client.try_clone()?);
        let mut to_client = client;
        let mut line = String::new();
        if from_daemon.read_line(&mut line)? == 0 {
            return Ok(());
        }
        to_client.write_all(line.as_bytes())?;
        loop {
            line.clear();
            if from_client.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let request: Value = serde_json::from_str(&line).unwrap();
            let command = request["execute"].as_str().unwrap_or_default().to_owned();
            self.commands.lock().unwrap().push(command.clone());
            let kill = self.kill_on.lock().unwrap().clone();
            let kill_now = |after: bool| {
                if kill
                    .as_ref()
                    .is_some_and(|(c, a)| *c == command && *a == after)
                {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                    true
                } else {
                    false
                }
            };
            if kill_now(false) {
                return Ok(());
            }
            let refused = {
                let mut refuse = self.refuse.lock().unwrap();
                let now = refuse.as_deref() == Some(command.as_str());
                if now {
                    *refuse = None;
                }
                now
            };
            if refused {
                let error = json!({"class": "GenericError", "desc": "refused by the test"});
                let reply = json!({"error": error, "id": request["id"]});
                to_client.write_all(format!("{reply}\n").as_bytes())?;
                continue;
            }
            let local = match command.as_str() {
                "stop" => {
                    gate.pause();
                    for disk in 0..disks {
                        let url = format!("nbd+unix:///disk{disk}?socket={}", nbd.display());
                        let flushed = Command::new("qemu-io")
                            .args(["-f", "raw", "-c", "flush", &url])
                            .output()?;
                        assert!(flushed.status.success(), "flush of disk{disk} failed");
                    }
                    Some(json!({}))
                }
                "cont" => {
                    gate.resume();
                    Some(json!({}))
                }
                "query-status" => {
                    let running = !gate.paused();
                    let status = if running { "running" } else { "paused" };
                    Some(json!({"running": running, "status": status}))
                }
                _ => None,
            };
            if let Some(answer) = local {
                let reply = json!({"return": answer, "id": request["id"]});
                to_client.write_all(format!("{reply}\n").as_bytes())?;
                if kill_now(true) {
                    return Ok(());
                }
                continue;
            }
            let mut forwarded = line.clone();
            if command == "job-complete" && self.cancel_completion.swap(false, Ordering::Relaxed) {
                let cancel = json!({
                    "execute": "block-job-cancel",
                    "arguments": {"device": request["arguments"]["id"]},
                    "id": request["id"],
                });
                forwarded = format!("{cancel}\n");
            }
            to_daemon.write_all(forwarded.as_bytes())?;
            loop {
                let mut answer = String::new();
                if from_daemon.read_line(&mut answer)? == 0 {
                    return Ok(());
                }
                let mut message: Value = serde_json::from_str(&answer).unwrap();
                if message.get("event").is_some() {
                    to_client.write_all(answer.as_bytes())?;
                    continue;
                }
                if command == "query-commands"
                    && let Some(list) = message["return"].as_array_mut()
                {
                    for name in ["stop", "cont", "query-status"] {
                        list.push(json!({ "name": name }));
                    }
                    answer = format!("{message}\n");
                }
                to_client.write_all(answer.as_bytes())?;
                break;
            }
            if kill_now(true) {
                return Ok(());
            }
        }
    }
}

pub(crate) async fn spawn(run_dir: &Path, fault: Option<&str>) -> TestApp {
    let mut env = vec![("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap())];
    if let Some(fault) = fault {
        env.push(("STRATA_FAULT", fault));
    }
    let app = TestApp::spawn_with(&env).await;
    app.wait_ready().await;
    app
}

/// A two-disk VM, running in a daemon, marked running with its QMP socket. Before it
/// ran, `root` got 0x11 over its first MiB (offline).
pub(crate) async fn running_vm(app: &TestApp, run_dir: &Path, name: &str) -> (Uuid, RunningVm) {
    let vm = app
        .create_vm(name, &[("root", DISK), ("data", DISK)])
        .await
        .id;
    write(&app.active_path(vm, "root").await, 0x11, 0, 1);
    let actives = vec![
        app.active_path(vm, "root").await,
        app.active_path(vm, "data").await,
    ];
    let process = RunningVm::start(run_dir, &actives);
    let (status, body) = app
        .patch(
            &format!("/v1/vms/{vm}"),
            json!({"state": "running", "qmp_socket": process.qmp}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (vm, process)
}

/// The orchestrator's word that the VM stopped (its QEMU is gone).
pub(crate) async fn mark_stopped(app: &TestApp, vm: Uuid) {
    let (status, body) = app
        .patch(&format!("/v1/vms/{vm}"), json!({"state": "stopped"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

pub(crate) fn run_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let canonical = std::fs::canonicalize(dir.path()).unwrap();
    (dir, canonical)
}

#[tokio::test]
async fn a_live_snapshot_switches_every_disk_at_once_and_loses_no_guest_write() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "live-snap").await;
    let old_root = app.active_path(vm, "root").await;
    let old_data = app.active_path(vm, "data").await;
    process.write(0, 0x22, MIB, MIB);
    process.write(1, 0x61, 0, MIB);

    // A guest that keeps writing while the snapshot is taken: each write goes to a
    // MiB of its own, past the areas the checks below look at.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let nbd = process.nbd.clone();
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 40 {
                let (disk, offset, pattern) = (n % 2, (8 + n) * MIB, 0x80 + n as u8);
                let written_now = try_guest_write(&nbd, disk as usize, pattern, offset, MIB);
                assert!(
                    written_now.is_ok(),
                    "a guest write failed during the snapshot"
                );
                written.push((disk, offset, pattern));
                n += 1;
            }
            written
        })
    };
    let job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{vm}/snapshots"),
                json!({"name": "live-1"}),
            )
            .await,
        )
        .await;
    stop.store(true, Ordering::Relaxed);
    let concurrent = writer.join().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let snapshot = job.target.id;

    // The API shows the new active layers at once; QEMU writes into them.
    let new_root = app.active_path(vm, "root").await;
    let new_data = app.active_path(vm, "data").await;
    assert_ne!(new_root, old_root);
    assert_ne!(new_data, old_data);
    assert_eq!(
        process.top_files().await,
        [new_root.clone(), new_data.clone()]
    );
    assert_eq!(app.snapshot_path(vm, snapshot, "root").await, old_root);

    // After the snapshot, the guest overwrites the first MiB of root.
    process.write(0, 0x33, 0, MIB);
    process.stop();
    mark_stopped(&app, vm).await;

    // The snapshot holds what the guest wrote before it, and nothing after.
    expect_all(&old_root, &[(0x11, 0, 1), (0x22, 1, 1)]);
    expect_all(&old_data, &[(0x61, 0, 1)]);
    // The present holds everything, the concurrent writes included.
    expect_all(&new_root, &[(0x33, 0, 1), (0x22, 1, 1)]);
    expect_all(&new_data, &[(0x61, 0, 1)]);
    for (disk, offset, pattern) in concurrent {
        let path = if disk == 0 { &new_root } else { &new_data };
        expect_bytes(path, pattern, offset, MIB);
    }
    for path in [&old_root, &old_data, &new_root, &new_data] {
        check_clean(path);
    }
    assert_eq!(chain(&new_root), [new_root.clone(), old_root.clone()]);
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn a_qemu_reading_other_files_than_the_records_is_refused_and_nothing_changes() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let vm = app.create_vm("live-mismatch", &[("root", DISK)]).await.id;
    let active = app.active_path(vm, "root").await;
    // QEMU runs the VM from a copy strata does not know.
    let stray = run_dir.join("stray.qcow2");
    std::fs::copy(&active, &stray).unwrap();
    let process = RunningVm::start(&run_dir, &[stray.display().to_string()]);
    let (status, body) = app
        .patch(
            &format!("/v1/vms/{vm}"),
            json!({"state": "running", "qmp_socket": process.qmp}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let files_before = app.volume_files();

    let (status, job) = app
        .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job = app.wait_job(&job["id"].as_str().unwrap()).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let error = job.error.as_ref().unwrap();
    assert_eq!(error.code, "runtime_mismatch", "{job:?}");
    assert!(error.message.contains("has not opened"), "{job:?}");
    let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
    assert_eq!(list["items"], json!([]));
    assert_eq!(app.active_path(vm, "root").await, active);
    assert_eq!(app.volume_files(), files_before);
    assert_eq!(process.top_files().await, [stray.display().to_string()]);
}

#[tokio::test]
async fn a_crash_at_any_point_of_a_live_snapshot_ends_with_the_snapshot_or_nothing_lost() {
    // Steps: create(root), create(data), open the overlays in QEMU (2), switch (3).
    // `ran-step-N`: the step's work is done, its journal entry is not (a resumed job
    // must not make again a file QEMU already holds).
    for point in [
        "planned",
        "after-step-1",
        "ran-step-2",
        "after-step-2",
        "ran-step-3",
        "committed",
    ] {
        let (_run, run_dir) = run_dir();
        let fault = format!("snapshot_create:{point}");
        let mut app = spawn(&run_dir, Some(&fault)).await;
        let (vm, mut process) = running_vm(&app, &run_dir, "live-crash").await;
        let old_root = app.active_path(vm, "root").await;
        process.write(0, 0x22, MIB, MIB);
        let (status, job) = app
            .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s"}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let exit = app.wait_exit();
        assert!(
            !exit.success(),
            "{point}: the injected fault aborts the process"
        );
        // The guest goes on writing while strata is down.
        process.write(0, 0x44, 2 * MIB, MIB);
        app.restart(&[("STRATA_RUNTIME_DIR", run_dir.to_str().unwrap())])
            .await;

        let job = app.wait_job(job["id"].as_str().unwrap()).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{point}: {job:?}");
        let new_root = app.active_path(vm, "root").await;
        assert_ne!(new_root, old_root, "{point}");
        assert_eq!(process.top_files().await[0], new_root, "{point}");
        process.write(0, 0x33, 0, MIB);
        process.stop();
        expect_all(&old_root, &[(0x11, 0, 1), (0x22, 1, 1)]);
        expect_all(&new_root, &[(0x33, 0, 1), (0x22, 1, 1), (0x44, 2, 1)]);
        check_clean(&new_root);
        check_clean(&old_root);
        mark_stopped(&app, vm).await;
        assert_files_match_metadata(&app, vm).await;
    }
}

#[tokio::test]
async fn a_schedule_run_snapshots_a_running_vm_live_and_skips_one_without_a_socket() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (live, mut process) = running_vm(&app, &run_dir, "sched-live").await;
    let old_root = app.active_path(live, "root").await;
    let unreachable = app.create_vm("sched-no-socket", &[("root", DISK)]).await.id;
    let (status, body) = app
        .patch(
            &format!("/v1/vms/{unreachable}"),
            json!({"state": "running"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (vm, name) in [(live, "every-hour-live"), (unreachable, "every-hour-off")] {
        let (status, schedule) = app
            .post(
                "/v1/schedules",
                json!({"name": name, "vm_id": vm, "cron": "@hourly"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{schedule}");
        let id = schedule["id"].as_str().unwrap();
        let (status, run) = app
            .post(&format!("/v1/schedules/{id}/run"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let target = &run["targets"][0];
        if vm == live {
            assert_eq!(target["outcome"], "queued", "{run}");
            let job = app.wait_job(target["job_id"].as_str().unwrap()).await;
            assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        } else {
            assert_eq!(run["status"], "skipped", "{run}");
            assert_eq!(target["code"], "vm_running", "{run}");
            assert!(
                target["reason"].as_str().unwrap().contains("qmp_socket"),
                "{run}"
            );
        }
    }
    let new_root = app.active_path(live, "root").await;
    assert_ne!(new_root, old_root);
    assert_eq!(process.top_files().await[0], new_root);
    process.write(0, 0x33, 0, MIB);
    process.stop();
    expect_all(&old_root, &[(0x11, 0, 1)]);
    expect_all(&new_root, &[(0x33, 0, 1)]);
}

#[tokio::test]
async fn a_qemu_that_stops_answering_before_the_switch_holds_the_job_until_the_vm_is_marked_stopped()
 {
    let (_run, run_dir) = run_dir();
    // The job pauses once its overlays are open in QEMU, before the switch.
    let app = spawn(&run_dir, Some("snapshot_create:after-step-2:pause=4000")).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "live-gone").await;
    let old_root = app.active_path(vm, "root").await;
    process.write(0, 0x22, MIB, MIB);
    let (status, job) = app
        .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": "s"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    // Until the overlays are open in QEMU (step 2 journaled: the job pauses there).
    let mut waited = 0;
    while app.job(&job_id).await.progress < 74 {
        waited += 1;
        assert!(waited < 300, "the job never opened its overlays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Pointing strata at another monitor while the job works is refused.
    let other = run_dir.join("other.qmp");
    let _other = std::os::unix::net::UnixListener::bind(&other).unwrap();
    let reply = send_json(
        &app,
        reqwest::Method::PATCH,
        &format!("/v1/vms/{vm}"),
        &json!({"qmp_socket": other}),
    )
    .await;
    assert_problem(&reply, StatusCode::CONFLICT, "vm_busy");

    // QEMU goes away while the VM is still recorded running: a refused connection
    // proves nothing (QEMU may be restarting), so the job waits.
    process.write(0, 0x44, 2 * MIB, MIB);
    process.stop();
    let mut waited = 0;
    loop {
        let job = app.job(&job_id).await;
        assert_eq!(job.status, JobStatus::Running, "{job:?}");
        if job.error.is_some() {
            break;
        }
        waited += 1;
        assert!(
            waited < 200,
            "the job never said what it waits for: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The orchestrator says the VM stopped: no QEMU writes any layer now, and the
    // overlays are recorded (they read exactly as the layers below them).
    mark_stopped(&app, vm).await;
    let job = app.wait_job(&job_id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let new_root = app.active_path(vm, "root").await;
    assert_ne!(new_root, old_root);
    assert_eq!(app.snapshot_path(vm, job.target.id, "root").await, old_root);
    expect_all(&old_root, &[(0x11, 0, 1), (0x22, 1, 1), (0x44, 2, 1)]);
    expect_all(&new_root, &[(0x11, 0, 1), (0x22, 1, 1), (0x44, 2, 1)]);
    check_clean(&new_root);
    assert_files_match_metadata(&app, vm).await;
}

#[tokio::test]
async fn a_running_vm_disk_grows_through_its_qemu_and_the_guest_writes_past_the_old_end() {
    let (_run, run_dir) = run_dir();
    let app = spawn(&run_dir, None).await;
    let (vm, mut process) = running_vm(&app, &run_dir, "live-grow").await;
    let root = app.vm(vm).await.disk("root").id;

    // QEMU's NBD export forbids resizing the node it serves (a guest's virtio-blk
    // device allows it): QEMU refuses, the grow did not happen, and the job fails
    // rather than waiting.
    let path = format!("/v1/vms/{vm}/disks/{root}/resize");
    let body = json!({"size_bytes": 2 * DISK});
    let accepted = app.accept(Method::POST, &path, Some(body)).await;
    let refused = app.wait_job(accepted.id).await;
    assert_eq!(refused.status, JobStatus::Failed, "{refused:?}");
    assert_eq!(refused.error.as_ref().unwrap().code, "qemu_failed");
    let view = app.vm(vm).await;
    let disk = view.disk("root");
    assert_eq!(
        (disk.size_bytes, disk.status),
        (DISK, ResourceStatus::Ready)
    );

    let mut qmp = Qmp::connect(&process.qmp, Duration::from_secs(10))
        .await
        .unwrap();
    let export = json!({"type": "nbd", "id": "exp0", "node-name": "disk0", "name": "disk0", "writable": true});
    qmp.execute::<Value>("block-export-del", json!({"id": "exp0"}))
        .await
        .unwrap();
    drop(qmp);
    let job = app.resize(vm, root, 2 * DISK).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(app.vm(vm).await.disk("root").size_bytes, 2 * DISK);
    let mut qmp = Qmp::connect(&process.qmp, Duration::from_secs(10))
        .await
        .unwrap();
    let node = qmp
        .block_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node_name == "disk0")
        .unwrap();
    assert_eq!(node.image.virtual_size, 2 * DISK);
    // The guest sees the new size: it writes past the old end.
    qmp.execute::<Value>("block-export-add", export)
        .await
        .unwrap();
    drop(qmp);
    process.write(0, 0x77, DISK + MIB, MIB);
    process.stop();
    let active = app.active_path(vm, "root").await;
    expect_bytes(&active, 0x77, DISK + MIB, MIB);
    expect_all(&active, &[(0x11, 0, 1)]);
    check_clean(&active);
}
