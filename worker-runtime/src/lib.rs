//! What a Work is and how one runs: the [`Work`] trait, the [`Registry`] of work types by name,
//! the [`Context`] a Work gets (its job, logs, progress, working directory, path aliases, the
//! worker's [`chromium`]), and
//! [`run`], which executes one Work and turns whatever happens into an [`Outcome`].
//!
//! The pool agent calls [`run`] directly for `local` workers; the `worker-runtime` binary is
//! the same code in a process of its own.

pub mod chromium;
pub mod cli;
pub mod context;
pub mod demo;
pub mod logs;
pub mod paths;
pub mod protocol;
pub mod registry;
mod run;
pub mod work_env;

pub use context::{Context, Sink};
pub use logs::LogBuffer;
pub use paths::{Access, Aliases, PathError};
pub use registry::Registry;
pub use run::{Outcome, run};
pub use work_env::WorkEnv;

use serde_json::Value;

/// A kind of background work. Implementations are registered under a name (the job's `type`)
/// in a [`Registry`]; a job's payload is only ever data handed to `execute`, never code.
///
/// Return `Ok(output)` for success (the output is any JSON, kept with the result) and `Err`
/// for a failure (its message, with its causes, becomes the result's error). A panic is
/// reported as `crashed`.
#[async_trait::async_trait]
pub trait Work: Send + Sync + 'static {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value>;
}
