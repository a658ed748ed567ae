//! A client of a running Rota: calls the scheduler over RPC, publishes jobs straight to the
//! jobs exchange, and watches job events. Used by the CLI, the benchmark and the tests; other
//! languages do the same with plain AMQP (see the README).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use crate::Names;
use crate::amqp::{
    Broker, BrokerError, ConsumeSpec, Consumer, Props, QueueSpec, Startup, Topology,
};
use crate::wire::{
    Event, EventKind, Heartbeat, Job, JobId, JobRecord, OnFailure, RpcReply, RpcRequest,
};

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<RpcReply>>>>;

/// A connection to a Rota deployment (one namespace of one broker).
pub struct Client {
    broker: Broker,
    names: Names,
    reply_queue: String,
    pending: Pending,
    /// How long [`Client::call`] waits for the scheduler.
    pub rpc_timeout: Duration,
}

impl Client {
    /// Connects, failing at once with a clear message if the broker does not answer.
    pub async fn connect(url: &str, names: Names, who: &str) -> anyhow::Result<Client> {
        let name = format!("rota {who} {}", short_host());
        let broker = Broker::connect(url, &name, Topology::core(&names), Startup::FailFast).await?;
        Client::attach(broker, names, who).await
    }

    /// A client on a connection the caller already has (a pool agent submitting child jobs).
    pub async fn attach(broker: Broker, names: Names, who: &str) -> anyhow::Result<Client> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let reply_queue = names.private_queue("reply", &id);
        let mut topology = Topology::default();
        topology.queue(QueueSpec::private(reply_queue.clone()));
        broker.declare(topology).await?;
        let replies = broker
            .consume(ConsumeSpec {
                queues: vec![reply_queue.clone()],
                tag: format!("{who}-replies"),
                prefetch: 100,
                exclusive: true,
                no_ack: true,
            })
            .await?;
        let pending: Pending = Arc::default();
        tokio::spawn(dispatch_replies(replies, pending.clone()));
        Ok(Client {
            broker,
            names,
            reply_queue,
            pending,
            rpc_timeout: Duration::from_secs(30),
        })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Sends a request to the scheduler and waits for its reply. A reply of kind `error`
    /// becomes an `Err` with the scheduler's message.
    pub async fn call(&self, request: &RpcRequest) -> anyhow::Result<RpcReply> {
        let correlation = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(correlation.clone(), tx);
        }
        let body = serde_json::to_vec(request)?;
        let props = Props {
            correlation_id: Some(correlation.clone()),
            reply_to: Some(self.reply_queue.clone()),
            expiration_ms: Some(self.rpc_timeout.as_millis() as u64),
            transient: true,
            ..Props::default()
        };
        let sent = self
            .broker
            .publish("", &self.names.rpc(), &body, &props)
            .await;
        let reply = match sent {
            Ok(()) => tokio::time::timeout(self.rpc_timeout, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(e) => {
                self.forget(&correlation);
                return Err(e).context("cannot send the request to the scheduler");
            }
        };
        self.forget(&correlation);
        match reply {
            Some(RpcReply::Error { message }) => Err(anyhow!(message)),
            Some(reply) => Ok(reply),
            None => bail!(
                "the scheduler did not answer within {} s on queue {}: is `scheduler run` running \
                 with namespace {:?} against {}?",
                self.rpc_timeout.as_secs(),
                self.names.rpc(),
                self.names.namespace(),
                self.broker.display_url()
            ),
        }
    }

