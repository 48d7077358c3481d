//! Which archives of one entry a bucket keeps: the newest `last`, and the newest of
//! each of the last `daily` days, `weekly` ISO weeks and `monthly` months that have
//! an archive (grandfather-father-son). An archive any rule keeps is kept.
//!
//! Days, weeks and months are UTC calendar periods of the archive's finish time, so
//! the answer is the same on every server whatever its time zone, and a clock that
//! steps changes nothing already decided: an archive is placed by the time in its
//! manifest, never by the time of the pass.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Utc};

/// The calendar period a time falls in (a day, an ISO week, a month), as a key.
type Period = fn(&DateTime<Utc>) -> (i32, u32);

/// A bucket's retention (`retain`, `keep_daily`, `keep_weekly`, `keep_monthly`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// The newest N archives.
    pub last: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

/// One archive as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Commit order within the entry (higher is newer).
    pub order: (u64, i64, u32),
    pub finished: DateTime<Utc>,
}

impl Retention {
    /// Whether nothing would be kept (a configuration the parser refuses).
    pub fn is_empty(&self) -> bool {
        self.last == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == 0
    }

    /// Indices into `archives` (any order) of those to keep.
    pub fn keep(&self, archives: &[Candidate]) -> BTreeSet<usize> {
        let mut newest_first: Vec<usize> = (0..archives.len()).collect();
        newest_first.sort_by(|a, b| archives[*b].order.cmp(&archives[*a].order));
        let mut kept: BTreeSet<usize> = newest_first.iter().take(self.last as usize).copied().collect();
        let periods: [(u32, Period); 3] = [
            (self.daily, |t| (t.year(), t.ordinal())),
            (self.weekly, |t| {
                let w = t.iso_week();
                (w.year(), w.week())
            }),
            (self.monthly, |t| (t.year(), t.month())),
        ];
        for (count, period) in periods {
            let mut seen = BTreeSet::new();
            for &i in &newest_first {
                if seen.len() == count as usize {
                    break;
                }
                // The newest archive of a period it has not seen yet stands for it.
                if seen.insert(period(&archives[i].finished)) {
                    kept.insert(i);
                }
            }
        }
        kept
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> =
            [(self.last, "newest"), (self.daily, "daily"), (self.weekly, "weekly"), (self.monthly, "monthly")]
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, what)| format!("{n} {what}"))
                .collect();
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(seq: u64, y: i32, m: u32, d: u32, h: u32) -> Candidate {
        Candidate { order: (seq, 0, 1), finished: Utc.with_ymd_and_hms(y, m, d, h, 0, 0).single().expect("time") }
    }

    #[test]
    fn the_newest_n_are_kept_by_commit_order_not_by_position() {
        let a = [at(3, 2026, 12, 3, 0), at(1, 2026, 12, 1, 0), at(2, 2026, 12, 2, 0)];
        let r = Retention { last: 2, ..Default::default() };
        assert_eq!(r.keep(&a), BTreeSet::from([0, 2]));
        assert_eq!(Retention { last: 9, ..Default::default() }.keep(&a).len(), 3);
        assert!(Retention::default().keep(&a).is_empty());
    }

    #[test]
    fn grandfather_father_son_keeps_the_newest_of_each_period() {
        // Two a day for 70 days from 2026-09-01, at 01:00 and 13:00.
        let mut a = Vec::new();
        for day in 0..70u64 {
            let t =
                Utc.with_ymd_and_hms(2026, 9, 1, 1, 0, 0).single().expect("time") + chrono::Duration::days(day as i64);
            a.push(Candidate { order: (day * 2, 0, 1), finished: t });
            a.push(Candidate { order: (day * 2 + 1, 0, 1), finished: t + chrono::Duration::hours(12) });
        }
        let r = Retention { last: 1, daily: 3, weekly: 2, monthly: 3 };
        let kept = r.keep(&a);
        let names: Vec<String> =
            kept.iter().map(|i| a[*i].finished.format("%Y-%m-%dT%H").to_string()).collect::<Vec<_>>();
        // The last day is 2026-11-09 (a Monday): newest 1 and 3 daily are the evening
        // archives of 11-09, 11-08, 11-07; weekly: 11-09 (week 46) and 11-08 (the
        // Sunday ending week 45); monthly: November, October 31st, September 30th.
        assert_eq!(names, ["2026-09-30T13", "2026-10-31T13", "2026-11-07T13", "2026-11-08T13", "2026-11-09T13",]);
        assert_eq!(r.to_string(), "1 newest, 3 daily, 2 weekly, 3 monthly");
    }

    #[test]
    fn a_period_counts_only_when_it_has_an_archive() {
        // Gaps: days with no backup do not use up keep_daily.
        let a = [at(1, 2026, 1, 1, 0), at(2, 2026, 1, 5, 0), at(3, 2026, 1, 9, 0)];
        let r = Retention { daily: 3, ..Default::default() };
        assert_eq!(r.keep(&a).len(), 3);
        // An older archive whose clock was ahead still counts by its own finish time.
        let stepped = [at(1, 2027, 6, 1, 0), at(2, 2026, 1, 2, 0)];
        assert_eq!(Retention { last: 1, ..Default::default() }.keep(&stepped), BTreeSet::from([1]));
        assert_eq!(Retention { monthly: 1, ..Default::default() }.keep(&stepped), BTreeSet::from([1]));
    }
}
