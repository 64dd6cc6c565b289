//! Scheduler benchmarks.
//!
//! 1. Finding due schedules: 10,000 schedules over 10,000 VMs in the service's own
//!    database (built through `strata::store`), timing what a tick does before it acts
//!    (the indexed due query plus the look-up of runs still in progress) with nothing
//!    due, with one minute's share due, and with every schedule due at once (the first
//!    tick after a long outage). Also the periodic retention sweep's evaluation of every
//!    schedule's snapshots (10 per schedule, 100,000 in all) when nothing is to prune.
//! 2. Pruning throughput: the release service with 100 VMs holding 10 expired snapshots
//!    each (1 MiB written between snapshots), from the moment they expire until all
//!    1,000 deletions have succeeded, against the same merges done one by one with plain
//!    qemu-img (`commit -d` of the child into the oldest layer, `rebase -u` of the next
//!    one) on a sample of identical chains. The job intervals are checked against the
//!    spreading promise: never more deletions at once than workers, never two on one VM.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use reqwest::{Method, StatusCode};
use serde_json::json;
use strata::domain::retention::RetentionPolicy;
use strata::domain::{ResourceStatus, Schedule, ScheduleTarget, Snapshot, Vm, new_id};
use strata::jobs::{Engine, EngineConfig};
use strata::store::{self, Db};

use super::support::{
    JobList, JobStatus, MIB, TestApp, Uuid, VmList, create_image, path_str, run_tool,
    try_expect_bytes, write_bytes,
};
use super::{
    Result, chain_lengths, create_vm, median, ms, plain_commit, ratio, single_active_path, spread,
    start_service, sync_fs,
};

const SCHEDULES: usize = 10_000;
const SNAPSHOTS_PER_SCHEDULE: usize = 10;
const TICK_SAMPLES: usize = 50;
const SWEEP_SAMPLES: usize = 5;
/// The tick's budget for finding due schedules.
const DUE_TARGET: Duration = Duration::from_millis(10);

/// When a job ran: `started_at` to `finished_at`.
type Interval = (DateTime<Utc>, DateTime<Utc>);

const PRUNE_VMS: usize = 100;
const PRUNE_PER_VM: usize = 10;
/// Chains rebuilt with plain qemu-img for the baseline.
const PLAIN_CHAINS: usize = 10;
/// Workers of the service under test (its default).
const WORKERS: usize = 4;

pub struct DueFigures {
    idle: Vec<Duration>,
    minute: Vec<Duration>,
    minute_due: usize,
    all: Vec<Duration>,
    sweep: Vec<Duration>,
}

fn at(hour: u32, minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, hour, minute, 0).unwrap()
}

