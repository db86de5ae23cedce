//! The activity log: which regions of a volume may hold writes the on-disk bitmap does not
//! show yet (a write-intent scheme, as DRBD's activity log).
//!
//! The rule it keeps (brief, rule 2): every block written since its bit was last cleared is
//! either set in the on-disk bitmap or lies in a region of the on-disk activity log. So a
//! write into a region that is not yet in the on-disk log waits until the log holding it is
//! durable; writes into hot regions pay nothing. Regions leave the log only after a bitmap
//! flush that began after their last write completed its bookkeeping.
//!
//! ```text
//!  admit(range) ──► Ready ─────────────────────────────► submit the write
//!       │
//!       ├──────► PersistFirst(v) ─► write the log ≥ v ─► mark_durable(v) ─► submit
//!       │
//!       └──────► Full ─► flush bitmap ─► finish_flush(ticket, ToLowWater) ─► persist ─► retry
//! ```
//!
//! After a crash, the recovered dirty map is the on-disk bitmap plus every block of every
//! region in the on-disk log: over-marking, never under-marking.

use std::collections::HashMap;
use std::fmt;

use crate::extent::ByteRange;

/// Index of an activity-log region (`offset / region_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionIndex(pub u64);

impl fmt::Display for RegionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {}", self.0)
    }
}

/// Version of the activity log's membership; each change makes a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AlVersion(pub u64);

/// What a writer must do before it may submit a write.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every region the write touches is in the on-disk log: submit.
    Ready,
    /// The log must be durable at this version (or later) before the write is submitted.
    PersistFirst(AlVersion),
    /// The log has no room: flush the bitmap, retire regions, then admit again.
    Full,
}

/// Which regions a completed bitmap flush lets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetirePolicy {
    /// Only regions not written during the previous flush interval.
    Idle,
    /// Idle regions, then the least recently written until the log is at its low-water mark.
    ToLowWater,
    /// Every region the flush covered (clean shutdown).
    All,
}

/// Marks the point a bitmap flush covers: every write admitted before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct FlushTicket {
    seq: u64,
}

#[derive(Clone, Copy, Debug)]
struct Region {
    added_in: AlVersion,
    last_write: u64,
}

#[derive(Debug)]
pub struct ActivityLog {
    region_size: u64,
    capacity: usize,
    regions: HashMap<RegionIndex, Region>,
    version: AlVersion,
    durable: AlVersion,
    write_seq: u64,
    /// Write sequence covered by the last completed flush.
    last_flush_seq: u64,
}

