//! A worker runtime with a work type of its own next to the built-ins. Build it, and point a
//! pool agent at it:
//!
//! ```sh
//! cargo build --example custom_runtime
//! pool-agent run --id a1 --worker-location process --worker-runtime target/debug/examples/custom_runtime
//! scheduler submit --type text.upper --payload '{"text": "hello"}' --wait
//! ```
//! The agent learns the work types from the runtime when it starts its first worker.

use rota_worker_runtime::{Context, Registry, Work};
use serde_json::{Value, json};

/// Returns the payload's `text` in capitals.
struct Upper;

#[async_trait::async_trait]
impl Work for Upper {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        #[derive(serde::Deserialize)]
        struct Input {
            text: String,
        }
        let Input { text } = ctx.payload_as()?;
        ctx.info(format!("upper-casing {} characters", text.len()));
        Ok(json!({ "text": text.to_uppercase() }))
    }
}

fn main() -> std::process::ExitCode {
    let mut registry = Registry::with_builtins();
    registry.register("text.upper", Upper);
    rota_worker_runtime::cli::main(registry)
}
