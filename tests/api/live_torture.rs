//! A seeded, model-based crash test of the live operations ("live torture"): what
//! `torture.rs` is for stopped VMs, for a VM that runs.
//!
//! One two-disk VM runs in qemu-storage-daemon (the stand-in for its QEMU; in some
//! cycles behind the monitor proxy that can pause the guest, as a VM's QEMU can). A
//! guest thread writes all the time over NBD: a pattern over one to four 256 KiB
//! blocks, then a flush, so that a write is durable once qemu-io returns. Each cycle
//! submits one or two live operations (a crash-consistent snapshot, a snapshot delete
//! that commits, streams or drops, delete-all, linked and full clones of the present
//! or of a snapshot, a grow, deleting a clone) and injects faults at random instants:
//! SIGKILL of strata (sometimes again while it recovers), SIGKILL of its qemu-img
//! children, SIGKILL of the VM's QEMU (which the orchestrator then reports: the VM is
//! marked stopped), and a guest agent (the tests' double) whose freeze fails or hangs
//! or whose thaw fails for a while; snapshots and clones of the present ask for crash
//! consistency or a freeze, required or best effort. When every job has ended, the guest stops writing, the VM is
//! powered off hard (SIGKILL of its QEMU after the guest's last flush: nothing strata
//! left in QEMU's caches survives) and marked stopped, and these invariants hold:
//!
//! 1. each disk's present state holds every durable write: each block reads the last
//!    pattern written to it (a block QEMU died under while writing may read the old
//!    pattern, the new one or both);
//! 2. each snapshot, and each clone, is one instant of the guest: some single point of
//!    the logical clock between its job's acceptance and end explains what every
//!    block of every disk reads (the clock orders the guest's writes and the jobs);
//! 3. `qemu-img check` is clean on every file (leaks are allowed once QEMU was killed
//!    in the seed, as they are on a real VM that crashed);
//! 4. each disk's chain in the API is the chain of files qemu-img opens;
//! 5. the files in volumes/ are exactly those the API references; no job is left
//!    running; every VM, disk and snapshot is ready; the snapshots, clones and sizes
//!    the API shows are the model's (a succeeded job applied whole, a failed one not
//!    at all); and, once every job ended, the guest is not frozen.
//!
//! The VM then boots again from the API's active paths and is marked running.
//!
//! Environment: `STRATA_LIVE_TORTURE_SEED` (a seed or a comma-separated list; default
//! 1,2), `STRATA_LIVE_TORTURE_CYCLES` (default 8), `STRATA_LIVE_TORTURE_VERBOSE=1`
//! (print every seed's operation log). `KIND=live scripts/soak.sh` runs many seeds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::live::run_dir;
use crate::support::guest_agent::{AgentDouble, Behaviour};
use crate::support::live::{GuestGate, RunningVm, try_guest_write_flushed};
use crate::support::{Launch, MIB, TestApp, children_named, kill_process};
use crate::torture::{Rng, parse_u64};

const DEFAULT_SEEDS: [u64; 2] = [1, 2];
const DEFAULT_CYCLES: u32 = 8;
const DISKS: [&str; 2] = ["root", "data"];
/// The size the guest writes within (a grow adds zeros past it).
const DISK_BYTES: u64 = 32 * MIB;
const BLOCK: u64 = 256 << 10;
const BLOCKS: usize = (DISK_BYTES / BLOCK) as usize;
const MAX_SNAPSHOTS: usize = 5;
const MAX_CLONES: usize = 2;
const MAX_GROWN: u64 = 48 * MIB;
/// How long every job of a cycle may take once its faults are over.
const JOB_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn live_operations_survive_kill_nine_of_strata_and_of_qemu_at_any_instant() {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let seeds: Vec<u64> = var("STRATA_LIVE_TORTURE_SEED").map_or_else(
        || DEFAULT_SEEDS.to_vec(),
        |list| {
            list.split(',')
                .map(|s| parse_u64(s.trim()).expect("STRATA_LIVE_TORTURE_SEED: numbers"))
                .collect()
        },
    );
    let cycles = var("STRATA_LIVE_TORTURE_CYCLES").map_or(DEFAULT_CYCLES, |v| {
        v.trim()
            .parse()
            .expect("STRATA_LIVE_TORTURE_CYCLES: a number")
    });
    let mut failed = Vec::new();
    for seed in seeds {
        let started = Instant::now();
        let mut seed_run = match SeedRun::start(seed).await {
            Ok(run) => run,
            Err(e) => panic!("live torture seed {seed}: could not start: {e}"),
        };
        let result = seed_run.run(cycles).await;
        println!("{}", seed_run.summary(cycles, started, result.is_ok()));
        if var("STRATA_LIVE_TORTURE_VERBOSE").is_some_and(|v| v != "0") {
            println!("----- operation log -----\n{}", seed_run.log.join("\n"));
        }
        if let Err(violation) = result {
            println!("{}", seed_run.report(cycles, &violation));
            failed.push(seed);
        }
        seed_run.shutdown();
    }
    assert!(
        failed.is_empty(),
        "live torture: seeds {failed:?} failed (reports above)"
    );
}

// ---------------------------------------------------------------------------------
// The guest and its history

/// One guest write as one block saw it: the pattern, and the logical clock when qemu-io
/// was started and when it returned (after its flush).
#[derive(Clone, Copy, Debug)]
struct GuestWrite {
    pattern: u8,
    start: u64,
    end: u64,
    /// qemu-io failed (QEMU died under it): any part of it may have landed.
    failed: bool,
}

/// What the guest wrote, in order, per disk and block; and the logical clock.
struct Guest {
    clock: AtomicU64,
    patterns: AtomicU64,
    history: Mutex<Vec<Vec<Vec<GuestWrite>>>>,
}

impl Guest {
    fn new() -> Self {
        Self {
            clock: AtomicU64::new(0),
            patterns: AtomicU64::new(0),
            history: Mutex::new(vec![vec![Vec::new(); BLOCKS]; DISKS.len()]),
        }
    }

