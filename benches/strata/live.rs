//! Live operations on a running VM, with qemu-storage-daemon standing in for the VM's
//! QEMU as in the tests (tests/support/live.rs).
//!
//! 1. Live snapshot of a VM with 4 disks: request to job end, against the same
//!    snapshot with the VM stopped; and what the guest sees: the longest 64 KiB write of
//!    a qemu-io writer over NBD while the snapshots are taken, against its longest
//!    write with nothing else going on.
//!    The same snapshots with a guest agent (the tests' double): the window the guest
//!    stays frozen, from the freeze's answer to the thaw's arrival, which is strata's
//!    own overhead around the switch. Target: under 50 ms.
//! 2. Live merges of 256 MiB, rounds interleaved: an active commit with its pivot
//!    (through the tests' monitor proxy, which adds the pause a VM's QEMU has), and a
//!    stream into the active layer, with a QEMU that can pause (as a VM's can) and one
//!    that cannot (qemu-storage-daemon alone: the stream's tables reach the disk only
//!    at the guest's next flush, every 500 ms here), each against the plain `qemu-img
//!    commit -d` / `rebase -b ''` of identical files, with `sync` before each. Target:
//!    within 1.5x for a QEMU that can pause.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;

use super::support::guest_agent::AgentDouble;
use super::support::live::RunningVm;
use super::support::{MIB, TestApp, Uuid, path_str, run_tool, write_bytes};
use super::{
    GIB, Result, active_paths, create_vm, median, ms, ratio, snapshot, spread, start_service,
    sync_fs, timed_tool,
};

const SNAPSHOT_ROUNDS: usize = 10;
const MERGE_ROUNDS: usize = 3;
/// The longest the guest may stay frozen around a snapshot's switch.
const FROZEN_TARGET: Duration = Duration::from_millis(50);
/// 64 KiB writes the guest writer makes per run.
const WRITES: usize = 1500;
const MERGE_MIB: u64 = 256;
/// Live merge / plain qemu-img ratio the live merges are expected to stay under.
const MERGE_TARGET_RATIO: f64 = 1.5;

pub struct LiveFigures {
    live: Vec<Duration>,
    offline: Vec<Duration>,
    write_idle: Duration,
    write_during: Duration,
    /// Guest-side frozen windows of quiesced live snapshots, and the job's `frozen_ms`.
    frozen: Vec<Duration>,
    frozen_job: Vec<Duration>,
    commit: Vec<Duration>,
    commit_plain: Vec<Duration>,
    paused: Vec<Duration>,
    stream: Vec<Duration>,
    stream_no_pause: Vec<Duration>,
    stream_plain: Vec<Duration>,
    problems: Vec<String>,
}

pub async fn bench_live(work: &Path) -> Result<LiveFigures> {
    let run = tempfile::Builder::new().prefix("run").tempdir_in(work)?;
    let run_dir = std::fs::canonicalize(run.path())?;
    let env = [("STRATA_RUNTIME_DIR", path_str(&run_dir))];
    let app = start_service(work, "live", &env).await;
    let app = app?;
    let mut problems = Vec::new();
    let (live, offline, write_idle, write_during) = bench_snapshots(&app, &run_dir).await?;
    let (frozen, frozen_job) = bench_frozen(&app, &run_dir).await?;
    let mut figures = LiveFigures {
        live,
        offline,
        write_idle,
        write_during,
        frozen,
        frozen_job,
        commit: Vec::new(),
        commit_plain: Vec::new(),
        paused: Vec::new(),
        stream: Vec::new(),
        stream_no_pause: Vec::new(),
        stream_plain: Vec::new(),
        problems: Vec::new(),
    };
    for round in 0..MERGE_ROUNDS {
        eprintln!("strata bench: live merges of {MERGE_MIB} MiB, round {round}");
        let (commit, paused) = live_merge(&app, &run_dir, "commit", true, &mut problems).await?;
        figures.commit.push(commit);
        figures.paused.push(paused);
        figures.commit_plain.push(plain_merge(work, "commit")?);
        let (stream, _) = live_merge(&app, &run_dir, "stream", true, &mut problems).await?;
        figures.stream.push(stream);
        let (stream, _) = live_merge(&app, &run_dir, "stream", false, &mut problems).await?;
        figures.stream_no_pause.push(stream);
        figures.stream_plain.push(plain_merge(work, "stream")?);
    }
    figures.problems = problems;
    Ok(figures)
}

