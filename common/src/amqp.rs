//! The one place that talks to lapin. A [`Broker`] is a connection that heals itself: when
//! the broker goes away it reconnects with a capped backoff, declares the topology again and
//! restores every consumer, while the rest of the code keeps reading its [`Consumer`]s and
//! calling [`Broker::publish`] as if nothing happened.
//!
//! Publishing with [`Broker::publish`] is confirmed and mandatory: it returns only once the
//! broker has taken responsibility for the message, and fails if no queue would receive it.
//! [`Broker::notify`] is the cheap, unconfirmed kind, for events and heartbeats.
//!
//! Everything published carries the connection's user as its `user_id` (RabbitMQ refuses any
//! other), and every delivery says who sent it ([`Delivery::user_id`]): see [`crate::roles`].
//!
//! `amqps://` URLs connect over TLS (rustls), verifying the broker's certificate against the
//! public roots and the CA file a URL names (`?cacertfile=PATH`); `certfile` and `keyfile`
//! present a client certificate (EXTERNAL authentication).
//!
//! The URL may list a cluster's nodes, separated by commas: a connection is made to the first
//! that answers, and after a failure to the next. What differs between RabbitMQ 3 and 4 is
//! decided per connection from the version the node announces: the kind of the jobs queues
//! ([`QueueType::Auto`]) and how a prefetch is shared among several queues.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Confirmation, Connection, ConnectionProperties, DefaultConnectionBuilder,
    ExchangeKind,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::Names;
use crate::backoff::Backoff;

mod settler;
use crate::names::QueueType;
use settler::Settler;

/// How many times a quorum queue delivers a job again before RabbitMQ 4 dead-letters it
/// silently (its default `delivery-limit`). Rota does not declare the limit (a queue declared
/// without it would then refuse the declaration); a pool agent refuses a job delivered this
/// many times before, with a reason and a `rejected` result, so RabbitMQ never drops it first.
pub const DELIVERY_LIMIT: u32 = 20;

/// What went wrong talking to the broker, by what the caller should do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// No connection (yet): try again later; the broker heals itself.
    #[error("not connected to RabbitMQ at {0}")]
    NotConnected(String),
    /// No queue is bound for this exchange and routing key: a configuration problem.
    #[error("no queue receives messages sent to exchange {exchange:?} with routing key {key:?}")]
    Unroutable { exchange: String, key: String },
    /// The broker refused to take the message (for example, a full queue).
    #[error("RabbitMQ refused the message sent to exchange {exchange:?}")]
    Nacked { exchange: String },
    /// The broker closed the channel over this message (for example, one larger than its
    /// `max_message_size`). The channel is opened again; sending the same message again
    /// will most likely be refused again.
    #[error("RabbitMQ refused a {bytes}-byte message sent to exchange {exchange:?}: {reason}")]
    Refused {
        exchange: String,
        bytes: usize,
        reason: String,
    },
    /// Someone else holds an exclusive consumer on this queue.
    #[error("queue {queue:?} is already consumed exclusively by another connection")]
    Locked { queue: String },
    #[error("RabbitMQ error: {0}")]
    Protocol(String),
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError::Protocol(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
}

/// Exchanges, queues and bindings a part needs. Declared on every (re)connect; declaring is
/// idempotent as long as the arguments agree.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    exchanges: Vec<(String, ExchangeType)>,
    queues: Vec<QueueSpec>,
    bindings: Vec<(String, String, String)>,
}

/// One queue to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    /// Survives a broker restart (with persistent messages).
    pub durable: bool,
    /// Private to this connection and deleted with it.
    pub exclusive: bool,
    pub dead_letter_exchange: Option<String>,
    /// Priorities 0 to N, for a classic queue (a quorum queue refuses `x-max-priority`).
    pub max_priority: Option<u8>,
    /// Keeps only the newest N messages (older ones are dropped).
    pub max_length: Option<u32>,
    /// Classic, or a replicated quorum queue (auto: decided by the broker's version).
    pub queue_type: QueueType,
}

impl QueueSpec {
    pub fn durable(name: String) -> Self {
        Self {
            name,
            durable: true,
            exclusive: false,
            dead_letter_exchange: None,
            max_priority: None,
            max_length: None,
            queue_type: QueueType::Classic,
        }
    }
    /// A durable queue of the deployment's kind ([`Names::jobs_queue_type`]): a quorum queue,
    /// replicated over a cluster's nodes, where the jobs queues are, so that the loss of a node
    /// stalls nothing; else a classic one.
    pub fn replicated(name: String, names: &Names) -> Self {
        Self {
            queue_type: names.jobs_queue_type(),
            ..Self::durable(name)
        }
    }

    pub fn private(name: String) -> Self {
        Self {
            name,
            durable: false,
            exclusive: true,
            dead_letter_exchange: None,
            max_priority: None,
            max_length: None,
            queue_type: QueueType::Classic,
        }
    }
}

impl Topology {
    /// What every part shares: the jobs, dead-letter, results, heartbeats and events
    /// exchanges and queues, and the RPC queue.
    pub fn core(names: &Names) -> Self {
        let mut t = Topology::default();
        t.exchange(&names.jobs_exchange(), ExchangeType::Direct)
            .exchange(&names.dead(), ExchangeType::Fanout)
            .exchange(&names.heartbeats(), ExchangeType::Fanout)
            .exchange(&names.events(), ExchangeType::Topic)
            .exchange(&names.control(), ExchangeType::Fanout)
            .queue(QueueSpec::replicated(names.dead(), names))
            .bind(&names.dead(), &names.dead(), "")
            .queue(QueueSpec::replicated(names.results(), names))
            .queue(QueueSpec::replicated(names.rpc(), names));
        t
    }

    /// What the scheduler declares: [`Topology::core`], the default jobs queue, the queue of
    /// jobs handed to it for admission and its queue of `job.started` events. Everything a
    /// namespace shares, so also what its clean-up deletes (tests, benchmarks), with each
    /// agent's queue and any other jobs queue.
    pub fn scheduler(names: &Names) -> Self {
        let mut t = Self::core(names);
        let events = names.scheduler_events();
        t.jobs_queue(names, crate::names::DEFAULT_QUEUE)
            .queue(QueueSpec::replicated(names.admit(), names))
            .queue(QueueSpec {
                max_length: Some(100_000),
                ..QueueSpec::replicated(events.clone(), names)
            })
            .bind(&events, &names.events(), "job.started.#");
        t
    }

    /// The names of its queues.
    pub fn queue_names(&self) -> impl Iterator<Item = &str> {
        self.queues.iter().map(|q| q.name.as_str())
    }

    /// The names of its exchanges.
    pub fn exchange_names(&self) -> impl Iterator<Item = &str> {
        self.exchanges.iter().map(|(name, _)| name.as_str())
    }

    /// Adds the durable queue of one named jobs queue, bound to the jobs exchange, with
    /// dead-lettering, and priorities when it is a classic queue.
    pub fn jobs_queue(&mut self, names: &Names, queue: &str) -> &mut Self {
        let name = names.jobs_queue(queue);
        let spec = QueueSpec {
            dead_letter_exchange: Some(names.dead()),
            max_priority: Some(crate::wire::MAX_PRIORITY),
            ..QueueSpec::replicated(name.clone(), names)
        };
        self.queue(spec).bind(&name, &names.jobs_exchange(), queue)
    }

    pub fn exchange(&mut self, name: &str, kind: ExchangeType) -> &mut Self {
        if !self.exchanges.iter().any(|(n, _)| n == name) {
            self.exchanges.push((name.to_owned(), kind));
        }
        self
    }

    pub fn queue(&mut self, spec: QueueSpec) -> &mut Self {
        if !self.queues.iter().any(|q| q.name == spec.name) {
            self.queues.push(spec);
        }
        self
    }

