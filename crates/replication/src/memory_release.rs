//! Giving freed memory back to the system at once, where the daemon's allocator can.
//!
//! An async pair whose journal overflows frees the journal's data (up to
//! `replication.journal_bytes`) and starts a catch-up that reads as much again within the
//! next second. The allocator returns freed pages on its own only after a delay, so for a
//! moment the agent would hold both. The daemon registers how to release them now; the link
//! asks for it when its journal overflows.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Sets how freed memory is released (once; the daemon's allocator). Without it, nothing is
/// done.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Releases freed memory on a thread of its own (it may take milliseconds, and the caller
/// may be a writer's thread); the thread, if one was started.
pub(crate) fn release_freed() -> Option<std::thread::JoinHandle<()>> {
    let release = *RELEASE.get()?;
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
    fn the_registered_release_runs_on_its_own_thread_each_time_it_is_asked_for() {
        set_release(count_release);
        let before = RELEASED.load(Ordering::SeqCst);
        release_freed().expect("a thread").join().unwrap();
        release_freed().expect("a thread").join().unwrap();
        // At least: another test of this process may overflow a journal meanwhile.
        assert!(RELEASED.load(Ordering::SeqCst) >= before + 2);
    }
}