    fn forget(&self, correlation: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(correlation);
        }
    }

    /// Asks the scheduler to record and queue a job; returns its record.
    pub async fn submit(&self, job: Job) -> anyhow::Result<JobRecord> {
        expect_job(self.call(&RpcRequest::Submit { job }).await?)
    }

    /// Asks the scheduler to record a group (see [`RpcRequest::SubmitGroup`]); returns the
    /// records of its jobs, the callback last.
    pub async fn submit_group(
        &self,
        jobs: Vec<Job>,
        callback: Job,
        on_failure: Option<OnFailure>,
    ) -> anyhow::Result<Vec<JobRecord>> {
        let request = RpcRequest::SubmitGroup {
            jobs,
            callback,
            on_failure,
        };
        expect_jobs(self.call(&request).await?)
    }

    /// Asks the scheduler to record a chain (see [`RpcRequest::SubmitChain`]); returns the
    /// records of its jobs in order.
    pub async fn submit_chain(&self, jobs: Vec<Job>) -> anyhow::Result<Vec<JobRecord>> {
        expect_jobs(self.call(&RpcRequest::SubmitChain { jobs }).await?)
    }

    pub async fn status(&self, uuid: JobId) -> anyhow::Result<JobRecord> {
        expect_job(self.call(&RpcRequest::Status { uuid }).await?)
    }

    /// Publishes a job straight to the jobs exchange, as any AMQP producer can; assigns a
    /// uuid when the job has none and returns it.
    pub async fn publish_job(&self, mut job: Job) -> Result<JobId, BrokerError> {
        let uuid = *job.uuid.get_or_insert_with(JobId::random);
        // The queue may not exist yet (no agent serves it): declare it, so the job waits.
        let mut t = Topology::default();
        t.jobs_queue(&self.names, job.queue_name());
        self.broker.declare(t).await?;
        let body = serde_json::to_vec(&job).map_err(|e| BrokerError::Protocol(e.to_string()))?;
        let props = Props {
            message_id: Some(uuid.to_string()),
            priority: job.priority,
            ..Props::default()
        };
        self.broker
            .publish(&self.names.jobs_exchange(), job.queue_name(), &body, &props)
            .await?;
        Ok(uuid)
    }

    /// Starts listening to job events of these kinds (all types); events published before
    /// this call returns are not seen.
    pub async fn watch(&self, kinds: &[EventKind]) -> anyhow::Result<Events> {
        let keys: Vec<String> = kinds
            .iter()
            .map(|k| format!("job.{}.#", k.as_str()))
            .collect();
        self.listen("watch", &self.names.events(), &keys, 1000)
            .await
    }

    /// Starts listening to the heartbeats of every part.
    pub async fn heartbeats(&self) -> anyhow::Result<Heartbeats> {
        self.listen(
            "heartbeats",
            &self.names.heartbeats(),
            &[String::new()],
            100,
        )
        .await
    }

    /// A private queue bound to `exchange` with `keys`, consumed as messages of type `T`.
    async fn listen<T>(
        &self,
        purpose: &str,
        exchange: &str,
        keys: &[String],
        prefetch: u16,
    ) -> anyhow::Result<Messages<T>> {
        let queue = self
            .names
            .private_queue(purpose, &uuid::Uuid::new_v4().simple().to_string());
        let mut t = Topology::default();
        t.queue(QueueSpec::private(queue.clone()));
        for key in keys {
            t.bind(&queue, exchange, key);
        }
        self.broker.declare(t).await?;
        let spec = ConsumeSpec {
            queues: vec![queue],
            tag: purpose.to_owned(),
            prefetch,
            exclusive: true,
            no_ack: true,
        };
        Ok(Messages {
            consumer: self.broker.consume(spec).await?,
            _type: PhantomData,
        })
    }

    pub async fn close(&self) {
        self.broker.close().await;
    }
}

fn expect_job(reply: RpcReply) -> anyhow::Result<JobRecord> {
    match reply {
        RpcReply::Job { job } => Ok(*job),
        other => bail!("unexpected reply from the scheduler: {other:?}"),
    }
}

fn expect_jobs(reply: RpcReply) -> anyhow::Result<Vec<JobRecord>> {
    match reply {
        RpcReply::Jobs { jobs, .. } => Ok(jobs),
        other => bail!("unexpected reply from the scheduler: {other:?}"),
    }
}

async fn dispatch_replies(mut replies: Consumer, pending: Pending) {
    while let Some(d) = replies.recv().await {
        let Some(correlation) = d.correlation_id.as_deref() else {
            continue;
        };
        let waiter = pending.lock().ok().and_then(|mut p| p.remove(correlation));
        match (waiter, serde_json::from_slice::<RpcReply>(&d.body)) {
            (Some(tx), Ok(reply)) => {
                let _ = tx.send(reply);
            }
            (Some(tx), Err(e)) => {
                let _ = tx.send(RpcReply::Error {
                    message: format!("unreadable reply from the scheduler: {e}"),
                });
            }
            (None, _) => {} // the caller gave up waiting
        }
    }
}

/// Messages of one type from a private queue; unreadable ones are skipped.
pub struct Messages<T> {
    consumer: Consumer,
    _type: PhantomData<T>,
}

/// Job events (see [`Client::watch`]).
pub type Events = Messages<Event>;
/// Heartbeats (see [`Client::heartbeats`]).
pub type Heartbeats = Messages<Heartbeat>;

impl<T: DeserializeOwned> Messages<T> {
    /// The next message. Cancel-safe, so it can race other futures in `select!`: once
    /// received, a message is returned, not lost with a dropped future.
    pub async fn next(&mut self) -> Option<T> {
        loop {
            let d = self.consumer.recv().await?;
            match serde_json::from_slice(&d.body) {
                Ok(message) => return Some(message),
                Err(e) => tracing::debug!(error = %e, "skipping an unreadable message"),
            }
        }
    }
}

/// This machine's name, for connection names and heartbeats.
pub fn short_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}
