//! Time-driven work: scheduled snapshot runs and pruning (retention and expiry). It
//! only ever enqueues ordinary jobs (through `jobs::requests`), never touches files.
//! The rules themselves are pure and live in `domain::schedule` and
//! `domain::retention`; this module applies them on a tick.
//!
//! - `runs`: start due runs, follow their snapshot jobs, close them with a retention
//!   pass for their schedule.
//! - `prune`: the pruning pass shared by runs, the periodic sweep and previews.
//!
//! Every tick reads `crate::clock`, so tests drive schedules with a test clock.

pub mod prune;
pub mod runs;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::Uuid;
use crate::jobs::Engine;
use crate::store::{self, Db};

/// What the scheduler's own jobs record as `requested_by` (a reserved token name).
pub const SCHEDULER: &str = "scheduler";

/// How often the scheduler looks at the clock and sweeps.
#[derive(Debug, Clone)]
pub struct Settings {
    pub tick: Duration,
    pub sweep_interval: Duration,
    /// Runs kept per schedule.
    pub run_history: u32,
}

/// Shortest pause between two passes woken by job changes, so a burst of job events
/// costs one pass, not one per event.
const MIN_WAKE_INTERVAL: Duration = Duration::from_millis(50);

/// Run the scheduler until `shutdown` turns true. Each tick closes ended runs (with
/// their retention pass), then starts due ones. The full sweep (every schedule's
/// retention and every expiry) runs every `sweep_interval`. Deletions a pass deferred
/// (to spread merges) are refilled as soon as jobs change, by a pass over just the VMs
/// they belong to, so a backlog drains at the pace merges finish.
pub fn spawn(
    db: Db,
    engine: Arc<Engine>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut jobs_changed = engine.subscribe();
        let mut last_sweep = tokio::time::Instant::now();
        // VMs with deletions deferred by the last pass.
        let mut backlog: Vec<Uuid> = Vec::new();
        loop {
            let woken_by_jobs = tokio::select! {
                _ = tokio::time::sleep(settings.tick) => false,
                changed = jobs_changed.changed(), if !backlog.is_empty() => changed.is_ok(),
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let now = store::now();
            if let Err(e) = runs::finish_ended(&db, &engine, now).await {
                tracing::error!(error = %e, "closing schedule runs failed");
            }
            if let Err(e) = runs::start_due(&db, &engine, now, settings.run_history).await {
                tracing::error!(error = %e, "starting schedule runs failed");
            }
            let scope = if last_sweep.elapsed() >= settings.sweep_interval {
                last_sweep = tokio::time::Instant::now();
                Some(prune::Scope::All)
            } else if !backlog.is_empty()
                && (woken_by_jobs || jobs_changed.has_changed().unwrap_or(false))
            {
                Some(prune::Scope::Vms(&backlog))
            } else {
                None
            };
            if let Some(scope) = scope {
                jobs_changed.mark_unchanged();
                match prune::prune(&db, &engine, now, scope).await {
                    Ok(report) => {
                        let mut vms: Vec<Uuid> = report.deferred.iter().map(|e| e.vm_id).collect();
                        vms.sort();
                        vms.dedup();
                        backlog = vms;
                    }
                    Err(e) => tracing::error!(error = %e, "pruning pass failed"),
                }
            }
            if woken_by_jobs {
                tokio::time::sleep(MIN_WAKE_INTERVAL).await;
            }
        }
    })
}
