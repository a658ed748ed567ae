//! Results that always fit through the broker. RabbitMQ refuses a message larger than its
//! `max_message_size` (16 MiB by default on 4.x, often lowered), and a result carries the
//! output, the logs and the job again. Before a result is stored, [`seal`] makes it fit
//! `--max-result-bytes`:
//!
//! 1. log lines are cut from the middle (the first and the last are kept), with a line that
//!    says how many were dropped;
//! 2. if the output alone is still too large, the job ends `failed` with the error kind
//!    `result_too_large` and no output: large outputs belong in a file, through a path alias;
//! 3. if even that is too large (a huge payload), the copy of the job in the result leaves its
//!    payload out (the scheduler has the job already).
//!
//! [`refused`] is the last resort when the broker still refuses a stored result.

use chrono::Utc;
use rota_common::wire::{ErrorInfo, JobId, JobResult, Level, LogLine, Status};
use serde_json::Value;

/// The error kind of a result whose output was too large to send.
pub const TOO_LARGE: &str = "result_too_large";

/// A result encoded once: the bytes the outbox keeps and the broker carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Sealed {
    pub uuid: JobId,
    pub attempt: u32,
    pub body: Vec<u8>,
}

impl Sealed {
    pub fn of(result: &JobResult) -> serde_json::Result<Self> {
        Ok(Self {
            uuid: result.uuid,
            attempt: result.attempt,
            body: serde_json::to_vec(result)?,
        })
    }

    pub fn key(&self) -> (JobId, u32) {
        (self.uuid, self.attempt)
    }

    /// The result again (only where it must be changed: a result the broker refused).
    pub fn result(&self) -> serde_json::Result<JobResult> {
        serde_json::from_slice(&self.body)
    }
}

/// `result` made to fit `max_bytes` (see the module's text) and encoded: once, when it fits already.
pub fn seal(result: JobResult, max_bytes: usize) -> serde_json::Result<(JobResult, Sealed)> {
    let sealed = Sealed::of(&result)?;
    if sealed.body.len() <= max_bytes {
        return Ok((result, sealed));
    }
    let result = fit(result, max_bytes);
    let sealed = Sealed::of(&result)?;
    Ok((result, sealed))
}

fn size(result: &JobResult) -> usize {
    serde_json::to_vec(result).map_or(usize::MAX, |b| b.len())
}

/// `result`, made to fit `max_bytes` when encoded (see the module's text for how).
fn fit(mut result: JobResult, max_bytes: usize) -> JobResult {
    if size(&result) <= max_bytes {
        return result;
    }
    let before = result.logs.len();
    let mut dropped = 0u64;
    while size(&result) > max_bytes && !result.logs.is_empty() {
        // Halve the lines, keeping the first quarter and the last quarter.
        let n = result.logs.len();
        let cut = n.div_ceil(2);
        let from = (n - cut) / 2;
        result.logs.drain(from..from + cut);
        dropped += cut as u64;
    }
    if dropped > 0 {
        result.logs_dropped = result.logs_dropped.saturating_add(dropped);
        let mark = LogLine {
            time: Utc::now(),
            level: Level::Warn,
            message: format!(
                "[rota] {dropped} of {before} log lines dropped to keep the result under {max_bytes} bytes \
                 (--max-result-bytes)"
            ),
        };
        let at = result.logs.len() / 2;
        result.logs.insert(at, mark);
        while size(&result) > max_bytes && result.logs.len() > 1 {
            result.logs.remove(0); // the mark alone may not fit next to a huge output
        }
    }
    if size(&result) > max_bytes {
        let output_bytes = serde_json::to_vec(&result.output).map_or(0, |b| b.len());
        result.status = Status::Failed;
        result.error = Some(ErrorInfo::new(
            TOO_LARGE,
            format!(
                "the output is {output_bytes} bytes; a result may be at most {max_bytes} bytes \
                 (--max-result-bytes, kept below RabbitMQ's max_message_size). Write a large output \
                 to a file through a path alias and return its path"
            ),
        ));
        result.output = Value::Null;
        result.logs.clear();
    }
    if size(&result) > max_bytes {
        result.job.payload = Value::String(format!(
            "[rota] the payload was left out of this copy of the job to keep the result under \
             {max_bytes} bytes"
        ));
    }
    result
}

