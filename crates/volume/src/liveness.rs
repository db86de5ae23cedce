//! Whether the agent's loops make progress, for the service manager's watchdog.
//!
//! A hung agent must not look alive: every loop that owes the world progress (an NBD
//! connection with disk operations in flight, a DR applier with writes or a sync in flight,
//! a pair's session ticking) holds a [`Beat`]. It says when it waits for something that must
//! come (`expect(true)`), and beats whenever it makes progress. The daemon pings the
//! watchdog only while no beat that expects something is older than its limit; a loop stuck
//! in the kernel or on a lock stops the pings, and the service manager restarts the agent,
//! which is then crash recovery. A loop with nothing to wait for (an idle client) is never
//! stuck.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// One loop's heartbeat.
#[derive(Debug)]
pub struct Beat {
    name: String,
    /// Milliseconds since the registry's start when the loop last made progress.
    last_ms: AtomicU64,
    /// The loop waits for something that must come.
    expecting: AtomicBool,
}

impl Beat {
    /// The loop made progress now.
    #[inline]
    pub fn progress(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the loop now waits for something that must come (operations in flight).
    /// The clock starts when it begins to wait.
    #[inline]
    pub fn expect(&self, expecting: bool) {
        if self.expecting.swap(expecting, Ordering::Relaxed) != expecting && expecting {
            self.progress();
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Every live beat of the process.
#[derive(Debug, Default)]
pub struct Liveness {
    beats: Mutex<Vec<Weak<Beat>>>,
}

/// A loop that expects progress and has made none for a while.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stalled {
    pub name: String,
    pub for_ms: u64,
}

impl Liveness {
    /// The process's registry.
    pub fn global() -> &'static Liveness {
        static LIVENESS: OnceLock<Liveness> = OnceLock::new();
        LIVENESS.get_or_init(Liveness::default)
    }

    /// A beat for a loop named `name`; it counts until it is dropped.
    pub fn register(&self, name: impl Into<String>) -> Arc<Beat> {
        let beat = Arc::new(Beat {
            name: name.into(),
            last_ms: AtomicU64::new(now_ms()),
            expecting: AtomicBool::new(false),
        });
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.retain(|b| b.strong_count() > 0);
        beats.push(Arc::downgrade(&beat));
        beat
    }

    /// The loops that expect progress and made none for longer than `limit`.
    pub fn stalled(&self, limit: Duration) -> Vec<Stalled> {
        self.stalled_at(now_ms(), limit)
    }

    fn stalled_at(&self, now: u64, limit: Duration) -> Vec<Stalled> {
        let limit = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.retain(|b| b.strong_count() > 0);
        beats
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|b| b.expecting.load(Ordering::Relaxed))
            .filter_map(|b| {
                let for_ms = now.saturating_sub(b.last_ms.load(Ordering::Relaxed));
                (for_ms > limit).then(|| Stalled {
                    name: b.name.clone(),
                    for_ms,
                })
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loop_that_expects_progress_can_stall() {
        let liveness = Liveness::default();
        let idle = liveness.register("idle");
        let busy = liveness.register("busy");
        busy.expect(true);
        let hour = Duration::from_secs(3600);
        assert!(liveness.stalled(hour).is_empty());
        let later = now_ms() + 2 * 3600 * 1000;
        let stalled = liveness.stalled_at(later, hour);
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].name, "busy");
        idle.progress();
        busy.expect(false);
        assert!(
            liveness.stalled_at(later, hour).is_empty(),
            "it waits for nothing"
        );
        busy.expect(true);
        drop(busy);
        assert!(
            liveness.stalled_at(later, hour).is_empty(),
            "a dropped beat is gone"
        );
    }
}
