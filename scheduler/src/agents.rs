//! The parts seen through their heartbeats: alive while heartbeats keep coming, lost after
//! three missed intervals.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use rota_common::wire::{AgentInfo, Heartbeat, Role};

/// A heartbeat is missed when none came for this many intervals.
const MISSED: u32 = 3;

/// The most parts remembered: forged heartbeats with ever new ids must not grow the map
/// without end. When full, parts reported lost make room; else a new part is not tracked.
const MAX_PARTS: usize = 10_000;

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
    // The interval is the sender's word: a forged one (u64::MAX ms) must not overflow.
    let window = Duration::from_millis(s.heartbeat.interval_ms.max(1))
        .checked_mul(MISSED)
        .unwrap_or(Duration::MAX);
    s.at.elapsed() < window
}

impl Agents {
    /// The parts seen. A panic elsewhere while it was held leaves the map whole (each change
    /// is one insert), so a poisoned lock is taken as it is rather than ending the tracking.
    fn seen(&self) -> MutexGuard<'_, BTreeMap<(String, String), Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn heard(&self, hb: Heartbeat) {
        let mut seen = self.seen();
        let key = (role_name(hb.role).to_owned(), hb.id.clone());
        if seen.len() >= MAX_PARTS && !seen.contains_key(&key) {
            seen.retain(|_, s| !s.reported_lost);
            if seen.len() >= MAX_PARTS {
                tracing::warn!(id = %hb.id, "too many parts seen; not tracking another");
                return;
            }
        }
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
        let mut seen = self.seen();
        for ((role, id), s) in seen.iter_mut() {
            if !s.reported_lost && !is_alive(s) {
                s.reported_lost = true;
                tracing::warn!(role = %role, id = %id, silent_s = s.at.elapsed().as_secs(), running = s.heartbeat.running.len(),
                    "part lost: no heartbeat for {MISSED} intervals; its unacked jobs return to their queues when RabbitMQ drops its connection");
            }
        }
    }

    pub fn list(&self) -> Vec<AgentInfo> {
        self.seen()
            .values()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_interval_does_not_overflow() {
        let agents = Agents::default();
        let mut hb = Heartbeat::starting(Role::Agent, "a1", Duration::from_secs(1));
        hb.interval_ms = u64::MAX;
        agents.heard(hb);
        agents.check();
        let seen = agents.list();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].alive);
    }
}
