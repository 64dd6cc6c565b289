//! Concurrency stress: several client tasks fire colliding requests at a handful of VMs
//! for a bounded time: the same snapshot deleted twice at once, snapshot deletes racing
//! linked and full clones of that snapshot, delete-all racing snapshot creates, the
//! power state flipped while jobs are asked for, cancels of just-accepted jobs after
//! random delays, schedule runs, VM deletes racing clones, and two clones claiming one
//! name. Every answer is checked against the documented contract as it arrives (no
//! 5xx; every 4xx a problem document whose code is in README's error table and among
//! the codes `/v1/openapi.json` documents for that endpoint and status). Once no job is
//! queued or running, the records, the files and the guest bytes are checked against
//! each other and against the outcome of every job.
//!
//! Knobs: `STRATA_STRESS_SEED` (decimal or 0x-hex) picks the random choices,
//! `STRATA_STRESS_SECS` the length of the storm (default 25) and
//! `STRATA_STRESS_TASKS` the number of client tasks (default 4);
//! `STRATA_STRESS_SERVICE_LOG` is passed to the service as its `STRATA_LOG` filter (e.g.
//! `warn,strata=debug` logs every qemu-img it runs to stderr). The interleaving still
//! depends on timing: a failing seed makes the same choices again, not necessarily
//! the same race, so every failure message carries the requests it is about.
//!
//! The module also holds what `cancel_timing` shares: the PRNG, the contract checker,
//! the recording client and the checks of records against files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

use crate::support::*;

// ---------------------------------------------------------------------------------
// A seeded PRNG (splitmix64): no dependency, reproducible choices.

pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in 0..n (0 when n is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }

    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// An integer environment knob (decimal or 0x-hex), or `default`.
pub(crate) fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number"))
        }
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------
// The documented contract: README's error table and the codes /v1/openapi.json lists
// per endpoint and status.

pub(crate) struct Contract {
    /// code -> HTTP status, from README's error table.
    codes: BTreeMap<String, u16>,
    endpoints: Vec<Endpoint>,
}

struct Endpoint {
    method: String,
    template: String,
    segments: Vec<String>,
    /// status -> the codes its description names.
    documented: BTreeMap<u16, BTreeSet<String>>,
}

/// The words between backticks.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, word)| word.to_owned())
        .collect()
}

fn readme_codes(readme: &str) -> BTreeMap<String, u16> {
    let mut codes = BTreeMap::new();
    let section = readme
        .split("\n## Errors")
        .nth(1)
        .expect("README has an Errors section");
    let section = section.split("\n## ").next().unwrap_or(section);
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let Ok(status) = cells[2].parse::<u16>() else {
            continue;
        };
        for code in backticked(cells[1]) {
            codes.insert(code, status);
        }
    }
    codes
}

impl Contract {
    pub(crate) async fn load(app: &TestApp) -> Self {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("read README.md");
        let codes = readme_codes(&readme);
        assert!(
            codes.len() >= 20 && codes.contains_key("job_not_cancellable"),
            "README's error table did not parse: {codes:?}"
        );
        let (status, doc) = app.get("/v1/openapi.json").await;
        assert_eq!(status, 200, "{doc}");
        let mut endpoints = Vec::new();
        for (template, item) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                let Some(responses) = operation["responses"].as_object() else {
                    continue;
                };
                let documented = responses
                    .iter()
                    .filter_map(|(status, response)| {
                        let status = status.parse::<u16>().ok()?;
                        let text = response["description"].as_str().unwrap_or_default();
                        let named = backticked(text)
                            .into_iter()
                            .filter(|word| codes.contains_key(word))
                            .collect();
                        Some((status, named))
                    })
                    .collect();
                endpoints.push(Endpoint {
                    method: method.to_uppercase(),
                    template: template.clone(),
                    segments: template.split('/').map(str::to_owned).collect(),
                    documented,
                });
            }
        }
        Self { codes, endpoints }
    }

    /// README's HTTP status for a code.
    pub(crate) fn status_of(&self, code: &str) -> Option<u16> {
        self.codes.get(code).copied()
    }

    fn endpoint(&self, method: &Method, path: &str) -> Option<&Endpoint> {
        let path = path.split('?').next().unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        self.endpoints
            .iter()
            .filter(|e| e.method == method.as_str() && e.segments.len() == segments.len())
            .filter_map(|e| {
                let mut literal = 0;
                for (want, got) in e.segments.iter().zip(&segments) {
                    if want.starts_with('{') {
                        continue;
                    }
                    if want != got {
                        return None;
                    }
                    literal += 1;
                }
                Some((literal, e))
            })
            .max_by_key(|(literal, _)| *literal)
            .map(|(_, e)| e)
    }

    /// Everything wrong with one answer, as sentences.
    pub(crate) fn violations(
        &self,
        method: &Method,
        path: &str,
        status: u16,
        content_type: &str,
        body: &Value,
    ) -> Vec<String> {
        let mut out = Vec::new();
        if status >= 500 {
            out.push(format!("a {status} answer (no 5xx is acceptable)"));
        }
        if status < 400 {
            return out;
        }
        if !content_type.starts_with("application/problem+json") {
            out.push(format!(
                "error answer with Content-Type {content_type:?}, not application/problem+json"
            ));
        }
        let Some(code) = body["code"].as_str() else {
            out.push("error answer without a `code`".into());
            return out;
        };
        if body["status"] != status {
            out.push(format!(
                "problem `status` {} != HTTP {status}",
                body["status"]
            ));
        }
        if body["type"] != format!("urn:strata:problem:{code}") {
            out.push(format!(
                "problem `type` {} does not match `{code}`",
                body["type"]
            ));
        }
        match self.codes.get(code) {
            None => out.push(format!("code `{code}` is not in README's error table")),
            Some(listed) if *listed != status => out.push(format!(
                "code `{code}` is listed with {listed} in README but was answered with {status}"
            )),
            Some(_) => {}
        }
        match self.endpoint(method, path) {
            None => out.push("no endpoint of /v1/openapi.json matches the request".into()),
            Some(endpoint) => match endpoint.documented.get(&status) {
                None => out.push(format!(
                    "{status} is not a documented answer of {} {} (documented: {:?})",
                    endpoint.method,
                    endpoint.template,
                    endpoint.documented.keys().collect::<Vec<_>>()
                )),
                Some(codes) if !codes.is_empty() && !codes.contains(code) => out.push(format!(
                    "`{code}` is not among the codes {codes:?} documented for {status} of {} {}",
                    endpoint.method, endpoint.template
                )),
                Some(_) => {}
            },
        }
        out
    }
}

// ---------------------------------------------------------------------------------
// A client that records every exchange and checks each answer against the contract.

pub(crate) struct Journal {
    start: Instant,
    exchanges: Mutex<Vec<Exchange>>,
    violations: Mutex<Vec<String>>,
}

#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    pub(crate) seq: usize,
    pub(crate) task: usize,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) body: Option<Value>,
    /// 0 when no answer came.
    pub(crate) status: u16,
    pub(crate) reply: Value,
    pub(crate) sent_ms: u128,
    pub(crate) took_ms: u128,
}

/// At most `max` characters of a text.
pub(crate) fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{cut}...")
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = self
            .body
            .as_ref()
            .map(|b| format!(" {b}"))
            .unwrap_or_default();
        write!(
            f,
            "[#{} task {} at +{}ms] {} {}{} -> {} after {}ms: {}",
            self.seq,
            self.task,
            self.sent_ms,
            self.method.as_str(),
            self.path,
            body,
            self.status,
            self.took_ms,
            clip(&self.reply.to_string(), 700)
        )
    }
}

impl Journal {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            exchanges: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn violation(&self, text: String) {
        self.violations.lock().unwrap().push(text);
    }