    pub fn bind(&mut self, queue: &str, exchange: &str, key: &str) -> &mut Self {
        let b = (queue.to_owned(), exchange.to_owned(), key.to_owned());
        if !self.bindings.contains(&b) {
            self.bindings.push(b);
        }
        self
    }

    /// Whether everything `other` declares is declared here already.
    fn covers(&self, other: &Topology) -> bool {
        other.exchanges.iter().all(|e| self.exchanges.contains(e))
            && other.queues.iter().all(|q| self.queues.contains(q))
            && other.bindings.iter().all(|b| self.bindings.contains(b))
    }

    fn merge(&mut self, other: &Topology) {
        for (n, k) in &other.exchanges {
            self.exchange(n, *k);
        }
        for q in &other.queues {
            self.queue(q.clone());
        }
        for (q, e, k) in &other.bindings {
            self.bind(q, e, k);
        }
    }

    /// The part of this topology that makes `queue`: its declaration and bindings.
    fn of_queue(&self, queue: &str) -> Topology {
        Topology {
            exchanges: Vec::new(),
            queues: self
                .queues
                .iter()
                .filter(|q| q.name == queue)
                .cloned()
                .collect(),
            bindings: self
                .bindings
                .iter()
                .filter(|b| b.0 == queue)
                .cloned()
                .collect(),
        }
    }

    /// Whether `queue` is a quorum queue on a broker of major version `major`.
    fn is_quorum(&self, queue: &str, major: u32) -> bool {
        self.queues
            .iter()
            .any(|q| q.name == queue && q.queue_type.is_quorum_on(major))
    }

    async fn declare(&self, ch: &lapin::Channel, major: u32) -> Result<(), BrokerError> {
        for (name, kind) in &self.exchanges {
            let kind = match kind {
                ExchangeType::Direct => ExchangeKind::Direct,
                ExchangeType::Fanout => ExchangeKind::Fanout,
                ExchangeType::Topic => ExchangeKind::Topic,
            };
            let opts = ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.exchange_declare(name.as_str().into(), kind, opts, FieldTable::default())
                .await?;
        }
        for q in &self.queues {
            let quorum = q.queue_type.is_quorum_on(major);
            let mut args = FieldTable::default();
            if let Some(dlx) = &q.dead_letter_exchange {
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(dlx.as_str().into()),
                );
            }
            if let Some(p) = q.max_priority.filter(|_| !quorum) {
                args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(p));
            }
            if let Some(n) = q.max_length {
                args.insert("x-max-length".into(), AMQPValue::LongUInt(n));
            }
            if quorum {
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
            }
            let opts = QueueDeclareOptions {
                durable: q.durable,
                exclusive: q.exclusive,
                auto_delete: q.exclusive,
                ..Default::default()
            };
            if let Err(e) = ch.queue_declare(q.name.as_str().into(), opts, args).await {
                let text = e.to_string();
                if !text.contains("x-queue-type") {
                    return Err(e.into());
                }
                let (kind, other) = if quorum {
                    ("quorum", "classic")
                } else {
                    ("classic", "quorum")
                };
                return Err(BrokerError::Protocol(format!(
                    "queue {:?} exists as a {other} queue, and this part declares it a {kind} queue \
                     (--queue-type {}; auto means quorum on RabbitMQ 4 and later): run every part with \
                     --queue-type {other} (ROTA_QUEUE_TYPE) to keep the queue, or move its jobs to a new \
                     queue (README: RabbitMQ 3, RabbitMQ 4 and clusters). RabbitMQ said: {text}",
                    q.name,
                    q.queue_type.as_str(),
                )));
            }
        }
        for (queue, exchange, key) in &self.bindings {
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(())
    }
}

/// AMQP properties Rota sets on the messages it publishes.
#[derive(Debug, Clone, Default)]
pub struct Props {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub priority: Option<u8>,
    /// String headers, e.g. `x-rota-reason`.
    pub headers: Vec<(String, String)>,
    /// Not written to disk by the broker (events, heartbeats, replies).
    pub transient: bool,
    /// Dropped by the broker if not consumed within this time (RPC requests).
    pub expiration_ms: Option<u64>,
}

impl Props {
    /// The AMQP properties, sent by broker user `user` (the connection's).
    fn to_amqp(&self, user: Option<&str>) -> BasicProperties {
        let mut p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(if self.transient { 1 } else { 2 });
        if let Some(user) = user {
            p = p.with_user_id(user.into());
        }
        if let Some(v) = &self.message_id {
            p = p.with_message_id(v.as_str().into());
        }
        if let Some(v) = &self.correlation_id {
            p = p.with_correlation_id(v.as_str().into());
        }
        if let Some(v) = &self.reply_to {
            p = p.with_reply_to(v.as_str().into());
        }
        if let Some(v) = self.priority {
            p = p.with_priority(v);
        }
        if let Some(v) = self.expiration_ms {
            p = p.with_expiration(v.to_string().into());
        }
        if !self.headers.is_empty() {
            let mut t = FieldTable::default();
            for (k, v) in &self.headers {
                t.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
            }
            p = p.with_headers(t);
        }
        p
    }
}

/// Messages larger than this are published on their own channel, one at a time.
const LARGE_MESSAGE: usize = 512 * 1024;

/// How long an ack or a requeue may take: RabbitMQ does not answer either, so this is only
/// the time to hand it to the connection.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// One message received by a [`Consumer`]. Ack it once it is safe to forget; if it is never
/// acked, RabbitMQ delivers it again after this connection ends.
#[derive(Debug)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// The broker user that published it (RabbitMQ checks it against the publishing
    /// connection's user); None when the publisher did not say.
    pub user_id: Option<String>,
    /// The headers whose values are strings.
    pub headers: BTreeMap<String, String>,
    /// How many times a quorum queue delivered this message before (`x-delivery-count`;
    /// 0 for the first delivery and for classic queues, which do not count).
    pub delivery_count: u32,
    acker: lapin::Acker,
    /// Its channel's tag for it.
    tag: u64,
    /// Settles it with the channel's other deliveries (see [`Settler`]), when its channel
    /// has one.
    settler: Option<Arc<Settler>>,
    /// Came from a consumer with `no_ack`: RabbitMQ forgot it when it sent it.
    auto_acked: bool,
    /// Counts this delivery among its consumer's unsettled ones while it lives.
    _held: HeldGuard,
}

impl Delivery {
    fn from_lapin(
        d: lapin::message::Delivery,
        held: HeldGuard,
        settler: Option<Arc<Settler>>,
        auto_acked: bool,
    ) -> Self {
        let p = &d.properties;
        let mut headers = BTreeMap::new();
        let mut delivery_count = 0;
        if let Some(table) = p.headers() {
            for (k, v) in table {
                if k.as_str() == "x-delivery-count" {
                    delivery_count = match v {
                        AMQPValue::LongLongInt(n) => u32::try_from(*n).unwrap_or(u32::MAX),
                        AMQPValue::LongInt(n) => u32::try_from(*n).unwrap_or(u32::MAX),
                        AMQPValue::LongUInt(n) => *n,
                        _ => 0,
                    };
                    continue;
                }
                let text = match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.as_str().to_owned(),
                    _ => continue,
                };
                headers.insert(k.as_str().to_owned(), text);
            }
        }
        Self {
            routing_key: d.routing_key.as_str().to_owned(),
            message_id: p.message_id().as_ref().map(|s| s.as_str().to_owned()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.as_str().to_owned()),
            reply_to: p.reply_to().as_ref().map(|s| s.as_str().to_owned()),
            user_id: p.user_id().as_ref().map(|s| s.as_str().to_owned()),
            headers,
            delivery_count,
            body: d.data,
            acker: d.acker,
            tag: d.delivery_tag,
            settler,
            auto_acked,
            _held: held,
        }
    }

    /// Tells the broker the message is handled. False if the channel it came on is gone (the
    /// broker will deliver it again).
    pub async fn ack(&self) -> bool {
        if self.auto_acked {
            return true;
        }
        if let Some(settler) = &self.settler {
            return settler.settle(self.tag, &self.acker, false).await;
        }
        settler::ack(&self.acker, false).await
    }

    /// Hands the message back to its queue, to be delivered again (not one RabbitMQ forgot
    /// already: false).
    pub async fn requeue(&self) -> bool {
        if self.auto_acked {
            return false;
        }
        if let Some(settler) = &self.settler {
            return settler.settle(self.tag, &self.acker, true).await;
        }
        settler::requeue(&self.acker).await
    }
}

