//! One thread writes every volume's dirty bitmap back (`flush(Idle)`, every
//! `flush_interval`), however many volumes the agent has: a thread per volume grew an agent
//! of 1,000 volumes to 1,005 threads.
//!
//! A volume joins with [`Flusher::add`] and leaves when its [`Flushing`] handle drops; once
//! the drop returns, its tracker is flushed no more (a flush of it in progress is waited
//! for), so the tracker can be closed after.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use blockrep_core::activity_log::RetirePolicy;

use crate::tracker::DirtyTracker;

/// A volume's place in the flusher: its tracker until it leaves.
type Slot = Arc<Mutex<Option<(String, Arc<DirtyTracker>)>>>;

struct Shared {
    slots: Mutex<BTreeMap<u64, Slot>>,
    next: AtomicU64,
    stop: Mutex<bool>,
    stopping: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's bitmap flusher thread.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread; it flushes every volume added, every `interval`.
    pub fn start(interval: Duration) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            stop: Mutex::new(false),
            stopping: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name("bitmap-flusher".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || shared.run(interval)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Flushes `tracker` (the volume `label`) from now on, until the handle drops.
    pub fn add(&self, label: String, tracker: Arc<DirtyTracker>) -> Flushing {
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let slot: Slot = Arc::new(Mutex::new(Some((label, tracker))));
        lock(&self.shared.slots).insert(id, Arc::clone(&slot));
        Flushing {
            shared: Arc::clone(&self.shared),
            id,
            slot,
        }
    }

    /// How many volumes it flushes.
    pub fn len(&self) -> usize {
        lock(&self.shared.slots).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        *lock(&self.shared.stop) = true;
        self.shared.stopping.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn run(&self, interval: Duration) {
        loop {
            let stop = lock(&self.stop);
            let (stop, _) = self
                .stopping
                .wait_timeout_while(stop, interval, |stop| !*stop)
                .unwrap_or_else(|e| e.into_inner());
            if *stop {
                return;
            }
            drop(stop);
            // The slots as they are now; one added meanwhile waits for the next round.
            let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
            for slot in slots {
                let held = lock(&slot);
                if let Some((label, tracker)) = held.as_ref()
                    && let Err(e) = tracker.flush(RetirePolicy::Idle)
                {
                    tracing::error!(volume = %label, error = %e, "bitmap flush failed; will retry");
                }
            }
        }
    }
}

/// A volume's membership in the flusher: it leaves when this drops.
pub struct Flushing {
    shared: Arc<Shared>,
    id: u64,
    slot: Slot,
}

impl Drop for Flushing {
    fn drop(&mut self) {
        lock(&self.shared.slots).remove(&self.id);
        // Waits for a flush of it in progress; none starts after.
        *lock(&self.slot) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::TrackerConfig;

    fn tracker(dir: &std::path::Path) -> Arc<DirtyTracker> {
        let (tracker, _) =
            DirtyTracker::open(dir, 64 << 20, TrackerConfig::default()).expect("a tracker");
        Arc::new(tracker)
    }

    #[test]
    fn one_thread_flushes_every_volume_and_a_volume_that_left_is_flushed_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let flusher = Flusher::start(Duration::from_millis(1)).unwrap();
        let handles: Vec<(Arc<DirtyTracker>, Flushing)> = (0..50)
            .map(|i| {
                let sub = dir.path().join(i.to_string());
                std::fs::create_dir_all(&sub).unwrap();
                let t = tracker(&sub);
                let h = flusher.add(format!("v{i}"), Arc::clone(&t));
                (t, h)
            })
            .collect();
        assert_eq!(flusher.len(), 50);
        for (tracker, handle) in handles {
            drop(handle);
            // Its only other holder was the flusher's slot, emptied by the drop.
            assert_eq!(Arc::strong_count(&tracker), 1, "still held by the flusher");
        }
        assert!(flusher.is_empty());
    }
}
