//! A channel the broker closes (a message it refuses) is opened again on the same
//! connection: what the parts send on it afterwards (receipts, replies, events) arrives.

use std::time::Duration;

use rota_common::Names;
use rota_common::amqp::{Broker, ConsumeSpec, Props, QueueSpec, Startup, Topology};
use rota_tests::{amqp_url, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_the_broker_is_opened_again() {
    let ns = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let names = Names::new(&ns).expect("valid namespace");
    let queue = format!("{ns}.inbox");
    let mut topology = Topology::default();
    topology.queue(QueueSpec::private(queue.clone()));
    let broker = Broker::connect(&amqp_url(), "test channels", topology, Startup::FailFast)
        .await
        .expect("RabbitMQ must be running: deploy/setup.sh");
    let mut inbox = broker
        .consume(ConsumeSpec {
            queues: vec![queue.clone()],
            tag: "test".into(),
            prefetch: 10,
            exclusive: true,
            no_ack: false,
        })
        .await
        .expect("consumes");

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
