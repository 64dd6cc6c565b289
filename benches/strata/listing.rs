//! Listing at scale (issue 13's second goal): a read must cost the same whatever the
//! size of the fleet. A database of 10,000 VMs, one disk each, with 100,490 snapshots
//! (10 a VM in one chain, and one VM whose chain holds 500) is served by the release
//! service, and timed from request to last byte:
//!
//! - paging through every VM, `GET /v1/vms?limit=100` following `next_cursor`, a few
//!   passes: median and p99 per page (each page carries every VM's disk and its chain
//!   of 11 layers; one page holds the 500-snapshot VM's 501). Target: p99 under 5 ms.
//! - `GET /v1/vms/{id}/snapshots?view=tree` of the 500-snapshot VM. Target: p99 under
//!   5 ms.
//! - `GET /v1/vms/{id}` of an ordinary VM of that database, against the same request to
//!   a service whose database holds only one such VM, alternating request by request:
//!   the ratio of the CPU time each service spends per read (all its threads, from
//!   `/proc`). Target: at most 1.25 (no growth with the number of other VMs). The
//!   medians of request to last byte are shown beside it.
//!
//! The databases are seeded, not built through the API (10,000 VM creations and 100,000
//! snapshot jobs would take hours): the service starts once over a fresh data directory,
//! so that its own migrations build the schema, and is killed; the rows then go into its
//! strata.db with plain sqlx in one transaction, and the service starts again over it.
//! No image file is written: a view reports a missing file as 0 bytes allocated, and
//! nothing these reads do opens one.
//!
//! What the answers hold is checked through the API (every VM listed exactly once over
//! 100 pages, each with its whole chain; a tree of 500 nodes in one chain; the same view
//! from both databases), so that a fast empty answer cannot pass.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::SecondsFormat;
use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{Connection, SqliteConnection};
use strata::domain::new_id;

use super::goals::Goal;
use super::support::{TestApp, Uuid, VmList, VmView};
use super::{GIB, Result, median, ms, p99, ratio, spread, start_service};

/// The fleet of the big database.
const FLEET: Fleet = Fleet {
    vms: 10_000,
    snapshots_per_vm: 10,
    long_chain: Some(500),
};
/// The database the same VM is read from alone.
const ALONE: Fleet = Fleet {
    vms: 1,
    snapshots_per_vm: 10,
    long_chain: None,
};
const PAGE: usize = 100;
/// Passes over every page: 300 pages give a p99 that is not just the slowest page.
const PAGE_PASSES: usize = 3;
const TREE_READS: usize = 200;
/// Rounds of single-VM reads of each database, alternating the two, and reads of
/// each per round: a disturbance (another process, a vCPU's idle state) moves a
/// round, the median of the rounds' ratios stays.
const VM_ROUNDS: usize = 7;
const VM_READS: usize = 1_000;
const LATENCY_TARGET: Duration = Duration::from_millis(5);
/// "Does not grow": the read in the big database within this factor of the lone one.
const GROWTH_TARGET: f64 = 1.25;
const DISK_SIZE: u64 = GIB;

/// What a seeded database holds.
struct Fleet {
    vms: usize,
    snapshots_per_vm: usize,
    /// Snapshots of the one VM that has a chain of its own length (the first VM).
    long_chain: Option<usize>,
}

impl Fleet {
    fn snapshots(&self) -> usize {
        match self.long_chain {
            Some(long) => (self.vms - 1) * self.snapshots_per_vm + long,
            None => self.vms * self.snapshots_per_vm,
        }
    }
}

pub struct ListingFigures {
    pages: Vec<Duration>,
    pages_per_pass: usize,
    tree: Vec<Duration>,
    tree_bytes: usize,
    vm_in_fleet: Vec<Duration>,
    vm_alone: Vec<Duration>,
    /// CPU time per single-VM read of the service of each database (fleet, alone),
    /// a round each.
    vm_cpu: Vec<(Duration, Duration)>,
    problems: Vec<String>,
}

