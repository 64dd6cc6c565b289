//! Reads against the ceiling of the HTTP stack (issue 13's first goal).
//!
//! `wrk` (2 threads, 32 connections, a few seconds a run) drives three routes of the
//! service: `GET /v1/vms/{id}` of a VM with 2 disks and 3 snapshots, `GET /v1/jobs/{id}`
//! of one of its snapshot jobs and `GET /v1/snapshots/{id}` of one of its snapshots. It
//! drives the same routes of an axum hello-world served from this process (a
//! multi-thread tokio runtime on a thread of its own), which answers each route with a
//! constant body: the very bytes the service answered for it, captured once. Both
//! servers then send the same bytes over the same kind of connection, so the ratio
//! (service req/s ÷ hello-world req/s; target at least 0.5) is what the service's own
//! work per request costs: routing, middleware, queries, serialisation.
//!
//! Runs alternate hello-world and service, route by route, for a few rounds (which one
//! goes first alternates too), after one short untimed run of each; the figures are
//! medians of req/s. A run counts only if wrk met no error: an answer outside 2xx/3xx or
//! a socket error aborts the bench with wrk's output, so a fast error page cannot pass
//! for a fast read.

use std::fmt::Write as _;
use std::thread::JoinHandle;

use bytes::Bytes;
use reqwest::Method;
use serde_json::json;

use super::goals::Goal;
use super::support::{TestApp, Uuid};
use super::{GIB, Result, create_vm};

const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 32;
/// Seconds of each timed wrk run.
const WRK_SECONDS: u32 = 3;
/// Seconds of the untimed run that warms each server and route up.
const WARM_UP_SECONDS: u32 = 1;
const ROUNDS: usize = 3;
/// Service req/s ÷ hello-world req/s issue 13 asks for, on every route.
const TARGET_RATIO: f64 = 0.5;
const SNAPSHOTS: usize = 3;

/// One route, as both servers answer it.
struct Route {
    /// The axum path pattern the hello-world serves.
    pattern: &'static str,
    /// What the VM under test makes of it, for the report.
    label: &'static str,
    /// The path both are asked.
    path: String,
    /// The service's answer, which the hello-world sends as it is.
    body: Bytes,
}

pub struct RouteFigures {
    pattern: &'static str,
    label: &'static str,
    body_bytes: usize,
    /// Requests per second of each timed run.
    service: Vec<f64>,
    hello: Vec<f64>,
}

impl RouteFigures {
    fn ratio(&self) -> f64 {
        median(&self.service) / median(&self.hello)
    }
}

pub struct ReadFigures {
    routes: Vec<RouteFigures>,
}

pub async fn bench_reads(app: &TestApp) -> Result<ReadFigures> {
    require_wrk().await?;
    eprintln!("strata bench: reads against a hello-world (wrk), {ROUNDS} rounds");
    let vm = create_vm(app, "bench-reads", 2, GIB).await;
    let mut snapshot_jobs = Vec::new();
    for i in 0..SNAPSHOTS {
        let path = format!("/v1/vms/{vm}/snapshots");
        let body = json!({ "name": format!("read-{i}") });
        snapshot_jobs.push(app.run_job(Method::POST, &path, Some(body)).await);
    }
    let view = app.vm(vm).await;
    if view.disks.len() != 2 || view.snapshot_count != SNAPSHOTS as u32 {
        return Err(
            format!("the VM read should have 2 disks and {SNAPSHOTS} snapshots: {view:?}").into(),
        );
    }
    let (job, snapshot) = (&snapshot_jobs[SNAPSHOTS - 1], &snapshot_jobs[0]);
    let mut routes = Vec::new();
    for (pattern, label, path) in [
        (
            "/v1/vms/{id}",
            "2 disks, 3 snapshots",
            format!("/v1/vms/{vm}"),
        ),
        (
            "/v1/jobs/{id}",
            "a finished snapshot job",
            format!("/v1/jobs/{}", job.id),
        ),
        (
            "/v1/snapshots/{id}",
            "a snapshot of 2 disks",
            format!("/v1/snapshots/{}", snapshot.target.id),
        ),
    ] {
        let body = capture(app, &path, vm).await?;
        routes.push(Route {
            pattern,
            label,
            path,
            body,
        });
    }

    let hello = HelloWorld::start(&routes)?;
    let mut figures: Vec<RouteFigures> = routes
        .iter()
        .map(|r| RouteFigures {
            pattern: r.pattern,
            label: r.label,
            body_bytes: r.body.len(),
            service: Vec::new(),
            hello: Vec::new(),
        })
        .collect();
    for route in &routes {
        for base in [&hello.base, &app.base] {
            wrk(&format!("{base}{}", route.path), WARM_UP_SECONDS).await?;
        }
    }
    for round in 0..ROUNDS {
        for (route, samples) in routes.iter().zip(&mut figures) {
            eprintln!(
                "strata bench: wrk GET {} (round {}/{ROUNDS})",
                route.pattern,
                round + 1
            );
            let mut pair = [
                (&hello.base, &mut samples.hello),
                (&app.base, &mut samples.service),
            ];
            // Neither server always runs right after the other one's load.
            if round % 2 == 1 {
                pair.reverse();
            }
            for (base, runs) in pair {
                runs.push(wrk(&format!("{base}{}", route.path), WRK_SECONDS).await?);
            }
        }
    }
    drop(hello);
    app.delete_vm(vm).await;
    Ok(ReadFigures { routes: figures })
}