/// Mark `vm` running in `process` (or stopped, with `None`).
async fn mark(app: &TestApp, vm: Uuid, process: Option<&RunningVm>) -> Result<()> {
    let body = match process {
        Some(process) => json!({"state": "running", "qmp_socket": process.qmp}),
        None => json!({"state": "stopped"}),
    };
    let (status, answer) = app.patch(&format!("/v1/vms/{vm}"), body).await;
    if status != StatusCode::OK {
        return Err(format!("marking VM {vm}: {status} {answer}").into());
    }
    Ok(())
}

async fn timed_snapshot(app: &TestApp, vm: Uuid, name: &str) -> Duration {
    let start = Instant::now();
    snapshot(app, vm, name).await;
    start.elapsed()
}

/// A guest writer on disk 0: `WRITES` writes of 64 KiB, one after another.
fn start_writer(process: &RunningVm) -> Result<Child> {
    let url = format!("nbd+unix:///disk0?socket={}", process.nbd.display());
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for n in 0..WRITES {
        let offset = (n as u64 % 256) * 64 * 1024;
        command.arg("-c").arg(format!("write -P 0x5a {offset} 64k"));
    }
    command
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command.spawn()?)
}

/// The longest write the writer made (qemu-io reports each write's ops/sec).
fn longest_write(writer: Child) -> Result<Duration> {
    let output = writer.wait_with_output()?;
    if !output.status.success() {
        return Err(format!("the guest writer failed: {output:?}").into());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut longest = Duration::ZERO;
    for line in text.lines().filter(|l| l.ends_with("ops/sec)")) {
        let rate: f64 = line
            .rsplit("and ")
            .next()
            .and_then(|tail| tail.split(' ').next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected qemu-io line: {line}"))?;
        longest = longest.max(Duration::from_secs_f64(1.0 / rate));
    }
    Ok(longest)
}

async fn bench_snapshots(
    app: &TestApp,
    run_dir: &Path,
) -> Result<(Vec<Duration>, Vec<Duration>, Duration, Duration)> {
    eprintln!("strata bench: live snapshots of a 4-disk VM, {SNAPSHOT_ROUNDS} rounds");
    let vm = create_vm(app, "live-snap", 4, GIB).await;
    let mut offline = Vec::new();
    for round in 0..SNAPSHOT_ROUNDS {
        offline.push(timed_snapshot(app, vm, &format!("offline-{round}")).await);
    }
    let actives: Vec<String> = active_paths(app, vm)
        .await
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let process = RunningVm::start(run_dir, &actives);
    mark(app, vm, Some(&process)).await?;
    let write_idle = longest_write(start_writer(&process)?)?;
    let writer = start_writer(&process)?;
    let mut live = Vec::new();
    for round in 0..SNAPSHOT_ROUNDS {
        live.push(timed_snapshot(app, vm, &format!("live-{round}")).await);
    }
    let write_during = longest_write(writer)?;
    drop(process);
    mark(app, vm, None).await?;
    Ok((live, offline, write_idle, write_during))
}

/// Quiesced live snapshots of a 4-disk VM with a guest agent (the tests' double): the
/// frozen window the guest saw and the one the job recorded, per round.
async fn bench_frozen(app: &TestApp, run_dir: &Path) -> Result<(Vec<Duration>, Vec<Duration>)> {
    eprintln!("strata bench: quiesced live snapshots, {SNAPSHOT_ROUNDS} rounds");
    let vm = create_vm(app, "live-frozen", 4, GIB).await;
    let actives: Vec<String> = active_paths(app, vm)
        .await
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let dir = run_dir.join("frozen");
    std::fs::create_dir_all(&dir)?;
    let process = RunningVm::start(&dir, &actives);
    let agent = AgentDouble::start(&dir);
    let body =
        json!({"state": "running", "qmp_socket": process.qmp, "guest_agent_socket": agent.socket});
    let (status, answer) = app.patch(&format!("/v1/vms/{vm}"), body).await;
    if status != StatusCode::OK {
        return Err(format!("marking VM {vm} running with its agent: {status} {answer}").into());
    }
    let mut recorded = Vec::new();
    for round in 0..SNAPSHOT_ROUNDS {
        let path = format!("/v1/vms/{vm}/snapshots");
        let body = json!({"name": format!("quiesced-{round}"), "quiesce": "required"});
        let job = app.run_job(Method::POST, &path, Some(body)).await;
        let frozen_ms = job
            .detail
            .as_ref()
            .and_then(|d| d.frozen_ms)
            .ok_or("a quiesced snapshot's job has no frozen_ms")?;
        recorded.push(Duration::from_millis(frozen_ms));
    }
    let windows = agent.windows();
    if windows.len() != SNAPSHOT_ROUNDS || agent.frozen() {
        return Err(format!(
            "the agent saw {} freezes for {SNAPSHOT_ROUNDS} snapshots (frozen now: {})",
            windows.len(),
            agent.frozen()
        )
        .into());
    }
    drop(process);
    mark(app, vm, None).await?;
    Ok((windows, recorded))
}

/// Build a one-disk chain (base `base_mib` MiB, snapshot, then the guest writes
/// `top_mib` MiB after it) on a running VM and delete the snapshot live, expecting the
/// planner to choose `expected`; the job's run time and how long it paused the guest.
async fn live_merge(
    app: &TestApp,
    run_dir: &Path,
    expected: &str,
    pausable: bool,
    problems: &mut Vec<String>,
) -> Result<(Duration, Duration)> {
    let (base_mib, top_mib) = merge_sizes(expected);
    static VMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = VMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let vm = create_vm(app, &format!("live-{expected}-{n}"), 1, GIB).await;
    let base = active_paths(app, vm).await.remove(0);
    write_bytes(&base, 0x11, 0, base_mib * MIB);
    let actives = [base.display().to_string()];
    // A directory of its own: the sockets of the VMs before are still there.
    let dir = run_dir.join(expected);
    std::fs::create_dir_all(&dir)?;
    let process = if pausable {
        RunningVm::start_pausable(&dir, &actives)
    } else {
        RunningVm::start(&dir, &actives)
    };
    mark(app, vm, Some(&process)).await?;
    let snap = snapshot(app, vm, "s").await;
    process.write(0, 0x22, 512 * MIB, top_mib * MIB);
    sync_fs()?;
    // A guest flushes its disks every few seconds while it runs; a QEMU that cannot
    // pause writes a stream's tables out only then.
    let flushing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flusher = {
        let flushing = std::sync::Arc::clone(&flushing);
        let url = format!("nbd+unix:///disk0?socket={}", process.nbd.display());
        std::thread::spawn(move || {
            while flushing.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = Command::new("qemu-io")
                    .args(["-f", "raw", "-c", "flush", &url])
                    .output();
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let start = Instant::now();
    let job = app
        .run_job(Method::DELETE, &format!("/v1/snapshots/{snap}"), None)
        .await;
    let took = start.elapsed();
    flushing.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = flusher.join();
    let detail = serde_json::to_value(&job.detail)?;
    let action = detail["merges"][0]["action"].as_str().unwrap_or_default();
    if action != expected {
        problems.push(format!(
            "live merge: expected {expected}, the job chose {action}"
        ));
    }
    let paused = Duration::from_millis(detail["paused_ms"].as_u64().unwrap_or(0));
    drop(process);
    mark(app, vm, None).await?;
    let present = active_paths(app, vm).await.remove(0);
    let reads = run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-r",
            "-c",
            &format!("read -P 0x11 0 {}", base_mib * MIB),
            "-c",
            &format!("read -P 0x22 {} {}", 512 * MIB, top_mib * MIB),
            path_str(&present),
        ],
    )?;
    if reads.contains("failed") {
        problems.push(format!("live {expected}: the disk lost data: {reads}"));
    }
    Ok((took, paused))
}

/// (base, top) MiB of a chain whose cheaper merge is `direction`: the planner copies
/// the smaller side (a commit copies the top down, a stream the base up), whether QEMU
/// can pause or not.
fn merge_sizes(direction: &str) -> (u64, u64) {
    if direction == "commit" {
        (MERGE_MIB + 16, MERGE_MIB)
    } else {
        (MERGE_MIB - 16, MERGE_MIB)
    }
}

/// The same merge with plain qemu-img on identical files built offline.
fn plain_merge(work: &Path, direction: &str) -> Result<Duration> {
    let dir = tempfile::Builder::new()
        .prefix("plain-live")
        .tempdir_in(work)?;
    let base: PathBuf = dir.path().join("base.qcow2");
    let top: PathBuf = dir.path().join("top.qcow2");
    let (base_mib, top_mib) = merge_sizes(direction);
    let size = GIB.to_string();
    run_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&base), &size],
    )?;
    write_bytes(&base, 0x11, 0, base_mib * MIB);
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            path_str(&top),
        ],
    )?;
    write_bytes(&top, 0x22, 512 * MIB, top_mib * MIB);
    sync_fs()?;
    if direction == "commit" {
        timed_tool(
            "qemu-img",
            &[
                "commit",
                "-f",
                "qcow2",
                "-d",
                "-b",
                path_str(&base),
                path_str(&top),
            ],
        )
    } else {
        timed_tool(
            "qemu-img",
            &["rebase", "-f", "qcow2", "-b", "", path_str(&top)],
        )
    }
}