/// What to consume, restored after every reconnect.
#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    /// Queues consumed together; `prefetch` is shared among them.
    pub queues: Vec<String>,
    /// Shown in the RabbitMQ UI as the consumer tag (suffixed with the queue name).
    pub tag: String,
    /// How many unacked deliveries this consumer may hold at once, all queues together, on
    /// every broker (see [`prefetch_shares`]); 0 for no limit.
    pub prefetch: u16,
    /// Refuse to share the queue with any other consumer.
    pub exclusive: bool,
    /// RabbitMQ forgets a message once it has sent it (no acks, and no prefetch): for
    /// notifications on a private queue (events, heartbeats, replies), where a message lost
    /// with its consumer is no loss and an ack per message would only cost the broker.
    pub no_ack: bool,
}

/// How a prefetch of `prefetch` is held to over `queues` queues: None when the channel shares
/// it (`global`: RabbitMQ 3's global QoS, with classic queues only), else each queue's
/// consumer's part, adding up to it (RabbitMQ 4 applies a prefetch to each consumer, global
/// QoS or not: it is deprecated there, and refused by default from 4.3; quorum queues never
/// shared one). A part needs one delivery at least, so a prefetch smaller than the number of
/// queues cannot be split.
pub fn prefetch_shares(
    prefetch: u16,
    queues: usize,
    global: bool,
) -> Result<Option<Vec<u16>>, String> {
    if global && queues > 1 {
        return Ok(None);
    }
    let n = u16::try_from(queues).unwrap_or(u16::MAX).max(1);
    if prefetch == 0 {
        return Ok(Some(vec![0; queues]));
    }
    if prefetch < n {
        return Err(format!(
            "a prefetch of {prefetch} cannot be split among {queues} queues (RabbitMQ 4 and quorum \
             queues apply a prefetch to each queue's consumer, and each needs one delivery at \
             least): consume at most {prefetch} queues at once (a pool agent: a --pool-max-size, or a --prefetch, \
             at least its number of --queue)"
        ));
    }
    Ok(Some(
        (0..n)
            .map(|i| prefetch / n + u16::from(i < prefetch % n))
            .collect(),
    ))
}

struct Subscription {
    spec: ConsumeSpec,
    tx: mpsc::Sender<Delivery>,
    /// Set by [`Consumer::stop`]: do not restore, and an ending stream is not a failure.
    stopped: AtomicBool,
    /// The queues not consumed until resumed ([`Consumer::pause`]); their pumps wait.
    paused: watch::Sender<BTreeSet<String>>,
    channel: Mutex<Option<lapin::Channel>>,
}

impl Subscription {
    fn is_paused(&self, queue: &str) -> bool {
        self.paused.borrow().contains(queue)
    }

    /// Cancels the consumer of `queue` on the subscription's channel.
    async fn cancel(&self, queue: &str) {
        let ch = self.channel.lock().map(|c| c.clone()).unwrap_or_default();
        if let Some(ch) = ch {
            let tag = consumer_tag(&self.spec.tag, queue);
            let _ = ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
    }
}

/// Deliveries of one [`ConsumeSpec`], across reconnects.
pub struct Consumer {
    rx: mpsc::Receiver<Delivery>,
    /// Weak: the broker and the pumps own the sending side, so the stream ends with them.
    sub: std::sync::Weak<Subscription>,
}

impl Consumer {
    /// The next delivery; None once the consumer is stopped and drained, or the broker closed.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// A delivery that has already arrived, without waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// Asks the broker to send no more; deliveries already received can still be acked. The
    /// ones still buffered here are returned by [`Consumer::drain`].
    pub async fn stop(&self) {
        let Some(sub) = self.sub.upgrade() else {
            return;
        };
        sub.stopped.store(true, Ordering::SeqCst);
        for q in &sub.spec.queues {
            sub.cancel(q).await;
        }
    }

    /// Stops consuming one of the queues (`basic.cancel`: the RabbitMQ UI shows no consumer
    /// of it from here), across reconnects, until [`Consumer::resume`]. Deliveries of it
    /// already received are still delivered here, and can be settled as ever. False when it
    /// was paused already.
    pub async fn pause(&self, queue: &str) -> bool {
        let Some(sub) = self.sub.upgrade() else {
            return false;
        };
        if !sub.paused.send_if_modified(|p| p.insert(queue.to_owned())) {
            return false;
        }
        sub.cancel(queue).await;
        true
    }

    /// Consumes a paused queue again, on the same channel. False when it was not paused.
    pub fn resume(&self, queue: &str) -> bool {
        self.sub
            .upgrade()
            .is_some_and(|sub| sub.paused.send_if_modified(|p| p.remove(queue)))
    }

    /// What arrived but was not taken yet (call after [`Consumer::stop`]).
    pub fn drain(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Ok(d) = self.rx.try_recv() {
            out.push(d);
        }
        out
    }
}

fn consumer_tag(tag: &str, queue: &str) -> String {
    format!("{tag}@{queue}")
}

/// The unsettled deliveries of one queue's consumers on one channel: the one that runs, and
/// those RabbitMQ cancelled before it (their deliveries can still be acked on the channel).
/// A consumer made again after a cancel leaves room for them in its prefetch.
#[derive(Debug, Default)]
struct Held {
    count: AtomicUsize,
    settled: tokio::sync::Notify,
}

/// One delivery's place in its [`Held`] count, given back when the delivery is dropped.
#[derive(Debug)]
struct HeldGuard(Arc<Held>);

impl HeldGuard {
    fn new(held: &Arc<Held>) -> Self {
        held.count.fetch_add(1, Ordering::SeqCst);
        Self(held.clone())
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.settled.notify_waiters();
    }
}

/// Everything one connection attempt built.
struct Live {
    conn: Connection,
    /// Publishes with confirms ([`Broker::publish`]).
    confirm: Reopening,
    /// Publishes with confirms of large messages, one at a time: the broker may refuse one
    /// (over its `max_message_size`) by closing its channel, and a publish sent on a channel
    /// while the broker closes it costs the whole connection (`CHANNEL_ERROR - expected
    /// 'channel.open'`). So those never share a channel with the rest, nor race each other.
    large: Reopening,
    /// Declares, and publishes without confirms ([`Broker::notify`]).
    plain: Reopening,
    /// Cancelled when the connection fails; the supervisor then reconnects.
    lost: CancellationToken,
    /// The broker's own: cancelled by [`Broker::close`], which ends every consumer pump.
    closing: CancellationToken,
    /// The node's RabbitMQ major version (4 when it cannot be read).
    major: u32,
    /// The user this connection logged in as, set as the `user_id` of what it publishes.
    user: Option<String>,
}

/// A channel that is opened again on the same connection when the broker closes it: one
/// refused message (too large, a declare with other arguments) must not end the
/// connection, nor leave the channel dead while everything that shares it fails quietly.
struct Reopening {
    channel: Mutex<lapin::Channel>,
    confirms: bool,
    /// Held while reopening, so that callers who saw the same broken channel make one new one.
    reopening: tokio::sync::Mutex<()>,
}

impl Reopening {
    async fn open(conn: &Connection, confirms: bool) -> Result<Self, lapin::Error> {
        Ok(Self {
            channel: Mutex::new(Self::new_channel(conn, confirms).await?),
            confirms,
            reopening: tokio::sync::Mutex::new(()),
        })
    }

