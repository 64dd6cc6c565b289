//! End-to-end benchmarks of the strata service against plain qemu-img.
//!
//! The bench spawns the release binary of the service (the one `cargo bench` built) with
//! the test harness (tests/support: the spawn helper, the typed client and the
//! qemu-io/qemu-img helpers), drives it over HTTP exactly as a client would, and times
//! the same file operations done with qemu-img / qemu-io directly on similar files in
//! the same run. Only the ratios within one run are meaningful: the machines this runs
//! on are shared, so absolute times drift between runs.
//!
//! 1. Snapshot of a VM with 4 disks: POST /v1/vms/{id}/snapshots + waiting for the job,
//!    against 4 sequential `qemu-img create -b` calls; repeated with 64 GiB disks to
//!    show the cost does not depend on the virtual size. Target: under 1.3; issue 13's
//!    goal: at most 0.3, still flat in disk size.
//! 2. Deleting a snapshot in each merge direction: the service must pick the cheaper of
//!    commit and stream (job `detail.merges[0]`); compared with the plain qemu-img
//!    command for that direction and with the opposite (wrong) direction.
//! 3. The scheduler (`scheduler.rs`): finding due schedules among 10,000, and pruning
//!    1,000 expired snapshots across 100 VMs against the same merges by hand.
//! 4. Clones and templates (`clones.rs`): linked clone time against the disk size,
//!    full clone against plain `qemu-img convert` + `sync` of the same chain, a batch
//!    deploy of 100 linked VMs.
//! 5. The event stream (`events.rs`): reads and snapshots with no subscriber against
//!    the same with 100 subscribers of `/v1/events` reading every event.
//! 6. Reads against a hello-world (`reads.rs`): `GET /v1/vms/{id}`, `/v1/jobs/{id}` and
//!    `/v1/snapshots/{id}` driven by wrk, against an axum hello-world in this process
//!    answering the same routes with the same bytes.
//! 7. Listing at scale (`listing.rs`): a seeded database of 10,000 VMs and 100,490
//!    snapshots, paged 100 VMs at a time; the snapshot tree of a VM with 500; one VM's
//!    read among 10,000 against the same VM alone.
//! 8. A snapshot storm (`storm.rs`): 1,000 one-disk VMs snapshotted at once against
//!    1,000 sequential `qemu-img create`.
//!
//! The printed section opens with the goals of issue 13 (`goals.rs`): each one's
//! measured ratio or time beside its target, and whether it is met.
//!
//! `--only-snapshots` (1), `--only-scheduler`, `--only-clones`, `--only-live`,
//! `--only-events`, `--only-reads` (6 and 7) and `--only-storm` (8) run one part alone
//! and print it without touching the docs.
//!
//! Prints a Markdown table and rewrites the "Latest run" section of docs/benchmarks.md.
//! Any HTTP status, job status or qemu tool failure aborts the run with the details (the
//! harness panics with them, after the last lines of the service log); a wrong merge
//! direction or a content mismatch is recorded, reported and makes the bench exit
//! non-zero after writing its figures. A goal of issue 13 not met is reported in the
//! goals table and does not change the exit status.

#[path = "strata/clones.rs"]
mod clones;
#[path = "strata/events.rs"]
mod events;
#[path = "strata/goals.rs"]
mod goals;
#[path = "strata/listing.rs"]
mod listing;
#[path = "strata/live.rs"]
mod live;
#[path = "strata/reads.rs"]
mod reads;
#[path = "strata/scheduler.rs"]
mod scheduler;
#[path = "strata/storm.rs"]
mod storm;
// The tests' harness; the bench uses only part of what it re-exports.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use support::{
    DiskViewExt, JobView, JobViewExt, Launch, MIB, MergeAction, TestApp, Uuid, create_image,
    path_str, run_tool, to_json, try_expect_bytes, write_bytes,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const GIB: u64 = 1 << 30;

