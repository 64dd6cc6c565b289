//! A seeded, model-based crash test ("torture test").
//!
//! Each cycle does a few guest writes (qemu-io straight into a stopped VM's
//! `active_path`), submits one or two random operations (snapshot create, a delete that
//! commits, streams or drops, delete-all, revert, linked and full clones from a
//! snapshot or the present state, flatten, disk create / delete / grow, VM delete,
//! template copy, conversions both ways and deploys), sometimes cancels one at a random
//! delay, and then injects a fault at a random instant: SIGKILL of the service, SIGKILL
//! of its qemu-img children, or SIGKILL again while the restarted service recovers.
//! After the restart it waits for every job to end and updates a model of what each
//! VM, disk, snapshot and template must read: a succeeded job is applied whole, a
//! cancelled or failed one not at all. Every cycle ends with these invariants:
//!
//! 1. every ready snapshot and every present state (and template disk) reads exactly
//!    the model's bytes (`read -P` per written region, zeros elsewhere);
//! 2. `qemu-img check` is clean (no corruption, no leak) on every file in volumes/;
//! 3. `qemu-img info --backing-chain` of every layer agrees with the chains the API
//!    shows (and with the snapshot tree), with relative backing names;
//! 4. the files in volumes/ are exactly those the API references (directly, or as the
//!    backing chain of such a file): no orphan, none missing;
//! 5. no job is left queued or running, and nothing is left creating, deleting,
//!    rewriting or in error;
//! 6. the event history replays to the present: read from its first event, the last
//!    event of every VM, disk, snapshot, template and job is its view as `GET`
//!    answers it now, or its deletion when `GET` finds nothing (no event for a change
//!    a crash undid, none missing for one it did not).
//!
//! A violation (or a job that ended neither whole nor absent) fails the seed with its
//! number, the cycle, every violation found, the whole operation log and the tail of
//! the service's log; the data directory is kept for inspection. Every seed runs (to its
//! first failure), and the test fails at the end if any did.
//!
//! Environment:
//! - `STRATA_TORTURE_SEED`: a seed or a comma-separated list (default: 1,2,3);
//! - `STRATA_TORTURE_CYCLES`: cycles per seed (default 20);
//! - `STRATA_TORTURE_MAX_MIB`: the largest single write, in MiB (default 48);
//! - `STRATA_TORTURE_FULL_READ=1`: read every unwritten MiB with `read -P 0`; by
//!   default zeros are read wherever `qemu-img map` says some layer of the chain holds
//!   data, and the rest (reported as zero through the whole chain) is not re-read;
//! - `STRATA_TORTURE_KEEP=0`: remove the data directory of a failed seed too;
//! - `STRATA_TORTURE_VERBOSE=1`: print every seed's operation log, failed or not.
//!
//! A seed fixes the sequence of random choices, not the instant a kill lands relative to
//! the service's own progress: rerunning a seed replays the same kind of scenario, not
//! always the same interleaving. `scripts/soak.sh` runs many seeds, cycles and MiB.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::MIB;

const DEFAULT_SEEDS: [u64; 3] = [1, 2, 3];
const DEFAULT_CYCLES: u32 = 20;
const DEFAULT_MAX_MIB: u64 = 48;
/// Most VMs and templates alive at once.
const MAX_RESOURCES: usize = 6;
const MAX_SNAPSHOTS: usize = 5;
const MAX_DISKS: usize = 3;
const MAX_DISK_MIB: u64 = 512;

#[tokio::test]
async fn random_operations_survive_kill_nine_at_any_instant() {
    let config = Config::from_env();
    let started = Instant::now();
    let mut failures = Vec::new();
    for &seed in &config.seeds {
        let outcome = run_seed(&config, seed).await;
        println!("{}", outcome.summary);
        if let Some(report) = outcome.failure {
            failures.push(report);
        }
    }
    println!(
        "torture: {} seed(s) x {} cycle(s), writes up to {} MiB, in {:.1} s",
        config.seeds.len(),
        config.cycles,
        config.max_mib,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} torture seed(s) failed\n\n{}",
        failures.len(),
        config.seeds.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------
// Configuration and randomness

struct Config {
    seeds: Vec<u64>,
    cycles: u32,
    max_mib: u64,
    full_read: bool,
    keep_failed: bool,
    verbose: bool,
}

impl Config {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let number = |name: &str, default: u64| {
            var(name).map_or(default, |v| {
                parse_u64(v.trim()).unwrap_or_else(|| panic!("{name}: not a number: {v:?}"))
            })
        };
        let seeds = var("STRATA_TORTURE_SEED").map_or_else(
            || DEFAULT_SEEDS.to_vec(),
            |list| {
                list.split(',')
                    .map(|s| {
                        parse_u64(s.trim())
                            .unwrap_or_else(|| panic!("STRATA_TORTURE_SEED: not a number: {s:?}"))
                    })
                    .collect()
            },
        );
        Self {
            seeds,
            cycles: u32::try_from(number("STRATA_TORTURE_CYCLES", DEFAULT_CYCLES.into()))
                .expect("STRATA_TORTURE_CYCLES fits in u32"),
            max_mib: number("STRATA_TORTURE_MAX_MIB", DEFAULT_MAX_MIB).max(1),
            full_read: var("STRATA_TORTURE_FULL_READ").is_some_and(|v| v != "0"),
            keep_failed: var("STRATA_TORTURE_KEEP").is_none_or(|v| v != "0"),
            verbose: var("STRATA_TORTURE_VERBOSE").is_some_and(|v| v != "0"),
        }
    }
}

pub(crate) fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// splitmix64: tiny, seedable, good enough to pick operations.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed ^ 0x6a09_e667_f3bc_c908)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (0 when n is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    pub(crate) fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// Uniform in lo..=hi.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub(crate) fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.index(items.len())].clone())
    }
}

// ---------------------------------------------------------------------------------
// The service under test (own process handling: the harness's `restart` waits for
// readiness, and this test must also kill a service that is still recovering)

struct Service {
    dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    log_path: PathBuf,
    base: String,
    client: reqwest::Client,
    child: Option<Child>,
    exit_note: Option<String>,
}

impl Service {
    fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("strata-torture-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let root = dir.path().to_path_buf();
        Ok(Self {
            data_dir: root.join("data"),
            log_path: root.join("service.log"),
            dir: Some(dir),
            base: String::new(),
            // No connection reuse (as in the harness): a pooled connection to a killed
            // process would fail the next request.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(120))
                .build()
                .map_err(|e| format!("client: {e}"))?,
            child: None,
            exit_note: None,
        })
    }

    /// Spawn the service (the harness's flags) and learn its address; does not wait
    /// for recovery to finish.
    fn start(&mut self) -> Result<(), String> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("service log: {e}"))?;
        let _ = writeln!(log, "===== torture: service start =====");
        let mut command = Command::new(env!("CARGO_BIN_EXE_strata"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--workers", "2", "--shutdown-grace-secs", "1"])
            .env("STRATA_LOG", "info,sqlx=warn,tower_http=off")
            // The whole history, for invariant 6.
            .env("STRATA_EVENT_HISTORY", "1000000")
            .env_remove("STRATA_FAULT")
            .env_remove("STRATA_RESERVED_SPACE")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = command.spawn().map_err(|e| format!("start strata: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let Some(base) = line.trim().strip_prefix("strata listening on ") else {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(format!(
                "strata did not start ({read:?}, first line {line:?}, exit {status})"
            ));
        };
        self.base = base.to_owned();
        self.child = Some(child);
        self.exit_note = None;
        Ok(())
    }

    async fn is_ready(&self) -> bool {
        self.client
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.is_ready().await {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(format!("strata exited while recovering: {status}"));
            }
            sleep_ms(20).await;
        }
        Err("strata was not ready within 120 s of its start".into())
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.start()?;
        self.wait_ready().await
    }

    /// SIGKILL (no cleanup) and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process died on its own.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        if let Ok(Some(status)) = child.try_wait() {
            let note = format!("strata exited on its own: {status}");
            self.exit_note = Some(note.clone());
            self.child = None;
            return Some(note);
        }
        None
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), String> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{}", self.base, path));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("{method} {path}: reading the body: {e}"))?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    async fn get_ok(&self, path: &str) -> Result<Value, String> {
        let (status, body) = self.call(Method::GET, path, None).await?;
        if status != StatusCode::OK {
            return Err(format!("GET {path} answered {status}: {body}"));
        }
        Ok(body)
    }

    fn volumes_dir(&self) -> PathBuf {
        self.data_dir.join("volumes")
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Keep the data directory after the test (for a failed seed).
    fn keep(&mut self) -> Option<PathBuf> {
        self.dir.take().map(tempfile::TempDir::keep)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The qemu-img processes whose parent is `parent`, with their command lines.
fn qemu_children(parent: u32) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|s| s.parse::<u32>().ok());
        // A zombie has already exited: nothing left to kill.
        if &stat[open + 1..close] == "qemu-img" && ppid == Some(parent) && state != Some("Z") {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, cmdline.trim().to_owned()));
        }
    }
    found
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) with a pid read from /proc just now; at worst it fails (ESRCH).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

// ---------------------------------------------------------------------------------
// The model

/// A disk's guest-visible bytes: the pattern byte of each MiB (0: zeros).
type Content = Vec<u8>;

#[derive(Clone, Debug)]
struct MDisk {
    id: String,
    name: String,
    content: Content,
    /// The VM or template whose files this disk's chain continues into (a linked
    /// clone or a linked deploy); `None` for a standalone disk.
    linked_to: Option<String>,
}

#[derive(Clone, Debug)]
struct MSnap {
    name: String,
    parent: Option<String>,
    /// What the snapshot froze, per disk id.
    disks: BTreeMap<String, Content>,
}

#[derive(Clone, Debug)]
struct MVm {
    name: String,
    template: bool,
    disks: Vec<MDisk>,
    snaps: BTreeMap<String, MSnap>,
    current: Option<String>,
}

#[derive(Default)]
struct Model {
    vms: BTreeMap<String, MVm>,
}

fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(6)..]
}

impl Model {
    fn vm_label(&self, id: &str) -> String {
        self.vms
            .get(id)
            .map_or_else(|| format!("vm?{}", short(id)), |v| v.name.clone())
    }

    fn snap_label(&self, vm: &str, snap: &str) -> String {
        let name = self
            .vms
            .get(vm)
            .and_then(|v| v.snaps.get(snap))
            .map_or_else(|| format!("s?{}", short(snap)), |s| s.name.clone());
        format!("{}/{name}", self.vm_label(vm))
    }

