//! blockrep's core: the pieces of replication that do no I/O.
//!
//! Everything here is driven synchronously by its callers: no threads, no clocks, no files.
//! That keeps the rules the design depends on (crash-safe dirty tracking first) testable by
//! unit tests, property tests and deterministic simulation.

pub mod activity_log;
pub mod cache_mode;
pub mod dirty_map;
pub mod extent;
pub mod ids;
pub mod pair;
pub mod range_lock;
pub mod replication;

pub use activity_log::{ActivityLog, Admission, AlVersion, FlushTicket, RegionIndex, RetirePolicy};
pub use cache_mode::{CacheMode, UnknownCacheMode};
pub use dirty_map::{BITMAP_PAGE_BYTES, DirtyMap, Granularity, GranularityError, PageIndex};
pub use extent::{ByteRange, RangeError, ReadSpan, read_spans};
pub use ids::{NameError, VolumeId, VolumeName};
pub use range_lock::{Acquired, LockId, RangeLocks};
