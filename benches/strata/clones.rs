//! Clone and template benchmarks.
//!
//! 1. Linked clone of a VM's snapshot, one disk of 10 GiB against one of 1 GiB (each
//!    holding 256 MiB of data): `POST /v1/vms/{id}/clone` until the job has ended. The
//!    cost must not depend on the disk size.
//! 2. Full clone of a VM's present state (one disk of 8 GiB, 2 GiB of data over a
//!    two-layer chain) against plain `qemu-img convert -f qcow2 -O qcow2` of the same
//!    active file followed by `sync` of the copy (the service makes its copy durable
//!    before recording it), interleaved, with `sync` before each. Target: service/plain at most
//!    1.1.
//! 3. Deploying 100 linked VMs from a template in one request, against 100 sequential
//!    plain `qemu-img create -u -b TEMPLATE` calls.
//!
//! Each clone is checked afterwards (`qemu-img compare` against its source).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use super::{
    Api, GIB, MIB, Result, median, path_str, qemu_io_write, ratio, single_active_path, spread,
    str_field, sync_fs, tool,
};

const LINKED_ROUNDS: usize = 20;
const FULL_ROUNDS: usize = 5;
const DEPLOY_COUNT: usize = 100;
/// Service/plain ratio a full clone is expected to stay under.
const FULL_TARGET_RATIO: f64 = 1.1;

pub struct CloneFigures {
    linked_10g: Vec<Duration>,
    linked_1g: Vec<Duration>,
    full_service: Vec<Duration>,
    full_plain: Vec<Duration>,
    full_bytes: u64,
    deploy: Duration,
    deploy_plain: Duration,
    problems: Vec<String>,
}

fn compare(a: &Path, b: &Path) -> Result<()> {
    tool(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            path_str(a)?,
            path_str(b)?,
        ],
    )
    .map(drop)
}

/// Clone `vm` and wait for the job; returns the time and the new VM's id.
fn clone(api: &Api, vm: &str, body: serde_json::Value) -> Result<(Duration, String)> {
    let start = Instant::now();
    let job = api.run_job(Method::POST, &format!("/v1/vms/{vm}/clone"), Some(&body))?;
    Ok((start.elapsed(), str_field(&job["target"], "id")?.to_owned()))
}

pub fn bench_clones(api: &Api, work: &Path) -> Result<CloneFigures> {
    let mut problems = Vec::new();
    eprintln!("strata bench: linked clones, {LINKED_ROUNDS} rounds");
    let vm_10g = api.create_vm("bench-clone-10g", 1, 10 * GIB)?;
    let vm_1g = api.create_vm("bench-clone-1g", 1, GIB)?;
    let mut snapshots = Vec::new();
    for vm in [&vm_10g, &vm_1g] {
        qemu_io_write(&single_active_path(api, vm)?, 0x5c, 0, 256 * MIB)?;
        snapshots.push(api.snapshot(vm, "base")?);
    }
    let mut linked_10g = Vec::new();
    let mut linked_1g = Vec::new();
    let mut clones = Vec::new();
    for round in 0..=LINKED_ROUNDS {
        let mut pair = [
            (&vm_10g, &snapshots[0], &mut linked_10g),
            (&vm_1g, &snapshots[1], &mut linked_1g),
        ];
        // Alternate which goes first, so neither always pays for the other's fsyncs.
        if round % 2 == 1 {
            pair.reverse();
        }
        for (vm, snapshot, samples) in pair {
            let (time, id) = clone(
                api,
                vm,
                json!({"name": format!("lc-{vm}-{round}"), "mode": "linked", "snapshot_id": snapshot}),
            )?;
            if round > 0 {
                samples.push(time);
            }
            clones.push((id, vm.clone()));
        }
    }
    for (id, vm) in clones.iter().take(2) {
        if let Err(e) = compare(&single_active_path(api, id)?, &single_active_path(api, vm)?) {
            problems.push(format!("a linked clone differs from its source: {e}"));
        }
    }
    for (id, _) in &clones {
        api.delete_vm(id)?;
    }
    api.delete_vm(&vm_10g)?;
    api.delete_vm(&vm_1g)?;

    eprintln!("strata bench: full clones, {FULL_ROUNDS} rounds");
    let source = api.create_vm("bench-full", 1, 8 * GIB)?;
    qemu_io_write(&single_active_path(api, &source)?, 0x6d, 0, GIB)?;
    api.snapshot(&source, "half")?;
    qemu_io_write(&single_active_path(api, &source)?, 0x6e, GIB, GIB)?;
    let active = single_active_path(api, &source)?;
    let plain_dir = work.join("plain-full");
    std::fs::create_dir_all(&plain_dir)?;
    let mut full_service = Vec::new();
    let mut full_plain = Vec::new();
    let mut full_bytes = 0;
    for round in 0..FULL_ROUNDS {
        sync_fs()?;
        let (time, id) = clone(
            api,
            &source,
            json!({"name": format!("full-{round}"), "mode": "full"}),
        )?;
        full_service.push(time);
        let copy = single_active_path(api, &id)?;
        full_bytes = std::fs::metadata(&copy)?.len();
        if let Err(e) = compare(&copy, &active) {
            problems.push(format!("a full clone differs from its source: {e}"));
        }
        api.delete_vm(&id)?;
        sync_fs()?;
        let target = plain_dir.join(format!("copy-{round}.qcow2"));
        // Like the service, make the copy durable before calling it done.
        let started = Instant::now();
        tool(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                path_str(&active)?,
                path_str(&target)?,
            ],
        )?;
        tool("sync", &[path_str(&target)?])?;
        full_plain.push(started.elapsed());
        std::fs::remove_file(&target)?;
    }
    api.delete_vm(&source)?;

    eprintln!("strata bench: deploying {DEPLOY_COUNT} linked VMs from a template");
    let golden = api.create_vm("bench-golden", 1, 10 * GIB)?;
    qemu_io_write(&single_active_path(api, &golden)?, 0x7f, 0, 64 * MIB)?;
    api.run_job(
        Method::POST,
        &format!("/v1/vms/{golden}/convert-to-template"),
        None,
    )?;
    let template_file = single_active_path_of_template(api, &golden)?;
    let start = Instant::now();
    let job = api.run_job(
        Method::POST,
        &format!("/v1/templates/{golden}/deploy"),
        Some(&json!({"name": "fleet", "mode": "linked", "count": DEPLOY_COUNT})),
    )?;
    let deploy = start.elapsed();
    let vms: Vec<String> = job["detail"]["vm_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if vms.len() != DEPLOY_COUNT {
        problems.push(format!(
            "the deploy made {} VMs, not {DEPLOY_COUNT}",
            vms.len()
        ));
    }
    if let Some(first) = vms.first()
        && let Err(e) = compare(&single_active_path(api, first)?, &template_file)
    {
        problems.push(format!("a deployed VM differs from its template: {e}"));
    }
    let name = template_file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("template file name")?
        .to_owned();
    let plain_deploy = work.join("plain-deploy");
    std::fs::create_dir_all(&plain_deploy)?;
    std::fs::copy(&template_file, plain_deploy.join(&name))?;
    let start = Instant::now();
    for i in 0..DEPLOY_COUNT {
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                &name,
                "-F",
                "qcow2",
                path_str(&plain_deploy.join(format!("vm-{i}.qcow2")))?,
                &(10 * GIB).to_string(),
            ],
        )?;
    }
    let deploy_plain = start.elapsed();
    for vm in &vms {
        api.delete_vm(vm)?;
    }
    api.call(
        Method::DELETE,
        &format!("/v1/templates/{golden}"),
        None,
        reqwest::StatusCode::ACCEPTED,
    )
    .and_then(|job| api.wait_job(&job))?;
    Ok(CloneFigures {
        linked_10g,
        linked_1g,
        full_service,
        full_plain,
        full_bytes,
        deploy,
        deploy_plain,
        problems,
    })
}

