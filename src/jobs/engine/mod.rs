//! The engine's machinery, by concern: `worker` (the worker loop, claiming, recovery
//! at start, resuming after a failed journal write), `drive` (driving one job through
//! its plan and journal: plan, steps, commit, stop, park), `execute` (one file
//! operation, with its retries), `progress` (a step's progress, in memory and in the
//! job's row), `live` (the steps that work on a running
//! VM's QEMU), `live_merge` (merges done by a running VM's QEMU), `live_copy` (full
//! clones copied by it) and `fault` (test-only crash points).
//! The `Engine` type and what the rest of the service calls live in `jobs`.

mod drive;
mod execute;
mod fault;
mod live;
mod live_copy;
mod live_merge;
mod progress;
mod worker;

use crate::domain::{Job, JobStatus};
use crate::error::Error;

/// How a job ended early.
enum Stop {
    Cancelled,
    Failed(Error),
    /// Past its point of no return, out of space: it waits (parked) and goes on later.
    Parked(Error),
    /// The step of no return did nothing (QEMU refused the switch, or a required
    /// freeze failed before it was sent): the job fails, undone as if it had stopped
    /// before that step.
    Undone(Error),
}

/// A stop as the journal records it: the final status and, for a failure, its code
/// and message.
struct Outcome {
    status: JobStatus,
    error: Option<(String, String)>,
}

impl Outcome {
    fn of(job: &Job, stop: Stop) -> Self {
        match stop {
            Stop::Cancelled => Self {
                status: JobStatus::Cancelled,
                error: None,
            },
            Stop::Failed(e) | Stop::Parked(e) | Stop::Undone(e) => {
                if e.code().status().is_server_error() {
                    tracing::error!(job = %job.id, kind = %job.kind, error = %e, "job failed");
                } else {
                    tracing::info!(job = %job.id, kind = %job.kind, error = %e, "job refused");
                }
                Self {
                    status: JobStatus::Failed,
                    error: Some((e.code().as_str().to_owned(), e.to_string())),
                }
            }
        }
    }

    /// What a job journaled as stopping ends with.
    fn recorded(job: &Job) -> Self {
        match &job.error_code {
            Some(code) => Self {
                status: JobStatus::Failed,
                error: Some((code.clone(), job.error_message.clone().unwrap_or_default())),
            },
            None => Self {
                status: JobStatus::Cancelled,
                error: None,
            },
        }
    }

    fn error_pair(&self) -> Option<(&str, &str)> {
        self.error.as_ref().map(|(c, m)| (c.as_str(), m.as_str()))
    }
}
