//! The one clock a pair's link reads: passed in, so that a test (or a simulation) sets the
//! time instead of sleeping for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where a link reads the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Microseconds on a clock that never goes back: timeouts and how long answers waited.
    fn monotonic_us(&self) -> u64;
    /// Milliseconds since the Unix epoch: when an epoch was cut, shown to operators.
    fn wall_ms(&self) -> u64;
}

/// The machine's clocks.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn monotonic_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told: for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    monotonic_us: AtomicU64,
    wall_ms: AtomicU64,
}

impl ManualClock {
    /// Moves both clocks on by `by`.
    pub fn advance(&self, by: Duration) {
        let us = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.monotonic_us.fetch_add(us, Ordering::SeqCst);
        self.wall_ms.fetch_add(us / 1000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn monotonic_us(&self) -> u64 {
        self.monotonic_us.load(Ordering::SeqCst)
    }

    fn wall_ms(&self) -> u64 {
        self.wall_ms.load(Ordering::SeqCst)
    }
}
