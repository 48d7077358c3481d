//! Whether an entry's backups keep up with its schedule: one pure rule shared by the
//! agent (about its own entries), the server (about every agent, including silent
//! ones) and whoever alerts on it.
//!
//! A scheduled run is *answered* by a success at or after it. A run counts as
//! unanswered once its **grace** has passed — the shorter of one hour and half the
//! gap to the following run — so a backup that takes a while is not called late,
//! and a five-minute schedule is not given an hour. Then, counting unanswered runs
//! since the last success (or, with none, since the entry was first known):
//!
//! | unanswered runs | state |
//! |---|---|
//! | 0 | `fresh` (`never` if it has not succeeded yet) |
//! | 1 | `overdue`, or `running` while a run is in progress |
//! | 2 or more | `missed` |
//!
//! An entry without a schedule is `unscheduled`.

use chrono::{DateTime, TimeZone, Utc};

use crate::admin::{EntryFreshness, Freshness};
use crate::config::Schedule;

/// The longest grace a scheduled run gets before it counts as unanswered.
pub const MAX_GRACE: chrono::Duration = chrono::Duration::hours(1);

/// Counting stops here: beyond it the number only says "a long time".
pub const MAX_COUNTED: u32 = 1000;

/// The facts an assessment is made from.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub schedule: Option<&'a Schedule>,
    /// The schedule's zone; `None` is the host's local time.
    pub timezone: Option<chrono_tz::Tz>,
    pub last_success: Option<DateTime<Utc>>,
    /// When the entry was first known, bounding the count when it never succeeded.
    pub known_since: DateTime<Utc>,
    pub running: bool,
}

/// Judges `facts` at `now`.
pub fn assess(facts: &Facts<'_>, now: DateTime<Utc>) -> EntryFreshness {
    let rfc = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut out = EntryFreshness {
        state: Freshness::Unscheduled,
        last_success: facts.last_success.map(rfc),
        age_secs: facts.last_success.map(|t| (now - t).num_seconds().max(0) as u64),
        due_since: None,
        missed_runs: 0,
        known_since: Some(rfc(facts.known_since)),
    };
    let Some(schedule) = facts.schedule else { return out };
    let from = facts.last_success.unwrap_or(facts.known_since);
    let (count, first) = match facts.timezone {
        Some(tz) => unanswered(schedule, &from.with_timezone(&tz), now),
        None => unanswered(schedule, &from.with_timezone(&chrono::Local), now),
    };
    out.missed_runs = count;
    out.due_since = first.map(rfc);
    out.state = match count {
        0 if facts.last_success.is_none() => Freshness::Never,
        0 => Freshness::Fresh,
        1 if facts.running => Freshness::Running,
        1 => Freshness::Overdue,
        _ => Freshness::Missed,
    };
    out
}

/// Judges again, at `now`, an entry as an agent reported it: with its reported
/// schedule and zone (`local` is this host's), the later of the agent's and
/// `also_succeeded` (the server's own last commit), and `running` as the caller
/// knows it (a silent agent runs nothing it can finish).
pub fn reassess(
    entry: &crate::admin::EntryStatus,
    also_succeeded: Option<DateTime<Utc>>,
    running: bool,
    now: DateTime<Utc>,
) -> EntryFreshness {
    let parse = |t: &Option<String>| {
        t.as_deref().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc))
    };
    let schedule = entry.schedule.as_deref().and_then(|s| Schedule::parse(s).ok());
    let timezone = entry.timezone.parse::<chrono_tz::Tz>().ok();
    let reported = parse(&entry.freshness.last_success);
    let facts = Facts {
        schedule: schedule.as_ref(),
        timezone,
        last_success: reported.max(also_succeeded),
        known_since: parse(&entry.freshness.known_since).unwrap_or(now),
        running,
    };
    assess(&facts, now)
}