/// Disks of the VM in the snapshot benchmark.
const DISKS: usize = 4;
/// Timed snapshots per variant (after one untimed warm-up round).
const SNAPSHOT_ROUNDS: usize = 20;
/// Timed deletions per merge case: each copies hundreds of MiB in the wrong direction,
/// so a few rounds keep the run short while a median still filters one outlier.
const DELETE_ROUNDS: usize = 3;
/// Service/plain ratio the snapshot path is expected to stay under.
const SNAPSHOT_TARGET_RATIO: f64 = 1.3;
/// Issue 13's goal for the same ratio.
const SNAPSHOT_GOAL_RATIO: f64 = 0.3;
/// "Flat in disk size": the 64 GiB snapshot within this factor of the 1 GiB one.
const FLAT_GOAL_RATIO: f64 = 1.25;

fn main() -> ExitCode {
    // `cargo test --all-targets` runs harness-less benches too, without `--bench`: a
    // multi-minute benchmark must not run as part of the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("strata bench: skipped (run it with `cargo bench --bench strata`)");
        return ExitCode::SUCCESS;
    }
    if let Some(at) = std::env::args().position(|a| a == events::SUBSCRIBER_FLAG) {
        let url = std::env::args().nth(at + 1).unwrap_or_default();
        return match events::run_subscribers(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strata bench subscribers: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(problems) if problems.is_empty() => ExitCode::SUCCESS,
        Ok(problems) => {
            eprintln!("\nstrata bench: the service misbehaved:");
            for problem in &problems {
                eprintln!("  - {problem}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\nstrata bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<Vec<String>> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // One temporary directory for the service's data and the plain baselines, so both
    // sides write to the same file system.
    let work = tempfile::Builder::new().prefix("strata-bench-").tempdir()?;
    let machine = Machine::describe(work.path())?;
    // The client is async; the bench itself is sequential and times external
    // processes, so each part runs to its end on one thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let scheduler_part = || -> Result<(String, Vec<String>)> {
        eprintln!("strata bench: scheduler");
        // Builds its own runtime (it drives the store directly), so not inside `rt`.
        let due = scheduler::bench_due(work.path())?;
        let prune = rt.block_on(scheduler::bench_prune(work.path()))?;
        Ok(scheduler::report(&due, &prune))
    };
    if std::env::args().any(|a| a == "--only-scheduler") {
        let (section, problems) = scheduler_part()?;
        println!("{section}");
        return Ok(problems);
    }
    if std::env::args().any(|a| a == "--only-storm") {
        // On a service of its own: the shared one is not needed.
        let figures = rt.block_on(storm::bench_storm(work.path()))?;
        let (section, problems) = storm::report(&figures);
        println!("{}{section}", goals::table(&storm::goals(&figures)));
        return Ok(problems);
    }
    let app = rt.block_on(start_service(work.path(), "service", &[]))?;
    if std::env::args().any(|a| a == "--only-live") {
        let figures = rt.block_on(live::bench_live(work.path()))?;
        let (section, problems) = live::report(&figures);
        println!("{section}");
        return Ok(problems);
    }
    if std::env::args().any(|a| a == "--only-events") {
        let figures = rt.block_on(events::bench_events(&app))?;
        let (section, problems) = events::report(&figures);
        println!("{section}");
        return Ok(problems);
    }
    if std::env::args().any(|a| a == "--only-reads") {
        let reads = rt.block_on(reads::bench_reads(&app))?;
        drop(app);
        let listing = rt.block_on(listing::bench_listing(work.path()))?;
        let mut goals = reads::goals(&reads);
        goals.extend(listing::goals(&listing));
        let (listing_section, problems) = listing::report(&listing);
        println!(
            "{}{}{listing_section}",
            goals::table(&goals),
            reads::report(&reads)
        );
        return Ok(problems);
    }
    if std::env::args().any(|a| a == "--only-snapshots") {
        let snapshots = rt.block_on(bench_snapshots(&app, work.path()))?;
        let goals = snapshot_goals(&snapshots);
        println!("{}", report(&machine, &goals, &snapshots, &[], &[]));
        return Ok(Vec::new());
    }
    if std::env::args().any(|a| a == "--only-clones") {
        let figures = rt.block_on(clones::bench_clones(&app, work.path()))?;
        let (section, problems) = clones::report(&figures);
        println!("{}{section}", goals::table(&clones::goals(&figures)));
        return Ok(problems);
    }
    eprintln!(
        "strata bench: service at {}, work dir {}",
        app.base,
        work.path().display()
    );

    let outcome = rt.block_on(async {
        let snapshots = bench_snapshots(&app, work.path()).await?;
        let merges = bench_merges(&app, work.path()).await?;
        let clones = clones::bench_clones(&app, work.path()).await?;
        let events = events::bench_events(&app).await?;
        let reads = reads::bench_reads(&app).await?;
        Ok::<_, Box<dyn std::error::Error>>((snapshots, merges, clones, events, reads))
    });
    let (snapshots, merges, clone_figures, event_figures, read_figures) = match outcome {
        Ok(figures) => figures,
        Err(e) => {
            // The service's own account of what went wrong is in its log.
            eprintln!(
                "--- last lines of the service log ---\n{}",
                app.log_tail(40)
            );
            return Err(e);
        }
    };
    drop(app);

    let mut problems = Vec::new();
    for merge in &merges {
        problems.extend(merge.problems.iter().cloned());
    }
    // Listing and the storm run services of their own.
    let listing_figures = rt.block_on(listing::bench_listing(work.path()))?;
    let (listing_section, listing_problems) = listing::report(&listing_figures);
    problems.extend(listing_problems);
    let storm_figures = rt.block_on(storm::bench_storm(work.path()))?;
    let (storm_section, storm_problems) = storm::report(&storm_figures);
    problems.extend(storm_problems);
    let live_figures = rt.block_on(live::bench_live(work.path()))?;
    let (live_section, live_problems) = live::report(&live_figures);
    problems.extend(live_problems);
    let (clones_section, clones_problems) = clones::report(&clone_figures);
    let (events_section, events_problems) = events::report(&event_figures);
    problems.extend(events_problems);
    let (scheduler_section, scheduler_problems) = scheduler_part()?;
    problems.extend(clones_problems);
    problems.extend(scheduler_problems);
    let mut goals = snapshot_goals(&snapshots);
    goals.extend(storm::goals(&storm_figures));
    goals.extend(reads::goals(&read_figures));
    goals.extend(listing::goals(&listing_figures));
    goals.extend(clones::goals(&clone_figures));
    let mut section = report(&machine, &goals, &snapshots, &merges, &problems);
    section.push_str(&clones_section);
    section.push_str(&events_section);
    section.push_str(&reads::report(&read_figures));
    section.push_str(&listing_section);
    section.push_str(&storm_section);
    section.push_str(&live_section);
    section.push_str(&scheduler_section);
    println!("\n{section}");
    let doc = manifest_dir.join("docs").join("benchmarks.md");
    write_latest_run(&doc, &section)?;
    eprintln!("strata bench: wrote {}", doc.display());
    Ok(problems)
}

// ---------------------------------------------------------------------------------------
// The service, through the test harness
// ---------------------------------------------------------------------------------------

/// Start the service (the release binary `cargo bench` built) over a directory in
/// `work`, with the service's own defaults (4 workers, its default log level, here into
/// `work/<name>.log`) plus `env`.
async fn start_service(work: &Path, name: &str, env: &[(&str, &str)]) -> Result<TestApp> {
    let mut env = env.to_vec();
    if !env.iter().any(|(key, _)| *key == "STRATA_WORKERS") {
        env.push(("STRATA_WORKERS", "4"));
    }
    // The tests check every read from memory against the database; a deployed
    // service does not.
    env.push(("STRATA_VERIFY_READS", "false"));
    let mut app = TestApp::launch(Launch {
        env: &env,
        dir: Some(tempfile::Builder::new().prefix(name).tempdir_in(work)?),
        log: Some(work.join(format!("{name}.log"))),
    })
    .await;
    // The tests refuse connection reuse (a 413 may close one early); the bench keeps
    // connections alive, as a client would, so that connecting is not part of what
    // is timed. Above the longest long-poll (?wait=30): a slow job is not a hang.
    app.client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()?;
    Ok(app)
}

/// Create a VM with `disks` disks (`disk0`...) of `size` bytes; its id.
async fn create_vm(app: &TestApp, name: &str, disks: usize, size: u64) -> Uuid {
    let names: Vec<String> = (0..disks).map(|i| format!("disk{i}")).collect();
    let disks: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), size)).collect();
    app.create_vm(name, &disks).await.id
}

