//! Who may send what, against the real broker: each part connects as its role's user (the
//! harness makes them with `scheduler setup-users`); RabbitMQ refuses a `user_id` that is not
//! the connection's user and what a user's permissions do not grant; the parts refuse state-
//! changing messages from a user of the wrong role.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rota_common::roles::UserRole;
use rota_tests::wire::{AgentMessage, Job, JobId, Role};
use rota_tests::{
    System, dead_letters, dead_reason, free_addrs, http_get, metric, test_user, within,
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// A channel with confirms, connected as the tests' user of `role`.
async fn channel_as(sys: &System, role: UserRole) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(&sys.url_of(role), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (conn, ch)
}

/// Publishes to queue `queue` (through the default exchange) and waits for the confirm.
async fn send(
    ch: &lapin::Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), lapin::Error> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await?
    .await
    .map(|_| ())
}

/// Waits until the agent's `/metrics` at `addr` counts `n` of `series`.
async fn agent_counts(addr: &str, series: &str, n: u64) {
    within(MINUTE, series, async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if let Some((200, text)) = http_get(addr, "/metrics").await
                && metric(&text, series) >= n
            {
                return;
            }
        }
    })
    .await;
}

/// A receipt makes an agent forget a result: one sent by an agent's user is ignored (the result
/// stays in the outbox), and one from the scheduler's user is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_from_an_agent_user_is_refused() {
    let sys = System::new().await;
    let [http] = free_addrs::<1>();
    // No scheduler: the result waits in the agent's outbox for a receipt.
    let _agent = sys.agent("r1", &["--http-addr", &http]);
    sys.ready(false, &["r1"]).await;
    let mut beats = sys.heartbeats().await;
    let mut job = Job::new("demo.echo", json!({}));
    let uuid = JobId::random();
    job.uuid = Some(uuid);
    sys.client.publish_job(job).await.expect("published");
    sys.heartbeat_where(&mut beats, Role::Agent, "r1", |hb| hb.unreceipted == 1)
        .await;

    let receipt = serde_json::to_vec(&AgentMessage::Receipt { uuid, attempt: 1 }).expect("json");
    let queue = sys.names.agent_queue("r1");
    let (_agent_conn, agent_ch) = channel_as(&sys, UserRole::Agent).await;
    let as_agent = BasicProperties::default().with_user_id(test_user(UserRole::Agent).into());
    send(&agent_ch, &queue, &receipt, as_agent)
        .await
        .expect("RabbitMQ takes it: an agent's user may publish through the default exchange");
    let forbidden = r#"rota_agent_dropped_total{input="agent_queue",reason="forbidden"}"#;
    agent_counts(&http, forbidden, 1).await;
    let hb = sys
        .heartbeat_where(&mut beats, Role::Agent, "r1", |_| true)
        .await;
    assert_eq!(hb.unreceipted, 1, "the forged receipt removed nothing");

    let (_sched_conn, sched_ch) = channel_as(&sys, UserRole::Scheduler).await;
    let as_scheduler =
        BasicProperties::default().with_user_id(test_user(UserRole::Scheduler).into());
    send(&sched_ch, &queue, &receipt, as_scheduler)
        .await
        .expect("sent");
    within(
        MINUTE,
        "the scheduler's receipt taken",
        sys.heartbeat_where(&mut beats, Role::Agent, "r1", |hb| hb.unreceipted == 0),
    )
    .await;
}

/// RabbitMQ closes the channel of a message whose user_id is not its connection's user, so
/// no part can pass for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_user_id_is_refused_by_the_broker() {
    let sys = System::new().await;
    let (_conn, ch) = channel_as(&sys, UserRole::Agent).await;
    let receipt = serde_json::to_vec(&AgentMessage::Cancel {
        uuid: JobId::random(),
    })
    .expect("json");
    let posing = BasicProperties::default().with_user_id(test_user(UserRole::Scheduler).into());
    let err = send(&ch, &sys.names.agent_queue("r1"), &receipt, posing)
        .await
        .expect_err("RabbitMQ refuses a user_id of another user");
    let text = err.to_string();
    assert!(
        text.contains("PRECONDITION_FAILED") && text.contains("user_id"),
        "{text}"
    );
}

/// An agent's user may not read the scheduler's requests (nor the results), and a producer's
/// may not publish the agents' control messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_user_cannot_read_the_rpc_queue() {
    let sys = System::new().await;
    for queue in [sys.names.rpc(), sys.names.results()] {
        let (_conn, ch) = channel_as(&sys, UserRole::Agent).await;
        let err = ch
            .basic_consume(
                queue.as_str().into(),
                "thief".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect_err("an agent's user reads neither requests nor results");
        assert!(err.to_string().contains("ACCESS_REFUSED"), "{queue}: {err}");
    }
    let (_conn, ch) = channel_as(&sys, UserRole::Producer).await;
    let err = ch
        .basic_publish(
            sys.names.control().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .expect("sent")
        .await
        .expect_err("a producer's user may not publish control messages");
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
}

/// A result from a producer's user is not recorded: it goes to the dead-letter queue with
/// its reason, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_from_a_producer_user_is_dead_lettered() {
    let sys = System::new().await;
    let [http] = free_addrs::<1>();
    let _scheduler = sys.scheduler_with(&["--http-addr", &http]);
    sys.ready(true, &[]).await;
    let admin = Connection::connect(&rota_tests::amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let dead_ch = admin.create_channel().await.expect("channel");
    let mut dead = dead_letters(&dead_ch, &sys.names).await;
    let (_conn, ch) = channel_as(&sys, UserRole::Producer).await;
    let as_producer = BasicProperties::default().with_user_id(test_user(UserRole::Producer).into());
    let forged = br#"{"uuid":"00000000-0000-4000-8000-000000000001"}"#;
    send(&ch, &sys.names.results(), forged, as_producer)
        .await
        .expect("RabbitMQ takes it");
    let d = within(MINUTE, "the dead-lettered result", dead.next())
        .await
        .expect("stream")
        .expect("delivery");
    assert_eq!(d.data, forged);
    let reason = dead_reason(&d).unwrap_or_default();
    assert!(
        reason.contains("forbidden") && reason.contains("rota-test-producer"),
        "{reason}"
    );
    let (_, text) = http_get(&http, "/metrics").await.expect("metrics");
    let series = r#"rota_scheduler_dropped_total{input="result",reason="forbidden"}"#;
    assert_eq!(metric(&text, series), 1, "{text}");
}

/// The viewer reads queues' statistics through the management API (as KEDA reads depths)
/// and no message over AMQP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_viewer_sees_queues_and_reads_no_message() {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sys = System::new().await;
    let queue = sys.names.rpc();
    let addr = rota_tests::management_url(&sys.url).replace("http://", "");
    let token = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:rota-test-password",
        test_user(UserRole::Viewer)
    ));
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("the management API answers");
    let request = format!(
        "GET /api/queues/%2F/{queue} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Basic {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("sends");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reads");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    // Its depth shows once the broker's statistics come round; the queue is visible at once.
    assert!(
        response.contains(&format!("\"name\":\"{queue}\"")),
        "{response}"
    );

    let (_conn, ch) = channel_as(&sys, UserRole::Viewer).await;
    let err = ch
        .basic_consume(
            queue.as_str().into(),
            "peek".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("the viewer reads no queue");
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
}
