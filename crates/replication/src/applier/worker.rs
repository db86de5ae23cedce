//! The applier's worker thread: its ring (writes of the stream and of units, the
//! group-committed sync, the wake-up read), the slots and range locks of the writes in
//! flight, and the loop that takes commands from the inbox. What each command does is in
//! `commands`; what the DR side decides (units, the gate, the barrier, the unit being
//! applied, held verifies) is the core's `DrSide`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use blockrep_core::pair::dr_side::DrSide;
use blockrep_core::replication::digests::HeldDigest;
use blockrep_core::replication::{SyncTicket, WriteSeq};
use blockrep_core::{Acquired, ByteRange, LockId, RangeLocks};
use blockrep_volume::{AlignedBuf, BufPool, Volume, Waker};
use bytes::Bytes;
use io_uring::{IoUring, opcode, types};
use tokio::sync::mpsc::UnboundedSender;

use crate::stage_log::{StageLog, Staged};

use super::{
    ApplierSetup, ApplyCmd, ApplyCounters, ApplyEvent, Inbox, RING_ENTRIES, UD_SYNC, UD_WAKE,
    VerifyCmd, fault,
};

mod commands;
mod points;

/// Buffers of completed writes kept for the next ones: a steady stream of writes takes
/// them back as fast as they come; more would only hold memory after a burst.
const POOL_BYTES: usize = 8 << 20;

/// A write's data on the ring.
enum WriteData {
    /// Copied (or read from the stage log) into a buffer of the worker's pool.
    Pooled(AlignedBuf),
    /// A payload received into aligned memory (`dr::received`), written as it came.
    Received(Bytes),
}

impl WriteData {
    /// The memory it holds, for the ring's bound in flight.
    fn footprint(&self) -> usize {
        match self {
            WriteData::Pooled(buf) => buf.capacity(),
            WriteData::Received(bytes) => bytes.len(),
        }
    }
}

impl std::ops::Deref for WriteData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            WriteData::Pooled(buf) => buf,
            WriteData::Received(bytes) => bytes,
        }
    }
}

/// A write in flight on the ring.
struct Slot {
    lock: LockId,
    buf: WriteData,
    offset: u64,
    done: usize,
    fua: bool,
    /// Acknowledge to the sender when done.
    ack: Option<WriteSeq>,
    /// Part of the unit being applied.
    unit: bool,
}

pub(super) struct Worker {
    ring: IoUring,
    disk: i32,
    volume: Arc<Volume>,
    log: StageLog,
    /// What the DR side decides: units, the gate, the barrier, the unit being applied,
    /// the verifies held (the machine this thread is the shell of).
    side: DrSide<ApplyCmd, VerifyCmd>,
    state_path: PathBuf,
    events: UnboundedSender<ApplyEvent>,
    counters: Arc<ApplyCounters>,
    inbox: Arc<Inbox>,
    waker: Arc<Waker>,
    wake_buf: Box<[u8; 8]>,
    wake_inflight: bool,
    /// Commands taken from the inbox, not yet started.
    queue: VecDeque<ApplyCmd>,
    locks: RangeLocks<()>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    inflight: usize,
    /// The unit's writes not yet submitted.
    unit_queue: VecDeque<Staged>,
    /// When the unit being applied was taken from the log, and how many writes it has.
    unit_started: Option<(std::time::Instant, usize)>,
    allowed: Arc<AtomicU64>,
    /// The syncs in flight on the ring, oldest first.
    syncs: VecDeque<SyncTicket>,
    stage_log_max_bytes: u64,
    compact_after_bytes: u64,
    /// Staged writes are being rejected for want of room in the stage log (logged once).
    stage_full: bool,
    /// Bytes of the writes on the ring (their buffers' capacity: a pooled buffer is rounded
    /// up to a power of two), and the most there may be (a write bigger than that goes
    /// alone).
    inflight_bytes: u64,
    inflight_limit: u64,
    /// The buffers of writes that completed, for the next ones (no allocation and zeroing
    /// per write), at most [`POOL_BYTES`] of them.
    bufs: BufPool,
    /// For the watchdog: writes and syncs in flight must complete.
    beat: Arc<blockrep_volume::liveness::Beat>,
    /// The volume's points: its undo journal and the group's retention.
    points: Arc<crate::undo_journal::Points>,
    /// The journal holds points (a direct write must empty it first).
    points_held: bool,
    /// Production's digests waiting for the unit covering their epoch, oldest first.
    held_digests: VecDeque<HeldDigest>,
}