pub async fn bench_listing(work: &Path) -> Result<ListingFigures> {
    eprintln!(
        "strata bench: listing, seeding {} VMs and {} snapshots",
        FLEET.vms,
        FLEET.snapshots()
    );
    let started = Instant::now();
    let (fleet, seeded) = seeded_service(work, "listing-fleet", &FLEET).await?;
    eprintln!(
        "strata bench: listing, seeded and restarted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (alone, alone_seeded) = seeded_service(work, "listing-alone", &ALONE).await?;
    let outcome = measure(&fleet, &seeded, &alone, &alone_seeded).await;
    if outcome.is_err() {
        for app in [&fleet, &alone] {
            eprintln!(
                "--- last lines of the service log ---\n{}",
                app.log_tail(40)
            );
        }
    }
    outcome
}

async fn measure(
    fleet: &TestApp,
    seeded: &Seeded,
    alone: &TestApp,
    alone_seeded: &Seeded,
) -> Result<ListingFigures> {
    let mut problems = Vec::new();
    let long_chain_vm = seeded.long_chain_vm.ok_or("the fleet has no long chain")?;

    eprintln!(
        "strata bench: listing, paging through {} VMs, {PAGE_PASSES} passes after one untimed",
        FLEET.vms
    );
    // The untimed pass fills the caches of a service that has just started.
    page_through(fleet, &mut problems).await?;
    let mut pages = Vec::new();
    let mut pages_per_pass = 0;
    for _ in 0..PAGE_PASSES {
        let times = page_through(fleet, &mut problems).await?;
        pages_per_pass = times.len();
        pages.extend(times);
    }

    eprintln!("strata bench: listing, {TREE_READS} snapshot trees of 500");
    let tree_path = format!("/v1/vms/{long_chain_vm}/snapshots?view=tree");
    let (_, tree_body) = timed_get(fleet, &tree_path).await?;
    if let Err(e) = check_single_chain_tree(&tree_body, FLEET.long_chain.unwrap_or_default()) {
        problems.push(format!("GET {tree_path}: {e}"));
    }
    let mut tree = Vec::with_capacity(TREE_READS);
    for _ in 0..TREE_READS {
        tree.push(timed_get(fleet, &tree_path).await?.0);
    }

    eprintln!(
        "strata bench: listing, one VM among {} against one alone",
        FLEET.vms
    );
    let in_fleet_path = format!("/v1/vms/{}", seeded.ordinary_vm);
    let alone_path = format!("/v1/vms/{}", alone_seeded.ordinary_vm);
    let (in_fleet_view, alone_view): (VmView, VmView) = (
        fleet.get_as(&in_fleet_path).await,
        alone.get_as(&alone_path).await,
    );
    if let Err(e) = same_shape(&in_fleet_view, &alone_view) {
        problems.push(format!("the VM read in both databases differs: {e}"));
    }
    // Alternating request by request, so that both services meet the same states of
    // the machine (on this VM a request that wakes an idle vCPU takes twice as long,
    // and such states last for hundreds of requests).
    let pids = fleet
        .pid()
        .zip(alone.pid())
        .ok_or("a service without a process")?;
    let mut vm_in_fleet = Vec::with_capacity(VM_ROUNDS * VM_READS);
    let mut vm_alone = Vec::with_capacity(VM_ROUNDS * VM_READS);
    let mut vm_cpu = Vec::with_capacity(VM_ROUNDS);
    for _ in 0..VM_ROUNDS {
        let before = (cpu_time(pids.0)?, cpu_time(pids.1)?);
        for read in 0..VM_READS {
            let mut pair = [
                (fleet, &in_fleet_path, &mut vm_in_fleet),
                (alone, &alone_path, &mut vm_alone),
            ];
            if read % 2 == 1 {
                pair.reverse();
            }
            for (app, path, samples) in pair {
                samples.push(timed_get(app, path).await?.0);
            }
        }
        let spent = (
            cpu_time(pids.0)?.saturating_sub(before.0),
            cpu_time(pids.1)?.saturating_sub(before.1),
        );
        vm_cpu.push((spent.0 / VM_READS as u32, spent.1 / VM_READS as u32));
    }
    Ok(ListingFigures {
        pages,
        pages_per_pass,
        tree,
        tree_bytes: tree_body.len(),
        vm_in_fleet,
        vm_alone,
        vm_cpu,
        problems,
    })
}

/// The CPU time all threads of process `pid` have run so far (the scheduler's own
/// count, in nanoseconds, from `/proc/PID/task/*/schedstat`).
fn cpu_time(pid: u32) -> Result<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended meanwhile counts no more.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        let on_cpu = stat.split_whitespace().next().ok_or("an empty schedstat")?;
        ns += on_cpu.parse::<u64>()?;
    }
    Ok(Duration::from_nanos(ns))
}

/// `GET path` from request to last byte, which must be a success; the time and the body.
async fn timed_get(app: &TestApp, path: &str) -> Result<(Duration, Bytes)> {
    let start = Instant::now();
    let response = app.client.get(format!("{}{path}", app.base)).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    let elapsed = start.elapsed();
    if !status.is_success() {
        return Err(format!("GET {path}: {status} {}", String::from_utf8_lossy(&body)).into());
    }
    Ok((elapsed, body))
}

