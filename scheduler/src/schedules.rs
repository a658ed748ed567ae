//! Schedules: checking a schedule's spec, and deciding at a given moment which of its fire
//! times to run. Fire times that came due while the scheduler was down (or more than the
//! grace period ago) are *missed*: the schedule's policy either skips them or runs the job
//! once for them all. Fire times within the grace period run each. The store then records the
//! jobs and moves the schedule on in one transaction, so a fire time is never run twice.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rota_common::names::check_name;
use rota_common::wire::{MissedPolicy, ScheduleInfo, ScheduleSpec};

use crate::cron::CronExpr;

/// At most this many on-time fire times are run at once (a schedule every second that the
/// scheduler could not serve for a while catches up in several steps).
const MAX_FIRES_AT_ONCE: usize = 100;

/// Checks a schedule and returns its parsed expression.
pub fn check(spec: &ScheduleSpec) -> Result<CronExpr, String> {
    check_name("schedule name", &spec.name)?;
    let expr = CronExpr::parse(&spec.cron, &spec.tz)?;
    spec.job()
        .check()
        .map_err(|e| format!("schedule {:?}: {e}", spec.name))?;
    if expr.next_after(Utc::now()).is_none() {
        return Err(format!(
            "cron expression {:?} never fires after now",
            spec.cron
        ));
    }
    Ok(expr)
}

/// A new schedule, starting from `now` (nothing before it counts as missed).
pub fn new_info(
    spec: ScheduleSpec,
    expr: &CronExpr,
    now: DateTime<Utc>,
    from_config: bool,
) -> ScheduleInfo {
    ScheduleInfo {
        next_fire: expr.next_after(now),
        spec,
        paused: false,
        from_config,
        last_fire: Some(now),
        last_job: None,
    }
}

/// What to do with a schedule at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The fire times to run a job for, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Whether fire times were missed (skipped, or folded into one run).
    pub missed: bool,
    /// Every fire time up to this one is handled once the plan is carried out.
    pub through: DateTime<Utc>,
    /// The next fire time after `through`.
    pub next: Option<DateTime<Utc>>,
}

