//! The one retry delay of the project: exponential, capped, with equal
//! jitter. Job retries, catalog retries and cluster write retries all use it.

use std::time::Duration;

/// Retry timing: exponential from `base`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before the first retry (before jitter).
    pub base: Duration,
    /// The largest delay (before jitter).
    pub max: Duration,
}

impl Backoff {
    /// Delay before retry number `attempt` (1 = the first retry): exponential
    /// from `base`, capped at `max`, with "equal jitter": half fixed, half
    /// random (`jitter` in [0, 1)), so that retries of many callers spread
    /// out but never come back sooner than half the exponential delay.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self.base.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1).min(31))
                .unwrap_or(u32::MAX),
        );
        let capped = exp.min(self.max);
        let half = capped / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// A number in [0, 1) for [`Backoff::delay`]: std's per-instance random hash
/// keys stand in for a random number generator.
pub fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let h = std::collections::hash_map::RandomState::new().hash_one(nanos);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(10),
    };

    #[test]
    fn grows_exponentially_with_jitter_and_cap() {
        assert_eq!(B.delay(1, 0.0), Duration::from_millis(500));
        let near_top = B.delay(1, 0.999_999);
        assert!(near_top > Duration::from_millis(999) && near_top < Duration::from_secs(1));
        assert_eq!(B.delay(2, 0.0), Duration::from_secs(1));
        assert_eq!(B.delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(B.delay(20, 0.0), Duration::from_secs(5));
        assert_eq!(B.delay(200, 1.0), Duration::from_secs(10));
        for attempt in 1..10 {
            let lo = B.delay(attempt, 0.0);
            let hi = B.delay(attempt, 0.99);
            assert!(lo <= hi && hi <= B.max);
        }
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