/// One pass over every VM, `PAGE` at a time: each page's time. Every VM must be listed
/// once, with its whole chain; what is not makes one problem for the pass.
async fn page_through(app: &TestApp, problems: &mut Vec<String>) -> Result<Vec<Duration>> {
    let mut times = Vec::new();
    let mut seen = HashSet::new();
    let mut wrong = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => format!("/v1/vms?limit={PAGE}"),
            Some(cursor) => format!("/v1/vms?limit={PAGE}&cursor={cursor}"),
        };
        let (time, body) = timed_get(app, &path).await?;
        times.push(time);
        let page: VmList = serde_json::from_slice(&body)
            .map_err(|e| format!("GET {path}: not a page of VMs ({e})"))?;
        for vm in &page.items {
            if !seen.insert(vm.id) {
                wrong.push(format!("VM {} listed twice", vm.id));
            }
            if let Err(e) = whole_chain(vm) {
                wrong.push(e);
            }
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    let expected_pages = FLEET.vms.div_ceil(PAGE);
    if seen.len() != FLEET.vms || times.len() != expected_pages {
        wrong.push(format!(
            "{} VMs in {} pages, expected {} in {expected_pages}",
            seen.len(),
            times.len(),
            FLEET.vms
        ));
    }
    if let Some(first) = wrong.first() {
        problems.push(format!(
            "paging through the VMs: {} wrong answers, the first: {first}",
            wrong.len()
        ));
    }
    Ok(times)
}

/// A seeded VM's view: one disk whose chain holds one layer per snapshot plus the
/// active one.
fn whole_chain(vm: &VmView) -> std::result::Result<(), String> {
    let layers: Vec<usize> = vm.disks.iter().map(|d| d.chain.len()).collect();
    if layers != [vm.snapshot_count as usize + 1] || vm.current_snapshot_id.is_none() {
        return Err(format!(
            "VM {} has chains of {layers:?} layers for {} snapshots (current {:?})",
            vm.id, vm.snapshot_count, vm.current_snapshot_id
        ));
    }
    Ok(())
}

