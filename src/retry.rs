//! How taskgate waits before it tries again: the one retry policy.
//!
//! Every wait between attempts — the circuit breaker's open interval, the
//! AMQP and SQS publishers' reconnects, the tracking consumer's reconnects
//! and the tracking database's retries — is drawn from a [`RetryPolicy`]:
//! exponential from `first` (doubling), capped at `longest`, each delay
//! spread by `jitter` (±30 % of it for [`RetryPolicy::RETRY_JITTER`]) so
//! that many gateways, or many lanes, do not retry in step. The `backoff`
//! crate draws the delays.
//!
//! Invariants: a policy exists only if it is valid (`first` positive, at
//! most `longest`, jitter within `0..=1`; [`RetryPolicy::new`] refuses
//! anything else, and configuration loading builds every policy once, so
//! a bad setting is a `check-config` error naming its key). Delays never
//! end: a sequence of [`RetryDelays`] keeps answering `longest` (jittered)
//! for as long as it is asked, because taskgate never gives up on a broker
//! or a database, it only waits longer.

use backoff::backoff::Backoff;
use std::time::Duration;

/// A validated retry policy; see the module comment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    first: Duration,
    longest: Duration,
    jitter: f64,
}

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RetryPolicyError {
    #[error("must be positive")]
    FirstNotPositive,
    #[error("must be at least the first delay")]
    LongestBelowFirst,
    #[error("jitter must be between 0 and 1")]
    JitterOutOfRange,
}

impl RetryPolicy {
    /// Retries of the same peer by one gateway: the breaker's open interval
    /// and the tracking database.
    pub const RETRY_JITTER: f64 = 0.3;
    /// Reconnects: wider, so the gateways of a fleet that lost their broker
    /// together do not all come back in the same instant.
    pub const RECONNECT_JITTER: f64 = 0.5;

    pub fn new(first: Duration, longest: Duration, jitter: f64) -> Result<Self, RetryPolicyError> {
        if first.is_zero() {
            return Err(RetryPolicyError::FirstNotPositive);
        }
        if longest < first {
            return Err(RetryPolicyError::LongestBelowFirst);
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(RetryPolicyError::JitterOutOfRange);
        }
        Ok(Self { first, longest, jitter })
    }

    /// From millisecond settings (`*_min_ms`, `*_max_ms`).
    pub fn from_millis(first_ms: u64, longest_ms: u64, jitter: f64) -> Result<Self, RetryPolicyError> {
        Self::new(
            Duration::from_millis(first_ms),
            Duration::from_millis(longest_ms),
            jitter,
        )
    }

    pub fn first(&self) -> Duration {
        self.first
    }

    pub fn longest(&self) -> Duration {
        self.longest
    }

    /// A fresh sequence of delays, starting at about `first`.
    pub fn delays(&self) -> RetryDelays {
        RetryDelays {
            backoff: backoff::ExponentialBackoff {
                current_interval: self.first,
                initial_interval: self.first,
                max_interval: self.longest,
                randomization_factor: self.jitter,
                multiplier: 2.0,
                max_elapsed_time: None,
                ..backoff::ExponentialBackoff::default()
            },
            longest: self.longest,
        }
    }
}

/// The delays of one retrying loop: call [`RetryDelays::next_delay`] after
/// each failure and [`RetryDelays::reset`] after a success. Also an endless
/// iterator (the breaker's open intervals, for `failsafe`).
#[derive(Debug, Clone)]
pub struct RetryDelays {
    backoff: backoff::ExponentialBackoff,
    longest: Duration,
}

impl RetryDelays {
    /// The wait before the next attempt; never more than the policy's
    /// `longest` (the jitter is applied below the cap, not above it).
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_backoff().unwrap_or(self.longest).min(self.longest)
    }

    /// Starts again from the first delay.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }
}

impl Iterator for RetryDelays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert_eq!(
            RetryPolicy::new(Duration::ZERO, millis(10), 0.3),
            Err(RetryPolicyError::FirstNotPositive)
        );
        assert_eq!(
            RetryPolicy::new(millis(500), millis(100), 0.3),
            Err(RetryPolicyError::LongestBelowFirst)
        );
        for jitter in [-0.1, 1.5, f64::NAN] {
            assert_eq!(
                RetryPolicy::new(millis(1), millis(10), jitter),
                Err(RetryPolicyError::JitterOutOfRange),
                "{jitter}"
            );
        }
        assert!(RetryPolicy::new(millis(100), millis(100), 0.0).is_ok());
    }

    #[test]
    fn delays_grow_within_the_jitter_and_stay_capped() {
        let policy = RetryPolicy::from_millis(100, 1_000, RetryPolicy::RETRY_JITTER).unwrap();
        let delays: Vec<Duration> = policy.delays().take(20).collect();
        // First about 100 ms, ±30 %.
        assert!(delays[0] >= millis(70) && delays[0] <= millis(130), "{delays:?}");
        assert!(delays.iter().all(|delay| *delay <= millis(1_000)), "{delays:?}");
        // Long after the cap is reached the delays are still near it.
        assert!(delays[19] >= millis(700), "{delays:?}");
    }

    #[test]
    fn without_jitter_the_delays_double() {
        let policy = RetryPolicy::from_millis(100, 1_000, 0.0).unwrap();
        let delays: Vec<u128> = policy.delays().take(6).map(|delay| delay.as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn reset_starts_again_from_the_first_delay() {
        let policy = RetryPolicy::from_millis(100, 10_000, 0.0).unwrap();
        let mut delays = policy.delays();
        for _ in 0..5 {
            delays.next_delay();
        }
        assert_eq!(delays.next_delay(), millis(3_200));
        delays.reset();
        assert_eq!(delays.next_delay(), millis(100));
    }
}
