//! Input rules shared by every endpoint. Each returns a message fit for a problem answer.

/// Longest accepted name, in characters.
pub const MAX_NAME_LEN: usize = 128;
/// Longest accepted description, in characters.
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// Disk sizes must be whole sectors: qemu rounds anything else and the guest would
/// see a different size from the one asked for.
pub const SECTOR: u64 = 512;

/// Names are shown in UIs and used in file-free contexts only, but must be printable,
/// non-empty and short so that lists and logs stay readable.
pub fn name(field: &str, value: &str) -> Result<(), String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if trimmed.len() != value.len() {
        return Err(format!("{field} must not start or end with white space"));
    }
    if value.chars().count() > MAX_NAME_LEN {
        return Err(format!("{field} must be at most {MAX_NAME_LEN} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(())
}

pub fn description(value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(format!(
            "description must be at most {MAX_DESCRIPTION_LEN} characters"
        ));
    }
    Ok(())
}

/// A disk size: positive, whole sectors, not above the operator's cap.
pub fn disk_size(value: u64, max: u64) -> Result<(), String> {
    if value == 0 {
        return Err("size_bytes must be greater than zero".into());
    }
    if !value.is_multiple_of(SECTOR) {
        return Err(format!("size_bytes must be a multiple of {SECTOR}"));
    }
    if value > max {
        return Err(format!(
            "size_bytes must be at most {max} (the configured maximum disk size)"
        ));
    }
    Ok(())
}

/// Most labels a VM may carry.
pub const MAX_LABELS: usize = 64;

/// Label keys and values follow the Kubernetes shape (letters, digits, `-`, `_`, `.`,
/// and `/` in keys, at most 63 characters; values may be empty), so they can be passed
/// through to orchestrators unchanged and written in `k=v` selectors unambiguously.
pub fn labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels"));
    }
    let allowed = |c: char, slash: bool| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (slash && c == '/')
    };
    for (key, value) in labels {
        if key.is_empty() || key.len() > 63 || !key.chars().all(|c| allowed(c, true)) {
            return Err(format!(
                "label key {key:?} must be 1-63 characters of letters, digits, '-', '_', '.', '/'"
            ));
        }
        if value.len() > 63 || !value.chars().all(|c| allowed(c, false)) {
            return Err(format!(
                "label value {value:?} of {key} must be at most 63 characters of letters, digits, '-', '_', '.'"
            ));
        }
    }
    Ok(())
}

/// A label selector `key=value` (as in `GET /v1/vms?label=`), split and checked.
pub fn selector(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("selector {text:?} must be written key=value"))?;
    labels(&[(key.to_owned(), value.to_owned())].into())?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Most snapshots a retention rule may keep: far above any real policy, low enough that
/// a typo (an extra zero or two) is caught.
pub const MAX_RETENTION_COUNT: u32 = 100_000;

pub fn retention(policy: &super::retention::RetentionPolicy) -> Result<(), String> {
    let counts = [
        ("keep_last", policy.keep_last),
        ("keep_hourly", policy.keep_hourly),
        ("keep_daily", policy.keep_daily),
        ("keep_weekly", policy.keep_weekly),
        ("keep_monthly", policy.keep_monthly),
        ("keep_yearly", policy.keep_yearly),
    ];
    for (field, count) in counts {
        match count {
            Some(0) => {
                return Err(format!(
                    "retention.{field} must be at least 1; leave it out to not use the rule"
                ));
            }
            Some(n) if n > MAX_RETENTION_COUNT => {
                return Err(format!(
                    "retention.{field} must be at most {MAX_RETENTION_COUNT}"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_printable_trimmed_and_short() {
        assert!(name("name", "web-01").is_ok());
        assert!(name("name", "").is_err());
        assert!(name("name", "  ").is_err());
        assert!(name("name", " web").is_err());
        assert!(name("name", "a\nb").is_err());
        assert!(name("name", &"x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(name("name", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn labels_have_a_kubernetes_like_shape() {
        let ok: std::collections::BTreeMap<String, String> = [
            ("tier".into(), "web".into()),
            ("example.com/team".into(), "".into()),
        ]
        .into();
        assert!(labels(&ok).is_ok());
        for (k, v) in [
            ("", "x"),
            ("a=b", "x"),
            ("k", "a b"),
            ("k", "a/b"),
            (&"k".repeat(64) as &str, "x"),
        ] {
            let bad: std::collections::BTreeMap<String, String> =
                [(k.to_owned(), v.to_owned())].into();
            assert!(labels(&bad).is_err(), "{k:?}={v:?}");
        }
    }

    #[test]
    fn selectors_are_one_label_written_key_equals_value() {
        assert_eq!(selector("tier=web"), Ok(("tier".into(), "web".into())));
        assert_eq!(selector("team="), Ok(("team".into(), "".into())));
        for bad in ["tier", "=web", "tier=a=b", "tier=a b", ""] {
            assert!(selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retention_counts_are_positive_and_bounded() {
        use super::super::retention::RetentionPolicy;
        let ok = RetentionPolicy {
            keep_last: Some(1),
            keep_daily: Some(MAX_RETENTION_COUNT),
            ..Default::default()
        };
        assert!(retention(&ok).is_ok());
        assert!(retention(&RetentionPolicy::default()).is_ok());
        let zero = RetentionPolicy {
            keep_weekly: Some(0),
            ..Default::default()
        };
        assert!(retention(&zero).unwrap_err().contains("keep_weekly"));
        let huge = RetentionPolicy {
            keep_last: Some(MAX_RETENTION_COUNT + 1),
            ..Default::default()
        };
        assert!(retention(&huge).is_err());
    }

    #[test]
    fn sizes_must_be_positive_sector_multiples_under_the_cap() {
        assert!(disk_size(1 << 20, 1 << 30).is_ok());
        assert!(disk_size(0, 1 << 30).is_err());
        assert!(disk_size(1000, 1 << 30).is_err());
        assert!(disk_size(2 << 30, 1 << 30).is_err());
        assert!(disk_size(1 << 30, 1 << 30).is_ok());
    }
}