/// The tree answer must hold `nodes` snapshots in one chain: as many `children` lists,
/// of which one (the newest snapshot's) is empty. Counted in the text: nested 500 deep,
/// the answer is beyond serde_json's default recursion limit (128), so it cannot be
/// read as a `SnapshotTree`.
fn check_single_chain_tree(body: &[u8], nodes: usize) -> std::result::Result<(), String> {
    let text = String::from_utf8_lossy(body);
    let lists = text.matches(r#""children":"#).count();
    let leaves = text.matches(r#""children":[]"#).count();
    if lists != nodes || leaves != 1 {
        return Err(format!(
            "{lists} snapshots with {leaves} leaves, expected {nodes} in one chain"
        ));
    }
    Ok(())
}

/// The same VM, seeded the same way, must read the same but for ids and paths.
fn same_shape(a: &VmView, b: &VmView) -> std::result::Result<(), String> {
    let shape = |vm: &VmView| {
        let layers: Vec<usize> = vm.disks.iter().map(|d| d.chain.len()).collect();
        (vm.snapshot_count, layers)
    };
    if shape(a) != shape(b) {
        return Err(format!("{:?} against {:?}", shape(a), shape(b)));
    }
    whole_chain(a).and_then(|()| whole_chain(b))
}

// ---------------------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------------------

/// Ids the benchmarks ask for.
struct Seeded {
    /// A VM with `snapshots_per_vm` snapshots, from the middle of the fleet.
    ordinary_vm: Uuid,
    long_chain_vm: Option<Uuid>,
}

/// A service over a database seeded with `fleet`, ready.
async fn seeded_service(work: &Path, name: &str, fleet: &Fleet) -> Result<(TestApp, Seeded)> {
    let mut app = start_service(work, name, &[]).await?;
    // Ready means migrated; killed, it leaves an empty schema behind.
    app.wait_ready().await;
    app.kill();
    let seeded = seed(&app.data_dir.join("strata.db"), fleet).await?;
    // The environment `start_service` gave it.
    app.restart(&[("STRATA_WORKERS", "4"), ("STRATA_VERIFY_READS", "false")])
        .await;
    Ok((app, seeded))
}

/// The rows of a fleet, as JSON arrays handed to SQLite in one statement per table.
#[derive(Default)]
struct Rows {
    /// [id, name, current_snapshot_id]
    vms: Vec<Value>,
    /// [id, vm_id, active_volume_id]
    disks: Vec<Value>,
    /// [id, disk_id, parent_id]
    volumes: Vec<Value>,
    /// [id, vm_id, name, parent_id]
    snapshots: Vec<Value>,
    /// [snapshot_id, disk_id, volume_id]
    snapshot_volumes: Vec<Value>,
}

impl Rows {
    /// A VM with one disk, as `snapshots` snapshots taken one after the other leave it
    /// (see `jobs/run/snapshot`): snapshot k froze volume k, volume k+1 sits on volume
    /// k, the last volume is the disk's active one and the last snapshot the VM's
    /// current one.
    fn add_vm(&mut self, name: String, snapshots: usize) -> Uuid {
        let (vm, disk) = (new_id(), new_id());
        let volumes: Vec<Uuid> = (0..=snapshots).map(|_| new_id()).collect();
        let snapshot_ids: Vec<Uuid> = (0..snapshots).map(|_| new_id()).collect();
        self.vms.push(json!([vm, name, snapshot_ids.last()]));
        self.disks.push(json!([disk, vm, volumes.last()]));
        for (k, volume) in volumes.iter().enumerate() {
            let parent = k.checked_sub(1).map(|p| volumes[p]);
            self.volumes.push(json!([volume, disk, parent]));
        }
        for (k, snapshot) in snapshot_ids.iter().enumerate() {
            let parent = k.checked_sub(1).map(|p| snapshot_ids[p]);
            self.snapshots
                .push(json!([snapshot, vm, format!("snap-{k}"), parent]));
            self.snapshot_volumes
                .push(json!([snapshot, disk, volumes[k]]));
        }
        vm
    }
}

/// Write `fleet` into the migrated, empty database at `path`, in one transaction.
///
/// Every row is `ready`, as a finished job leaves it; what a view reads beyond the
/// defaults is a disk's `active_volume_id`, each volume's `parent_id` (the chain), the
/// `snapshot_volumes` row naming the layer each snapshot froze, and the VM's
/// `current_snapshot_id`. Ids are the service's own kind (UUIDv7, hyphenated text) and
/// times RFC 3339, as `store` writes them.
async fn seed(path: &Path, fleet: &Fleet) -> Result<Seeded> {
    let mut rows = Rows::default();
    let mut long_chain_vm = None;
    let mut ordinary_vm = None;
    for k in 0..fleet.vms {
        let name = format!("fleet-{k:05}");
        match fleet.long_chain {
            Some(long) if k == 0 => long_chain_vm = Some(rows.add_vm(name, long)),
            _ => {
                let vm = rows.add_vm(name, fleet.snapshots_per_vm);
                if k == fleet.vms / 2 {
                    ordinary_vm = Some(vm);
                }
            }
        }
    }
    let ordinary_vm = ordinary_vm.ok_or("a fleet without an ordinary VM")?;

    let options = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true);
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let mut tx = conn.begin().await?;
    let now = chrono::Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let size = DISK_SIZE as i64;
    // Parents before children in each array: foreign keys hold row by row.
    let statements: [(&str, &[Value]); 5] = [
        (
            "INSERT INTO vms (id, name, status, current_snapshot_id, created_at, updated_at)
             SELECT value ->> 0, value ->> 1, 'ready', value ->> 2, ?2, ?2 FROM json_each(?1)",
            &rows.vms,
        ),
        (
            "INSERT INTO disks (id, vm_id, name, size_bytes, status, active_volume_id, created_at)
             SELECT value ->> 0, value ->> 1, 'disk0', ?3, 'ready', value ->> 2, ?2 FROM json_each(?1)",
            &rows.disks,
        ),
        (
            "INSERT INTO volumes (id, disk_id, parent_id, size_bytes, status, created_at)
             SELECT value ->> 0, value ->> 1, value ->> 2, ?3, 'ready', ?2 FROM json_each(?1)",
            &rows.volumes,
        ),
        (
            "INSERT INTO snapshots (id, vm_id, name, parent_id, status, created_at)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, 'ready', ?2 FROM json_each(?1)",
            &rows.snapshots,
        ),
        (
            "INSERT INTO snapshot_volumes (snapshot_id, disk_id, volume_id)
             SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?1)",
            &rows.snapshot_volumes,
        ),
    ];
    // Each statement takes the same parameters (its rows, the time, the disk size) and
    // leaves out those it has no column for.
    for (statement, rows) in statements {
        sqlx::query(statement)
            .bind(serde_json::to_string(rows)?)
            .bind(&now)
            .bind(size)
            .execute(&mut *tx)
            .await?;
    }
    // The event triggers (migration 0017) wrote a row for each change, left unsealed
    // for the service's writer to render before its commit. Seeding is not a change
    // any client watched happen, and the service's next write would otherwise render
    // hundreds of thousands of them: drop them.
    sqlx::query("DELETE FROM events WHERE data IS NULL")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    conn.close().await?;
    Ok(Seeded {
        ordinary_vm,
        long_chain_vm,
    })
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

/// Milliseconds to the hundredth: a single VM reads in well under one.
fn fine_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn fine_spread(samples: &[Duration]) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    format!(
        "{} ({}–{})",
        fine_ms(median(samples)),
        fine_ms(min),
        fine_ms(max)
    )
}