/// Take a snapshot: the request and its job, to the end; the snapshot's id.
async fn snapshot(app: &TestApp, vm: Uuid, name: &str) -> Uuid {
    let path = format!("/v1/vms/{vm}/snapshots");
    let job = app.run_job(Method::POST, &path, Some(json!({ "name": name })));
    job.await.target.id
}

/// The writable top file of each disk, in the service's disk order.
async fn active_paths(app: &TestApp, vm: Uuid) -> Vec<PathBuf> {
    let view = app.vm(vm).await;
    view.disks.iter().map(|d| PathBuf::from(d.path())).collect()
}

/// Chain length of each disk (1 = a single standalone file).
async fn chain_lengths(app: &TestApp, vm: Uuid) -> Vec<usize> {
    let view = app.vm(vm).await;
    view.disks.iter().map(|d| d.chain.len()).collect()
}

async fn single_active_path(app: &TestApp, vm: Uuid) -> Result<PathBuf> {
    match <[PathBuf; 1]>::try_from(active_paths(app, vm).await) {
        Ok([path]) => Ok(path),
        Err(paths) => Err(format!("VM {vm} should have one disk, has {}", paths.len()).into()),
    }
}

// ---------------------------------------------------------------------------------------
// Plain qemu tools, timed
// ---------------------------------------------------------------------------------------

