//! Runs one Work and turns whatever happens (a value, an error, a panic, a timeout, a cancel)
//! into an [`Outcome`].

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use rota_common::wire::{ErrorInfo, Status};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{Context, Registry};

/// How one run ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub status: Status,
    pub output: Value,
    pub error: Option<ErrorInfo>,
}

impl Outcome {
    pub fn succeeded(output: Value) -> Self {
        Self {
            status: Status::Succeeded,
            output,
            error: None,
        }
    }
    pub fn error(status: Status, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            output: Value::Null,
            error: Some(ErrorInfo::new(kind, message)),
        }
    }
}

/// Runs the job of `ctx` with the Work its type names, for at most `timeout`. `cancel` ends
/// it as `cancelled` (and `ctx.cancelled()` tells the Work); both only take effect at the
/// Work's next await point: in-process Work cannot be stopped by force.
pub async fn run(
    registry: &Registry,
    ctx: Context,
    timeout: Duration,
    cancel: CancellationToken,
) -> Outcome {
    let work_type = ctx.job().work_type.clone();
    let Some(work) = registry.get(&work_type) else {
        return Outcome::error(
            Status::Rejected,
            "unknown_type",
            format!("no work type {work_type:?} is registered here"),
        );
    };
    let execute = AssertUnwindSafe(work.execute(&ctx)).catch_unwind();
    let outcome = tokio::select! {
        result = execute => match result {
            Ok(Ok(output)) => Outcome::succeeded(output),
            // A Work that gives up because it was told to stop was cancelled, not failed.
            Ok(Err(_)) if cancel.is_cancelled() => Outcome::error(Status::Cancelled, "cancelled", "cancelled"),
            Ok(Err(e)) => Outcome::error(Status::Failed, "work", format!("{e:#}")),
            Err(panic) => Outcome::error(Status::Crashed, "panic", format!("the Work panicked: {}", panic_message(&*panic))),
        },
        _ = tokio::time::sleep(timeout) => {
            Outcome::error(Status::TimedOut, "timeout", format!("ran longer than its timeout of {} s", timeout.as_secs_f64()))
        }
        _ = cancel.cancelled() => Outcome::error(Status::Cancelled, "cancelled", "cancelled"),
    };
    // Whatever happened, the job's pages are closed; its browser serves the next job.
    if let Some(chromium) = ctx.chromium() {
        chromium.end_job().await;
    }
    outcome
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rota_common::wire::Job;
    use serde_json::json;

    use super::*;
    use crate::context::BufferSink;
    use crate::paths::Aliases;

    async fn run_demo(work_type: &str, payload: Value, timeout_ms: u64) -> (Outcome, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let aliases =
            Aliases::parse(&[format!("demodata={}", dir.path().display())]).expect("valid");
        let sink = Arc::new(BufferSink::new(|_| {}));
        let mut job = Job::new(work_type, payload);
        job.uuid = Some(rota_common::wire::JobId::random());
        let ctx = Context::new(
            job,
            dir.path().to_owned(),
            Arc::new(aliases),
            sink.clone(),
            CancellationToken::new(),
        );
        let out = run(
            &Registry::with_builtins(),
            ctx,
            Duration::from_millis(timeout_ms),
            CancellationToken::new(),
        )
        .await;
        let lines = sink.take_logs().0.into_iter().map(|l| l.message).collect();
        (out, lines)
    }

    #[tokio::test]
    async fn each_demo_work_ends_as_it_should() {
        let (o, _) = run_demo("demo.echo", json!({"a": 1}), 1000).await;
        assert_eq!(o, Outcome::succeeded(json!({"a": 1})));
        let (o, _) = run_demo("demo.fail", json!({"message": "boom"}), 1000).await;
        assert_eq!(
            (o.status, o.error.map(|e| e.message)),
            (Status::Failed, Some("boom".to_owned()))
        );
        let (o, _) = run_demo("demo.panic", json!({"message": "aargh"}), 1000).await;
        assert_eq!(o.status, Status::Crashed);
        assert!(o.error.expect("error").message.contains("aargh"));
        let (o, lines) = run_demo("demo.log", json!({"lines": 3}), 1000).await;
        assert_eq!(o.status, Status::Succeeded);
        assert_eq!(
            lines,
            ["log line 1 of 3", "log line 2 of 3", "log line 3 of 3"]
        );
        let (o, _) = run_demo("demo.nope", Value::Null, 1000).await;
        assert_eq!(o.status, Status::Rejected);
        let (o, _) = run_demo("demo.sleep", json!({}), 1000).await;
        assert!(
            o.error
                .expect("error")
                .message
                .contains("missing field `ms`")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_work_times_out() {
        let (o, _) = run_demo("demo.sleep", json!({"ms": 60_000}), 1000).await;
        assert_eq!(o.status, Status::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_work_that_stops_when_cancelled_ends_cancelled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cancel = CancellationToken::new();
        let mut job = Job::new("demo.sleep", json!({"ms": 60_000}));
        job.uuid = Some(rota_common::wire::JobId::random());
        let sink = Arc::new(BufferSink::new(|_| {}));
        // The Work sees the same token as `run`, and may return its own error first.
        let ctx = Context::new(
            job,
            dir.path().to_owned(),
            Arc::default(),
            sink,
            cancel.clone(),
        );
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            stop.cancel();
        });
        let out = run(
            &Registry::with_builtins(),
            ctx,
            Duration::from_secs(600),
            cancel,
        )
        .await;
        assert_eq!(out.status, Status::Cancelled);
    }

    #[tokio::test]
    async fn write_file_stays_inside_its_alias() {
        let (o, _) = run_demo(
            "demo.write-file",
            json!({"path": "demodata/../x", "text": "t"}),
            1000,
        )
        .await;
        assert_eq!(o.status, Status::Failed);
        assert!(o.error.expect("error").message.contains("leaves its alias"));
    }
}