pub fn bench_due(work: &Path) -> Result<DueFigures> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let db = Db::open(&work.join("due.db")).await?;
        let created = at(0, 0);
        let mut tx = db.begin().await?;
        for k in 0..SCHEDULES {
            let vm = Vm {
                status: ResourceStatus::Ready,
                ..Vm::new(format!("vm-{k}"), String::new(), created)
            };
            store::vms::insert_vm(&mut tx, &vm).await?;
            // Spread over the hour: minute k % 60, due from 01:00 on.
            let minute = (k % 60) as u32;
            let schedule = Schedule {
                id: new_id(),
                name: format!("s-{k}"),
                target: ScheduleTarget::Vm(vm.id),
                cron: format!("{minute} * * * *"),
                timezone: "UTC".into(),
                enabled: true,
                name_template: "auto-%Y%m%d-%H%M%S".into(),
                retention: RetentionPolicy {
                    keep_last: Some(SNAPSHOTS_PER_SCHEDULE as u32),
                    ..Default::default()
                },
                consistency: None,
                quiesce: None,
                next_run_at: Some(at(1, minute)),
                created_at: created,
                updated_at: created,
            };
            store::schedules::save(&mut tx, &schedule).await?;
            for n in 0..SNAPSHOTS_PER_SCHEDULE {
                let snapshot = Snapshot {
                    id: new_id(),
                    vm_id: vm.id,
                    name: format!("auto-{n}"),
                    description: String::new(),
                    parent_id: None,
                    status: ResourceStatus::Ready,
                    created_at: at(0, n as u32),
                    expires_at: None,
                    hold: false,
                    schedule_id: Some(schedule.id),
                    consistency: strata::domain::SnapshotConsistency::Stopped,
                    volumes: Vec::new(),
                };
                store::snapshots::insert(&mut tx, &snapshot).await?;
            }
        }
        tx.commit().await?;

        let find = |now: DateTime<Utc>| {
            let db = db.clone();
            async move {
                let started = Instant::now();
                let mut conn = db.reader().await?;
                let due = store::schedules::due(&mut conn, now).await?;
                store::schedules::running_runs(&mut conn).await?;
                Ok::<_, Box<dyn std::error::Error>>((started.elapsed(), due.len()))
            }
        };
        let mut figures = DueFigures {
            idle: Vec::new(),
            minute: Vec::new(),
            minute_due: 0,
            all: Vec::new(),
            sweep: Vec::new(),
        };
        for _ in 0..TICK_SAMPLES {
            let (idle, none) = find(at(0, 59)).await?;
            let (minute, some) = find(at(1, 0)).await?;
            let (all, every) = find(at(2, 0)).await?;
            if none != 0 || every != SCHEDULES {
                return Err(format!("due query found {none} and {every} schedules").into());
            }
            figures.idle.push(idle);
            figures.minute.push(minute);
            figures.minute_due = some;
            figures.all.push(all);
        }
        let qemu = strata::qemu::Qemu::new("qemu-img".into(), Duration::from_secs(60));
        let volumes_dir = work.join("due-volumes");
        let files = strata::files::Files::new(volumes_dir, 0, qemu.clone(), db.clone());
        let engine = Engine::new(
            db.clone(),
            qemu,
            files,
            EngineConfig {
                import_slots: 2,
                workers: WORKERS,
                fault: None,
                freeze_timeout: Duration::from_secs(60),
            },
        );
        for _ in 0..SWEEP_SAMPLES {
            let started = Instant::now();
            let report = strata::scheduler::prune::prune(
                &db,
                &engine,
                at(2, 0),
                strata::scheduler::prune::Scope::All,
            )
            .await?;
            figures.sweep.push(started.elapsed());
            if !report.pruned.is_empty() || !report.held.is_empty() {
                return Err("the sweep found something to prune in a policy that keeps all".into());
            }
        }
        db.close().await;
        Ok(figures)
    })
}

pub struct PruneFigures {
    wall: Duration,
    job_time_sum: Duration,
    max_parallel: usize,
    max_parallel_per_vm: usize,
    plain_per_merge: Vec<Duration>,
    problems: Vec<String>,
}

pub async fn bench_prune(work: &Path) -> Result<PruneFigures> {
    let workers = WORKERS.to_string();
    let env = [("STRATA_SWEEP_INTERVAL", "1"), ("STRATA_WORKERS", &workers)];
    let app = start_service(work, "prune-service", &env).await?;
    let outcome = prune_with(&app, work).await;
    if outcome.is_err() {
        eprintln!(
            "--- last lines of the service log ---\n{}",
            app.log_tail(40)
        );
    }
    outcome
}

/// 100 VMs with 10 snapshots each (1 MiB written before each), all expiring at one
/// instant a little ahead; their ids.
async fn build_expiring_snapshots(app: &TestApp) -> Result<Vec<Uuid>> {
    let far = (Utc::now() + chrono::Duration::hours(12)).to_rfc3339();
    let mut snapshots = Vec::new();
    eprintln!("strata bench: building {PRUNE_VMS} VMs with {PRUNE_PER_VM} snapshots each");
    for v in 0..PRUNE_VMS {
        let vm = create_vm(app, &format!("prune-{v}"), 1, 64 * MIB).await;
        for n in 0..PRUNE_PER_VM {
            let active = single_active_path(app, vm).await?;
            write_bytes(&active, 0x20 + n as u8, n as u64 * MIB, MIB);
            let job = app
                .run_job(
                    Method::POST,
                    &format!("/v1/vms/{vm}/snapshots"),
                    Some(json!({"name": format!("s{n}"), "expires_at": far})),
                )
                .await;
            snapshots.push(job.target.id);
        }
    }
    // All expire at one instant a little ahead, set quickly once everything exists.
    let expiry = Utc::now() + chrono::Duration::seconds(20);
    for snapshot in &snapshots {
        let (status, body) = app
            .patch(
                &format!("/v1/snapshots/{snapshot}"),
                json!({"expires_at": expiry.to_rfc3339()}),
            )
            .await;
        if status != StatusCode::OK {
            return Err(format!("PATCH /v1/snapshots/{snapshot}: {status} {body}").into());
        }
    }
    let wait = (expiry - Utc::now())
        .to_std()
        .map_err(|_| "setting the expiries took longer than 20 s")?;
    tokio::time::sleep(wait).await;
    Ok(snapshots)
}

