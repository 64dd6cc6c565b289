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

use super::Uuid;

/// Which snapshots of a schedule to keep. Every field is optional and they combine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot younger than this: a number with a unit, `s`, `m`, `h`, `d`
    /// or `w`, or several of them (`7d`, `36h`, `1d12h`).
    pub max_age: Option<MaxAge>,
}

/// A retention age limit, written like `7d` or `1d12h` and kept in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAge(pub u64);

const AGE_UNITS: &[(char, u64)] = &[
    ('w', 604_800),
    ('d', 86_400),
    ('h', 3_600),
    ('m', 60),
    ('s', 1),
];

/// Ten years: anything longer is a typo, not a policy.
const MAX_AGE_LIMIT: u64 = 10 * 366 * 86_400;

impl std::str::FromStr for MaxAge {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "max_age {text:?} must be a number with a unit (s, m, h, d, w), like 7d or 1d12h"
            )
        };
        let mut total: u64 = 0;
        let mut digits = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let (_, unit) = AGE_UNITS.iter().find(|(u, _)| *u == c).ok_or_else(bad)?;
            let count: u64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            total = count
                .checked_mul(*unit)
                .and_then(|s| total.checked_add(s))
                .ok_or_else(bad)?;
        }
        if !digits.is_empty() || total == 0 {
            return Err(bad());
        }
        if total > MAX_AGE_LIMIT {
            return Err(format!("max_age {text:?} is longer than ten years"));
        }
        Ok(MaxAge(total))
    }
}

impl std::fmt::Display for MaxAge {
    /// The shortest spelling in whole units: `7d` rather than `1w`, `90m` as `1h30m`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        for (unit, seconds) in AGE_UNITS.iter().skip(1) {
            if rest >= *seconds {
                write!(f, "{}{unit}", rest / seconds)?;
                rest %= seconds;
            }
        }
        Ok(())
    }
}

impl Serialize for MaxAge {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MaxAge {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
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

string_enum!(
    /// Why a snapshot stays.
    KeepReason derives(PartialOrd, Ord) {
        Hold => "hold",
        Last => "last",
        Hourly => "hourly",
        Daily => "daily",
        Weekly => "weekly",
        Monthly => "monthly",
        Yearly => "yearly",
        MaxAge => "max_age",
        /// The policy has no rule, or the snapshot is not the schedule's own.
        NotCovered => "not_covered",
    }
);

string_enum!(
    /// Why a snapshot goes.
    PruneReason {
        Expired => "expired",
        /// No rule of the policy keeps it.
        OutsidePolicy => "outside_policy",
    }
);

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
    if let Some(MaxAge(max_age)) = policy.max_age {
        // Bounded by MAX_AGE_LIMIT, so the conversion cannot overflow.
        let cutoff = now - chrono::Duration::seconds(max_age as i64);
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
