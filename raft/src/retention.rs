//! Retention policies: which snapshots of a dataset a policy keeps.
//!
//! [`expired`] is a pure function of a dataset's history, its policy and
//! the time: the leader's expiry pass proposes deletion of what it returns,
//! and it is tested with made-up histories.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::state::SnapshotEntry;

/// What a dataset keeps. A snapshot is kept when any rule keeps it; the
/// head is always kept. All zero keeps everything (no policy).
///
/// The period rules follow restic's `forget`: `daily: 7` keeps the newest
/// snapshot of each of the 7 most recent UTC days that have a snapshot
/// (days without one do not count), `weekly` ISO weeks (Monday to Sunday),
/// `monthly` calendar months.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// The newest N snapshots.
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    /// Every snapshot younger than this many milliseconds.
    pub keep_within_ms: i64,
}

impl Retention {
    /// Whether the policy keeps everything.
    pub fn keeps_all(&self) -> bool {
        *self == Retention::default()
    }

    /// Whether the values make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_within_ms < 0 {
            return Err("keep_within must not be negative".into());
        }
        Ok(())
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.keeps_all() {
            return write!(f, "keep everything");
        }
        let mut parts = Vec::new();
        for (n, what) in [
            (self.keep_last, "last"),
            (self.keep_daily, "daily"),
            (self.keep_weekly, "weekly"),
            (self.keep_monthly, "monthly"),
        ] {
            if n > 0 {
                parts.push(format!("{what} {n}"));
            }
        }
        if self.keep_within_ms > 0 {
            parts.push(format!("within {}s", self.keep_within_ms / 1000));
        }
        write!(f, "keep {}", parts.join(", "))
    }
}

const DAY_MS: i64 = 86_400_000;

