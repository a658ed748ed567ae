//! A channel the broker closes (a message it refuses) is opened again on the same
//! connection: what the parts send on it afterwards (receipts, replies, events) arrives.

use std::time::Duration;

use rota_common::Names;
use rota_common::amqp::{Broker, ConsumeSpec, Consumer, Props, QueueSpec, Startup, Topology};
use rota_tests::{amqp_url, within};

/// A connection that declares `queue` and consumes it, with acks and a prefetch of 10.
async fn consume(queue: QueueSpec) -> (Broker, Consumer) {
    let name = queue.name.clone();
    let mut topology = Topology::default();
    topology.queue(queue);
    let broker = Broker::connect(&amqp_url(), "test channels", topology, Startup::FailFast)
        .await
        .expect("RabbitMQ must be running: deploy/setup.sh");
    let consumer = broker
        .consume(ConsumeSpec {
            queues: vec![name],
            tag: "test".into(),
            prefetch: 10,
            exclusive: true,
            no_ack: false,
        })
        .await
        .expect("consumes");
    (broker, consumer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_the_broker_is_opened_again() {
    let ns = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let names = Names::new(&ns).expect("valid namespace");
    let queue = format!("{ns}.inbox");
    let (broker, mut inbox) = consume(QueueSpec::private(queue.clone())).await;

    // RabbitMQ closes the channel of a publish to an exchange that does not exist.
    let missing = format!("{}.missing", names.namespace());
    broker.notify(&missing, "", b"{}", &Props::default()).await;

    // What is sent afterwards on the same kind of channel arrives, with no reconnect.
    let got = within(Duration::from_secs(10), "a notification after the refused one", async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tick.tick() => { broker.notify("", &queue, b"{\"n\":1}", &Props::default()).await; }
                d = inbox.recv() => break d.expect("the consumer lives"),
            }
        }
    })
    .await;
    assert_eq!(got.body, b"{\"n\":1}");
    assert!(broker.is_connected());
    assert_eq!(broker.reconnects(), 0, "healed on the same connection");
    broker.close().await;
}

/// Acks that go together as one `multiple` ack never cover a delivery that is still held, or
/// one handed back: the held one is requeued and comes again, and every other is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_sent_together_never_cover_a_delivery_still_held() {
    let ns = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let queue = format!("{ns}.settle");
    let (broker, mut inbox) = consume(QueueSpec::durable(queue.clone())).await;
    for n in 1..=6 {
        assert!(
            broker
                .notify("", &queue, format!("{n}").as_bytes(), &Props::default())
                .await
        );
    }
    let mut held = Vec::new();
    for _ in 1..=6 {
        let d = within(Duration::from_secs(10), "six deliveries", inbox.recv()).await;
        held.push(d.expect("the consumer lives"));
    }
    let bodies: Vec<_> = held.iter().map(|d| d.body.clone()).collect();
    assert_eq!(
        bodies,
        (1..=6)
            .map(|n| format!("{n}").into_bytes())
            .collect::<Vec<_>>()
    );

    // 4 stays held while the others are acked at once: 1 to 3 can go as one ack, 5 and 6
    // cannot (4 lies below them).
    let fourth = held.remove(3);
    let acked = futures::future::join_all(held.iter().map(|d| d.ack())).await;
    assert!(acked.iter().all(|a| *a), "every ack was sent: {acked:?}");
    assert!(fourth.requeue().await);
    let again = within(
        Duration::from_secs(10),
        "the requeued delivery",
        inbox.recv(),
    )
    .await;
    let again = again.expect("the consumer lives");
    assert_eq!(again.body, b"4", "only the held delivery comes again");
    assert!(again.ack().await);
    broker.close().await;

    // Nothing went back to the queue when the connection closed: every ack covered its own.
    assert_eq!(rota_tests::messages_in(&queue).await, 0);
    let admin = Broker::connect(
        &amqp_url(),
        "test settle",
        Topology::default(),
        Startup::FailFast,
    )
    .await
    .expect("connects");
    admin.delete_queue(&queue).await.expect("deleted");
    admin.close().await;
}
