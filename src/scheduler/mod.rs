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

use crate::jobs::Engine;
use crate::store;

/// How often the scheduler looks at the clock and sweeps.
#[derive(Debug, Clone)]
pub struct Settings {
    pub tick: Duration,
    pub sweep_interval: Duration,
    /// Runs kept per schedule.
    pub run_history: u32,
}

/// Run the scheduler until `shutdown` turns true. Each tick closes ended runs (with
/// their retention pass), then starts due ones. The full sweep (every schedule's
/// retention and every expiry) runs every `sweep_interval`, and also as soon as jobs
/// have finished while the previous sweep left deletions deferred, so a backlog drains
/// at the pace merges finish.
pub fn spawn(
    engine: Arc<Engine>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut jobs_changed = engine.subscribe();
        let mut last_sweep = tokio::time::Instant::now();
        let mut backlog = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(settings.tick) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            let now = store::now();
            if let Err(e) = runs::finish_ended(&engine, now).await {
                tracing::error!(error = %e, "closing schedule runs failed");
            }
            if let Err(e) = runs::start_due(&engine, now, settings.run_history).await {
                tracing::error!(error = %e, "starting schedule runs failed");
            }
            let changed = jobs_changed.has_changed().unwrap_or(false);
            if last_sweep.elapsed() >= settings.sweep_interval || (backlog && changed) {
                jobs_changed.mark_unchanged();
                last_sweep = tokio::time::Instant::now();
                match prune::prune(&engine, now, None).await {
                    Ok(report) => backlog = !report.deferred.is_empty(),
                    Err(e) => tracing::error!(error = %e, "pruning sweep failed"),
                }
            }
        }
    })
}
