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
//!
//! The chain: what the three hops of a job take, with nothing of Rota in them.
//!
//!   cargo run --release -p rota-worker-runtime --example broker_floor -- chain RATE [MESSAGES]
//!
//! A job crosses RabbitMQ three times between three processes: the client publishes it
//! (persistent, confirmed) to the agent, the agent publishes its result (transient,
//! confirmed) to the scheduler, and the scheduler `job.finished` (transient) to the client.
//! Here two relay processes (this program, run as `relay HOP`) stand for the agent and the
//! scheduler: each consumes a message, publishes it on, and acks it; no disk of their own, no
//! logic. MESSAGES (default 10,000) go at RATE a second, each when its time comes, through
//! the queues `rota-bench-chain-0..2` (deleted before and after). Prints one JSON line: each
//! one's time from its publish to its arrival back, as p50_ms and p99_ms, and the relays' CPU
//! per message while they ran. The relays are waited for, so their CPU counts in this
//! process's children's too.

use std::process::Stdio;
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
/// The chain's queues: to the first relay, to the second, and back.
const CHAIN: [&str; 3] = [
    "rota-bench-chain-0",
    "rota-bench-chain-1",
    "rota-bench-chain-2",
];
/// Confirms awaited at once while flooding.
const WINDOW: usize = 1_000;
/// Round trips run first and not counted.
const WARM_UP: usize = 20;
/// About the size of a no-op job.
const BODY: [u8; 256] = [b'x'; 256];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("ROTA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let words: Vec<String> = std::env::args().skip(1).collect();
    match words.first().map(String::as_str) {
        Some("chain") => return chain(&url, &words[1..]).await,
        Some("relay") => return relay(&url, &words[1..]).await,
        _ => {}
    }
    let mut args = words.iter().map(|a| {
        a.parse::<usize>().with_context(|| {
            format!("{a:?} is not a count; usage: broker_floor [MESSAGES] [ROUND_TRIPS]")
        })
    });
    let messages = args.next().transpose()?.unwrap_or(10_000);
    let round_trips = args.next().transpose()?.unwrap_or(300);
    let paced = args.next().transpose()?.unwrap_or(0);
    let rate = args.next().transpose()?.unwrap_or(1_000).max(1);
    let conn = connect(&url).await?;
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
    let mut consumer = consumer(&conn, QUEUE).await?;

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
    let paced_latencies = at_rate(&publisher, QUEUE, &mut consumer, paced, rate as f64).await?;
    let pct = percentile;
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

/// Publishes `n` messages to `queue` at `rate` a second, each when its time comes (not
/// waiting for the ones before), while consuming them from `consumer`: each one's time from
/// its publish to its delivery, sorted. Every confirm is checked once all are delivered.
async fn at_rate(
    channel: &Channel,
    queue: &str,
    consumer: &mut Consumer,
    n: usize,
    rate: f64,
) -> anyhow::Result<Vec<Duration>> {
    let sent = std::sync::Mutex::new(vec![None; n]);
    let start = tokio::time::Instant::now();
    let publish_all = async {
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            if let Ok(mut s) = sent.lock() {
                s[i] = Some(Instant::now());
            }
            confirms.push(publish_to(channel, queue, &numbered(i), true).await?);
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

/// `chain RATE [MESSAGES]`: see the module's text.
async fn chain(url: &str, args: &[String]) -> anyhow::Result<()> {
    let usage = "usage: broker_floor chain RATE [MESSAGES]";
    let rate: f64 = args.first().context(usage)?.parse().context(usage)?;
    let n: usize = args
        .get(1)
        .map_or(Ok(10_000), |a| a.parse())
        .context(usage)?;
    let conn = connect(url).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for (hop, queue) in CHAIN.iter().enumerate() {
        let _ = publisher
            .queue_delete((*queue).into(), QueueDeleteOptions::default())
            .await?;
        // Durable as Rota's jobs and results queues; the way back is the client's own, as
        // the queue a producer binds to `job.finished` (RabbitMQ 4 refuses a transient queue
        // that is not exclusive).
        let options = QueueDeclareOptions {
            durable: hop < 2,
            exclusive: hop == 2,
            ..Default::default()
        };
        publisher
            .queue_declare((*queue).into(), options, FieldTable::default())
            .await?;
    }
    let mut back = consumer(&conn, CHAIN[2]).await?;
    let me = std::env::current_exe()?;
    let mut relays = Vec::new();
    for hop in 0..2 {
        let mut relay = tokio::process::Command::new(&me)
            .args(["relay", &hop.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a relay")?;
        // A relay says it is consuming with one line.
        let out = relay.stdout.take().context("a relay's stdout")?;
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(out), &mut line)
            .await?;
        relays.push(relay);
    }
    let pids: Vec<u32> = relays.iter().filter_map(|r| r.id()).collect();
    let relays_cpu = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let cpu0 = relays_cpu();
    let latencies = at_rate(&publisher, CHAIN[0], &mut back, n, rate).await?;
    let relays_cpu_ms = (relays_cpu() - cpu0) * 1e3 / n.max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "messages": n,
            "rate": rate,
            "p50_ms": percentile(&latencies, 0.50),
            "p99_ms": percentile(&latencies, 0.99),
            "max_ms": percentile(&latencies, 1.0),
            "relays_cpu_ms": relays_cpu_ms,
        })
    );
    // Killed and waited for, so that their CPU counts in this process's children's.
    for mut relay in relays {
        relay.kill().await?;
    }
    for queue in CHAIN {
        publisher
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// `relay HOP`: consumes the chain's queue HOP and publishes each message on to the next
/// (transient and confirmed from the first relay, as the agent's results; transient from
/// the second, as `job.finished`), acking it once published. Each message on its own task,
/// as the agent runs jobs side by side: a confirm awaited holds up no other message.
async fn relay(url: &str, args: &[String]) -> anyhow::Result<()> {
    let hop: usize = args.first().context("relay HOP")?.parse()?;
    let conn = connect(url).await?;
    let out = conn.create_channel().await?;
    let confirm = hop == 0;
    if confirm {
        out.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let mut input = consumer(&conn, CHAIN[hop]).await?;
    println!("consuming");
    while let Some(delivery) = input.next().await {
        let (delivery, out) = (delivery?, out.clone());
        tokio::spawn(async move {
            let sent = publish_to(&out, CHAIN[hop + 1], &delivery.data, false).await?;
            if confirm {
                confirmed(sent.await)?;
            }
            delivery.ack(BasicAckOptions::default()).await?;
            anyhow::Ok(())
        });
    }
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {url}; is it running?"))
}

/// A consumer of `queue` on a channel of its own, with up to [`WINDOW`] messages unacked.
async fn consumer(conn: &Connection, queue: &str) -> anyhow::Result<Consumer> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(WINDOW as u16, BasicQosOptions::default())
        .await?;
    Ok(channel
        .basic_consume(
            queue.into(),
            "floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// The `p` quantile of sorted latencies, in ms.
fn percentile(latencies: &[Duration], p: f64) -> f64 {
    let i = ((latencies.len() as f64 * p).ceil() as usize).max(1) - 1;
    latencies.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// User + system CPU seconds of a process (at Linux's 100 ticks a second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A body of the usual size that starts with `i`.
fn numbered(i: usize) -> [u8; 256] {
    let mut body = BODY;
    body[..20].copy_from_slice(format!("{i:>20}").as_bytes());
    body
}

/// Publishes one persistent message to the floor's queue, returning its confirm to await.
async fn publish(channel: &Channel) -> anyhow::Result<PublisherConfirm> {
    publish_to(channel, QUEUE, &BODY, true).await
}

async fn publish_to(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    persistent: bool,
) -> anyhow::Result<PublisherConfirm> {
    let mode = if persistent { 2 } else { 1 };
    Ok(channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(mode),
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