    /// The next instant of the logical clock.
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A pattern byte never 0 (zero is what an unwritten block reads).
    fn next_pattern(&self) -> u8 {
        (self.patterns.fetch_add(1, Ordering::Relaxed) % 255 + 1) as u8
    }

    fn record(&self, disk: usize, blocks: std::ops::Range<usize>, write: GuestWrite) {
        let mut history = self.history.lock().unwrap();
        for block in blocks {
            history[disk][block].push(write);
        }
    }

    /// The blocks whose last write failed (QEMU died under it), per disk.
    fn torn_blocks(&self) -> Vec<(usize, usize)> {
        let history = self.history.lock().unwrap();
        let mut torn = Vec::new();
        for (disk, blocks) in history.iter().enumerate() {
            for (block, writes) in blocks.iter().enumerate() {
                if writes.last().is_some_and(|w| w.failed) {
                    torn.push((disk, block));
                }
            }
        }
        torn
    }
}

/// The guest's writing thread, for the time the VM runs.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Option<WriterEnd>>>,
}

#[derive(Clone, Debug)]
struct WriterEnd {
    writes: u64,
    /// The first failed write's qemu-io output and the clock when it returned.
    failure: Option<(u64, String)>,
}

impl Writer {
    fn start(guest: Arc<Guest>, vm: &RunningVm, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(None));
        let (nbd, gate) = (vm.nbd.clone(), Arc::clone(&vm.gate));
        let (stopping, finished) = (Arc::clone(&stop), Arc::clone(&done));
        std::thread::spawn(move || {
            let end = write_until_stopped(&guest, &nbd, &gate, seed, &stopping);
            *finished.lock().unwrap() = Some(end);
        });
        Self { stop, done }
    }

    /// Stop writing and wait (up to 60 s) for the write under way; `None` when the
    /// writer is still held, e.g. by a guest left paused.
    async fn finish(self) -> Option<WriterEnd> {
        self.stop.store(true, Ordering::Relaxed);
        for _ in 0..3000 {
            if let Some(end) = self.done.lock().unwrap().clone() {
                return Some(end);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

fn write_until_stopped(
    guest: &Guest,
    nbd: &Path,
    gate: &GuestGate,
    seed: u64,
    stop: &AtomicBool,
) -> WriterEnd {
    let mut rng = Rng::new(seed);
    let mut writes = 0;
    while !stop.load(Ordering::Relaxed) {
        let disk = rng.index(DISKS.len());
        let count = rng.range(1, 4) as usize;
        let first = rng.index(BLOCKS - count + 1);
        let pattern = guest.next_pattern();
        // Held while the guest is paused; the write starts once it may run.
        let writing = gate.enter();
        let start = guest.tick();
        let result = try_guest_write_flushed(
            nbd,
            disk,
            pattern,
            first as u64 * BLOCK,
            count as u64 * BLOCK,
        );
        let end = guest.tick();
        drop(writing);
        let failed = result.is_err();
        let write = GuestWrite {
            pattern,
            start,
            end,
            failed,
        };
        guest.record(disk, first..first + count, write);
        writes += 1;
        if let Err(output) = result {
            // A guest whose disk failed stops (its QEMU is gone).
            return WriterEnd {
                writes,
                failure: Some((end, output.trim().to_owned())),
            };
        }
    }
    WriterEnd {
        writes,
        failure: None,
    }
}

// ---------------------------------------------------------------------------------
// Instants: which points of the logical clock explain what a block reads

/// Sorted, disjoint half-open ranges of the logical clock.
type Instants = Vec<(u64, u64)>;

/// The instants at which a block with this `history` may read the bytes in `seen`:
/// the initial zeros until the first write that succeeded returned; each write's
/// pattern from its start until the next write that succeeded returned; a write that
/// failed, its pattern or the one before it, in any mix.
fn block_instants(history: &[GuestWrite], seen: &BTreeSet<u8>) -> Instants {
    let mut out = Vec::new();
    for k in 0..=history.len() {
        let (values, from) = if k == 0 {
            (vec![0], 0)
        } else {
            let write = history[k - 1];
            let before = if k >= 2 { history[k - 2].pattern } else { 0 };
            if write.failed {
                (vec![before, write.pattern], write.start)
            } else {
                (vec![write.pattern], write.start)
            }
        };
        let until = history[k..]
            .iter()
            .find(|w| !w.failed)
            .map_or(u64::MAX, |w| w.end);
        if seen.iter().all(|b| values.contains(b)) && from < until {
            out.push((from, until));
        }
    }
    normalize(out)
}

fn normalize(mut ranges: Instants) -> Instants {
    ranges.sort_unstable();
    let mut out: Instants = Vec::new();
    for (from, until) in ranges {
        match out.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(until),
            _ => out.push((from, until)),
        }
    }
    out
}

fn intersect(a: &Instants, b: &Instants) -> Instants {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let from = a[i].0.max(b[j].0);
        let until = a[i].1.min(b[j].1);
        if from < until {
            out.push((from, until));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The distinct bytes of `bytes`.
fn distinct(bytes: &[u8]) -> BTreeSet<u8> {
    let mut seen = [false; 256];
    for &b in bytes {
        seen[b as usize] = true;
    }
    (0..=255u8).filter(|&b| seen[b as usize]).collect()
}

/// Check that one instant in `[window.0, window.1]` explains every block of every disk
/// (`disks[i]` is disk `DISKS[i]` read raw), and that all past the written range is
/// zero.
fn check_one_instant(
    guest: &Guest,
    disks: &[Vec<u8>],
    window: (u64, u64),
    what: &str,
) -> Result<(), String> {
    let history = guest.history.lock().unwrap();
    let mut possible: Instants = vec![(window.0, window.1 + 1)];
    for (disk, bytes) in disks.iter().enumerate() {
        let name = DISKS[disk];
        if (bytes.len() as u64) < DISK_BYTES {
            return Err(format!(
                "[1 content] {what}: disk {name} reads {} bytes, less than {DISK_BYTES}",
                bytes.len()
            ));
        }
        if let Some(at) = bytes[DISK_BYTES as usize..].iter().position(|&b| b != 0) {
            return Err(format!(
                "[1 content] {what}: disk {name} reads data at {} past what the guest wrote",
                DISK_BYTES as usize + at
            ));
        }
        for (block, writes) in history[disk].iter().enumerate() {
            let offset = block * BLOCK as usize;
            let seen = distinct(&bytes[offset..offset + BLOCK as usize]);
            let instants = block_instants(writes, &seen);
            let next = intersect(&possible, &instants);
            if next.is_empty() {
                let recent: Vec<String> = writes
                    .iter()
                    .rev()
                    .take(6)
                    .map(|w| {
                        let failed = if w.failed { " failed" } else { "" };
                        format!("{:#04x}@{}..{}{failed}", w.pattern, w.start, w.end)
                    })
                    .collect();
                return Err(format!(
                    "[1 content] {what}: disk {name} block {block} (offset {offset}) reads {seen:02x?}, \
                     which no instant still possible explains: possible {possible:?}, this block's \
                     {instants:?}, its last writes (newest first) {recent:?}"
                ));
            }
            possible = next;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The model of what the API must show

#[derive(Clone, Debug)]
struct ModelSnapshot {
    id: String,
    /// The logical clock when its job was accepted and when it was seen ended.
    window: (u64, u64),
}

#[derive(Clone, Debug)]
struct ModelClone {
    id: String,
    window: (u64, u64),
}

#[derive(Clone, Debug)]
enum Op {
    Snapshot,
    Delete(String),
    DeleteAll,
    Clone {
        linked: bool,
        snapshot: Option<ModelSnapshot>,
    },
    Grow {
        disk: usize,
        size: u64,
    },
    DeleteClone(String),
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Delete(_) => "delete",
            Op::DeleteAll => "delete-all",
            Op::Clone {
                linked: true,
                snapshot: None,
            } => "linked-clone-present",
            Op::Clone {
                linked: false,
                snapshot: None,
            } => "full-clone-present",
            Op::Clone { linked: true, .. } => "linked-clone-snapshot",
            Op::Clone { linked: false, .. } => "full-clone-snapshot",
            Op::Grow { .. } => "grow",
            Op::DeleteClone(_) => "delete-clone",
        }
    }
}

/// An accepted job and what the model does with its outcome.
struct Pending {
    op: Op,
    job: String,
    /// The new snapshot or VM the job makes.
    target: String,
    accepted: u64,
    /// The clock when the job was first seen ended, and how it ended.
    ended: Option<(u64, Value)>,
}

#[derive(Default)]
struct Stats {
    cycles: u32,
    writes: u64,
    accepted: BTreeMap<&'static str, u32>,
    succeeded: BTreeMap<&'static str, u32>,
    failed: BTreeMap<String, u32>,
    /// Why jobs failed (each message once, shortened).
    failures: BTreeSet<String>,
    refused: BTreeMap<String, u32>,
    merges: BTreeMap<String, u32>,
    faults: BTreeMap<&'static str, u32>,
}

fn bump<K: Ord>(map: &mut BTreeMap<K, u32>, key: K) {
    *map.entry(key).or_default() += 1;
}

fn counts<K: std::fmt::Display>(map: &BTreeMap<K, u32>) -> String {
    map.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What happens to the processes during one cycle, in milliseconds from the ops'
/// submission.
#[derive(Debug)]
struct Faults {
    kill_strata_at: Option<u64>,
    /// Kill the restarted strata again this long after its start (while recovering).
    kill_again_after: Option<u64>,
    kill_qemu_at: Option<u64>,
    /// How long after QEMU's death the orchestrator marks the VM stopped.
    report_stopped_after: u64,
    /// Kill the qemu-img processes strata runs during this first stretch.
    kill_qemu_img_until: Option<u64>,
    /// What the guest agent does wrong in this cycle.
    agent: AgentFault,
}

/// A guest agent that misbehaves: its freeze fails, or never answers (strata's freeze
/// timeout is 1 s here), or its thaw fails until the given instant (ms), when it
/// answers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentFault {
    None,
    FreezeFails,
    FreezeHangs,
    ThawFailsUntil(u64),
}

// ---------------------------------------------------------------------------------
// One seed

struct SeedRun {
    seed: u64,
    rng: Rng,
    app: TestApp,
    env: Vec<(String, String)>,
    run_dir: PathBuf,
    _run_dir: tempfile::TempDir,
    scratch: tempfile::TempDir,
    guest: Arc<Guest>,
    vm_id: String,
    disk_ids: Vec<String>,
    process: Option<RunningVm>,
    /// The guest's agent (a double), given to strata with every boot.
    agent: AgentDouble,
    writer: Option<Writer>,
    /// The VM's QEMU was killed while the guest wrote (leaks are then allowed).
    qemu_crashed: bool,
    qemu_killed_this_cycle: bool,
    snapshots: Vec<ModelSnapshot>,
    clones: Vec<ModelClone>,
    sizes: Vec<u64>,
    names: u32,
    cycle: u32,
    log: Vec<String>,
    stats: Stats,
}

impl SeedRun {
    async fn start(seed: u64) -> Result<Self, String> {
        let (run_dir_guard, run_dir) = run_dir();
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let env = vec![
            (
                "STRATA_RUNTIME_DIR".to_owned(),
                run_dir.display().to_string(),
            ),
            // A freeze that hangs fails within a second.
            ("STRATA_FREEZE_TIMEOUT".to_owned(), "1".to_owned()),
        ];
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
        let app = TestApp::launch(Launch {
            env: &pairs,
            dir: None,
            log: Some(scratch.path().join("service.log")),
        })
        .await;
        app.wait_ready().await;
        let disks: Vec<Value> = DISKS
            .iter()
            .map(|name| json!({"name": name, "size_bytes": DISK_BYTES}))
            .collect();
        let (status, vm) = app
            .post("/v1/vms", json!({"name": "live", "disks": disks}))
            .await;
        if status != StatusCode::ACCEPTED {
            return Err(format!("creating the VM answered {status}: {vm}"));
        }
        let vm_id = vm["target"]["id"].as_str().unwrap().to_owned();
        let agent = AgentDouble::start(&run_dir);
        let mut run = Self {
            seed,
            rng: Rng::new(seed),
            app,
            env,
            run_dir,
            _run_dir: run_dir_guard,
            scratch,
            guest: Arc::new(Guest::new()),
            vm_id,
            disk_ids: Vec::new(),
            process: None,
            agent,
            writer: None,
            qemu_crashed: false,
            qemu_killed_this_cycle: false,
            snapshots: Vec::new(),
            clones: Vec::new(),
            sizes: vec![DISK_BYTES; DISKS.len()],
            names: 0,
            cycle: 0,
            log: Vec::new(),
            stats: Stats::default(),
        };
        let view = run.wait_vm_ready(&run.vm_id.clone()).await?;
        run.disk_ids = DISKS
            .iter()
            .map(|name| disk_of(&view, name).map(|d| d["id"].as_str().unwrap().to_owned()))
            .collect::<Result<_, _>>()?;
        run.boot().await?;
        Ok(run)
    }

    fn note(&mut self, line: impl Into<String>) {
        self.log.push(format!("[{}] {}", self.cycle, line.into()));
    }

    async fn run(&mut self, cycles: u32) -> Result<(), String> {
        for cycle in 1..=cycles {
            self.cycle = cycle;
            self.run_cycle().await?;
            self.stats.cycles = cycle;
        }
        Ok(())
    }

    async fn run_cycle(&mut self) -> Result<(), String> {
        self.qemu_killed_this_cycle = false;
        // Let the guest write a while first.
        sleep_ms(self.rng.range(0, 300)).await;
        let ops = self.choose_ops();
        let faults = self.choose_faults();
        self.note(format!("faults {faults:?}"));
        self.set_agent(faults.agent);
        match faults.agent {
            AgentFault::None => {}
            AgentFault::FreezeFails => bump(&mut self.stats.faults, "agent-freeze-fails"),
            AgentFault::FreezeHangs => bump(&mut self.stats.faults, "agent-freeze-hangs"),
            AgentFault::ThawFailsUntil(_) => bump(&mut self.stats.faults, "agent-thaw-fails"),
        }
        let mut pending = Vec::new();
        for op in ops {
            if let Some(job) = self.submit(op).await? {
                pending.push(job);
            }
        }
        self.run_faults_and_wait(&faults, &mut pending).await?;
        // No path leaves a guest frozen that strata froze: not an error, a cancel, a
        // timeout, a crash of strata, nor a thaw that failed for a while.
        if !self.qemu_killed_this_cycle && self.agent.frozen() {
            return Err("[5 state] every job ended, and the guest is still frozen".into());
        }
        self.power_off().await?;
        // A guest that boots again is not frozen, whatever its last life was.
        self.agent.state.lock().unwrap().frozen = false;
        self.apply(&pending)?;
        self.check().await?;
        self.rewrite_torn_blocks().await?;
        self.boot().await
    }

    fn choose_ops(&mut self) -> Vec<Op> {
        let mut ops = Vec::new();
        let count = if self.rng.chance(30) { 2 } else { 1 };
        while ops.len() < count {
            let op = self.choose_op();
            // Delete-all's outcome does not compose with a snapshot taken beside it, nor
            // two grows of one disk with each other.
            let grow = |op: &Op| matches!(op, Op::Grow { .. });
            if (matches!(op, Op::DeleteAll) && !ops.is_empty())
                || (grow(&op) && ops.iter().any(grow))
            {
                continue;
            }
            let solo = matches!(op, Op::DeleteAll);
            ops.push(op);
            if solo {
                break;
            }
        }
        ops
    }

    fn choose_op(&mut self) -> Op {
        loop {
            let roll = self.rng.below(100);
            let op = match roll {
                0..30 if self.snapshots.len() < MAX_SNAPSHOTS => Op::Snapshot,
                30..55 if !self.snapshots.is_empty() => {
                    let id = self.rng.pick(&self.snapshots).unwrap().id;
                    Op::Delete(id)
                }
                55..60 if !self.snapshots.is_empty() => Op::DeleteAll,
                60..80 if self.clones.len() < MAX_CLONES => {
                    let from_snapshot = self.rng.chance(30);
                    let snapshot = if from_snapshot {
                        self.rng.pick(&self.snapshots)
                    } else {
                        None
                    };
                    Op::Clone {
                        linked: self.rng.chance(50),
                        snapshot,
                    }
                }
                80..88 => {
                    let disk = self.rng.index(DISKS.len());
                    let size = self.sizes[disk] + self.rng.range(1, 4) * MIB;
                    if size > MAX_GROWN {
                        continue;
                    }
                    Op::Grow { disk, size }
                }
                88..100 if !self.clones.is_empty() => {
                    Op::DeleteClone(self.rng.pick(&self.clones).unwrap().id)
                }
                _ => continue,
            };
            return op;
        }
    }

    fn choose_faults(&mut self) -> Faults {
        let kill_strata_at = self.rng.chance(40).then(|| self.rng.range(0, 1500));
        let kill_again_after =
            (kill_strata_at.is_some() && self.rng.chance(30)).then(|| self.rng.range(0, 400));
        let kill_qemu_at = self.rng.chance(25).then(|| self.rng.range(0, 1500));
        let report_stopped_after = self.rng.range(0, 800);
        let kill_qemu_img_until = self.rng.chance(15).then(|| self.rng.range(200, 2000));
        let agent = match self.rng.below(10) {
            0 => AgentFault::FreezeFails,
            1 => AgentFault::FreezeHangs,
            2 => AgentFault::ThawFailsUntil(self.rng.range(500, 4000)),
            _ => AgentFault::None,
        };
        Faults {
            kill_strata_at,
            kill_again_after,
            kill_qemu_at,
            report_stopped_after,
            kill_qemu_img_until,
            agent,
        }
    }

    /// A live request's consistency: crash, or a freeze required or best effort.
    fn consistency(&mut self) -> Value {
        match self.rng.below(10) {
            0..4 => json!({"consistency": "crash"}),
            4..7 => json!({"quiesce": "best_effort"}),
            _ => json!({"quiesce": "required"}),
        }
    }

    /// Make the guest agent behave as `fault` says for this cycle.
    fn set_agent(&self, fault: AgentFault) {
        let (freeze, thaw) = match fault {
            AgentFault::None => (Behaviour::Answer, Behaviour::Answer),
            AgentFault::FreezeFails => (Behaviour::Fail, Behaviour::Answer),
            AgentFault::FreezeHangs => (Behaviour::Hang, Behaviour::Answer),
            AgentFault::ThawFailsUntil(_) => (Behaviour::Answer, Behaviour::Fail),
        };
        self.agent.set("guest-fsfreeze-freeze", freeze);
        self.agent.set("guest-fsfreeze-thaw", thaw);
    }

    /// Submit `op`; the job when it was accepted, `None` when refused (a 4xx that
    /// changes nothing).
    async fn submit(&mut self, op: Op) -> Result<Option<Pending>, String> {
        self.names += 1;
        let vm = self.vm_id.clone();
        let (method, path, body) = match &op {
            Op::Snapshot => {
                let mut body = self.consistency();
                body["name"] = json!(format!("s{}", self.names));
                (Method::POST, format!("/v1/vms/{vm}/snapshots"), Some(body))
            }
            Op::Delete(id) => (Method::DELETE, format!("/v1/snapshots/{id}"), None),
            Op::DeleteAll => (Method::DELETE, format!("/v1/vms/{vm}/snapshots"), None),
            Op::Clone { linked, snapshot } => {
                let mut body = json!({
                    "name": format!("c{}", self.names),
                    "mode": if *linked { "linked" } else { "full" },
                });
                match snapshot {
                    Some(snapshot) => body["snapshot_id"] = json!(snapshot.id),
                    None => {
                        let consistency = self.consistency();
                        for (key, value) in consistency.as_object().unwrap() {
                            body[key] = value.clone();
                        }
                    }
                }
                (Method::POST, format!("/v1/vms/{vm}/clone"), Some(body))
            }
            Op::Grow { disk, size } => (
                Method::POST,
                format!("/v1/vms/{vm}/disks/{}/resize", self.disk_ids[*disk]),
                Some(json!({"size_bytes": size})),
            ),
            Op::DeleteClone(id) => (Method::DELETE, format!("/v1/vms/{id}"), None),
        };
        let accepted = self.guest.tick();
        let (status, answer) = self.app.request(method.clone(), &path, body).await;
        let kind = op.kind();
        if status == StatusCode::ACCEPTED {
            bump(&mut self.stats.accepted, kind);
            let job = answer["id"].as_str().unwrap_or_default().to_owned();
            let target = answer["target"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            self.note(format!(
                "{kind} {method} {path}: job {} (target {})",
                short(&job),
                short(&target)
            ));
            return Ok(Some(Pending {
                op,
                job,
                target,
                accepted,
                ended: None,
            }));
        }
        if status.is_client_error() {
            let code = answer["code"].as_str().unwrap_or("?").to_owned();
            self.note(format!("{kind} {method} {path}: refused {status} {code}"));
            bump(&mut self.stats.refused, format!("{kind} {code}"));
            return Ok(None);
        }
        Err(format!(
            "[5 state] {kind} {method} {path} answered {status}: {answer}"
        ))
    }

    /// Inject the cycle's faults at their instants while polling the jobs, until every
    /// job has ended and every fault happened.
    async fn run_faults_and_wait(
        &mut self,
        faults: &Faults,
        pending: &mut [Pending],
    ) -> Result<(), String> {
        let started = Instant::now();
        let mut strata_killed = false;
        let mut qemu_killed_at: Option<Instant> = None;
        let mut reported_stopped = false;
        let mut last_fault = started;
        let mut killed_img: BTreeSet<u32> = BTreeSet::new();
        loop {
            let elapsed = started.elapsed().as_millis() as u64;
            if let Some(at) = faults.kill_qemu_at
                && elapsed >= at
                && qemu_killed_at.is_none()
            {
                self.kill_qemu();
                qemu_killed_at = Some(Instant::now());
                last_fault = Instant::now();
            }
            if let Some(died) = qemu_killed_at
                && !reported_stopped
                && died.elapsed().as_millis() as u64 >= faults.report_stopped_after
            {
                self.mark_stopped().await?;
                self.note("the VM reported stopped (its QEMU died)");
                reported_stopped = true;
            }
            if let Some(at) = faults.kill_strata_at
                && elapsed >= at
                && !strata_killed
            {
                strata_killed = true;
                self.kill_strata(faults.kill_again_after).await;
                last_fault = Instant::now();
            }
            if let AgentFault::ThawFailsUntil(until) = faults.agent
                && elapsed >= until
            {
                self.set_agent(AgentFault::None);
            }
            if let Some(until) = faults.kill_qemu_img_until
                && elapsed < until
                && let Some(pid) = self.app.pid()
            {
                for child in children_named(pid, "qemu-img") {
                    if killed_img.insert(child) {
                        kill_process(child);
                        bump(&mut self.stats.faults, "qemu-img-kill");
                        self.note(format!("killed qemu-img {child}"));
                    }
                }
            }
            for job in pending.iter_mut().filter(|p| p.ended.is_none()) {
                let (status, view) = self.app.get(&format!("/v1/jobs/{}", job.job)).await;
                if status != StatusCode::OK {
                    return Err(format!(
                        "[5 jobs] job {} answered {status}: {view}",
                        job.job
                    ));
                }
                if matches!(
                    view["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                ) {
                    job.ended = Some((self.guest.tick(), view));
                }
            }
            let agent_done = match faults.agent {
                AgentFault::ThawFailsUntil(until) => elapsed >= until,
                _ => true,
            };
            let faults_done = agent_done
                && faults.kill_strata_at.is_none_or(|_| strata_killed)
                && faults.kill_qemu_at.is_none_or(|_| reported_stopped)
                && faults
                    .kill_qemu_img_until
                    .is_none_or(|until| elapsed >= until);
            if faults_done && pending.iter().all(|p| p.ended.is_some()) {
                return Ok(());
            }
            if faults_done && last_fault.elapsed() > JOB_DEADLINE {
                let open: Vec<String> = pending
                    .iter()
                    .filter(|p| p.ended.is_none())
                    .map(|p| format!("{} {}", p.op.kind(), p.job))
                    .collect();
                let mut views = Vec::new();
                for job in &open {
                    let id = job.rsplit(' ').next().unwrap();
                    views.push(self.app.get(&format!("/v1/jobs/{id}")).await.1);
                }
                return Err(format!(
                    "[5 jobs] jobs still not ended {} s after the last fault: {open:?}: {views:?}",
                    JOB_DEADLINE.as_secs()
                ));
            }
            sleep_ms(20).await;
        }
    }

    fn kill_qemu(&mut self) {
        if let Some(process) = self.process.as_mut() {
            process.stop();
            // Writes the proxy held for a pause now fail against the dead QEMU.
            process.gate.open();
            self.qemu_crashed = true;
            self.qemu_killed_this_cycle = true;
            bump(&mut self.stats.faults, "qemu-kill");
            self.note("killed the VM's QEMU");
        }
    }

    async fn kill_strata(&mut self, again_after: Option<u64>) {
        self.app.kill();
        bump(&mut self.stats.faults, "strata-kill");
        let env = self.env.clone();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
        if let Some(after) = again_after {
            self.app.restart_unready(&env);
            sleep_ms(after).await;
            self.app.kill();
            bump(&mut self.stats.faults, "recovery-kill");
            self.note(format!(
                "killed strata, and again {after} ms into its start"
            ));
        } else {
            self.note("killed strata");
        }
        self.app.restart(&env).await;
    }

    async fn mark_stopped(&mut self) -> Result<(), String> {
        let path = format!("/v1/vms/{}", self.vm_id);
        let (status, body) = self.app.patch(&path, json!({"state": "stopped"})).await;
        if status != StatusCode::OK {
            return Err(format!(
                "[5 state] marking the VM stopped answered {status}: {body}"
            ));
        }
        Ok(())
    }

    /// Stop the guest writing, power the VM off hard (its QEMU killed after the
    /// guest's last flush) and mark it stopped.
    async fn power_off(&mut self) -> Result<(), String> {
        if let Some(writer) = self.writer.take() {
            let paused = self.process.as_ref().is_some_and(|p| p.gate.paused());
            let Some(end) = writer.finish().await else {
                return Err(format!(
                    "[5 state] the guest could not write for 60 s after its jobs ended (paused: {paused})"
                ));
            };
            self.stats.writes += end.writes;
            if let Some((at, output)) = &end.failure {
                self.note(format!("a guest write failed at {at}: {output}"));
                if !self.qemu_killed_this_cycle {
                    return Err(format!(
                        "[1 content] a guest write failed while its QEMU ran: {output}"
                    ));
                }
            }
        }
        if let Some(mut process) = self.process.take() {
            process.stop();
            // A QEMU killed by the cycle's fault was reported stopped then.
            if !self.qemu_killed_this_cycle {
                self.mark_stopped().await?;
            }
        }
        Ok(())
    }

    /// Apply each ended job to the model: a success whole, anything else not at all.
    fn apply(&mut self, pending: &[Pending]) -> Result<(), String> {
        for p in pending {
            let (ended_at, view) = p.ended.as_ref().expect("every job ended");
            let kind = p.op.kind();
            let status = view["status"].as_str().unwrap_or_default();
            self.note(format!(
                "{kind} job {} {status}{}",
                short(&p.job),
                view["error"]["code"]
                    .as_str()
                    .map_or(String::new(), |c| format!(
                        " ({c}: {})",
                        view["error"]["message"]
                    ))
            ));
            if status != "succeeded" {
                let code = view["error"]["code"].as_str().unwrap_or(status);
                bump(&mut self.stats.failed, format!("{kind} {code}"));
                let message = view["error"]["message"].as_str().unwrap_or_default();
                let message: String = message.chars().take(160).collect();
                self.stats.failures.insert(format!("{kind}: {message}"));
                continue;
            }
            bump(&mut self.stats.succeeded, kind);
            let window = (p.accepted, *ended_at);
            match &p.op {
                Op::Snapshot => self.snapshots.push(ModelSnapshot {
                    id: p.target.clone(),
                    window,
                }),
                Op::Delete(id) => {
                    for merge in view["detail"]["merges"].as_array().into_iter().flatten() {
                        let action = merge["action"].as_str().unwrap_or("?");
                        bump(&mut self.stats.merges, action.to_owned());
                    }
                    self.snapshots.retain(|s| s.id != *id);
                }
                Op::DeleteAll => self.snapshots.clear(),
                Op::Clone { snapshot, .. } => self.clones.push(ModelClone {
                    id: p.target.clone(),
                    window: snapshot.as_ref().map_or(window, |s| s.window),
                }),
                Op::Grow { disk, size } => self.sizes[*disk] = *size,
                Op::DeleteClone(id) => self.clones.retain(|c| c.id != *id),
            }
        }
        Ok(())
    }

    /// The invariants of the module docs, on a stopped VM.
    async fn check(&mut self) -> Result<(), String> {
        let now = self.guest.tick();
        let vm = self.wait_vm_ready(&self.vm_id.clone()).await?;
        for (i, name) in DISKS.iter().enumerate() {
            let disk = disk_of(&vm, name)?;
            if disk["size_bytes"].as_u64() != Some(self.sizes[i]) {
                return Err(format!(
                    "[5 state] disk {name} is {} bytes, the model says {}",
                    disk["size_bytes"], self.sizes[i]
                ));
            }
        }
        // 1: the present holds every durable write.
        let present = self.read_disks(&vm, |disk| disk["active_path"].as_str())?;
        check_one_instant(&self.guest, &present, (now, now), "the present state")?;

        // 2, 5: the snapshots are the model's, each one instant.
        let (status, list) = self
            .app
            .get(&format!("/v1/vms/{}/snapshots?limit=1000", self.vm_id))
            .await;
        if status != StatusCode::OK {
            return Err(format!("[5 state] listing snapshots answered {status}"));
        }
        let listed: BTreeMap<String, Value> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["id"].as_str().unwrap().to_owned(), s.clone()))
            .collect();
        let modelled: BTreeSet<&String> = self.snapshots.iter().map(|s| &s.id).collect();
        if listed.keys().collect::<BTreeSet<_>>() != modelled {
            return Err(format!(
                "[model] the API lists snapshots {:?}, the model has {modelled:?}",
                listed.keys().collect::<Vec<_>>()
            ));
        }
        for snapshot in &self.snapshots {
            let view = &listed[&snapshot.id];
            if view["status"] != "ready" {
                return Err(format!(
                    "[5 state] snapshot {} is {}",
                    snapshot.id, view["status"]
                ));
            }
            let reads = self.read_snapshot(view)?;
            let what = format!("snapshot {}", short(&snapshot.id));
            check_one_instant(&self.guest, &reads, snapshot.window, &what)?;
        }

        // 2, 5: the clones are the model's, each one instant of the source.
        let (_, vms) = self.app.get("/v1/vms?limit=1000").await;
        let mut listed_vms: BTreeSet<String> = vms["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        listed_vms.remove(&self.vm_id);
        let modelled: BTreeSet<String> = self.clones.iter().map(|c| c.id.clone()).collect();
        if listed_vms != modelled {
            return Err(format!(
                "[model] the API lists clones {listed_vms:?}, the model has {modelled:?}"
            ));
        }
        let mut views = vec![vm];
        for clone in self.clones.clone() {
            let view = self.wait_vm_ready(&clone.id).await?;
            let reads = self.read_disks(&view, |disk| disk["active_path"].as_str())?;
            let what = format!("clone {}", short(&clone.id));
            check_one_instant(&self.guest, &reads, clone.window, &what)?;
            views.push(view);
        }

        // 3, 4, 5: the files.
        self.check_files(&views, &listed).await
    }

    /// Chains in the API against the files, no orphan, each file clean.
    async fn check_files(
        &self,
        vms: &[Value],
        snapshots: &BTreeMap<String, Value>,
    ) -> Result<(), String> {
        let mut known: BTreeSet<String> = BTreeSet::new();
        for vm in vms {
            let linked = vm["id"] != self.vm_id.as_str();
            for disk in vm["disks"].as_array().into_iter().flatten() {
                if disk["status"] != "ready" {
                    return Err(format!("[5 state] disk {disk} is not ready"));
                }
                let own: Vec<String> = disk["chain"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| file_name(e["path"].as_str().unwrap_or_default()))
                    .collect();
                let active = disk["active_path"].as_str().unwrap_or_default();
                let files = backing_chain(active)?;
                let linked_disk = linked && !disk["source_volume_id"].is_null();
                if files.len() < own.len()
                    || files[..own.len()] != own[..]
                    || (!linked_disk && files.len() != own.len())
                {
                    return Err(format!(
                        "[3 chain] disk {} of VM {}: the API's chain {own:?}, the files' {files:?}",
                        disk["name"], vm["name"]
                    ));
                }
                known.extend(files);
            }
        }
        for view in snapshots.values() {
            for volume in view["volumes"].as_array().into_iter().flatten() {
                known.extend(backing_chain(volume["path"].as_str().unwrap_or_default())?);
            }
        }
        let on_disk: BTreeSet<String> = self
            .app
            .volume_files()
            .iter()
            .map(|p| file_name(&p.display().to_string()))
            .collect();
        if on_disk != known {
            let orphans: Vec<&String> = on_disk.difference(&known).collect();
            let missing: Vec<&String> = known.difference(&on_disk).collect();
            return Err(format!(
                "[4 files] orphan files {orphans:?}, missing files {missing:?}"
            ));
        }
        for file in self.app.volume_files() {
            check_image(&file, self.qemu_crashed)?;
        }
        Ok(())
    }

    /// Each disk of `vm` (in `DISKS` order) read raw from the file `path_of` names.
    fn read_disks(
        &self,
        vm: &Value,
        path_of: impl Fn(&Value) -> Option<&str>,
    ) -> Result<Vec<Vec<u8>>, String> {
        DISKS
            .iter()
            .map(|name| {
                let disk = disk_of(vm, name)?;
                let path = path_of(disk).ok_or_else(|| format!("disk {name} has no file"))?;
                self.read_raw(path)
            })
            .collect()
    }

    fn read_snapshot(&self, view: &Value) -> Result<Vec<Vec<u8>>, String> {
        self.disk_ids
            .iter()
            .map(|disk| {
                let volume = view["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["disk_id"] == disk.as_str())
                    .ok_or_else(|| format!("[5 state] snapshot {view} does not cover {disk}"))?;
                self.read_raw(volume["path"].as_str().unwrap_or_default())
            })
            .collect()
    }

    /// What a qcow2 chain reads, as raw bytes.
    fn read_raw(&self, path: &str) -> Result<Vec<u8>, String> {
        let out = self.scratch.path().join("read.raw");
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw", path])
            .arg(&out)
            .output()
            .map_err(|e| e.to_string())?;
        if !status.status.success() {
            return Err(format!(
                "[1 content] qemu-img convert {path}: {}",
                String::from_utf8_lossy(&status.stderr)
            ));
        }
        std::fs::read(&out).map_err(|e| e.to_string())
    }

    /// Blocks a write was torn in by QEMU's death now read old, new or both: the
    /// orchestrator's next boot sees whatever landed, so give them a known pattern
    /// again (offline, straight into the disk's file) before the guest runs on.
    async fn rewrite_torn_blocks(&mut self) -> Result<(), String> {
        let torn = self.guest.torn_blocks();
        if torn.is_empty() {
            return Ok(());
        }
        let vm = self.wait_vm_ready(&self.vm_id.clone()).await?;
        for (disk, block) in torn {
            let path = disk_of(&vm, DISKS[disk])?["active_path"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let pattern = self.guest.next_pattern();
            let start = self.guest.tick();
            let offset = block as u64 * BLOCK;
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c"])
                .arg(format!("write -P {pattern:#x} {offset} {BLOCK}"))
                .arg(&path)
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("rewriting a torn block: {out:?}"));
            }
            let end = self.guest.tick();
            let write = GuestWrite {
                pattern,
                start,
                end,
                failed: false,
            };
            self.guest.record(disk, block..block + 1, write);
        }
        Ok(())
    }

    /// Start the VM's QEMU on the API's active paths, mark it running, let the guest
    /// write.
    async fn boot(&mut self) -> Result<(), String> {
        let vm = self.wait_vm_ready(&self.vm_id.clone()).await?;
        let actives: Vec<String> = DISKS
            .iter()
            .map(|name| {
                disk_of(&vm, name).map(|d| d["active_path"].as_str().unwrap_or_default().into())
            })
            .collect::<Result<_, _>>()?;
        let pausable = self.rng.chance(60);
        let process = if pausable {
            RunningVm::start_pausable(&self.run_dir, &actives)
        } else {
            RunningVm::start(&self.run_dir, &actives)
        };
        let path = format!("/v1/vms/{}", self.vm_id);
        let (status, body) = self
            .app
            .patch(
                &path,
                json!({"state": "running", "qmp_socket": process.qmp, "guest_agent_socket": self.agent.socket}),
            )
            .await;
        if status != StatusCode::OK {
            return Err(format!(
                "[5 state] marking the VM running answered {status}: {body}"
            ));
        }
        let writer_seed = self.rng.next();
        self.writer = Some(Writer::start(
            Arc::clone(&self.guest),
            &process,
            writer_seed,
        ));
        self.note(format!(
            "booted (pid {}, {})",
            process.pid(),
            if pausable { "pausable" } else { "not pausable" }
        ));
        self.process = Some(process);
        Ok(())
    }

    /// The VM's view once nothing in it is being created, deleted or rewritten.
    async fn wait_vm_ready(&self, id: &str) -> Result<Value, String> {
        let mut last = Value::Null;
        for _ in 0..1500 {
            let (status, view) = self.app.get(&format!("/v1/vms/{id}")).await;
            if status != StatusCode::OK {
                return Err(format!("[5 state] VM {id} answered {status}: {view}"));
            }
            let disks_ready = view["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|d| d["status"] == "ready" && d["active_path"].is_string());
            if view["status"] == "ready" && disks_ready {
                return Ok(view);
            }
            last = view;
            sleep_ms(20).await;
        }
        Err(format!("[5 state] VM {id} not ready after 30 s: {last}"))
    }

    fn summary(&self, cycles: u32, started: Instant, held: bool) -> String {
        let s = &self.stats;
        format!(
            "torture seed {}: {} of {cycles} cycles in {:.1} s{} (live)\n  guest writes {}; jobs accepted [{}]; succeeded [{}]; failed [{}]; refused [{}]\n  merges [{}]; faults [{}]{}",
            self.seed,
            s.cycles,
            started.elapsed().as_secs_f64(),
            if held {
                ", all invariants held"
            } else {
                ", FAILED"
            },
            s.writes,
            counts(&s.accepted),
            counts(&s.succeeded),
            counts(&s.failed),
            counts(&s.refused),
            counts(&s.merges),
            counts(&s.faults),
            s.failures
                .iter()
                .map(|f| format!("\n  failed: {f}"))
                .collect::<String>(),
        )
    }

    fn report(&self, cycles: u32, violation: &str) -> String {
        format!(
            "===== TORTURE FAILURE: seed {}, cycle {} =====\n{violation}\n----- operation log -----\n{}\n----- service log (last 80 lines) -----\n{}\n----- rerun: STRATA_LIVE_TORTURE_SEED={} STRATA_LIVE_TORTURE_CYCLES={cycles} cargo test --test api live_torture -- --nocapture",
            self.seed,
            self.cycle,
            self.log.join("\n"),
            self.app.log_tail(80),
            self.seed,
        )
    }

    fn shutdown(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.stop.store(true, Ordering::Relaxed);
        }
        if let Some(mut process) = self.process.take() {
            process.gate.open();
            process.stop();
        }
        self.app.kill();
    }
}

fn disk_of<'a>(vm: &'a Value, name: &str) -> Result<&'a Value, String> {
    vm["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["name"] == name)
        .ok_or_else(|| format!("[5 state] VM {} has no disk {name}", vm["id"]))
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(6)..]
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The file names of `path`'s backing chain, top first.
fn backing_chain(path: &str) -> Result<Vec<String>, String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "--backing-chain", path])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "[3 chain] qemu-img info --backing-chain {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let infos: Vec<Value> = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(infos
        .iter()
        .map(|i| file_name(i["filename"].as_str().unwrap_or_default()))
        .collect())
}

/// `qemu-img check`: no corruption; no leak unless QEMU crashed in this seed.
fn check_image(path: &Path, leaks_allowed: bool) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let only_leaks = out.status.code() == Some(3)
        && report["corruptions"].as_u64().unwrap_or(0) == 0
        && report["check-errors"].as_u64().unwrap_or(0) == 0;
    if only_leaks && leaks_allowed {
        return Ok(());
    }
    Err(format!(
        "[2 check] qemu-img check {}: exit {:?}: {}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