/// `qemu-img commit -d` of `top` into `base`, timed: the plain baseline of a merge.
fn plain_commit(base: &Path, top: &Path) -> Result<Duration> {
    timed_tool(
        "qemu-img",
        &[
            "commit",
            "-q",
            "-f",
            "qcow2",
            "-d",
            "-b",
            path_str(base),
            path_str(top),
        ],
    )
}

fn timed_tool(program: &str, args: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    run_tool(program, args)?;
    Ok(start.elapsed())
}

/// Flush dirty pages left by building the test files, so that a timed merge does not
/// pay for writing back data an earlier step produced.
fn sync_fs() -> Result<()> {
    run_tool("sync", &[])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Benchmark 1: snapshot of a 4-disk VM
// ---------------------------------------------------------------------------------------

struct SnapshotFigures {
    service_1g: Vec<Duration>,
    service_64g: Vec<Duration>,
    /// `qemu-img create -b BASE -F qcow2 NEW SIZE`, as an operator would type it.
    plain: Vec<Duration>,
    /// The same with `-u` (backing not opened), which is what the service runs.
    plain_unsafe: Vec<Duration>,
}

/// A chain of plain qcow2 files per disk, grown by one overlay per round as the
/// service's chains are.
struct PlainChains {
    dir: PathBuf,
    tops: Vec<String>,
    size: u64,
    unsafe_backing: bool,
}

impl PlainChains {
    fn new(dir: PathBuf, size: u64, unsafe_backing: bool) -> Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut tops = Vec::new();
        for disk in 0..DISKS {
            let name = format!("disk{disk}-base.qcow2");
            let path = dir.join(&name);
            create_image(&path, size, None, false);
            write_bytes(&path, 0xaa, 0, 64 * MIB);
            tops.push(name);
        }
        Ok(Self {
            dir,
            tops,
            size,
            unsafe_backing,
        })
    }

    /// Put a new overlay on every disk's top, one qemu-img call after the other; the
    /// backing is named relative to the overlay's directory, as the service does.
    fn add_layer(&mut self, round: usize) -> Result<Duration> {
        let start = Instant::now();
        for (disk, top) in self.tops.iter_mut().enumerate() {
            let name = format!("disk{disk}-{round}.qcow2");
            create_image(
                self.dir.join(&name),
                self.size,
                Some(top),
                self.unsafe_backing,
            );
            *top = name;
        }
        Ok(start.elapsed())
    }
}