impl Worker {
    pub(super) fn new(
        setup: ApplierSetup,
        events: UnboundedSender<ApplyEvent>,
        counters: Arc<ApplyCounters>,
        inbox: Arc<Inbox>,
        waker: Arc<Waker>,
    ) -> io::Result<Self> {
        let ApplierSetup {
            label,
            volume,
            log,
            replay,
            state,
            state_path,
            allowed,
            queue_bytes,
            stage_log_max_bytes,
            compact_after_bytes,
            points,
        } = setup;
        let mut worker = Worker {
            ring: IoUring::new(RING_ENTRIES)?,
            disk: volume.backing().fd().as_raw_fd(),
            volume,
            log,
            side: DrSide::new(state, replay.last().map(|s| s.epoch)),
            state_path,
            events,
            counters,
            inbox,
            waker,
            wake_buf: Box::new([0; 8]),
            wake_inflight: false,
            queue: VecDeque::new(),
            locks: RangeLocks::new(),
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            unit_queue: VecDeque::new(),
            unit_started: None,
            allowed,
            syncs: VecDeque::new(),
            stage_log_max_bytes,
            compact_after_bytes,
            stage_full: false,
            inflight_bytes: 0,
            inflight_limit: queue_bytes,
            bufs: BufPool::with_idle_limit(POOL_BYTES),
            beat: blockrep_volume::liveness::Liveness::global()
                .register(format!("DR applier of {label}")),
            points,
            points_held: false,
            held_digests: VecDeque::new(),
        };
        for seal in replay {
            worker.queue.push_back(ApplyCmd::Replay {
                epoch: seal.epoch,
                cut_ms: seal.cut_ms,
            });
        }
        Ok(worker)
    }

    pub(super) fn run(&mut self) -> io::Result<()> {
        self.open_points()?;
        loop {
            {
                let mut inbox = self.inbox.cmds.lock().unwrap_or_else(|e| e.into_inner());
                self.queue.extend(inbox.drain(..));
            }
            self.waker.reset();
            // What runs here may block (a seal's sync, a slow-path write, a unit's sync, a
            // compaction): a call that never returns is a stall the watchdog must see. Each
            // command and each staged write handled is progress; the reap below says again
            // whether anything is awaited.
            self.beat.expect(true);
            self.progress()?;
            self.start_sync()?;
            let stopping = self.inbox.stop.load(std::sync::atomic::Ordering::SeqCst);
            // Stopping finishes what arrived: a sealed unit is applied before the thread ends
            // (its data is staged either way; this saves a replay at the next start).
            if stopping
                && self.inflight == 0
                && self.queue.is_empty()
                && !self.side.is_applying()
                && self.syncs.is_empty()
            {
                if self.wake_inflight {
                    self.waker.signal();
                    self.reap(true)?;
                }
                return Ok(());
            }
            if !self.wake_inflight {
                let sqe =
                    opcode::Read::new(types::Fd(self.waker.fd()), self.wake_buf.as_mut_ptr(), 8)
                        .build()
                        .user_data(UD_WAKE);
                self.push(sqe)?;
                self.wake_inflight = true;
            }
            self.reap(false)?;
        }
    }