    async fn new_channel(
        conn: &Connection,
        confirms: bool,
    ) -> Result<lapin::Channel, lapin::Error> {
        let ch = conn.create_channel().await?;
        if confirms {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
        }
        Ok(ch)
    }

    /// The channel to use now.
    fn get(&self) -> Option<lapin::Channel> {
        self.channel.lock().ok().map(|c| c.clone())
    }

    fn is_open(&self) -> bool {
        self.get().is_some_and(|c| c.status().connected())
    }

    /// Opens a new channel if the current one is closed (a no-op when another caller did).
    async fn heal(&self, conn: &Connection) -> Result<(), lapin::Error> {
        let _one_at_a_time = self.reopening.lock().await;
        if self.is_open() || !conn.status().connected() {
            return Ok(());
        }
        let fresh = Self::new_channel(conn, self.confirms).await?;
        tracing::info!(
            confirms = self.confirms,
            "RabbitMQ closed a channel; opened a new one on the same connection"
        );
        if let Ok(mut slot) = self.channel.lock() {
            *slot = fresh;
        }
        Ok(())
    }
}

impl Live {
    /// After an error on one of the shared channels: a new channel when only the channel was
    /// closed, a new connection when the connection is gone or the channel cannot be reopened.
    async fn heal(&self, which: &Reopening) {
        if !self.conn.status().connected() {
            self.lost.cancel();
            return;
        }
        if let Err(e) = which.heal(&self.conn).await {
            tracing::warn!(error = %e, "cannot open a new channel; reconnecting");
            self.lost.cancel();
        }
    }

    fn plain(&self) -> Result<lapin::Channel, BrokerError> {
        self.plain
            .get()
            .ok_or_else(|| BrokerError::Protocol("the channel is unusable".into()))
    }
}

struct Inner {
    /// The nodes' URLs, with the client's defaults.
    urls: Vec<String>,
    /// Which of them to try first: the one connected to, or the next after it failed.
    node: AtomicUsize,
    /// Each node's RabbitMQ major version, read at the first connection to it (and kept: a
    /// node upgraded meanwhile leaves this part as it started).
    majors: Mutex<Vec<Option<u32>>>,
    display_url: String,
    name: String,
    /// What is declared, and declared again on every new connection.
    topology: Mutex<Topology>,
    /// Held while declaring more: a caller that needs the same must wait for it to exist.
    declaring: tokio::sync::Mutex<()>,
    /// Held while a large message is published (see `Live::large`).
    large: tokio::sync::Mutex<()>,
    live: watch::Sender<Option<Arc<Live>>>,
    subs: Mutex<Vec<Arc<Subscription>>>,
    closing: CancellationToken,
    reconnects: AtomicU64,
    /// How long a confirmed publish waits for a connection before giving up.
    publish_wait: Duration,
}

/// A self-healing connection to RabbitMQ. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.inner.display_url)
            .field("name", &self.inner.name)
            .finish()
    }
}

/// How [`Broker::connect`] treats a broker that does not answer at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// Keep trying with backoff (daemons: the broker may start after them).
    Retry,
    /// Fail at once with a clear error (command-line tools).
    FailFast,
}

