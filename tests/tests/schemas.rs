//! The published JSON Schemas (`common/schemas/v1/`) accept every message Rota sends in a run.
//! RabbitMQ's firehose (`rabbitmqctl trace_on`) copies every message published in the vhost to
//! `amq.rabbitmq.trace`; this test reads the copies of its own namespace's messages and checks
//! each against the schema of its kind. Alone in its binary, since the firehose is per vhost.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rota_tests::wire::{EventKind, Job};
use rota_tests::{System, amqp_url, within};
use serde_json::{Value, json};

/// Turns the firehose on, and off again however the test ends.
struct Firehose;

impl Firehose {
    fn on() -> Self {
        rabbitmqctl("trace_on");
        Firehose
    }
}

impl Drop for Firehose {
    fn drop(&mut self) {
        rabbitmqctl("trace_off");
    }
}

fn rabbitmqctl(arg: &str) {
    let ok = rota_tests::rabbitmqctl()
        .args(["-q", arg])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "rabbitmqctl {arg} failed");
}

fn header<'a>(headers: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    headers.inner().get(key)
}

fn text(v: Option<&AMQPValue>) -> String {
    match v {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .first()
            .map(|v| text(Some(v)))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_rota_sends_matches_its_published_schema() {
    let sys = System::new().await;
    let ns = sys.names.clone();
    let schemas: HashMap<String, jsonschema::Validator> = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/schemas/v1"),
    )
    .expect("the schemas")
    .flatten()
    .map(|e| {
        let name = e
            .path()
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let schema: Value =
            serde_json::from_slice(&std::fs::read(e.path()).expect("read")).expect("JSON");
        let v = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("a schema");
        (name, v)
    })
    .collect();

    let _firehose = Firehose::on();
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let tap = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    ch.queue_bind(
        tap.name().clone(),
        "amq.rabbitmq.trace".into(),
        "publish.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let mut copies = ch
        .basic_consume(
            tap.name().clone(),
            "schemas".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");

    // A run that makes every kind of message: submissions over RPC and straight to RabbitMQ,
    // results of each status, events, heartbeats, receipts, a cancel, every RPC reply.
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("s1", &["--pool-max-size", "2"]);
    sys.ready(true, &["s1"]).await;
    let mut started = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    let mut finished = sys.finished_events().await;
    let (_, done) = sys
        .submit_wait(&["--type", "demo.log", "--payload", r#"{"lines":2}"#])
        .await;
    sys.submit_wait(&["--type", "demo.fail", "--payload", "{}"])
        .await;
    let direct = sys
        .client
        .publish_job(Job::new("demo.echo", json!({"a": 1})))
        .await
        .expect("published");
    rota_tests::event_of(&mut finished, direct).await;
    let unknown = sys
        .client
        .publish_job(Job::new("no.such.work", Value::Null))
        .await
        .expect("published");
    rota_tests::event_of(&mut finished, unknown).await;
    let sleeper = sys
        .client
        .submit(Job::new("demo.sleep", json!({"ms": 60000})))
        .await
        .expect("submit")
        .uuid;
    rota_tests::event_of(&mut started, sleeper).await;
    let uuid = done["uuid"].as_str().expect("uuid").to_owned();
    for args in [
        vec!["cancel", sleeper.to_string().as_str()],
        vec!["status", &uuid],
        vec!["logs", &uuid],
        vec!["list"],
        vec!["agents"],
    ] {
        sys.cli(&args).await;
    }
    rota_tests::event_of(&mut finished, sleeper).await;
    // A marker, published last: once its copy arrives, so have the copies before it.
    let marker = format!("{}.schemas-test-marker", ns.namespace());
    ch.basic_publish(
        "".into(),
        marker.as_str().into(),
        BasicPublishOptions::default(),
        b"end",
        BasicProperties::default(),
    )
    .await
    .expect("publish");

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    within(
        Duration::from_secs(60),
        "the copies up to the marker",
        async {
            while let Some(Ok(copy)) = copies.next().await {
                let headers = copy.properties.headers().clone().unwrap_or_default();
                let exchange = text(header(&headers, "exchange_name"));
                let key = text(header(&headers, "routing_keys"));
                if key == marker {
                    return;
                }
                let kind = match exchange.as_str() {
                    e if e == ns.jobs_exchange() => "job",
                    e if e == ns.events() => "event",
                    e if e == ns.heartbeats() => "heartbeat",
                    e if e == ns.control() => "agent-message",
                    "" if key == ns.results() => "results-message",
                    "" if key == ns.rpc() => "rpc-request",
                    "" if key.starts_with(&ns.agent_queue("")) => "agent-message",
                    "" if key.starts_with(ns.namespace())
                        || key.starts_with("amq.rabbitmq.reply-to") =>
                    {
                        "rpc-reply"
                    }
                    _ => continue, // another namespace's, or dead letters (invalid on purpose)
                };
                let body: Value = serde_json::from_slice(&copy.data).unwrap_or(Value::Null);
                if let Err(e) = schemas[kind].validate(&body) {
                    wrong.push(format!("{kind} via {exchange:?}/{key}: {e}\n{body}"));
                }
                *seen.entry(kind.to_owned()).or_default() += 1;
            }
        },
    )
    .await;
    assert!(
        wrong.is_empty(),
        "messages that do not match their schema:\n{}",
        wrong.join("\n")
    );
    for kind in [
        "job",
        "results-message",
        "event",
        "heartbeat",
        "agent-message",
        "rpc-request",
        "rpc-reply",
    ] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} seen: {seen:?}"
        );
    }
}
