//! README.md's "Walk-through with curl", run as a newcomer runs it: its ```sh blocks are
//! read from README.md when the test runs (so the two cannot drift) and executed in order
//! in one `bash` (`set -euo pipefail`), in a scratch directory, against a spawned
//! service. Of the README's own lines only `API=` changes. Around them the test adds a
//! guest that writes before the first snapshot and where the README says the guest
//! writes (with the VM marked running, as the service requires), a check of those bytes
//! after the revert, a few probes, and JSON markers that label what the lines whose
//! comments promise an answer print. It then checks those answers, that every job
//! succeeded, the state the walk-through leaves, and the bytes of every copy it made.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::*;

const SECTION: &str = "## Walk-through with curl";
const README_API: &str = "API=http://127.0.0.1:8080";
/// What the guest writes before the first snapshot (kept) and after it (reverted away).
const BEFORE_S1: u8 = 0x5a;
const AFTER_S1: u8 = 0xa1;

/// Runs before the README's lines. `guest_write` writes a pattern into every disk of
/// `$VM` while it is marked running; `guest_expect` checks what every disk reads.
const PRELUDE: &str = r#"set -Eeuo pipefail
trap 'echo "walk-through: line $LINENO failed: $BASH_COMMAND" >&2' ERR
guest_paths() {
  local paths
  paths=$(curl -sf "$API/v1/vms/$VM" | jq -r '.disks[].active_path')
  [[ -n $paths ]] || { echo "no disks on $VM" >&2; return 1; }
  echo "$paths"
}
set_state() {
  curl -sf -o /dev/null -X PATCH -H 'Content-Type: application/json' \
    -d "{\"state\": \"$1\"}" "$API/v1/vms/$VM"
}
guest_qemu_io() {
  local path out paths
  paths=$(guest_paths)
  for path in $paths; do
    if ! out=$(qemu-io "$@" "$path" 2>&1) || [[ $out == *failed* ]]; then
      echo "qemu-io $* $path: $out" >&2; return 1
    fi
  done
}
guest_write() {
  set_state running
  guest_qemu_io -f qcow2 -c "write -P $1 $2 $3"
  set_state stopped
}
guest_expect() { guest_qemu_io -r -f qcow2 -c "read -P $1 $2 $3"; }
"#;

/// The walk-through's last job: deleting web-01 (and waiting for it).
const DELETE_VM: &str = r#"JOB=$(curl -s -X DELETE "$API/v1/vms/$VM")"#;

