//! Capped exponential backoff with jitter, for reconnecting and resending.

use std::time::Duration;

/// Delays that double from `initial` up to `max`, each with up to 20% random jitter taken off
/// so that many clients restarting together do not knock at the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// 100 ms doubling to 10 s: the broker connection's policy.
    pub fn for_connections() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// The delay before the next try, without jitter.
    pub fn peek(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next try (with jitter), counting the try.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.peek();
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(1.0 - rand::random::<f64>() * 0.2)
    }

    /// Called after a success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let seen: Vec<Duration> = (0..6)
            .map(|_| {
                let base = b.peek();
                let d = b.next_delay();
                assert!(
                    d <= base && d >= base.mul_f64(0.8),
                    "{d:?} outside jitter of {base:?}"
                );
                base
            })
            .collect();
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..200 {
            b.next_delay();
        }
        assert_eq!(b.peek(), Duration::from_secs(30));
    }
}