async fn bench_snapshots(app: &TestApp, work: &Path) -> Result<SnapshotFigures> {
    eprintln!("strata bench: snapshot of a {DISKS}-disk VM, {SNAPSHOT_ROUNDS} rounds");
    let vm_1g = create_vm(app, "bench-snap-1g", DISKS, GIB).await;
    let vm_64g = create_vm(app, "bench-snap-64g", DISKS, 64 * GIB).await;
    for vm in [vm_1g, vm_64g] {
        for path in active_paths(app, vm).await {
            write_bytes(&path, 0xaa, 0, 64 * MIB);
        }
    }
    let mut plain = PlainChains::new(work.join("plain-snapshot"), GIB, false)?;
    let mut plain_unsafe = PlainChains::new(work.join("plain-snapshot-u"), GIB, true)?;

    let time_snapshot = async |vm: Uuid, round: usize| {
        let start = Instant::now();
        snapshot(app, vm, &format!("round-{round}")).await;
        start.elapsed()
    };
    let mut figures = SnapshotFigures {
        service_1g: vec![],
        service_64g: vec![],
        plain: vec![],
        plain_unsafe: vec![],
    };
    // Variants are interleaved round by round so that a burst of load from other users
    // of the machine hits all of them alike instead of skewing one variant. Round 0
    // warms caches and connections and is not counted.
    for round in 0..=SNAPSHOT_ROUNDS {
        let service_1g = time_snapshot(vm_1g, round).await;
        let service_64g = time_snapshot(vm_64g, round).await;
        let plain_time = plain.add_layer(round)?;
        let plain_unsafe_time = plain_unsafe.add_layer(round)?;
        if round > 0 {
            figures.service_1g.push(service_1g);
            figures.service_64g.push(service_64g);
            figures.plain.push(plain_time);
            figures.plain_unsafe.push(plain_unsafe_time);
        }
    }
    // The data written before the first snapshot must still read through the chain.
    for vm in [vm_1g, vm_64g] {
        for path in active_paths(app, vm).await {
            try_expect_bytes(&path, &[(0xaa, 0, 64 * MIB)])?;
        }
        app.delete_vm(vm).await;
    }
    std::fs::remove_dir_all(&plain.dir)?;
    std::fs::remove_dir_all(&plain_unsafe.dir)?;
    Ok(figures)
}

// ---------------------------------------------------------------------------------------
// Benchmark 2: deleting a snapshot in each merge direction
// ---------------------------------------------------------------------------------------

/// A two-layer chain base <- top. The top's data sits after the base's so that neither
/// layer hides the other: each direction must really copy its side's bytes.
#[derive(Clone, Copy)]
struct MergeCase {
    label: &'static str,
    base_mib: u64,
    top_mib: u64,
    /// The direction the service should choose (the smaller side moves).
    expected: &'static str,
}

const MERGE_CASES: [MergeCase; 2] = [
    MergeCase {
        label: "big base, small top",
        base_mib: 512,
        top_mib: 8,
        expected: "commit",
    },
    MergeCase {
        label: "small base, big top",
        base_mib: 8,
        top_mib: 512,
        expected: "stream",
    },
];

const BASE_PATTERN: u8 = 0xaa;
const TOP_PATTERN: u8 = 0xbb;
const MERGE_DISK_SIZE: u64 = GIB;

impl MergeCase {
    fn base_region(&self) -> (u8, u64, u64) {
        (BASE_PATTERN, 0, self.base_mib * MIB)
    }

    fn top_region(&self) -> (u8, u64, u64) {
        (TOP_PATTERN, self.base_mib * MIB, self.top_mib * MIB)
    }

    /// The opposite of the expected direction.
    fn wrong(&self) -> &'static str {
        if self.expected == "commit" {
            "stream"
        } else {
            "commit"
        }
    }
}

struct MergeFigures {
    case: MergeCase,
    /// `action` of the job's `detail.merges[0]` in each round.
    actions: Vec<String>,
    bytes_to_copy: Vec<u64>,
    service: Vec<Duration>,
    /// The job's own started_at..finished_at: separates the merge itself from queueing
    /// and HTTP round trips in the service's time.
    job_run: Vec<Duration>,
    /// The plain qemu-img command for the expected direction.
    right: Vec<Duration>,
    /// The plain qemu-img command for the opposite direction.
    wrong: Vec<Duration>,
    problems: Vec<String>,
}