impl Broker {
    /// Connects (see [`Startup`]) to the first node of `url` that answers (one URL, or several
    /// separated by commas), declares `topology`, and keeps the connection alive until
    /// [`Broker::close`]. `name` shows in the RabbitMQ UI's connections list.
    pub async fn connect(
        url: &str,
        name: &str,
        topology: Topology,
        startup: Startup,
    ) -> Result<Broker, BrokerError> {
        let (live, _) = watch::channel(None);
        let urls: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(BrokerError::Protocol(
                "no RabbitMQ URL: set ROTA_AMQP_URL (or --amqp-url), e.g. amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            ));
        }
        if let Some(url) = urls.iter().find(|u| external_without_user(u)) {
            return Err(BrokerError::Protocol(format!(
                "{} logs in with a client certificate (auth_mechanism=external) but names no \
                 user: name the certificate's user in it \
                 (amqps://USER@host/%2f?auth_mechanism=external), the user_id that every \
                 message this part publishes carries",
                redact(url)
            )));
        }
        let inner = Arc::new(Inner {
            urls: urls.iter().map(|u| with_defaults(u)).collect(),
            node: AtomicUsize::new(0),
            majors: Mutex::new(vec![None; urls.len()]),
            display_url: urls.iter().map(|u| redact(u)).collect::<Vec<_>>().join(","),
            name: name.to_owned(),
            topology: Mutex::new(topology),
            declaring: tokio::sync::Mutex::new(()),
            large: tokio::sync::Mutex::new(()),
            live,
            subs: Mutex::new(Vec::new()),
            closing: CancellationToken::new(),
            reconnects: AtomicU64::new(0),
            publish_wait: Duration::from_secs(30),
        });
        let broker = Broker { inner };
        let mut backoff = Backoff::for_connections();
        loop {
            match broker.open().await {
                Ok(live) => {
                    broker.inner.live.send_replace(Some(live));
                    break;
                }
                Err(e) if startup == Startup::FailFast => {
                    return Err(BrokerError::Protocol(format!(
                        "cannot reach RabbitMQ at {}: {e}. Is it running? `deploy/setup.sh` starts one \
                         on this host; ROTA_AMQP_URL (or --amqp-url) points elsewhere",
                        broker.inner.display_url
                    )));
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(url = %broker.inner.display_url, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "cannot connect to RabbitMQ, or declare Rota's exchanges and queues there; \
                         retrying (start it, check --amqp-url, or see the error)");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        tokio::spawn(broker.clone().supervise());
        Ok(broker)
    }

    /// The URL without its password, for messages.
    pub fn display_url(&self) -> &str {
        &self.inner.display_url
    }

    /// Whether the connection and its shared channels are up now.
    pub fn is_connected(&self) -> bool {
        self.inner
            .live
            .borrow()
            .as_ref()
            .is_some_and(|l| !l.lost.is_cancelled() && l.plain.is_open() && l.confirm.is_open())
    }

    /// How many times the connection was lost and made again.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Resolves once the connection has been made again more than `seen` times in all (see
    /// [`Broker::reconnects`]) and is live: for resending what may have been lost with the
    /// broker. A caller that keeps the count it last acted on misses no reconnect, not even
    /// one that came while it was busy (a pass that waited for the broker while it was away).
    pub fn reconnected_since(&self, seen: u64) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.live.subscribe();
        let inner = self.inner.clone();
        async move {
            let _ = rx
                .wait_for(|l| l.is_some() && inner.reconnects.load(Ordering::Relaxed) > seen)
                .await;
        }
    }

    /// Declares more topology now, and again after every reconnect. What this broker
    /// declared already costs nothing, so callers need not remember what they declared.
    pub async fn declare(&self, extra: Topology) -> Result<(), BrokerError> {
        let covered = || self.inner.topology.lock().is_ok_and(|t| t.covers(&extra));
        if covered() {
            return Ok(());
        }
        // Only what RabbitMQ has confirmed counts as declared: a publisher that finds its
        // queue "covered" must be able to route to it at once.
        let _declaring = self.inner.declaring.lock().await;
        if covered() {
            return Ok(());
        }
        let live = self.wait_live().await?;
        if let Err(e) = extra.declare(&live.plain()?, live.major).await {
            live.heal(&live.plain).await;
            return Err(e);
        }
        if let Ok(mut t) = self.inner.topology.lock() {
            t.merge(&extra);
        }
        Ok(())
    }

    /// Deletes a queue (tests and tools clean up with it).
    pub async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        let live = self.wait_live().await?;
        live.plain()?
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// How many consumers `queue` has now (a passive declare): whether anyone reads it.
    pub async fn consumers(&self, queue: &str) -> Result<u32, BrokerError> {
        let live = self.wait_live().await?;
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match live
            .plain()?
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await
        {
            Ok(q) => Ok(q.consumer_count()),
            Err(e) => {
                live.heal(&live.plain).await;
                Err(e.into())
            }
        }
    }

    /// Deletes an exchange.
    pub async fn delete_exchange(&self, name: &str) -> Result<(), BrokerError> {
        let live = self.wait_live().await?;
        live.plain()?
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// Starts consuming; restored after every reconnect until [`Consumer::stop`]. Fails with
    /// [`BrokerError::Locked`] if `exclusive` and another connection holds the queue.
    pub async fn consume(&self, spec: ConsumeSpec) -> Result<Consumer, BrokerError> {
        self.consume_paused(spec, BTreeSet::new()).await
    }

    /// [`Broker::consume`], with the queues in `paused` paused from the start (see
    /// [`Consumer::pause`]).
    pub async fn consume_paused(
        &self,
        spec: ConsumeSpec,
        paused: BTreeSet<String>,
    ) -> Result<Consumer, BrokerError> {
        let capacity = usize::from(spec.prefetch.max(1)) * spec.queues.len().max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let sub = Arc::new(Subscription {
            spec,
            tx,
            stopped: AtomicBool::new(false),
            paused: watch::Sender::new(paused),
            channel: Mutex::new(None),
        });
        let live = self.wait_live().await?;
        start_consumer(&live, &sub, &self.topology()).await?;
        let weak = Arc::downgrade(&sub);
        if let Ok(mut subs) = self.inner.subs.lock() {
            subs.push(sub);
        }
        Ok(Consumer { rx, sub: weak })
    }

    /// Publishes a persistent, mandatory message and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: &Props,
    ) -> Result<(), BrokerError> {
        let live = self.wait_live().await?;
        let opts = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let (which, _one_at_a_time) = if body.len() > LARGE_MESSAGE {
            (&live.large, Some(self.inner.large.lock().await))
        } else {
            (&live.confirm, None)
        };
        let channel = which
            .get()
            .ok_or_else(|| BrokerError::Protocol("the channel is unusable".into()))?;
        let sent = async {
            channel
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    opts,
                    body,
                    props.to_amqp(live.user.as_deref()),
                )
                .await?
                .await
        };
        // Closing, or losing the connection, abandons a publish in flight (lapin may never
        // settle it once the connection is gone): the caller keeps what it could not publish.
        let sent = tokio::select! {
            sent = sent => sent,
            _ = self.inner.closing.cancelled() => {
                return Err(BrokerError::NotConnected(self.inner.display_url.clone()));
            }
            _ = live.lost.cancelled() => {
                return Err(BrokerError::NotConnected(self.inner.display_url.clone()));
            }
        };
        let confirm = match sent {
            Ok(confirm) => confirm,
            Err(e) => {
                live.heal(which).await;
                return Err(match channel_error_text(&e) {
                    Some(reason) => BrokerError::Refused {
                        exchange: exchange.into(),
                        bytes: body.len(),
                        reason,
                    },
                    None => e.into(),
                });
            }
        };
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable {
                exchange: exchange.into(),
                key: key.into(),
            }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                exchange: exchange.into(),
            }),
            Confirmation::NotRequested => {
                Err(BrokerError::Protocol("publisher confirms are off".into()))
            }
        }
    }

    /// Publishes without waiting for a confirm, and drops the message when not connected:
    /// for events, heartbeats and replies, which are notifications, not records. A channel
    /// the broker closed over one of them is opened again. Returns whether the message was
    /// handed to the connection (false: surely not sent).
    pub async fn notify(&self, exchange: &str, key: &str, body: &[u8], props: &Props) -> bool {
        let live = self.inner.live.borrow().clone();
        let Some(live) = live else { return false };
        let Some(channel) = live.plain.get() else {
            return false;
        };
        let opts = BasicPublishOptions::default();
        let amqp = props.to_amqp(live.user.as_deref());
        let sent = channel.basic_publish(exchange.into(), key.into(), opts, body, amqp);
        // Bounded like an ack: on a connection going away lapin may never settle the send,
        // and a caller (the scheduler's recording) must not wait on a notification for ever.
        let sent = tokio::time::timeout(SETTLE_WAIT, sent);
        let failed = tokio::select! {
            sent = sent => match sent {
                Ok(sent) => sent.err().map(|e| e.to_string()),
                Err(_) => Some(format!("not handed to the connection within {SETTLE_WAIT:?}")),
            },
            _ = live.lost.cancelled() => Some("the connection was lost".into()),
            _ = self.inner.closing.cancelled() => None,
        };
        if let Some(e) = &failed {
            tracing::debug!(exchange, key, error = %e, "notification not sent");
        }
        if !channel.status().connected() && !self.inner.closing.is_cancelled() {
            live.heal(&live.plain).await;
        }
        failed.is_none()
    }

    /// Closes the connection: consumers end, unacked deliveries return to their queues.
    pub async fn close(&self) {
        self.inner.closing.cancel();
        let live = self.inner.live.send_replace(None);
        if let Some(live) = live {
            // RabbitMQ answers a close at once; if it does not, dropping the socket is as
            // good (unacked deliveries go back to their queues either way).
            let close = live.conn.close(200, "bye".into());
            if tokio::time::timeout(Duration::from_secs(5), close)
                .await
                .is_err()
            {
                tracing::warn!(
                    "RabbitMQ did not confirm the close within 5 s; dropping the connection"
                );
            }
        }
        // Dropping the subscriptions (after the connection, so that their channels do not
        // race it with closes of their own) lets every Consumer end: the pumps have stopped.
        if let Ok(mut subs) = self.inner.subs.lock() {
            subs.clear();
        }
    }

    async fn wait_live(&self) -> Result<Arc<Live>, BrokerError> {
        let mut rx = self.inner.live.subscribe();
        let wait = rx.wait_for(|l| l.is_some());
        let not_connected = || BrokerError::NotConnected(self.inner.display_url.clone());
        tokio::select! {
            r = tokio::time::timeout(self.inner.publish_wait, wait) => {
                match r {
                    Ok(Ok(live)) => live.clone().ok_or_else(not_connected),
                    _ => Err(not_connected()),
                }
            }
            _ = self.inner.closing.cancelled() => Err(not_connected()),
        }
    }

    fn topology(&self) -> Topology {
        self.inner
            .topology
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    /// One connection attempt to each node in turn, from the one to try first, until one
    /// answers.
    async fn open(&self) -> Result<Arc<Live>, BrokerError> {
        let n = self.inner.urls.len();
        let first = self.inner.node.load(Ordering::SeqCst);
        let mut failed = None;
        for at in (first..first + n).map(|i| i % n) {
            let url = &self.inner.urls[at];
            match self.open_at(at).await {
                Ok(live) => {
                    self.inner.node.store(at, Ordering::SeqCst);
                    if n > 1 {
                        tracing::info!(node = %redact(url), rabbitmq = live.major, "connected to RabbitMQ node {} of {n}", at + 1);
                    }
                    return Ok(live);
                }
                Err(e) => {
                    if n > 1 {
                        tracing::warn!(node = %redact(url), error = %e, "RabbitMQ node {} of {n} does not answer; trying the next", at + 1);
                    }
                    failed = Some(e);
                }
            }
        }
        Err(failed.unwrap_or_else(|| BrokerError::NotConnected(self.inner.display_url.clone())))
    }

    /// One connection attempt to node `at`: connect, declare, open channels, restore consumers.
    async fn open_at(&self, at: usize) -> Result<Arc<Live>, BrokerError> {
        let url = &self.inner.urls[at];
        let known = self.inner.majors.lock().ok().and_then(|m| m[at]);
        let major = match known {
            Some(major) => major,
            None => match announced_major(url).await {
                Some(major) => {
                    if let Ok(mut m) = self.inner.majors.lock() {
                        m[at] = Some(major);
                    }
                    major
                }
                None => {
                    tracing::debug!(node = %redact(url), "cannot read the RabbitMQ version (amqps://, or no answer); taking it for 4");
                    4
                }
            },
        };
        let props =
            ConnectionProperties::default().with_connection_name(self.inner.name.as_str().into());
        let builder = DefaultConnectionBuilder::new()?
            .with_uri_str(url.clone())
            .with_properties(props)
            .with_tls_config(tls_config(url)?);
        let connect = builder.connect();
        let conn = tokio::time::timeout(Duration::from_secs(15), connect)
            .await
            .map_err(|_| BrokerError::Protocol("connection attempt timed out after 15 s".into()))?
            .map_err(|e| connect_error(e, url))?;
        let lost = CancellationToken::new();
        let mut events = conn.events_listener();
        let on_loss = lost.clone();
        let closing = self.inner.closing.clone();
        let channel_closed = Arc::new(tokio::sync::Notify::new());
        let on_channel_closed = channel_closed.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let lapin::Event::Error(e) = event {
                    if is_channel_error(&e) {
                        // One channel closed by the broker; the connection lives on. A
                        // shared channel is opened again at once; a consumer on it ends
                        // its stream, which triggers a reconnect.
                        tracing::debug!(error = %e, "a channel was closed by RabbitMQ");
                        on_channel_closed.notify_one();
                        continue;
                    }
                    if !closing.is_cancelled() {
                        tracing::warn!(error = %e, "connection to RabbitMQ lost");
                    }
                    on_loss.cancel();
                    break;
                }
            }
            on_loss.cancel();
        });
        let plain = Reopening::open(&conn, false).await?;
        let topology = self.topology();
        if let Some(ch) = plain.get() {
            topology.declare(&ch, major).await?;
        }
        let confirm = Reopening::open(&conn, true).await?;
        let large = Reopening::open(&conn, true).await?;
        let live = Arc::new(Live {
            conn,
            confirm,
            large,
            plain,
            lost,
            closing: self.inner.closing.clone(),
            major,
            user: url_user(url),
        });
        // The shared channels are opened again as soon as the broker closes one, so that
        // receipts, replies and events do not vanish into a dead channel until someone
        // notices.
        let healer = live.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = channel_closed.notified() => {
                        healer.heal(&healer.plain).await;
                        healer.heal(&healer.confirm).await;
                        healer.heal(&healer.large).await;
                    }
                    _ = healer.lost.cancelled() => return,
                    _ = healer.closing.cancelled() => return,
                }
            }
        });
        let subs: Vec<Arc<Subscription>> = self
            .inner
            .subs
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        for sub in subs
            .iter()
            .filter(|s| !s.stopped.load(Ordering::SeqCst) && !s.tx.is_closed())
        {
            if let Err(e) = start_consumer(&live, sub, &topology).await {
                let _ = live.conn.close(200, "retrying".into()).await;
                return Err(e);
            }
        }
        Ok(live)
    }

    /// Watches the live connection and makes a new one when it fails, until closed.
    async fn supervise(self) {
        let mut backoff = Backoff::for_connections();
        loop {
            let live = self.inner.live.borrow().clone();
            let Some(live) = live else { return };
            tokio::select! {
                _ = live.lost.cancelled() => {}
                _ = self.inner.closing.cancelled() => return,
            }
            self.inner.live.send_replace(None);
            let _ = live.conn.close(200, "reconnecting".into()).await;
            // After a failure, the next node first (the same one when there is only one).
            let n = self.inner.urls.len();
            let _ = self
                .inner
                .node
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |i| Some((i + 1) % n));
            loop {
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.inner.closing.cancelled() => return,
                }
                match self.open().await {
                    Ok(live) => {
                        self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(url = %self.inner.display_url, attempts = backoff.attempts(), "reconnected to RabbitMQ");
                        backoff.reset();
                        if self.inner.closing.is_cancelled() {
                            let _ = live.conn.close(200, "bye".into()).await;
                            return;
                        }
                        self.inner.live.send_replace(Some(live));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(url = %self.inner.display_url, error = %e, attempt = backoff.attempts(),
                        "reconnect to RabbitMQ failed; retrying")
                    }
                }
            }
        }
    }
}

