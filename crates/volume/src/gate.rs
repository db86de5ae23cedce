//! The write gate: the one place every write-like command on a volume passes.
//!
//! A write (NBD WRITE, WRITE_ZEROES or TRIM, aligned or not, from any connection) goes
//! through the gate in three steps:
//!
//! 1. [`WriteGate::enter`] locks the blocks it touches (see
//!    [`blockrep_core::range_lock`]): overlapping writes run one after the other, in the
//!    order they entered, so a read-modify-write never writes stale bytes over a newer write.
//! 2. [`WriteGate::admit`] records the batch's writes in the dirty tracker before any is
//!    submitted (rule 2 of the design brief), and the first write of a data generation in
//!    the volume's [`LineageFile`] (rule 5).
//! 3. [`WriteGate::leave`] releases the blocks once the write is done, just before its
//!    answer is sent, and wakes the connections whose queued writes that lets go.
//!
//! A connection whose write is queued sleeps in its ring; the [`Waker`] it passed in wakes it.
//!
//! Before any of this the volume's role decides: a DR volume refuses the write with `EPERM`,
//! and nothing is locked, written or marked dirty. A production volume also carries the
//! [`ReplicaLink`] its writes are replicated through.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use blockrep_core::replication::{IllegalTransition, VolumeRole, WriteVerdict};
use blockrep_core::{Acquired, AlVersion, ByteRange, LockId, RangeLocks};

use crate::lineage_file::LineageFile;
use crate::link::ReplicaLink;

use crate::backing::DIRECT_IO_ALIGN;
use crate::tracker::{DirtyTracker, TrackerError};
use crate::waker::Waker;

/// Zeroing and discard are admitted to the tracker in pieces of at most this much, so one
/// request over the whole volume never needs the whole activity log at once.
pub const ADMIT_CHUNK: u64 = 32 << 20;

/// What the gate says to a write that enters.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entered {
    /// Its blocks are locked: admit it and start it.
    Go(LockId),
    /// An overlapping write is ahead of it; the waker fires when it may go
    /// ([`WriteGate::is_held`] then says so).
    Queued(LockId),
    /// The volume's role refuses writes: answer this errno; nothing was locked.
    Refused(i32),
}

pub struct WriteGate {
    locks: Mutex<RangeLocks<Arc<Waker>>>,
    tracker: Option<Arc<DirtyTracker>>,
    role: RwLock<VolumeRole>,
    link: RwLock<Option<Arc<dyn ReplicaLink>>>,
    lineage: RwLock<Option<Arc<LineageFile>>>,
}

impl WriteGate {
    pub fn new(tracker: Option<Arc<DirtyTracker>>) -> Self {
        Self {
            locks: Mutex::new(RangeLocks::new()),
            tracker,
            role: RwLock::new(VolumeRole::Standalone),
            lineage: RwLock::new(None),
            link: RwLock::new(None),
        }
    }

    pub fn tracker(&self) -> Option<&Arc<DirtyTracker>> {
        self.tracker.as_ref()
    }

