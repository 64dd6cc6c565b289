//! Prometheus metrics (`GET /metrics`): what the service counts as it goes (HTTP
//! requests; jobs as they finish, read from the event stream) and what is read at each
//! scrape (the job queue, the data directory's space, the inventory). Encoded by
//! `prometheus-client` in the Prometheus text format.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Result;
use crate::events::{Hub, Since};
use crate::store::Db;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    http_requests: Family<Labels, Counter>,
    http_duration: Family<Labels, Histogram, fn() -> Histogram>,
    jobs_finished: Family<Labels, Counter>,
    job_duration: Family<Labels, Histogram, fn() -> Histogram>,
    bytes_copied: Family<Labels, Counter>,
    jobs: Family<Labels, Gauge>,
    data_dir_bytes: Family<Labels, Gauge>,
    resources: Family<Labels, Gauge>,
    longest_chain: Gauge,
}

/// Request latencies: 0.5 ms to about 16 s.
fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Job durations: 10 ms to about 11 hours.
fn job_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.5, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strata");
        let http_requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        let http_duration =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(request_buckets);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (to its headers), by method and route template",
            http_duration.clone(),
        );
        let jobs_finished = Family::<Labels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that ended since the service started, by kind and outcome (succeeded, failed, cancelled)",
            jobs_finished.clone(),
        );
        let job_duration =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(job_buckets);
        registry.register(
            "job_duration_seconds",
            "Time from a job's start to its end, by kind",
            job_duration.clone(),
        );
        let bytes_copied = Family::<Labels, Counter>::default();
        registry.register(
            "job_bytes_copied",
            "Bytes the jobs' copies moved (merges, full clones, imports, flattens), by job kind, counted when the job ends whatever its outcome: each copying step's estimated total when it completed (for a merge the planner's estimate, which it chose the direction by; QEMU's figure for a copy a running VM's QEMU made), else as far as it got",
            bytes_copied.clone(),
        );
        let jobs = Family::<Labels, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs queued or running now, by status",
            jobs.clone(),
        );
        let data_dir_bytes = Family::<Labels, Gauge>::default();
        registry.register(
            "data_dir_bytes",
            "The data file system's free bytes (for strata: what unprivileged writers may use) and the bytes the volume files take",
            data_dir_bytes.clone(),
        );
        let resources = Family::<Labels, Gauge>::default();
        registry.register(
            "resources",
            "VMs, templates and snapshots recorded, by kind",
            resources.clone(),
        );
        let longest_chain = Gauge::default();
        registry.register(
            "longest_chain_layers",
            "Layers in the longest chain of any disk (its active layer and everything below it)",
            longest_chain.clone(),
        );
        Self {
            registry,
            http_requests,
            http_duration,
            jobs_finished,
            job_duration,
            bytes_copied,
            jobs,
            data_dir_bytes,
            resources,
            longest_chain,
        }
    }

    /// Count an answered request; `route` is the route's template (`/v1/vms/{id}`),
    /// never the path itself, so ids do not become series.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = vec![("method", method.to_owned()), ("route", route.to_owned())];
        self.http_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        let mut labels = labels;
        labels.push(("status", status.to_string()));
        self.http_requests.get_or_create(&labels).inc();
    }

    /// Count a finished job from its view (the data of a `job.finished` event).
    fn observe_job(&self, view: &serde_json::Value) {
        let text = |key: &str| view[key].as_str().unwrap_or_default().to_owned();
        let kind = text("kind");
        let outcome = text("status");
        self.jobs_finished
            .get_or_create(&vec![("kind", kind.clone()), ("outcome", outcome)])
            .inc();
        let time = |key: &str| chrono::DateTime::parse_from_rfc3339(&text(key)).ok();
        if let (Some(start), Some(end)) = (time("started_at"), time("finished_at")) {
            let seconds = (end - start).num_milliseconds().max(0) as f64 / 1000.0;
            self.job_duration
                .get_or_create(&vec![("kind", kind.clone())])
                .observe(seconds);
        }
        // The same figures the job's progress showed, added up by the engine as each
        // copying step ended.
        let copied = view["bytes_copied"].as_u64().unwrap_or(0);
        if copied > 0 {
            self.bytes_copied
                .get_or_create(&vec![("kind", kind)])
                .inc_by(copied);
        }
    }

    /// Count jobs as they finish, from the event stream, until the service stops.
    pub fn follow_jobs(self: &Arc<Self>, hub: Arc<Hub>) -> tokio::task::JoinHandle<()> {
        let metrics = Arc::clone(self);
        tokio::spawn(async move {
            let mut updates = hub.subscribe();
            let mut after = hub.latest();
            while let Some(found) = hub.next_after(after, 512, &mut updates).await {
                match found {
                    Since::Gone { latest } => after = latest,
                    Since::Events(events) => {
                        after = events.last().map_or(after, |e| e.id);
                        for event in events.iter().filter(|e| e.event_type == "job.finished") {
                            if let Ok(view) = serde_json::from_str(&event.data) {
                                metrics.observe_job(&view);
                            }
                        }
                    }
                }
            }
        })
    }

    /// Read what is measured at scrape time, and encode every metric.
    pub async fn scrape(&self, db: &Db, volumes_dir: &std::path::Path) -> Result<String> {
        let inventory = crate::store::inventory(&mut *db.reader().await?).await?;
        for (status, count) in [
            ("queued", inventory.jobs_queued),
            ("running", inventory.jobs_running),
        ] {
            self.jobs
                .get_or_create(&vec![("status", status.to_owned())])
                .set(count);
        }
        for (kind, count) in [
            ("vm", inventory.vms),
            ("template", inventory.templates),
            ("snapshot", inventory.snapshots),
        ] {
            self.resources
                .get_or_create(&vec![("kind", kind.to_owned())])
                .set(count);
        }
        self.longest_chain.set(inventory.longest_chain);
        let dir = volumes_dir.to_owned();
        let (free, used) = tokio::task::spawn_blocking(move || {
            let free = crate::files::available_bytes(&dir).unwrap_or(0);
            let used: u64 = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| crate::files::allocated_bytes(&entry.path()))
                .sum();
            (free, used)
        })
        .await
        .unwrap_or((0, 0));
        for (space, bytes) in [("free", free), ("volumes", used)] {
            self.data_dir_bytes
                .get_or_create(&vec![("space", space.to_owned())])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .map_err(|e| crate::error::Error::Internal(format!("cannot encode metrics: {e}")))?;
        Ok(text)
    }
}
