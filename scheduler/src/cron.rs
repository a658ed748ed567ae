//! Cron expressions in a time zone: five fields (minute hour day-of-month month day-of-week),
//! or six with seconds first, evaluated on the zone's wall clock (croner + chrono-tz), so
//! `0 5 * * Mon-Fri` in `Europe/London` is 05:00 London time all year. Across daylight-saving
//! changes a time that does not exist (spring forward) fires right after the gap, and a time
//! that exists twice (fall back) fires once.

use std::str::FromStr;

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed cron expression and its time zone.
#[derive(Debug, Clone)]
pub struct CronExpr {
    cron: Cron,
    tz: Tz,
}

impl CronExpr {
    /// Parses `expr` for zone `tz` (an IANA name such as `Europe/London`, or `UTC`).
    pub fn parse(expr: &str, tz: &str) -> Result<Self, String> {
        let tz = Tz::from_str(tz.trim()).map_err(|_| {
            format!("unknown time zone {tz:?}: use an IANA name such as UTC or Europe/London")
        })?;
        let fields = expr.split_whitespace().count();
        if !expr.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(format!(
                "cron expression {expr:?} has {fields} fields: use five (minute hour \
                 day-of-month month day-of-week, e.g. \"0 5 * * Mon-Fri\") or six with seconds \
                 first (e.g. \"*/10 * * * * *\")"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))?;
        Ok(Self { cron, tz })
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// The last fire time strictly before `t`.
    pub fn last_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner counts in whole seconds: from 12:00:00.5, 12:00:00 is before.
        let whole = t.with_nanosecond(0).unwrap_or(t);
        self.cron
            .find_previous_occurrence(&whole.with_timezone(&self.tz), whole < t)
            .ok()
            .map(|at| at.with_timezone(&Utc))
            .filter(|at| *at < t)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("a valid time")
    }

    fn fires(expr: &CronExpr, from: DateTime<Utc>, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = from;
        while let Some(next) = expr.next_after(t).filter(|n| *n <= until) {
            out.push(next);
            t = next;
        }
        out
    }

    #[test]
    fn weekdays_at_five_in_london_follow_the_clock_change() {
        let e = CronExpr::parse("0 5 * * Mon-Fri", "Europe/London").expect("valid");
        // Friday 27 March 2026 is still GMT; British Summer Time starts on Sunday the 29th.
        assert_eq!(
            e.next_after(utc(2026, 3, 26, 6, 0, 0)),
            Some(utc(2026, 3, 27, 5, 0, 0))
        );
        // Skips the weekend; Monday's 05:00 BST is 04:00 UTC.
        assert_eq!(
            e.next_after(utc(2026, 3, 27, 5, 0, 0)),
            Some(utc(2026, 3, 30, 4, 0, 0))
        );
        // Back to GMT after 25 October.
        assert_eq!(
            e.next_after(utc(2026, 10, 23, 12, 0, 0)),
            Some(utc(2026, 10, 26, 5, 0, 0))
        );
        let week = fires(&e, utc(2026, 3, 22, 0, 0, 0), utc(2026, 3, 29, 0, 0, 0));
        assert_eq!(week.len(), 5, "Monday to Friday: {week:?}");
    }

    #[test]
    fn a_time_in_the_spring_gap_fires_once_after_it_and_a_repeated_time_fires_once() {
        let e = CronExpr::parse("30 1 * * *", "Europe/London").expect("valid");
        // 29 March 2026: 01:00 GMT jumps to 02:00 BST, so 01:30 does not exist that day.
        let spring = fires(&e, utc(2026, 3, 28, 12, 0, 0), utc(2026, 3, 30, 12, 0, 0));
        assert_eq!(spring.len(), 2, "{spring:?}");
        assert_eq!(
            spring[0],
            utc(2026, 3, 29, 1, 0, 0),
            "02:00 BST, right after the gap"
        );
        assert_eq!(spring[1], utc(2026, 3, 30, 0, 30, 0), "01:30 BST");
        // 25 October 2026: 01:00-02:00 happens twice; 01:30 fires once, on its first pass.
        let autumn = fires(&e, utc(2026, 10, 24, 12, 0, 0), utc(2026, 10, 26, 12, 0, 0));
        assert_eq!(
            autumn,
            [utc(2026, 10, 25, 0, 30, 0), utc(2026, 10, 26, 1, 30, 0)]
        );
    }

    #[test]
    fn six_fields_have_seconds_first() {
        let e = CronExpr::parse("*/15 * * * * *", "UTC").expect("valid");
        let t = utc(2026, 1, 1, 0, 0, 0);
        assert_eq!(e.next_after(t), Some(utc(2026, 1, 1, 0, 0, 15)));
        assert_eq!(e.last_before(t), Some(utc(2025, 12, 31, 23, 59, 45)));
        let sub = t + chrono::Duration::milliseconds(500);
        assert_eq!(e.next_after(sub), Some(utc(2026, 1, 1, 0, 0, 15)));
        assert_eq!(e.last_before(sub), Some(t));
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_a_hint() {
        for (expr, tz, want) in [
            ("0 5 * *", "UTC", "has 4 fields"),
            ("0 0 5 * * * 2026", "UTC", "has 7 fields"),
            ("0 25 * * *", "UTC", "invalid cron expression"),
            ("0 5 * * Mon-Fri", "Europe/Lundon", "unknown time zone"),
        ] {
            let err = CronExpr::parse(expr, tz).expect_err("refused");
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }
}