    pub(crate) fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    pub(crate) fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap().clone()
    }

    /// The exchanges whose path, body or reply mention `id` (the latest `max`).
    pub(crate) fn mentioning(&self, id: &str, max: usize) -> Vec<String> {
        let exchanges = self.exchanges.lock().unwrap();
        let hits: Vec<String> = exchanges
            .iter()
            .filter(|e| {
                e.path.contains(id)
                    || e.body.as_ref().is_some_and(|b| b.to_string().contains(id))
                    || (e.method != Method::GET && e.reply.to_string().contains(id))
            })
            .map(|e| format!("    {e}"))
            .collect();
        hits[hits.len().saturating_sub(max)..].to_vec()
    }

    /// Write every exchange, in full, to a file under the target directory; its path.
    pub(crate) fn dump(&self, name: &str) -> String {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"));
        let exchanges = self.exchanges.lock().unwrap();
        let mut out = String::new();
        for e in exchanges.iter() {
            let body = e.body.as_ref().map(|b| format!(" {b}")).unwrap_or_default();
            out.push_str(&format!(
                "[#{} task {} at +{}ms] {} {}{} -> {} after {}ms: {}\n",
                e.seq,
                e.task,
                e.sent_ms,
                e.method.as_str(),
                e.path,
                body,
                e.status,
                e.took_ms,
                e.reply
            ));
        }
        match std::fs::write(&path, out) {
            Ok(()) => path.display().to_string(),
            Err(e) => format!("(journal not written to {}: {e})", path.display()),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Reply {
    pub(crate) seq: usize,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl Reply {
    pub(crate) fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or_default()
    }

    /// The job of a 202 that answers with one.
    pub(crate) fn job_id(&self) -> Option<String> {
        (self.status == 202 && self.body.get("kind").is_some())
            .then(|| self.body["id"].as_str().map(str::to_owned))
            .flatten()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[#{}] {} {} -> {} {}",
            self.seq,
            self.method.as_str(),
            self.path,
            self.status,
            clip(&self.body.to_string(), 500)
        )
    }
}

#[derive(Clone)]
pub(crate) struct Api {
    base: String,
    client: reqwest::Client,
    contract: Arc<Contract>,
    pub(crate) journal: Arc<Journal>,
    task: usize,
}

impl Api {
    pub(crate) fn new(app: &TestApp, contract: Arc<Contract>, journal: Arc<Journal>) -> Self {
        Self::with_client(app.base.clone(), contract, journal, 0)
    }

    fn with_client(
        base: String,
        contract: Arc<Contract>,
        journal: Arc<Journal>,
        task: usize,
    ) -> Self {
        Self {
            base,
            // Each task has its own client; no pooled connections (see TestApp).
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client"),
            contract,
            journal,
            task,
        }
    }

    /// The same service and journal, with a client of its own.
    pub(crate) fn for_task(&self, task: usize) -> Self {
        Self::with_client(
            self.base.clone(),
            Arc::clone(&self.contract),
            Arc::clone(&self.journal),
            task,
        )
    }

    pub(crate) fn contract(&self) -> &Contract {
        &self.contract
    }

    pub(crate) async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let sent = self.journal.start.elapsed();
        let mut request = self
            .client
            .request(method.clone(), format!("{}{}", self.base, path));
        if let Some(body) = &body {
            request = request.json(body);
        }
        let (status, content_type, reply) = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                match response.text().await {
                    Ok(text) if text.is_empty() => (status, content_type, Value::Null),
                    Ok(text) => {
                        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                        (status, content_type, value)
                    }
                    Err(e) => (
                        0,
                        content_type,
                        Value::String(format!("body not read: {e}")),
                    ),
                }
            }
            Err(e) => (0, String::new(), Value::String(format!("no answer: {e}"))),
        };
        let took = self.journal.start.elapsed().saturating_sub(sent);
        let exchange = {
            let mut exchanges = self.journal.exchanges.lock().unwrap();
            let exchange = Exchange {
                seq: exchanges.len(),
                task: self.task,
                method: method.clone(),
                path: path.to_owned(),
                body,
                status,
                reply: reply.clone(),
                sent_ms: sent.as_millis(),
                took_ms: took.as_millis(),
            };
            exchanges.push(exchange.clone());
            exchange
        };
        let problems = if status == 0 {
            vec!["the request got no answer".to_owned()]
        } else {
            self.contract
                .violations(&method, path, status, &content_type, &reply)
        };
        for problem in problems {
            self.journal
                .violation(format!("contract: {problem}\n    {exchange}"));
        }
        Reply {
            seq: exchange.seq,
            method,
            path: path.to_owned(),
            status,
            body: reply,
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(body)).await
    }

    /// A POST without a body (cancel, revert, run, flatten, conversions).
    pub(crate) async fn post_empty(&self, path: &str) -> Reply {
        self.call(Method::POST, path, None).await
    }

    pub(crate) async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, Some(body)).await
    }

    /// A GET that must answer 200.
    pub(crate) async fn ok(&self, path: &str) -> Result<Value, String> {
        let reply = self.get(path).await;
        if reply.status == 200 {
            Ok(reply.body)
        } else {
            Err(format!("GET {path} answered {reply}"))
        }
    }

    /// Every item of a paginated list (`path` carries `limit`).
    pub(crate) async fn list_all(&self, path: &str) -> Result<Vec<Value>, String> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_path = match &cursor {
                Some(c) => format!("{path}&cursor={c}"),
                None => path.to_owned(),
            };
            let page = self.ok(&page_path).await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return Ok(items),
            }
        }
    }

    /// Long-poll a job until it ends (at most two minutes).
    pub(crate) async fn wait_job(&self, id: &str) -> Result<Value, String> {
        for _ in 0..4 {
            let job = self.ok(&format!("/v1/jobs/{id}?wait=30")).await?;
            if is_terminal(&job) {
                return Ok(job);
            }
        }
        let job = self.ok(&format!("/v1/jobs/{id}")).await?;
        Err(format!("job {id} has not ended after 120 s: {job}"))
    }

    /// Wait until no job is queued or running (three quiet polls in a row, since a
    /// finished job may make the scheduler queue a prune).
    pub(crate) async fn wait_quiet(&self, limit: Duration) -> Result<(), String> {
        let until = Instant::now() + limit;
        let mut quiet = 0;
        loop {
            let mut pending = self.list_all("/v1/jobs?status=queued&limit=1000").await?;
            pending.extend(self.list_all("/v1/jobs?status=running&limit=1000").await?);
            if pending.is_empty() {
                quiet += 1;
                if quiet >= 3 {
                    return Ok(());
                }
            } else {
                quiet = 0;
            }
            if Instant::now() > until {
                let shown: Vec<String> = pending
                    .iter()
                    .map(|j| format!("    {}", clip(&j.to_string(), 600)))
                    .collect();
                return Err(format!(
                    "{} job(s) still queued or running after {limit:?}:\n{}",
                    pending.len(),
                    shown.join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub(crate) fn is_terminal(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

pub(crate) fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

pub(crate) type Time = chrono::DateTime<chrono::FixedOffset>;

pub(crate) fn time(value: &Value) -> Option<Time> {
    chrono::DateTime::parse_from_rfc3339(value.as_str()?).ok()
}

// ---------------------------------------------------------------------------------
// qemu tools, without panics (the callers collect what is wrong).

fn run_tool(program: &str, args: &[&str]) -> Result<std::process::Output, String> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))
}

fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

pub(crate) fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_owned())
}

/// The file names of the backing chain of `path`, top first.
pub(crate) fn file_chain(path: &str) -> Result<Vec<String>, String> {
    let output = run_tool(
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
    if !output.status.success() {
        return Err(format!(
            "qemu-img info --backing-chain {}: {}",
            file_name(path),
            output_text(&output)
        ));
    }
    let infos: Vec<Value> =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("qemu-img info JSON: {e}"))?;
    Ok(infos
        .iter()
        .map(|i| file_name(&text(&i["filename"])))
        .collect())
}

/// `qemu-img check` finds the file clean (no corruption, no leak).
pub(crate) fn image_check(path: &str) -> Result<(), String> {
    let output = run_tool("qemu-img", &["check", "-f", "qcow2", path])?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check {} exit {:?}: {}",
            file_name(path),
            output.status.code(),
            clip(&output_text(&output), 600)
        ))
    }
}

/// Whether two images show the same guest bytes (a larger one may only add zeros).
pub(crate) fn same_content(a: &str, b: &str) -> Result<bool, String> {
    let output = run_tool("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", a, b])?;
    match output.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(format!(
            "qemu-img compare {} {}: {}",
            file_name(a),
            file_name(b),
            output_text(&output)
        )),
    }
}

/// A standalone copy of what an image shows, outside the data directory.
pub(crate) fn copy_image(source: &str, dest: &Path) -> Result<(), String> {
    let dest = dest.display().to_string();
    let output = run_tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "qcow2", source, &dest],
    )?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img convert {source}: {}",
            output_text(&output)
        ))
    }
}

/// Where two images first differ, for a failure message.
pub(crate) fn difference(a: &str, b: &str) -> String {
    match run_tool("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", a, b]) {
        Ok(output) => clip(&output_text(&output), 300),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------
// Records against files.

/// The names of the files in the volume directory.
pub(crate) fn volume_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What `World::file_report` found.
#[derive(Default)]
pub(crate) struct FileReport {
    pub(crate) problems: Vec<String>,
    pub(crate) notes: Vec<String>,
}

/// One row of the service's `volumes` table: what the database says a file is.
pub(crate) struct VolumeRow {
    pub(crate) vm: String,
    pub(crate) disk: String,
    pub(crate) parent: Option<String>,
    /// `active`, `snapshot <id>` or `shared` (a frozen layer no snapshot owns: the
    /// present a linked clone froze, or a deleted snapshot's layer something still reads).
    pub(crate) role: String,
}

/// Every volume row, by file name, read straight from `strata.db`. The views show a
/// disk's present chain and each snapshot's own layer, not the shared layers below a
/// snapshot that left the present chain; only the table says whether such a file is
/// still recorded (and so safe from the orphan sweep) or forgotten.
pub(crate) async fn volume_rows(data_dir: &Path) -> Result<BTreeMap<String, VolumeRow>, String> {
    use sqlx::{Connection, Row};
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data_dir.join("strata.db"))
        .read_only(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| format!("open strata.db: {e}"))?;
    let rows = sqlx::query(
        "SELECT v.id, v.parent_id, d.id AS disk_id, d.vm_id, sv.snapshot_id,
                d.active_volume_id = v.id AS active
         FROM volumes v JOIN disks d ON d.id = v.disk_id
         LEFT JOIN snapshot_volumes sv ON sv.volume_id = v.id",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| format!("read the volumes table: {e}"))?;
    let _ = conn.close().await;
    let get = |row: &sqlx::sqlite::SqliteRow, column: &str| -> Result<Option<String>, String> {
        row.try_get(column)
            .map_err(|e| format!("volumes table, column {column}: {e}"))
    };
    let mut out = BTreeMap::new();
    for row in &rows {
        let id = get(row, "id")?.unwrap_or_default();
        let active: Option<bool> = row.try_get("active").map_err(|e| e.to_string())?;
        let role = match get(row, "snapshot_id")? {
            Some(snapshot) => format!("snapshot {snapshot}"),
            None if active == Some(true) => "active".to_owned(),
            None => "shared".to_owned(),
        };
        out.insert(
            format!("{id}.qcow2"),
            VolumeRow {
                vm: get(row, "vm_id")?.unwrap_or_default(),
                disk: get(row, "disk_id")?.unwrap_or_default(),
                parent: get(row, "parent_id")?.map(|p| format!("{p}.qcow2")),
                role,
            },
        );
    }
    Ok(out)
}

/// The file name of the backing file `path`'s header names, if any.
fn file_backing(path: &str) -> Result<Option<String>, String> {
    let output = run_tool("qemu-img", &["info", "--output=json", "-f", "qcow2", path])?;
    if !output.status.success() {
        return Err(format!(
            "qemu-img info {}: {}",
            file_name(path),
            output_text(&output)
        ));
    }
    let info: Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("qemu-img info JSON: {e}"))?;
    Ok(info["backing-filename"].as_str().map(file_name))
}

