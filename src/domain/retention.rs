//! Retention rules for scheduled snapshots (grandfather-father-son), pure and
//! timezone-aware. Given a schedule's snapshots, the policy and the current time, decide
//! which snapshots stay and which are pruned, with the reason for each, so operators can
//! preview the result before anything is deleted.
//!
//! Semantics (as in restic's `forget` and Proxmox VE's prune):
//! - `keep_last`: the N newest snapshots.
//! - `keep_hourly` .. `keep_yearly`: for each period (hour, day, ISO week, month, year,
//!   in the schedule's time zone) the newest snapshot in it, for the N most recent
//!   periods that contain a snapshot. Periods without snapshots do not count.
//! - `max_age`: every snapshot younger than this.
//! - Rules are independent: a snapshot kept by any rule stays. A policy with no rule
//!   keeps everything.
//! - A snapshot past its `expires_at` is pruned (the expiry was set explicitly) and takes
//!   no slot from the rules, unless it is on hold; a snapshot on hold is never pruned
//!   and counts for the rules like any other.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Uuid;

/// Which snapshots of a schedule to keep. Every field is optional and they combine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot younger than this many seconds.
    pub max_age_seconds: Option<u64>,
}

impl RetentionPolicy {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One snapshot as the policy sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    /// Made by the schedule whose policy this is (manual snapshots only expire).
    pub scheduled: bool,
    pub hold: bool,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Why a snapshot stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    Hold,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    MaxAge,
    /// The policy has no rule, or the snapshot is not the schedule's own.
    NotCovered,
}

/// Why a snapshot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneReason {
    Expired,
    /// No rule of the policy keeps it.
    OutsidePolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Keep(Vec<KeepReason>),
    Prune(PruneReason),
}

impl Decision {
    pub fn is_prune(&self) -> bool {
        matches!(self, Decision::Prune(_))
    }
}

/// The period a local time falls in, for each calendar rule.
fn period_key<Tz: TimeZone>(
    at: DateTime<Utc>,
    tz: &Tz,
    reason: KeepReason,
) -> (i32, u32, u32, u32) {
    // Local wall-clock time: when clocks fall back, the repeated hour is one period.
    let local = at.with_timezone(tz).naive_local();
    match reason {
        KeepReason::Hourly => (local.year(), local.ordinal(), local.hour(), 0),
        KeepReason::Daily => (local.year(), local.ordinal(), 0, 0),
        KeepReason::Weekly => {
            let week = local.iso_week();
            (week.year(), week.week(), 0, 0)
        }
        KeepReason::Monthly => (local.year(), local.month(), 0, 0),
        KeepReason::Yearly => (local.year(), 0, 0, 0),
        _ => unreachable!("not a calendar rule"),
    }
}

/// Decide for every candidate, in the order given. `now` is the evaluation time.
pub fn evaluate<Tz: TimeZone>(
    policy: &RetentionPolicy,
    candidates: &[Candidate],
    now: DateTime<Utc>,
    tz: &Tz,
) -> Vec<(Uuid, Decision)> {
    let expired = |c: &Candidate| !c.hold && c.expires_at.is_some_and(|at| at <= now);
    // Expired snapshots go anyway, so they take no slot from the rules ("keep the last 3"
    // leaves 3). Newest first; ties broken by id (UUIDv7) so the result is stable.
    let mut scheduled: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.scheduled && !expired(c))
        .collect();
    scheduled.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));

    let mut kept: Vec<(Uuid, KeepReason)> = Vec::new();
    if let Some(n) = policy.keep_last {
        kept.extend(
            scheduled
                .iter()
                .take(n as usize)
                .map(|c| (c.id, KeepReason::Last)),
        );
    }
    let calendar = [
        (policy.keep_hourly, KeepReason::Hourly),
        (policy.keep_daily, KeepReason::Daily),
        (policy.keep_weekly, KeepReason::Weekly),
        (policy.keep_monthly, KeepReason::Monthly),
        (policy.keep_yearly, KeepReason::Yearly),
    ];
    for (count, reason) in calendar {
        let Some(count) = count else { continue };
        let mut seen = BTreeSet::new();
        for candidate in &scheduled {
            if seen.len() == count as usize {
                break;
            }
            // The first (newest) snapshot met in a period is the one that period keeps.
            if seen.insert(period_key(candidate.created_at, tz, reason)) {
                kept.push((candidate.id, reason));
            }
        }
    }
    if let Some(max_age) = policy.max_age_seconds {
        let cutoff =
            now - chrono::Duration::seconds(i64::try_from(max_age).unwrap_or(i64::MAX / 1000));
        kept.extend(
            scheduled
                .iter()
                .filter(|c| c.created_at > cutoff)
                .map(|c| (c.id, KeepReason::MaxAge)),
        );
    }

    candidates
        .iter()
        .map(|candidate| {
            let decision = if candidate.hold {
                Decision::Keep(vec![KeepReason::Hold])
            } else if expired(candidate) {
                Decision::Prune(PruneReason::Expired)
            } else if !candidate.scheduled || policy.is_empty() {
                Decision::Keep(vec![KeepReason::NotCovered])
            } else {
                let mut reasons: Vec<KeepReason> = kept
                    .iter()
                    .filter(|(id, _)| *id == candidate.id)
                    .map(|(_, r)| *r)
                    .collect();
                reasons.sort();
                reasons.dedup();
                if reasons.is_empty() {
                    Decision::Prune(PruneReason::OutsidePolicy)
                } else {
                    Decision::Keep(reasons)
                }
            };
            (candidate.id, decision)
        })
        .collect()
}

#[cfg(test)]
mod tests;
