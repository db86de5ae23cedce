//! Harness for process-level tests: real `blockrepd` daemons in temporary directories, the
//! `blockrep` CLI, and a small raw NBD client.

pub mod daemon;
pub mod nbd;

pub use daemon::{Daemon, binary, require_tool};
pub use nbd::NbdClient;

/// A seed from `BLOCKREP_SEED` or the given default, printed so a failure can be replayed.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("BLOCKREP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed: BLOCKREP_SEED={seed}");
    seed
}
