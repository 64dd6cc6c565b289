//! Scheduled snapshots and retention, driven by a test clock (`STRATA_CLOCK_FILE`): the
//! tests move time forward, the service's scheduler takes the runs, and the bytes of
//! every surviving snapshot are checked after the prunes.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

const DISK: u64 = 32 * MIB;

/// A clock file the service reads as "now"; time stands still between `set`s.
struct Clock {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Clock {
    fn at(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("clock dir");
        let clock = Self {
            path: dir.path().join("now"),
            _dir: dir,
        };
        clock.set(time(text));
        clock
    }

    /// Replace the file atomically so the service never reads half a timestamp.
    fn set(&self, at: DateTime<Utc>) {
        let temp = self.path.with_extension("new");
        std::fs::write(&temp, at.to_rfc3339_opts(SecondsFormat::Secs, true)).unwrap();
        std::fs::rename(&temp, &self.path).unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("STRATA_CLOCK_FILE", self.path.display().to_string()),
            ("STRATA_SCHEDULER_TICK_MS", "50".into()),
            ("STRATA_SWEEP_INTERVAL", "1".into()),
        ]
    }
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn hours(n: i64) -> chrono::Duration {
    chrono::Duration::hours(n)
}

async fn spawn(clock: &Clock, extra: &[(&str, &str)]) -> TestApp {
    let env = clock.env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    TestApp::spawn_with(&all).await
}

async fn restart(app: &mut TestApp, clock: &Clock) {
    let env = clock.env();
    let all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    app.restart(&all).await;
}

async fn create_schedule(app: &TestApp, body: Value) -> Value {
    let (status, schedule) = app.post("/v1/schedules", body).await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    schedule
}

async fn runs(app: &TestApp, schedule: &str) -> Vec<Value> {
    let (status, list) = app.get(&format!("/v1/schedules/{schedule}/runs")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["items"].as_array().unwrap().clone()
}

/// Wait until the schedule has `count` runs and the newest has finished; return it.
async fn wait_run(app: &TestApp, schedule: &str, count: usize) -> Value {
    for _ in 0..400 {
        let runs = runs(app, schedule).await;
        if runs.len() >= count && runs[0]["status"] != "running" {
            assert_eq!(runs.len(), count, "more runs than expected: {runs:#?}");
            return runs[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {count} of schedule {schedule} never finished");
}

async fn pending_jobs(app: &TestApp) -> usize {
    let mut count = 0;
    for status in ["queued", "running"] {
        let (_, jobs) = app.get(&format!("/v1/jobs?status={status}")).await;
        count += jobs["items"].as_array().unwrap().len();
    }
    count
}

/// Wait until no job is left and the policy has nothing more to prune (except what is
/// held): the state a sweep converges to.
async fn settle(app: &TestApp, schedule: &str) -> Value {
    for _ in 0..400 {
        if pending_jobs(app).await == 0 {
            let (_, preview) = app.get(&format!("/v1/schedules/{schedule}/preview")).await;
            let unheld = preview["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["action"] == "prune" && i["held"].is_null())
                .count();
            if unheld == 0 && pending_jobs(app).await == 0 {
                return preview;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("schedule {schedule} never settled");
}

async fn snapshots(app: &TestApp, vm: &Uuid) -> Vec<Value> {
    let (_, list) = app.get(&format!("/v1/vms/{vm}/snapshots")).await;
    list["items"].as_array().unwrap().clone()
}

fn is_problem(status: StatusCode, problem: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "expected {code}: {problem}");
    assert_eq!(problem["code"], code, "{problem}");
}

fn pattern(index: u64) -> u8 {
    0x10 + index as u8
}

#[tokio::test]
async fn a_schedule_run_across_simulated_days_keeps_what_its_policy_says_with_every_byte() {
    let clock = Clock::at("2026-02-28T23:00:00Z");
    let app = spawn(&clock, &[]).await;
    let vm = app.create_vm("six-hourly", &[("root", DISK)]).await.id;
    let manual = app.snapshot(&vm, "manual-base").await.id;
    let schedule = create_schedule(
        &app,
        json!({"name": "every-6h", "vm_id": vm, "cron": "0 */6 * * *",
               "retention": {"keep_last": 2, "keep_daily": 3}}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap().to_owned();
    assert_eq!(schedule["next_run_at"], "2026-03-01T00:00:00Z");
    assert_eq!(schedule["name_template"], "auto-%Y%m%d-%H%M%S");
    assert!(schedule["last_run"].is_null());

    // Four days of runs at 00, 06, 12 and 18 h; before each, the guest writes one MiB
    // of its own pattern at its own offset, so every snapshot holds distinct bytes.
    let start = time("2026-03-01T00:00:00Z");
    let mut taken = Vec::new();
    let mut pruned_by_runs = 0;
    for i in 0..16u64 {
        write(&app.active_path(&vm, "root").await, pattern(i), i, 1);
        clock.set(start + hours(6 * i as i64));
        let run = wait_run(&app, &sid, i as usize + 1).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        assert_eq!(run["trigger"], "cron");
        let snapshot = run["targets"][0]["snapshot_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(run["job_ids"][0], run["targets"][0]["job_id"]);
        for pruned in run["retention"]["pruned"].as_array().unwrap() {
            assert_eq!(pruned["why_pruned"], "outside_policy");
            assert!(pruned["job_id"].is_string());
            pruned_by_runs += 1;
        }
        settle(&app, &sid).await;
        taken.push((i, snapshot));
    }
    assert!(
        pruned_by_runs > 0,
        "the runs' own retention passes pruned nothing"
    );

    // keep_last 2: 4th 12:00 and 18:00; keep_daily 3: 18:00 of the 4th, 3rd and 2nd.
    let expected: Vec<u64> = vec![7, 11, 14, 15];
    let left = snapshots(&app, &vm).await;
    let mut scheduled: Vec<(String, String)> = left
        .iter()
        .filter(|s| s["schedule_id"] == sid.as_str())
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    scheduled.sort_by(|a, b| a.1.cmp(&b.1));
    let names: Vec<&str> = scheduled.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "auto-20260302-180000",
            "auto-20260303-180000",
            "auto-20260304-120000",
            "auto-20260304-180000"
        ]
    );
    // The manual snapshot is never the policy's to prune.
    assert!(
        left.iter()
            .any(|s| s["id"] == manual.to_string() && s["schedule_id"].is_null())
    );
    assert_eq!(left.len(), expected.len() + 1);

    // Each survivor still shows exactly what the guest had written when it was taken.
    for &i in &expected {
        let snapshot = &taken[i as usize].1;
        assert!(scheduled.iter().any(|(id, _)| id == snapshot));
        let path = app.snapshot_path(&vm, snapshot, "root").await;
        let mut regions: Vec<(u8, u64, u64)> = (0..=i).map(|j| (pattern(j), j, 1)).collect();
        regions.push((0, i + 1, 16 - i));
        expect_all(&path, &regions);
    }
    let present = app.active_path(&vm, "root").await;
    expect_all(
        &present,
        &(0..16).map(|j| (pattern(j), j, 1)).collect::<Vec<_>>(),
    );
    assert_eq!(chain(&present).len(), expected.len() + 2);
    check_clean(&present);
    assert_eq!(app.volume_files().len(), expected.len() + 2);

    let (_, schedule) = app.get(&format!("/v1/schedules/{sid}")).await;
    assert_eq!(schedule["next_run_at"], "2026-03-05T00:00:00Z");
    assert_eq!(schedule["last_run"]["status"], "succeeded");
    assert_eq!(schedule["last_run"]["at"], "2026-03-04T18:00:00Z");
    assert_eq!(
        schedule["last_run"]["job_id"],
        runs(&app, &sid).await[0]["job_ids"][0]
    );
}

#[tokio::test]
async fn a_missed_run_is_taken_once_at_start_and_the_schedule_continues_from_now() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let mut app = spawn(&clock, &[]).await;
    let vm = app.create_vm("missed", &[("root", DISK)]).await.id;
    let schedule = create_schedule(
        &app,
        json!({"name": "hourly", "vm_id": vm, "cron": "@hourly"}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap();
    assert_eq!(schedule["next_run_at"], "2026-03-01T01:00:00Z");

    // Down from 00:30 to 05:45: five ticks missed.
    app.kill();
    clock.set(time("2026-03-01T05:45:00Z"));
    restart(&mut app, &clock).await;
    let run = wait_run(&app, sid, 1).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["started_at"], "2026-03-01T05:45:00Z");
    // A few more ticks at the same time take nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs(&app, sid).await.len(), 1);
    assert_eq!(snapshots(&app, &vm).await.len(), 1);
    let (_, schedule) = app.get(&format!("/v1/schedules/{sid}")).await;
    assert_eq!(schedule["next_run_at"], "2026-03-01T06:00:00Z");

    clock.set(time("2026-03-01T06:00:00Z"));
    wait_run(&app, sid, 2).await;
}

#[tokio::test]
async fn a_run_still_going_at_the_next_tick_makes_that_tick_skipped_not_stacked() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let app = spawn(
        &clock,
        &[("STRATA_FAULT", "snapshot_create:planned:pause=3000")],
    )
    .await;
    let vm = app.create_vm("slow", &[("root", DISK)]).await.id;
    let schedule = create_schedule(
        &app,
        json!({"name": "hourly", "vm_id": vm, "cron": "0 * * * *"}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap();
    clock.set(time("2026-03-01T01:00:00Z"));
    let first = loop {
        if let Some(run) = runs(&app, sid).await.first() {
            break run.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first["status"], "running");

    // By hand: refused while a run is in progress, and nothing is recorded.
    let (status, problem) = app
        .post(&format!("/v1/schedules/{sid}/run"), json!({}))
        .await;
    is_problem(status, &problem, StatusCode::CONFLICT, "schedule_busy");
    assert_eq!(problem["run_id"], first["id"]);

    // By the clock: recorded as skipped.
    clock.set(time("2026-03-01T02:00:00Z"));
    let skipped = wait_run(&app, sid, 2).await;
    assert_eq!(skipped["status"], "skipped");
    assert!(
        skipped["reason"]
            .as_str()
            .unwrap()
            .contains("still in progress"),
        "{skipped}"
    );
    assert!(skipped["job_ids"].as_array().unwrap().is_empty());

    let (_, first) = app
        .get(&format!(
            "/v1/schedules/{sid}/runs/{}",
            first["id"].as_str().unwrap()
        ))
        .await;
    let first_done = loop {
        let (_, run) = app
            .get(&format!(
                "/v1/schedules/{sid}/runs/{}",
                first["id"].as_str().unwrap()
            ))
            .await;
        if run["status"] != "running" {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first_done["status"], "succeeded");
    assert_eq!(snapshots(&app, &vm).await.len(), 1);
    let (_, schedule) = app.get(&format!("/v1/schedules/{sid}")).await;
    assert_eq!(schedule["next_run_at"], "2026-03-01T03:00:00Z");
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_run_is_finished_after_restart() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let mut app = spawn(&clock, &[("STRATA_FAULT", "snapshot_create:planned")]).await;
    let vm = app.create_vm("crashy", &[("root", DISK)]).await.id;
    write(&app.active_path(&vm, "root").await, 0x5a, 0, 2);
    let schedule = create_schedule(
        &app,
        json!({"name": "hourly", "vm_id": vm, "cron": "@hourly", "retention": {"keep_last": 1}}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap().to_owned();
    clock.set(time("2026-03-01T01:00:00Z"));
    // The snapshot job aborts the process once it has journaled its plan.
    assert!(!app.wait_exit().success());

    restart(&mut app, &clock).await;
    let run = wait_run(&app, &sid, 1).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let snapshot = run["targets"][0]["snapshot_id"].as_str().unwrap();
    let (_, view) = app.get(&format!("/v1/snapshots/{snapshot}")).await;
    assert_eq!(view["status"], "ready");
    expect_all(
        &app.snapshot_path(&vm, snapshot, "root").await,
        &[(0x5a, 0, 2), (0, 2, 1)],
    );
    let present = app.active_path(&vm, "root").await;
    assert_eq!(chain(&present).len(), 2);
    assert_eq!(app.volume_files().len(), 2);
    check_clean(&present);
}

#[tokio::test]
async fn a_selector_schedule_snapshots_every_labelled_vm_and_prunes_each_on_its_own() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let app = spawn(&clock, &[]).await;
    let mut web = Vec::new();
    for name in ["web-1", "web-2"] {
        let (status, vm) = app
            .post(
                "/v1/vms",
                json!({"name": name, "labels": {"tier": "web"}, "disks": [{"name": "root", "size_bytes": DISK}]}),
            )
            .await;
        let vm = app.expect_job((status, vm)).await;
        web.push(vm.target.id);
    }
    let db = app.create_vm("db", &[("root", DISK)]).await.id;
    let schedule = create_schedule(
        &app,
        json!({"name": "web", "selector": "tier=web", "cron": "@hourly",
               "name_template": "{schedule}-{vm}-%H%M", "retention": {"keep_last": 1}}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap().to_owned();
    assert_eq!(schedule["selector"], "tier=web");
    assert!(schedule["vm_id"].is_null());

    for (i, vm) in web.iter().enumerate() {
        write(&app.active_path(vm, "root").await, 0x61 + i as u8, 0, 1);
    }
    clock.set(time("2026-03-01T01:00:00Z"));
    let first = wait_run(&app, &sid, 1).await;
    assert_eq!(first["targets"].as_array().unwrap().len(), 2, "{first:#}");
    for (i, vm) in web.iter().enumerate() {
        write(&app.active_path(vm, "root").await, 0x71 + i as u8, 1, 1);
    }
    clock.set(time("2026-03-01T02:00:00Z"));
    wait_run(&app, &sid, 2).await;
    settle(&app, &sid).await;

    for (i, vm) in web.iter().enumerate() {
        let left = snapshots(&app, vm).await;
        assert_eq!(left.len(), 1, "keep_last counts per VM: {left:#?}");
        assert_eq!(left[0]["name"], format!("web-web-{}-0200", i + 1));
        expect_all(
            &app.snapshot_path(vm, left[0]["id"].as_str().unwrap(), "root")
                .await,
            &[(0x61 + i as u8, 0, 1), (0x71 + i as u8, 1, 1)],
        );
    }
    assert!(
        snapshots(&app, &db).await.is_empty(),
        "an unlabelled VM was snapshotted"
    );

    // A label removed: the VM drops out of the next run.
    let (status, _) = app
        .patch(&format!("/v1/vms/{}", web[1]), json!({"labels": {}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    clock.set(time("2026-03-01T03:00:00Z"));
    let third = wait_run(&app, &sid, 3).await;
    assert_eq!(third["targets"].as_array().unwrap().len(), 1);
    assert_eq!(third["targets"][0]["vm_id"], web[0].to_string());

    // No VM carries the label: skipped, with the reason.
    let (status, _) = app
        .patch(
            &format!("/v1/schedules/{sid}"),
            json!({"selector": "tier=none"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, run) = app
        .post(&format!("/v1/schedules/{sid}/run"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["status"], "skipped");
    assert_eq!(run["trigger"], "manual");
    assert!(
        run["reason"].as_str().unwrap().contains("tier=none"),
        "{run}"
    );
}

#[tokio::test]
async fn a_running_vm_is_skipped_with_the_reason_and_prunes_it_blocks_are_reported_held() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let app = spawn(&clock, &[]).await;
    let vm = app.create_vm("live", &[("root", DISK)]).await.id;
    let schedule = create_schedule(
        &app,
        json!({"name": "manual-only", "vm_id": vm, "cron": "0 0 1 1 *", "retention": {"keep_last": 2}}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap().to_owned();
    let mut taken = Vec::new();
    for (i, at) in ["2026-03-01T01:00:00Z", "2026-03-01T02:00:00Z"]
        .iter()
        .enumerate()
    {
        write(
            &app.active_path(&vm, "root").await,
            0x31 + i as u8,
            i as u64,
            1,
        );
        clock.set(time(at));
        let (status, run) = app
            .post(&format!("/v1/schedules/{sid}/run"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let run = wait_run(&app, &sid, i + 1).await;
        assert_eq!(run["status"], "succeeded");
        taken.push(
            run["targets"][0]["snapshot_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }

    // The VM starts; the policy shrinks to one snapshot. Deleting the older one would
    // merge layers the running VM reads, so the prune is held, not forced.
    let (status, _) = app
        .patch(&format!("/v1/vms/{vm}"), json!({"state": "running"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .patch(
            &format!("/v1/schedules/{sid}"),
            json!({"retention": {"keep_last": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, preview) = app.get(&format!("/v1/schedules/{sid}/preview")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(preview["prune_count"], 1, "{preview:#}");
    assert_eq!(preview["keep_count"], 1);
    let items = preview["items"].as_array().unwrap();
    assert_eq!(items[0]["snapshot_id"], taken[0].as_str());
    assert_eq!(items[0]["action"], "prune");
    assert_eq!(items[0]["prune_reason"], "outside_policy");
    assert_eq!(items[0]["held"]["code"], "vm_running");
    assert_eq!(items[1]["action"], "keep");
    assert_eq!(items[1]["keep_reasons"], json!(["last"]));

    clock.set(time("2026-03-01T03:00:00Z"));
    let (status, run) = app
        .post(&format!("/v1/schedules/{sid}/run"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(run["status"], "skipped", "{run:#}");
    assert_eq!(run["targets"][0]["outcome"], "skipped");
    assert_eq!(run["targets"][0]["code"], "vm_running");
    assert!(run["reason"].as_str().unwrap().contains("running"), "{run}");
    let held = &run["retention"]["held"];
    assert_eq!(held[0]["snapshot_id"], taken[0].as_str(), "{run:#}");
    assert_eq!(held[0]["code"], "vm_running");
    // Sweeps keep holding it while the VM runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(snapshots(&app, &vm).await.len(), 2);

    // Stopped: the next sweep prunes it, and the survivor keeps its bytes.
    let (status, _) = app
        .patch(&format!("/v1/vms/{vm}"), json!({"state": "stopped"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let preview = settle(&app, &sid).await;
    assert_eq!(preview["prune_count"], 0, "{preview:#}");
    let left = snapshots(&app, &vm).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], taken[1].as_str());
    expect_all(
        &app.snapshot_path(&vm, &taken[1], "root").await,
        &[(0x31, 0, 1), (0x32, 1, 1)],
    );
    check_clean(&app.active_path(&vm, "root").await);
}

#[tokio::test]
async fn held_and_expired_scheduled_snapshots_follow_hold_first_then_expiry() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let app = spawn(&clock, &[]).await;
    let vm = app.create_vm("holds", &[("root", DISK)]).await.id;
    let schedule = create_schedule(
        &app,
        json!({"name": "h", "vm_id": vm, "cron": "@hourly", "retention": {"keep_last": 1}}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap().to_owned();
    clock.set(time("2026-03-01T01:00:00Z"));
    let first = wait_run(&app, &sid, 1).await;
    let first_snapshot = first["targets"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = app
        .patch(
            &format!("/v1/snapshots/{first_snapshot}"),
            json!({"hold": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for (n, at) in ["2026-03-01T02:00:00Z", "2026-03-01T03:00:00Z"]
        .iter()
        .enumerate()
    {
        clock.set(time(at));
        wait_run(&app, &sid, n + 2).await;
        settle(&app, &sid).await;
    }
    // keep_last 1 keeps the 03:00 one; the held 01:00 one stays; 02:00 went.
    let names: Vec<String> = snapshots(&app, &vm)
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["auto-20260301-010000", "auto-20260301-030000"]);
    let (_, preview) = app.get(&format!("/v1/schedules/{sid}/preview")).await;
    assert_eq!(preview["items"][0]["keep_reasons"], json!(["hold"]));
}

/// `base` with the members of `patch` set, or removed where `patch` has them null.
fn with(base: &Value, patch: Value) -> Value {
    let mut body = base.clone();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            body.as_object_mut().unwrap().remove(k);
        } else {
            body[k] = v.clone();
        }
    }
    body
}

/// Every malformed schedule is refused with its problem, and none is stored.
async fn bad_schedules_are_refused_and_none_is_stored(app: &TestApp, base: &Value) {
    let with = |patch: Value| with(base, patch);
    let bad: Vec<(Value, StatusCode, &str)> = vec![
        (
            with(json!({"cron": "* * * *"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"cron": "61 * * * *"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"cron": "@every5m"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"timezone": "Mars/Olympus"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"selector": "tier=web"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"vm_id": null})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"vm_id": null, "selector": "tier"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"vm_id": UNKNOWN_ID})),
            StatusCode::NOT_FOUND,
            "vm_not_found",
        ),
        (
            with(json!({"vm_id": "not-a-uuid"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"name": ""})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"name_template": "%Q"})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"name_template": "x".repeat(200)})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"retention": {"keep_last": 0}})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"retention": {"keep_last": -1}})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"retention": {"max_age": "7 days"}})),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            with(json!({"retention": {"keep_forever": 1}})),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            with(json!({"enabled": "yes"})),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            with(json!({"color": "blue"})),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
    ];
    for (body, status, code) in bad {
        let (got, problem) = app.post("/v1/schedules", body.clone()).await;
        is_problem(got, &problem, status, code);
        assert!(problem["detail"].as_str().is_some(), "{body}: {problem}");
    }
    let (_, list) = app.get("/v1/schedules").await;
    assert!(
        list["items"].as_array().unwrap().is_empty(),
        "a refused schedule was stored"
    );
}

/// A schedule in a time zone: its next run, its retention as stored, its name taken.
async fn a_schedule_runs_next_at_midnight_in_its_time_zone(app: &TestApp, base: &Value) -> String {
    let schedule = create_schedule(
        app,
        with(
            base,
            json!({"timezone": "Europe/Paris", "retention": {"keep_daily": 7, "max_age": "36h"}}),
        ),
    )
    .await;
    // Midnight in Paris is 23:00 UTC in March (CET).
    assert_eq!(schedule["next_run_at"], "2026-03-01T23:00:00Z");
    assert_eq!(
        schedule["retention"],
        json!({"keep_last": null, "keep_hourly": null, "keep_daily": 7, "keep_weekly": null, "keep_monthly": null, "keep_yearly": null, "max_age": "1d12h"})
    );
    let (status, problem) = app.post("/v1/schedules", base.clone()).await;
    is_problem(status, &problem, StatusCode::CONFLICT, "name_taken");
    schedule["id"].as_str().unwrap().to_owned()
}

/// Disabled: no next run; enabled again: the next one from now. Bad changes are
/// refused and change nothing.
async fn disabling_and_enabling_moves_the_next_run(
    app: &TestApp,
    clock: &Clock,
    sid: &str,
    vm: Uuid,
) {
    let (status, patched) = app
        .patch(&format!("/v1/schedules/{sid}"), json!({"enabled": false}))
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert!(patched["next_run_at"].is_null());
    clock.set(time("2026-03-02T08:00:00Z"));
    let (_, patched) = app
        .patch(
            &format!("/v1/schedules/{sid}"),
            json!({"enabled": true, "cron": "0 */4 * * *", "timezone": "UTC"}),
        )
        .await;
    assert_eq!(patched["next_run_at"], "2026-03-02T12:00:00Z");
    for (body, status, code) in [
        (
            json!({"cron": "nope"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            json!({"vm_id": vm, "selector": "a=b"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            json!({"retention": {"keep_yearly": 0}}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (json!({"bogus": 1}), StatusCode::BAD_REQUEST, "invalid_json"),
    ] {
        let (got, problem) = app.patch(&format!("/v1/schedules/{sid}"), body).await;
        is_problem(got, &problem, status, code);
    }
    let (_, unchanged) = app.get(&format!("/v1/schedules/{sid}")).await;
    assert_eq!(unchanged["cron"], "0 */4 * * *");
    assert_eq!(unchanged["retention"]["keep_daily"], 7);
}

/// Not found: unknown ids, malformed ids, runs of other schedules.
async fn unknown_schedules_and_runs_are_not_found(app: &TestApp, sid: &str) {
    for path in [
        format!("/v1/schedules/{UNKNOWN_ID}"),
        "/v1/schedules/nope".to_owned(),
        format!("/v1/schedules/{UNKNOWN_ID}/runs"),
        format!("/v1/schedules/{UNKNOWN_ID}/preview"),
    ] {
        let (status, problem) = app.get(&path).await;
        is_problem(
            status,
            &problem,
            StatusCode::NOT_FOUND,
            "schedule_not_found",
        );
    }
    let (status, problem) = app
        .get(&format!("/v1/schedules/{sid}/runs/{UNKNOWN_ID}"))
        .await;
    is_problem(status, &problem, StatusCode::NOT_FOUND, "run_not_found");
    let (status, problem) = app
        .post(&format!("/v1/schedules/{UNKNOWN_ID}/run"), json!({}))
        .await;
    is_problem(
        status,
        &problem,
        StatusCode::NOT_FOUND,
        "schedule_not_found",
    );
}

/// Manual runs page newest first, and the run is reachable by its Location; the
/// schedule is listed under its VM only.
async fn manual_runs_are_listed_newest_first(app: &TestApp, sid: &str, vm: Uuid) {
    let mut run_ids = Vec::new();
    for n in 1..=3 {
        let (status, run) = app
            .post(&format!("/v1/schedules/{sid}/run"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        run_ids.push(run["id"].as_str().unwrap().to_owned());
        wait_run(app, sid, n).await;
    }
    let (_, page1) = app.get(&format!("/v1/schedules/{sid}/runs?limit=2")).await;
    assert_eq!(page1["items"][0]["id"], run_ids[2].as_str());
    assert_eq!(page1["items"][1]["id"], run_ids[1].as_str());
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = app
        .get(&format!("/v1/schedules/{sid}/runs?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"][0]["id"], run_ids[0].as_str());
    assert!(page2["next_cursor"].is_null());
    let (status, run) = app
        .get(&format!("/v1/schedules/{sid}/runs/{}", run_ids[0]))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(run["status"], "succeeded");
    let (_, by_vm) = app.get(&format!("/v1/schedules?vm_id={vm}")).await;
    assert_eq!(by_vm["items"].as_array().unwrap().len(), 1);
    let (_, other) = app.get(&format!("/v1/schedules?vm_id={UNKNOWN_ID}")).await;
    assert!(other["items"].as_array().unwrap().is_empty());
}

/// Deleting the schedule keeps its (three) snapshots, now manual.
async fn deleting_a_schedule_keeps_its_snapshots_as_manual(app: &TestApp, sid: &str, vm: Uuid) {
    let taken = snapshots(app, &vm).await;
    assert_eq!(taken.len(), 3);
    assert!(taken.iter().all(|s| s["schedule_id"] == sid));
    let (status, _) = app.delete(&format!("/v1/schedules/{sid}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, problem) = app.get(&format!("/v1/schedules/{sid}")).await;
    is_problem(
        status,
        &problem,
        StatusCode::NOT_FOUND,
        "schedule_not_found",
    );
    let kept = snapshots(app, &vm).await;
    assert_eq!(kept.len(), 3);
    assert!(kept.iter().all(|s| s["schedule_id"].is_null()));
}

#[tokio::test]
async fn schedules_are_validated_listed_changed_and_deleted_and_their_snapshots_stay() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let app = spawn(&clock, &[]).await;
    let vm = app.create_vm("crud", &[("root", DISK)]).await.id;
    let base = json!({"name": "s", "vm_id": vm, "cron": "@daily"});
    bad_schedules_are_refused_and_none_is_stored(&app, &base).await;
    let sid = a_schedule_runs_next_at_midnight_in_its_time_zone(&app, &base).await;
    disabling_and_enabling_moves_the_next_run(&app, &clock, &sid, vm).await;
    unknown_schedules_and_runs_are_not_found(&app, &sid).await;
    manual_runs_are_listed_newest_first(&app, &sid, vm).await;
    deleting_a_schedule_keeps_its_snapshots_as_manual(&app, &sid, vm).await;
}

#[tokio::test]
async fn a_snapshot_a_linked_clone_reads_is_held_by_retention_with_the_reason() {
    let clock = Clock::at("2026-03-01T00:30:00Z");
    let app = spawn(&clock, &[]).await;
    let vm = app.create_vm("cloned", &[("root", DISK)]).await.id;
    let schedule = create_schedule(
        &app,
        json!({"name": "keep-one", "vm_id": vm, "cron": "0 0 1 1 *", "retention": {"keep_last": 1}}),
    )
    .await;
    let sid = schedule["id"].as_str().unwrap().to_owned();
    write(&app.active_path(&vm, "root").await, 0x61, 0, 1);
    clock.set(time("2026-03-01T01:00:00Z"));
    app.post(&format!("/v1/schedules/{sid}/run"), json!({}))
        .await;
    let first = wait_run(&app, &sid, 1).await;
    let older = first["targets"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let clone_job = app
        .expect_job(
            app.post(
                &format!("/v1/vms/{vm}/clone"),
                json!({"name": "reader", "mode": "linked", "snapshot_id": older}),
            )
            .await,
        )
        .await;
    let reader = clone_job.target.id.to_string();

    write(&app.active_path(&vm, "root").await, 0x62, 1, 1);
    clock.set(time("2026-03-01T02:00:00Z"));
    app.post(&format!("/v1/schedules/{sid}/run"), json!({}))
        .await;
    let second = wait_run(&app, &sid, 2).await;
    let newer = second["targets"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let held = &second["retention"]["held"];
    assert_eq!(held[0]["snapshot_id"], older.as_str(), "{second:#}");
    assert_eq!(held[0]["code"], "has_dependents");
    assert!(
        held[0]["reason"].as_str().unwrap().contains("reader"),
        "{held}"
    );
    let (_, preview) = app.get(&format!("/v1/schedules/{sid}/preview")).await;
    assert_eq!(preview["items"][0]["held"]["code"], "has_dependents");
    // Sweeps keep holding it while the clone reads it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(snapshots(&app, &vm).await.len(), 2);
    expect(&app.active_path(&reader, "root").await, 0x61, 0, 1);

    // The clone gone, the next sweep prunes it; the newer snapshot keeps its bytes.
    app.expect_job(app.delete(&format!("/v1/vms/{reader}")).await)
        .await;
    settle(&app, &sid).await;
    let left = snapshots(&app, &vm).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], newer.as_str());
    expect_all(
        &app.snapshot_path(&vm, &newer, "root").await,
        &[(0x61, 0, 1), (0x62, 1, 1)],
    );
}