async fn bench_merges(app: &TestApp, work: &Path) -> Result<Vec<MergeFigures>> {
    let mut all: Vec<MergeFigures> = MERGE_CASES
        .iter()
        .map(|&case| MergeFigures {
            case,
            actions: vec![],
            bytes_to_copy: vec![],
            service: vec![],
            job_run: vec![],
            right: vec![],
            wrong: vec![],
            problems: vec![],
        })
        .collect();
    for round in 0..DELETE_ROUNDS {
        // Cases alternate within a round for the same reason variants do in benchmark 1.
        for figures in &mut all {
            let case = figures.case;
            eprintln!(
                "strata bench: delete snapshot, {} (round {}/{DELETE_ROUNDS})",
                case.label,
                round + 1
            );
            service_merge(app, case, round, figures).await?;
            figures.right.push(plain_merge(work, case, case.expected)?);
            figures.wrong.push(plain_merge(work, case, case.wrong())?);
        }
    }
    Ok(all)
}

/// The name the API gives a merge action (`commit`, `stream`...).
fn action_name(action: MergeAction) -> String {
    to_json(&action).as_str().unwrap_or_default().to_owned()
}

/// Build base <- top in a fresh VM, delete the snapshot that froze the base, and record
/// the time, the chosen direction and whether the content survived.
async fn service_merge(
    app: &TestApp,
    case: MergeCase,
    round: usize,
    figures: &mut MergeFigures,
) -> Result<()> {
    let name = format!("bench-merge-{}-{round}", case.expected);
    let vm = create_vm(app, &name, 1, MERGE_DISK_SIZE).await;
    let (pattern, offset, len) = case.base_region();
    write_bytes(single_active_path(app, vm).await?, pattern, offset, len);
    let snapshot = snapshot(app, vm, "s1").await;
    let (pattern, offset, len) = case.top_region();
    write_bytes(single_active_path(app, vm).await?, pattern, offset, len);
    sync_fs()?;

    let start = Instant::now();
    let job = app.delete_snapshot(snapshot).await;
    figures.service.push(start.elapsed());
    figures.job_run.push(job_run_time(&job)?);

    let Some(merge) = job.merges().first() else {
        return Err(format!("snapshot delete job without detail.merges[0]: {job:?}").into());
    };
    let action = action_name(merge.action);
    if action != case.expected {
        figures.problems.push(format!(
            "{} (round {}): the service chose {action}, expected {} (merge detail: {merge:?})",
            case.label,
            round + 1,
            case.expected
        ));
    }
    figures.actions.push(action);
    figures.bytes_to_copy.push(merge.bytes_to_copy);

    // Whatever the direction, the present state must be one file with both layers' data.
    let chains = chain_lengths(app, vm).await;
    let active = single_active_path(app, vm).await?;
    if chains != [1] {
        figures.problems.push(format!(
            "{}: after the delete the chain has {chains:?} layers, expected [1]",
            case.label
        ));
    }
    if let Err(e) = try_expect_bytes(&active, &[case.base_region(), case.top_region()]) {
        figures
            .problems
            .push(format!("{}: after the delete: {e}", case.label));
    }
    app.delete_vm(vm).await;
    Ok(())
}

/// How long the job itself ran, from its timestamps.
fn job_run_time(job: &JobView) -> Result<Duration> {
    let (Some(started), Some(finished)) = (job.started_at, job.finished_at) else {
        return Err(format!("an ended job without its times: {job:?}").into());
    };
    (finished - started)
        .to_std()
        .map_err(|_| format!("job finished before it started: {job:?}").into())
}

