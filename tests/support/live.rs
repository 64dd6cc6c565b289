//! A running VM for the live tests and the bench: qemu-storage-daemon (the same block
//! layer and QMP as a VM's QEMU) with the disks' active chains open, its monitor in a
//! runtime directory, and one NBD export per disk through which the "guest" writes.
//! Optionally behind a monitor proxy that adds what the daemon lacks and a VM's QEMU
//! has: pausing the guest (`stop`, `cont`, `query-status`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use strata::qemu::qmp::Qmp;

/// The running VM: a qemu-storage-daemon with one node and one NBD export per disk.
pub struct RunningVm {
    child: Child,
    /// The monitor strata is given (the proxy's, for a pausable VM).
    pub qmp: PathBuf,
    /// The daemon's own monitor.
    daemon_qmp: PathBuf,
    pub nbd: PathBuf,
    /// Writes made through `write` wait while the guest is paused (`pausable` only).
    pub gate: Arc<GuestGate>,
    /// Set when the stand-in serves its monitor through a proxy that pauses the guest.
    proxy: Option<Arc<MonitorProxy>>,
}

impl RunningVm {
    /// Open each disk's active chain (`disk0`, `disk1`, ... in the order given).
    pub fn start(run_dir: &Path, actives: &[String]) -> Self {
        Self::launch(run_dir, actives, run_dir.join("vm.qmp"))
    }

    /// Like `start`, but the monitor strata talks to also pauses and resumes the guest
    /// (`stop`, `cont`, `query-status`), as a VM's QEMU does and qemu-storage-daemon
    /// does not: the proxy in front of the daemon's own monitor holds the test's guest
    /// writes (those made through `write` and `gate`) while paused, and flushes every
    /// export when asked to pause, as QEMU flushes every image when it stops a guest.
    pub fn start_pausable(run_dir: &Path, actives: &[String]) -> Self {
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
    pub fn kill_on(&self, command: &str, after_answer: bool) {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        *proxy.kill_on.lock().unwrap() = Some((command.to_owned(), after_answer));
    }

    /// Turn strata's next `job-complete` into a `block-job-cancel` of the same job, as
    /// another client of the monitor could: a ready active commit then ends without an
    /// error and without a pivot.
    pub fn cancel_next_completion(&self) {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        proxy.cancel_completion.store(true, Ordering::Relaxed);
    }

    /// Answer strata's next `command` with an error, as QEMU does when it refuses it
    /// (nothing reaches the daemon).
    pub fn refuse_next(&self, command: &str) {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        *proxy.refuse.lock().unwrap() = Some(command.to_owned());
    }

    /// The commands strata sent to the monitor so far (a pausable VM's).
    pub fn commands(&self) -> Vec<String> {
        let proxy = self.proxy.as_ref().expect("a pausable VM");
        proxy.commands.lock().unwrap().clone()
    }

    /// Whether the daemon has exited (killed by `kill_on`).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    fn launch(run_dir: &Path, actives: &[String], qmp: PathBuf) -> Self {
        let nbd = run_dir.join("vm.nbd");
        // Sockets an earlier stand-in left: waiting for the paths below would not wait.
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
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
            daemon_qmp: qmp.clone(),
            qmp,
            nbd,
            gate: Arc::new(GuestGate::default()),
            proxy: None,
        }
    }

    /// Write `pattern` over [offset, offset + len) bytes of disk `index`, as the guest
    /// (held while the guest is paused).
    pub fn write(&self, index: usize, pattern: u8, offset: u64, len: u64) {
        let _running = self.gate.enter();
        guest_write(&self.nbd, index, pattern, offset, len);
    }

    /// The files QEMU has open on top of each disk node, as it reports them.
    pub async fn top_files(&self) -> Vec<String> {
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

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Shut the VM down cleanly: QEMU closes its images (`quit`) and exits.
    pub async fn quit(&mut self) {
        if let Ok(mut qmp) = Qmp::connect(&self.daemon_qmp, Duration::from_secs(10)).await {
            let _: Result<Value, _> = qmp.execute("quit", json!({})).await;
        }
        for _ in 0..400 {
            if self.exited() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.stop();
    }

    /// Stop the VM (its QEMU exits).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `pattern` over [offset, offset + len) bytes of disk `index` of the VM
/// serving `nbd`, as its guest.
pub fn guest_write(nbd: &Path, index: usize, pattern: u8, offset: u64, len: u64) {
    if let Err(output) = try_guest_write(nbd, index, pattern, offset, len) {
        panic!("guest write failed: {output}");
    }
}

/// `guest_write` that reports a failure (qemu-io's output) instead of failing.
pub fn try_guest_write(
    nbd: &Path,
    index: usize,
    pattern: u8,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    guest_io(
        nbd,
        index,
        &[&format!("write -P {pattern:#x} {offset} {len}")],
    )
}

/// `try_guest_write` followed by a flush: once it returns `Ok`, the bytes are the
/// guest's durable writes, which no crash of QEMU may lose.
pub fn try_guest_write_flushed(
    nbd: &Path,
    index: usize,
    pattern: u8,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let write = format!("write -P {pattern:#x} {offset} {len}");
    guest_io(nbd, index, &[&write, "flush"])
}

/// Run qemu-io `commands` on disk `index` as the guest; qemu-io's output on failure.
fn guest_io(nbd: &Path, index: usize, commands: &[&str]) -> Result<(), String> {
    let url = format!("nbd+unix:///disk{index}?socket={}", nbd.display());
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = command.arg(&url).output().map_err(|e| e.to_string())?;
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
pub struct GuestGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    writing: usize,
}

/// A guest write under way (ends when dropped).
pub struct Writing<'a>(&'a GuestGate);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().writing -= 1;
        self.0.changed.notify_all();
    }
}

impl GuestGate {
    pub fn enter(&self) -> Writing<'_> {
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
    pub fn open(&self) {
        self.resume();
    }

    pub fn paused(&self) -> bool {
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
        // A socket an earlier stand-in left in the same directory.
        let _ = std::fs::remove_file(&socket);
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