/// Everything the API shows, loaded while no job runs.
pub(crate) struct World {
    pub(crate) vms: Vec<Value>,
    pub(crate) templates: Vec<Value>,
    /// VM id -> its snapshots.
    pub(crate) snapshots: BTreeMap<String, Vec<Value>>,
    pub(crate) volumes_dir: PathBuf,
    /// The database's volume rows by file name; loaded only for the whole world
    /// (without `only`), where the directory is checked.
    pub(crate) rows: Option<BTreeMap<String, VolumeRow>>,
}

impl World {
    pub(crate) async fn load(api: &Api, data_dir: &Path) -> Result<Self, String> {
        Self::load_for(api, data_dir, None).await
    }

    /// Every VM and template, and the snapshots of the VMs in `only` (of all VMs
    /// without it).
    pub(crate) async fn load_for(
        api: &Api,
        data_dir: &Path,
        only: Option<&BTreeSet<String>>,
    ) -> Result<Self, String> {
        let vms = api.list_all("/v1/vms?limit=1000").await?;
        let templates = api.list_all("/v1/templates?limit=1000").await?;
        let mut snapshots = BTreeMap::new();
        for vm in &vms {
            let id = text(&vm["id"]);
            if only.is_some_and(|set| !set.contains(&id)) {
                continue;
            }
            let list = api
                .list_all(&format!("/v1/vms/{id}/snapshots?limit=1000"))
                .await?;
            snapshots.insert(id, list);
        }
        let rows = match only {
            None => Some(volume_rows(data_dir).await?),
            Some(_) => None,
        };
        Ok(Self {
            vms,
            templates,
            snapshots,
            volumes_dir: data_dir.join("volumes"),
            rows,
        })
    }

    pub(crate) fn vm(&self, id: &str) -> Option<&Value> {
        self.vms.iter().find(|vm| vm["id"] == id)
    }

    pub(crate) fn template(&self, id: &str) -> Option<&Value> {
        self.templates.iter().find(|t| t["id"] == id)
    }

    pub(crate) fn snapshots_of(&self, vm: &str) -> &[Value] {
        self.snapshots
            .get(vm)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub(crate) fn snapshot(&self, id: &str) -> Option<&Value> {
        self.snapshots.values().flatten().find(|s| s["id"] == id)
    }

    pub(crate) fn snapshot_ids(&self) -> BTreeSet<String> {
        self.snapshots
            .values()
            .flatten()
            .map(|s| text(&s["id"]))
            .collect()
    }

    /// Records left in a transient or failed state.
    pub(crate) fn status_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for vm in &self.vms {
            let name = format!("VM {} ({})", text(&vm["name"]), text(&vm["id"]));
            if vm["status"] != "ready" {
                out.push(format!("{name} is left {}", vm["status"]));
            }
            for disk in vm["disks"].as_array().into_iter().flatten() {
                if disk["status"] != "ready" {
                    out.push(format!(
                        "{name} disk {} is left {}",
                        text(&disk["name"]),
                        disk["status"]
                    ));
                }
                for entry in disk["chain"].as_array().into_iter().flatten() {
                    if entry["status"] != "ready" {
                        out.push(format!(
                            "{name} disk {} layer {} is left {}",
                            text(&disk["name"]),
                            text(&entry["volume_id"]),
                            entry["status"]
                        ));
                    }
                }
            }
            for snapshot in self.snapshots_of(&text(&vm["id"])) {
                if snapshot["status"] != "ready" {
                    out.push(format!(
                        "{name} snapshot {} ({}) is left {}",
                        text(&snapshot["name"]),
                        text(&snapshot["id"]),
                        snapshot["status"]
                    ));
                }
            }
        }
        for template in &self.templates {
            if template["status"] != "ready" {
                out.push(format!(
                    "template {} ({}) is left {}",
                    text(&template["name"]),
                    text(&template["id"]),
                    template["status"]
                ));
            }
        }
        out
    }

    fn path_of(&self, volume: &str) -> String {
        self.volumes_dir
            .join(format!("{volume}.qcow2"))
            .display()
            .to_string()
    }

    /// File name -> who references it.
    pub(crate) fn referenced(&self) -> BTreeMap<String, String> {
        let mut refs = BTreeMap::new();
        for vm in &self.vms {
            let vm_id = text(&vm["id"]);
            for disk in vm["disks"].as_array().into_iter().flatten() {
                for entry in disk["chain"].as_array().into_iter().flatten() {
                    refs.entry(file_name(&text(&entry["path"])))
                        .or_insert_with(|| format!("VM {vm_id} disk {}", text(&disk["name"])));
                }
                if let Some(source) = disk["source_volume_id"].as_str() {
                    refs.entry(format!("{source}.qcow2")).or_insert_with(|| {
                        format!("source of VM {vm_id} disk {}", text(&disk["name"]))
                    });
                }
            }
        }
        for (vm, snapshots) in &self.snapshots {
            for snapshot in snapshots {
                for volume in snapshot["volumes"].as_array().into_iter().flatten() {
                    refs.entry(file_name(&text(&volume["path"])))
                        .or_insert_with(|| format!("VM {vm} snapshot {}", text(&snapshot["name"])));
                }
            }
        }
        for template in &self.templates {
            for disk in template["disks"].as_array().into_iter().flatten() {
                if let Some(path) = disk["path"].as_str() {
                    refs.entry(file_name(path))
                        .or_insert_with(|| format!("template {}", text(&template["id"])));
                }
            }
        }
        refs
    }

    /// The chain a volume's file must have, when every layer under it is a layer of
    /// some VM's present chain (or a template's file); None when it goes through a
    /// layer the API shows only as a snapshot's.
    fn expected_chain(&self, volume: &str, depth: usize) -> Option<Vec<String>> {
        if depth > 64 {
            return None;
        }
        let wanted = format!("{volume}.qcow2");
        for vm in &self.vms {
            for disk in vm["disks"].as_array().into_iter().flatten() {
                let names: Vec<String> = disk["chain"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| file_name(&text(&e["path"])))
                    .collect();
                if let Some(at) = names.iter().position(|n| *n == wanted) {
                    let mut chain = names[at..].to_vec();
                    if let Some(source) = disk["source_volume_id"].as_str() {
                        chain.extend(self.expected_chain(source, depth + 1)?);
                    }
                    return Some(chain);
                }
            }
        }
        for template in &self.templates {
            for disk in template["disks"].as_array().into_iter().flatten() {
                if disk["path"].as_str().map(file_name) == Some(wanted.clone()) {
                    return Some(vec![wanted]);
                }
            }
        }
        None
    }

    /// The directory holds exactly the referenced files and the layers they read.
    fn directory_report(
        &self,
        refs: &BTreeMap<String, String>,
        present: &BTreeSet<String>,
        report: &mut FileReport,
    ) {
        for name in present {
            if !name.ends_with(".qcow2") {
                report
                    .problems
                    .push(format!("stray non-qcow2 file in volumes/: {name}"));
            }
        }
        for (name, who) in refs {
            if !present.contains(name) {
                report
                    .problems
                    .push(format!("missing file volumes/{name}, referenced by {who}"));
            }
        }
        let unreferenced: Vec<&String> = present
            .iter()
            .filter(|n| n.ends_with(".qcow2") && !refs.contains_key(*n))
            .collect();
        if !unreferenced.is_empty() {
            // Which referenced files read them, and what they read themselves.
            let mut readers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for name in refs.keys().filter(|n| present.contains(*n)) {
                let path = self.volumes_dir.join(name).display().to_string();
                if let Ok(files) = file_chain(&path) {
                    for file in files.into_iter().skip(1) {
                        readers.entry(file).or_default().push(name.clone());
                    }
                }
            }
            for name in unreferenced {
                let path = self.volumes_dir.join(name).display().to_string();
                let backing = file_chain(&path)
                    .map(|c| format!("its chain {c:?}"))
                    .unwrap_or_else(|e| e);
                let row = self.rows.as_ref().map(|rows| rows.get(name));
                match (readers.get(name), row) {
                    // Recorded, read, and only not shown: a shared layer under the
                    // layer of a snapshot off the present chain.
                    (Some(by), Some(Some(row))) => report.notes.push(format!(
                        "volumes/{name} is in no view, but its row says it is a {} layer of VM {} disk {}, and the chains of {by:?} read it ({backing})",
                        row.role, row.vm, row.disk
                    )),
                    // `rows_report` names the missing row.
                    (Some(_), Some(None)) => {}
                    (Some(by), None) => report.notes.push(format!(
                        "volumes/{name} is in no view but read by the chains of {by:?} ({backing})"
                    )),
                    (None, _) => report.problems.push(format!(
                        "orphan file volumes/{name}: no record references it and no referenced file's chain reads it ({backing})"
                    )),
                }
            }
        }
        if let Some(rows) = &self.rows {
            self.rows_report(rows, refs, present, report);
        }
    }

