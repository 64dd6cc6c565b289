use chrono::{FixedOffset, TimeZone, Utc};
use chrono_tz::America::New_York;

use super::*;
use crate::domain::new_id;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn scheduled(text: &str) -> Candidate {
    Candidate {
        id: new_id(),
        created_at: at(text),
        scheduled: true,
        hold: false,
        expires_at: None,
    }
}

/// Ids of the candidates that stay, in input order.
fn kept<Tz: TimeZone>(
    policy: &RetentionPolicy,
    candidates: &[Candidate],
    now: &str,
    tz: &Tz,
) -> Vec<usize> {
    let decisions = evaluate(policy, candidates, at(now), tz);
    decisions
        .iter()
        .enumerate()
        .filter(|(_, (_, d))| !d.is_prune())
        .map(|(i, _)| i)
        .collect()
}

/// One snapshot every `hours` hours from `start`, `count` of them.
fn series(start: &str, hours: i64, count: usize) -> Vec<Candidate> {
    (0..count)
        .map(|i| {
            let mut c = scheduled(start);
            c.created_at += chrono::Duration::hours(hours * i as i64);
            c
        })
        .collect()
}

const NOW: &str = "2026-12-31T23:00:00Z";

#[test]
fn a_policy_without_rules_keeps_everything() {
    let snaps = series("2026-01-01T00:00:00Z", 24, 5);
    assert_eq!(
        kept(&RetentionPolicy::default(), &snaps, NOW, &Utc),
        vec![0, 1, 2, 3, 4]
    );
}

#[test]
fn keep_last_keeps_the_newest_n_whatever_the_input_order() {
    let mut snaps = series("2026-01-01T00:00:00Z", 1, 6);
    snaps.reverse(); // newest first in the input
    let policy = RetentionPolicy {
        keep_last: Some(2),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![0, 1]);
    let policy = RetentionPolicy {
        keep_last: Some(0),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), Vec::<usize>::new());
}

#[test]
fn keep_daily_keeps_the_newest_of_each_of_the_n_most_recent_days_that_have_snapshots() {
    let snaps = vec![
        scheduled("2026-03-01T08:00:00Z"),
        scheduled("2026-03-01T20:00:00Z"), // newest of Mar 1
        scheduled("2026-03-03T09:00:00Z"),
        scheduled("2026-03-03T10:00:00Z"), // newest of Mar 3
        // nothing on Mar 4: an empty day is not a period
        scheduled("2026-03-05T00:00:00Z"), // only one on Mar 5
    ];
    let policy = RetentionPolicy {
        keep_daily: Some(3),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![1, 3, 4]);
    let policy = RetentionPolicy {
        keep_daily: Some(2),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![3, 4]);
}

#[test]
fn period_edges_fall_on_the_exact_boundary() {
    let policy = RetentionPolicy {
        keep_hourly: Some(10),
        ..Default::default()
    };
    let snaps = vec![
        scheduled("2026-05-05T10:59:59Z"),
        scheduled("2026-05-05T11:00:00Z"),
        scheduled("2026-05-05T11:59:59Z"),
    ];
    assert_eq!(
        kept(&policy, &snaps, NOW, &Utc),
        vec![0, 2],
        "11:00:00 starts a new hour"
    );

    // ISO weeks start on Monday: Sunday 23:59:59 and Monday 00:00 are different weeks.
    let policy = RetentionPolicy {
        keep_weekly: Some(10),
        ..Default::default()
    };
    let snaps = vec![
        scheduled("2026-11-15T23:59:59Z"),
        scheduled("2026-11-16T00:00:00Z"),
        scheduled("2026-11-17T12:00:00Z"),
    ];
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![0, 2]);

    let policy = RetentionPolicy {
        keep_monthly: Some(10),
        ..Default::default()
    };
    let snaps = vec![
        scheduled("2026-01-31T23:59:59Z"),
        scheduled("2026-02-01T00:00:00Z"),
        scheduled("2026-02-28T00:00:00Z"),
    ];
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![0, 2]);

    let policy = RetentionPolicy {
        keep_yearly: Some(10),
        ..Default::default()
    };
    let snaps = vec![
        scheduled("2025-12-31T23:59:59Z"),
        scheduled("2026-01-01T00:00:00Z"),
        scheduled("2026-06-01T00:00:00Z"),
    ];
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![0, 2]);
}

