//! Giving freed memory back to the system at once, where the daemon's allocator can.
//!
//! An async pair whose journal overflows frees the journal's data (up to
//! `replication.journal_bytes`) and starts a catch-up that reads again (up to its 64 MiB
//! read-ahead) within the next second. The allocator returns freed pages on its own only
//! after a delay, so for a moment the agent would hold both. The daemon registers how to
//! release them now; the link asks for it when its journal overflows.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static RELEASE: OnceLock<fn()> = OnceLock::new();
/// A release purges the whole allocator (every pair's freed pages, not only the overflowed
/// journal's): at most one starts in this long, however many journals overflow.
const AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// When the last release started.
static LAST: Mutex<Option<Instant>> = Mutex::new(None);

/// Sets how freed memory is released (once; the daemon's allocator). Without it, nothing is
/// done.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Releases freed memory on a thread of its own (it may take milliseconds, and the caller
/// may be a writer's thread), unless a release started less than a second ago; the thread,
/// if one was started.
pub(crate) fn release_freed() -> Option<std::thread::JoinHandle<()>> {
    let release = *RELEASE.get()?;
    {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < AT_MOST_EVERY) {
            return None;
        }
        *last = Some(Instant::now());
    }
    std::thread::Builder::new()
        .name("memory-release".into())
        .spawn(release)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot release freed memory now"))
        .ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    static RELEASED: AtomicU32 = AtomicU32::new(0);

    fn count_release() {
        RELEASED.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn the_registered_release_runs_on_its_own_thread_at_most_once_a_second() {
        set_release(count_release);
        // Another test of this process may have asked for one just now: a second later,
        // one is due whatever happened before.
        *LAST.lock().unwrap() = None;
        let before = RELEASED.load(Ordering::SeqCst);
        release_freed().expect("a thread").join().unwrap();
        assert!(RELEASED.load(Ordering::SeqCst) > before);
        assert!(
            release_freed().is_none(),
            "a second release within a second of the first"
        );
    }
}