/// Build the same chain with qemu-img/qemu-io and time merging it in `direction`:
/// `commit -d` keeps the top as the service does (it drops the file itself later);
/// `rebase -b ''` streams the base into the top, which has no parent to fall back on.
fn plain_merge(work: &Path, case: MergeCase, direction: &str) -> Result<Duration> {
    let dir = work.join("plain-merge");
    std::fs::create_dir_all(&dir)?;
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    create_image(&base, MERGE_DISK_SIZE, None, false);
    let (pattern, offset, len) = case.base_region();
    write_bytes(&base, pattern, offset, len);
    create_image(&top, MERGE_DISK_SIZE, Some("base.qcow2"), false);
    let (pattern, offset, len) = case.top_region();
    write_bytes(&top, pattern, offset, len);
    sync_fs()?;
    let elapsed = match direction {
        "commit" => plain_commit(&base, &top)?,
        _ => timed_tool(
            "qemu-img",
            &["rebase", "-q", "-f", "qcow2", "-b", "", path_str(&top)],
        )?,
    };
    std::fs::remove_dir_all(&dir)?;
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

struct Machine {
    date: String,
    cpus: String,
    cpu_model: String,
    memory: String,
    filesystem: String,
    qemu_img: String,
}

impl Machine {
    fn describe(work: &Path) -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let mem_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no MemTotal in /proc/meminfo")?;
        // `df -T DIR`: the second line holds device, type, ...
        let df = run_tool("df", &["-T", path_str(work)])?;
        let fields: Vec<&str> = df
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let filesystem = match fields.as_slice() {
            [device, fs_type, ..] => format!("{fs_type} ({device})"),
            _ => format!("unknown (df said {df:?})"),
        };
        let qemu_img = run_tool("qemu-img", &["--version"])?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            cpus: run_tool("nproc", &[])?.trim().to_owned(),
            cpu_model,
            memory: format!("{:.1} GiB", mem_kib as f64 / (1 << 20) as f64),
            filesystem,
            qemu_img,
        })
    }
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