/// Opens a channel for `sub` on `live` and pumps its deliveries into the subscription, with
/// its prefetch held to on this broker (see [`prefetch_shares`]).
async fn start_consumer(
    live: &Arc<Live>,
    sub: &Arc<Subscription>,
    topology: &Topology,
) -> Result<(), BrokerError> {
    let queues = &sub.spec.queues;
    let global = live.major < 4 && !queues.iter().any(|q| topology.is_quorum(q, live.major));
    let shares =
        prefetch_shares(sub.spec.prefetch, queues.len(), global).map_err(BrokerError::Protocol)?;
    let ch = live.conn.create_channel().await?;
    if sub.spec.exclusive {
        // Quorum queues accept a second "exclusive" consumer: an exclusive queue named after
        // the queue, which only one connection can hold, keeps the others out instead.
        for queue in queues.iter().filter(|q| topology.is_quorum(q, live.major)) {
            let opts = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            };
            let lock = format!("{queue}.exclusive");
            ch.queue_declare(lock.as_str().into(), opts, FieldTable::default())
                .await
                .map_err(|e| refusal(e, queue))?;
        }
    }
    if shares.is_none() {
        // global = true: RabbitMQ 3 then shares the prefetch among the channel's consumers.
        ch.basic_qos(sub.spec.prefetch, BasicQosOptions { global: true })
            .await?;
    }
    // Acks go several at once where the channel carries one consumer (see [`Settler`]).
    let settler = (queues.len() == 1 && !sub.spec.no_ack).then(Settler::start);
    for (i, queue) in queues.iter().enumerate() {
        let share = shares.as_ref().map(|s| s[i]);
        let held = Arc::new(Held::default());
        let consumer = if sub.is_paused(queue) {
            None
        } else {
            Some(consume_one(&ch, sub, queue, share).await?)
        };
        let pump = Pump {
            ch: ch.clone(),
            sub: sub.clone(),
            queue: queue.clone(),
            share,
            held,
            settler: settler.clone(),
            topology: topology.of_queue(queue),
            major: live.major,
            lost: live.lost.clone(),
            closing: live.closing.clone(),
        };
        tokio::spawn(pump.run(consumer));
    }
    if let Ok(mut slot) = sub.channel.lock() {
        *slot = Some(ch);
    }
    // A pause that came meanwhile cancelled the consumer on the channel before this one.
    for queue in queues.iter().filter(|q| sub.is_paused(q)) {
        sub.cancel(queue).await;
    }
    Ok(())
}

/// Starts one queue's consumer on `ch`, with a prefetch of its own (`share`) unless the
/// channel's is shared.
async fn consume_one(
    ch: &lapin::Channel,
    sub: &Subscription,
    queue: &str,
    share: Option<u16>,
) -> Result<lapin::Consumer, BrokerError> {
    if let Some(share) = share {
        // Applies to the consumers started after it on this channel: this one.
        ch.basic_qos(share, BasicQosOptions { global: false })
            .await?;
    }
    let opts = BasicConsumeOptions {
        exclusive: sub.spec.exclusive,
        no_ack: sub.spec.no_ack,
        ..Default::default()
    };
    let tag = consumer_tag(&sub.spec.tag, queue);
    ch.basic_consume(
        queue.into(),
        tag.as_str().into(),
        opts,
        FieldTable::default(),
    )
    .await
    .map_err(|e| refusal(e, queue))
}

