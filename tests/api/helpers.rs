//! Test harness: spawns the real `strata` binary on an ephemeral port over a temporary
//! data directory, drives it over HTTP, and checks image bytes with qemu-io/qemu-img.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub const MIB: u64 = 1 << 20;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    // Kept alive so the directory outlives restarts; removed when the test ends.
    _temp: std::sync::Arc<tempfile::TempDir>,
    child: Option<Child>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// Start the service with extra environment variables (e.g. STRATA_FAULT).
    pub async fn spawn_with(env: &[(&str, &str)]) -> Self {
        let temp = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start(temp, env)
    }

    /// Start the service over `dir/data`, e.g. a directory a test mounted a small
    /// file system on.
    pub async fn spawn_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Self {
        let app = Self::start(std::sync::Arc::new(dir), env);
        app.wait_ready().await;
        app
    }

    fn start(temp: std::sync::Arc<tempfile::TempDir>, env: &[(&str, &str)]) -> Self {
        let data_dir = temp.path().join("data");
        let mut command = Command::new(env!("CARGO_BIN_EXE_strata"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(["--workers", "2", "--shutdown-grace-secs", "1"])
            .env("STRATA_LOG", "warn")
            .env_remove("STRATA_FAULT")
            .env_remove("STRATA_RESERVED_SPACE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start strata");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listen line");
        let base = line
            .trim()
            .strip_prefix("strata listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            base,
            // No connection reuse: the service may close a connection after refusing a
            // body early (413), and a pooled connection would then fail the next request.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client"),
            data_dir,
            _temp: temp,
            child: Some(child),
        }
    }

    /// Kill the service like `kill -9` (no cleanup) and wait for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The service's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Wait for the process to die on its own (e.g. after an injected crash).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        for _ in 0..600 {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("strata did not exit");
    }

    /// Start a new process over the same data directory.
    pub async fn restart(&mut self, env: &[(&str, &str)]) {
        self.kill();
        let next = Self::start(std::sync::Arc::clone(&self._temp), env);
        self.base = next.base.clone();
        self.child = next.take_child();
        self.wait_ready().await;
    }

    fn take_child(mut self) -> Option<Child> {
        self.child.take()
    }

    pub async fn wait_ready(&self) {
        for _ in 0..600 {
            let ready = self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("strata never became ready");
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let documented_method = method.clone();
        let mut request = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        crate::documented::check(&documented_method, path, status, &value);
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Long-poll a job until it ends and return it.
    pub async fn wait_job_end(&self, job: &Value) -> Value {
        let id = job["id"]
            .as_str()
            .unwrap_or_else(|| panic!("not a job: {job}"));
        for _ in 0..20 {
            let (status, job) = self.get(&format!("/v1/jobs/{id}?wait=30")).await;
            assert_eq!(status, StatusCode::OK, "{job}");
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
        }
        panic!("job {id} did not end");
    }

    /// Expect a 202 with a job, wait for it and require success.
    pub async fn expect_job(&self, (status, job): (StatusCode, Value)) -> Value {
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let job = self.wait_job_end(&job).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        job
    }

    /// Create a VM with `disks` (name, size) and wait until it is ready.
    pub async fn create_vm(&self, name: &str, disks: &[(&str, u64)]) -> Value {
        let disks: Vec<Value> = disks
            .iter()
            .map(|(n, s)| json!({"name": n, "size_bytes": s}))
            .collect();
        let job = self
            .expect_job(
                self.post("/v1/vms", json!({"name": name, "disks": disks}))
                    .await,
            )
            .await;
        self.vm(job["target"]["id"].as_str().unwrap()).await
    }

    pub async fn vm(&self, id: &str) -> Value {
        let (status, vm) = self.get(&format!("/v1/vms/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{vm}");
        vm
    }

    /// Take a snapshot and return its id.
    pub async fn snapshot(&self, vm: &str, name: &str) -> String {
        let job = self
            .expect_job(
                self.post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": name}))
                    .await,
            )
            .await;
        job["target"]["id"].as_str().unwrap().to_owned()
    }

    pub async fn revert(&self, snapshot: &str) {
        self.expect_job(
            self.post(&format!("/v1/snapshots/{snapshot}/revert"), json!({}))
                .await,
        )
        .await;
    }

    /// Grow a disk and wait for the job.
    pub async fn resize(&self, vm: &str, disk: &str, size_bytes: u64) {
        let path = format!("/v1/vms/{vm}/disks/{disk}/resize");
        self.expect_job(self.post(&path, json!({ "size_bytes": size_bytes })).await)
            .await;
    }

    /// Delete a snapshot and return the finished job (with its merge detail).
    pub async fn delete_snapshot(&self, snapshot: &str) -> Value {
        self.expect_job(self.delete(&format!("/v1/snapshots/{snapshot}")).await)
            .await
    }

    /// Active path of the VM's disk named `disk`.
    pub async fn active_path(&self, vm: &str, disk: &str) -> String {
        let vm = self.vm(vm).await;
        let disk = vm["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == disk)
            .unwrap_or_else(|| panic!("no disk {disk}"));
        disk["active_path"].as_str().unwrap().to_owned()
    }

    /// Path of the layer a snapshot froze for `disk` (its chain is the snapshot's content).
    pub async fn snapshot_path(&self, vm: &str, snapshot: &str, disk: &str) -> String {
        let vm_view = self.vm(vm).await;
        let disk_id = vm_view["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == disk)
            .unwrap()["id"]
            .clone();
        let (status, snap) = self.get(&format!("/v1/snapshots/{snapshot}")).await;
        assert_eq!(status, StatusCode::OK, "{snap}");
        let volume = snap["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["disk_id"] == disk_id)
            .expect("snapshot covers disk");
        volume["path"].as_str().unwrap().to_owned()
    }

    /// Every qcow2 file in the data directory.
    pub fn volume_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.data_dir.join("volumes"))
            .map(|dir| dir.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }
}

/// Write `pattern` over [offset, offset+len) MiB of the image.
pub fn write(path: &str, pattern: u8, offset_mib: u64, len_mib: u64) {
    qemu_io(
        path,
        &format!("write -P {pattern:#x} {}M {}M", offset_mib, len_mib),
        false,
    );
}

/// Assert the image reads `pattern` over [offset, offset+len) MiB.
pub fn expect(path: &str, pattern: u8, offset_mib: u64, len_mib: u64) {
    qemu_io(
        path,
        &format!("read -P {pattern:#x} {}M {}M", offset_mib, len_mib),
        true,
    );
}

/// Assert each (pattern, offset MiB, length MiB) region of the image.
pub fn expect_all(path: &str, regions: &[(u8, u64, u64)]) {
    for &(pattern, offset, len) in regions {
        expect(path, pattern, offset, len);
    }
}

fn qemu_io(path: &str, command: &str, read_only: bool) {
    let mut args = vec!["-f", "qcow2"];
    if read_only {
        args.push("-r");
    }
    args.extend(["-c", command, path]);
    let output = Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("run qemu-io");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && !stdout.contains("Pattern verification failed")
            && !stdout.contains("failed"),
        "qemu-io {command} on {path}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Assert `qemu-img check` finds every layer of the chain clean.
pub fn check_clean(path: &str) {
    for layer in chain(path) {
        let output = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", &layer])
            .output()
            .expect("run qemu-img check");
        assert!(
            output.status.success(),
            "qemu-img check {layer}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

/// The file names of the backing chain, top first (fails if a backing file is missing).
pub fn chain(path: &str) -> Vec<String> {
    let output = Command::new("qemu-img")
        .args([
            "info",
            "--output=json",
            "--backing-chain",
            "-f",
            "qcow2",
            path,
        ])
        .output()
        .expect("run qemu-img info");
    assert!(
        output.status.success(),
        "qemu-img info --backing-chain {path}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let infos: Vec<Value> = serde_json::from_slice(&output.stdout).expect("info JSON");
    infos
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_owned())
        .collect()
}

/// Assert two images show identical guest content.
pub fn compare(a: &str, b: &str) {
    let output = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2", a, b])
        .output()
        .expect("run qemu-img compare");
    assert!(
        output.status.success(),
        "qemu-img compare {a} {b}: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Copy the guest-visible content of an image (its whole chain) into a standalone
/// reference file outside the data directory, for a later `compare`.
pub fn reference_copy(path: &str, name: &str) -> String {
    let dest = std::env::temp_dir().join(format!("strata-ref-{}-{name}.qcow2", std::process::id()));
    let dest = dest.display().to_string();
    let output = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "qcow2", path, &dest])
        .output()
        .expect("run qemu-img convert");
    assert!(
        output.status.success(),
        "qemu-img convert {path}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dest
}

/// Pids of the running processes named `name` whose parent is `parent`.
pub fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": the name may hold spaces, so split at the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?;
        let ppid: u32 = fields.next()?.parse().ok()?;
        (comm == name && ppid == parent && state != "Z").then_some(pid)
    })
    .collect()
}

/// Wait (up to 30 s) until `parent` runs a child named `name`; its pid.
pub async fn wait_for_child(parent: u32, name: &str) -> u32 {
    for _ in 0..3000 {
        if let Some(&pid) = children_named(parent, name).first() {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("process {parent} never started {name}");
}

/// SIGKILL a process (not the service: use `TestApp::kill` for that).
pub fn kill_process(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

/// A well-formed id that no resource has.
pub const UNKNOWN_ID: &str = "01900000-0000-7000-8000-000000000000";

/// A response with its headers, for checks `TestApp::request` cannot make.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn content_type(&self) -> &str {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Send a request with an exact body and Content-Type (or none).
pub async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Reply {
    let documented_method = method.clone();
    let mut request = app.client.request(method, format!("{}{}", app.base, path));
    if let Some(content_type) = content_type {
        request = request.header(CONTENT_TYPE, content_type);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    crate::documented::check(&documented_method, path, status, &body);
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn send_json(app: &TestApp, method: Method, path: &str, body: &Value) -> Reply {
    send(
        app,
        method,
        path,
        Some("application/json"),
        Some(body.to_string().into_bytes()),
    )
    .await
}

/// Assert an RFC 9457 problem answer with `status` and `code`.
pub fn assert_problem(reply: &Reply, status: StatusCode, code: &str) {
    let problem = &reply.body;
    assert_eq!(reply.status, status, "expected {code}: {problem}");
    let content_type = reply.content_type();
    assert!(
        content_type.starts_with("application/problem+json"),
        "content type {content_type:?} for {problem}"
    );
    assert_eq!(problem["code"], code, "{problem}");
    assert_eq!(
        problem["type"],
        format!("urn:strata:problem:{code}"),
        "{problem}"
    );
    assert_eq!(problem["status"], status.as_u16(), "{problem}");
    assert!(
        problem["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{problem}"
    );
}

/// The `id` member of a resource or job.
pub fn id(value: &Value) -> String {
    value["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {value}"))
        .to_owned()
}

/// Assert the image reads `pattern` over [offset, offset+len) bytes (`expect` takes
/// whole MiB; the upgrade fixture's regions are 64 KiB runs).
pub fn expect_bytes(path: &str, pattern: u8, offset: u64, len: u64) {
    qemu_io(path, &format!("read -P {pattern:#x} {offset} {len}"), true);
}