async fn prune_with(app: &TestApp, work: &Path) -> Result<PruneFigures> {
    let snapshots = build_expiring_snapshots(app).await?;
    let started = Instant::now();
    let deletes = loop {
        let list: JobList = app.get_as("/v1/jobs?kind=snapshot_delete&limit=1000").await;
        let jobs = list.items;
        if let Some(failed) = jobs.iter().find(|j| j.status == JobStatus::Failed) {
            return Err(format!("a prune failed: {failed:?}").into());
        }
        let done = jobs
            .iter()
            .filter(|j| j.status == JobStatus::Succeeded)
            .count();
        if done == snapshots.len() {
            break jobs;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("only {done} prunes after 30 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let wall = started.elapsed();

    let mut problems = Vec::new();
    let mut intervals: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for job in &deletes {
        let (Some(vm), Some(start), Some(finish)) = (job.vm_id, job.started_at, job.finished_at)
        else {
            return Err(format!("a finished delete without its VM or times: {job:?}").into());
        };
        intervals.push((vm, start, finish));
    }
    let job_time_sum = intervals
        .iter()
        .map(|(_, s, f)| (*f - *s).to_std().unwrap_or_default())
        .sum();
    let max_parallel = max_overlap(intervals.iter().map(|(_, s, f)| (*s, *f)));
    let mut per_vm: BTreeMap<Uuid, Vec<Interval>> = BTreeMap::new();
    for (vm, s, f) in &intervals {
        per_vm.entry(*vm).or_default().push((*s, *f));
    }
    let max_parallel_per_vm = per_vm
        .values()
        .map(|v| max_overlap(v.iter().copied()))
        .max()
        .unwrap_or(0);
    if max_parallel > WORKERS {
        problems.push(format!(
            "{max_parallel} prunes ran at once with {WORKERS} workers"
        ));
    }
    if max_parallel_per_vm > 1 {
        problems.push("two prunes of one VM ran at once".into());
    }
    // Every VM is back to a single file holding all ten writes.
    let vms: VmList = app.get_as("/v1/vms?limit=1000").await;
    for vm in &vms.items {
        let active = single_active_path(app, vm.id).await?;
        let chain = chain_lengths(app, vm.id).await;
        if chain != [1] {
            problems.push(format!(
                "VM {} kept a chain of {chain:?} after pruning",
                vm.id
            ));
        }
        let regions: Vec<(u8, u64, u64)> = (0..PRUNE_PER_VM)
            .map(|n| (0x20 + n as u8, n as u64 * MIB, MIB))
            .collect();
        if let Err(e) = try_expect_bytes(&active, &regions) {
            problems.push(e);
        }
    }
    let plain_per_merge = plain_prunes(work)?;
    Ok(PruneFigures {
        wall,
        job_time_sum,
        max_parallel,
        max_parallel_per_vm,
        plain_per_merge,
        problems,
    })
}

/// Most intervals open at one instant.
fn max_overlap(intervals: impl Iterator<Item = Interval>) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for (start, end) in intervals {
        edges.push((start, 1));
        edges.push((end, -1));
    }
    // Ends before starts at the same instant: back-to-back jobs do not overlap.
    edges.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, delta) in edges {
        open += delta;
        most = most.max(open);
    }
    most as usize
}

/// The same deletions by hand: chains of 10 one-MiB layers under an empty top, the
/// oldest snapshot deleted 10 times per chain by committing its child into it and
/// repointing the grandchild (what the planner picks when the child is the smaller).
fn plain_prunes(work: &Path) -> Result<Vec<Duration>> {
    let dir = work.join("plain-prune");
    std::fs::create_dir_all(&dir)?;
    let mut samples = Vec::new();
    for c in 0..PLAIN_CHAINS {
        let layer = |n: usize| dir.join(format!("c{c}-l{n}.qcow2"));
        for n in 0..=PRUNE_PER_VM {
            let backing = (n > 0).then(|| format!("c{c}-l{}.qcow2", n - 1));
            create_image(layer(n), 64 * MIB, backing.as_deref(), true);
            if n < PRUNE_PER_VM {
                write_bytes(layer(n), 0x20 + n as u8, n as u64 * MIB, MIB);
            }
        }
        sync_fs()?;
        let base = layer(0);
        for n in 1..=PRUNE_PER_VM {
            let started = Instant::now();
            plain_commit(&base, &layer(n))?;
            if n < PRUNE_PER_VM {
                run_tool(
                    "qemu-img",
                    &[
                        "rebase",
                        "-q",
                        "-u",
                        "-f",
                        "qcow2",
                        "-b",
                        &format!("c{c}-l0.qcow2"),
                        "-F",
                        "qcow2",
                        path_str(&layer(n + 1)),
                    ],
                )?;
            } else {
                // The empty top becomes the base's only child again: nothing to repoint.
            }
            std::fs::remove_file(layer(n))?;
            samples.push(started.elapsed());
        }
    }
    Ok(samples)
}

pub fn report(due: &DueFigures, prune: &PruneFigures) -> (String, Vec<String>) {
    let mut s = String::new();
    let mut problems = prune.problems.clone();
    let _ = writeln!(
        s,
        "\n### Scheduler: finding due schedules among {SCHEDULES} ({TICK_SAMPLES} ticks; median (min–max))\n"
    );
    let _ = writeln!(s, "| tick | due | time |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(s, "| nothing due | 0 | {} |", spread(&due.idle));
    let _ = writeln!(
        s,
        "| a minute boundary | {} | {} |",
        due.minute_due,
        spread(&due.minute)
    );
    let _ = writeln!(
        s,
        "| all due at once (first tick after an outage) | {SCHEDULES} | {} |",
        spread(&due.all)
    );
    let worst_typical = median(&due.minute);
    let _ = writeln!(
        s,
        "\nTarget under {} per tick: {} for the typical ticks. Retention sweep over the {SCHEDULES} schedules' {} snapshots with nothing to prune: {} ({SWEEP_SAMPLES} sweeps).",
        ms(DUE_TARGET),
        if worst_typical < DUE_TARGET && median(&due.idle) < DUE_TARGET {
            "met"
        } else {
            "missed"
        },
        SCHEDULES * SNAPSHOTS_PER_SCHEDULE,
        spread(&due.sweep)
    );
    if worst_typical >= DUE_TARGET {
        problems.push(format!(
            "finding due schedules took {} (target {})",
            ms(worst_typical),
            ms(DUE_TARGET)
        ));
    }
    let total = PRUNE_VMS * PRUNE_PER_VM;
    let plain = median(&prune.plain_per_merge);
    let service_per = prune.wall / total as u32;
    let _ = writeln!(
        s,
        "\n### Pruning {total} expired snapshots across {PRUNE_VMS} VMs ({WORKERS} workers)\n"
    );
    let _ = writeln!(s, "| what | figure |");
    let _ = writeln!(s, "| --- | --- |");
    let _ = writeln!(
        s,
        "| service: expiry to the last deletion done | {:.1} s ({:.0} snapshots/s) |",
        prune.wall.as_secs_f64(),
        total as f64 / prune.wall.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "| service: per snapshot (wall / {total}) | {} |",
        ms(service_per)
    );
    let _ = writeln!(
        s,
        "| service: sum of the delete jobs' run times / wall | {:.2} |",
        prune.job_time_sum.as_secs_f64() / prune.wall.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "| most deletions running at once / on one VM | {} / {} |",
        prune.max_parallel, prune.max_parallel_per_vm
    );
    let _ = writeln!(
        s,
        "| plain: `commit -d` + `rebase -u` + `rm`, one after another ({} merges) | {} per merge |",
        prune.plain_per_merge.len(),
        spread(&prune.plain_per_merge)
    );
    let _ = writeln!(
        s,
        "\nService per snapshot / plain per merge: {:.2}. The service spreads the merges (at most one per VM, at most {WORKERS} at once) and verifies afterwards that every VM is one file holding all ten writes.",
        ratio(service_per, plain)
    );
    (s, problems)
}
