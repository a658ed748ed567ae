//! Acks several deliveries in one frame: RabbitMQ's `multiple` flag acks every delivery of a
//! channel up to a tag.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{mpsc, oneshot};

use super::SETTLE_WAIT;

/// Settles the deliveries of a channel that carries one queue's consumer. Acks that wait
/// together go as one `basic.ack` with `multiple` when no unsettled delivery of the channel
/// lies below them; the others, and every requeue, go one by one. One task sends them all,
/// requeues first, so a multiple ack never covers a delivery being handed back.
///
/// Only for a channel with one consumer at a time: its deliveries are noted in tag order,
/// so every delivery below one being acked is known here.
#[derive(Debug)]
pub(super) struct Settler {
    tx: mpsc::UnboundedSender<Settle>,
    /// The tags delivered on the channel and not settled yet.
    unsettled: Arc<Mutex<BTreeSet<u64>>>,
}

#[derive(Debug)]
struct Settle {
    tag: u64,
    acker: lapin::Acker,
    requeue: bool,
    done: oneshot::Sender<bool>,
}

impl Settler {
    pub(super) fn start() -> Arc<Settler> {
        let (tx, rx) = mpsc::unbounded_channel();
        let unsettled = Arc::<Mutex<BTreeSet<u64>>>::default();
        tokio::spawn(run(rx, unsettled.clone()));
        Arc::new(Settler { tx, unsettled })
    }

    /// Notes a delivery before anyone can settle it.
    pub(super) fn delivered(&self, tag: u64) {
        if let Ok(mut u) = self.unsettled.lock() {
            u.insert(tag);
        }
    }

    /// Acks, or requeues, a delivery. False if it surely was not settled (its channel is
    /// gone: RabbitMQ delivers it again).
    pub(super) async fn settle(&self, tag: u64, acker: &lapin::Acker, requeue: bool) -> bool {
        let (done, settled) = oneshot::channel();
        let acker = acker.clone();
        let sent = self.tx.send(Settle {
            tag,
            acker,
            requeue,
            done,
        });
        sent.is_ok() && settled.await.unwrap_or(false)
    }
}

/// Settles what arrives, a batch of everything waiting at a time.
async fn run(mut rx: mpsc::UnboundedReceiver<Settle>, unsettled: Arc<Mutex<BTreeSet<u64>>>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 4096).await > 0 {
        let floor = match unsettled.lock() {
            Ok(mut u) => {
                for s in &batch {
                    u.remove(&s.tag);
                }
                u.first().copied().unwrap_or(u64::MAX)
            }
            Err(_) => 0, // never multiple
        };
        let (requeues, acks): (Vec<_>, Vec<_>) = batch.drain(..).partition(|s| s.requeue);
        for s in requeues {
            let requeued = requeue(&s.acker).await;
            let _ = s.done.send(requeued);
        }
        let (below, above): (Vec<_>, Vec<_>) = acks.into_iter().partition(|s| s.tag < floor);
        if let Some(last) = below.iter().max_by_key(|s| s.tag) {
            let acked = ack(&last.acker, below.len() > 1).await;
            for s in below {
                let _ = s.done.send(acked);
            }
        }
        for s in above {
            let acked = ack(&s.acker, false).await;
            let _ = s.done.send(acked);
        }
    }
}

/// Hands one delivery back to its queue, to be delivered again.
pub(super) async fn requeue(acker: &lapin::Acker) -> bool {
    let opts = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    let nacked = tokio::time::timeout(SETTLE_WAIT, acker.nack(opts));
    matches!(nacked.await, Ok(Ok(true)))
}

/// Acks one delivery, and with `multiple` every one before it on its channel.
pub(super) async fn ack(acker: &lapin::Acker, multiple: bool) -> bool {
    let acked = tokio::time::timeout(SETTLE_WAIT, acker.ack(BasicAckOptions { multiple }));
    match acked.await {
        // lapin answers false for an acker whose channel is gone.
        Ok(Ok(acked)) => acked,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "ack failed; the message will be delivered again");
            false
        }
        Err(_) => false,
    }
}
