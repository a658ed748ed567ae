//! The runs and jobs an agent remembers for a while: those the scheduler receipted (so a late
//! redelivery of one is acked, not run again) and those cancelled before they arrived.
//!
//! A late redelivery comes when RabbitMQ hands back the jobs of a channel that died before
//! their acks reached it: at once when the channel closes, or once the broker notices a
//! dead connection (two missed heartbeats, 20 s by default; see
//! [`rota_common::amqp::dead_peer_after`]). In the meantime a busy agent goes on with other
//! jobs on its new connection, thousands per second. So what is kept is bounded by age, not
//! by count alone: an id is forgotten once it is older than its window (three times the time
//! the broker takes to notice, and at least [`Recent::KEEP_FOR`]) and not among the newest
//! [`Recent::KEEP`], or once [`Recent::MAX`] newer ones came. An idle agent forgets all but
//! the newest few and gives the memory back.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A set of ids, each with when it came.
#[derive(Debug)]
pub struct Recent<K> {
    ids: HashSet<K>,
    order: VecDeque<(Instant, K)>,
    keep_for: Duration,
}

impl<K> Recent<K> {
    /// Kept whatever their age: at a low rate, a redelivery can come long after.
    pub const KEEP: usize = 1_000;
    /// The shortest window: three times the time RabbitMQ takes to notice a dead connection
    /// with the default heartbeat of 10 s.
    pub const KEEP_FOR: Duration = Duration::from_secs(60);
    /// At most (about 50 bytes each): 10,000 jobs/s for a minute.
    pub const MAX: usize = 600_000;

    /// Remembers ids while a redelivery of them may come: three times `dead_peer_after`, the
    /// time the broker may take to notice a dead connection, and at least [`Self::KEEP_FOR`].
    pub fn for_dead_peer_after(dead_peer_after: Duration) -> Self {
        Self {
            ids: HashSet::new(),
            order: VecDeque::new(),
            keep_for: dead_peer_after.saturating_mul(3).max(Self::KEEP_FOR),
        }
    }
}

impl<K: Hash + Eq + Copy> Recent<K> {
    pub fn insert(&mut self, id: K) {
        self.insert_at(id, Instant::now());
    }

    fn insert_at(&mut self, id: K, now: Instant) {
        if self.ids.insert(id) {
            self.order.push_back((now, id));
        }
        self.forget_old(now);
    }

    pub fn contains(&self, id: &K) -> bool {
        self.ids.contains(id)
    }

    /// Forgets what is too old, and gives back the room that held it. Whether it forgot any.
    pub fn shrink(&mut self) -> bool {
        let before = self.order.len();
        self.forget_old(Instant::now());
        self.ids.shrink_to_fit();
        self.order.shrink_to_fit();
        self.order.len() < before
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(&(at, old)) = self.order.front() {
            let n = self.order.len();
            let keep =
                n <= Self::KEEP || (n <= Self::MAX && now.duration_since(at) < self.keep_for);
            if keep {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&old);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Recent<u32>;

    #[test]
    fn keeps_everything_younger_than_the_window_however_many() {
        let mut r = R::for_dead_peer_after(Duration::ZERO);
        let t0 = Instant::now();
        for i in 0..(R::KEEP as u32 * 5) {
            r.insert_at(i, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(r.len(), R::KEEP * 5);
        assert!(r.contains(&0));
    }

    #[test]
    fn forgets_the_old_but_keeps_the_newest_few_whatever_their_age() {
        let mut r = R::for_dead_peer_after(Duration::ZERO);
        let t0 = Instant::now();
        for i in 0..(R::KEEP as u32 * 3) {
            r.insert_at(i, t0);
        }
        r.insert_at(u32::MAX, t0 + R::KEEP_FOR);
        assert_eq!(r.len(), R::KEEP);
        assert!(!r.contains(&0));
        assert!(r.contains(&u32::MAX));
        assert!(r.contains(&(R::KEEP as u32 * 3 - 1)));
    }

    #[test]
    fn a_slow_heartbeat_widens_the_window() {
        let mut r = R::for_dead_peer_after(Duration::from_secs(120));
        let t0 = Instant::now();
        for i in 0..(R::KEEP as u32 * 3) {
            r.insert_at(i, t0);
        }
        r.insert_at(u32::MAX, t0 + Duration::from_secs(359));
        assert!(r.contains(&0), "kept for 3 × 120 s");
        r.insert_at(u32::MAX - 1, t0 + Duration::from_secs(360));
        assert!(!r.contains(&0));
        assert_eq!(r.len(), R::KEEP);
    }

    #[test]
    fn never_holds_more_than_its_maximum() {
        let mut r = R::for_dead_peer_after(Duration::ZERO);
        let t0 = Instant::now();
        for i in 0..(R::MAX as u32 + 10) {
            r.insert_at(i, t0);
        }
        assert_eq!(r.len(), R::MAX);
        assert!(!r.contains(&9) && r.contains(&10));
    }

    #[test]
    fn an_id_inserted_twice_is_kept_once() {
        let mut r = R::for_dead_peer_after(Duration::ZERO);
        r.insert(7);
        r.insert(7);
        assert_eq!(r.len(), 1);
    }
}