pub fn report(figures: &LiveFigures) -> (String, Vec<String>) {
    let mut s = String::new();
    let mut problems = figures.problems.clone();
    let _ = writeln!(
        s,
        "\n### Live snapshot of a running VM with 4 disks (qemu-storage-daemon; {SNAPSHOT_ROUNDS} rounds; median (min–max))\n"
    );
    let _ = writeln!(s, "| what | time | ratio |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(
        s,
        "| service: POST snapshot + job end, VM running (overlays opened and switched in QEMU) | {} | {:.2} × offline |",
        spread(&figures.live),
        ratio(median(&figures.live), median(&figures.offline))
    );
    let _ = writeln!(
        s,
        "| service: same, VM stopped | {} | 1 |",
        spread(&figures.offline)
    );
    let _ = writeln!(
        s,
        "| guest: longest 64 KiB write over NBD while the snapshots ran | {} | {:.2} × idle |",
        ms(figures.write_during),
        ratio(figures.write_during, figures.write_idle)
    );
    let _ = writeln!(
        s,
        "| guest: longest 64 KiB write with nothing else running ({WRITES} writes) | {} | 1 |",
        ms(figures.write_idle)
    );
    let frozen = median(&figures.frozen);
    let _ = writeln!(
        s,
        "| guest agent: frozen window of a quiesced live snapshot, freeze answered to thaw received | {} | target under {} |",
        spread(&figures.frozen),
        ms(FROZEN_TARGET)
    );
    let _ = writeln!(
        s,
        "| job: `frozen_ms` of the same snapshots (freeze answer to thaw answer) | {} | |",
        spread(&figures.frozen_job)
    );
    if frozen > FROZEN_TARGET {
        problems.push(format!(
            "quiesced live snapshot: the guest stayed frozen {}, over the target of {}",
            ms(frozen),
            ms(FROZEN_TARGET)
        ));
    }
    let commit = ratio(median(&figures.commit), median(&figures.commit_plain));
    let stream = ratio(median(&figures.stream), median(&figures.stream_plain));
    let stream_no_pause = ratio(
        median(&figures.stream_no_pause),
        median(&figures.stream_plain),
    );
    let _ = writeln!(
        s,
        "\n### Live merges of {MERGE_MIB} MiB ({MERGE_ROUNDS} rounds, interleaved; median (min–max))\n"
    );
    let _ = writeln!(s, "| what | time | ratio |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(
        s,
        "| service: DELETE snapshot + job end, active commit with pivot (guest paused {}) | {} | {commit:.2} × plain |",
        spread(&figures.paused),
        spread(&figures.commit)
    );
    let _ = writeln!(
        s,
        "| plain: `qemu-img commit -d` of the same data | {} | 1 |",
        spread(&figures.commit_plain)
    );
    let _ = writeln!(
        s,
        "| service: DELETE snapshot + job end, stream into the active layer, QEMU can pause | {} | {stream:.2} × plain |",
        spread(&figures.stream)
    );
    let _ = writeln!(
        s,
        "| service: same, QEMU cannot pause (waits for the guest's flush, every 500 ms) | {} | {stream_no_pause:.2} × plain |",
        spread(&figures.stream_no_pause)
    );
    let _ = writeln!(
        s,
        "| plain: `qemu-img rebase -b ''` of the same data | {} | 1 |",
        spread(&figures.stream_plain)
    );
    for (what, value) in [("commit", commit), ("stream", stream)] {
        if value > MERGE_TARGET_RATIO {
            problems.push(format!(
                "live {what}: {value:.2} × plain, over the target of {MERGE_TARGET_RATIO}"
            ));
        }
    }
    let _ = writeln!(
        s,
        "\nLive/plain: commit {commit:.2}, stream {stream:.2} (target within {MERGE_TARGET_RATIO}); stream without a pause {stream_no_pause:.2}. Guest frozen {} (target under {}).",
        ms(frozen),
        ms(FROZEN_TARGET)
    );
    (s, problems)
}
