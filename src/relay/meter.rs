//! Counts confirmed publishes and derives a recent publish rate, for the
//! status page and the admin API; counts re-sends (messages handed to the
//! broker again), the one place `taskgate_republished_total` is kept.
//!
//! Invariant: memory is fixed (one slot per second of the window); the rate
//! is the count of the last [`WINDOW_SECONDS`] *completed* seconds divided
//! by the window, so a half-finished second never drags it down.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Seconds the publish rate is averaged over.
pub const WINDOW_SECONDS: u64 = 10;

/// Confirmed publishes: a total since start and a per-second rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PublishRate {
    pub published_total: u64,
    pub per_second: f64,
}

pub struct PublishMeter {
    started: Instant,
    total: AtomicU64,
    republished: AtomicU64,
    /// `(second since start, count)` per slot; a slot whose second is not
    /// the current one is stale and reads as zero.
    slots: Mutex<[(u64, u64); WINDOW_SECONDS as usize]>,
}

impl Default for PublishMeter {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            total: AtomicU64::new(0),
            republished: AtomicU64::new(0),
            slots: Mutex::new([(u64::MAX, 0); WINDOW_SECONDS as usize]),
        }
    }
}

impl PublishMeter {
    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Notes `count` confirmed publishes now.
    pub fn record(&self, count: u64) {
        if count == 0 {
            return;
        }
        self.total.fetch_add(count, Ordering::Relaxed);
        let second = self.second();
        let mut slots = self.slots.lock().expect("meter lock poisoned");
        let slot = &mut slots[(second % WINDOW_SECONDS) as usize];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += count;
    }

    /// Notes `count` messages about to be handed to the broker again (see
    /// [`crate::outbox::Outbox::mark_sending`]).
    pub fn record_republished(&self, count: u64) {
        if count > 0 {
            metrics::counter!("taskgate_republished_total").increment(count);
            self.republished.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// Re-sends since start.
    pub fn republished_total(&self) -> u64 {
        self.republished.load(Ordering::Relaxed)
    }

    pub fn rate(&self) -> PublishRate {
        let now = self.second();
        let slots = self.slots.lock().expect("meter lock poisoned");
        let recent: u64 = slots
            .iter()
            .filter(|(second, _)| *second < now && now - *second <= WINDOW_SECONDS)
            .map(|(_, count)| count)
            .sum();
        // Right after start the window is shorter than WINDOW_SECONDS.
        let window = now.clamp(1, WINDOW_SECONDS);
        PublishRate {
            published_total: self.total.load(Ordering::Relaxed),
            per_second: recent as f64 / window as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_totals_and_averages_completed_seconds() {
        let meter = PublishMeter::default();
        meter.record(0);
        meter.record(30);
        assert_eq!(meter.rate().published_total, 30);
        assert_eq!(meter.rate().per_second, 0.0, "the current second is not complete yet");
        std::thread::sleep(Duration::from_millis(1100));
        let rate = meter.rate();
        assert_eq!(rate.published_total, 30);
        assert!(rate.per_second > 0.0 && rate.per_second <= 30.0, "{rate:?}");
    }
}
