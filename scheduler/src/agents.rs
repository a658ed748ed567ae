//! The parts seen through their heartbeats: alive while heartbeats keep coming, lost after
//! three missed intervals.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use rota_common::wire::{AgentInfo, Heartbeat, Role};

/// A heartbeat is missed when none came for this many intervals.
const MISSED: u32 = 3;

struct Seen {
    heartbeat: Heartbeat,
    at: Instant,
    at_utc: chrono::DateTime<Utc>,
    reported_lost: bool,
}

#[derive(Default)]
pub struct Agents {
    seen: Mutex<BTreeMap<(String, String), Seen>>,
}

fn is_alive(s: &Seen) -> bool {
    s.at.elapsed() < Duration::from_millis(s.heartbeat.interval_ms.max(1)) * MISSED
}

impl Agents {
    pub fn heard(&self, hb: Heartbeat) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let key = (role_name(hb.role).to_owned(), hb.id.clone());
        let previous = seen
            .get(&key)
            .map(|s| (s.reported_lost, s.heartbeat.started_at));
        match previous {
            None => {
                tracing::info!(role = role_name(hb.role), id = %hb.id, host = %hb.host, "part seen for the first time")
            }
            Some((true, _)) => {
                tracing::info!(role = role_name(hb.role), id = %hb.id, "part is back")
            }
            Some((_, started)) if started != hb.started_at => {
                tracing::info!(role = role_name(hb.role), id = %hb.id, "part restarted")
            }
            _ => {}
        }
        seen.insert(
            key,
            Seen {
                heartbeat: hb,
                at: Instant::now(),
                at_utc: Utc::now(),
                reported_lost: false,
            },
        );
    }

    /// Logs each part that stopped sending heartbeats, once.
    pub fn check(&self) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        for ((role, id), s) in seen.iter_mut() {
            if !s.reported_lost && !is_alive(s) {
                s.reported_lost = true;
                tracing::warn!(role = %role, id = %id, silent_s = s.at.elapsed().as_secs(), running = s.heartbeat.running.len(),
                    "part lost: no heartbeat for {MISSED} intervals; its unacked jobs return to their queues when RabbitMQ drops its connection");
            }
        }
    }

    pub fn list(&self) -> Vec<AgentInfo> {
        let Ok(seen) = self.seen.lock() else {
            return Vec::new();
        };
        seen.values()
            .map(|s| AgentInfo {
                alive: is_alive(s),
                last_seen: s.at_utc,
                heartbeat: s.heartbeat.clone(),
            })
            .collect()
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Scheduler => "scheduler",
        Role::Agent => "agent",
    }
}
