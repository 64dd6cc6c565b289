//! Schedule rules, pure: parsing 5-field cron expressions (and the `@hourly`-style
//! shortcuts) in a time zone, finding the next run, collapsing missed runs into one, and
//! naming the snapshots a run takes.

use std::str::FromStr;

use chrono::{DateTime, FixedOffset, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// Shortcuts accepted besides 5-field expressions.
const SHORTCUTS: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// Default snapshot name: `auto-YYYYMMDD-HHMMSS` in the schedule's time zone.
pub const DEFAULT_NAME_TEMPLATE: &str = "auto-%Y%m%d-%H%M%S";

/// A parsed cron expression with the zone its fields are read in.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    tz: Tz,
}

impl CronSpec {
    /// Parse `expression` (5 fields: minute hour day-of-month month day-of-week, or a
    /// shortcut) in the IANA zone `timezone`.
    pub fn parse(expression: &str, timezone: &str) -> Result<Self, String> {
        let tz = Tz::from_str(timezone).map_err(|_| {
            format!("unknown time zone {timezone:?} (use an IANA name like Europe/Paris)")
        })?;
        let trimmed = expression.trim();
        if trimmed.starts_with('@') {
            if !SHORTCUTS.contains(&trimmed.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "unknown shortcut {trimmed:?}; use one of {}",
                    SHORTCUTS.join(", ")
                ));
            }
        } else if trimmed.split_whitespace().count() != 5 {
            return Err(format!(
                "cron expression {trimmed:?} must have 5 fields: minute hour day-of-month month day-of-week"
            ));
        }
        let cron = Cron::from_str(trimmed)
            .map_err(|e| format!("invalid cron expression {trimmed:?}: {e}"))?;
        Ok(Self { cron, tz })
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The next `count` runs after `after`, in the schedule's time zone (each with the
    /// zone's offset on that day, so a daylight-saving change shows).
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<FixedOffset>> {
        let mut runs = Vec::with_capacity(count);
        let mut from = after;
        while runs.len() < count {
            let Some(next) = self.next_after(from) else {
                break;
            };
            runs.push(next.with_timezone(&self.tz).fixed_offset());
            from = next;
        }
        runs
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Whether a schedule whose next run was due at `next_run_at` runs at `now`, and when
/// it runs after that. However many runs were missed (the service was down), the
/// schedule runs once and then continues from `now`, never catching up tick by tick.
pub fn advance(
    spec: &CronSpec,
    next_run_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (bool, Option<DateTime<Utc>>) {
    if next_run_at > now {
        (false, Some(next_run_at))
    } else {
        (true, spec.next_after(now))
    }
}

/// Check a name template: chrono strftime fields plus `{vm}` and `{schedule}`.
pub fn validate_template(template: &str) -> Result<(), String> {
    if template.trim().is_empty() {
        return Err("name_template must not be empty".into());
    }
    let items: Vec<_> = chrono::format::StrftimeItems::new(template).collect();
    if items
        .iter()
        .any(|i| matches!(i, chrono::format::Item::Error))
    {
        return Err(format!("name_template {template:?} has an invalid % field"));
    }
    Ok(())
}

/// The snapshot name for a run at `at` (local time of `tz`).
pub fn render_name(template: &str, at: DateTime<Utc>, tz: Tz, vm: &str, schedule: &str) -> String {
    // Names are text, not format fields: a `%` in a VM's name must come out as itself.
    let literal = |name: &str| name.replace('%', "%%");
    let filled = template
        .replace("{vm}", &literal(vm))
        .replace("{schedule}", &literal(schedule));
    let mut name = String::new();
    // The template was validated on write; a failure here can only come from a field
    // chrono cannot print, and then the template is used as written.
    if std::fmt::Write::write_fmt(
        &mut name,
        format_args!("{}", at.with_timezone(&tz).format(&filled)),
    )
    .is_err()
    {
        return filled;
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn five_field_expressions_and_shortcuts_parse_and_others_are_refused() {
        for ok in [
            "*/15 * * * *",
            "0 3 * * 1-5",
            "@hourly",
            "@daily",
            "@Weekly",
        ] {
            assert!(CronSpec::parse(ok, "UTC").is_ok(), "{ok}");
        }
        for bad in [
            "",
            "* * * *",
            "0 0 3 * * *",
            "61 * * * *",
            "@every5m",
            "0 25 * * *",
        ] {
            assert!(CronSpec::parse(bad, "UTC").is_err(), "{bad}");
        }
        assert!(CronSpec::parse("@daily", "Mars/Olympus").is_err());
    }

    #[test]
    fn upcoming_runs_are_in_the_zone_with_its_offset_of_the_day() {
        // Paris leaves summer time on 2026-10-25: 03:00 is +02:00 before, +01:00 after.
        let paris = CronSpec::parse("0 3 * * *", "Europe/Paris").unwrap();
        let after = "2026-10-23T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let runs: Vec<String> = paris
            .upcoming(after, 3)
            .iter()
            .map(|t| t.to_rfc3339())
            .collect();
        assert_eq!(
            runs,
            [
                "2026-10-24T03:00:00+02:00",
                "2026-10-25T03:00:00+01:00",
                "2026-10-26T03:00:00+01:00"
            ]
        );
    }

    #[test]
    fn the_next_run_follows_the_expression_in_its_time_zone() {
        let daily_3am = CronSpec::parse("0 3 * * *", "UTC").unwrap();
        assert_eq!(
            daily_3am.next_after(at("2026-05-01T02:59:00Z")),
            Some(at("2026-05-01T03:00:00Z"))
        );
        assert_eq!(
            daily_3am.next_after(at("2026-05-01T03:00:00Z")),
            Some(at("2026-05-02T03:00:00Z")),
            "strictly after"
        );
        let paris = CronSpec::parse("0 3 * * *", "Europe/Paris").unwrap();
        assert_eq!(
            paris.next_after(at("2026-05-01T00:00:00Z")),
            Some(at("2026-05-01T01:00:00Z")),
            "03:00 CEST"
        );
        let hourly = CronSpec::parse("@hourly", "UTC").unwrap();
        assert_eq!(
            hourly.next_after(at("2026-05-01T10:20:00Z")),
            Some(at("2026-05-01T11:00:00Z"))
        );
    }

    #[test]
    fn a_run_in_the_skipped_hour_of_a_dst_change_is_not_lost_for_ever() {
        // New York springs forward on 2026-03-08: 02:30 does not exist that day.
        let spec = CronSpec::parse("30 2 * * *", "America/New_York").unwrap();
        let next = spec.next_after(at("2026-03-08T05:00:00Z")).unwrap();
        assert!(
            next > at("2026-03-08T05:00:00Z") && next <= at("2026-03-09T07:30:00Z"),
            "{next}"
        );
    }

    #[test]
    fn missed_runs_collapse_into_one_and_the_schedule_continues_from_now() {
        let hourly = CronSpec::parse("@hourly", "UTC").unwrap();
        // Due at 10:00, the service comes back at 15:42: one run now, next at 16:00.
        assert_eq!(
            advance(
                &hourly,
                at("2026-05-01T10:00:00Z"),
                at("2026-05-01T15:42:00Z")
            ),
            (true, Some(at("2026-05-01T16:00:00Z")))
        );
        assert_eq!(
            advance(
                &hourly,
                at("2026-05-01T16:00:00Z"),
                at("2026-05-01T15:42:00Z")
            ),
            (false, Some(at("2026-05-01T16:00:00Z")))
        );
        assert_eq!(
            advance(
                &hourly,
                at("2026-05-01T16:00:00Z"),
                at("2026-05-01T16:00:00Z")
            ),
            (true, Some(at("2026-05-01T17:00:00Z")))
        );
    }

    #[test]
    fn snapshot_names_come_from_the_template_in_local_time() {
        let t = at("2026-07-04T21:05:09Z");
        assert_eq!(
            render_name(DEFAULT_NAME_TEMPLATE, t, Tz::UTC, "web", "nightly"),
            "auto-20260704-210509"
        );
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        assert_eq!(
            render_name("{schedule}-{vm}-%Y-%m-%dT%H%M", t, tokyo, "web", "nightly"),
            "nightly-web-2026-07-05T0605"
        );
        assert_eq!(
            render_name("{vm}-%H", t, Tz::UTC, "100%done-%Y", "s"),
            "100%done-%Y-21"
        );
        assert!(validate_template("snap-%Q").is_err());
        assert!(validate_template(" ").is_err());
        assert!(validate_template("keep-%Y").is_ok());
    }
}