#[test]
fn an_iso_week_spans_the_turn_of_the_year() {
    // 2026-12-31 (Thursday) and 2027-01-01 (Friday) are both in ISO week 2026-W53.
    let policy = RetentionPolicy {
        keep_weekly: Some(10),
        ..Default::default()
    };
    let snaps = vec![
        scheduled("2026-12-31T12:00:00Z"),
        scheduled("2027-01-01T12:00:00Z"),
    ];
    assert_eq!(kept(&policy, &snaps, "2027-01-02T00:00:00Z", &Utc), vec![1]);
}

#[test]
fn max_age_keeps_what_is_younger_than_the_limit() {
    let policy = RetentionPolicy {
        max_age: Some(MaxAge(7 * 86400)),
        ..Default::default()
    };
    let snaps = vec![
        scheduled("2026-12-24T22:59:59Z"), // older than 7 days
        scheduled("2026-12-24T23:00:00Z"), // exactly 7 days: no longer younger
        scheduled("2026-12-24T23:00:01Z"),
        scheduled("2026-12-31T22:00:00Z"),
    ];
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![2, 3]);
}

#[test]
fn rules_combine_and_a_snapshot_kept_by_any_rule_stays_with_every_reason() {
    // Four snapshots a day for ten days.
    let snaps = series("2026-06-01T00:00:00Z", 6, 40);
    let policy = RetentionPolicy {
        keep_last: Some(3),
        keep_daily: Some(5),
        keep_weekly: Some(2),
        ..Default::default()
    };
    let decisions = evaluate(&policy, &snaps, at(NOW), &Utc);
    let keep: Vec<usize> = decisions
        .iter()
        .enumerate()
        .filter(|(_, (_, d))| !d.is_prune())
        .map(|(i, _)| i)
        .collect();
    // last 3: 37, 38, 39; daily 5: the 18:00 of Jun 6..10 = 23, 27, 31, 35, 39;
    // weekly 2: newest of week 23 (Jun 1-7, newest Jun 7 18:00 = 27) and week 24 (39).
    assert_eq!(keep, vec![23, 27, 31, 35, 37, 38, 39]);
    assert_eq!(
        decisions[39].1,
        Decision::Keep(vec![
            KeepReason::Last,
            KeepReason::Daily,
            KeepReason::Weekly
        ])
    );
    assert_eq!(
        decisions[27].1,
        Decision::Keep(vec![KeepReason::Daily, KeepReason::Weekly])
    );
    assert_eq!(decisions[0].1, Decision::Prune(PruneReason::OutsidePolicy));
}

#[test]
fn days_are_cut_in_the_schedules_time_zone() {
    // 21:00, 22:00 and 23:30 UTC on Mar 1 are one UTC day; in UTC+2 they are 23:00 on
    // Mar 1, then 00:00 and 01:30 on Mar 2.
    let snaps = vec![
        scheduled("2026-03-01T22:00:00Z"),
        scheduled("2026-03-01T21:00:00Z"),
        scheduled("2026-03-01T23:30:00Z"),
    ];
    let policy = RetentionPolicy {
        keep_daily: Some(5),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![2]);
    let plus_two = FixedOffset::east_opt(2 * 3600).unwrap();
    assert_eq!(kept(&policy, &snaps, NOW, &plus_two), vec![1, 2]);
}

#[test]
fn the_repeated_hour_when_clocks_fall_back_is_one_hourly_period() {
    // New York, 2026-11-01: 01:30 EDT (05:30Z) and 01:30 EST (06:30Z) read the same
    // wall-clock hour, so only the later one is kept as that hour's snapshot.
    let snaps = vec![
        scheduled("2026-11-01T05:30:00Z"),
        scheduled("2026-11-01T06:30:00Z"),
        scheduled("2026-11-01T07:30:00Z"),
    ];
    let policy = RetentionPolicy {
        keep_hourly: Some(24),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &New_York), vec![1, 2]);
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![0, 1, 2]);
}

