//! The floor under Rota's job pipeline: what the local RabbitMQ does alone, in a bare lapin
//! loop with nothing of Rota in it. Persistent messages go into a durable queue of their own
//! (`rota-bench-floor`, deleted before and after) on a channel with publisher confirms, while
//! a consumer on another channel acks each one: publishing and consuming at once, the way a
//! job travels. `deploy/bench.sh compare` sets Rota and Celery beside it.
//!
//!   cargo run --release -p rota-worker-runtime --example broker_floor -- \
//!       [MESSAGES] [ROUND_TRIPS] [PACED RATE]
//!
//! Prints one JSON line: MESSAGES (default 10,000) published at once, first publish to the
//! last one consumed and every confirm received, in messages/s; then ROUND_TRIPS (default 300,
//! after 20 not counted) one at a time, each from its publish to its delivery and confirm,
//! as p50 and p99 in ms; then PACED messages (default none) published at RATE a second
//! (default 1,000), each when its time comes, not waiting for the ones before: each one's
//! time from its publish to its delivery, as paced_p50_ms and paced_p99_ms (the broker's own
//! share of a paced job's latency). The broker is ROTA_AMQP_URL (default the local one,
//! guest/guest).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};

const QUEUE: &str = "rota-bench-floor";
/// Confirms awaited at once while flooding.
const WINDOW: usize = 1_000;
/// Round trips run first and not counted.
const WARM_UP: usize = 20;
/// About the size of a no-op job.
const BODY: [u8; 256] = [b'x'; 256];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| {
        a.parse::<usize>().with_context(|| {
            format!("{a:?} is not a count; usage: broker_floor [MESSAGES] [ROUND_TRIPS]")
        })
    });
    let messages = args.next().transpose()?.unwrap_or(10_000);
    let round_trips = args.next().transpose()?.unwrap_or(300);
    let paced = args.next().transpose()?.unwrap_or(0);
    let rate = args.next().transpose()?.unwrap_or(1_000).max(1);
    let url = std::env::var("ROTA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {url}; is it running?"))?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let _ = publisher
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    publisher
        .queue_declare(QUEUE.into(), durable, FieldTable::default())
        .await?;
    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(WINDOW as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            QUEUE.into(),
            "floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let start = Instant::now();
    let (published, consumed) = tokio::join!(
        flood(&publisher, messages),
        consume(&mut consumer, messages)
    );
    published?;
    consumed?;
    let seconds = start.elapsed().as_secs_f64();

    let mut latencies = Vec::with_capacity(round_trips);
    for i in 0..WARM_UP + round_trips {
        let t0 = Instant::now();
        let confirm = publish(&publisher).await?;
        consume(&mut consumer, 1).await?;
        confirmed(confirm.await)?;
        if i >= WARM_UP {
            latencies.push(t0.elapsed());
        }
    }
    latencies.sort();
    let paced_latencies = at_rate(&publisher, &mut consumer, paced, rate).await?;
    let pct = |latencies: &[Duration], p: f64| -> f64 {
        let i = ((latencies.len() as f64 * p).ceil() as usize).max(1) - 1;
        latencies.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{}",
        serde_json::json!({
            "messages": messages,
            "seconds": seconds,
            "msg_per_s": messages as f64 / seconds,
            "round_trips": round_trips,
            "p50_ms": pct(&latencies, 0.50),
            "p99_ms": pct(&latencies, 0.99),
            "paced": paced,
            "rate": rate,
            "paced_p50_ms": pct(&paced_latencies, 0.50),
            "paced_p99_ms": pct(&paced_latencies, 0.99),
        })
    );
    publisher
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// Publishes `n` messages with up to [`WINDOW`] confirms outstanding, and waits for them all.
async fn flood(channel: &Channel, n: usize) -> anyhow::Result<()> {
    let mut pending = FuturesUnordered::new();
    for _ in 0..n {
        if pending.len() >= WINDOW
            && let Some(c) = pending.next().await
        {
            confirmed(c)?;
        }
        pending.push(publish(channel).await?);
    }
    while let Some(c) = pending.next().await {
        confirmed(c)?;
    }
    Ok(())
}

/// Publishes `n` messages at `rate` a second, each when its time comes (not waiting for the
/// ones before), while consuming them: each one's time from its publish to its delivery,
/// sorted. Every confirm is checked once all are delivered.
async fn at_rate(
    channel: &Channel,
    consumer: &mut Consumer,
    n: usize,
    rate: usize,
) -> anyhow::Result<Vec<Duration>> {
    let sent = std::sync::Mutex::new(vec![None; n]);
    let start = tokio::time::Instant::now();
    let publish_all = async {
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
            if let Ok(mut s) = sent.lock() {
                s[i] = Some(Instant::now());
            }
            confirms.push(publish_body(channel, &numbered(i)).await?);
        }
        anyhow::Ok(confirms)
    };
    let receive_all = async {
        let mut latencies = Vec::with_capacity(n);
        while latencies.len() < n {
            let delivery = next_delivery(consumer).await?;
            let i: usize = std::str::from_utf8(&delivery.data[..20])?.trim().parse()?;
            let t0 = sent
                .lock()
                .ok()
                .and_then(|s| s[i])
                .context("not a message of this run")?;
            latencies.push(t0.elapsed());
            delivery.ack(BasicAckOptions::default()).await?;
        }
        anyhow::Ok(latencies)
    };
    let (confirms, latencies) = tokio::join!(publish_all, receive_all);
    for c in confirms? {
        confirmed(c.await)?;
    }
    let mut latencies = latencies?;
    latencies.sort();
    Ok(latencies)
}

/// A body of the usual size that starts with `i`.
fn numbered(i: usize) -> [u8; 256] {
    let mut body = BODY;
    body[..20].copy_from_slice(format!("{i:>20}").as_bytes());
    body
}

/// Publishes one persistent message, returning its confirm to await.
async fn publish(channel: &Channel) -> anyhow::Result<PublisherConfirm> {
    publish_body(channel, &BODY).await
}

async fn publish_body(channel: &Channel, body: &[u8]) -> anyhow::Result<PublisherConfirm> {
    Ok(channel
        .basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?)
}

fn confirmed(c: lapin::Result<Confirmation>) -> anyhow::Result<()> {
    match c? {
        Confirmation::Ack(_) => Ok(()),
        other => bail!("RabbitMQ did not take a message: {other:?}"),
    }
}

/// Receives and acks `n` messages (gives up after a minute without one).
async fn consume(consumer: &mut Consumer, n: usize) -> anyhow::Result<()> {
    for _ in 0..n {
        next_delivery(consumer)
            .await?
            .ack(BasicAckOptions::default())
            .await?;
    }
    Ok(())
}

/// The next message (gives up after a minute without one).
async fn next_delivery(consumer: &mut Consumer) -> anyhow::Result<lapin::message::Delivery> {
    Ok(
        tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("no message from RabbitMQ for a minute")?
            .context("the consumer was cancelled")??,
    )
}