    fn disk_label(&self, vm: &str, disk: &str) -> String {
        let name = self
            .vms
            .get(vm)
            .and_then(|v| v.disks.iter().find(|d| d.id == disk))
            .map_or_else(|| format!("d?{}", short(disk)), |d| d.name.clone());
        format!("{}/{name}", self.vm_label(vm))
    }

    fn vm(&self, id: &str) -> Result<&MVm, String> {
        self.vms
            .get(id)
            .ok_or_else(|| format!("the model has no VM {id}"))
    }

    fn vm_mut(&mut self, id: &str) -> Result<&mut MVm, String> {
        self.vms
            .get_mut(id)
            .ok_or_else(|| format!("the model has no VM {id}"))
    }

    /// (disk name, content) of what a clone or copy of `src` starts from.
    fn source_contents(
        &self,
        src: &str,
        snap: Option<&str>,
    ) -> Result<Vec<(String, Content)>, String> {
        let vm = self.vm(src)?;
        Ok(match snap {
            Some(snap) => {
                let snap = vm
                    .snaps
                    .get(snap)
                    .ok_or_else(|| format!("the model has no snapshot {snap}"))?;
                vm.disks
                    .iter()
                    .filter_map(|d| snap.disks.get(&d.id).map(|c| (d.name.clone(), c.clone())))
                    .collect()
            }
            None => vm
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.content.clone()))
                .collect(),
        })
    }
}

/// Regions of equal bytes: (pattern, offset MiB, length MiB).
fn runs(content: &[u8]) -> Vec<(u8, u64, u64)> {
    let mut out: Vec<(u8, u64, u64)> = Vec::new();
    for (i, &byte) in content.iter().enumerate() {
        match out.last_mut() {
            Some((pattern, offset, len)) if *pattern == byte && *offset + *len == i as u64 => {
                *len += 1;
            }
            _ => out.push((byte, i as u64, 1)),
        }
    }
    out
}

fn describe_content(content: &[u8]) -> String {
    let parts: Vec<String> = runs(content)
        .iter()
        .filter(|r| r.0 != 0)
        .map(|(p, o, l)| format!("{p:#04x}@{o}+{l}"))
        .collect();
    format!("{} MiB [{}]", content.len(), parts.join(" "))
}

// ---------------------------------------------------------------------------------
// Operations

#[derive(Clone, Debug)]
enum Op {
    CreateVm {
        name: String,
        disks: Vec<(String, u64)>,
    },
    Snapshot {
        vm: String,
        name: String,
    },
    DeleteSnapshot {
        vm: String,
        snap: String,
        flatten: bool,
    },
    DeleteAll {
        vm: String,
    },
    Revert {
        vm: String,
        snap: String,
    },
    Clone {
        src: String,
        snap: Option<String>,
        linked: bool,
        name: String,
    },
    Flatten {
        vm: String,
        disk: String,
    },
    CreateDisk {
        vm: String,
        name: String,
        mib: u64,
    },
    DeleteDisk {
        vm: String,
        disk: String,
    },
    Resize {
        vm: String,
        disk: String,
        mib: u64,
    },
    DeleteVm {
        vm: String,
        flatten: bool,
    },
    TemplateCreate {
        src: String,
        snap: Option<String>,
        name: String,
    },
    ToTemplate {
        vm: String,
    },
    ToVm {
        template: String,
    },
    Deploy {
        template: String,
        linked: bool,
        name: String,
        count: u32,
    },
    DeleteTemplate {
        template: String,
    },
}

fn mode(linked: bool) -> &'static str {
    if linked { "linked" } else { "full" }
}

fn flatten_query(flatten: bool) -> &'static str {
    if flatten {
        "?flatten_dependents=true"
    } else {
        ""
    }
}

impl Op {
    fn request(&self) -> (Method, String, Option<Value>) {
        let post = |path: String, body: Value| (Method::POST, path, Some(body));
        match self {
            Op::CreateVm { name, disks } => {
                let disks: Vec<Value> = disks
                    .iter()
                    .map(|(n, mib)| json!({"name": n, "size_bytes": mib * MIB}))
                    .collect();
                post("/v1/vms".into(), json!({"name": name, "disks": disks}))
            }
            Op::Snapshot { vm, name } => {
                post(format!("/v1/vms/{vm}/snapshots"), json!({ "name": name }))
            }
            Op::DeleteSnapshot { snap, flatten, .. } => (
                Method::DELETE,
                format!("/v1/snapshots/{snap}{}", flatten_query(*flatten)),
                None,
            ),
            Op::DeleteAll { vm } => (Method::DELETE, format!("/v1/vms/{vm}/snapshots"), None),
            Op::Revert { snap, .. } => post(format!("/v1/snapshots/{snap}/revert"), json!({})),
            Op::Clone {
                src,
                snap,
                linked,
                name,
            } => {
                let mut body = json!({"name": name, "mode": mode(*linked)});
                if let Some(snap) = snap {
                    body["snapshot_id"] = json!(snap);
                }
                post(format!("/v1/vms/{src}/clone"), body)
            }
            Op::Flatten { vm, disk } => {
                post(format!("/v1/vms/{vm}/disks/{disk}/flatten"), json!({}))
            }
            Op::CreateDisk { vm, name, mib } => post(
                format!("/v1/vms/{vm}/disks"),
                json!({"name": name, "size_bytes": mib * MIB}),
            ),
            Op::DeleteDisk { vm, disk } => {
                (Method::DELETE, format!("/v1/vms/{vm}/disks/{disk}"), None)
            }
            Op::Resize { vm, disk, mib } => post(
                format!("/v1/vms/{vm}/disks/{disk}/resize"),
                json!({ "size_bytes": mib * MIB }),
            ),
            Op::DeleteVm { vm, flatten } => (
                Method::DELETE,
                format!("/v1/vms/{vm}{}", flatten_query(*flatten)),
                None,
            ),
            Op::TemplateCreate { src, snap, name } => {
                let mut body = json!({"name": name, "from_vm_id": src});
                if let Some(snap) = snap {
                    body["snapshot_id"] = json!(snap);
                }
                post("/v1/templates".into(), body)
            }
            Op::ToTemplate { vm } => post(format!("/v1/vms/{vm}/convert-to-template"), json!({})),
            Op::ToVm { template } => {
                post(format!("/v1/templates/{template}/convert-to-vm"), json!({}))
            }
            Op::Deploy {
                template,
                linked,
                name,
                count,
            } => post(
                format!("/v1/templates/{template}/deploy"),
                json!({"name": name, "mode": mode(*linked), "count": count}),
            ),
            Op::DeleteTemplate { template } => {
                (Method::DELETE, format!("/v1/templates/{template}"), None)
            }
        }
    }

    fn describe(&self, m: &Model) -> String {
        let from = |src: &str, snap: &Option<String>| match snap {
            Some(s) => format!("snapshot {}", m.snap_label(src, s)),
            None => format!("the present of {}", m.vm_label(src)),
        };
        match self {
            Op::CreateVm { name, disks } => {
                let disks: Vec<String> =
                    disks.iter().map(|(n, s)| format!("{n} {s} MiB")).collect();
                format!("create VM {name} [{}]", disks.join(", "))
            }
            Op::Snapshot { vm, name } => format!("snapshot {} as {name}", m.vm_label(vm)),
            Op::DeleteSnapshot { vm, snap, flatten } => {
                let info = m
                    .vm(vm)
                    .ok()
                    .and_then(|v| v.snaps.get(snap).map(|s| (v, s)));
                let context = info.map_or_else(String::new, |(v, s)| {
                    let children = v
                        .snaps
                        .values()
                        .filter(|c| c.parent.as_deref() == Some(snap))
                        .count();
                    format!(
                        " (parent {}, {children} child snapshot(s){})",
                        s.parent
                            .as_deref()
                            .map_or("none".into(), |p| m.snap_label(vm, p)),
                        if v.current.as_deref() == Some(snap) {
                            ", current"
                        } else {
                            ""
                        }
                    )
                });
                format!(
                    "delete snapshot {}{context}{}",
                    m.snap_label(vm, snap),
                    if *flatten { " flatten_dependents" } else { "" }
                )
            }
            Op::DeleteAll { vm } => format!("delete all snapshots of {}", m.vm_label(vm)),
            Op::Revert { vm, snap } => format!("revert to {}", m.snap_label(vm, snap)),
            Op::Clone {
                src,
                snap,
                linked,
                name,
            } => format!("{} clone {name} of {}", mode(*linked), from(src, snap)),
            Op::Flatten { vm, disk } => format!("flatten {}", m.disk_label(vm, disk)),
            Op::CreateDisk { vm, name, mib } => {
                format!("add disk {}/{name} {mib} MiB", m.vm_label(vm))
            }
            Op::DeleteDisk { vm, disk } => format!("delete disk {}", m.disk_label(vm, disk)),
            Op::Resize { vm, disk, mib } => {
                format!("grow disk {} to {mib} MiB", m.disk_label(vm, disk))
            }
            Op::DeleteVm { vm, flatten } => format!(
                "delete VM {}{}",
                m.vm_label(vm),
                if *flatten { " flatten_dependents" } else { "" }
            ),
            Op::TemplateCreate { src, snap, name } => {
                format!("copy template {name} from {}", from(src, snap))
            }
            Op::ToTemplate { vm } => format!("convert VM {} to a template", m.vm_label(vm)),
            Op::ToVm { template } => {
                format!("convert template {} to a VM", m.vm_label(template))
            }
            Op::Deploy {
                template,
                linked,
                name,
                count,
            } => format!(
                "deploy {count} {} VM(s) {name}-N from template {}",
                mode(*linked),
                m.vm_label(template)
            ),
            Op::DeleteTemplate { template } => {
                format!("delete template {}", m.vm_label(template))
            }
        }
    }
}

/// The kinds of operation `pick_op` chooses among.
#[derive(Clone, Copy)]
enum Kind {
    CreateVm,
    Snapshot,
    DeleteSnapshot,
    DeleteAll,
    Revert,
    LinkedClone,
    FullClone,
    Flatten,
    AddDisk,
    DeleteDisk,
    Grow,
    DeleteVm,
    CopyTemplate,
    ToTemplate,
    ToVm,
    Deploy,
    DeleteTemplate,
}

struct Pending {
    op: Op,
    desc: String,
    job: String,
    kind: String,
    accepted: Value,
    cancel_requested: bool,
}

#[derive(Default)]
struct Stats {
    cycles: u32,
    writes: u32,
    written_mib: u64,
    accepted: u32,
    succeeded: BTreeMap<String, u32>,
    failed: BTreeMap<String, u32>,
    cancelled: u32,
    refused: BTreeMap<String, u32>,
    merges: BTreeMap<String, u32>,
    faults: BTreeMap<&'static str, u32>,
    qemu_killed: BTreeMap<String, u32>,
}