#[test]
fn the_short_day_when_clocks_spring_forward_is_still_one_daily_period() {
    // New York, 2026-03-08 has 23 hours; 00:30 EST (05:30Z) and 23:30 EDT (03:30Z next
    // day in UTC) are the same local day.
    let snaps = vec![
        scheduled("2026-03-08T05:30:00Z"),
        scheduled("2026-03-09T03:30:00Z"),
        scheduled("2026-03-09T04:30:00Z"),
    ];
    let policy = RetentionPolicy {
        keep_daily: Some(5),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &New_York), vec![1, 2]);
}

#[test]
fn expiry_prunes_even_what_a_rule_keeps_but_a_hold_wins_over_everything() {
    let mut snaps = series("2026-12-01T00:00:00Z", 24, 4);
    snaps[3].expires_at = Some(at("2026-12-30T00:00:00Z")); // newest, expired
    snaps[2].expires_at = Some(at("2027-01-30T00:00:00Z")); // not yet
    snaps[0].hold = true;
    snaps[0].expires_at = Some(at("2026-12-02T00:00:00Z")); // expired but held
    let policy = RetentionPolicy {
        keep_last: Some(2),
        ..Default::default()
    };
    let decisions = evaluate(&policy, &snaps, at(NOW), &Utc);
    assert_eq!(decisions[3].1, Decision::Prune(PruneReason::Expired));
    assert_eq!(decisions[2].1, Decision::Keep(vec![KeepReason::Last]));
    assert_eq!(
        decisions[1].1,
        Decision::Keep(vec![KeepReason::Last]),
        "the expired one takes no keep_last slot"
    );
    assert_eq!(decisions[0].1, Decision::Keep(vec![KeepReason::Hold]));
}

#[test]
fn manual_snapshots_are_never_pruned_by_a_policy_only_by_their_own_expiry() {
    let mut manual = scheduled("2020-01-01T00:00:00Z");
    manual.scheduled = false;
    let mut expired_manual = scheduled("2020-01-02T00:00:00Z");
    expired_manual.scheduled = false;
    expired_manual.expires_at = Some(at("2021-01-01T00:00:00Z"));
    let snaps = vec![manual, expired_manual, scheduled("2026-12-30T00:00:00Z")];
    let policy = RetentionPolicy {
        keep_last: Some(1),
        ..Default::default()
    };
    let decisions = evaluate(&policy, &snaps, at(NOW), &Utc);
    assert_eq!(decisions[0].1, Decision::Keep(vec![KeepReason::NotCovered]));
    assert_eq!(decisions[1].1, Decision::Prune(PruneReason::Expired));
    assert_eq!(decisions[2].1, Decision::Keep(vec![KeepReason::Last]));
}

#[test]
fn held_snapshots_still_count_for_the_rules() {
    // A hold does not shift the rules: keep_last 1 keeps the newest, held or not.
    let mut snaps = series("2026-12-01T00:00:00Z", 24, 3);
    snaps[2].hold = true;
    let policy = RetentionPolicy {
        keep_last: Some(1),
        ..Default::default()
    };
    assert_eq!(kept(&policy, &snaps, NOW, &Utc), vec![2]);
}

#[test]
fn max_age_reads_units_and_prints_the_shortest_form() {
    assert_eq!("7d".parse::<MaxAge>(), Ok(MaxAge(7 * 86400)));
    assert_eq!("1d12h".parse::<MaxAge>(), Ok(MaxAge(36 * 3600)));
    assert_eq!("2w".parse::<MaxAge>(), Ok(MaxAge(14 * 86400)));
    assert_eq!("90m".parse::<MaxAge>().unwrap().to_string(), "1h30m");
    assert_eq!(MaxAge(14 * 86400).to_string(), "14d");
    assert_eq!(MaxAge(61).to_string(), "1m1s");
    for bad in [
        "",
        "7",
        "d",
        "7x",
        "-1d",
        "0d",
        "1.5d",
        "7 d",
        "99999999999999999999d",
        "4000d",
    ] {
        assert!(bad.parse::<MaxAge>().is_err(), "{bad:?}");
    }
    let policy: RetentionPolicy =
        serde_json::from_str(r#"{"max_age":"36h","keep_daily":7}"#).unwrap();
    assert_eq!(policy.max_age, Some(MaxAge(36 * 3600)));
    assert_eq!(
        serde_json::to_value(&policy).unwrap()["max_age"],
        serde_json::json!("1d12h")
    );
}
