//! Publishes results to the scheduler's results queue, several in one message when several
//! are waiting. While one message waits for RabbitMQ's confirm, the results that finish
//! meanwhile gather, and go together in the next one: a JSON array of at most
//! [`MAX_RESULT_GROUP`] results and [`GROUP_BYTES`] bytes. A lone result goes at once, as it
//! is, so one job at a time waits for nothing; a busy agent sends fewer, larger messages, and
//! RabbitMQ, the agent and the scheduler each do less per job.

use std::collections::VecDeque;
use std::sync::Arc;

use rota_common::amqp::{Broker, BrokerError, Props};
use rota_common::wire::MAX_RESULT_GROUP;
use tokio::sync::{mpsc, oneshot};

use crate::fit::Sealed;
use crate::metrics::AgentMetrics;

/// The most bytes of one group. Larger results go alone.
const GROUP_BYTES: usize = 256 * 1024;

/// Publishes results (see the module's text). Cloned handles share one publishing task.
#[derive(Clone)]
pub struct Results {
    to: Destination,
    waiting: mpsc::UnboundedSender<Waiting>,
}

/// Where results go, and where their receipts come back.
#[derive(Clone)]
struct Destination {
    broker: Broker,
    queue: String,
    reply_to: String,
    metrics: Arc<AgentMetrics>,
}

/// A result waiting to be published, and who waits for RabbitMQ's answer.
struct Waiting {
    body: Vec<u8>,
    message_id: String,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

impl Results {
    /// Starts the publishing task: results go to `queue`, receipts come back to `reply_to`.
    pub fn start(
        broker: Broker,
        queue: String,
        reply_to: String,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let to = Destination {
            broker,
            queue,
            reply_to,
            metrics,
        };
        let (waiting, rx) = mpsc::unbounded_channel();
        tokio::spawn(to.clone().publish_all(rx));
        Self { to, waiting }
    }

    /// Publishes `result`, with whatever others wait at the same time; returns once RabbitMQ
    /// confirmed it (or why not).
    pub async fn send(&self, result: &Sealed) -> Result<(), BrokerError> {
        let message_id = format!("{}/{}", result.uuid, result.attempt);
        if result.body.len() > GROUP_BYTES / 2 {
            return self.to.publish_one(&result.body, message_id).await;
        }
        let (done, answer) = oneshot::channel();
        let waiting = Waiting {
            body: result.body.clone(),
            message_id,
            done,
        };
        if self.waiting.send(waiting).is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> BrokerError {
    BrokerError::Protocol("the agent's result publisher has stopped".into())
}

impl Destination {
    /// The publishing task: one message in flight at a time, each with every result that
    /// waits (up to a group's limits). Ends when every [`Results`] handle is gone.
    async fn publish_all(self, mut rx: mpsc::UnboundedReceiver<Waiting>) {
        let mut waiting = VecDeque::new();
        loop {
            if waiting.is_empty() {
                match rx.recv().await {
                    Some(w) => waiting.push_back(w),
                    None => return,
                }
            }
            while let Ok(w) = rx.try_recv() {
                waiting.push_back(w);
            }
            let mut bytes = 2;
            let mut n = 0;
            for w in &waiting {
                if n == MAX_RESULT_GROUP || (n > 0 && bytes + w.body.len() + 1 > GROUP_BYTES) {
                    break;
                }
                bytes += w.body.len() + 1;
                n += 1;
            }
            let group: Vec<Waiting> = waiting.drain(..n).collect();
            self.publish_group(group, bytes).await;
        }
    }

    async fn publish_group(&self, mut group: Vec<Waiting>, bytes: usize) {
        if group.len() == 1 {
            let w = group.remove(0);
            let sent = self.publish_one(&w.body, w.message_id).await;
            let _ = w.done.send(sent);
            return;
        }
        let mut body = Vec::with_capacity(bytes);
        body.push(b'[');
        for (i, w) in group.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&w.body);
        }
        body.push(b']');
        let props = Props {
            reply_to: Some(self.reply_to.clone()),
            transient: true,
            ..Props::default()
        };
        match self.broker.publish("", &self.queue, &body, &props).await {
            // Refused as a whole (a broker with a low max_message_size): each alone, so
            // that only a result too large by itself is refused.
            Err(BrokerError::Refused { .. }) => {
                for w in group {
                    let sent = self.publish_one(&w.body, w.message_id).await;
                    let _ = w.done.send(sent);
                }
            }
            sent => {
                if sent.is_ok() {
                    self.counted(group.len());
                }
                for w in group {
                    let _ = w.done.send(sent.clone());
                }
            }
        }
    }

    /// Publishes one result as its own message; its `message_id` is `uuid/attempt`.
    async fn publish_one(&self, body: &[u8], message_id: String) -> Result<(), BrokerError> {
        // Transient: the outbox is the result's durable copy until the receipt, and every
        // reconnect sends again what is not receipted (a broker restart drops transient
        // messages and closes the connection). RabbitMQ then keeps it off its disk.
        let props = Props {
            message_id: Some(message_id),
            reply_to: Some(self.reply_to.clone()),
            transient: true,
            ..Props::default()
        };
        let sent = self.broker.publish("", &self.queue, body, &props).await;
        if sent.is_ok() {
            self.counted(1);
        }
        sent
    }

    fn counted(&self, results: usize) {
        self.metrics.result_messages_sent.inc();
        self.metrics.results_sent.inc_by(results as u64);
    }
}
