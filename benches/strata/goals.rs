//! Issue 13's goals in one table: each goal's measured figure beside its target and
//! whether it is met, so that one glance at the top of a run says where the service
//! stands. The parts that measure them each give their rows (`goals` functions).
//!
//! A goal missed is listed under the table but is not one of the run's problems: the
//! bench exits non-zero for misbehaviour (a failed job, lost data, a wrong answer), as
//! it always has, not for a target the service has yet to reach.

use std::fmt::Write as _;
use std::time::Duration;

use super::ms;

pub struct Goal {
    what: String,
    measured: String,
    target: String,
    met: bool,
}

impl Goal {
    /// A ratio that must reach `target` (throughput against a ceiling).
    pub fn at_least(what: impl Into<String>, ratio: f64, target: f64) -> Self {
        Self {
            what: what.into(),
            measured: format!("{ratio:.2}"),
            target: format!("≥ {target}"),
            // A NaN (nothing measured) compares false: not met.
            met: ratio >= target,
        }
    }

    /// A ratio that must stay at or under `target` (time against a baseline).
    pub fn at_most(what: impl Into<String>, ratio: f64, target: f64) -> Self {
        Self {
            what: what.into(),
            measured: format!("{ratio:.2}"),
            target: format!("≤ {target}"),
            met: ratio <= target,
        }
    }

    /// A time that must stay under `target`.
    pub fn under(what: impl Into<String>, time: Duration, target: Duration) -> Self {
        Self {
            what: what.into(),
            measured: ms(time),
            target: format!("< {}", ms(target)),
            met: time < target,
        }
    }
}

/// The "Goals (issue 13)" table, then the goals missed (if any).
pub fn table(goals: &[Goal]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### Goals (issue 13)\n");
    let _ = writeln!(s, "| goal | measured | target | met |");
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    for goal in goals {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            goal.what,
            goal.measured,
            goal.target,
            if goal.met { "yes" } else { "**no**" }
        );
    }
    let missed: Vec<&Goal> = goals.iter().filter(|g| !g.met).collect();
    if missed.is_empty() {
        let _ = writeln!(s, "\nEvery goal measured in this run is met.");
    } else {
        let _ = writeln!(
            s,
            "\n{} of {} goals not met in this run (details in the sections below):\n",
            missed.len(),
            goals.len()
        );
        for goal in missed {
            let _ = writeln!(
                s,
                "- {}: {} (target {})",
                goal.what, goal.measured, goal.target
            );
        }
    }
    s
}