/// The failed result that replaces one the broker refused again and again, so the job ends
/// instead of being resent for ever.
pub fn refused(mut result: JobResult, why: &str) -> JobResult {
    result.status = Status::Failed;
    result.error = Some(ErrorInfo::new(
        TOO_LARGE,
        format!(
            "the result could not be sent: {why}. Lower the pool agent's --max-result-bytes below the \
             broker's max_message_size"
        ),
    ));
    result.output = Value::Null;
    result.logs.clear();
    result.job.payload = Value::Null;
    result
}

/// Whether `result` is already the short failed result of [`refused`].
pub fn is_replacement(result: &JobResult) -> bool {
    result.error.as_ref().is_some_and(|e| e.kind == TOO_LARGE)
        && result.output.is_null()
        && result.logs.is_empty()
        && result.job.payload.is_null()
}

#[cfg(test)]
mod tests {
    use rota_common::wire::{AgentId, Job, JobId};
    use serde_json::json;

    use super::*;

    fn result(output: Value, lines: usize) -> JobResult {
        let mut job = Job::new("demo.echo", json!({"n": 1}));
        job.uuid = Some(JobId::random());
        JobResult {
            uuid: job.uuid.expect("set above"),
            attempt: 1,
            work_type: job.work_type.clone(),
            agent: AgentId::new("a").expect("valid"),
            worker: "local-0".into(),
            status: Status::Succeeded,
            error: None,
            output,
            logs: (0..lines)
                .map(|i| LogLine {
                    time: Utc::now(),
                    level: Level::Info,
                    message: format!("line {i} {}", "x".repeat(100)),
                })
                .collect(),
            logs_dropped: 0,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            job,
        }
    }

    #[test]
    fn a_result_that_fits_is_unchanged() {
        let r = result(json!("ok"), 10);
        assert_eq!(fit(r.clone(), 1 << 20), r);
        let (same, sealed) = seal(r.clone(), 1 << 20).expect("encodes");
        assert_eq!(same, r);
        assert_eq!(sealed.result().expect("decodes"), r);
    }

    #[test]
    fn a_sealed_result_is_the_fitted_one() {
        let (fitted, sealed) = seal(result(json!("ok"), 1000), 20_000).expect("encodes");
        assert!(sealed.body.len() <= 20_000);
        assert!(fitted.logs_dropped > 0);
        assert_eq!(sealed.result().expect("decodes"), fitted);
    }

    #[test]
    fn logs_are_cut_from_the_middle_with_a_mark() {
        let r = fit(result(json!("ok"), 10_000), 100_000);
        assert!(size(&r) <= 100_000);
        assert_eq!(r.status, Status::Succeeded);
        assert!(
            r.logs
                .first()
                .is_some_and(|l| l.message.starts_with("line 0 "))
        );
        assert!(
            r.logs
                .last()
                .is_some_and(|l| l.message.starts_with("line 9999 "))
        );
        assert!(
            r.logs
                .iter()
                .any(|l| l.message.contains("log lines dropped"))
        );
        assert!(r.logs_dropped > 0);
    }

    #[test]
    fn an_output_too_large_fails_the_job_with_its_kind() {
        let r = fit(result(json!("y".repeat(200_000)), 100), 100_000);
        assert!(size(&r) <= 100_000);
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.error.as_ref().map(|e| e.kind.as_str()), Some(TOO_LARGE));
        assert_eq!(r.output, Value::Null);
    }

    #[test]
    fn a_huge_payload_is_left_out_of_the_copy_of_the_job() {
        let mut r = result(json!("ok"), 0);
        r.job.payload = json!("z".repeat(200_000));
        let r = fit(r, 100_000);
        assert!(size(&r) <= 100_000);
        assert!(
            r.job
                .payload
                .as_str()
                .is_some_and(|p| p.contains("left out"))
        );
    }
}