    pub fn role(&self) -> VolumeRole {
        *self.role.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the volume to another role, if that move is allowed. Returns the old role.
    pub fn set_role(&self, to: VolumeRole) -> Result<VolumeRole, IllegalTransition> {
        let mut role = self.role.write().unwrap_or_else(|e| e.into_inner());
        let old = *role;
        *role = old.transition(to)?;
        Ok(old)
    }

    /// Restores a role recorded before a restart (no transition check: it was checked when
    /// it was taken).
    pub fn restore_role(&self, role: VolumeRole) {
        *self.role.write().unwrap_or_else(|e| e.into_inner()) = role;
    }

    /// The link this volume's writes are replicated through, if any.
    pub fn link(&self) -> Option<Arc<dyn ReplicaLink>> {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_link(&self, link: Option<Arc<dyn ReplicaLink>>) {
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = link;
    }

    /// Locks the blocks `range` touches, or queues for them; or refuses the write if the
    /// volume's role does not take writes.
    pub fn enter(&self, range: ByteRange, waker: &Arc<Waker>) -> Entered {
        if let Some(errno) = self.refusal() {
            return Entered::Refused(errno);
        }
        self.lock(range, waker)
    }

    /// The errno the volume's role answers the application's writes with, if it refuses
    /// them.
    pub fn refusal(&self) -> Option<i32> {
        (self.role().write_verdict() == WriteVerdict::Refuse).then_some(libc::EPERM)
    }

    /// Locks the blocks `range` touches whatever the role: for writes that are not the
    /// application's (a DR volume applying its peer's data, a resync reading).
    pub fn lock(&self, range: ByteRange, waker: &Arc<Waker>) -> Entered {
        match self
            .lock_table()
            .acquire(range.align_out(DIRECT_IO_ALIGN), Arc::clone(waker))
        {
            Acquired::Held(id) => Entered::Go(id),
            Acquired::Queued(id) => Entered::Queued(id),
        }
    }

    /// Whether a queued write may go now.
    pub fn is_held(&self, lock: LockId) -> bool {
        self.lock_table().is_held(lock)
    }

    /// Locks `range` whatever the role, blocking the calling thread while overlapping writes
    /// finish (for threads without a ring; `waker` must be the caller's own).
    pub fn lock_blocking(&self, range: ByteRange, waker: &Arc<Waker>) -> std::io::Result<LockId> {
        let lock = match self.lock(range, waker) {
            Entered::Go(lock) => return Ok(lock),
            Entered::Queued(lock) => lock,
            Entered::Refused(errno) => return Err(std::io::Error::from_raw_os_error(errno)),
        };
        while !self.is_held(lock) {
            waker.wait_blocking()?;
        }
        Ok(lock)
    }

    /// Records a batch of locked writes in the dirty tracker. Afterwards `ready[i]` says
    /// whether `ranges[i]` may be submitted now; the others once
    /// [`WriteGate::make_durable`] has returned for the version this returns.
    pub fn admit(
        &self,
        ranges: &[ByteRange],
        ready: &mut Vec<bool>,
    ) -> Result<Option<AlVersion>, TrackerError> {
        self.note_written()?;
        match &self.tracker {
            Some(tracker) => tracker.admit_batch(ranges, ready),
            None => {
                ready.clear();
                ready.resize(ranges.len(), true);
                Ok(None)
            }
        }
    }

    pub fn make_durable(&self, version: AlVersion) -> Result<(), TrackerError> {
        match &self.tracker {
            Some(tracker) => tracker.make_durable(version),
            None => Ok(()),
        }
    }

    /// Admits one locked range and waits until it may be submitted.
    pub fn admit_blocking(&self, range: ByteRange) -> Result<(), TrackerError> {
        self.note_written()?;
        match &self.tracker {
            Some(tracker) => tracker.admit(&[range]),
            None => Ok(()),
        }
    }

    /// The volume's data generations: the first application write of each is recorded
    /// before it is submitted.
    pub fn set_lineage(&self, lineage: Arc<LineageFile>) {
        *self.lineage.write().unwrap_or_else(|e| e.into_inner()) = Some(lineage);
    }

    pub fn lineage(&self) -> Option<Arc<LineageFile>> {
        self.lineage
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note_written(&self) -> Result<(), TrackerError> {
        match &*self.lineage.read().unwrap_or_else(|e| e.into_inner()) {
            Some(lineage) => lineage.note_written().map_err(|source| TrackerError::Io {
                what: "record the generation's first write in",
                path: LineageFile::NAME.into(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// No write holds or waits for blocks: every write that entered has been answered.
    pub fn idle(&self) -> bool {
        self.lock_table().is_empty()
    }

    /// The write holding `lock` is done (or refused): its blocks are free for the next.
    pub fn leave(&self, lock: LockId) {
        let granted = self.lock_table().release(lock);
        for waker in granted {
            waker.wake();
        }
    }

    fn lock_table(&self) -> MutexGuard<'_, RangeLocks<Arc<Waker>>> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dr_volume_refuses_writes_before_locking_anything() {
        use blockrep_core::replication::PairId;
        let gate = WriteGate::new(None);
        let waker = Arc::new(Waker::new().unwrap());
        let pair = PairId::random();
        gate.set_role(VolumeRole::Secondary { pair }).unwrap();
        assert_eq!(
            gate.enter(ByteRange::new(0, 4096), &waker),
            Entered::Refused(libc::EPERM)
        );
        assert!(gate.lock_table().is_empty());
        assert!(
            gate.set_role(VolumeRole::Secondary { pair }).is_err(),
            "already DR"
        );
        gate.set_role(VolumeRole::Standalone).unwrap();
        assert!(matches!(
            gate.enter(ByteRange::new(0, 4096), &waker),
            Entered::Go(_)
        ));
    }

    #[test]
    fn a_queued_writer_is_woken_when_the_blocks_are_free() {
        let gate = Arc::new(WriteGate::new(None));
        let first = Arc::new(Waker::new().unwrap());
        let second = Arc::new(Waker::new().unwrap());
        // A 512-byte write locks its whole 4 KiB block.
        let Entered::Go(a) = gate.enter(ByteRange::new(0, 512), &first) else {
            panic!("nothing held yet");
        };
        let Entered::Queued(b) = gate.enter(ByteRange::new(1024, 4096), &second) else {
            panic!("overlaps the first write's block");
        };
        let other = Arc::clone(&gate);
        let releaser = std::thread::spawn(move || other.leave(a));
        while !gate.is_held(b) {
            second.wait_blocking().unwrap();
        }
        releaser.join().unwrap();
        gate.leave(b);
        assert!(gate.lock_table().is_empty());
    }
}