/// The service's answer to `GET path`, which must be a success naming `vm`: the body
/// the hello-world will serve.
async fn capture(app: &TestApp, path: &str, vm: Uuid) -> Result<Bytes> {
    let response = app.client.get(format!("{}{path}", app.base)).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() || !text.contains(&vm.to_string()) {
        return Err(format!("GET {path}: {status} {text}").into());
    }
    Ok(body)
}

// ---------------------------------------------------------------------------------------
// The hello-world
// ---------------------------------------------------------------------------------------

/// An axum server answering each route with its constant body, on a multi-thread
/// runtime of its own (so it has the same threads as the service would), on a thread of
/// its own; stopped when dropped.
struct HelloWorld {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HelloWorld {
    fn start(routes: &[Route]) -> Result<Self> {
        let mut router = axum::Router::new();
        for route in routes {
            let body = route.body.clone();
            router = router.route(
                route.pattern,
                axum::routing::get(move || {
                    let body = body.clone();
                    async move {
                        (
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            body,
                        )
                    }
                }),
            );
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let base = format!("http://{}", listener.local_addr()?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hello-world".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("hello-world listener");
                    axum::serve(listener, router)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await
                        .expect("hello-world server");
                });
            })?;
        Ok(Self {
            base,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for HelloWorld {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------------------

/// Fail early, and say how to get it, when wrk is not installed.
async fn require_wrk() -> Result<()> {
    match tokio::process::Command::new("wrk").arg("-v").output().await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "the read benchmarks need wrk, which is not installed (Debian: apt-get install -y wrk)"
                .into(),
        ),
        Err(e) => Err(format!("cannot run wrk: {e}").into()),
    }
}

/// Run wrk on `url` for `seconds`; the requests per second it measured. wrk prints
/// "Non-2xx or 3xx responses" and "Socket errors" lines only when there were some.
async fn wrk(url: &str, seconds: u32) -> Result<f64> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{WRK_CONNECTIONS}"))
        .arg(format!("-d{seconds}s"))
        .arg(url)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("wrk {url} failed ({}): {stdout}{stderr}", output.status).into());
    }
    if stdout.contains("Non-2xx") || stdout.contains("Socket errors") {
        return Err(
            format!("wrk {url} met errors, so its figure is not the route's:\n{stdout}").into(),
        );
    }
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk's output:\n{stdout}").into())
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// "median (min–max)" of requests per second.
fn rate_spread(samples: &[f64]) -> String {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(0.0, f64::max);
    format!("{:.0} ({min:.0}–{max:.0})", median(samples))
}

pub fn goals(figures: &ReadFigures) -> Vec<Goal> {
    figures
        .routes
        .iter()
        .map(|r| {
            Goal::at_least(
                format!("`GET {}` req/s ÷ hello-world", r.pattern),
                r.ratio(),
                TARGET_RATIO,
            )
        })
        .collect()
}

pub fn report(figures: &ReadFigures) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Reads against an axum hello-world (wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}, {WRK_SECONDS} s a run, {ROUNDS} rounds interleaved; median req/s (min–max))\n"
    );
    let _ = writeln!(
        s,
        "| route | body | service | hello-world | service/hello-world (target ≥ {TARGET_RATIO}) |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    for r in &figures.routes {
        let _ = writeln!(
            s,
            "| `GET {}` ({}) | {} B | {} | {} | {:.2} |",
            r.pattern,
            r.label,
            r.body_bytes,
            rate_spread(&r.service),
            rate_spread(&r.hello),
            r.ratio()
        );
    }
    let _ = writeln!(
        s,
        "\nThe hello-world (axum, a multi-thread runtime in the bench process) answers each \
         route with the bytes the service answered for it; wrk met no error in any run."
    );
    s
}