/// The plan at `now` for a schedule whose fire times up to `after` are handled.
pub fn plan(
    expr: &CronExpr,
    policy: MissedPolicy,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: Duration,
) -> Plan {
    let idle = |next| Plan {
        fire: Vec::new(),
        missed: false,
        through: after,
        next,
    };
    let Some(first) = expr.next_after(after) else {
        return idle(None);
    };
    if first > now {
        return idle(Some(first));
    }
    let cutoff = now - chrono::Duration::from_std(grace).unwrap_or_default();
    let mut fire = Vec::new();
    let mut through = after;
    let missed = first < cutoff;
    if missed && let Some(latest) = expr.last_before(cutoff) {
        if policy == MissedPolicy::RunOnce {
            fire.push(latest);
        }
        through = latest;
    }
    let mut next = expr.next_after(through);
    while let Some(at) = next.filter(|at| *at <= now) {
        if fire.len() >= MAX_FIRES_AT_ONCE {
            break;
        }
        fire.push(at);
        through = at;
        next = expr.next_after(at);
    }
    Plan {
        fire,
        missed,
        through,
        next,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::Value;

    use super::*;

    /// Wall-clock time that moves with tokio's (paused) clock.
    struct PausedClock {
        base: DateTime<Utc>,
        start: tokio::time::Instant,
    }

    impl PausedClock {
        fn at(base: DateTime<Utc>) -> Self {
            Self {
                base,
                start: tokio::time::Instant::now(),
            }
        }
        fn now(&self) -> DateTime<Utc> {
            self.base + chrono::Duration::from_std(self.start.elapsed()).expect("a short test")
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("a valid time")
    }

    const GRACE: Duration = Duration::from_secs(10);

    /// Runs a schedule the way the scheduler does: sleep until the next fire time, plan,
    /// carry out; returns what fired.
    async fn serve(
        expr: &CronExpr,
        policy: MissedPolicy,
        clock: &PausedClock,
        after: &mut DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let mut fired = Vec::new();
        loop {
            let p = plan(expr, policy, *after, clock.now(), GRACE);
            fired.extend(&p.fire);
            *after = p.through;
            let Some(next) = p.next.filter(|n| *n <= until) else {
                return fired;
            };
            let wait = (next - clock.now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_schedule_fires_each_weekday_at_five_london_time() {
        let expr = CronExpr::parse("0 5 * * Mon-Fri", "Europe/London").expect("valid");
        // From Thursday 26 March 2026 (GMT) to Thursday 2 April (BST).
        let clock = PausedClock::at(utc(2026, 3, 26, 0, 0, 0));
        let mut after = clock.now();
        let fired = serve(
            &expr,
            MissedPolicy::Skip,
            &clock,
            &mut after,
            utc(2026, 4, 2, 12, 0, 0),
        )
        .await;
        assert_eq!(
            fired,
            [
                utc(2026, 3, 26, 5, 0, 0),
                utc(2026, 3, 27, 5, 0, 0),
                utc(2026, 3, 30, 4, 0, 0),
                utc(2026, 3, 31, 4, 0, 0),
                utc(2026, 4, 1, 4, 0, 0),
                utc(2026, 4, 2, 4, 0, 0),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_downtime_skip_runs_nothing_and_run_once_runs_once() {
        let expr = CronExpr::parse("0 * * * *", "UTC").expect("valid"); // hourly
        let start = utc(2026, 6, 1, 9, 30, 0);
        for (policy, want) in [
            (MissedPolicy::Skip, vec![]),
            (MissedPolicy::RunOnce, vec![utc(2026, 6, 1, 13, 0, 0)]),
        ] {
            let clock = PausedClock::at(start);
            let after = clock.now();
            // The scheduler is down from 09:30 to 13:40: fire times 10:00 to 13:00 are missed.
            tokio::time::advance(Duration::from_secs(4 * 3600 + 10 * 60)).await;
            let p = plan(&expr, policy, after, clock.now(), GRACE);
            assert!(p.missed);
            assert_eq!(p.fire, want, "{policy:?}");
            assert_eq!(p.through, utc(2026, 6, 1, 13, 0, 0));
            assert_eq!(p.next, Some(utc(2026, 6, 1, 14, 0, 0)));
            // Carried out, nothing is due again until the next fire time.
            let again = plan(&expr, policy, p.through, clock.now(), GRACE);
            assert!(again.fire.is_empty() && !again.missed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_stop_within_the_grace_period_misses_nothing() {
        let expr = CronExpr::parse("* * * * * *", "UTC").expect("valid"); // every second
        let clock = PausedClock::at(utc(2026, 6, 1, 12, 0, 0));
        let after = clock.now();
        tokio::time::advance(Duration::from_secs(3)).await;
        let p = plan(&expr, MissedPolicy::Skip, after, clock.now(), GRACE);
        assert!(!p.missed);
        assert_eq!(
            p.fire,
            [
                utc(2026, 6, 1, 12, 0, 1),
                utc(2026, 6, 1, 12, 0, 2),
                utc(2026, 6, 1, 12, 0, 3)
            ]
        );
        // Down for a minute: the last ten seconds run, the fifty before are skipped.
        let clock = PausedClock::at(utc(2026, 6, 1, 12, 0, 0));
        tokio::time::advance(Duration::from_secs(60)).await;
        let p = plan(&expr, MissedPolicy::Skip, after, clock.now(), GRACE);
        assert!(p.missed);
        assert_eq!(p.fire.len(), 11, "12:00:50 to 12:01:00");
        assert_eq!(p.fire[0], utc(2026, 6, 1, 12, 0, 50));
    }

    #[test]
    fn a_schedule_is_checked() {
        let mut spec = ScheduleSpec {
            name: "nightly".into(),
            cron: "0 5 * * Mon-Fri".into(),
            tz: "Europe/London".into(),
            missed: MissedPolicy::Skip,
            work_type: "demo.echo".into(),
            payload: Value::Null,
            queue: None,
            priority: None,
            timeout_s: None,
            max_attempts: None,
            unique_key: None,
        };
        assert!(check(&spec).is_ok());
        spec.name = "a b".into();
        assert!(
            check(&spec)
                .expect_err("bad name")
                .contains("schedule name")
        );
        spec.name = "nightly".into();
        spec.priority = Some(10);
        assert!(check(&spec).expect_err("bad priority").contains("priority"));
    }
}
