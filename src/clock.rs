//! The service's one notion of "now". Every timestamp it records (snapshots, jobs,
//! runs) and every time-driven decision (schedules, expiry, retention) reads this clock.
//!
//! Production reads the system clock. For tests, `--clock-file` points at a file holding
//! one RFC 3339 instant that stands still until the test writes another, so a test can
//! run a schedule across simulated days in seconds and see exactly which snapshot each
//! tick took. The flag is hidden: an operator never wants it.

use std::path::PathBuf;
use std::sync::OnceLock;

use chrono::{DateTime, SubsecRound, Utc};

static CLOCK_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Make every later `now()` read `path`. Set once at start, before any work.
pub fn use_file(path: PathBuf) {
    if CLOCK_FILE.set(path).is_err() {
        tracing::warn!("the clock was already set; keeping the first one");
    }
}

/// The current time at the precision stored (microseconds), so a record reads back
/// exactly as it was first returned.
pub fn now() -> DateTime<Utc> {
    let now = match CLOCK_FILE.get() {
        Some(path) => read_file(path).unwrap_or_else(|reason| {
            // A test clock that cannot be read is a broken test set-up; the system time
            // keeps the service working and the warning says why the test went astray.
            tracing::warn!(path = %path.display(), %reason, "clock file unreadable; using the system clock");
            Utc::now()
        }),
        None => Utc::now(),
    };
    now.trunc_subsecs(6)
}

fn read_file(path: &PathBuf) -> Result<DateTime<Utc>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{:?} is not an RFC 3339 instant: {e}", text.trim()))
}
