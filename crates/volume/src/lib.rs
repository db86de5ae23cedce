//! Backing-volume I/O and crash-safe dirty tracking.
//!
//! - [`Backing`]: a block device or regular file opened with `O_DIRECT`.
//! - [`AlignedBuf`]: page-aligned buffers for direct I/O.
//! - [`DirtyTracker`]: the dirty map and activity log of `blockrep-core`, persisted so that
//!   after `kill -9` or power loss every block written since the last clear is dirty again.
//! - [`Volume`]: what the NBD server serves: a backing plus its tracker.

mod backing;
mod buf;
mod durable_file;
mod tracker;
mod volume;

pub use backing::{Backing, BackingKind, DIRECT_IO_ALIGN, OpenError};
pub use buf::{AlignedBuf, BufPool};
pub use durable_file::write_file_durably;
pub use tracker::{DirtyTracker, FlusherHandle, RecoveryReport, TrackerConfig, TrackerError};
pub use volume::{ClientGuard, Volume, VolumeIoError};