/// Scheduled runs after `from` whose grace ended by `now`, and the first of them.
fn unanswered<Tz: TimeZone>(
    schedule: &Schedule,
    from: &DateTime<Tz>,
    now: DateTime<Utc>,
) -> (u32, Option<DateTime<Utc>>) {
    let (mut count, mut first) = (0, None);
    let mut run = schedule.next_after(from);
    while let Some(at) = run {
        if count == MAX_COUNTED {
            break;
        }
        let next = schedule.next_after(&at);
        let gap =
            next.as_ref().map_or(MAX_GRACE * 2, |n| n.clone().with_timezone(&Utc) - at.clone().with_timezone(&Utc));
        let due = at.clone().with_timezone(&Utc) + (gap / 2).min(MAX_GRACE);
        if due > now {
            break;
        }
        first.get_or_insert(at.with_timezone(&Utc));
        count += 1;
        run = next;
    }
    (count, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
    }

    fn judge(expr: &str, last: Option<&str>, running: bool, now: &str) -> EntryFreshness {
        let schedule = Schedule::parse(expr).expect("schedule");
        let facts = Facts {
            schedule: Some(&schedule),
            timezone: Some(chrono_tz::UTC),
            last_success: last.map(at),
            known_since: at("2026-11-01T00:00:00Z"),
            running,
        };
        assess(&facts, at(now))
    }

    #[test]
    fn a_success_after_the_last_run_is_fresh() {
        let f = judge("0 2 * * *", Some("2026-12-01T02:40:00Z"), false, "2026-12-01T12:00:00Z");
        assert_eq!((f.state, f.missed_runs, f.age_secs), (Freshness::Fresh, 0, Some(33_600)));
    }

    #[test]
    fn a_run_within_its_grace_is_not_late() {
        // Daily at 02:00: the grace is an hour, so 02:59 is still fine.
        let f = judge("0 2 * * *", Some("2026-11-30T02:30:00Z"), false, "2026-12-01T02:59:00Z");
        assert_eq!(f.state, Freshness::Fresh);
        let f = judge("0 2 * * *", Some("2026-11-30T02:30:00Z"), false, "2026-12-01T03:00:00Z");
        assert_eq!((f.state, f.missed_runs), (Freshness::Overdue, 1));
        assert_eq!(f.due_since.as_deref(), Some("2026-12-01T02:00:00Z"));
    }

    #[test]
    fn a_short_schedule_gets_half_its_period_as_grace() {
        let f = judge("*/10 * * * *", Some("2026-12-01T10:00:30Z"), false, "2026-12-01T10:14:59Z");
        assert_eq!(f.state, Freshness::Fresh);
        let f = judge("*/10 * * * *", Some("2026-12-01T10:00:30Z"), false, "2026-12-01T10:15:00Z");
        assert_eq!(f.state, Freshness::Overdue);
    }

    #[test]
    fn a_run_in_progress_holds_off_overdue_but_not_missed() {
        let f = judge("0 2 * * *", Some("2026-11-30T02:30:00Z"), true, "2026-12-01T05:00:00Z");
        assert_eq!(f.state, Freshness::Running);
        let f = judge("0 2 * * *", Some("2026-11-29T02:30:00Z"), true, "2026-12-01T05:00:00Z");
        assert_eq!((f.state, f.missed_runs), (Freshness::Missed, 2));
    }

    #[test]
    fn never_succeeded_counts_from_when_the_entry_was_known() {
        let f = judge("0 2 * * *", None, false, "2026-11-01T01:00:00Z");
        assert_eq!(f.state, Freshness::Never);
        let f = judge("0 2 * * *", None, false, "2026-11-03T12:00:00Z");
        assert_eq!((f.state, f.missed_runs), (Freshness::Missed, 3));
    }

    #[test]
    fn counting_stops_at_the_cap() {
        let f = judge("* * * * *", Some("2026-01-01T00:00:00Z"), false, "2026-12-01T00:00:00Z");
        assert_eq!((f.state, f.missed_runs), (Freshness::Missed, MAX_COUNTED));
    }

    #[test]
    fn no_schedule_is_unscheduled() {
        let facts = Facts {
            schedule: None,
            timezone: None,
            last_success: None,
            known_since: at("2026-11-01T00:00:00Z"),
            running: false,
        };
        assert_eq!(assess(&facts, at("2026-12-01T00:00:00Z")).state, Freshness::Unscheduled);
    }
}
