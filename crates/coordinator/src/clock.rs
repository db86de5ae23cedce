//! The one clock the coordinator's timers read: when a node was last heard from, how long
//! an agent has not taken a step, when a pause was last sent. Passed in, so a test moves
//! time on instead of waiting for it. (The records' timestamps are wall-clock text for the
//! operator; nothing is decided on them.)

#[cfg(test)]
use std::sync::Mutex;
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The machine's monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (the coordinator's tests).
#[cfg(test)]
pub struct ManualClock {
    now: Mutex<Instant>,
}

#[cfg(test)]
impl ManualClock {
    /// Starts an hour after the machine's clock, so a test may look back that far.
    pub fn new() -> Self {
        Self {
            now: Mutex::new(Instant::now() + Duration::from_secs(3600)),
        }
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

#[cfg(test)]
impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}
