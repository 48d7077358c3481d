//! Numbers and times in words an operator reads at a glance. Pure.

use chrono::{DateTime, FixedOffset, Utc};

/// This host's offset from UTC now, for showing times.
pub fn local_offset() -> FixedOffset {
    use chrono::Offset;
    chrono::Local::now().offset().fix()
}

/// `1.5 GiB`, `812 KiB`, `0 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// `12.3 MB/s` (decimal, like network tools).
pub fn rate(bps: f64) -> String {
    // `max` also turns -0.0 into 0.0, so an idle rate never reads "-0".
    let bps = bps.max(0.0) + 0.0;
    if bps >= 1e9 {
        format!("{:.2} GB/s", bps / 1e9)
    } else if bps >= 1e6 {
        format!("{:.1} MB/s", bps / 1e6)
    } else if bps >= 1e3 {
        format!("{:.0} kB/s", bps / 1e3)
    } else {
        format!("{bps:.0} B/s")
    }
}

/// `37 s`, `4 min`, `3 h 12 min`, `2 d 5 h`.
pub fn span(secs: u64) -> String {
    match secs {
        s if s < 90 => format!("{s} s"),
        s if s < 3600 => format!("{} min", (s + 30) / 60),
        s if s < 86_400 => {
            let m = (s % 3600) / 60;
            if m == 0 { format!("{} h", s / 3600) } else { format!("{} h {m} min", s / 3600) }
        }
        s => {
            let h = (s % 86_400) / 3600;
            if h == 0 { format!("{} d", s / 86_400) } else { format!("{} d {h} h", s / 86_400) }
        }
    }
}

/// `3.2 ms`, or `-` when unknown.
pub fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

pub fn parse_time(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t).ok().map(|t| t.with_timezone(&Utc))
}

/// Seconds from `t` (RFC 3339) to `now`, never negative.
pub fn age(t: &str, now: DateTime<Utc>) -> Option<u64> {
    parse_time(t).map(|t| (now - t).num_seconds().max(0) as u64)
}

/// `14:02` today, `Tue 02:00` within a week, else `2026-12-01 02:00`, in `tz`.
pub fn clock(t: &str, now: DateTime<Utc>, tz: FixedOffset) -> String {
    let Some(at) = parse_time(t) else { return t.to_string() };
    let (local, today) = (at.with_timezone(&tz), now.with_timezone(&tz));
    let days = (local.date_naive() - today.date_naive()).num_days();
    if days == 0 {
        local.format("%H:%M").to_string()
    } else if days.abs() < 7 {
        local.format("%a %H:%M").to_string()
    } else {
        local.format("%Y-%m-%d %H:%M").to_string()
    }
}

/// Like [`clock`], with seconds for today's times (event logs).
pub fn clock_secs(t: &str, now: DateTime<Utc>, tz: FixedOffset) -> String {
    match parse_time(t) {
        Some(at) if at.with_timezone(&tz).date_naive() == now.with_timezone(&tz).date_naive() => {
            at.with_timezone(&tz).format("%H:%M:%S").to_string()
        }
        _ => clock(t, now, tz),
    }
}

/// `in 3 h 12 min (02:00)` or `5 min ago (14:02)`.
pub fn when(t: &str, now: DateTime<Utc>, tz: FixedOffset) -> String {
    let Some(at) = parse_time(t) else { return t.to_string() };
    let secs = (at - now).num_seconds();
    let at_clock = clock(t, now, tz);
    if secs >= 0 {
        format!("in {} ({at_clock})", span(secs as u64))
    } else {
        format!("{} ago ({at_clock})", span(secs.unsigned_abs()))
    }
}

/// A share as `12%`.
pub fn pct(part: f64, whole: f64) -> String {
    if whole <= 0.0 { "-".into() } else { format!("{:.0}%", (part / whole * 100.0).clamp(0.0, 100.0)) }
}

/// Cuts `s` to `width` characters, marking the cut with `…`.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_spans_read_naturally() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(13_207_024_435), "12.3 GiB");
        assert_eq!(span(14), "14 s");
        assert_eq!(span(299), "5 min");
        assert_eq!(span(3 * 3600 + 12 * 60), "3 h 12 min");
        assert_eq!(span(2 * 86_400 + 5 * 3600), "2 d 5 h");
        assert_eq!(rate(12_345_678.0), "12.3 MB/s");
        assert_eq!(fit("abcdef", 4), "abc…");
    }

    #[test]
    fn times_are_relative_and_local() {
        let now = parse_time("2026-12-01T12:00:00Z").expect("t");
        let tz = FixedOffset::east_opt(3600).expect("tz");
        assert_eq!(when("2026-12-01T14:00:00Z", now, tz), "in 2 h (15:00)");
        assert_eq!(when("2026-12-01T11:55:00Z", now, tz), "5 min ago (12:55)");
        assert_eq!(clock("2026-12-03T01:00:00Z", now, tz), "Thu 02:00");
    }
}