/// The UTC day of a time (days since 1970-01-01).
fn day(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// The ISO week (Monday first) of a time, as a number that grows by one a
/// week: 1970-01-01 was a Thursday.
fn week(ms: i64) -> i64 {
    (day(ms) + 3).div_euclid(7)
}

/// The calendar month of a time as `year * 12 + month - 1` (civil from
/// days, after Howard Hinnant's algorithm).
fn month(ms: i64) -> i64 {
    let z = day(ms) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    y * 12 + m - 1
}

/// The snapshots of `history` (oldest first, as the state keeps it) that
/// `policy` no longer keeps at `now_ms`, oldest first. `head` and the ids
/// in `pinned` (snapshots a job still reads) are always kept.
pub fn expired(
    history: &[SnapshotEntry],
    policy: &Retention,
    head: &str,
    pinned: &BTreeSet<String>,
    now_ms: i64,
) -> Vec<String> {
    if policy.keeps_all() {
        return Vec::new();
    }
    // Newest first; ties in time keep history order (later is newer).
    let mut order: Vec<usize> = (0..history.len()).collect();
    order.sort_by_key(|&i| {
        (
            std::cmp::Reverse(history[i].created_unix_ms),
            std::cmp::Reverse(i),
        )
    });
    let mut keep = vec![false; history.len()];
    for (rank, &i) in order.iter().enumerate() {
        let s = &history[i];
        if rank < policy.keep_last as usize
            || s.id == head
            || pinned.contains(&s.id)
            || (policy.keep_within_ms > 0 && now_ms - s.created_unix_ms < policy.keep_within_ms)
        {
            keep[i] = true;
        }
    }
    for (n, period) in [
        (policy.keep_daily, day as fn(i64) -> i64),
        (policy.keep_weekly, week),
        (policy.keep_monthly, month),
    ] {
        let mut last = None;
        let mut left = n;
        for &i in &order {
            if left == 0 {
                break;
            }
            let p = period(history[i].created_unix_ms);
            // The first (newest) snapshot seen of each period is its keeper.
            if last != Some(p) {
                keep[i] = true;
                last = Some(p);
                left -= 1;
            }
        }
    }
    history
        .iter()
        .zip(keep)
        .filter(|(_, k)| !k)
        .map(|(s, _)| s.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    /// 2026-12-03T00:00:00Z, a Thursday.
    const T0: i64 = 1_796_256_000_000;

    fn history(times: &[i64]) -> Vec<SnapshotEntry> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| SnapshotEntry {
                id: format!("s{i}"),
                created_unix_ms: t,
                ..Default::default()
            })
            .collect()
    }

    fn kept(h: &[SnapshotEntry], p: &Retention, now: i64) -> Vec<String> {
        let head = h.last().map(|s| s.id.clone()).unwrap_or_default();
        let gone: BTreeSet<String> = expired(h, p, &head, &BTreeSet::new(), now)
            .into_iter()
            .collect();
        h.iter()
            .filter(|s| !gone.contains(&s.id))
            .map(|s| s.id.clone())
            .collect()
    }

    #[test]
    fn calendar_periods_are_utc_days_iso_weeks_and_months() {
        assert_eq!(month(0), 1970 * 12);
        assert_eq!(month(T0), 2026 * 12 + 11);
        assert_eq!(
            month(T0 - 2 * 24 * HOUR - 1),
            2026 * 12 + 10,
            "2026-11-30T23:59:59.999"
        );
        assert_eq!(month(T0 - 2 * 24 * HOUR), 2026 * 12 + 11, "2026-12-01");
        assert_eq!(month(951_782_400_000), 2000 * 12 + 1, "2000-02-29");
        assert_eq!(month(-1), 1969 * 12 + 11, "before the epoch");
        // Thursday 3 December and Sunday 6 December are one week, Monday
        // 7 December the next.
        assert_eq!(week(T0), week(T0 + 3 * 24 * HOUR + 23 * HOUR));
        assert_eq!(week(T0) + 1, week(T0 + 4 * 24 * HOUR));
        assert_eq!(day(T0 + 23 * HOUR), day(T0));
    }

    #[test]
    fn no_policy_keeps_everything_and_the_head_is_always_kept() {
        let h = history(&[T0, T0 + HOUR, T0 + 2 * HOUR]);
        assert_eq!(kept(&h, &Retention::default(), T0 + 1000 * HOUR).len(), 3);
        // keep_last 1 keeps the newest, which is the head here...
        let last1 = Retention {
            keep_last: 1,
            ..Default::default()
        };
        assert_eq!(kept(&h, &last1, T0), ["s2"]);
        // ...and the head is kept even when it is not the newest (it moved
        // back after a deletion) and no rule names it.
        let gone = expired(&h, &last1, "s0", &BTreeSet::new(), T0);
        assert_eq!(gone, ["s1"]);
    }

    #[test]
    fn keep_last_and_within() {
        let h = history(&(0..10).map(|i| T0 + i * HOUR).collect::<Vec<_>>());
        let p = Retention {
            keep_last: 3,
            ..Default::default()
        };
        assert_eq!(kept(&h, &p, T0 + 100 * HOUR), ["s7", "s8", "s9"]);
        let p = Retention {
            keep_within_ms: 4 * HOUR,
            ..Default::default()
        };
        // Now is 12 h after s0: s9 (3 h old) and s8 (4 h old: not within) ...
        assert_eq!(kept(&h, &p, T0 + 12 * HOUR), ["s9"]);
        assert_eq!(kept(&h, &p, T0 + 11 * HOUR), ["s8", "s9"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_with_a_snapshot() {
        // Three a day for five days, then a gap of three days, then two days.
        let mut times = Vec::new();
        for d in [0, 1, 2, 3, 4, 8, 9] {
            for h in [1, 9, 17] {
                times.push(T0 + d * 24 * HOUR + h * HOUR);
            }
        }
        let h = history(&times);
        let p = Retention {
            keep_daily: 4,
            ..Default::default()
        };
        // Days 9, 8, 4 and 3 (the empty days 5-7 do not count), each its
        // 17:00 snapshot.
        assert_eq!(kept(&h, &p, T0 + 1000 * HOUR), ["s11", "s14", "s17", "s20"]);
    }

    #[test]
    fn weekly_and_monthly_and_rules_together() {
        // One snapshot a day at noon for 70 days from Thursday 3 December.
        let times: Vec<i64> = (0..70).map(|d| T0 + d * 24 * HOUR + 12 * HOUR).collect();
        let h = history(&times);
        let weekly = Retention {
            keep_weekly: 3,
            ..Default::default()
        };
        // Day 69 is Wednesday 10 February; the weeks before it end on
        // Sundays: days 66 and 59.
        assert_eq!(
            kept(&h, &weekly, T0 + 100 * 24 * HOUR),
            ["s59", "s66", "s69"]
        );
        let monthly = Retention {
            keep_monthly: 3,
            ..Default::default()
        };
        // February 2027 (day 69 is 10 Feb), January (its 31st is day 59),
        // December (its 31st is day 28).
        assert_eq!(
            kept(&h, &monthly, T0 + 100 * 24 * HOUR),
            ["s28", "s59", "s69"]
        );
        let both = Retention {
            keep_last: 2,
            keep_monthly: 2,
            ..Default::default()
        };
        assert_eq!(kept(&h, &both, T0 + 100 * 24 * HOUR), ["s59", "s68", "s69"]);
    }

    #[test]
    fn pinned_snapshots_are_kept_and_order_does_not_depend_on_ties() {
        let h = history(&[T0, T0, T0, T0 + HOUR]);
        let p = Retention {
            keep_last: 2,
            ..Default::default()
        };
        // Equal times: the later in history is the newer.
        assert_eq!(kept(&h, &p, T0 + 10 * HOUR), ["s2", "s3"]);
        let pinned: BTreeSet<String> = ["s0".to_string()].into();
        assert_eq!(expired(&h, &p, "s3", &pinned, T0 + 10 * HOUR), ["s1"]);
    }
}