    /// Waits for at least one completion and handles all there are.
    fn reap(&mut self, only_wake: bool) -> io::Result<()> {
        self.beat
            .expect(self.inflight > 0 || !self.syncs.is_empty());
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => return Ok(()),
            Err(e) => return Err(e),
        }
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        // After an error, the rest are only accounted for: each is off the ring, so
        // [`Worker::drain_ring`] must not wait for it.
        let mut first_error = None;
        for (user_data, result) in done {
            if user_data == UD_WAKE {
                self.wake_inflight = false;
                continue;
            }
            self.beat.progress();
            if only_wake {
                continue;
            }
            let handled = if first_error.is_some() {
                self.account_for(user_data);
                Ok(())
            } else if user_data == UD_SYNC {
                self.on_sync_done(result)
            } else {
                self.on_write_done(user_data as usize, result)
            };
            if let Err(e) = handled {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A completion after an error: its operation is no longer in flight, and nothing
    /// else follows from it.
    fn account_for(&mut self, user_data: u64) {
        if user_data == UD_SYNC {
            self.syncs.pop_front();
            return;
        }
        if self
            .slots
            .get(user_data as usize)
            .is_some_and(Option::is_some)
        {
            self.retire(user_data as usize);
        }
    }

    /// The write of slot `index` is no longer on the ring: its slot, its room in flight and
    /// its blocks are free.
    fn retire(&mut self, index: usize) -> Slot {
        let slot = self.slots[index].take().expect("live slot");
        self.free.push(index);
        self.inflight -= 1;
        self.inflight_bytes -= slot.buf.footprint() as u64;
        self.locks.release(slot.lock);
        slot
    }

    /// Starts a sync of the volume if acknowledgements wait for one and none is in flight:
    /// on the ring, or (for a backing whose ring sync is not enough) here and now.
    fn start_sync(&mut self) -> io::Result<()> {
        let Some(ticket) = self.side.start_sync() else {
            return Ok(());
        };
        if !self.volume.backing().ring_sync_is_durable() {
            self.volume.backing().sync_data()?;
            for seq in self.side.synced(ticket) {
                self.emit(ApplyEvent::WriteAck(seq));
            }
            return Ok(());
        }
        let sqe = opcode::Fsync::new(types::Fd(self.disk))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(UD_SYNC);
        self.push(sqe)?;
        self.syncs.push_back(ticket);
        Ok(())
    }

    /// The sync in flight returned: what it covers is durable.
    fn on_sync_done(&mut self, result: i32) -> io::Result<()> {
        // Syncs may return in any order: the k-th to return releases the k oldest tickets'
        // writes, all of which an earlier-begun or this sync covered, and one of the k that
        // returned began at least as late as the k-th oldest.
        let ticket = self.syncs.pop_front().expect("a sync was in flight");
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        for seq in self.side.synced(ticket) {
            self.emit(ApplyEvent::WriteAck(seq));
        }
        Ok(())
    }

    /// The volume was synced outside the barrier: every write that completed before is
    /// durable, and its acknowledgement goes now.
    fn synced_outside(&mut self) {
        for seq in self.side.synced_outside() {
            self.emit(ApplyEvent::WriteAck(seq));
        }
    }

    /// After an error: waits until the ring holds nothing of ours (every write in flight,
    /// the sync and the wake-up read), so no buffer it points at is freed under it. If the
    /// ring itself fails, the buffers are leaked instead.
    pub(super) fn drain_ring(&mut self) {
        if self.wake_inflight {
            self.waker.signal();
        }
        let outstanding = self.inflight + usize::from(self.wake_inflight) + self.syncs.len();
        let (slots, locks) = (&mut self.slots, &mut self.locks);
        let drained = blockrep_volume::ring::drain(
            &mut self.ring,
            outstanding,
            blockrep_volume::ring::DRAIN_PATIENCE,
            |user_data| {
                if let Some(slot) = slots.get_mut(user_data as usize).and_then(Option::take) {
                    locks.release(slot.lock);
                }
            },
        );
        match drained {
            Ok(n) => tracing::info!(operations = n, "the DR applier waited for its ring"),
            Err(e) => {
                tracing::error!(error = %e, "the DR applier's ring failed; leaking its buffers");
                std::mem::forget(std::mem::take(&mut self.slots));
                std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
            }
        }
        self.inflight = 0;
        self.inflight_bytes = 0;
        self.wake_inflight = false;
        self.syncs.clear();
    }

    /// Puts an aligned write on the ring once its blocks are free. Returns false if an
    /// overlapping write is in flight (the caller retries after it completes).
    fn submit_write(
        &mut self,
        range: ByteRange,
        buf: WriteData,
        fua: bool,
        ack: Option<WriteSeq>,
        unit: bool,
    ) -> io::Result<bool> {
        let lock = match self.locks.acquire(range, ()) {
            Acquired::Held(lock) => lock,
            Acquired::Queued(lock) => {
                // Not taken: try again when the overlapping write is done.
                self.locks.release(lock);
                return Ok(false);
            }
        };
        self.inflight_bytes += buf.footprint() as u64;
        let slot = Slot {
            lock,
            buf,
            offset: range.offset,
            done: 0,
            fua,
            ack,
            unit,
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.inflight += 1;
        self.submit_slot(index)?;
        Ok(true)
    }

    fn submit_slot(&mut self, index: usize) -> io::Result<()> {
        let slot = self.slots[index].as_ref().expect("live slot");
        let rest = &slot.buf[slot.done..];
        let flags = if slot.fua { libc::RWF_DSYNC } else { 0 };
        let sqe = opcode::Write::new(types::Fd(self.disk), rest.as_ptr(), rest.len() as u32)
            .offset(slot.offset + slot.done as u64)
            .rw_flags(flags)
            .build()
            .user_data(index as u64);
        let pushed = fault::refuse_write().and_then(|()| self.push(sqe));
        if pushed.is_err() {
            // Never on the ring: nothing will complete it.
            self.retire(index);
        }
        pushed
    }

    fn on_write_done(&mut self, index: usize, result: i32) -> io::Result<()> {
        if result <= 0 {
            // This write is no longer in flight; the others are waited for before the
            // thread ends.
            self.retire(index);
            return Err(if result < 0 {
                io::Error::from_raw_os_error(-result)
            } else {
                io::Error::new(io::ErrorKind::WriteZero, "DR volume ended early")
            });
        }
        let slot = self.slots[index].as_mut().expect("live slot");
        slot.done += result as usize;
        if slot.done < slot.buf.len() {
            return self.submit_slot(index);
        }
        let slot = self.retire(index);
        let written = ByteRange::new(slot.offset, slot.buf.len() as u64);
        if let WriteData::Pooled(buf) = slot.buf {
            self.bufs.give(buf);
        }
        fault::slow_disk(written.len);
        self.volume.backing().note_written(written);
        self.counters
            .bytes_written
            .fetch_add(written.len, std::sync::atomic::Ordering::Relaxed);
        match slot.ack {
            // Written with RWF_DSYNC: durable now.
            Some(seq) if slot.fua && self.volume.backing().ring_sync_is_durable() => {
                self.emit(ApplyEvent::WriteAck(seq))
            }
            Some(seq) => self.side.direct_written(seq),
            None => {}
        }
        if slot.unit && self.side.unit_write_done() {
            self.finish_unit()?;
        }
        Ok(())
    }

    pub(super) fn emit(&self, event: ApplyEvent) {
        // The stream task may be gone (the link dropped); then nobody needs the event.
        let _ = self.events.send(event);
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at lives in a slot (or is the wake-up
            // buffer) until its completion has been handled.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }
}