impl ActivityLog {
    /// An empty log. `region_size` is a power of two; `capacity` is the most regions it holds.
    pub fn new(region_size: u64, capacity: usize) -> Self {
        assert!(
            region_size.is_power_of_two(),
            "region size must be a power of two"
        );
        assert!(capacity > 0, "the activity log needs room for a region");
        Self {
            region_size,
            capacity,
            regions: HashMap::with_capacity(capacity),
            version: AlVersion(0),
            durable: AlVersion(0),
            write_seq: 0,
            last_flush_seq: 0,
        }
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The bytes a region covers (the caller clips to the volume's size).
    pub fn region_range(&self, region: RegionIndex) -> ByteRange {
        ByteRange::new(region.0 * self.region_size, self.region_size)
    }

    /// Records a write into `range` and says what must happen before it is submitted.
    pub fn admit(&mut self, range: ByteRange) -> Admission {
        if range.is_empty() {
            return Admission::Ready;
        }
        let first = range.offset / self.region_size;
        let last = (range.end() - 1) / self.region_size;
        let new = (first..=last)
            .filter(|r| !self.regions.contains_key(&RegionIndex(*r)))
            .count();
        if new > 0 && self.regions.len() + new > self.capacity {
            return Admission::Full;
        }
        if new > 0 {
            self.version.0 += 1;
        }
        self.write_seq += 1;
        let mut needed = AlVersion(0);
        for r in first..=last {
            let region = self.regions.entry(RegionIndex(r)).or_insert(Region {
                added_in: self.version,
                last_write: 0,
            });
            region.last_write = self.write_seq;
            needed = needed.max(region.added_in);
        }
        if needed > self.durable {
            Admission::PersistFirst(needed)
        } else {
            Admission::Ready
        }
    }

    /// Whether the on-disk log is at `version` or later.
    pub fn is_durable(&self, version: AlVersion) -> bool {
        self.durable >= version
    }

    /// The membership to write to disk, with its version.
    pub fn snapshot(&self) -> (AlVersion, Vec<RegionIndex>) {
        let mut regions: Vec<_> = self.regions.keys().copied().collect();
        regions.sort_unstable();
        (self.version, regions)
    }

    /// The log at `version` is on disk.
    pub fn mark_durable(&mut self, version: AlVersion) {
        self.durable = self.durable.max(version);
    }

    /// Call under the same lock as the dirty map's `take_changed_pages`.
    pub fn begin_flush(&self) -> FlushTicket {
        FlushTicket {
            seq: self.write_seq,
        }
    }

    /// The bitmap pages taken with `ticket` are durable: retire regions by `policy`.
    /// Returns whether the membership changed (and so must be written again).
    pub fn finish_flush(&mut self, ticket: FlushTicket, policy: RetirePolicy) -> bool {
        let before = self.regions.len();
        let idle_before = self.last_flush_seq;
        match policy {
            RetirePolicy::All => self.regions.retain(|_, r| r.last_write > ticket.seq),
            RetirePolicy::Idle | RetirePolicy::ToLowWater => {
                self.regions.retain(|_, r| r.last_write > idle_before);
            }
        }
        if policy == RetirePolicy::ToLowWater {
            let low_water = self.capacity * 3 / 4;
            if self.regions.len() > low_water {
                let mut covered: Vec<(u64, RegionIndex)> = self
                    .regions
                    .iter()
                    .filter(|(_, r)| r.last_write <= ticket.seq)
                    .map(|(i, r)| (r.last_write, *i))
                    .collect();
                covered.sort_unstable();
                let excess = self.regions.len() - low_water;
                for (_, index) in covered.into_iter().take(excess) {
                    self.regions.remove(&index);
                }
            }
        }
        self.last_flush_seq = self.last_flush_seq.max(ticket.seq);
        let changed = self.regions.len() != before;
        if changed {
            self.version.0 += 1;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn durable_after(log: &mut ActivityLog, admission: Admission) {
        if let Admission::PersistFirst(v) = admission {
            let (version, _) = log.snapshot();
            assert!(version >= v);
            log.mark_durable(version);
        }
    }

    #[test]
    fn first_write_into_a_region_waits_then_hot_writes_pass() {
        let mut log = ActivityLog::new(4 * MIB, 8);
        let a = log.admit(ByteRange::new(0, 4096));
        assert_eq!(a, Admission::PersistFirst(AlVersion(1)));
        // A second writer into the same region, before the log is durable, must wait too.
        assert_eq!(
            log.admit(ByteRange::new(8192, 4096)),
            Admission::PersistFirst(AlVersion(1))
        );
        durable_after(&mut log, a);
        assert_eq!(log.admit(ByteRange::new(4096, 4096)), Admission::Ready);
    }

    #[test]
    fn a_write_spanning_regions_adds_all_of_them() {
        let mut log = ActivityLog::new(MIB, 8);
        let a = log.admit(ByteRange::new(MIB - 1, 2 * MIB));
        durable_after(&mut log, a);
        assert_eq!(
            log.snapshot().1,
            vec![RegionIndex(0), RegionIndex(1), RegionIndex(2)]
        );
    }

    #[test]
    fn full_log_refuses_new_regions_until_a_flush_retires_some() {
        let mut log = ActivityLog::new(MIB, 4);
        for r in 0..4 {
            let a = log.admit(ByteRange::new(r * MIB, 4096));
            durable_after(&mut log, a);
        }
        assert_eq!(log.admit(ByteRange::new(4 * MIB, 4096)), Admission::Full);
        assert_eq!(
            log.admit(ByteRange::new(0, 4096)),
            Admission::Ready,
            "hot region still passes"
        );
        let ticket = log.begin_flush();
        assert!(log.finish_flush(ticket, RetirePolicy::ToLowWater));
        assert_eq!(log.len(), 3);
        // Region 0 was written last, so it stays.
        assert!(log.snapshot().1.contains(&RegionIndex(0)));
        assert!(matches!(
            log.admit(ByteRange::new(4 * MIB, 4096)),
            Admission::PersistFirst(_)
        ));
    }

    #[test]
    fn idle_policy_keeps_regions_written_in_the_last_interval() {
        let mut log = ActivityLog::new(MIB, 16);
        let a = log.admit(ByteRange::new(0, 4096));
        durable_after(&mut log, a);
        let t1 = log.begin_flush();
        assert!(
            !log.finish_flush(t1, RetirePolicy::Idle),
            "written during the interval"
        );
        let t2 = log.begin_flush();
        assert!(
            log.finish_flush(t2, RetirePolicy::Idle),
            "idle for a whole interval"
        );
        assert!(log.is_empty());
    }

    #[test]
    fn a_write_after_the_ticket_is_never_retired() {
        let mut log = ActivityLog::new(MIB, 16);
        let a = log.admit(ByteRange::new(0, 4096));
        durable_after(&mut log, a);
        let ticket = log.begin_flush();
        let _ = log.admit(ByteRange::new(0, 4096)); // lands after the flushed pages were taken
        log.finish_flush(ticket, RetirePolicy::All);
        assert_eq!(log.snapshot().1, vec![RegionIndex(0)]);
    }

    #[test]
    fn retiring_bumps_the_version_so_a_readded_region_waits_again() {
        let mut log = ActivityLog::new(MIB, 16);
        let a = log.admit(ByteRange::new(0, 4096));
        durable_after(&mut log, a);
        let ticket = log.begin_flush();
        assert!(log.finish_flush(ticket, RetirePolicy::All));
        let again = log.admit(ByteRange::new(0, 4096));
        assert!(matches!(again, Admission::PersistFirst(_)));
    }
}