fn single_active_path_of_template(api: &Api, template: &str) -> Result<std::path::PathBuf> {
    let view = api.get(&format!("/v1/templates/{template}"))?;
    Ok(str_field(&view["disks"][0], "path")?.into())
}

pub fn report(figures: &CloneFigures) -> (String, Vec<String>) {
    let mut s = String::new();
    let mut problems = figures.problems.clone();
    let _ = writeln!(
        s,
        "\n### Linked clone of a snapshot ({LINKED_ROUNDS} rounds; median (min–max))\n"
    );
    let _ = writeln!(s, "| what | time | ratio |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(
        s,
        "| service: POST clone + job end, one 10 GiB disk (256 MiB of data) | {} | {:.2} × the 1 GiB case |",
        spread(&figures.linked_10g),
        ratio(median(&figures.linked_10g), median(&figures.linked_1g))
    );
    let _ = writeln!(
        s,
        "| service: same, one 1 GiB disk | {} | 1 |",
        spread(&figures.linked_1g)
    );
    let full = ratio(median(&figures.full_service), median(&figures.full_plain));
    let _ = writeln!(
        s,
        "\n### Full clone of the present state, one 8 GiB disk with 2 GiB of data over two layers ({FULL_ROUNDS} rounds)\n"
    );
    let _ = writeln!(s, "| what | time | ratio |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(
        s,
        "| service: POST clone + job end | {} | {full:.2} × plain |",
        spread(&figures.full_service)
    );
    let _ = writeln!(
        s,
        "| plain: `qemu-img convert -f qcow2 -O qcow2` of the same active file, then `sync` of the copy | {} | 1 |",
        spread(&figures.full_plain)
    );
    let _ = writeln!(
        s,
        "\nThe copy is {:.0} MiB on disk (sparse). Service/plain: {full:.2} (target at most {FULL_TARGET_RATIO}: {}).",
        figures.full_bytes as f64 / MIB as f64,
        if full <= FULL_TARGET_RATIO {
            "met"
        } else {
            "missed"
        }
    );
    if full > FULL_TARGET_RATIO {
        problems.push(format!(
            "full clone took {full:.2} × plain qemu-img convert (target {FULL_TARGET_RATIO})"
        ));
    }
    let _ = writeln!(
        s,
        "\n### Deploying {DEPLOY_COUNT} linked VMs from a template\n"
    );
    let _ = writeln!(s, "| what | time | per VM |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(
        s,
        "| service: one POST deploy (count {DEPLOY_COUNT}) + job end | {:.2} s | {} |",
        figures.deploy.as_secs_f64(),
        super::ms(figures.deploy / DEPLOY_COUNT as u32)
    );
    let _ = writeln!(
        s,
        "| plain: {DEPLOY_COUNT} × `qemu-img create -u -b TEMPLATE` in sequence | {:.2} s | {} |",
        figures.deploy_plain.as_secs_f64(),
        super::ms(figures.deploy_plain / DEPLOY_COUNT as u32)
    );
    let _ = writeln!(
        s,
        "\nService/plain for the batch: {:.2}.",
        ratio(figures.deploy, figures.deploy_plain)
    );
    (s, problems)
}
