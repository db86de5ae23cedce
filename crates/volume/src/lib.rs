//! Backing-volume I/O and crash-safe dirty tracking.
//!
//! - [`Backing`]: a block device or regular file opened with `O_DIRECT`.
//! - [`AlignedBuf`]: page-aligned buffers for direct I/O.
//! - [`DirtyTracker`]: the dirty map and activity log of `blockrep-core`, persisted so that
//!   after `kill -9` or power loss every block written since the last clear is dirty again.
//! - [`WriteGate`]: the one place every write passes: block-range locks, then the tracker.
//! - [`LineageFile`]: the volume's data generations, and the mark of the first write in one.
//! - [`Waker`]: wakes a connection's ring from another thread.
//! - [`Volume`]: what the NBD server serves: a backing plus its gate and tracker.

mod backing;
mod buf;
mod durable_file;
mod flusher;
mod gate;
mod lineage_file;
mod link;
pub mod liveness;
#[cfg(test)]
mod power_cut_sim;
pub mod ring;
mod tracker;
#[cfg(any(test, feature = "fault-injection"))]
mod volatile;
mod volume;
mod waker;

pub use backing::{Backing, BackingKind, DIRECT_IO_ALIGN, Extent, GrowError, OpenError};
pub use blockrep_core::replication::AnswerToken;
pub use buf::{AlignedBuf, BufPool, PooledBuf, SharedPool};
pub use durable_file::write_file_durably;
pub use flusher::{Flusher, Flushing};
pub use gate::{ADMIT_CHUNK, Entered, WriteGate};
pub use lineage_file::LineageFile;
pub use link::{AfterLocal, Delivery, Mailbox, ReplicaData, ReplicaLink, ReplicaMode, Replicated};
pub use tracker::{DirtyTracker, RecoveryReport, TrackerConfig, TrackerError};
pub use volume::{ClientGuard, GrowVolumeError, IoCounters, Volume};
pub use waker::Waker;
