//! Retries: what a run's outcome does to its job. A run that failed, crashed or timed out is
//! tried again after an exponential backoff with jitter, until the job's `max_attempts`; the
//! last failure makes the job `dead`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use rota_common::wire::{Job, JobRecord, JobState, Status};

/// The scheduler's defaults for jobs that do not say.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts of a job that names none (1: no retries).
    pub max_attempts: u32,
    /// The delay before the first retry of a job that names none; doubled for each retry.
    pub backoff: Duration,
    /// No delay is longer.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(3600),
        }
    }
}

/// Whether a run that ended so is worth another attempt (a cancelled or rejected one is not).
pub fn retryable(status: Status) -> bool {
    matches!(status, Status::Failed | Status::Crashed | Status::TimedOut)
}

impl RetryPolicy {
    pub fn max_attempts(&self, job: &Job) -> u32 {
        job.max_attempts.unwrap_or(self.max_attempts).max(1)
    }

    /// The longest wait after attempt `attempt` failed: `backoff * 2^(attempt-1)`, capped.
    pub fn ceiling(&self, job: &Job, attempt: u32) -> Duration {
        let base = job
            .backoff_ms
            .map(Duration::from_millis)
            .unwrap_or(self.backoff);
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        base.saturating_mul(factor).min(self.max_backoff)
    }

    /// The wait after attempt `attempt` failed: between half the ceiling and the ceiling, at
    /// random, so that jobs that failed together do not all come back together.
    pub fn delay(&self, job: &Job, attempt: u32) -> Duration {
        let ceiling = self.ceiling(job, attempt);
        let half = ceiling / 2;
        half + half.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    /// Sets the state of `record` after its current attempt ended with `status`: the
    /// outcome, or `scheduled` for a retry, or `dead` when the attempts are used up, or
    /// `expired` when the retry would be due after the job's deadline.
    pub fn settle(&self, record: &mut JobRecord, status: Status, now: DateTime<Utc>) {
        let attempt = record.job.attempt;
        let max = self.max_attempts(&record.job);
        record.next_run_at = None;
        if !retryable(status) || record.cancel_requested {
            record.state = status.into();
        } else if let Some(next) = attempt.checked_add(1).filter(|_| attempt < max) {
            let wait = chrono::Duration::from_std(self.delay(&record.job, attempt))
                .unwrap_or_else(|_| chrono::Duration::hours(1));
            let at = now.checked_add_signed(wait).unwrap_or(now);
            if let Some(deadline) = record.job.expires_at.filter(|d| at >= *d) {
                record.state = JobState::Expired;
                record.reason = Some(format!(
                    "attempt {next} would be due at {at}, not before the job's deadline \
                     {deadline} (looked at {now}): not run"
                ));
                return;
            }
            record.state = JobState::Scheduled;
            record.next_run_at = Some(at);
            record.job.attempt = next;
        } else if max > 1 {
            record.state = JobState::Dead;
        } else {
            record.state = status.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn the_delay_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        };
        let job = Job::new("demo.fail", Value::Null);
        for (attempt, ceiling) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (40, 10)] {
            let ceiling = Duration::from_secs(ceiling);
            assert_eq!(policy.ceiling(&job, attempt), ceiling);
            for _ in 0..50 {
                let d = policy.delay(&job, attempt);
                assert!(
                    d >= ceiling / 2 && d <= ceiling,
                    "{d:?} for attempt {attempt}"
                );
            }
        }
        let mut own = job.clone();
        own.backoff_ms = Some(100);
        assert_eq!(policy.ceiling(&own, 3), Duration::from_millis(400));
    }

    fn record(max_attempts: Option<u32>, attempt: u32) -> JobRecord {
        let mut job = Job::new("demo.fail", Value::Null);
        job.max_attempts = max_attempts;
        job.attempt = attempt;
        let now = Utc::now();
        JobRecord {
            uuid: rota_common::wire::JobId::random(),
            state: JobState::Running,
            job,
            created_at: now,
            updated_at: now,
            attempts: Vec::new(),
            dir: String::new(),
            cancel_requested: false,
            next_run_at: None,
            children: Vec::new(),
            reason: None,
            superseded_by: None,
            waiting_for: Vec::new(),
        }
    }

    #[test]
    fn failures_are_retried_until_the_last_attempt_then_the_job_is_dead() {
        let policy = RetryPolicy::default();
        let now = Utc::now();
        let mut r = record(Some(3), 1);
        policy.settle(&mut r, Status::Crashed, now);
        assert_eq!((r.state, r.job.attempt), (JobState::Scheduled, 2));
        assert!(r.next_run_at.is_some_and(|at| at > now));
        policy.settle(&mut r, Status::TimedOut, now);
        assert_eq!((r.state, r.job.attempt), (JobState::Scheduled, 3));
        policy.settle(&mut r, Status::Failed, now);
        assert_eq!((r.state, r.next_run_at), (JobState::Dead, None));

        let mut once = record(None, 1);
        policy.settle(&mut once, Status::Failed, now);
        assert_eq!(
            once.state,
            JobState::Failed,
            "one attempt allowed: no retry, not dead"
        );

        let mut ok = record(Some(3), 1);
        policy.settle(&mut ok, Status::Succeeded, now);
        assert_eq!(ok.state, JobState::Succeeded);
        let mut cancelled = record(Some(3), 1);
        policy.settle(&mut cancelled, Status::Cancelled, now);
        assert_eq!(cancelled.state, JobState::Cancelled);
        let mut expired = record(Some(3), 1);
        policy.settle(&mut expired, Status::Expired, now);
        assert_eq!(
            expired.state,
            JobState::Expired,
            "an expired run is not retried"
        );
    }

    #[test]
    fn a_retry_due_after_the_deadline_ends_the_job_expired() {
        let policy = RetryPolicy::default();
        let now = Utc::now();
        let mut late = record(Some(3), 1);
        late.job.expires_at = Some(now + chrono::Duration::milliseconds(100));
        policy.settle(&mut late, Status::Failed, now);
        assert_eq!((late.state, late.job.attempt), (JobState::Expired, 1));
        let reason = late.reason.expect("a reason");
        assert!(reason.contains("attempt 2 would be due at"), "{reason}");
        let mut in_time = record(Some(3), 1);
        in_time.job.expires_at = Some(now + chrono::Duration::hours(1));
        policy.settle(&mut in_time, Status::Failed, now);
        assert_eq!(in_time.state, JobState::Scheduled);
    }
}