/// [`BrokerError::Locked`] when RabbitMQ refused `queue` because another connection holds it.
fn refusal(e: lapin::Error, queue: &str) -> BrokerError {
    let text = e.to_string();
    if text.contains("ACCESS_REFUSED")
        || text.contains("RESOURCE_LOCKED")
        || text.contains("exclusive")
    {
        BrokerError::Locked {
            queue: queue.to_owned(),
        }
    } else {
        BrokerError::Protocol(text)
    }
}

/// Moves one queue's deliveries into its subscription, and starts its consumer again when
/// RabbitMQ cancels it (`basic.cancel`: the queue was deleted, a consumer timeout, its leader
/// moved), on the same channel, so that what it delivered can still be acked.
struct Pump {
    ch: lapin::Channel,
    sub: Arc<Subscription>,
    queue: String,
    share: Option<u16>,
    held: Arc<Held>,
    settler: Option<Arc<Settler>>,
    /// The queue's declaration, made again before consuming it again (it may be gone).
    topology: Topology,
    major: u32,
    lost: CancellationToken,
    closing: CancellationToken,
}

impl Pump {
    /// The pump ends when the broker closes, whatever lapin's stream does then: it holds a
    /// sender, and the Consumer ends only when every sender is gone. A delivery dropped here
    /// goes back to its queue when the connection closes. Without a consumer (its queue is
    /// paused), it starts with waiting for the queue's resume.
    async fn run(self, consumer: Option<lapin::Consumer>) {
        let mut consumer = match consumer {
            Some(consumer) => consumer,
            None => match self.after_pause().await {
                Ok(consumer) => consumer,
                Err(_) => return self.ended(),
            },
        };
        loop {
            let item = tokio::select! {
                item = consumer.next() => item,
                _ = self.closing.cancelled() => return,
            };
            match item {
                Some(Ok(d)) => {
                    if let Some(settler) = &self.settler {
                        settler.delivered(d.delivery_tag);
                    }
                    let held = HeldGuard::new(&self.held);
                    let d =
                        Delivery::from_lapin(d, held, self.settler.clone(), self.sub.spec.no_ack);
                    tokio::select! {
                        sent = self.sub.tx.send(d) => if sent.is_err() {
                            return; // the owner is gone; the channel closes with the connection
                        },
                        _ = self.closing.cancelled() => return,
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "consumer stream failed");
                    break;
                }
                None if self.sub.stopped.load(Ordering::SeqCst)
                    || !self.ch.status().connected()
                    || self.lost.is_cancelled() =>
                {
                    break;
                }
                None if self.sub.is_paused(&self.queue) => match self.after_pause().await {
                    Ok(again) => consumer = again,
                    Err(_) => break,
                },
                None => {
                    tracing::warn!(queue = %self.queue,
                        "RabbitMQ cancelled the consumer of queue {} (the queue was deleted, a consumer \
                         timeout, or its leader moved): consuming it again", self.queue);
                    match self.consume_again().await {
                        Ok(again) => consumer = again,
                        Err(e) => {
                            tracing::warn!(queue = %self.queue, error = %e,
                                "cannot consume the queue again on this channel; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
        self.ended();
    }

    fn ended(&self) {
        if !self.sub.stopped.load(Ordering::SeqCst) {
            // A consumer ended that nobody stopped: the channel or connection died.
            self.lost.cancel();
        }
    }

    /// Waits for the queue's resume ([`Consumer::resume`]), then consumes it again.
    async fn after_pause(&self) -> Result<lapin::Consumer, BrokerError> {
        let mut paused = self.sub.paused.subscribe();
        tokio::select! {
            _ = paused.wait_for(|p| !p.contains(&self.queue)) => {}
            _ = self.closing.cancelled() => return Err(BrokerError::NotConnected("closing".into())),
            _ = self.lost.cancelled() => return Err(BrokerError::NotConnected("connection lost".into())),
        }
        let consumer = self.consume_again().await?;
        if self.sub.is_paused(&self.queue) {
            // Paused again before the consumer started: its stream ends, and this waits again.
            self.sub.cancel(&self.queue).await;
        }
        Ok(consumer)
    }

    /// A new consumer for the queue, declared again, whose prefetch leaves room for what the
    /// cancelled one delivered and is not settled yet (it waits for room when there is none).
    async fn consume_again(&self) -> Result<lapin::Consumer, BrokerError> {
        self.topology.declare(&self.ch, self.major).await?;
        let share = match self.share {
            Some(share) if share > 0 => loop {
                let settled = self.held.settled.notified();
                tokio::pin!(settled);
                settled.as_mut().enable();
                let held = self.held.count.load(Ordering::SeqCst);
                if let Some(room) = usize::from(share).checked_sub(held).filter(|r| *r > 0) {
                    break Some(u16::try_from(room).unwrap_or(share));
                }
                tokio::select! {
                    _ = settled => {}
                    _ = self.closing.cancelled() => return Err(BrokerError::NotConnected("closing".into())),
                    _ = self.lost.cancelled() => return Err(BrokerError::NotConnected("connection lost".into())),
                }
            },
            share => share,
        };
        let consumer = consume_one(&self.ch, &self.sub, &self.queue, share).await?;
        tracing::info!(queue = %self.queue, prefetch = ?share, "consuming queue {} again", self.queue);
        Ok(consumer)
    }
}

/// A broker error that closed one channel (a "soft" error), not the connection.
fn is_channel_error(e: &lapin::Error) -> bool {
    channel_error_text(e).is_some()
}

/// What the broker said when it closed a channel over a message (a "soft" error).
fn channel_error_text(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p)
            if matches!(p.kind(), lapin::protocol::AMQPErrorKind::Soft(_)) =>
        {
            Some(p.get_message().to_string())
        }
        _ => None,
    }
}

/// The major version of RabbitMQ that a node announces in its `connection.start` (4 for
/// 4.0.5), read with a bare handshake that goes no further. None when it cannot be read: an
/// `amqps://` URL (this does no TLS), or a node that does not answer within 5 s.
pub async fn announced_major(url: &str) -> Option<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: lapin::uri::AMQPUri = url.parse().ok()?;
    if uri.scheme != lapin::uri::AMQPScheme::AMQP {
        return None;
    }
    let read = async {
        let addr = (uri.authority.host.as_str(), uri.authority.port);
        let mut socket = tokio::net::TcpStream::connect(addr).await.ok()?;
        socket.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
        // A method frame: type 1, channel 0, the payload's size, the payload, 0xCE.
        let mut head = [0u8; 7];
        socket.read_exact(&mut head).await.ok()?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        if head[0] != 1 || size > 64 * 1024 {
            return None;
        }
        let mut payload = vec![0u8; size];
        socket.read_exact(&mut payload).await.ok()?;
        // connection.start (class 10, method 10): the AMQP version's two octets, then the
        // server's properties.
        if payload.get(..4)? != [0, 10, 0, 10] {
            return None;
        }
        let (_, properties) = lapin::types::parsing::parse_field_table(&payload[6..]).ok()?;
        let version = match properties.inner().get("version")? {
            AMQPValue::LongString(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
            _ => return None,
        };
        version.split('.').next()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()?
}

/// Adds the client's defaults to the URL where it does not name them:
/// - `heartbeat=10`: the broker then notices a dead peer within about 20 s, and so does the
///   client;
/// - `frame_max=8192`: lapin keeps two ring buffers of 32 frames per connection, 8 MiB at
///   RabbitMQ's default of 128 KiB and 512 KiB at 8 KiB, and a busy connection touches every
///   page of them; larger messages only take more frames. 8 KiB is the least RabbitMQ 4.1
///   and later accept.
fn with_defaults(url: &str) -> String {
    let mut url = url.to_owned();
    for (key, value) in [("heartbeat", "10"), ("frame_max", "8192")] {
        if !url.contains(&format!("{key}=")) {
            let sep = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{sep}{key}={value}");
        }
    }
    url
}

/// How long RabbitMQ may take to notice that a connection made with `url` (one URL, or several
/// separated by commas) died, and hand back its unacked messages: two missed heartbeats, at
/// the heartbeat the URL asks for (10 s unless it says). With `heartbeat=0` there are none,
/// and the broker waits for TCP's keepalive to give up: about 2 hours 11 minutes with Linux's
/// defaults.
pub fn dead_peer_after(url: &str) -> Duration {
    url.split(',')
        .map(|u| {
            let asked = url_param(&with_defaults(u.trim()), "heartbeat");
            match asked.and_then(|h| h.parse::<u64>().ok()) {
                Some(0) => Duration::from_secs(7_200 + 9 * 75),
                heartbeat => Duration::from_secs(2 * heartbeat.unwrap_or(10)),
            }
        })
        .max()
        .unwrap_or(Duration::from_secs(20))
}

/// The TLS files an `amqps://` URL names (`cacertfile`, `certfile`, `keyfile`), read.
fn tls_config(url: &str) -> Result<OwnedTLSConfig, BrokerError> {
    let read = |key: &str, what: &str| -> Result<Option<Vec<u8>>, BrokerError> {
        let Some(path) = url_param(url, key) else {
            return Ok(None);
        };
        std::fs::read(&path).map(Some).map_err(|e| {
            BrokerError::Protocol(format!("cannot read the {what} file {path} ({key}): {e}"))
        })
    };
    let ca = read("cacertfile", "CA certificate (--amqp-ca-file)")?;
    let cert = read("certfile", "client certificate (--amqp-cert-file)")?;
    let key = read("keyfile", "client key (--amqp-key-file)")?;
    let identity = match (cert, key) {
        (Some(pem), Some(key)) => Some(OwnedIdentity::PKCS8 { pem, key }),
        (None, None) => None,
        _ => {
            return Err(BrokerError::Protocol(
                "a client certificate needs both its certificate and its key: give \
                 --amqp-cert-file and --amqp-key-file (certfile and keyfile in the URL)"
                    .into(),
            ));
        }
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain: ca.map(|pem| String::from_utf8_lossy(&pem).into_owned()),
    })
}

/// The value of the query parameter `key` of a URL (of one node), decoded.
pub fn url_param(url: &str, key: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
        .map(percent_decode)
}

/// The host and the virtual host of an AMQP URL (of one node).
pub fn host_and_vhost(url: &str) -> Result<(String, String), String> {
    let uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e| format!("{} is not a valid AMQP URL: {e}", redact(url)))?;
    Ok((uri.authority.host, uri.vhost))
}

/// A failed connection attempt to `url`, with what to do about a certificate that is not
/// accepted: the broker's by this client, or the client's (the URL's `certfile`) by the broker.
fn connect_error(e: lapin::Error, url: &str) -> BrokerError {
    let text = e.to_string();
    let client_cert = url_param(url, "certfile").is_some();
    if text.contains("fatal alert") {
        let what = if client_cert {
            "the client certificate (--amqp-cert-file) must be signed by a CA the broker trusts \
             (its ssl_options.cacertfile)"
        } else {
            "if the broker asks for a client certificate (ssl_options.fail_if_no_peer_cert), give \
             one with --amqp-cert-file and --amqp-key-file"
        };
        return BrokerError::Protocol(format!(
            "the broker refused the TLS handshake ({text}): {what}"
        ));
    }
    if text.contains("certificate") || text.contains("Certificate") {
        let own = if client_cert {
            "; or, if it is the client certificate (--amqp-cert-file) that is not accepted, it \
             must be an X.509 v3 certificate (rustls refuses v1) for the key of --amqp-key-file"
        } else {
            ""
        };
        return BrokerError::Protocol(format!(
            "the broker's TLS certificate is not accepted ({text}): if a private CA signed it, give \
             that CA's PEM file with --amqp-ca-file (ROTA_AMQP_CA_FILE); the URL's host must be a \
             name the certificate holds{own}"
        ));
    }
    e.into()
}

/// The user a URL logs in as (its user info, decoded); None when it names none.
fn url_user(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let user = userinfo.split(':').next()?;
    (!user.is_empty()).then(|| percent_decode(user))
}

/// Whether a URL logs in with a client certificate (EXTERNAL) without naming its user, which
/// Rota must know: it is the `user_id` of everything published.
fn external_without_user(url: &str) -> bool {
    url_param(url, "auth_mechanism").is_some_and(|m| m.eq_ignore_ascii_case("external"))
        && url_user(url).is_none()
}

/// `text` with every byte but the URL-safe ones written `%XX`.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((creds, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefetch_is_shared_or_split_to_add_up_to_itself() {
        assert_eq!(prefetch_shares(4, 2, true), Ok(None));
        assert_eq!(prefetch_shares(4, 1, true), Ok(Some(vec![4])));
        assert_eq!(prefetch_shares(4, 2, false), Ok(Some(vec![2, 2])));
        assert_eq!(prefetch_shares(5, 3, false), Ok(Some(vec![2, 2, 1])));
        assert_eq!(prefetch_shares(0, 2, false), Ok(Some(vec![0, 0])));
        let refused = prefetch_shares(1, 2, false).expect_err("one delivery for two queues");
        assert!(refused.contains("--pool-max-size"), "{refused}");
    }

    #[test]
    fn urls_get_the_defaults_and_hide_their_password() {
        assert_eq!(
            with_defaults("amqp://h/%2f"),
            "amqp://h/%2f?heartbeat=10&frame_max=8192"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?x=1"),
            "amqp://h/%2f?x=1&heartbeat=10&frame_max=8192"
        );
        assert_eq!(
            with_defaults("amqp://h/?heartbeat=3&frame_max=131072"),
            "amqp://h/?heartbeat=3&frame_max=131072"
        );
        assert_eq!(
            redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
    }

    #[test]
    fn a_dead_peer_is_noticed_after_two_heartbeats_of_the_slowest_node() {
        assert_eq!(dead_peer_after("amqp://h/%2f"), Duration::from_secs(20));
        assert_eq!(
            dead_peer_after("amqp://a/%2f?heartbeat=5, amqp://b/%2f?heartbeat=60"),
            Duration::from_secs(120)
        );
        assert!(dead_peer_after("amqp://h/%2f?heartbeat=0") > Duration::from_secs(7_200));
    }

    #[test]
    fn the_url_names_the_user_and_the_tls_files() {
        assert_eq!(
            url_user("amqp://rota-agent:p%40ss@h:5672/%2f").as_deref(),
            Some("rota-agent")
        );
        assert_eq!(
            url_user("amqps://a%2Bb@h/%2f?auth_mechanism=external").as_deref(),
            Some("a+b")
        );
        assert_eq!(url_user("amqp://h:5672/%2f"), None);
        assert!(external_without_user(
            "amqps://h/%2f?auth_mechanism=EXTERNAL"
        ));
        assert!(!external_without_user(
            "amqps://rota-agent@h/%2f?auth_mechanism=external"
        ));
        assert!(!external_without_user("amqps://h/%2f"));
        let path = "/tmp/a dir/ca&.pem";
        assert_eq!(percent_decode(&percent_encode(path)), path);
        let missing = format!("amqps://h/%2f?cacertfile={}", percent_encode(path));
        let err = tls_config(&missing).expect_err("no such file");
        assert!(err.to_string().contains(path), "{err}");
        assert_eq!(
            tls_config("amqps://h/%2f?heartbeat=5").ok(),
            Some(OwnedTLSConfig::default())
        );
    }
}