/// The median of the rounds' CPU ratios (fleet ÷ alone), and each round's figures.
fn cpu_growth(figures: &ListingFigures) -> (f64, String) {
    let mut ratios: Vec<f64> = figures.vm_cpu.iter().map(|&(f, a)| ratio(f, a)).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
    let rounds: Vec<String> = figures
        .vm_cpu
        .iter()
        .map(|&(f, a)| {
            format!(
                "{:.1}/{:.1} µs",
                f.as_secs_f64() * 1e6,
                a.as_secs_f64() * 1e6
            )
        })
        .collect();
    (median, rounds.join(", "))
}

pub fn goals(figures: &ListingFigures) -> Vec<Goal> {
    vec![
        Goal::under(
            format!("`GET /v1/vms?limit={PAGE}` p99 per page, {} VMs", FLEET.vms),
            p99(&figures.pages),
            LATENCY_TARGET,
        ),
        Goal::under(
            "`?view=tree` of a VM with 500 snapshots, p99",
            p99(&figures.tree),
            LATENCY_TARGET,
        ),
        Goal::at_most(
            format!(
                "`GET /v1/vms/{{id}}` among {} VMs ÷ alone, CPU time per read",
                FLEET.vms
            ),
            cpu_growth(figures).0,
            GROWTH_TARGET,
        ),
    ]
}

pub fn report(figures: &ListingFigures) -> (String, Vec<String>) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Listing at scale: {} VMs (one disk each), {} snapshots (request to last byte)\n",
        FLEET.vms,
        FLEET.snapshots()
    );
    let _ = writeln!(s, "| what | samples | median (min–max) | p99 | target |");
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    let _ = writeln!(
        s,
        "| `GET /v1/vms?limit={PAGE}` following `next_cursor` ({} pages a pass, {PAGE_PASSES} passes) | {} | {} | {} | p99 < {} |",
        figures.pages_per_pass,
        figures.pages.len(),
        spread(&figures.pages),
        ms(p99(&figures.pages)),
        ms(LATENCY_TARGET)
    );
    let _ = writeln!(
        s,
        "| `GET /v1/vms/{{id}}/snapshots?view=tree`, 500 snapshots in one chain ({} KiB) | {} | {} | {} | p99 < {} |",
        figures.tree_bytes / 1024,
        figures.tree.len(),
        spread(&figures.tree),
        ms(p99(&figures.tree)),
        ms(LATENCY_TARGET)
    );
    let _ = writeln!(
        s,
        "| `GET /v1/vms/{{id}}` (1 disk, 10 snapshots) among {} VMs | {} | {} | {} | |",
        FLEET.vms,
        figures.vm_in_fleet.len(),
        fine_spread(&figures.vm_in_fleet),
        fine_ms(p99(&figures.vm_in_fleet))
    );
    let _ = writeln!(
        s,
        "| same VM alone in its database | {} | {} | {} | |",
        figures.vm_alone.len(),
        fine_spread(&figures.vm_alone),
        fine_ms(p99(&figures.vm_alone))
    );
    let (growth, rounds) = cpu_growth(figures);
    let _ = writeln!(
        s,
        "\nAmong {} VMs ÷ alone: CPU time per read {growth:.2} (the median of {VM_ROUNDS} rounds of \
         {VM_READS} reads each, {rounds}; all the service's threads; target ≤ {GROWTH_TARGET}), \
         request to last byte {:.2} (medians). The reads alternate between the two \
         services; the CPU time is the goal, as the latency of a read this short moves \
         with whether it wakes an idle vCPU. The databases are seeded directly, without \
         image files (views show 0 bytes allocated).",
        FLEET.vms,
        ratio(median(&figures.vm_in_fleet), median(&figures.vm_alone))
    );
    let problems = figures.problems.clone();
    if problems.is_empty() {
        let _ = writeln!(
            s,
            "Every pass listed each VM once with its whole chain, the tree held 500 snapshots \
             in one chain, and the VM read the same from both databases."
        );
    } else {
        let _ = writeln!(s, "\n**Some answers were wrong:** see the problems.");
    }
    (s, problems)
}