    /// The volume table against the directory: every file has its row (a file without
    /// one is what the orphan sweep at start removes, so one a chain still reads would
    /// be data lost at the next restart), every row its file, and each file's backing
    /// is the parent its row names.
    fn rows_report(
        &self,
        rows: &BTreeMap<String, VolumeRow>,
        refs: &BTreeMap<String, String>,
        present: &BTreeSet<String>,
        report: &mut FileReport,
    ) {
        let unrecorded: Vec<&String> = present
            .iter()
            .filter(|n| n.ends_with(".qcow2") && !rows.contains_key(*n))
            .collect();
        if !unrecorded.is_empty() {
            let mut readers: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
            for name in present.iter().filter(|n| n.ends_with(".qcow2")) {
                let path = self.volumes_dir.join(name).display().to_string();
                for file in file_chain(&path).unwrap_or_default().iter().skip(1) {
                    if let Some(&missing) = unrecorded.iter().find(|n| **n == file) {
                        readers.entry(missing).or_default().push(name);
                    }
                }
            }
            for name in unrecorded {
                let shown = refs
                    .get(name)
                    .map(|who| format!(", yet {who} shows it"))
                    .unwrap_or_default();
                report.problems.push(format!(
                    "volumes/{name} has no row in the volumes table{shown}; the chains of {:?} read it",
                    readers.get(name).cloned().unwrap_or_default()
                ));
            }
        }
        for (name, row) in rows {
            let label = format!(
                "the {} volume {name} of VM {} disk {}",
                row.role, row.vm, row.disk
            );
            if !present.contains(name) {
                report
                    .problems
                    .push(format!("{label} has a row but no file"));
                continue;
            }
            let path = self.volumes_dir.join(name).display().to_string();
            match file_backing(&path) {
                Ok(backing) if backing == row.parent => {}
                Ok(backing) => report.problems.push(format!(
                    "{label}: its file reads {backing:?}, its row names the parent {:?}",
                    row.parent
                )),
                Err(e) => report.problems.push(format!("{label}: {e}")),
            }
        }
    }

    /// Files against records: the volume directory holds exactly the files the
    /// views reference (VM disk chains, linked disks' sources, snapshot layers,
    /// template files) plus the layers those files' chains read (a shared layer under
    /// a snapshot that left every present chain is needed although no view shows it:
    /// a note, not a problem, as long as the volumes table records it); the volumes
    /// table and the directory match file for file, each row's parent being its
    /// file's backing; each VM disk's file chain is the chain the API shows
    /// (then its source's); every referenced file opens with its whole chain and is
    /// clean by `qemu-img check`. With `only`, the chain and check part covers only
    /// those VMs and templates, and the directory is not checked (its other records
    /// may not be loaded).
    pub(crate) fn file_report(&self, only: Option<&BTreeSet<String>>) -> FileReport {
        let mut report = FileReport::default();
        let refs = self.referenced();
        let present = volume_files(&self.volumes_dir);
        if only.is_none() {
            self.directory_report(&refs, &present, &mut report);
        }

        let wanted = |id: &str| only.is_none_or(|set| set.contains(id));
        let mut to_check = BTreeSet::new();
        let problems = &mut report.problems;
        for vm in &self.vms {
            let vm_id = text(&vm["id"]);
            if !wanted(&vm_id) {
                continue;
            }
            for disk in vm["disks"].as_array().into_iter().flatten() {
                let label = format!(
                    "VM {} ({vm_id}) disk {}",
                    text(&vm["name"]),
                    text(&disk["name"])
                );
                let names: Vec<String> = disk["chain"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| file_name(&text(&e["path"])))
                    .collect();
                let Some(active) = disk["active_path"].as_str() else {
                    problems.push(format!("{label} has no active_path"));
                    continue;
                };
                if names.first() != Some(&file_name(active)) {
                    problems.push(format!(
                        "{label}: active_path {active} is not the top of its chain {names:?}"
                    ));
                }
                let files = match file_chain(active) {
                    Ok(files) => files,
                    Err(e) => {
                        problems.push(format!("{label}: {e}"));
                        continue;
                    }
                };
                let source = disk["source_volume_id"].as_str();
                let expected = match source {
                    None => Some(names.clone()),
                    Some(source) => self
                        .expected_chain(source, 0)
                        .map(|below| names.iter().cloned().chain(below).collect()),
                };
                match expected {
                    Some(expected) if expected != files => problems.push(format!(
                        "{label}: the file chain ({} files) is not the chain the API shows ({} files{}):\n      files {files:?}\n      API   {expected:?}",
                        files.len(),
                        names.len(),
                        if source.is_some() { ", then its source's" } else { "" }
                    )),
                    Some(_) => {}
                    None => {
                        let mut start = names.clone();
                        start.extend(source.map(|s| format!("{s}.qcow2")));
                        if !files.starts_with(&start) {
                            problems.push(format!("{label}: the file chain {files:?} does not start with the API's chain and source {start:?}"));
                        }
                    }
                }
                to_check.extend(files);
            }
            for snapshot in self.snapshots_of(&vm_id) {
                for volume in snapshot["volumes"].as_array().into_iter().flatten() {
                    let path = text(&volume["path"]);
                    match file_chain(&path) {
                        Ok(files) => to_check.extend(files),
                        Err(e) => problems.push(format!(
                            "snapshot {} ({}) of VM {vm_id}: {e}",
                            text(&snapshot["name"]),
                            text(&snapshot["id"])
                        )),
                    }
                }
            }
        }
        for template in &self.templates {
            let id = text(&template["id"]);
            if !wanted(&id) {
                continue;
            }
            for disk in template["disks"].as_array().into_iter().flatten() {
                match disk["path"].as_str() {
                    None => problems.push(format!(
                        "template {id} disk {} has no path",
                        text(&disk["name"])
                    )),
                    Some(path) => match file_chain(path) {
                        Ok(files) => to_check.extend(files),
                        Err(e) => problems.push(format!("template {id}: {e}")),
                    },
                }
            }
        }
        if only.is_none() {
            to_check.extend(present.iter().filter(|n| n.ends_with(".qcow2")).cloned());
        }
        for file in &to_check {
            let path = self.volumes_dir.join(file);
            if path.exists()
                && let Err(e) = image_check(&path.display().to_string())
            {
                problems.push(e);
            }
        }
        report
    }

    /// The path of a VM's disk by name.
    pub(crate) fn active_path(&self, vm: &str, disk: &str) -> Option<String> {
        self.vm(vm)?["disks"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == disk)?["active_path"]
            .as_str()
            .map(str::to_owned)
    }

    /// A snapshot's frozen layers: (disk name, path), by the VM's disk names.
    pub(crate) fn snapshot_images(&self, snapshot: &Value) -> Vec<(String, String)> {
        let vm = self.vm(&text(&snapshot["vm_id"]));
        snapshot["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|volume| {
                let disk = vm
                    .and_then(|vm| {
                        vm["disks"]
                            .as_array()?
                            .iter()
                            .find(|d| d["id"] == volume["disk_id"])
                    })
                    .map(|d| text(&d["name"]))
                    .unwrap_or_else(|| format!("(gone disk {})", text(&volume["disk_id"])));
                (disk, self.path_of(&text(&volume["volume_id"])))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------
// The storm.

const FAMILIES: usize = 6;
/// Above this many VMs, rounds delete clones instead of making more.
const MAX_VMS: usize = 14;
/// Originals are only deleted while more than this many remain.
const KEEP_ORIGINALS: usize = 3;

/// A pattern byte per (family, state, disk): all distinct and non-zero.
fn pattern(family: usize, state: usize, disk: usize) -> u8 {
    (0x21 + 0x18 * family + 4 * state + disk) as u8
}

/// The disks of a family's VM: (name, MiB).
fn family_disks(family: usize) -> Vec<(&'static str, u64)> {
    let mut disks = vec![("root", 32 + 8 * (family as u64 % 4))];
    if family.is_multiple_of(2) {
        disks.push(("data", 32));
    }
    disks
}

/// What state `state` writes on disk `disk` (offset MiB, length MiB). The present
/// layer of families 0 and 3 is smaller than the layer under it (a delete of the
/// second snapshot commits), the others' bigger (it streams).
fn layer(family: usize, state: usize, disk: usize) -> (u64, u64) {
    match (disk, state) {
        (0, 0) => (0, 4),
        (0, 1) => (4, 3),
        (0, _) => (8, if family.is_multiple_of(3) { 2 } else { 6 }),
        (_, 0) => (0, 2),
        (_, 1) => (2, 1),
        (_, _) => (3, 2),
    }
}

/// Every byte of disk `disk` in state `state`: the layers up to it, zeros elsewhere.
fn state_regions(family: usize, state: usize, disk: usize, size_mib: u64) -> Vec<(u8, u64, u64)> {
    let mut regions = Vec::new();
    let mut at = 0;
    for s in 0..=state {
        let (offset, len) = layer(family, s, disk);
        if offset > at {
            regions.push((0, at, offset - at));
        }
        regions.push((pattern(family, s, disk), offset, len));
        at = offset + len;
    }
    if size_mib > at {
        regions.push((0, at, size_mib - at));
    }
    regions
}

/// One original VM and the three states its disks went through before the storm.
struct Family {
    vm: String,
    /// The snapshots taken after states 0 and 1.
    snapshots: [String; 2],
    /// disk name -> reference copies of states 0, 1 and 2.
    refs: BTreeMap<String, Vec<String>>,
}

async fn build_family(app: &TestApp, family: usize, refs_dir: &Path) -> Family {
    let disks = family_disks(family);
    let vm = app
        .create_vm(
            &format!("v{family}"),
            &disks.iter().map(|(n, s)| (*n, s * MIB)).collect::<Vec<_>>(),
        )
        .await
        .id
        .to_string();
    let mut snapshots = Vec::new();
    for state in 0..3 {
        for (index, (name, _)) in disks.iter().enumerate() {
            let (offset, len) = layer(family, state, index);
            write(
                &app.active_path(&vm, name).await,
                pattern(family, state, index),
                offset,
                len,
            );
        }
        if state < 2 {
            snapshots.push(
                app.snapshot(&vm, &format!("pre-{state}"))
                    .await
                    .id
                    .to_string(),
            );
        }
    }
    let mut refs = BTreeMap::new();
    for (index, (name, size)) in disks.iter().enumerate() {
        let mut copies = Vec::new();
        for state in 0..3 {
            let path = match snapshots.get(state) {
                Some(snapshot) => app.snapshot_path(&vm, snapshot, name).await,
                None => app.active_path(&vm, name).await,
            };
            expect_all(&path, &state_regions(family, state, index, *size));
            let copy = refs_dir.join(format!("f{family}-{name}-{state}.qcow2"));
            copy_image(&path, &copy).unwrap();
            copies.push(copy.display().to_string());
        }
        refs.insert((*name).to_owned(), copies);
    }
    Family {
        vm,
        snapshots: [snapshots[0].clone(), snapshots[1].clone()],
        refs,
    }
}

struct Storm {
    deadline: Instant,
    names: AtomicUsize,
    originals: BTreeSet<String>,
}

struct Req {
    method: Method,
    path: String,
    body: Option<Value>,
}

fn req(method: Method, path: impl Into<String>, body: Option<Value>) -> Req {
    Req {
        method,
        path: path.into(),
        body,
    }
}

struct Client {
    api: Api,
    rng: Rng,
    storm: Arc<Storm>,
    task: usize,
    schedules: Vec<String>,
    rounds: usize,
}

impl Client {
    fn name(&self, tag: &str) -> String {
        let n = self.storm.names.fetch_add(1, Ordering::Relaxed);
        format!("{tag}-{}-{n}", self.task)
    }

    fn violation(&self, text: String) {
        self.api.journal.violation(text);
    }

    async fn run(mut self) -> usize {
        while Instant::now() < self.storm.deadline {
            self.round().await;
            self.rounds += 1;
        }
        self.rounds
    }

    async fn ready_vms(&self) -> Vec<Value> {
        match self.api.list_all("/v1/vms?limit=1000").await {
            Ok(vms) => vms
                .into_iter()
                .filter(|vm| vm["status"] == "ready")
                .collect(),
            Err(e) => {
                self.violation(format!("listing VMs failed: {e}"));
                Vec::new()
            }
        }
    }

    async fn ready_snapshot(&mut self, vm: &str) -> Option<String> {
        let reply = self
            .api
            .get(&format!("/v1/vms/{vm}/snapshots?limit=1000"))
            .await;
        let ready: Vec<String> = reply.body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["status"] == "ready")
            .map(|s| text(&s["id"]))
            .collect();
        self.rng.pick(&ready).cloned()
    }

    /// Send the requests at once (in a random order, a millisecond or two apart).
    async fn fire(&mut self, mut requests: Vec<Req>) -> Vec<Reply> {
        self.rng.shuffle(&mut requests);
        let mut handles = Vec::new();
        for r in requests {
            let api = self.api.clone();
            let stagger = self.rng.below(3);
            handles.push(tokio::spawn(async move {
                if stagger > 0 {
                    tokio::time::sleep(Duration::from_millis(stagger)).await;
                }
                api.call(r.method, &r.path, r.body).await
            }));
        }
        let mut replies = Vec::new();
        for handle in handles {
            replies.push(handle.await.expect("request task"));
        }
        replies
    }

    fn clone_req(&mut self, source: &str, name: String, snapshot: Option<&str>) -> Req {
        let mode = if self.rng.chance(50) {
            "linked"
        } else {
            "full"
        };
        let mut body = json!({"name": name, "mode": mode});
        if let Some(snapshot) = snapshot {
            body["snapshot_id"] = json!(snapshot);
        }
        req(Method::POST, format!("/v1/vms/{source}/clone"), Some(body))
    }

    fn flatten_query(&mut self, percent: u64) -> &'static str {
        if self.rng.chance(percent) {
            "?flatten_dependents=true"
        } else {
            ""
        }
    }

    async fn round(&mut self) {
        let vms = self.ready_vms().await;
        let Some(vm) = self.rng.pick(&vms).cloned() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        };
        let replies = if vms.len() >= MAX_VMS {
            self.shrink(&vms).await
        } else {
            match self.rng.below(100) {
                0..=12 => self.double_delete(&vm).await,
                13..=25 => self.delete_racing_clones(&vm).await,
                26..=37 => self.delete_all_racing_creates(&vm).await,
                38..=51 => self.state_flip(&vm).await,
                52..=61 => self.schedule_runs(&vm).await,
                62..=73 => self.vm_delete_racing_clone(&vm, &vms).await,
                74..=80 => self.same_name_clones(&vm, &vms).await,
                _ => self.filler(&vm, &vms).await,
            }
        };
        self.settle(&replies).await;
    }

