//! The v1 wire contract as JSON Schema (draft 2020-12), generated from the types in
//! [`crate::wire`], for producers and consumers written in other languages. The files in
//! `common/schemas/v1/` are these schemas; a test keeps them current (run
//! `ROTA_WRITE_SCHEMAS=1 cargo test -p rota-common schema` after changing a wire type).

use schemars::{JsonSchema, schema_for};
use serde_json::Value;

use crate::wire::{
    AgentMessage, Event, Heartbeat, Job, JobResult, ResultsMessage, RpcReply, RpcRequest,
};

/// Each message of the contract: its file name (without `.json`) and its schema.
pub fn all() -> Vec<(&'static str, Value)> {
    fn schema<T: JsonSchema>() -> Value {
        serde_json::to_value(schema_for!(T)).unwrap_or_default()
    }
    vec![
        ("job", schema::<Job>()),
        ("result", schema::<JobResult>()),
        ("results-message", schema::<ResultsMessage>()),
        ("event", schema::<Event>()),
        ("heartbeat", schema::<Heartbeat>()),
        ("agent-message", schema::<AgentMessage>()),
        ("rpc-request", schema::<RpcRequest>()),
        ("rpc-reply", schema::<RpcReply>()),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn schema_files_are_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/v1");
        let write = std::env::var_os("ROTA_WRITE_SCHEMAS").is_some();
        for (name, schema) in super::all() {
            let path = dir.join(format!("{name}.json"));
            let text = serde_json::to_string_pretty(&schema).expect("encodes") + "\n";
            if write {
                std::fs::create_dir_all(&dir).expect("folder");
                std::fs::write(&path, &text).expect("written");
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == text,
                "{} is out of date: run `ROTA_WRITE_SCHEMAS=1 cargo test -p rota-common schema`",
                path.display()
            );
        }
    }

    #[test]
    fn the_job_schema_takes_valid_jobs_and_refuses_malformed_ones() {
        let schema = super::all().remove(0).1;
        let v = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("a valid schema");
        let ok = serde_json::json!({"type": "demo.echo", "payload": {"a": 1}, "priority": 3, "unknown_field": true});
        assert!(v.is_valid(&ok));
        for bad in [
            serde_json::json!({"payload": {}}),
            serde_json::json!({"type": "demo.echo", "uuid": "not-a-uuid"}),
            serde_json::json!({"type": "demo.echo", "priority": -1}),
            serde_json::json!({"type": 7}),
        ] {
            assert!(!v.is_valid(&bad), "{bad} should be refused");
        }
    }

    #[test]
    fn the_results_queue_takes_one_result_or_a_group() {
        let (_, schema) = super::all()
            .into_iter()
            .find(|(name, _)| *name == "results-message")
            .expect("the schema");
        let v = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("a valid schema");
        let uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let result = serde_json::json!({"uuid": uuid, "attempt": 1, "type": "demo.echo",
            "agent": "a1", "worker": "w", "status": "succeeded",
            "started_at": "2026-11-29T12:00:00Z", "finished_at": "2026-11-29T12:00:00Z",
            "job": {"type": "demo.echo", "uuid": uuid}});
        assert!(v.is_valid(&result));
        assert!(v.is_valid(&serde_json::json!([result, result])));
        assert!(!v.is_valid(&serde_json::json!([result, {"uuid": uuid}])));
        assert!(!v.is_valid(&serde_json::json!({"uuid": uuid})));
    }
}