/// The 99th percentile: the sample that 1% of the others exceed.
fn p99(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[(n * 99 / 100).min(n - 1)],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// "median (min–max)" of a sample.
fn spread(samples: &[Duration]) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    format!("{} ({}–{})", ms(median(samples)), ms(min), ms(max))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// The "Latest run" section of docs/benchmarks.md, also printed on stdout.
fn report(
    machine: &Machine,
    goals: &[goals::Goal],
    snap: &SnapshotFigures,
    merges: &[MergeFigures],
    problems: &[String],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Latest run\n");
    let _ = writeln!(
        s,
        "Written by `cargo bench --bench strata` on {}.\n",
        machine.date
    );
    let _ = writeln!(s, "- CPUs: {} ({})", machine.cpus, machine.cpu_model);
    let _ = writeln!(s, "- Memory: {}", machine.memory);
    let _ = writeln!(s, "- File system of the temp dir: {}", machine.filesystem);
    let _ = writeln!(s, "- {}\n", machine.qemu_img);
    let _ = writeln!(
        s,
        "The machine is shared with other workloads, so absolute times are noisy; the ratios \
         between figures of this one run (variants interleaved) are what to compare.\n"
    );
    s.push_str(&goals::table(goals));
    s.push('\n');

    let (s1, s64, p, pu) = (
        median(&snap.service_1g),
        median(&snap.service_64g),
        median(&snap.plain),
        median(&snap.plain_unsafe),
    );
    let _ = writeln!(
        s,
        "### Snapshot of a VM with {DISKS} disks ({SNAPSHOT_ROUNDS} rounds; median (min–max))\n"
    );
    let _ = writeln!(s, "| what | time | ratio |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(
        s,
        "| service: POST snapshot + job end, {DISKS} × 1 GiB disks | {} | {:.2} × plain |",
        spread(&snap.service_1g),
        ratio(s1, p)
    );
    let _ = writeln!(
        s,
        "| service: same, {DISKS} × 64 GiB disks | {} | {:.2} × the 1 GiB case |",
        spread(&snap.service_64g),
        ratio(s64, s1)
    );
    let _ = writeln!(
        s,
        "| plain: {DISKS} × `qemu-img create -b BASE -F qcow2` in sequence | {} | 1 |",
        spread(&snap.plain)
    );
    let _ = writeln!(
        s,
        "| plain: {DISKS} × `qemu-img create -u -b BASE -F qcow2` (backing not opened, as the service runs it) | {} | {:.2} × plain |",
        spread(&snap.plain_unsafe),
        ratio(pu, p)
    );
    let verdict = if ratio(s1, p) < SNAPSHOT_TARGET_RATIO {
        "met"
    } else {
        "NOT met"
    };
    let _ = writeln!(
        s,
        "\nService/plain: {:.2} (target under {SNAPSHOT_TARGET_RATIO}: {verdict}; issue 13's goal: at most \
         {SNAPSHOT_GOAL_RATIO}); 64 GiB/1 GiB disks: {:.2}.\n",
        ratio(s1, p),
        ratio(s64, s1)
    );

    let _ = writeln!(
        s,
        "### Delete a snapshot: base <- top, one disk of 1 GiB ({DELETE_ROUNDS} rounds; median (min–max))\n"
    );
    let _ = writeln!(
        s,
        "| chain | service chose | bytes_to_copy | service | of which the job ran | plain, same direction | service/plain | plain, opposite direction | opposite/same |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for m in merges {
        let mut actions = m.actions.clone();
        actions.dedup();
        let (service, right, wrong) = (median(&m.service), median(&m.right), median(&m.wrong));
        let bytes = m.bytes_to_copy.iter().copied().max().unwrap_or_default();
        let _ = writeln!(
            s,
            "| base {} MiB, top {} MiB | {} (expected {}) | {} | {} | {} | {} `{}` | {:.2} | {} `{}` | {:.1} |",
            m.case.base_mib,
            m.case.top_mib,
            actions.join(", "),
            m.case.expected,
            mib(bytes),
            spread(&m.service),
            ms(median(&m.job_run)),
            spread(&m.right),
            plain_command(m.case.expected),
            ratio(service, right),
            spread(&m.wrong),
            plain_command(m.case.wrong()),
            ratio(wrong, right)
        );
    }
    let _ = writeln!(
        s,
        "\nPlain commands: `qemu-img commit -f qcow2 -d -b BASE TOP` (commit) and `qemu-img rebase -f qcow2 -b '' TOP` \
         (stream). Service times run from the DELETE request to the end of the job's long-poll; \
         the job's run time is its `finished_at - started_at`."
    );
    if problems.is_empty() {
        let _ = writeln!(
            s,
            "\nNo problem found: every job succeeded, each merge went the expected way and kept the data."
        );
    } else {
        let _ = writeln!(s, "\n**Problems found:**\n");
        for problem in problems {
            let _ = writeln!(s, "- {problem}");
        }
    }
    s
}

/// Issue 13's goals for the snapshot of a 4-disk VM.
fn snapshot_goals(snap: &SnapshotFigures) -> Vec<goals::Goal> {
    let (s1, s64, p) = (
        median(&snap.service_1g),
        median(&snap.service_64g),
        median(&snap.plain),
    );
    vec![
        goals::Goal::at_most(
            format!("{DISKS}-disk snapshot ÷ {DISKS} sequential `qemu-img create`"),
            ratio(s1, p),
            SNAPSHOT_GOAL_RATIO,
        ),
        goals::Goal::at_most(
            format!("{DISKS}-disk snapshot, 64 GiB ÷ 1 GiB disks (flat in disk size)"),
            ratio(s64, s1),
            FLAT_GOAL_RATIO,
        ),
    ]
}

fn plain_command(direction: &str) -> &'static str {
    if direction == "commit" {
        "commit -d"
    } else {
        "rebase -b ''"
    }
}

/// Replace the "## Latest run" section (up to the next level-2 heading) of the document,
/// keeping the hand-written rest; create the document if needed.
fn write_latest_run(doc: &Path, section: &str) -> Result<()> {
    const HEADING: &str = "## Latest run";
    let old = match std::fs::File::open(doc) {
        Ok(mut file) => {
            let mut text = String::new();
            file.read_to_string(&mut text)?;
            text
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Benchmarks\n\nRun `cargo bench --bench strata`.\n".to_owned()
        }
        Err(e) => return Err(e.into()),
    };
    let new = match old.find(&format!("\n{HEADING}\n")) {
        Some(at) => {
            let start = at + 1;
            let end = old[start + HEADING.len()..]
                .find("\n## ")
                .map_or(old.len(), |i| start + HEADING.len() + i + 1);
            format!("{}{section}\n{}", &old[..start], &old[end..])
        }
        None => format!("{}\n\n{section}", old.trim_end_matches('\n')),
    };
    if let Some(parent) = doc.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(doc, new.trim_end_matches('\n').to_owned() + "\n")?;
    Ok(())
}
