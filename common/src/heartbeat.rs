//! Heartbeats: every part says, on the fanout exchange, that it is alive and what it holds.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::Names;
use crate::amqp::{Broker, Props};
use crate::client::short_host;
use crate::wire::{Heartbeat, Role};

impl Heartbeat {
    /// The first heartbeat of a part that starts now.
    pub fn starting(role: Role, id: &str, interval: Duration) -> Self {
        Heartbeat {
            role,
            id: id.to_owned(),
            host: short_host(),
            pid: std::process::id(),
            version: crate::VERSION.to_owned(),
            started_at: Utc::now(),
            seq: 0,
            interval_ms: interval.as_millis() as u64,
            pools: Vec::new(),
            running: Vec::new(),
            unreceipted: 0,
            paused: None,
        }
    }
}

/// Publishes a heartbeat now and then every interval until `stop`; `fill` adds the part's
/// current state before each one.
pub async fn run(
    broker: Broker,
    names: Names,
    mut beat: Heartbeat,
    stop: CancellationToken,
    fill: impl Fn(&mut Heartbeat) + Send + Sync + 'static,
) {
    let interval = Duration::from_millis(beat.interval_ms.max(1));
    let props = Props {
        transient: true,
        ..Props::default()
    };
    loop {
        fill(&mut beat);
        beat.seq += 1;
        if let Ok(body) = serde_json::to_vec(&beat) {
            broker.notify(&names.heartbeats(), "", &body, &props).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}