/// Lines whose output is labelled: (label, a text found on exactly one line of the
/// walk-through, how many lines after that one the labelled command goes on).
const LABELS: &[(&str, &str, usize)] = &[
    ("created", "# status: succeeded", 0),
    ("running", r#"-d '{"state": "running"}'"#, 0),
    ("stopped", r#""description": "web tier""#, 0),
    ("labels", "| jq .labels", 0),
    ("by_label", "?label=tier=web", 0),
    ("disks", "/disks?limit=10\"", 0),
    ("dropped", "# here: action \"drop\"", 0),
    ("held", r#"-d '{"hold": true}'"#, 0),
    ("released", r#""expires_at": null, "hold": false"#, 0),
    ("dependents", "# the clone reads $VM's files", 0),
    ("refused", "# 409 has_dependents", 0),
    ("flattened", "for DISK in", 2),
    ("standalone", "# []: web-02 is standalone", 0),
    ("deployed", "jq .detail.vm_ids", 0),
    ("linked", "{name, linked_vm_count}", 0),
    ("manifest", "/manifest\"", 0),
    ("imported", "# kind: template_import", 0),
    ("by_vm_id", "# by id only", 0),
    ("run", "# run now", 0),
    ("policy", "| jq .retention", 0),
    ("paused", "{enabled, next_run_at}", 0),
    ("unscheduled", "# 204", 0),
    ("newest_first", "# newest first", 0),
    ("filtered", "# filters", 0),
    ("long_poll", "?wait=60", 0),
    ("cancel", "# 202, or 409 job_not_cancellable", 0),
    ("vm_deleted", DELETE_VM, 1),
    ("healthz", "$API/healthz", 0),
    ("readyz", "$API/readyz", 0),
    ("version", "$API/v1/version", 0),
];

#[tokio::test]
async fn the_readme_walk_through_runs_as_written_and_answers_what_its_comments_say() {
    require_tools();
    let app = TestApp::spawn().await;
    let workdir = tempfile::tempdir().expect("temp dir");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let walk = Walk::run(&walkthrough_script(&readme, &app.base), workdir.path());
    let end = EndState::read(&app).await;

    check_vm_and_snapshot_answers(&walk);
    check_clone_and_template_answers(&walk, &end, workdir.path());
    check_schedule_and_job_answers(&walk);
    check_every_job_succeeded(&app, &walk).await;
    check_end_state(&app, &walk, &end).await;
    check_bytes(&end, workdir.path());
}

fn require_tools() {
    for tool in ["bash", "curl", "jq", "qemu-io"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the README walk-through needs {tool} (see Prerequisites in README.md)"
        );
    }
}

/// The lines of the ```sh blocks of the walk-through section, in order.
fn walkthrough_lines(readme: &str) -> Vec<String> {
    let (_, section) = readme
        .split_once(&format!("\n{SECTION}\n"))
        .unwrap_or_else(|| panic!("README.md has no {SECTION:?} section"));
    let section = section.split("\n## ").next().unwrap_or_default();
    let mut lines = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        match (in_block, line.trim_end()) {
            (false, "```sh") => in_block = true,
            (true, "```") => in_block = false,
            (true, _) => lines.push(line.to_owned()),
            _ => {}
        }
    }
    assert!(!in_block, "an unterminated ```sh block in {SECTION:?}");
    assert!(lines.len() > 50, "too few lines in {SECTION:?}: {lines:?}");
    lines
}

/// The script run: the prelude, then the README's lines with `API` pointed at `base`,
/// the guest's writes and checks, the probes and the labels.
fn walkthrough_script(readme: &str, base: &str) -> String {
    let mut script = Script {
        lines: walkthrough_lines(readme)
            .into_iter()
            .map(|line| (true, line))
            .collect(),
    };
    let api = script.find(README_API);
    assert_eq!(
        script.lines[api].1, README_API,
        "the README sets API elsewhere"
    );
    script.lines[api].1 = format!("API={base}");

    // The guest writes before the first snapshot, where the README says it writes, and
    // after the revert it must read what it wrote before the first snapshot only.
    let (before, after) = (format!("{BEFORE_S1:#04x}"), format!("{AFTER_S1:#04x}"));
    script.insert(
        r#""name": "before-upgrade""#,
        0,
        &format!("guest_write {before} 0 1M"),
    );
    script.insert(
        "# ... the guest writes to the disks ...",
        1,
        &format!("guest_write {after} 0 2M"),
    );
    script.insert(
        "# Delete one snapshot;",
        0,
        &format!("guest_expect {before} 0 1M"),
    );
    script.insert("# Delete one snapshot;", 0, "guest_expect 0 1M 1M");

    // Probes go in before the labels, so that a label closes right after its own line.
    let collapsed = r#"curl -s "$API/v1/vms/$VM" | jq '[.disks[].chain | length]'"#;
    script.insert("# Expiry and hold:", 0, &marked("collapsed", collapsed));
    let manual = r#"curl -s "$API/v1/vms/$VM/snapshots" | jq '[.items[] | {name, schedule_id}]'"#;
    script.insert("# 204", 1, &marked("manual", manual));
    let doomed = r#"curl -s "$API/v1/vms/$VM""#;
    script.insert(DELETE_VM, 0, &marked("doomed", doomed));
    for (label, anchor, more) in LABELS {
        script.label(label, anchor, *more);
    }
    let lines: Vec<&str> = script.lines.iter().map(|(_, l)| l.as_str()).collect();
    format!("{PRELUDE}{}\n", lines.join("\n"))
}

/// `command` between markers that label its output.
fn marked(label: &str, command: &str) -> String {
    format!("echo '{{\"@@\": \"{label}\"}}'\n{command}\necho '{{\"@@\": null}}'")
}

/// The script's lines; `true` marks the README's own.
struct Script {
    lines: Vec<(bool, String)>,
}

impl Script {
    /// The index of the one README line containing `anchor`.
    fn find(&self, anchor: &str) -> usize {
        let found: Vec<usize> = (0..self.lines.len())
            .filter(|&i| self.lines[i].0 && self.lines[i].1.contains(anchor))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one line of the walk-through with {anchor:?}, found {found:?}"
        );
        found[0]
    }

    /// Insert `text` `offset` lines after the start of the line with `anchor`.
    fn insert(&mut self, anchor: &str, offset: usize, text: &str) {
        let at = self.find(anchor) + offset;
        let new = text.lines().map(|l| (false, l.to_owned()));
        self.lines.splice(at..at, new);
    }

    /// Label the output of the command on the line with `anchor` and `more` lines after.
    fn label(&mut self, label: &str, anchor: &str, more: usize) {
        self.insert(anchor, more + 1, r#"echo '{"@@": null}'"#);
        self.insert(anchor, 0, &format!("echo '{{\"@@\": \"{label}\"}}'"));
    }
}

/// What the walk-through printed: every JSON value, and those of each label.
struct Walk {
    stderr: String,
    values: Vec<Value>,
    answers: BTreeMap<String, Vec<Value>>,
}

impl Walk {
    fn run(script: &str, dir: &Path) -> Self {
        let path = dir.join("walk-through.sh");
        std::fs::write(&path, script).expect("write script");
        let output = Command::new("bash")
            .arg(&path)
            .current_dir(dir)
            // A developer's proxy must not see the requests to the test server.
            .env("no_proxy", "127.0.0.1")
            .env("NO_PROXY", "127.0.0.1")
            .stdin(Stdio::null())
            .output()
            .expect("run bash");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "the walk-through failed ({}):\n--- stderr\n{stderr}\n--- stdout\n{stdout}",
            output.status
        );
        let (values, answers) = parse_output(&stdout);
        Self {
            stderr,
            values,
            answers,
        }
    }

    fn answers(&self, label: &str) -> &[Value] {
        self.answers
            .get(label)
            .unwrap_or_else(|| panic!("nothing labelled {label}"))
    }

    fn assert_answers(&self, label: &str, expected: Value) {
        let answers = Value::Array(self.answers(label).to_vec());
        assert_eq!(
            answers, expected,
            "what the walk-through's {label} line printed"
        );
    }

    /// The `wait_job` answers labelled `label`: `count` jobs of `kind`, each succeeded.
    fn assert_jobs(&self, label: &str, kind: &str, count: usize) -> &[Value] {
        let jobs = self.answers(label);
        assert_eq!(jobs.len(), count, "{label}: {jobs:?}");
        for job in jobs {
            assert!(is_wait_job_answer(job), "{label}: {job}");
            assert_eq!(
                (&job["kind"], &job["status"]),
                (&json!(kind), &json!("succeeded")),
                "{label}: {job}"
            );
        }
        jobs
    }
}

/// Split stdout, a stream of JSON values, at the markers.
fn parse_output(stdout: &str) -> (Vec<Value>, BTreeMap<String, Vec<Value>>) {
    let mut values = Vec::new();
    let mut answers: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut open: Option<String> = None;
    for value in serde_json::Deserializer::from_str(stdout).into_iter::<Value>() {
        let value = value.unwrap_or_else(|e| panic!("not JSON ({e}) in:\n{stdout}"));
        match value.get("@@") {
            Some(Value::String(label)) => {
                assert!(open.is_none() && !answers.contains_key(label), "{label}");
                answers.insert(label.clone(), Vec::new());
                open = Some(label.clone());
            }
            Some(_) => assert!(open.take().is_some(), "a marker closes nothing"),
            None => {
                if let Some(label) = &open {
                    answers
                        .get_mut(label)
                        .expect("open label")
                        .push(value.clone());
                }
                values.push(value);
            }
        }
    }
    assert!(open.is_none(), "label {open:?} never closed");
    (values, answers)
}

/// What the README's `wait_job` prints: `{kind, status, error, detail}`.
fn is_wait_job_answer(value: &Value) -> bool {
    value.as_object().is_some_and(|o| {
        o.len() == 4
            && ["kind", "status", "error", "detail"]
                .iter()
                .all(|k| o.contains_key(*k))
    })
}

/// Every VM and template the walk-through leaves, by name.
struct EndState {
    vms: BTreeMap<String, Value>,
    templates: BTreeMap<String, Value>,
}

impl EndState {
    async fn read(app: &TestApp) -> Self {
        let mut lists = Vec::new();
        for path in ["/v1/vms?limit=1000", "/v1/templates?limit=1000"] {
            let (status, list) = app.get(path).await;
            assert_eq!(status, StatusCode::OK, "{list}");
            assert!(list["next_cursor"].is_null(), "{list}");
            let by_name: BTreeMap<String, Value> = list["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
                .collect();
            lists.push(by_name);
        }
        let templates = lists.pop().unwrap();
        let vms = lists.pop().unwrap();
        Self { vms, templates }
    }

    fn vm(&self, name: &str) -> &Value {
        self.vms.get(name).unwrap_or_else(|| panic!("no VM {name}"))
    }

    fn template(&self, name: &str) -> &Value {
        self.templates
            .get(name)
            .unwrap_or_else(|| panic!("no template {name}"))
    }
}

/// The file of the disk named `disk` (`active_path` of a VM's, `path` of a template's).
fn disk_path(view: &Value, disk: &str) -> String {
    let disk_view = view["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == disk)
        .unwrap_or_else(|| panic!("no disk {disk} in {view}"));
    let path = disk_view.get("active_path").unwrap_or(&disk_view["path"]);
    path.as_str().unwrap().to_owned()
}

fn check_vm_and_snapshot_answers(walk: &Walk) {
    for header in ["HTTP/1.1 202 Accepted", "location: /v1/jobs/"] {
        assert!(
            walk.stderr.contains(header),
            "-D /dev/stderr: {}",
            walk.stderr
        );
    }
    walk.assert_jobs("created", "vm_create", 1);
    walk.assert_answers("running", json!([{"state": "running", "status": "ready"}]));
    let stopped = json!({"state": "stopped", "description": "web tier"});
    walk.assert_answers("stopped", json!([stopped]));
    walk.assert_answers(
        "labels",
        json!([{"tier": "web", "example.com/team": "blue"}]),
    );
    walk.assert_answers("by_label", json!(["web-01"]));
    walk.assert_answers("disks", json!(["root", "data", "scratch"]));
    let dropped = &walk.assert_jobs("dropped", "snapshot_delete", 1)[0];
    let merges = dropped["detail"]["merges"].as_array().unwrap();
    assert_eq!(merges.len(), 2, "one merge per disk: {dropped}");
    assert!(merges.iter().all(|m| m["action"] == "drop"), "{dropped}");
    // "Delete all snapshots: every disk collapses into one file"
    walk.assert_answers("collapsed", json!([[1, 1]]));
    let expiry = "2030-01-01T00:00:00Z";
    walk.assert_answers("held", json!([{"expires_at": expiry, "hold": true}]));
    walk.assert_answers("released", json!([{"expires_at": null, "hold": false}]));
}

fn check_clone_and_template_answers(walk: &Walk, end: &EndState, dir: &Path) {
    let clone = end.vm("web-02");
    let clone_id = id(clone);
    walk.assert_answers("dependents", json!([[clone_id]]));
    let refusal =
        json!({"code": "has_dependents", "dependent_vms": [{"id": clone_id, "name": "web-02"}]});
    walk.assert_answers("refused", json!([refusal]));
    let disks = clone["disks"].as_array().unwrap().len();
    walk.assert_jobs("flattened", "disk_flatten", disks);
    walk.assert_answers("standalone", json!([[]]));

    let deployed = walk.answers("deployed");
    assert_eq!(deployed.len(), 2, "{deployed:?}");
    assert_eq!(
        (&deployed[0]["kind"], &deployed[0]["status"]),
        (&json!("template_deploy"), &json!("succeeded"))
    );
    let web_n: Vec<String> = (1..=10).map(|n| id(end.vm(&format!("web-{n}")))).collect();
    assert_eq!(
        deployed[1],
        json!(web_n),
        "detail.vm_ids names web-1 .. web-10"
    );
    walk.assert_answers(
        "linked",
        json!([{"name": "web-golden", "linked_vm_count": 10}]),
    );

    let manifest = walk.answers("manifest");
    let names: Vec<&Value> = manifest.iter().map(|d| &d["name"]).collect();
    assert_eq!(names, [&json!("root"), &json!("data")], "{manifest:?}");
    let export = std::fs::read(dir.join("root.qcow2")).expect("the exported root.qcow2");
    assert_eq!(manifest[0]["export_bytes"], export.len(), "{manifest:?}");
    assert_eq!(
        manifest[0]["sha256"],
        format!("{:x}", Sha256::digest(&export))
    );
    walk.assert_jobs("imported", "template_import", 1);
}

fn check_schedule_and_job_answers(walk: &Walk) {
    for header in ["HTTP/1.1 201 Created", "location: /v1/schedules/"] {
        assert!(
            walk.stderr.contains(header),
            "-D /dev/stderr: {}",
            walk.stderr
        );
    }
    walk.assert_answers("by_vm_id", json!([]));
    let run = walk.answers("run");
    assert!(run.len() == 1 && run[0]["reason"].is_null(), "{run:?}");
    let scheduled_job = run[0]["job_ids"]
        .as_array()
        .filter(|j| j.len() == 1)
        .expect("one job")[0]
        .clone();
    let nulls = [
        "keep_hourly",
        "keep_daily",
        "keep_weekly",
        "keep_monthly",
        "keep_yearly",
        "max_age",
    ];
    let mut policy = json!({"keep_last": 3});
    nulls.iter().for_each(|k| policy[*k] = Value::Null);
    walk.assert_answers("policy", json!([policy]));
    walk.assert_answers("paused", json!([{"enabled": false, "next_run_at": null}]));
    walk.assert_answers("unscheduled", json!([204]));
    // "(its snapshots stay, as manual ones)"
    let snapshots = walk.answers("manual")[0].as_array().unwrap().clone();
    let scheduled: Vec<&Value> = snapshots
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("auto-"))
        .collect();
    assert!(
        scheduled.len() == 1 && scheduled[0]["schedule_id"].is_null(),
        "{snapshots:?}"
    );

    // Job ids are UUIDv7, so newest first means ids in decreasing order.
    let ids: Vec<&str> = walk
        .answers("newest_first")
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert!(ids.len() > 10 && ids.is_sorted_by(|a, b| a > b), "{ids:?}");
    let filtered = walk.answers("filtered");
    let items = filtered[0]["items"].as_array().unwrap();
    let expected = (&json!("snapshot_delete"), &json!("succeeded"));
    assert!(
        items.len() == 1 && items.iter().all(|j| (&j["kind"], &j["status"]) == expected),
        "{filtered:?}"
    );
    let polled = walk.answers("long_poll");
    assert!(
        polled[0]["id"] == scheduled_job && polled[0]["status"] == "succeeded",
        "{polled:?}"
    );
    let cancel = walk.answers("cancel");
    assert!(
        cancel[0]["status"] == 409 && cancel[0]["code"] == "job_not_cancellable",
        "{cancel:?}"
    );
    walk.assert_jobs("vm_deleted", "vm_delete", 1);
    walk.assert_answers("healthz", json!([{"status": "ok"}]));
    walk.assert_answers("readyz", json!([{"status": "ready"}]));
    let version = walk.answers("version");
    assert_eq!(version.len(), 1, "{version:?}");
    assert_eq!(version[0]["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        version[0]["qemu_img"]
            .as_str()
            .unwrap()
            .starts_with("qemu-img version")
    );
}

async fn check_every_job_succeeded(app: &TestApp, walk: &Walk) {
    let waited: Vec<&Value> = walk
        .values
        .iter()
        .filter(|v| is_wait_job_answer(v))
        .collect();
    assert!(
        waited.iter().all(|j| j["status"] == "succeeded"),
        "{waited:?}"
    );

    let (status, jobs) = app.get("/v1/jobs?limit=1000").await;
    assert_eq!(status, StatusCode::OK, "{jobs}");
    assert!(jobs["next_cursor"].is_null(), "{jobs}");
    let jobs = jobs["items"].as_array().unwrap();
    let unfinished: Vec<&Value> = jobs.iter().filter(|j| j["status"] != "succeeded").collect();
    assert!(
        unfinished.is_empty(),
        "jobs that did not succeed: {unfinished:?}"
    );
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for job in jobs {
        *kinds.entry(job["kind"].as_str().unwrap()).or_default() += 1;
    }
    let expected = BTreeMap::from([
        ("disk_create", 1),
        ("disk_delete", 1),
        ("disk_flatten", 2),
        ("disk_resize", 1),
        ("snapshot_create", 5), // 4 of the README's and the schedule's
        ("snapshot_delete", 1),
        ("snapshot_delete_all", 1),
        ("snapshot_revert", 1),
        ("template_create", 1),
        ("template_deploy", 1),
        ("template_import", 1),
        ("vm_clone", 2),
        ("vm_create", 1),
        ("vm_delete", 1),
    ]);
    assert_eq!(kinds, expected, "the jobs the walk-through ran");
    // Every job but the schedule's went through wait_job.
    assert_eq!(waited.len(), jobs.len() - 1, "{waited:?}");
}

async fn check_end_state(app: &TestApp, walk: &Walk, end: &EndState) {
    let mut names: Vec<String> = (1..=10).map(|n| format!("web-{n}")).collect();
    names.extend(["web-02".into(), "web-03".into()]);
    names.sort();
    assert_eq!(end.vms.keys().cloned().collect::<Vec<_>>(), names);
    for vm in end.vms.values() {
        assert_eq!(
            (&vm["status"], &vm["state"]),
            (&json!("ready"), &json!("stopped")),
            "{vm}"
        );
        let linked = vm["name"] != "web-02" && vm["name"] != "web-03";
        for disk in vm["disks"].as_array().unwrap() {
            assert_eq!(!disk["source_volume_id"].is_null(), linked, "{vm}");
        }
    }
    assert_eq!(
        end.templates.keys().collect::<Vec<_>>(),
        ["imported", "web-golden"]
    );
    assert!(
        end.templates.values().all(|t| t["status"] == "ready"),
        "{:?}",
        end.templates
    );
    let (_, schedules) = app.get("/v1/schedules").await;
    assert_eq!(schedules["items"], json!([]), "{schedules}");

    // "removes its disks, snapshots and files"
    let doomed = &walk.answers("doomed")[0];
    let (status, gone) = app.get(&format!("/v1/vms/{}", id(doomed))).await;
    assert_eq!(
        (status, &gone["code"]),
        (StatusCode::NOT_FOUND, &json!("vm_not_found"))
    );
    for disk in doomed["disks"].as_array().unwrap() {
        for layer in disk["chain"].as_array().unwrap() {
            let file = layer["path"].as_str().unwrap();
            assert!(!exists(file), "web-01's {file} is still there");
        }
    }
}

/// Every copy reads what web-01 held when it was copied: the guest's bytes from before
/// the first snapshot, and none of what it wrote after (the revert discarded that).
fn check_bytes(end: &EndState, dir: &Path) {
    let golden = end.template("web-golden");
    for disk in ["root", "data"] {
        let golden_path = disk_path(golden, disk);
        expect_all(&golden_path, &[(BEFORE_S1, 0, 1), (0, 1, 1)]);
        check_clean(&golden_path);
        for vm in ["web-02", "web-03"] {
            let path = disk_path(end.vm(vm), disk);
            assert_eq!(chain(&path).len(), 1, "{vm}'s {disk} has a backing file");
            compare(&path, &golden_path);
        }
        for n in 1..=10 {
            compare(disk_path(end.vm(&format!("web-{n}")), disk), &golden_path);
        }
    }
    let root = disk_path(golden, "root");
    compare(dir.join("root.qcow2"), &root);
    let imported = disk_path(end.template("imported"), "root");
    compare(&imported, &root);
    check_clean(&imported);
}
