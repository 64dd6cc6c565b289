//! Test-only crash and pause points (`--fault`, `STRATA_FAULT`).

use std::time::Duration;

use super::super::Engine;
use crate::domain::{Job, Uuid};

impl Engine {
    /// Deterministic fault injection for recovery tests: `STRATA_FAULT=<kind>:<point>`
    /// aborts the process (no cleanup, like kill -9) when a job of that kind reaches the
    /// point; `<kind>:<point>:pause[=MS]` holds the job there (two seconds by default)
    /// instead, so a test can act while it runs.
    pub(super) async fn fault_point(&self, job: &Job, point: &str) {
        self.fault_at(job.kind.as_str(), job.id, point).await;
    }

    /// A point inside a live step (`live:<point>`), whatever the job's kind: between
    /// two QMP commands, where no journal entry marks the instant.
    pub(super) async fn live_fault_point(&self, job: Uuid, point: &str) {
        self.fault_at("live", job, point).await;
    }

    async fn fault_at(&self, kind: &str, job: Uuid, point: &str) {
        let Some(fault) = &self.config.fault else {
            return;
        };
        let mut parts = fault.split(':');
        if parts.next() != Some(kind) || parts.next() != Some(point) {
            return;
        }
        if let Some(pause) = parts.next().and_then(|action| action.strip_prefix("pause")) {
            let millis = pause
                .strip_prefix('=')
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(2000);
            tokio::time::sleep(Duration::from_millis(millis)).await;
        } else {
            tracing::warn!(%job, point, "fault injection: aborting");
            std::process::abort();
        }
    }
}
