//! The service under test: the real `strata` binary (the one Cargo built for this test
//! or bench run) started on an ephemeral port over a temporary data directory, killed,
//! restarted over the same directory, and the processes it runs.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    /// Sent as `Authorization: Bearer` with every request the harness makes.
    pub token: Option<String>,
    // Kept alive so the directory outlives restarts; removed when the test ends.
    _temp: Arc<tempfile::TempDir>,
    child: Option<Child>,
    log: Option<PathBuf>,
}

/// How to start the service, beyond the environment `spawn_with` takes.
#[derive(Default)]
pub struct Launch<'a> {
    /// Extra environment, over the tests' defaults (2 workers, a 1 s shutdown grace,
    /// warnings only); e.g. `STRATA_FAULT`.
    pub env: &'a [(&'a str, &'a str)],
    /// The directory to keep `data/` in (the bench keeps it beside its plain
    /// baselines, on the same file system); a new temporary one when absent.
    pub dir: Option<tempfile::TempDir>,
    /// Send the service's log to this file, at the service's own default level (as a
    /// deployed service logs), instead of warnings on the test's stderr. Its last lines
    /// are printed if the caller panics while the service runs.
    pub log: Option<PathBuf>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if std::thread::panicking() && self.log.is_some() {
            let tail = self.log_tail(40);
            eprintln!("--- last lines of the service log ---\n{tail}");
        }
        self.kill();
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// Start the service with extra environment variables (e.g. STRATA_FAULT).
    pub async fn spawn_with(env: &[(&str, &str)]) -> Self {
        Self::launch(Launch {
            env,
            ..Launch::default()
        })
        .await
    }

    /// Start the service over `dir/data`, e.g. a directory a test mounted a small
    /// file system on, and wait until it is ready.
    pub async fn spawn_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Self {
        let app = Self::launch(Launch {
            env,
            dir: Some(dir),
            log: None,
        })
        .await;
        app.wait_ready().await;
        app
    }

    /// Start the service as `launch` says.
    pub async fn launch(launch: Launch<'_>) -> Self {
        let temp = match launch.dir {
            Some(dir) => dir,
            None => tempfile::tempdir().expect("temp dir"),
        };
        Self::start(Arc::new(temp), launch.env, launch.log)
    }

    fn start(temp: Arc<tempfile::TempDir>, env: &[(&str, &str)], log: Option<PathBuf>) -> Self {
        let data_dir = temp.path().join("data");
        let mut command = Command::new(env!("CARGO_BIN_EXE_strata"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            // Settings as variables, not flags, so that `env` can override them.
            .env("STRATA_WORKERS", "2")
            .env("STRATA_SHUTDOWN_GRACE", "1")
            .env_remove("STRATA_FAULT")
            // Every view served from memory is checked against the database: a change
            // no event reports fails the test that reads it.
            .env("STRATA_VERIFY_READS", "true")
            .env_remove("STRATA_RESERVED_SPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        match &log {
            Some(file) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)
                    .expect("service log file");
                command.env_remove("STRATA_LOG").stderr(file);
            }
            None => {
                command.env("STRATA_LOG", "warn").stderr(Stdio::inherit());
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start strata");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read listen line");
        let Some(base) = line.trim().strip_prefix("strata listening on ") else {
            let _ = child.kill();
            let tail = log.as_deref().map(|l| log_tail(l, 40)).unwrap_or_default();
            panic!("unexpected first line {line:?}\n{tail}");
        };
        // Keep draining stdout so that a later print can never block the service.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Self {
            base: base.to_owned(),
            // No connection reuse: the service may close a connection after refusing a
            // body early (413), and a pooled connection would then fail the next request.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client"),
            data_dir,
            token: None,
            _temp: temp,
            child: Some(child),
            log,
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
        self.restart_unready(env);
        self.wait_ready().await;
    }

    /// `restart` without waiting for the new process to be ready: it may still be
    /// recovering (a test can kill it there).
    pub fn restart_unready(&mut self, env: &[(&str, &str)]) {
        self.kill();
        let mut next = Self::start(Arc::clone(&self._temp), env, self.log.clone());
        self.base = next.base.clone();
        self.child = next.child.take();
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

    /// The last `lines` lines of the log file `Launch::log` named (empty without one).
    pub fn log_tail(&self, lines: usize) -> String {
        self.log
            .as_deref()
            .map(|log| log_tail(log, lines))
            .unwrap_or_default()
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

fn log_tail(log: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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