    /// The job ids a set of answers accepted (jobs, and the snapshot jobs of a run).
    fn jobs_of(replies: &[Reply]) -> Vec<String> {
        let mut jobs = Vec::new();
        for reply in replies {
            if let Some(job) = reply.job_id() {
                jobs.push(job);
            } else if reply.status == 202 {
                jobs.extend(
                    reply.body["job_ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(text),
                );
            }
        }
        jobs
    }

    /// Cancel some of the accepted jobs after a random delay, then wait for all of them.
    async fn settle(&mut self, replies: &[Reply]) {
        let jobs = Self::jobs_of(replies);
        let mut cancels = Vec::new();
        for job in &jobs {
            if self.rng.chance(30) {
                let delay = self.rng.below(60);
                let api = self.api.clone();
                let job = job.clone();
                cancels.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let reply = api.post_empty(&format!("/v1/jobs/{job}/cancel")).await;
                    (job, reply)
                }));
            }
        }
        let mut answers = HashMap::new();
        for cancel in cancels {
            let (job, reply) = cancel.await.expect("cancel task");
            answers.insert(job, reply);
        }
        for job in jobs {
            let end = match self.api.wait_job(&job).await {
                Ok(end) => end,
                Err(e) => {
                    self.violation(e);
                    continue;
                }
            };
            if let Some(answer) = answers.get(&job) {
                self.check_cancel(answer, &end);
            }
        }
    }

    fn check_cancel(&self, answer: &Reply, end: &Value) {
        let ended = text(&end["status"]);
        let wrong = match answer.status {
            202 if answer.body["status"] == "cancelled" && ended != "cancelled" => Some(
                "the cancel answered with the job cancelled, but it ended otherwise".to_owned(),
            ),
            202 => None,
            409 if answer.code() == "job_not_cancellable" && ended == "cancelled" => Some(
                "the cancel was refused (job_not_cancellable), yet the job ended cancelled"
                    .to_owned(),
            ),
            409 if answer.code() == "job_not_cancellable" => None,
            _ => Some(
                "a cancel of an accepted job must answer 202 or 409 job_not_cancellable".to_owned(),
            ),
        };
        if let Some(wrong) = wrong {
            self.violation(format!(
                "cancel: {wrong}\n    {answer}\n    job at the end: {}",
                clip(&end.to_string(), 700)
            ));
        }
    }

    async fn double_delete(&mut self, vm: &Value) -> Vec<Reply> {
        let vm = text(&vm["id"]);
        let Some(snapshot) = self.ready_snapshot(&vm).await else {
            return self.create_snapshot(&vm).await;
        };
        let flatten = self.flatten_query(30);
        self.fire(vec![
            req(Method::DELETE, format!("/v1/snapshots/{snapshot}"), None),
            req(
                Method::DELETE,
                format!("/v1/snapshots/{snapshot}{flatten}"),
                None,
            ),
        ])
        .await
    }

    async fn create_snapshot(&mut self, vm: &str) -> Vec<Reply> {
        let name = self.name("s");
        let reply = self
            .api
            .post(&format!("/v1/vms/{vm}/snapshots"), json!({"name": name}))
            .await;
        vec![reply]
    }

    async fn delete_racing_clones(&mut self, vm: &Value) -> Vec<Reply> {
        let vm = text(&vm["id"]);
        let Some(snapshot) = self.ready_snapshot(&vm).await else {
            return self.create_snapshot(&vm).await;
        };
        let flatten = self.flatten_query(30);
        let linked = json!({"name": self.name("lc"), "mode": "linked", "snapshot_id": snapshot});
        let full = json!({"name": self.name("fc"), "mode": "full", "snapshot_id": snapshot});
        self.fire(vec![
            req(
                Method::DELETE,
                format!("/v1/snapshots/{snapshot}{flatten}"),
                None,
            ),
            req(Method::POST, format!("/v1/vms/{vm}/clone"), Some(linked)),
            req(Method::POST, format!("/v1/vms/{vm}/clone"), Some(full)),
        ])
        .await
    }

    async fn delete_all_racing_creates(&mut self, vm: &Value) -> Vec<Reply> {
        let vm = text(&vm["id"]);
        let mut requests = vec![
            req(Method::DELETE, format!("/v1/vms/{vm}/snapshots"), None),
            req(
                Method::POST,
                format!("/v1/vms/{vm}/snapshots"),
                Some(json!({"name": self.name("s")})),
            ),
        ];
        if self.rng.chance(50) {
            requests.push(req(
                Method::POST,
                format!("/v1/vms/{vm}/snapshots"),
                Some(json!({"name": self.name("s")})),
            ));
        }
        self.fire(requests).await
    }

    /// A request for a job that needs the VM stopped.
    async fn stopped_job(&mut self, vm: &Value) -> Req {
        let id = text(&vm["id"]);
        let disks: Vec<Value> = vm["disks"].as_array().cloned().unwrap_or_default();
        match self.rng.below(6) {
            0 => {
                if let Some(disk) = self.rng.pick(&disks).cloned() {
                    let size = disk["size_bytes"].as_u64().unwrap_or(0) + MIB;
                    return req(
                        Method::POST,
                        format!("/v1/vms/{id}/disks/{}/resize", text(&disk["id"])),
                        Some(json!({"size_bytes": size})),
                    );
                }
            }
            1 => {
                if let Some(snapshot) = self.ready_snapshot(&id).await {
                    return req(
                        Method::POST,
                        format!("/v1/snapshots/{snapshot}/revert"),
                        None,
                    );
                }
            }
            2 => {
                let name = self.name("pc");
                return self.clone_req(&id, name, None);
            }
            3 => return req(Method::DELETE, format!("/v1/vms/{id}/snapshots"), None),
            4 => {
                if let Some(disk) = disks.iter().find(|d| d["source_volume_id"].is_string()) {
                    return req(
                        Method::POST,
                        format!("/v1/vms/{id}/disks/{}/flatten", text(&disk["id"])),
                        None,
                    );
                }
            }
            _ => {}
        }
        req(
            Method::POST,
            format!("/v1/vms/{id}/snapshots"),
            Some(json!({"name": self.name("s")})),
        )
    }

    async fn state_flip(&mut self, vm: &Value) -> Vec<Reply> {
        let id = text(&vm["id"]);
        let job = self.stopped_job(vm).await;
        let mut replies = self
            .fire(vec![
                req(
                    Method::PATCH,
                    format!("/v1/vms/{id}"),
                    Some(json!({"state": "running"})),
                ),
                job,
            ])
            .await;
        let pause = self.rng.below(30);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        // Sometimes ask for a job while it (maybe) runs: only a snapshot's clone may go.
        if self.rng.chance(40)
            && let Some(snapshot) = self.ready_snapshot(&id).await
        {
            let name = self.name("rc");
            let clone = self.clone_req(&id, name, Some(&snapshot));
            replies.extend(self.fire(vec![clone]).await);
        }
        self.api
            .patch(&format!("/v1/vms/{id}"), json!({"state": "stopped"}))
            .await;
        replies
    }

    async fn schedule_runs(&mut self, vm: &Value) -> Vec<Reply> {
        let vm_id = text(&vm["id"]);
        let schedule = match self.rng.pick(&self.schedules).cloned() {
            Some(existing) if self.rng.chance(50) => existing,
            _ => {
                let body = json!({
                    "name": self.name("sched"),
                    "vm_id": vm_id,
                    "cron": "@yearly",
                    "enabled": false,
                    "retention": {"keep_last": 1 + self.rng.below(2)},
                });
                let reply = self.api.post("/v1/schedules", body).await;
                if reply.status == 404 && reply.code() == "vm_not_found" {
                    return Vec::new(); // another task deleted the VM meanwhile
                }
                if reply.status != 201 {
                    self.violation(format!("creating a schedule failed: {reply}"));
                    return Vec::new();
                }
                let id = text(&reply.body["id"]);
                self.schedules.push(id.clone());
                id
            }
        };
        let mut requests = vec![
            req(Method::POST, format!("/v1/schedules/{schedule}/run"), None),
            req(Method::POST, format!("/v1/schedules/{schedule}/run"), None),
        ];
        if self.rng.chance(40)
            && let Some(snapshot) = self.ready_snapshot(&vm_id).await
        {
            requests.push(req(
                Method::DELETE,
                format!("/v1/snapshots/{snapshot}"),
                None,
            ));
        }
        self.fire(requests).await
    }

    async fn vm_delete_racing_clone(&mut self, vm: &Value, vms: &[Value]) -> Vec<Reply> {
        let mut vm = text(&vm["id"]);
        let originals = vms
            .iter()
            .filter(|v| self.storm.originals.contains(&text(&v["id"])))
            .count();
        let mut delete = true;
        if self.storm.originals.contains(&vm) && originals <= KEEP_ORIGINALS {
            let others: Vec<String> = vms
                .iter()
                .map(|v| text(&v["id"]))
                .filter(|v| !self.storm.originals.contains(v))
                .collect();
            match self.rng.pick(&others) {
                Some(other) => vm = other.clone(),
                None => delete = false,
            }
        }
        let snapshot = if self.rng.chance(50) {
            self.ready_snapshot(&vm).await
        } else {
            None
        };
        let name = self.name("dc");
        let mut requests = vec![self.clone_req(&vm, name, snapshot.as_deref())];
        if delete {
            let flatten = self.flatten_query(40);
            requests.push(req(Method::DELETE, format!("/v1/vms/{vm}{flatten}"), None));
        }
        self.fire(requests).await
    }

    async fn same_name_clones(&mut self, vm: &Value, vms: &[Value]) -> Vec<Reply> {
        let first = text(&vm["id"]);
        let second = self
            .rng
            .pick(vms)
            .map(|v| text(&v["id"]))
            .unwrap_or(first.clone());
        let name = self.name("twin");
        let a = self.clone_req(&first, name.clone(), None);
        let b = self.clone_req(&second, name.clone(), None);
        let replies = self.fire(vec![a, b]).await;
        self.settle(&replies).await;
        let accepted: Vec<&Reply> = replies.iter().filter(|r| r.status == 202).collect();
        if accepted.len() == 2 {
            let mut jobs = Vec::new();
            for reply in &accepted {
                match self
                    .api
                    .ok(&format!("/v1/jobs/{}", text(&reply.body["id"])))
                    .await
                {
                    Ok(job) => jobs.push(job),
                    Err(e) => self.violation(e),
                }
            }
            if jobs.len() == 2 {
                jobs.sort_by_key(|j| time(&j["created_at"]));
                let (earlier, later) = (&jobs[0], &jobs[1]);
                let released = earlier["status"] != "succeeded"
                    && time(&earlier["finished_at"]) <= time(&later["created_at"]);
                if !released {
                    self.violation(format!(
                        "name: two clones named {name} were both accepted while the first still held the name\n    {}\n    {}\n    first job: {}\n    second job: {}",
                        accepted[0],
                        accepted[1],
                        clip(&earlier.to_string(), 500),
                        clip(&later.to_string(), 500)
                    ));
                }
            }
        }
        Vec::new()
    }

    /// Too many VMs: delete a clone.
    async fn shrink(&mut self, vms: &[Value]) -> Vec<Reply> {
        let clones: Vec<String> = vms
            .iter()
            .map(|v| text(&v["id"]))
            .filter(|v| !self.storm.originals.contains(v))
            .collect();
        let Some(victim) = self.rng.pick(&clones).cloned() else {
            return Vec::new();
        };
        let flatten = self.flatten_query(50);
        self.fire(vec![req(
            Method::DELETE,
            format!("/v1/vms/{victim}{flatten}"),
            None,
        )])
        .await
    }

    async fn filler(&mut self, vm: &Value, vms: &[Value]) -> Vec<Reply> {
        match self.rng.below(4) {
            0 => self.shrink(vms).await,
            1 => {
                let name = self.name("fp");
                let id = text(&vm["id"]);
                let clone = self.clone_req(&id, name, None);
                self.fire(vec![clone]).await
            }
            _ => {
                let job = self.stopped_job(vm).await;
                self.fire(vec![job]).await
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// After the storm.

struct Verdict {
    violations: Vec<String>,
    notes: Vec<String>,
    /// Present states and snapshots whose bytes were checked.
    checked: (usize, usize),
}

impl Verdict {
    fn fail(&mut self, text: String) {
        self.violations.push(text);
    }
}

fn job_line(job: &Value) -> String {
    format!(
        "job {} {} {} (target {}, vm {}, created {}, started {}, finished {}, cancel_requested {}, error {}, detail {})",
        text(&job["id"]),
        text(&job["kind"]),
        text(&job["status"]),
        text(&job["target"]["id"]),
        text(&job["vm_id"]),
        text(&job["created_at"]),
        text(&job["started_at"]),
        text(&job["finished_at"]),
        job["cancel_requested"],
        job["error"],
        clip(&job["detail"].to_string(), 300)
    )
}

/// The family of every VM, following the clones the journal saw accepted.
fn families(journal: &Journal, originals: &[Family]) -> BTreeMap<String, usize> {
    let mut family: BTreeMap<String, usize> = originals
        .iter()
        .enumerate()
        .map(|(i, f)| (f.vm.clone(), i))
        .collect();
    let mut edges = Vec::new();
    for exchange in journal.exchanges() {
        if exchange.method == Method::POST
            && exchange.status == 202
            && let Some(source) = exchange
                .path
                .strip_prefix("/v1/vms/")
                .and_then(|p| p.strip_suffix("/clone"))
        {
            let mut created: Vec<String> = exchange.reply["detail"]["vm_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            created.push(text(&exchange.reply["target"]["id"]));
            for vm in created {
                edges.push((source.to_owned(), vm));
            }
        }
    }
    // Clones of clones: repeat until nothing new is learnt.
    loop {
        let mut learnt = false;
        for (source, vm) in &edges {
            if let Some(&f) = family.get(source)
                && !family.contains_key(vm)
            {
                family.insert(vm.clone(), f);
                learnt = true;
            }
        }
        if !learnt {
            return family;
        }
    }
}

/// Which recorded state (0, 1, 2) an image set shows; every disk must show the same.
fn state_of(
    images: &[(String, String)],
    refs: &BTreeMap<String, Vec<String>>,
) -> Result<usize, String> {
    let mut seen = Vec::new();
    for (disk, path) in images {
        let Some(copies) = refs.get(disk) else {
            return Err(format!(
                "disk {disk} is not one of the family's disks {:?}",
                refs.keys()
            ));
        };
        let mut matches = Vec::new();
        for (state, copy) in copies.iter().enumerate() {
            if same_content(path, copy)? {
                matches.push(state);
            }
        }
        if matches.len() != 1 {
            let diffs: Vec<String> = copies
                .iter()
                .enumerate()
                .map(|(state, copy)| format!("state {state}: {}", difference(path, copy)))
                .collect();
            return Err(format!(
                "disk {disk} ({}) shows none of the recorded states ({})",
                file_name(path),
                diffs.join("; ")
            ));
        }
        seen.push((disk.clone(), matches[0]));
    }
    let first = seen.first().map(|(_, s)| *s).ok_or("no disk images")?;
    if seen.iter().any(|(_, s)| *s != first) {
        return Err(format!("the disks show different points in time: {seen:?}"));
    }
    Ok(first)
}

async fn verify(
    api: &Api,
    app: &TestApp,
    originals: &[Family],
    verdict: &mut Verdict,
) -> Result<(), String> {
    let journal = &api.journal;
    let jobs = api.list_all("/v1/jobs?limit=1000").await?;
    let world = World::load(api, &app.data_dir).await?;

    // Every job ended; failures are named.
    for job in &jobs {
        if !is_terminal(job) {
            verdict.fail(format!("job left unfinished: {}", job_line(job)));
        }
        if job["status"] == "failed" {
            let code = text(&job["error"]["code"]);
            match api.contract().status_of(&code) {
                None => verdict.fail(format!(
                    "failed job with a code not in README's table: {}",
                    job_line(job)
                )),
                Some(status) if status >= 500 => verdict.fail(format!(
                    "job failed with a server-side error ({code}):\n    {}\n{}",
                    job_line(job),
                    journal.mentioning(&text(&job["id"]), 6).join("\n")
                )),
                Some(_) => verdict.notes.push(format!(
                    "a {} job failed with {code} (allowed: every job ends succeeded, failed or cancelled)\n    {}",
                    text(&job["kind"]),
                    job_line(job)
                )),
            }
        }
    }
    let succeeded = |kind: &str| -> Vec<&Value> {
        jobs.iter()
            .filter(|j| j["kind"] == kind && j["status"] == "succeeded")
            .collect()
    };

    // One snapshot or VM is deleted at most once, and what was deleted is gone.
    let snapshot_ids = world.snapshot_ids();
    let mut deleted: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for job in succeeded("snapshot_delete") {
        deleted
            .entry(text(&job["target"]["id"]))
            .or_default()
            .push(job);
    }
    for (snapshot, jobs) in &deleted {
        if jobs.len() > 1 {
            let lines: Vec<String> = jobs
                .iter()
                .map(|j| format!("    {}", job_line(j)))
                .collect();
            verdict.fail(format!(
                "snapshot {snapshot} was deleted by {} succeeded jobs:\n{}\n{}",
                jobs.len(),
                lines.join("\n"),
                journal.mentioning(snapshot, 8).join("\n")
            ));
        }
        if snapshot_ids.contains(snapshot) {
            verdict.fail(format!(
                "snapshot {snapshot} still exists after its delete succeeded: {}\n{}",
                job_line(jobs[0]),
                journal.mentioning(snapshot, 8).join("\n")
            ));
        }
    }
    for job in succeeded("snapshot_delete_all") {
        let vm = text(&job["target"]["id"]);
        for create in succeeded("snapshot_create") {
            let snapshot = text(&create["target"]["id"]);
            if create["vm_id"] == vm.as_str()
                && time(&create["finished_at"]) < time(&job["created_at"])
                && snapshot_ids.contains(&snapshot)
            {
                verdict.fail(format!(
                    "snapshot {snapshot} was ready before a delete-all of its VM was accepted, and survived it:\n    {}\n    {}",
                    job_line(&job.clone()),
                    job_line(create)
                ));
            }
        }
    }
    let mut vm_deletes: BTreeMap<String, usize> = BTreeMap::new();
    for job in succeeded("vm_delete") {
        let vm = text(&job["target"]["id"]);
        *vm_deletes.entry(vm.clone()).or_default() += 1;
        if world.vm(&vm).is_some() {
            verdict.fail(format!(
                "VM {vm} still exists after its delete succeeded: {}",
                job_line(job)
            ));
        }
    }
    for (vm, count) in vm_deletes {
        if count > 1 {
            verdict.fail(format!("VM {vm} was deleted by {count} succeeded jobs"));
        }
    }
    let deleted_vms: BTreeSet<String> = succeeded("vm_delete")
        .iter()
        .map(|j| text(&j["target"]["id"]))
        .collect();
    for job in jobs.iter().filter(|j| j["kind"] == "vm_clone") {
        let made: Vec<String> = job["detail"]["vm_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        for vm in made {
            let exists = world.vm(&vm).is_some();
            let expected = job["status"] == "succeeded" && !deleted_vms.contains(&vm);
            if exists != expected {
                verdict.fail(format!(
                    "VM {vm} made by a clone job {} although the job {}:\n    {}\n{}",
                    if exists { "exists" } else { "is missing" },
                    text(&job["status"]),
                    job_line(job),
                    journal.mentioning(&vm, 6).join("\n")
                ));
            }
        }
    }

    // While marked running, a VM had no job pending, and got none that needs it stopped.
    let exchanges = journal.exchanges();
    let present_clones: BTreeSet<String> = exchanges
        .iter()
        .filter(|e| e.method == Method::POST && e.status == 202 && e.path.ends_with("/clone"))
        .filter(|e| {
            e.body
                .as_ref()
                .is_some_and(|b| b.get("snapshot_id").is_none())
        })
        .map(|e| text(&e.reply["id"]))
        .collect();
    // Each VM a clone made, with the VM it was cloned from: deleting or flattening a
    // linked clone also works on its source (it may drop a layer nothing reads any
    // more), which may keep running meanwhile.
    let source_of: BTreeMap<String, String> = jobs
        .iter()
        .filter(|j| j["kind"] == "vm_clone")
        .flat_map(|j| {
            let source = text(&j["vm_id"]);
            j["detail"]["vm_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |made| (text(made), source.clone()))
        })
        .collect();
    let mut flips: BTreeMap<String, Vec<(Time, bool, usize)>> = BTreeMap::new();
    for e in &exchanges {
        if e.method == Method::PATCH
            && e.status == 200
            && let Some(at) = time(&e.reply["updated_at"])
        {
            flips.entry(text(&e.reply["id"])).or_default().push((
                at,
                e.reply["state"] == "running",
                e.seq,
            ));
        }
    }
    for (vm, mut events) in flips {
        events.sort();
        let mut intervals: Vec<(Time, Option<Time>, usize)> = Vec::new();
        let mut running = false;
        for (at, state, seq) in events {
            if state && !running {
                intervals.push((at, None, seq));
            } else if !state && running {
                intervals.last_mut().expect("open interval").1 = Some(at);
            }
            running = state;
        }
        if intervals.is_empty() {
            continue;
        }
        let vm_jobs = api
            .list_all(&format!("/v1/jobs?vm_id={vm}&limit=1000"))
            .await?;
        for (from, to, seq) in &intervals {
            for job in &vm_jobs {
                let (Some(created), finished) =
                    (time(&job["created_at"]), time(&job["finished_at"]))
                else {
                    continue;
                };
                let pending_at_start = created < *from && finished.is_none_or(|f| f > *from);
                let kind = text(&job["kind"]);
                // A delete-all that merges nothing (no snapshot) may run beside the guest.
                let collapses = job["detail"]["merges"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| matches!(m["action"].as_str(), Some("commit" | "stream")))
                    || job["error"]["code"] == "vm_running";
                let on_a_clone_of_it =
                    job["vm_id"] != vm.as_str() && source_of.get(&text(&job["vm_id"])) == Some(&vm);
                let needs_stopped = (matches!(
                    kind.as_str(),
                    "snapshot_create"
                        | "snapshot_revert"
                        | "disk_resize"
                        | "disk_flatten"
                        | "vm_delete"
                ) && !on_a_clone_of_it)
                    || (kind == "snapshot_delete_all" && collapses)
                    || (kind == "vm_clone"
                        && present_clones.contains(&text(&job["id"]))
                        && job["vm_id"] == vm.as_str());
                let accepted_while_running =
                    needs_stopped && created > *from && to.is_none_or(|t| created < t);
                if pending_at_start || accepted_while_running {
                    let patch = exchanges
                        .iter()
                        .find(|e| e.seq == *seq)
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    verdict.fail(format!(
                        "VM {vm} was marked running at {from} (until {}) while {}:\n    {patch}\n    {}\n{}",
                        to.map(|t| t.to_string()).unwrap_or_else(|| "the end".into()),
                        if pending_at_start {
                            "a job of it was still pending (it should have been refused with vm_busy)"
                        } else {
                            "a job that needs it stopped was accepted in that window"
                        },
                        job_line(job),
                        journal.mentioning(&text(&job["id"]), 4).join("\n")
                    ));
                }
            }
        }
    }

    // A clone of a snapshot is refused (snapshot_not_ready) while the snapshot is
    // being deleted: accepted in that window, it can only fail.
    let clone_sources: BTreeMap<String, String> = exchanges
        .iter()
        .filter(|e| e.method == Method::POST && e.status == 202 && e.path.ends_with("/clone"))
        .filter_map(|e| {
            let snapshot = e.body.as_ref()?.get("snapshot_id")?.as_str()?.to_owned();
            Some((text(&e.reply["id"]), snapshot))
        })
        .collect();
    let ready_at: BTreeMap<String, Option<Time>> = succeeded("snapshot_create")
        .iter()
        .map(|j| (text(&j["target"]["id"]), time(&j["finished_at"])))
        .collect();
    for clone in jobs.iter().filter(|j| j["kind"] == "vm_clone") {
        let Some(snapshot) = clone_sources.get(&text(&clone["id"])) else {
            continue;
        };
        let Some(accepted) = time(&clone["created_at"]) else {
            continue;
        };
        for delete in jobs.iter().filter(|j| j["status"] != "queued") {
            let covers = match text(&delete["kind"]).as_str() {
                "snapshot_delete" => delete["target"]["id"] == snapshot.as_str(),
                "snapshot_delete_all" => {
                    delete["target"]["id"] == clone["vm_id"]
                        && ready_at
                            .get(snapshot)
                            .is_some_and(|ready| *ready < time(&delete["created_at"]))
                }
                _ => false,
            };
            let (Some(from), until) = (time(&delete["created_at"]), time(&delete["finished_at"]))
            else {
                continue;
            };
            if covers && from < accepted && until.is_none_or(|u| accepted < u) {
                verdict.fail(format!(
                    "a clone of snapshot {snapshot} was accepted while the snapshot was being deleted (it should be refused with snapshot_not_ready):\n    {}\n    {}\n{}",
                    job_line(clone),
                    job_line(delete),
                    journal.mentioning(&text(&clone["id"]), 3).join("\n")
                ));
            }
        }
    }

    // Runs of one schedule never overlap and all have ended.
    let schedules: BTreeSet<String> = exchanges
        .iter()
        .filter(|e| e.method == Method::POST && e.path == "/v1/schedules" && e.status == 201)
        .map(|e| text(&e.reply["id"]))
        .collect();
    for schedule in &schedules {
        // A schedule aimed at a VM goes with the VM.
        if api.get(&format!("/v1/schedules/{schedule}")).await.status == 404 {
            continue;
        }
        let mut runs = api
            .list_all(&format!("/v1/schedules/{schedule}/runs?limit=1000"))
            .await?;
        runs.retain(|r| r["status"] != "skipped");
        runs.sort_by_key(|r| time(&r["started_at"]));
        for run in &runs {
            if run["status"] == "running" {
                verdict.fail(format!(
                    "schedule {schedule}: run {} is still running after every job ended: {}",
                    text(&run["id"]),
                    clip(&run.to_string(), 600)
                ));
            }
        }
        for pair in runs.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if time(&a["finished_at"]).is_none_or(|end| Some(end) > time(&b["started_at"])) {
                verdict.fail(format!(
                    "schedule {schedule}: two runs overlap (runs never stack):\n    {}\n    {}",
                    clip(&a.to_string(), 600),
                    clip(&b.to_string(), 600)
                ));
            }
        }
    }

    // Records and files.
    for problem in world.status_problems() {
        verdict.fail(format!("record: {problem}"));
    }
    let files = world.file_report(None);
    for problem in files.problems {
        verdict.fail(format!("files: {problem}"));
    }
    verdict.notes.extend(files.notes);
    let mut names = BTreeSet::new();
    for vm in world.vms.iter().chain(&world.templates) {
        if !names.insert(text(&vm["name"])) {
            verdict.fail(format!(
                "two VMs or templates are named {}",
                text(&vm["name"])
            ));
        }
    }

    // Bytes: every present state and snapshot shows one of its family's states, and
    // the snapshots taken before the storm still show theirs.
    let family_of = families(journal, originals);
    for vm in &world.vms {
        let vm_id = text(&vm["id"]);
        let Some(&f) = family_of.get(&vm_id) else {
            verdict.fail(format!(
                "VM {vm_id} ({}) comes from no request the test made",
                text(&vm["name"])
            ));
            continue;
        };
        let family = &originals[f];
        let images: Vec<(String, String)> = vm["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| (text(&d["name"]), text(&d["active_path"])))
            .collect();
        let names: BTreeSet<&String> = images.iter().map(|(n, _)| n).collect();
        if names != family.refs.keys().collect() {
            verdict.fail(format!(
                "VM {vm_id} has disks {names:?}, its family {:?}",
                family.refs.keys()
            ));
        }
        verdict.checked.0 += 1;
        if let Err(e) = state_of(&images, &family.refs) {
            verdict.fail(format!(
                "bytes: the present state of VM {} ({vm_id}, family {f}): {e}\n{}",
                text(&vm["name"]),
                journal.mentioning(&vm_id, 10).join("\n")
            ));
        }
        for snapshot in world.snapshots_of(&vm_id) {
            let snapshot_id = text(&snapshot["id"]);
            let images = world.snapshot_images(snapshot);
            verdict.checked.1 += 1;
            match state_of(&images, &family.refs) {
                Err(e) => verdict.fail(format!(
                    "bytes: snapshot {} ({snapshot_id}) of VM {vm_id}: {e}\n{}",
                    text(&snapshot["name"]),
                    journal.mentioning(&snapshot_id, 10).join("\n")
                )),
                Ok(state) => {
                    if let Some(taken) = family.snapshots.iter().position(|s| *s == snapshot_id)
                        && taken != state
                    {
                        verdict.fail(format!(
                            "bytes: snapshot {snapshot_id}, taken before the storm in state {taken}, now shows state {state}\n{}",
                            journal.mentioning(&snapshot_id, 10).join("\n")
                        ));
                    }
                }
            }
        }
    }
    for (f, family) in originals.iter().enumerate() {
        for (k, snapshot) in family.snapshots.iter().enumerate() {
            if !snapshot_ids.contains(snapshot) && !deleted.contains_key(snapshot) {
                let gone_with_vm = world.vm(&family.vm).is_none();
                let collapsed = succeeded("snapshot_delete_all")
                    .iter()
                    .any(|j| j["target"]["id"] == family.vm.as_str());
                if !gone_with_vm && !collapsed {
                    verdict.fail(format!(
                        "snapshot pre-{k} of family {f} ({snapshot}) is gone, but no job deleted it\n{}",
                        journal.mentioning(snapshot, 10).join("\n")
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The first line of a violation with ids, times and numbers blanked: what kind of
/// violation it is.
fn category(violation: &str) -> String {
    let first = violation.lines().next().unwrap_or_default();
    let mut out = String::new();
    let mut in_token = false;
    for word in first.split_inclusive([' ', '(', ')', ',', ':']) {
        let core = word.trim_end_matches([' ', '(', ')', ',', ':']);
        let digits = core.chars().filter(char::is_ascii_digit).count();
        if digits > 0 && digits * 3 >= core.len() {
            if !in_token {
                out.push('#');
            }
            out.push_str(&word[core.len()..]);
            in_token = true;
        } else {
            out.push_str(word);
            in_token = false;
        }
    }
    out
}

/// Violations grouped by kind: a count and the first two in full.
pub(crate) fn report(violations: &[String]) -> String {
    let mut groups: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    let mut order = Vec::new();
    for violation in violations {
        let key = category(violation);
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(violation);
    }
    let mut out = Vec::new();
    for (i, key) in order.iter().enumerate() {
        let group = &groups[key];
        out.push(format!("=== {}. [{} time(s)] {key}", i + 1, group.len()));
        for example in group.iter().take(2) {
            out.push(format!("{example}\n"));
        }
    }
    out.join("\n")
}

fn summary(journal: &Journal, jobs: &[Value]) -> String {
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for e in journal.exchanges() {
        let key = if e.status >= 400 {
            format!("{} {}", e.status, text(&e.reply["code"]))
        } else {
            e.status.to_string()
        };
        *statuses.entry(key).or_default() += 1;
    }
    let mut outcomes: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for job in jobs {
        *outcomes
            .entry(text(&job["kind"]))
            .or_default()
            .entry(text(&job["status"]))
            .or_default() += 1;
    }
    let mut lines = vec![format!("answers: {statuses:?}")];
    for (kind, counts) in outcomes {
        lines.push(format!("  {kind}: {counts:?}"));
    }
    lines.join("\n")
}

#[tokio::test]
async fn colliding_requests_from_concurrent_clients_keep_records_files_and_bytes_consistent() {
    let seed = env_u64("STRATA_STRESS_SEED", 0x5EED_0001);
    let secs = env_u64("STRATA_STRESS_SECS", 25);
    let tasks = env_u64("STRATA_STRESS_TASKS", 4) as usize;
    let started = Instant::now();
    println!(
        "stress: seed {seed:#x}, {tasks} tasks, {secs} s (STRATA_STRESS_SEED / _TASKS / _SECS)"
    );

    // The service logs to the test's stderr; a hunt may want more than warnings.
    let app = match std::env::var("STRATA_STRESS_SERVICE_LOG") {
        Ok(filter) => TestApp::spawn_with(&[("STRATA_LOG", filter.as_str())]).await,
        Err(_) => TestApp::spawn().await,
    };
    let refs_dir = tempfile::tempdir().expect("reference dir");
    let mut originals = Vec::new();
    for family in 0..FAMILIES {
        originals.push(build_family(&app, family, refs_dir.path()).await);
    }
    println!("stress: {} VMs set up in {:?}", FAMILIES, started.elapsed());

    let contract = Arc::new(Contract::load(&app).await);
    let journal = Journal::new();
    let api = Api::new(&app, contract, Arc::clone(&journal));
    let storm = Arc::new(Storm {
        deadline: Instant::now() + Duration::from_secs(secs),
        names: AtomicUsize::new(0),
        originals: originals.iter().map(|f| f.vm.clone()).collect(),
    });
    let mut handles = Vec::new();
    for task in 0..tasks {
        let client = Client {
            api: api.for_task(task + 1),
            rng: Rng::new(seed ^ (task as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F)),
            storm: Arc::clone(&storm),
            task: task + 1,
            schedules: Vec::new(),
            rounds: 0,
        };
        handles.push(tokio::spawn(client.run()));
    }
    let mut rounds = 0;
    for handle in handles {
        rounds += handle.await.expect("client task");
    }
    println!(
        "stress: storm over after {:?}: {rounds} rounds, {} requests",
        started.elapsed(),
        journal.exchanges().len()
    );

    let mut verdict = Verdict {
        violations: Vec::new(),
        notes: Vec::new(),
        checked: (0, 0),
    };
    let checker = api.for_task(0);
    if let Err(e) = checker.wait_quiet(Duration::from_secs(180)).await {
        verdict.fail(e);
    }
    if let Err(e) = verify(&checker, &app, &originals, &mut verdict).await {
        verdict.fail(format!("the final checks could not run: {e}"));
    }
    let jobs = checker
        .list_all("/v1/jobs?limit=1000")
        .await
        .unwrap_or_default();
    println!("{}", summary(&journal, &jobs));
    if !verdict.notes.is_empty() {
        println!("notes (not failures):\n{}", report(&verdict.notes));
    }
    let mut violations = journal.violations();
    violations.extend(verdict.violations);
    println!(
        "stress: bytes checked in {} present states and {} snapshots; done in {:?}",
        verdict.checked.0,
        verdict.checked.1,
        started.elapsed()
    );
    if !violations.is_empty() {
        let dump = journal.dump(&format!("stress-{seed:#x}"));
        panic!(
            "{} violation(s) with seed {seed:#x} (rerun: STRATA_STRESS_SEED={seed:#x} cargo test --test api stress -- --nocapture); every request and answer is in {dump}:\n{}",
            violations.len(),
            report(&violations)
        );
    }
}
