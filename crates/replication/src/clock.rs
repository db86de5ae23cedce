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

/// A clock that moves only when told: for tests. Its wall time starts at a plausible
/// date (0 means "no cut time" elsewhere) and moves with its monotonic time.
#[derive(Debug, Default)]
pub struct ManualClock {
    elapsed_us: AtomicU64,
}

impl ManualClock {
    /// Its wall time when it starts: 2027-01-15, in ms since the Unix epoch.
    pub const START_WALL_MS: u64 = 1_800_000_000_000;

    /// Moves the clock on by `by`.
    pub fn advance(&self, by: Duration) {
        let us = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.elapsed_us.fetch_add(us, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn monotonic_us(&self) -> u64 {
        self.elapsed_us.load(Ordering::SeqCst)
    }

    fn wall_ms(&self) -> u64 {
        Self::START_WALL_MS + self.elapsed_us.load(Ordering::SeqCst) / 1000
    }
}