fn bump<K: Ord>(map: &mut BTreeMap<K, u32>, key: K) {
    *map.entry(key).or_default() += 1;
}

fn counts<K: std::fmt::Display>(map: &BTreeMap<K, u32>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_terminal(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// "commit,stream" from a job's detail.merges.
fn merge_actions(job: &Value) -> Vec<String> {
    job["detail"]["merges"]
        .as_array()
        .map(|merges| {
            merges
                .iter()
                .filter_map(|m| m["action"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// One seed

struct SeedOutcome {
    summary: String,
    failure: Option<String>,
}

async fn run_seed(config: &Config, seed: u64) -> SeedOutcome {
    let started = Instant::now();
    let mut runner = match Service::new() {
        Ok(svc) => Runner {
            rng: Rng::new(seed),
            svc,
            model: Model::default(),
            log: Vec::new(),
            cycle: 0,
            stats: Stats::default(),
            names: 0,
            pattern: 0,
            full_read: config.full_read,
            max_mib: config.max_mib,
        },
        Err(e) => {
            return SeedOutcome {
                summary: format!("torture seed {seed}: could not start: {e}"),
                failure: Some(e),
            };
        }
    };
    let result = runner.run(config.cycles).await;
    if config.verbose {
        println!(
            "----- operation log (seed {seed}) -----\n{}",
            runner.log.join("\n")
        );
    }
    let s = &runner.stats;
    let summary = format!(
        "torture seed {seed}: {} of {} cycles in {:.1} s{}\n  writes {} ({} MiB); jobs accepted {}: succeeded [{}], failed [{}], cancelled {}; refused [{}]\n  merges [{}]; faults [{}]; qemu-img killed [{}]",
        s.cycles,
        config.cycles,
        started.elapsed().as_secs_f64(),
        if result.is_ok() {
            ", all invariants held"
        } else {
            ", FAILED"
        },
        s.writes,
        s.written_mib,
        s.accepted,
        counts(&s.succeeded),
        counts(&s.failed),
        s.cancelled,
        counts(&s.refused),
        counts(&s.merges),
        counts(&s.faults),
        counts(&s.qemu_killed),
    );
    let failure = result.err().map(|error| {
        let exit = runner.svc.exited().or(runner.svc.exit_note.clone());
        let tail = runner.svc.log_tail(80);
        runner.svc.kill();
        let kept = if config.keep_failed {
            runner.svc.keep().map_or_else(
                || "(not kept)".into(),
                |p| format!("kept at {}", p.display()),
            )
        } else {
            "(removed)".into()
        };
        format!(
            "===== TORTURE FAILURE: seed {seed}, cycle {} =====\n{error}{}\n----- operation log (seed {seed}) -----\n{}\n----- service log (last 80 lines) -----\n{tail}\n----- data directory {kept}\n----- rerun: STRATA_TORTURE_SEED={seed} STRATA_TORTURE_CYCLES={} STRATA_TORTURE_MAX_MIB={} cargo test --test api torture -- --nocapture",
            runner.cycle,
            exit.map_or_else(String::new, |e| format!("\n({e})")),
            runner.log.join("\n"),
            config.cycles,
            config.max_mib,
        )
    });
    SeedOutcome { summary, failure }
}

struct Runner {
    rng: Rng,
    svc: Service,
    model: Model,
    log: Vec<String>,
    cycle: u32,
    stats: Stats,
    names: u32,
    pattern: u8,
    full_read: bool,
    max_mib: u64,
}

impl Runner {
    fn note(&mut self, line: impl AsRef<str>) {
        self.log.push(format!("c{}: {}", self.cycle, line.as_ref()));
    }

    fn name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    /// A distinct non-zero byte for each write (wrapping after 255).
    fn next_pattern(&mut self) -> u8 {
        self.pattern = if self.pattern == 255 {
            1
        } else {
            self.pattern + 1
        };
        self.pattern
    }

    async fn run(&mut self, cycles: u32) -> Result<(), String> {
        self.svc.start()?;
        self.svc.wait_ready().await?;
        for cycle in 1..=cycles {
            self.cycle = cycle;
            self.one_cycle().await?;
            self.stats.cycles = cycle;
        }
        Ok(())
    }

    async fn one_cycle(&mut self) -> Result<(), String> {
        self.guest_writes().await?;
        let mut pending = Vec::new();
        let ops = if self.rng.chance(30) { 2 } else { 1 };
        for _ in 0..ops {
            let op = self.pick_op();
            if let Some(p) = self.submit(op).await? {
                pending.push(p);
            }
        }
        self.maybe_cancel(&mut pending).await?;
        self.inject_fault(&pending).await?;
        if !self.svc.running() {
            self.svc.start()?;
            self.svc.wait_ready().await?;
        }
        let ended = self.wait_jobs(&pending).await?;
        let mut problems = Vec::new();
        for (p, job) in pending.iter().zip(&ended) {
            if let Err(e) = self.settle(p, job).await {
                problems.push(e);
            }
        }
        let checked = self.check().await;
        match (problems.is_empty(), checked) {
            (true, Ok(())) => Ok(()),
            (_, checked) => {
                if let Err(e) = checked {
                    problems.push(e);
                }
                Err(problems.join("\n"))
            }
        }
    }

    // ----- guest writes

    async fn guest_writes(&mut self) -> Result<(), String> {
        if !self.rng.chance(70) {
            return Ok(());
        }
        for _ in 0..self.rng.range(1, 3) {
            let targets: Vec<(String, usize)> = self
                .model
                .vms
                .iter()
                .filter(|(_, v)| !v.template)
                .flat_map(|(id, v)| (0..v.disks.len()).map(move |i| (id.clone(), i)))
                .collect();
            let Some((vm, index)) = self.rng.pick(&targets) else {
                return Ok(());
            };
            let disk = self.model.vms[&vm].disks[index].clone();
            let size = disk.content.len() as u64;
            let len = if self.rng.chance(40) {
                self.rng.range(1, size.min(4))
            } else {
                self.rng.range(1, size.min(self.max_mib))
            };
            let offset = self.rng.below(size - len + 1);
            let pattern = self.next_pattern();
            let path = self.active_path(&vm, &disk.id).await?;
            let label = self.model.disk_label(&vm, &disk.id);
            qemu_io_write(&path, pattern, offset, len)
                .map_err(|e| format!("guest write to {label}: {e}"))?;
            let content = &mut self
                .model
                .vm_mut(&vm)?
                .disks
                .iter_mut()
                .find(|d| d.id == disk.id)
                .expect("disk picked from the model")
                .content;
            content[offset as usize..(offset + len) as usize].fill(pattern);
            self.stats.writes += 1;
            self.stats.written_mib += len;
            self.note(format!(
                "guest write {pattern:#04x} to {label} at {offset}M+{len}M"
            ));
        }
        Ok(())
    }

    async fn active_path(&self, vm: &str, disk: &str) -> Result<String, String> {
        let view = self.svc.get_ok(&format!("/v1/vms/{vm}")).await?;
        view["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["id"] == disk)
            .and_then(|d| d["active_path"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("VM {vm} shows no active_path for disk {disk}: {view}"))
    }

    // ----- choosing operations

    fn pick_vm(&mut self, wanted: impl Fn(&MVm) -> bool) -> Option<String> {
        let ids: Vec<String> = self
            .model
            .vms
            .iter()
            .filter(|(_, v)| wanted(v))
            .map(|(id, _)| id.clone())
            .collect();
        self.rng.pick(&ids)
    }

    fn pick_snap(&mut self, vm: &str) -> Option<String> {
        let ids: Vec<String> = self.model.vms.get(vm)?.snaps.keys().cloned().collect();
        self.rng.pick(&ids)
    }

    fn pick_disk(&mut self, vm: &str, wanted: impl Fn(&MDisk) -> bool) -> Option<MDisk> {
        let disks: Vec<MDisk> = self
            .model
            .vms
            .get(vm)?
            .disks
            .iter()
            .filter(|d| wanted(d))
            .cloned()
            .collect();
        self.rng.pick(&disks)
    }

    fn new_vm_op(&mut self) -> Op {
        let name = self.name("vm");
        let disks = (0..self.rng.range(1, 2))
            .map(|_| (self.name("d"), self.rng.range(64, 384)))
            .collect();
        Op::CreateVm { name, disks }
    }

    /// A random operation the model suggests could be accepted (the service may still
    /// refuse it: that is logged and is fine).
    fn pick_op(&mut self) -> Op {
        let plain = self.model.vms.values().filter(|v| !v.template).count();
        if plain == 0 {
            return self.new_vm_op();
        }
        let vms = |v: &MVm| !v.template;
        let with_disks = |v: &MVm| !v.template && !v.disks.is_empty();
        let with_snaps = |v: &MVm| !v.template && !v.snaps.is_empty();
        let m = &self.model;
        let any = |f: &dyn Fn(&MVm) -> bool| m.vms.values().any(f);
        let templates = m.vms.len() - plain;
        let room = m.vms.len() < MAX_RESOURCES;
        let weight = |ok: bool, w: u64| if ok { w } else { 0 };
        use Kind::*;
        let choices = [
            (weight(room, 2), CreateVm),
            (
                weight(any(&|v| with_disks(v) && v.snaps.len() < MAX_SNAPSHOTS), 5),
                Snapshot,
            ),
            (weight(any(&with_snaps), 6), DeleteSnapshot),
            (weight(any(&with_snaps), 1), DeleteAll),
            (weight(any(&with_snaps), 4), Revert),
            (weight(room && any(&with_disks), 2), LinkedClone),
            (weight(room && any(&with_disks), 2), FullClone),
            (
                weight(
                    any(&|v| vms(v) && v.disks.iter().any(|d| d.linked_to.is_some())),
                    2,
                ),
                Flatten,
            ),
            (
                weight(any(&|v| vms(v) && v.disks.len() < MAX_DISKS), 1),
                AddDisk,
            ),
            (
                weight(any(&|v| vms(v) && v.disks.len() >= 2), 1),
                DeleteDisk,
            ),
            (weight(any(&with_disks), 1), Grow),
            (weight(plain >= 2 || !room, 2), DeleteVm),
            (weight(room && any(&with_disks), 2), CopyTemplate),
            (weight(plain >= 2 && any(&with_disks), 1), ToTemplate),
            (weight(templates > 0, 1), ToVm),
            (weight(templates > 0 && room, 2), Deploy),
            (weight(templates > 0, 1), DeleteTemplate),
        ];
        let total: u64 = choices.iter().map(|c| c.0).sum();
        let mut roll = self.rng.below(total);
        let mut kind = CreateVm;
        for (w, k) in choices {
            if roll < w {
                kind = k;
                break;
            }
            roll -= w;
        }
        self.build_op(kind).unwrap_or_else(|| self.new_vm_op())
    }

    fn build_op(&mut self, kind: Kind) -> Option<Op> {
        let with_disks = |v: &MVm| !v.template && !v.disks.is_empty();
        let with_snaps = |v: &MVm| !v.template && !v.snaps.is_empty();
        Some(match kind {
            Kind::CreateVm => self.new_vm_op(),
            Kind::Snapshot => {
                let vm = self.pick_vm(|v| with_disks(v) && v.snaps.len() < MAX_SNAPSHOTS)?;
                Op::Snapshot {
                    vm,
                    name: self.name("s"),
                }
            }
            Kind::DeleteSnapshot => {
                let vm = self.pick_vm(with_snaps)?;
                let snap = self.pick_snap(&vm)?;
                Op::DeleteSnapshot {
                    vm,
                    snap,
                    flatten: self.rng.chance(30),
                }
            }
            Kind::DeleteAll => Op::DeleteAll {
                vm: self.pick_vm(with_snaps)?,
            },
            Kind::Revert => {
                let vm = self.pick_vm(with_snaps)?;
                let snap = self.pick_snap(&vm)?;
                Op::Revert { vm, snap }
            }
            Kind::LinkedClone | Kind::FullClone => {
                let src = self.pick_vm(with_disks)?;
                let snap = if self.rng.chance(50) {
                    self.pick_snap(&src)
                } else {
                    None
                };
                Op::Clone {
                    src,
                    snap,
                    linked: matches!(kind, Kind::LinkedClone),
                    name: self.name("vm"),
                }
            }
            Kind::Flatten => {
                let vm =
                    self.pick_vm(|v| !v.template && v.disks.iter().any(|d| d.linked_to.is_some()))?;
                let disk = self.pick_disk(&vm, |d| d.linked_to.is_some())?;
                Op::Flatten { vm, disk: disk.id }
            }
            Kind::AddDisk => Op::CreateDisk {
                vm: self.pick_vm(|v| !v.template && v.disks.len() < MAX_DISKS)?,
                name: self.name("d"),
                mib: self.rng.range(64, 256),
            },
            Kind::DeleteDisk => {
                let vm = self.pick_vm(|v| !v.template && v.disks.len() >= 2)?;
                let disk = self.pick_disk(&vm, |_| true)?;
                Op::DeleteDisk { vm, disk: disk.id }
            }
            Kind::Grow => {
                let vm = self.pick_vm(with_disks)?;
                let disk = self.pick_disk(&vm, |d| (d.content.len() as u64) < MAX_DISK_MIB)?;
                let mib = (disk.content.len() as u64 + self.rng.range(16, 128)).min(MAX_DISK_MIB);
                Op::Resize {
                    vm,
                    disk: disk.id,
                    mib,
                }
            }
            Kind::DeleteVm => Op::DeleteVm {
                vm: self.pick_vm(|v| !v.template)?,
                flatten: self.rng.chance(50),
            },
            Kind::CopyTemplate => {
                let src = self.pick_vm(with_disks)?;
                let snap = if self.rng.chance(30) {
                    self.pick_snap(&src)
                } else {
                    None
                };
                Op::TemplateCreate {
                    src,
                    snap,
                    name: self.name("tpl"),
                }
            }
            Kind::ToTemplate => Op::ToTemplate {
                vm: self.pick_vm(with_disks)?,
            },
            Kind::ToVm => Op::ToVm {
                template: self.pick_vm(|v| v.template)?,
            },
            Kind::Deploy => {
                let room = MAX_RESOURCES.saturating_sub(self.model.vms.len()).max(1) as u64;
                Op::Deploy {
                    template: self.pick_vm(|v| v.template)?,
                    linked: self.rng.chance(60),
                    name: self.name("dep"),
                    count: self.rng.range(1, room.min(2)) as u32,
                }
            }
            Kind::DeleteTemplate => Op::DeleteTemplate {
                template: self.pick_vm(|v| v.template)?,
            },
        })
    }

    // ----- submitting, cancelling, faults

    async fn submit(&mut self, op: Op) -> Result<Option<Pending>, String> {
        let desc = op.describe(&self.model);
        let (method, path, body) = op.request();
        let (status, answer) = self.svc.call(method, &path, body.as_ref()).await?;
        if status == StatusCode::ACCEPTED {
            let job = answer["id"]
                .as_str()
                .ok_or_else(|| format!("{desc}: 202 without a job id: {answer}"))?
                .to_owned();
            let kind = answer["kind"].as_str().unwrap_or("?").to_owned();
            self.stats.accepted += 1;
            self.note(format!("{desc} -> 202 {kind} job {}", short(&job)));
            return Ok(Some(Pending {
                op,
                desc,
                job,
                kind,
                accepted: answer,
                cancel_requested: false,
            }));
        }
        if status.is_client_error() || status == StatusCode::INSUFFICIENT_STORAGE {
            let code = answer["code"].as_str().unwrap_or("?").to_owned();
            self.note(format!("{desc} -> refused {} {code}", status.as_u16()));
            bump(&mut self.stats.refused, code);
            return Ok(None);
        }
        Err(format!(
            "{desc}: {} {path} answered {status}: {answer}",
            op.request().0
        ))
    }

    async fn maybe_cancel(&mut self, pending: &mut [Pending]) -> Result<(), String> {
        for p in pending.iter_mut() {
            if !self.rng.chance(15) {
                continue;
            }
            let delay = self.rng.below(200);
            sleep_ms(delay).await;
            let (status, answer) = self
                .svc
                .call(
                    Method::POST,
                    &format!("/v1/jobs/{}/cancel", p.job),
                    Some(&json!({})),
                )
                .await?;
            let what = match status {
                StatusCode::ACCEPTED => {
                    p.cancel_requested = true;
                    format!("accepted ({})", answer["status"].as_str().unwrap_or("?"))
                }
                StatusCode::CONFLICT => {
                    format!("refused {}", answer["code"].as_str().unwrap_or("?"))
                }
                other => {
                    return Err(format!(
                        "cancel of job {} answered {other}: {answer}",
                        p.job
                    ));
                }
            };
            let line = format!("cancel job {} after {delay} ms: {what}", short(&p.job));
            self.note(line);
        }
        Ok(())
    }

    /// "snapshot_delete running 40%" for each pending job (best effort).
    async fn job_states(&self, pending: &[Pending]) -> String {
        let mut states = Vec::new();
        for p in pending {
            let state = match self
                .svc
                .call(Method::GET, &format!("/v1/jobs/{}", p.job), None)
                .await
            {
                Ok((_, job)) => format!(
                    "{} {} {}%{}",
                    p.kind,
                    job["status"].as_str().unwrap_or("?"),
                    job["progress"],
                    match merge_actions(&job) {
                        actions if actions.is_empty() => String::new(),
                        actions => format!(" {}", actions.join(",")),
                    }
                ),
                Err(e) => format!("{} ? ({e})", p.kind),
            };
            states.push(state);
        }
        states.join("; ")
    }

    fn qemu_now(&self) -> String {
        let vols = self.svc.volumes_dir().display().to_string();
        let kids: Vec<String> = self
            .svc
            .pid()
            .map(qemu_children)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, cmd)| shorten(&cmd, &vols))
            .collect();
        if kids.is_empty() {
            "none".into()
        } else {
            kids.join(" | ")
        }
    }

    async fn kill_service(&mut self, why: &str, pending: &[Pending], look: bool) {
        let states = if look {
            self.job_states(pending).await
        } else {
            "-".into()
        };
        let qemu = self.qemu_now();
        self.svc.kill();
        self.note(format!(
            "FAULT {why}: SIGKILL strata (jobs: {states}; qemu-img: {qemu})"
        ));
    }

    async fn inject_fault(&mut self, pending: &[Pending]) -> Result<(), String> {
        let roll = if pending.is_empty() {
            if self.rng.chance(20) { 20 } else { 0 }
        } else {
            self.rng.below(100)
        };
        match roll {
            0..12 => {}
            12..35 => {
                let delay = self.delay(400);
                sleep_ms(delay).await;
                bump(&mut self.stats.faults, "kill");
                self.kill_service(&format!("{delay} ms in"), pending, true)
                    .await;
            }
            35..50 => self.kill_during_copy(pending).await,
            50..62 => self.kill_at_progress(pending).await,
            62..76 => self.kill_qemu(pending).await?,
            76..88 => {
                let delay = self.delay(300);
                sleep_ms(delay).await;
                bump(&mut self.stats.faults, "kill during recovery");
                self.kill_service(&format!("{delay} ms in"), pending, true)
                    .await;
                self.svc.start()?;
                let again = self.rng.below(150);
                sleep_ms(again).await;
                let ready = self.svc.is_ready().await;
                let why = format!("again {again} ms after the restart (ready: {ready})");
                self.kill_service(&why, pending, false).await;
            }
            _ => {
                let delay = self.delay(300);
                sleep_ms(delay).await;
                bump(&mut self.stats.faults, "kill recovered jobs");
                self.kill_service(&format!("{delay} ms in"), pending, true)
                    .await;
                self.svc.restart().await?;
                let again = self.rng.below(300);
                sleep_ms(again).await;
                let why = format!("again {again} ms after recovery finished");
                self.kill_service(&why, pending, true).await;
            }
        }
        Ok(())
    }

    /// A random delay in 0..max ms, half the time in its first eighth (most jobs of
    /// this test are over within tens of milliseconds).
    fn delay(&mut self, max: u64) -> u64 {
        if self.rng.chance(50) {
            self.rng.below(max / 8)
        } else {
            self.rng.below(max)
        }
    }

    /// Kill the service a few milliseconds after a data-copying qemu-img child
    /// (commit, rebase, convert) shows up, i.e. in the middle of a merge or a copy.
    async fn kill_during_copy(&mut self, pending: &[Pending]) {
        let Some(pid) = self.svc.pid() else {
            return;
        };
        bump(&mut self.stats.faults, "kill during copy");
        let delay = self.rng.below(30);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut polls = 0u32;
        loop {
            let copying = qemu_children(pid).iter().any(|(_, cmd)| {
                let verb = cmd.split_whitespace().nth(1).unwrap_or_default();
                matches!(verb, "commit" | "rebase" | "convert") && !cmd.contains(" -u ")
            });
            if copying {
                sleep_ms(delay).await;
                self.kill_service(&format!("{delay} ms into a copy"), pending, false)
                    .await;
                return;
            }
            polls += 1;
            if polls.is_multiple_of(50) {
                let states = self.job_states(pending).await;
                if !states.contains("queued") && !states.contains("running") {
                    self.note(format!("no fault: no copy ran ({states})"));
                    return;
                }
            }
            if Instant::now() > deadline {
                self.kill_service("3 s without a copy", pending, true).await;
                return;
            }
            sleep_ms(1).await;
        }
    }

    /// Kill once a job reports at least a random progress.
    async fn kill_at_progress(&mut self, pending: &[Pending]) {
        let threshold = self.rng.range(1, 90);
        let deadline = Instant::now() + Duration::from_secs(5);
        bump(&mut self.stats.faults, "kill at progress");
        loop {
            let mut open = false;
            let mut hit = None;
            for p in pending {
                let Ok((_, job)) = self
                    .svc
                    .call(Method::GET, &format!("/v1/jobs/{}", p.job), None)
                    .await
                else {
                    continue;
                };
                if !is_terminal(&job) {
                    open = true;
                    let progress = job["progress"].as_u64().unwrap_or(0);
                    if job["status"] == "running" && progress >= threshold {
                        hit = Some(format!("{} at {progress}%", p.kind));
                    }
                }
            }
            if let Some(hit) = hit {
                let why = format!("{hit} (threshold {threshold}%)");
                self.kill_service(&why, pending, false).await;
                return;
            }
            if !open {
                self.note(format!(
                    "no fault: every job ended before reaching {threshold}%"
                ));
                return;
            }
            if Instant::now() > deadline {
                self.kill_service("5 s without reaching the threshold", pending, true)
                    .await;
                return;
            }
            sleep_ms(3).await;
        }
    }

    /// SIGKILL the qemu-img children once one shows up (after a random delay), and
    /// sometimes the service soon after.
    async fn kill_qemu(&mut self, pending: &[Pending]) -> Result<(), String> {
        let Some(pid) = self.svc.pid() else {
            return Ok(());
        };
        bump(&mut self.stats.faults, "kill qemu-img");
        let delay = self.rng.below(80);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut polls = 0u32;
        let vols = self.svc.volumes_dir().display().to_string();
        loop {
            if !qemu_children(pid).is_empty() {
                sleep_ms(delay).await;
                let kids = qemu_children(pid);
                for (child, _) in &kids {
                    sigkill(*child);
                }
                let cmds: Vec<String> = kids.iter().map(|(_, c)| shorten(c, &vols)).collect();
                for (_, cmd) in &kids {
                    let verb = cmd.split_whitespace().nth(1).unwrap_or("?").to_owned();
                    bump(&mut self.stats.qemu_killed, verb);
                }
                self.note(format!(
                    "FAULT SIGKILL qemu-img {delay} ms after one appeared: {}",
                    if cmds.is_empty() {
                        "(it had already exited)".into()
                    } else {
                        cmds.join(" | ")
                    }
                ));
                break;
            }
            polls += 1;
            if polls.is_multiple_of(50) {
                let states = self.job_states(pending).await;
                if !states.contains("queued") && !states.contains("running") {
                    self.note(format!("no fault: no qemu-img appeared ({states})"));
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.note("no fault: no qemu-img appeared within 3 s");
                return Ok(());
            }
            sleep_ms(1).await;
        }
        if self.rng.chance(30) {
            let after = self.rng.below(100);
            sleep_ms(after).await;
            self.kill_service(
                &format!("{after} ms after the qemu-img kill"),
                pending,
                true,
            )
            .await;
        }
        Ok(())
    }

    async fn wait_jobs(&mut self, pending: &[Pending]) -> Result<Vec<Value>, String> {
        let mut ended = Vec::new();
        for p in pending {
            let mut last = Value::Null;
            for _ in 0..10 {
                let (status, job) = self
                    .svc
                    .call(Method::GET, &format!("/v1/jobs/{}?wait=30", p.job), None)
                    .await?;
                if status == StatusCode::NOT_FOUND {
                    return Err(format!(
                        "[5 jobs] accepted job {} ({}) vanished after the restart",
                        p.job, p.desc
                    ));
                }
                if status != StatusCode::OK {
                    return Err(format!("GET job {} answered {status}: {job}", p.job));
                }
                last = job;
                if is_terminal(&last) {
                    break;
                }
            }
            if !is_terminal(&last) {
                return Err(format!(
                    "[5 jobs] job {} ({}) did not end within 300 s: {last}",
                    p.job, p.desc
                ));
            }
            ended.push(last);
        }
        Ok(ended)
    }

    // ----- outcomes

    async fn settle(&mut self, p: &Pending, job: &Value) -> Result<(), String> {
        let status = job["status"].as_str().unwrap_or("?").to_owned();
        let actions = merge_actions(job);
        let error = if job["error"].is_null() {
            String::new()
        } else {
            format!(
                " error {}: {}",
                job["error"]["code"].as_str().unwrap_or("?"),
                job["error"]["message"].as_str().unwrap_or("")
            )
        };
        self.note(format!(
            "job {} {} ended {status}{}{error}",
            short(&p.job),
            p.kind,
            if actions.is_empty() {
                String::new()
            } else {
                format!(" merges [{}]", actions.join(","))
            }
        ));
        match status.as_str() {
            "succeeded" => {
                bump(&mut self.stats.succeeded, p.kind.clone());
                for action in actions {
                    bump(&mut self.stats.merges, action);
                }
                self.apply(p, job).await.map_err(|e| {
                    format!("[model] applying succeeded job {} ({}): {e}", p.job, p.desc)
                })
            }
            "cancelled" => {
                self.stats.cancelled += 1;
                if p.cancel_requested {
                    Ok(())
                } else {
                    Err(format!(
                        "[5 jobs] job {} ({}) ended cancelled though no cancel was asked: {job}",
                        p.job, p.desc
                    ))
                }
            }
            _ => {
                let code = job["error"]["code"].as_str().unwrap_or("?");
                bump(&mut self.stats.failed, format!("{}:{code}", p.kind));
                Ok(())
            }
        }
    }

    /// Disks of a new VM or template as the API shows them, with the content the
    /// model expects (matched by disk name).
    fn new_disks(
        view: &Value,
        expected: Vec<(String, Content)>,
        linked_to: Option<&str>,
    ) -> Result<Vec<MDisk>, String> {
        let api: Vec<(String, String)> = view["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                (
                    d["id"].as_str().unwrap_or_default().to_owned(),
                    d["name"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let mut want: BTreeMap<String, Content> = expected.into_iter().collect();
        let mut disks = Vec::new();
        for (id, name) in &api {
            let content = want.remove(name).ok_or_else(|| {
                format!("the API shows a disk {name} the model did not expect: {view}")
            })?;
            disks.push(MDisk {
                id: id.clone(),
                name: name.clone(),
                content,
                linked_to: linked_to.map(str::to_owned),
            });
        }
        if !want.is_empty() {
            return Err(format!(
                "disks {:?} are missing from the new VM: {view}",
                want.keys().collect::<Vec<_>>()
            ));
        }
        Ok(disks)
    }

    async fn apply(&mut self, p: &Pending, job: &Value) -> Result<(), String> {
        let target = job["target"]["id"].as_str().unwrap_or_default().to_owned();
        match &p.op {
            Op::CreateVm { name, disks } => {
                let view = self.svc.get_ok(&format!("/v1/vms/{target}")).await?;
                let expected = disks
                    .iter()
                    .map(|(n, mib)| (n.clone(), vec![0; *mib as usize]))
                    .collect();
                let disks = Self::new_disks(&view, expected, None)?;
                self.model.vms.insert(
                    target,
                    MVm {
                        name: name.clone(),
                        template: false,
                        disks,
                        snaps: BTreeMap::new(),
                        current: None,
                    },
                );
            }
            Op::Snapshot { vm, name } => {
                let m = self.model.vm_mut(vm)?;
                let disks = m
                    .disks
                    .iter()
                    .map(|d| (d.id.clone(), d.content.clone()))
                    .collect();
                let parent = m.current.replace(target.clone());
                m.snaps.insert(
                    target,
                    MSnap {
                        name: name.clone(),
                        parent,
                        disks,
                    },
                );
            }
            Op::DeleteSnapshot { vm, snap, flatten } => {
                let m = self.model.vm_mut(vm)?;
                let removed = m
                    .snaps
                    .remove(snap)
                    .ok_or_else(|| format!("the model has no snapshot {snap}"))?;
                for s in m.snaps.values_mut() {
                    if s.parent.as_deref() == Some(snap.as_str()) {
                        s.parent.clone_from(&removed.parent);
                    }
                }
                if m.current.as_deref() == Some(snap.as_str()) {
                    m.current = removed.parent;
                }
                if *flatten {
                    self.refresh_links(vm).await?;
                }
            }
            Op::DeleteAll { vm } | Op::ToTemplate { vm } => {
                let m = self.model.vm_mut(vm)?;
                m.snaps.clear();
                m.current = None;
                if matches!(p.op, Op::ToTemplate { .. }) {
                    m.template = true;
                }
            }
            Op::Revert { vm, snap } => {
                let m = self.model.vm_mut(vm)?;
                let s = m
                    .snaps
                    .get(snap)
                    .cloned()
                    .ok_or_else(|| format!("the model has no snapshot {snap}"))?;
                for d in &mut m.disks {
                    if let Some(content) = s.disks.get(&d.id) {
                        d.content.clone_from(content);
                    }
                }
                m.current = Some(snap.clone());
            }
            Op::Clone {
                src,
                snap,
                linked,
                name,
            } => {
                let expected = self.model.source_contents(src, snap.as_deref())?;
                let view = self.svc.get_ok(&format!("/v1/vms/{target}")).await?;
                let disks = Self::new_disks(&view, expected, linked.then_some(src.as_str()))?;
                self.insert_vm(target, name.clone(), false, disks);
            }
            Op::TemplateCreate { src, snap, name } => {
                let expected = self.model.source_contents(src, snap.as_deref())?;
                let view = self.svc.get_ok(&format!("/v1/templates/{target}")).await?;
                let disks = Self::new_disks(&view, expected, None)?;
                self.insert_vm(target, name.clone(), true, disks);
            }
            Op::Deploy {
                template,
                linked,
                name,
                count,
            } => {
                let ids: Vec<String> = p.accepted["detail"]["vm_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                if ids.len() != *count as usize {
                    return Err(format!("deploy of {count} named {} VM(s)", ids.len()));
                }
                for (i, id) in ids.into_iter().enumerate() {
                    let expected = self.model.source_contents(template, None)?;
                    let view = self.svc.get_ok(&format!("/v1/vms/{id}")).await?;
                    let disks =
                        Self::new_disks(&view, expected, linked.then_some(template.as_str()))?;
                    self.insert_vm(id, format!("{name}-{}", i + 1), false, disks);
                }
            }
            Op::Flatten { vm, disk } => {
                let m = self.model.vm_mut(vm)?;
                m.disks
                    .iter_mut()
                    .find(|d| d.id == *disk)
                    .ok_or_else(|| format!("the model has no disk {disk}"))?
                    .linked_to = None;
            }
            Op::CreateDisk { vm, name, mib } => {
                self.model.vm_mut(vm)?.disks.push(MDisk {
                    id: target,
                    name: name.clone(),
                    content: vec![0; *mib as usize],
                    linked_to: None,
                });
            }
            Op::DeleteDisk { vm, disk } => {
                let m = self.model.vm_mut(vm)?;
                m.disks.retain(|d| d.id != *disk);
                for s in m.snaps.values_mut() {
                    s.disks.remove(disk);
                }
            }
            Op::Resize { vm, disk, mib } => {
                let m = self.model.vm_mut(vm)?;
                m.disks
                    .iter_mut()
                    .find(|d| d.id == *disk)
                    .ok_or_else(|| format!("the model has no disk {disk}"))?
                    .content
                    .resize(*mib as usize, 0);
            }
            Op::DeleteVm { vm, flatten } => {
                self.model
                    .vms
                    .remove(vm)
                    .ok_or_else(|| format!("the model has no VM {vm}"))?;
                if *flatten {
                    self.refresh_links(vm).await?;
                }
            }
            Op::ToVm { template } => self.model.vm_mut(template)?.template = false,
            Op::DeleteTemplate { template } => {
                self.model
                    .vms
                    .remove(template)
                    .ok_or_else(|| format!("the model has no template {template}"))?;
            }
        }
        Ok(())
    }

    fn insert_vm(&mut self, id: String, name: String, template: bool, disks: Vec<MDisk>) {
        self.model.vms.insert(
            id,
            MVm {
                name,
                template,
                disks,
                snaps: BTreeMap::new(),
                current: None,
            },
        );
    }

    /// After a succeeded `flatten_dependents` job on `source`: its linked clones whose
    /// link the job cut are standalone now (the job decides which; never the reverse).
    async fn refresh_links(&mut self, source: &str) -> Result<(), String> {
        let readers: Vec<(String, bool)> = self
            .model
            .vms
            .iter()
            .filter(|(_, v)| {
                v.disks
                    .iter()
                    .any(|d| d.linked_to.as_deref() == Some(source))
            })
            .map(|(id, v)| (id.clone(), v.template))
            .collect();
        for (id, template) in readers {
            let view = if template {
                self.svc.get_ok(&format!("/v1/templates/{id}")).await?
            } else {
                self.svc.get_ok(&format!("/v1/vms/{id}")).await?
            };
            let mut cut = Vec::new();
            for disk in view["disks"].as_array().into_iter().flatten() {
                let standalone = if template {
                    disk["path"]
                        .as_str()
                        .and_then(|p| backing_chain(p).ok())
                        .is_some_and(|chain| chain.len() == 1)
                } else {
                    disk["source_volume_id"].is_null()
                };
                if standalone {
                    cut.push(disk["id"].as_str().unwrap_or_default().to_owned());
                }
            }
            let vm = self.model.vm_mut(&id)?;
            for disk in &mut vm.disks {
                if disk.linked_to.as_deref() == Some(source) && cut.contains(&disk.id) {
                    disk.linked_to = None;
                }
            }
        }
        Ok(())
    }

    // ----- invariants

    async fn check(&mut self) -> Result<(), String> {
        let mut v: Vec<String> = Vec::new();
        let svc = &self.svc;
        let model = &self.model;

        // 5. No job left.
        for status in ["running", "queued"] {
            let list = svc
                .get_ok(&format!("/v1/jobs?status={status}&limit=1000"))
                .await?;
            for job in list["items"].as_array().into_iter().flatten() {
                v.push(format!(
                    "[5 jobs] job {} {} is still {status}: {job}",
                    job["id"].as_str().unwrap_or("?"),
                    job["kind"].as_str().unwrap_or("?")
                ));
            }
        }

        // 6. The event history replays to the present.
        let replayed = crate::support::history_replays_to_the_present(
            &svc.client,
            &svc.base,
            None,
            &svc.data_dir,
        )
        .await;
        if let Err(e) = replayed {
            v.push(format!("[6 events] {e}"));
        }

        let api = fetch_api(svc).await?;
        let vols = svc.volumes_dir();
        let vols_text = vols.display().to_string();

        // What the API references, and the parent links its chains state.
        let mut referenced: BTreeMap<String, String> = BTreeMap::new(); // file -> who
        let mut parent_of: BTreeMap<String, Option<String>> = BTreeMap::new();
        // (label, API chain files top first, source file) per VM disk
        let mut disk_chains: Vec<(String, String, Vec<String>, Option<String>)> = Vec::new();
        for (id, view) in &api.vms {
            let vm_name = view["name"].as_str().unwrap_or("?");
            if view["status"] != "ready" {
                v.push(format!("[5 state] VM {vm_name} is {}", view["status"]));
            }
            if view["state"] != "stopped" {
                v.push(format!("[model] VM {vm_name} is {}", view["state"]));
            }
            for disk in view["disks"].as_array().into_iter().flatten() {
                let label = format!("{vm_name}/{}", disk["name"].as_str().unwrap_or("?"));
                if disk["status"] != "ready" {
                    v.push(format!("[5 state] disk {label} is {}", disk["status"]));
                }
                let mut files = Vec::new();
                for entry in disk["chain"].as_array().into_iter().flatten() {
                    let file = file_of(entry["path"].as_str().unwrap_or_default());
                    if entry["status"] != "ready" {
                        v.push(format!(
                            "[5 state] layer {} ({}) of disk {label} is {}",
                            short_file(&file),
                            entry["role"].as_str().unwrap_or("?"),
                            entry["status"]
                        ));
                    }
                    referenced
                        .entry(file.clone())
                        .or_insert_with(|| format!("chain of {label}"));
                    files.push(file);
                }
                if files.is_empty() {
                    v.push(format!("[5 state] disk {label} has no chain"));
                    continue;
                }
                if disk["active_path"].as_str().map(file_of).as_ref() != files.first() {
                    v.push(format!(
                        "[3 chain] disk {label}: active_path {} is not the top of its chain",
                        disk["active_path"]
                    ));
                }
                let source = disk["source_volume_id"]
                    .as_str()
                    .map(|s| format!("{s}.qcow2"));
                if let Some(source) = &source {
                    referenced
                        .entry(source.clone())
                        .or_insert_with(|| format!("source of {label}"));
                }
                for pair in files.windows(2) {
                    parent_of.insert(pair[0].clone(), Some(pair[1].clone()));
                }
                parent_of.insert(files.last().cloned().unwrap_or_default(), source.clone());
                disk_chains.push((label, id.clone(), files, source));
            }
            for snap in api.snaps.get(id).into_iter().flatten() {
                let label = format!("{vm_name}/{}", snap["name"].as_str().unwrap_or("?"));
                if snap["status"] != "ready" {
                    v.push(format!("[5 state] snapshot {label} is {}", snap["status"]));
                }
                for volume in snap["volumes"].as_array().into_iter().flatten() {
                    let file = file_of(volume["path"].as_str().unwrap_or_default());
                    referenced
                        .entry(file)
                        .or_insert_with(|| format!("snapshot {label}"));
                }
            }
        }
        for view in api.templates.values() {
            let name = view["name"].as_str().unwrap_or("?");
            if view["status"] != "ready" {
                v.push(format!("[5 state] template {name} is {}", view["status"]));
            }
            for disk in view["disks"].as_array().into_iter().flatten() {
                match disk["path"].as_str() {
                    Some(path) => {
                        referenced
                            .entry(file_of(path))
                            .or_insert_with(|| format!("template {name}"));
                    }
                    None => v.push(format!(
                        "[5 state] template disk {name}/{} has no file",
                        disk["name"]
                    )),
                }
            }
        }

        // 3. Backing chains as qemu-img sees them (each file's chain from itself down).
        let mut chains: BTreeMap<String, Vec<LayerInfo>> = BTreeMap::new();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        for (file, who) in &referenced {
            if chains.contains_key(file) || broken.contains(file) {
                continue;
            }
            let path = vols.join(file);
            match backing_chain(&path.display().to_string()) {
                Ok(layers) => {
                    for i in 0..layers.len() {
                        chains
                            .entry(layers[i].file.clone())
                            .or_insert_with(|| layers[i..].to_vec());
                    }
                }
                Err(e) => {
                    broken.insert(file.clone());
                    v.push(format!("[3 chain] {who}: {}", shorten(&e, &vols_text)));
                }
            }
        }
        for (file, layers) in &chains {
            let layer = &layers[0];
            if layer.dir != vols {
                v.push(format!(
                    "[3 chain] layer {} lies outside volumes/: {}",
                    short_file(file),
                    layer.dir.display()
                ));
            }
            if let Some(raw) = &layer.backing_raw
                && raw.contains('/')
            {
                v.push(format!(
                    "[3 chain] layer {} names its backing file by a path, not a relative name: {raw}",
                    short_file(file)
                ));
            }
            let actual = layers.get(1).map(|l| l.file.clone());
            if let Some(expected) = parent_of.get(file)
                && *expected != actual
            {
                v.push(format!(
                    "[3 chain] layer {} ({}) is backed by {} but the API chain says {}",
                    short_file(file),
                    referenced.get(file).map_or("unreferenced", String::as_str),
                    actual.as_deref().map_or("nothing".into(), short_file),
                    expected.as_deref().map_or("nothing".into(), short_file),
                ));
            }
        }
        for (label, _, files, source) in &disk_chains {
            let Some(qemu) = chains.get(&files[0]) else {
                continue;
            };
            let qemu_files: Vec<String> = qemu.iter().map(|l| l.file.clone()).collect();
            let mut expected = files.clone();
            if let Some(source) = source {
                expected.push(source.clone());
            }
            let prefix_ok = qemu_files.len() >= expected.len()
                && qemu_files[..expected.len()] == expected[..]
                && (source.is_some() || qemu_files.len() == files.len());
            if !prefix_ok {
                v.push(format!(
                    "[3 chain] disk {label}: qemu-img chain [{}] differs from the API chain [{}]{}",
                    qemu_files
                        .iter()
                        .map(|f| short_file(f))
                        .collect::<Vec<_>>()
                        .join(" <- "),
                    files
                        .iter()
                        .map(|f| short_file(f))
                        .collect::<Vec<_>>()
                        .join(" <- "),
                    source
                        .as_deref()
                        .map_or(String::new(), |s| format!(" + source {}", short_file(s)))
                ));
            }
        }
        // The snapshot tree: an ancestor's layer lies in each descendant's chain, and
        // the current snapshot's (and its ancestors') in the present chain.
        for (id, view) in &api.vms {
            let snaps = api.snaps.get(id).cloned().unwrap_or_default();
            let by_id: BTreeMap<&str, &Value> = snaps
                .iter()
                .filter_map(|s| s["id"].as_str().map(|i| (i, s)))
                .collect();
            let layer_of = |snap: &str, disk: &str| -> Option<String> {
                by_id.get(snap)?["volumes"]
                    .as_array()?
                    .iter()
                    .find(|vol| vol["disk_id"] == disk)
                    .and_then(|vol| vol["path"].as_str())
                    .map(file_of)
            };
            let ancestry = |mut snap: Option<String>| {
                let mut out = Vec::new();
                while let Some(s) = snap {
                    if out.contains(&s) || out.len() > 100 {
                        break;
                    }
                    snap = by_id
                        .get(s.as_str())
                        .and_then(|v| v["parent_id"].as_str())
                        .map(str::to_owned);
                    out.push(s);
                }
                out
            };
            let vm_name = view["name"].as_str().unwrap_or("?");
            for disk in view["disks"].as_array().into_iter().flatten() {
                let disk_id = disk["id"].as_str().unwrap_or_default();
                let disk_name = disk["name"].as_str().unwrap_or("?");
                let mut tops: Vec<(String, String, Vec<String>)> = Vec::new();
                if let Some(active) = disk["active_path"].as_str() {
                    let current = view["current_snapshot_id"].as_str().map(str::to_owned);
                    tops.push(("the present".into(), file_of(active), ancestry(current)));
                }
                for snap in &snaps {
                    let sid = snap["id"].as_str().unwrap_or_default();
                    if let Some(file) = layer_of(sid, disk_id) {
                        let parent = snap["parent_id"].as_str().map(str::to_owned);
                        let name = format!("snapshot {}", snap["name"].as_str().unwrap_or("?"));
                        tops.push((name, file, ancestry(parent)));
                    }
                }
                for (what, file, ancestors) in tops {
                    let Some(chain) = chains.get(&file) else {
                        continue;
                    };
                    for ancestor in ancestors {
                        let Some(layer) = layer_of(&ancestor, disk_id) else {
                            continue;
                        };
                        if !chain.iter().any(|l| l.file == layer) {
                            let name = by_id[ancestor.as_str()]["name"].as_str().unwrap_or("?");
                            v.push(format!(
                                "[3 chain] {vm_name}/{disk_name}: the layer of ancestor snapshot {name} ({}) is not in the chain of {what} ({})",
                                short_file(&layer),
                                short_file(&file)
                            ));
                        }
                    }
                }
            }
        }

        // 4. Files: exactly what is referenced (or backs what is).
        let mut on_disk = BTreeSet::new();
        match std::fs::read_dir(&vols) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    on_disk.insert(entry.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) => v.push(format!("[4 files] cannot list volumes/: {e}")),
        }
        let mut reachable: BTreeSet<String> = referenced.keys().cloned().collect();
        for layers in chains.values() {
            reachable.extend(layers.iter().map(|l| l.file.clone()));
        }
        for (file, who) in &referenced {
            if !on_disk.contains(file) {
                v.push(format!(
                    "[4 files] {} ({who}) is missing from volumes/",
                    short_file(file)
                ));
            }
        }
        for file in &on_disk {
            if !file.ends_with(".qcow2") {
                v.push(format!("[4 files] stray file in volumes/: {file}"));
            } else if !reachable.contains(file) {
                v.push(format!(
                    "[4 files] orphan file {} (no VM, disk, snapshot or template references it): {}",
                    short_file(file),
                    describe_file(&vols.join(file))
                ));
            }
        }

        // 2. qemu-img check on every file.
        for file in on_disk.iter().filter(|f| f.ends_with(".qcow2")) {
            if let Err(e) = check_image(&vols.join(file)) {
                v.push(format!(
                    "[2 check] {} ({}): {e}",
                    short_file(file),
                    referenced.get(file).map_or("unreferenced", String::as_str)
                ));
            }
        }

        // The model against the API, and 1. the bytes.
        let model_vms: BTreeSet<&String> = model
            .vms
            .iter()
            .filter(|(_, m)| !m.template)
            .map(|(id, _)| id)
            .collect();
        let model_templates: BTreeSet<&String> = model
            .vms
            .iter()
            .filter(|(_, m)| m.template)
            .map(|(id, _)| id)
            .collect();
        for (what, api_ids, model_ids) in [
            ("VM", api.vms.keys().collect::<BTreeSet<_>>(), &model_vms),
            (
                "template",
                api.templates.keys().collect::<BTreeSet<_>>(),
                &model_templates,
            ),
        ] {
            for id in api_ids.difference(model_ids) {
                let view = api.vms.get(*id).or_else(|| api.templates.get(*id));
                v.push(format!(
                    "[model] the API shows {what} {} ({}) that the model does not have",
                    view.and_then(|w| w["name"].as_str()).unwrap_or("?"),
                    view.map_or(Value::Null, |w| w["status"].clone())
                ));
            }
            for id in model_ids.difference(&api_ids) {
                v.push(format!(
                    "[model] {what} {} is missing from the API",
                    model.vm_label(id)
                ));
            }
        }
        let mut reads: Vec<(String, String, Content)> = Vec::new(); // (label, file, content)
        for (id, m) in &model.vms {
            let view = if m.template {
                api.templates.get(id)
            } else {
                api.vms.get(id)
            };
            let Some(view) = view else { continue };
            let api_disks: BTreeMap<String, &Value> = view["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["id"].as_str().map(|i| (i.to_owned(), d)))
                .collect();
            for d in &m.disks {
                let label = format!("{}/{}", m.name, d.name);
                let Some(disk) = api_disks.get(&d.id) else {
                    v.push(format!("[model] disk {label} is missing from the API"));
                    continue;
                };
                if disk["size_bytes"].as_u64() != Some(d.content.len() as u64 * MIB) {
                    v.push(format!(
                        "[model] disk {label} is {} bytes, the model says {} MiB",
                        disk["size_bytes"],
                        d.content.len()
                    ));
                }
                let path = if m.template {
                    disk["path"].as_str()
                } else {
                    disk["active_path"].as_str()
                };
                let Some(file) = path.map(file_of) else {
                    continue;
                };
                if m.template {
                    let depth = chains.get(&file).map(Vec::len);
                    if d.linked_to.is_none() && depth.is_some_and(|n| n != 1) {
                        v.push(format!(
                            "[model] template disk {label} should be one standalone file but its chain has {} layers",
                            depth.unwrap_or(0)
                        ));
                    }
                } else {
                    let linked = !disk["source_volume_id"].is_null();
                    if linked != d.linked_to.is_some() {
                        v.push(format!(
                            "[model] disk {label} is {} but the model says {}",
                            if linked { "linked" } else { "standalone" },
                            d.linked_to.as_deref().map_or("standalone".into(), |s| {
                                format!("linked to {}", model.vm_label(s))
                            })
                        ));
                    }
                }
                reads.push((format!("present of {label}"), file, d.content.clone()));
            }
            for id in api_disks.keys() {
                if !m.disks.iter().any(|d| d.id == *id) {
                    v.push(format!(
                        "[model] {} shows disk {} that the model does not have",
                        m.name, api_disks[id]["name"]
                    ));
                }
            }
            if m.template {
                continue;
            }
            if view["current_snapshot_id"].as_str() != m.current.as_deref() {
                v.push(format!(
                    "[model] {}: current snapshot is {} but the model says {}",
                    m.name,
                    view["current_snapshot_id"],
                    m.current
                        .as_deref()
                        .map_or("none".into(), |s| model.snap_label(id, s))
                ));
            }
            let api_snaps: BTreeMap<String, &Value> = api
                .snaps
                .get(id)
                .into_iter()
                .flatten()
                .filter_map(|s| s["id"].as_str().map(|i| (i.to_owned(), s)))
                .collect();
            for (sid, snap) in &api_snaps {
                if !m.snaps.contains_key(sid) {
                    v.push(format!(
                        "[model] {} shows snapshot {} ({}) that the model does not have (deleted or never taken)",
                        m.name, snap["name"], snap["status"]
                    ));
                }
            }
            for (sid, s) in &m.snaps {
                let label = format!("{}/{}", m.name, s.name);
                let Some(snap) = api_snaps.get(sid) else {
                    v.push(format!("[model] snapshot {label} is missing from the API"));
                    continue;
                };
                if snap["parent_id"].as_str() != s.parent.as_deref() {
                    v.push(format!(
                        "[model] snapshot {label}: parent is {} but the model says {}",
                        snap["parent_id"],
                        s.parent
                            .as_deref()
                            .map_or("none".into(), |p| model.snap_label(id, p))
                    ));
                }
                let volumes: BTreeMap<String, String> = snap["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|vol| {
                        Some((
                            vol["disk_id"].as_str()?.to_owned(),
                            file_of(vol["path"].as_str()?),
                        ))
                    })
                    .collect();
                let covered: BTreeSet<&String> = volumes.keys().collect();
                let expected: BTreeSet<&String> = s.disks.keys().collect();
                if covered != expected {
                    v.push(format!(
                        "[model] snapshot {label} covers disks {:?}, the model says {:?}",
                        covered
                            .iter()
                            .map(|d| model.disk_label(id, d))
                            .collect::<Vec<_>>(),
                        expected
                            .iter()
                            .map(|d| model.disk_label(id, d))
                            .collect::<Vec<_>>()
                    ));
                }
                if snap["status"] != "ready" {
                    continue;
                }
                for (disk, content) in &s.disks {
                    if let Some(file) = volumes.get(disk) {
                        let what =
                            format!("snapshot {label} of disk {}", model.disk_label(id, disk));
                        reads.push((what, file.clone(), content.clone()));
                    }
                }
            }
        }
        for (what, file, content) in &reads {
            if broken.contains(file) {
                continue; // already reported: the chain does not open
            }
            if let Some(size) = chains.get(file).map(|c| c[0].virtual_size)
                && size != content.len() as u64 * MIB
            {
                v.push(format!(
                    "[1 content] {what} ({}): virtual size {size} bytes, the model says {} MiB",
                    short_file(file),
                    content.len()
                ));
                continue;
            }
            if let Err(e) = verify_content(&vols.join(file), content, self.full_read) {
                v.push(format!(
                    "[1 content] {what} ({}) expected {}: {e}",
                    short_file(file),
                    describe_content(content)
                ));
            }
        }

        if v.is_empty() {
            let line = format!(
                "invariants hold: {} VM(s), {} template(s), {} snapshot(s), {} file(s), {} image(s) read",
                api.vms.len(),
                api.templates.len(),
                api.snaps.values().map(Vec::len).sum::<usize>(),
                on_disk.len(),
                reads.len()
            );
            self.note(line);
            Ok(())
        } else {
            let mut text = format!(
                "{} invariant violation(s) after cycle {}:",
                v.len(),
                self.cycle
            );
            for line in &v {
                let _ = write!(text, "\n  - {line}");
            }
            Err(text)
        }
    }
}

struct Api {
    vms: BTreeMap<String, Value>,
    templates: BTreeMap<String, Value>,
    snaps: BTreeMap<String, Vec<Value>>,
}

async fn fetch_api(svc: &Service) -> Result<Api, String> {
    let mut api = Api {
        vms: BTreeMap::new(),
        templates: BTreeMap::new(),
        snaps: BTreeMap::new(),
    };
    for (path, into) in [
        ("/v1/vms?limit=1000", &mut api.vms),
        ("/v1/templates?limit=1000", &mut api.templates),
    ] {
        let list = svc.get_ok(path).await?;
        if !list["next_cursor"].is_null() {
            return Err(format!("{path}: more than one page"));
        }
        for item in list["items"].as_array().into_iter().flatten() {
            into.insert(
                item["id"].as_str().unwrap_or_default().to_owned(),
                item.clone(),
            );
        }
    }
    for id in api.vms.keys() {
        let list = svc
            .get_ok(&format!("/v1/vms/{id}/snapshots?limit=1000"))
            .await?;
        api.snaps.insert(
            id.clone(),
            list["items"].as_array().cloned().unwrap_or_default(),
        );
    }
    Ok(api)
}

// ---------------------------------------------------------------------------------
// qemu-img / qemu-io

fn file_of(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A volume file's name shortened for logs: the end of its uuid.
fn short_file(file: &str) -> String {
    let stem = file.trim_end_matches(".qcow2");
    format!("…{}", short(stem))
}

/// Shorten volume paths in a command line or message.
fn shorten(text: &str, volumes_dir: &str) -> String {
    let mut out = String::new();
    for word in text.replace(&format!("{volumes_dir}/"), "").split(' ') {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.len() > 36 && word.ends_with(".qcow2") {
            out.push_str(&short_file(word));
        } else {
            out.push_str(word);
        }
    }
    out
}

fn output(program: &str, args: &[&str]) -> Result<std::process::Output, String> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

fn qemu_io_write(path: &str, pattern: u8, offset_mib: u64, len_mib: u64) -> Result<(), String> {
    let command = format!("write -P {pattern:#x} {offset_mib}M {len_mib}M");
    let out = output("qemu-io", &["-f", "qcow2", "-c", &command, path])?;
    let all = text(&out);
    if !out.status.success() || all.contains("failed") || all.contains("error") {
        return Err(format!("qemu-io {command} {path}: {all}"));
    }
    Ok(())
}

/// Run read commands on an image; Err with qemu-io's words if any fails.
fn qemu_io_read(path: &str, commands: &[String]) -> Result<(), String> {
    let mut args = vec!["-f", "qcow2", "-r"];
    for command in commands {
        args.extend(["-c", command.as_str()]);
    }
    args.push(path);
    let out = output("qemu-io", &args)?;
    let all = text(&out);
    if !out.status.success() || all.contains("failed") || all.contains("error") {
        return Err(all);
    }
    Ok(())
}

/// The byte at `offset` (via `read -v`).
fn byte_at(path: &str, offset: u64) -> Option<u8> {
    let out = output(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-r",
            "-c",
            &format!("read -v {offset} 1"),
            path,
        ],
    )
    .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.contains(':'))?;
    let hex = line.split(':').nth(1)?.split_whitespace().next()?;
    u8::from_str_radix(hex, 16).ok()
}

/// MiB that some layer of the chain may hold data for (not reported as zero).
fn data_mib(path: &str, size_mib: u64) -> Result<Vec<bool>, String> {
    let out = output("qemu-img", &["map", "--output=json", "-f", "qcow2", path])?;
    if !out.status.success() {
        return Err(format!("qemu-img map: {}", text(&out)));
    }
    let extents: Vec<Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img map JSON: {e}"))?;
    let mut data = vec![false; size_mib as usize];
    for extent in extents {
        if extent["zero"].as_bool() == Some(true) {
            continue;
        }
        let start = extent["start"].as_u64().unwrap_or(0);
        let end = start + extent["length"].as_u64().unwrap_or(0);
        for mib in start / MIB..end.div_ceil(MIB).min(size_mib) {
            data[mib as usize] = true;
        }
    }
    Ok(data)
}

/// Check that an image reads `content`: each written region with `read -P pattern`,
/// zeros with `read -P 0` (where the chain may hold data, or everywhere with
/// `full_read`). On a mismatch, find the bad MiB and what they read instead.
fn verify_content(path: &Path, content: &[u8], full_read: bool) -> Result<(), String> {
    let path = path.display().to_string();
    let size = content.len() as u64;
    let data = if full_read {
        vec![true; content.len()]
    } else {
        data_mib(&path, size)?
    };
    // Regions to read: every written MiB, and zero MiB the chain may hold data for;
    // at most 32 MiB per command.
    let mut regions: Vec<(u8, u64, u64)> = Vec::new();
    for (mib, &pattern) in content.iter().enumerate() {
        let mib = mib as u64;
        if pattern == 0 && !data[mib as usize] {
            continue;
        }
        match regions.last_mut() {
            Some((p, o, l)) if *p == pattern && *o + *l == mib && *l < 32 => *l += 1,
            _ => regions.push((pattern, mib, 1)),
        }
    }
    let command = |(p, o, l): (u8, u64, u64)| format!("read -P {p:#x} {o}M {l}M");
    let commands: Vec<String> = regions.iter().map(|r| command(*r)).collect();
    if commands.is_empty() || qemu_io_read(&path, &commands).is_ok() {
        return Ok(());
    }
    // Diagnose: which MiB read wrong, and what they hold.
    let mut bad: Vec<(u64, u8, Option<u8>)> = Vec::new(); // (mib, expected, found)
    let mut first_error = None;
    for &(pattern, offset, len) in &regions {
        if let Err(e) = qemu_io_read(&path, &[command((pattern, offset, len))]) {
            if !e.contains("Pattern verification failed") {
                return Err(format!("qemu-io cannot read it: {e}"));
            }
            first_error.get_or_insert(e);
            for mib in offset..offset + len {
                if let Err(e) = qemu_io_read(&path, &[command((pattern, mib, 1))]) {
                    let at = e
                        .split("offset ")
                        .nth(1)
                        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(mib * MIB);
                    bad.push((mib, pattern, byte_at(&path, at)));
                }
            }
        }
    }
    let mut ranges: Vec<(u64, u64, u8, Option<u8>)> = Vec::new();
    for (mib, expected, found) in bad {
        match ranges.last_mut() {
            Some((start, len, e, f)) if *start + *len == mib && *e == expected && *f == found => {
                *len += 1;
            }
            _ => ranges.push((mib, 1, expected, found)),
        }
    }
    let described: Vec<String> = ranges
        .iter()
        .map(|(start, len, expected, found)| {
            format!(
                "MiB {start}..{} expected {expected:#04x} but read {}",
                start + len,
                found.map_or("?".into(), |b| format!("{b:#04x}"))
            )
        })
        .collect();
    Err(format!(
        "WRONG BYTES: {} (first qemu-io complaint: {})",
        if described.is_empty() {
            "(no single MiB failed on its own)".into()
        } else {
            described.join("; ")
        },
        first_error
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("failed"))
            .unwrap_or("?")
    ))
}

#[derive(Clone, Debug)]
struct LayerInfo {
    file: String,
    dir: PathBuf,
    backing_raw: Option<String>,
    virtual_size: u64,
}

/// `qemu-img info --backing-chain` of an image, top first.
fn backing_chain(path: &str) -> Result<Vec<LayerInfo>, String> {
    let out = output(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--backing-chain",
            "-f",
            "qcow2",
            path,
        ],
    )?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info --backing-chain {}: {}",
            file_of(path),
            text(&out)
        ));
    }
    let infos: Vec<Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info JSON: {e}"))?;
    Ok(infos
        .iter()
        .map(|info| {
            let name = info["filename"].as_str().unwrap_or_default();
            LayerInfo {
                file: file_of(name),
                dir: std::fs::canonicalize(Path::new(name).parent().unwrap_or(Path::new("/")))
                    .unwrap_or_default(),
                backing_raw: info["backing-filename"].as_str().map(str::to_owned),
                virtual_size: info["virtual-size"].as_u64().unwrap_or(0),
            }
        })
        .collect())
}

/// `qemu-img check`: Err unless clean (no corruption, no leak, no error).
fn check_image(path: &Path) -> Result<(), String> {
    let path = path.display().to_string();
    let out = output(
        "qemu-img",
        &["check", "--output=json", "-f", "qcow2", &path],
    )?;
    if out.status.success() {
        return Ok(());
    }
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Err(format!(
        "qemu-img check exit {}: corruptions {}, leaks {}, check errors {} {}",
        out.status.code().unwrap_or(-1),
        report["corruptions"].as_u64().unwrap_or(0),
        report["leaks"].as_u64().unwrap_or(0),
        report["check-errors"].as_u64().unwrap_or(0),
        if report.is_null() {
            text(&out)
        } else {
            String::new()
        }
    ))
}

/// What an orphan file is: its size and backing file.
fn describe_file(path: &Path) -> String {
    let out = output(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "-U",
            "-f",
            "qcow2",
            &path.display().to_string(),
        ],
    );
    match out {
        Ok(out) if out.status.success() => {
            let info: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            format!(
                "virtual size {} MiB, {} bytes on disk, backing {}",
                info["virtual-size"].as_u64().unwrap_or(0) / MIB,
                info["actual-size"],
                info["backing-filename"]
                    .as_str()
                    .map_or("none".into(), short_file)
            )
        }
        Ok(out) => text(&out),
        Err(e) => e,
    }
}
