//! The DR side's applier: one thread with its own io_uring that writes a pair's incoming
//! frames to the DR volume, in stream order.
//!
//! - A direct write (hypermetro, initial sync) is written at once; its acknowledgement (if
//!   asked for) is sent once the write is *durable*: a sync of the volume that began after
//!   the write completed has returned (group-committed through
//!   [`AckBarrier`](blockrep_core::replication::AckBarrier): one `fdatasync` in flight
//!   covers every write completed before it; a FUA write is durable when it completes).
//!   Overlapping writes are applied one after the other, in arrival order; disjoint ones
//!   run in parallel.
//! - A staged write (async epochs, catch-ups) is appended to the stage log.
//! - `Flush`, `Seal` and `SyncDone` are barriers: they wait for every earlier write. A seal
//!   syncs the stage log (the unit is now durable: `Staged`), applies the unit's writes,
//!   syncs the volume and records the applied epoch (`Applied`).
//!
//! A payload whose CRC does not match is not written: the sender gets a `Reject`.
//!
//! A `Verify` is a barrier too: the blocks it names are read back and their CRCs compared
//! once every earlier frame is on the volume — at once for direct replication, or right
//! after the unit of its epoch is applied (before the next unit) for epochs.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blockrep_core::replication::direct_gate::{DirectGate, Gating};
use blockrep_core::replication::{AckBarrier, Epoch, ProbeId, SyncTicket, WriteSeq};
use blockrep_core::{Acquired, ByteRange, LockId, RangeLocks};
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, Volume, Waker};
use blockrep_wire::{RejectReason, WriteFlags, WriteHeader, block_crcs, payload_crc};
use bytes::Bytes;
use io_uring::{IoUring, opcode, types};
use tokio::sync::mpsc::UnboundedSender;

use blockrep_core::pair::dr::{DrUnits, SealArrival, SealRecord, StagedWrite};

use crate::dr_state::{self, DrState};
use crate::stage_log::{StageLog, Staged};

const RING_ENTRIES: u32 = 256;
const MAX_INFLIGHT: usize = 128;
const UD_WAKE: u64 = u64::MAX;
/// The group-committed sync of the volume (see [`AckBarrier`]).
const UD_SYNC: u64 = u64::MAX - 1;
/// The stage log is rewritten once it grows past this (see [`ApplierSetup::compact_after_bytes`]).
pub const COMPACT_BYTES: u64 = 256 << 20;
/// Zero ranges are written in pieces this large, each one progress for the watchdog.
const ZEROES_PIECE: u64 = 64 << 20;

/// A frame for the applier, in stream order.
#[derive(Debug)]
pub enum ApplyCmd {
    Write {
        header: WriteHeader,
        payload: Bytes,
        /// Bytes of the apply queue's budget it holds, given back once it is handled.
        budget: u32,
    },
    Flush {
        seq: WriteSeq,
    },
    Seal {
        epoch: Epoch,
        cut_ms: u64,
    },
    Discard {
        after: Epoch,
    },
    SyncDone {
        epoch: Epoch,
    },
    /// A unit found sealed in the stage log at start-up: apply it (it is already durable).
    Replay {
        epoch: Epoch,
        cut_ms: u64,
    },
    Verify(VerifyCmd),
    /// The group committed further: units held for it may apply now.
    Allowed,
    /// Gated direct writes apply once the unit of `epoch` is applied.
    Ungate {
        epoch: Epoch,
    },
}

/// An online verify request: production's CRC of each `block`-byte block from `offset`.
#[derive(Debug)]
pub struct VerifyCmd {
    pub id: ProbeId,
    pub offset: u64,
    pub block: u32,
    pub after: Option<Epoch>,
    pub crcs: Vec<u32>,
}

/// What the applier reports back, to be sent to the production side.
#[derive(Debug, PartialEq, Eq)]
pub enum ApplyEvent {
    /// The write is durable on the DR volume.
    WriteAck(WriteSeq),
    FlushAck(WriteSeq),
    /// The end of the initial sync is recorded durably (with every write before it).
    SyncDoneAck(Epoch),
    Staged(Epoch),
    Applied {
        epoch: Epoch,
        cut_ms: u64,
    },
    Reject {
        seq: WriteSeq,
        reason: RejectReason,
    },
    /// The blocks of verify request `id` whose CRC differs here.
    Verified {
        id: ProbeId,
        differing: Vec<u16>,
    },
    /// The DR volume or its stage log failed: the stream must end.
    Failed(String),
}

/// Counters the applier keeps.
#[derive(Debug, Default)]
pub struct ApplyCounters {
    pub bytes_written: std::sync::atomic::AtomicU64,
    pub extents_rejected: std::sync::atomic::AtomicU64,
}

struct Inbox {
    cmds: Mutex<VecDeque<ApplyCmd>>,
    waker: Arc<Waker>,
    stop: std::sync::atomic::AtomicBool,
    /// Payload bytes received and not yet handled may not pass this (rule 6): the stream is
    /// read no further until the applier catches up, so the sender is pushed back by QUIC's
    /// flow control.
    budget: Arc<tokio::sync::Semaphore>,
    budget_bytes: u32,
}

/// What an applier starts from.
pub struct ApplierSetup {
    /// For the thread's name.
    pub label: String,
    pub volume: Arc<Volume>,
    pub log: StageLog,
    /// Units the stage log holds sealed above the applied epoch: applied first.
    pub replay: Vec<crate::stage_log::SealRecord>,
    pub state: DrState,
    pub state_path: PathBuf,
    /// The last epoch the pair's consistency group committed (`u64::MAX`: the pair is in
    /// no group, every sealed unit applies at once). Units above it stay staged.
    pub allowed: Arc<AtomicU64>,
    /// The most payload bytes received and not yet handled.
    pub queue_bytes: u64,
    /// The most bytes the stage log may take on disk; a staged write past it is rejected
    /// (`StageFull`) and the pair falls back to the bitmap.
    pub stage_log_max_bytes: u64,
    /// The stage log is rewritten to hold only what is still staged once it grows past
    /// this ([`COMPACT_BYTES`]).
    pub compact_after_bytes: u64,
}

/// The handle the stream task feeds.
pub struct Applier {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
}

impl Applier {
    /// Starts the applier thread for `setup.volume`.
    pub fn start(
        setup: ApplierSetup,
        events: UnboundedSender<ApplyEvent>,
        counters: Arc<ApplyCounters>,
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
        } = setup;
        let waker = Arc::new(Waker::new()?);
        let budget_bytes = u32::try_from(queue_bytes).unwrap_or(u32::MAX);
        let inbox = Arc::new(Inbox {
            cmds: Mutex::new(VecDeque::new()),
            waker: Arc::clone(&waker),
            stop: std::sync::atomic::AtomicBool::new(false),
            budget: Arc::new(tokio::sync::Semaphore::new(budget_bytes as usize)),
            budget_bytes,
        });
        let mut worker = Worker {
            ring: IoUring::new(RING_ENTRIES)?,
            disk: volume.backing().fd().as_raw_fd(),
            volume,
            log,
            units: DrUnits::new(state, replay.last().map(|s| s.epoch)),
            state_path,
            events,
            counters,
            inbox: Arc::clone(&inbox),
            waker,
            wake_buf: Box::new([0; 8]),
            wake_inflight: false,
            queue: VecDeque::new(),
            locks: RangeLocks::new(),
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            applying: None,
            unit_queue: VecDeque::new(),
            held_verifies: Vec::new(),
            allowed,
            gate: DirectGate::default(),
            barrier: AckBarrier::default(),
            syncs: VecDeque::new(),
            stage_log_max_bytes,
            compact_after_bytes,
            stage_full: false,
            inflight_bytes: 0,
            inflight_limit: queue_bytes,
            beat: blockrep_volume::liveness::Liveness::global()
                .register(format!("DR applier of {label}")),
        };
        for seal in replay {
            worker.queue.push_back(ApplyCmd::Replay {
                epoch: seal.epoch,
                cut_ms: seal.cut_ms,
            });
        }
        let thread = std::thread::Builder::new()
            .name(format!("apply-{label}"))
            .spawn(move || {
                // A bug must not free what the ring still points at, nor leave the stream
                // waiting: a panic ends the applier like an error.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                let error = match run {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(panic) => format!("the DR applier panicked: {}", panic_message(&panic)),
                };
                tracing::error!(error = %error, "DR applier stopped");
                // Nothing the ring still holds may be freed before it is done with it.
                worker.drain_ring();
                let _ = worker.events.send(ApplyEvent::Failed(error));
            })?;
        Ok(Self {
            inbox,
            thread: Some(thread),
        })
    }

    /// A handle that wakes the applier when its group committed further.
    pub fn nudge(&self) -> Nudge {
        Nudge(Arc::clone(&self.inbox))
    }

    /// Hands the applier the stream's next frame, once the apply queue has room for its
    /// payload (a gated write takes none: it must never hold back the `Ungate` behind it).
    pub async fn submit(&self, mut cmd: ApplyCmd) {
        if let ApplyCmd::Write {
            header,
            payload,
            budget,
        } = &mut cmd
            && !header.flags.has(WriteFlags::GATED)
        {
            let want = u32::try_from(payload.len() + 64)
                .unwrap_or(u32::MAX)
                .min(self.inbox.budget_bytes);
            if let Ok(permit) = self.inbox.budget.acquire_many(want).await {
                permit.forget();
                *budget = want;
            }
        }
        self.inbox
            .cmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(cmd);
        self.inbox.waker.wake();
    }

    /// Stops once every command already submitted is done.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.inbox
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inbox.waker.signal();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Wakes an applier to apply the units its group committed since (it may be gone).
pub struct Nudge(Arc<Inbox>);

impl Nudge {
    pub fn nudge(&self) {
        self.0
            .cmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(ApplyCmd::Allowed);
        self.0.waker.wake();
    }
}

/// A write in flight on the ring.
struct Slot {
    lock: LockId,
    buf: AlignedBuf,
    offset: u64,
    done: usize,
    fua: bool,
    /// Acknowledge to the sender when done.
    ack: Option<WriteSeq>,
    /// Part of the unit being applied.
    unit: bool,
}

/// A unit being applied: writes left, and what to record when they are done.
struct Applying {
    epoch: Epoch,
    cut_ms: u64,
    left: usize,
}

struct Worker {
    ring: IoUring,
    disk: i32,
    volume: Arc<Volume>,
    log: StageLog,
    /// What the DR side decides about its units (the machine this thread is the shell of).
    units: DrUnits,
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
    applying: Option<Applying>,
    /// The unit's writes not yet submitted.
    unit_queue: VecDeque<Staged>,
    /// Verify requests waiting for the unit of their epoch.
    held_verifies: Vec<VerifyCmd>,
    allowed: Arc<AtomicU64>,
    /// Gated direct writes (and what came after them, in order), held aside unwritten and
    /// unanswered until the stream's `Ungate` and the unit it names are applied.
    gate: DirectGate<ApplyCmd>,
    /// Acknowledgements of direct writes that completed, waiting for a sync to make them
    /// durable.
    barrier: AckBarrier<WriteSeq>,
    /// The syncs in flight on the ring, oldest first.
    syncs: VecDeque<SyncTicket>,
    stage_log_max_bytes: u64,
    compact_after_bytes: u64,
    /// Staged writes are being rejected for want of room in the stage log (logged once).
    stage_full: bool,
    /// Bytes of the writes on the ring, and the most there may be (a write bigger than
    /// that goes alone).
    inflight_bytes: u64,
    inflight_limit: u64,
    /// For the watchdog: writes and syncs in flight must complete.
    beat: Arc<blockrep_volume::liveness::Beat>,
}

impl Worker {
    fn run(&mut self) -> io::Result<()> {
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
                && self.applying.is_none()
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
        self.inflight_bytes -= slot.buf.len() as u64;
        self.locks.release(slot.lock);
        slot
    }

    /// Starts a sync of the volume if acknowledgements wait for one and none is in flight:
    /// on the ring, or (for a backing whose ring sync is not enough) here and now.
    fn start_sync(&mut self) -> io::Result<()> {
        if !self.barrier.wants_sync() {
            return Ok(());
        }
        let ticket = self.barrier.start_sync();
        if !self.volume.backing().ring_sync_is_durable() {
            self.volume.backing().sync_data()?;
            for seq in self.barrier.synced(ticket) {
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
        for seq in self.barrier.synced(ticket) {
            self.emit(ApplyEvent::WriteAck(seq));
        }
        Ok(())
    }

    /// The volume was synced outside the barrier: every write that completed before is
    /// durable, and its acknowledgement goes now.
    fn synced_outside(&mut self) {
        for seq in self.barrier.synced_outside() {
            self.emit(ApplyEvent::WriteAck(seq));
        }
    }

    /// After an error: waits until the ring holds nothing of ours (every write in flight,
    /// the sync and the wake-up read), so no buffer it points at is freed under it. If the
    /// ring itself fails, the buffers are leaked instead.
    fn drain_ring(&mut self) {
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

    /// Starts whatever may start now, in order.
    fn progress(&mut self) -> io::Result<()> {
        loop {
            if self.applying.is_some() {
                self.submit_unit()?;
                return Ok(());
            }
            // Held units the group has committed since apply first, as one unit.
            if self.inflight == 0
                && let Some(seal) = self
                    .units
                    .committed_held_seal(self.allowed.load(std::sync::atomic::Ordering::SeqCst))
            {
                self.apply_unit(seal)?;
                continue;
            }
            // Gated writes go, in order, once their group is synchronous and their past
            // applied; let go, they are gated no more.
            let applied = self.applying.is_none().then_some(self.units.applied());
            for mut cmd in self.gate.let_go(applied).into_iter().rev() {
                if let ApplyCmd::Write { header, .. } = &mut cmd {
                    header.flags.0 &= !WriteFlags::GATED;
                }
                self.queue.push_front(cmd);
            }
            let Some(cmd) = self.queue.front() else {
                return Ok(());
            };
            if let Some(gating) = gating(cmd)
                && self.gate.must_wait(gating, applied)
            {
                let mut cmd = self.queue.pop_front().expect("front checked");
                // What waits behind a gated write gives its room in the apply queue back:
                // the frames that let it go (`Ungate`, the seal of its unit) come after it.
                if let ApplyCmd::Write { budget, .. } = &mut cmd {
                    self.inbox
                        .budget
                        .add_permits(std::mem::take(budget) as usize);
                }
                self.gate.set_aside(gating, cmd);
                continue;
            }
            let barrier = matches!(
                cmd,
                ApplyCmd::Flush { .. }
                    | ApplyCmd::Seal { .. }
                    | ApplyCmd::SyncDone { .. }
                    | ApplyCmd::Replay { .. }
                    | ApplyCmd::Verify(_)
            ) || matches!(cmd, ApplyCmd::Write { header, .. }
                if header.flags.has(WriteFlags::DIRECT) && !is_fast(header));
            if barrier && self.inflight > 0 {
                return Ok(());
            }
            if self.inflight >= MAX_INFLIGHT || !self.room_in_flight(payload_bytes(cmd)) {
                return Ok(());
            }
            let cmd = self.queue.pop_front().expect("front checked");
            self.beat.progress();
            match cmd {
                ApplyCmd::Write {
                    header,
                    payload,
                    budget,
                } => {
                    if !self.write(header, payload, budget)? {
                        return Ok(());
                    }
                    self.inbox.budget.add_permits(budget as usize);
                }
                ApplyCmd::Flush { seq } => {
                    self.volume.backing().sync_data()?;
                    self.synced_outside();
                    self.emit(ApplyEvent::FlushAck(seq));
                }
                ApplyCmd::Seal { epoch, cut_ms } => self.seal(epoch, cut_ms, true)?,
                ApplyCmd::Replay { epoch, cut_ms } => self.seal(epoch, cut_ms, false)?,
                ApplyCmd::Discard { after } => {
                    let after = self.units.discard(after);
                    self.log.discard_after(after);
                }
                // Picked up at the top of the loop.
                ApplyCmd::Allowed => {}
                ApplyCmd::Ungate { epoch } => self.gate.ungate(epoch),
                ApplyCmd::Verify(v) => match v.after {
                    Some(epoch) if epoch > self.units.applied() => self.held_verifies.push(v),
                    _ => self.verify(&v)?,
                },
                ApplyCmd::SyncDone { epoch } => {
                    self.volume.backing().sync_data()?;
                    self.synced_outside();
                    self.units.sync_done(epoch);
                    self.save_state()?;
                    // Every extent of the sync is durable, and so is its end.
                    self.emit(ApplyEvent::SyncDoneAck(epoch));
                    let state = self.units.state();
                    if state.consistent {
                        self.emit(ApplyEvent::Applied {
                            epoch: state.applied,
                            cut_ms: state.applied_cut_ms,
                        });
                    }
                }
            }
        }
    }

    /// Handles one incoming write. Returns false if it had to wait (it is put back).
    fn write(&mut self, header: WriteHeader, payload: Bytes, budget: u32) -> io::Result<bool> {
        let zeroes = header.flags.has(WriteFlags::ZEROES);
        // A malformed write ends the applier: nothing after it in the stream applies.
        let range = ByteRange::within(header.offset, u64::from(header.len), self.volume.size())
            .map_err(|e| invalid(format!("a write for the DR volume: {e}")))?;
        if !zeroes && payload.len() as u64 != range.len {
            return Err(invalid(format!(
                "write {range} carries {} bytes of payload",
                payload.len()
            )));
        }
        let checksum_ok = zeroes || payload_crc(&payload) == header.crc;
        if !header.flags.has(WriteFlags::DIRECT) {
            let room = checksum_ok && (range.is_empty() || self.stage_room(range));
            match self.units.staged_write(header.epoch, checksum_ok, room) {
                // Its unit can no longer apply: the production side catches up instead.
                StagedWrite::Drop => {}
                StagedWrite::Refuse(reason) => self.refuse(&header, range, reason),
                StagedWrite::Stage if range.is_empty() => {}
                StagedWrite::Stage => {
                    self.log
                        .append_write(header.epoch, range, zeroes, &payload)?;
                }
            }
            return Ok(true);
        }
        if !checksum_ok {
            self.refuse(&header, range, RejectReason::Checksum);
            return Ok(true);
        }
        let ack = header.flags.has(WriteFlags::ACK).then_some(header.seq);
        if range.is_empty() {
            // Nothing to write (an application's zero-length write): durable as it is.
            if let Some(seq) = ack {
                self.emit(ApplyEvent::WriteAck(seq));
            }
            return Ok(true);
        }
        if is_fast(&header) {
            let mut buf = AlignedBuf::new(payload.len());
            buf.copy_from_slice(&payload);
            let fua = header.flags.has(WriteFlags::FUA);
            if !self.submit_write(range, buf, fua, ack, false)? {
                self.queue.push_front(ApplyCmd::Write {
                    header,
                    payload,
                    budget,
                });
                return Ok(false);
            }
            return Ok(true);
        }
        // Zeroes or an unaligned write: done here, after every earlier write (a barrier).
        if zeroes {
            self.write_zeroes(range)?;
        } else {
            self.volume
                .read_modify_write(range, Some(&payload), false)?;
        }
        self.counters
            .bytes_written
            .fetch_add(range.len, std::sync::atomic::Ordering::Relaxed);
        if let Some(seq) = ack {
            self.barrier.completed(seq);
        }
        if header.flags.has(WriteFlags::FUA) {
            self.volume.backing().sync_data()?;
            self.synced_outside();
        }
        Ok(true)
    }

    /// Refuses a write: a direct one is sent again; a staged one spoiled the unit of its
    /// epoch and every later one (none of them may apply without it).
    fn refuse(&mut self, header: &WriteHeader, range: ByteRange, reason: RejectReason) {
        if reason == RejectReason::Checksum {
            self.counters
                .extents_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(seq = %header.seq, %range, "extent failed its CRC; asking for it again");
        }
        self.emit(ApplyEvent::Reject {
            seq: header.seq,
            reason,
        });
    }

    /// Whether a write of `bytes` more may go on the ring now (memory, rule 6).
    fn room_in_flight(&self, bytes: u64) -> bool {
        self.inflight == 0 || self.inflight_bytes + bytes <= self.inflight_limit
    }

    /// Whether the stage log has room for a write of `range`: the writes staged and not yet
    /// applied stay under the cap (the file, compacted past [`COMPACT_BYTES`], stays within
    /// the cap plus that). A pair whose log is full falls back to the bitmap (the production
    /// side is told with `StageFull`) and the DR volume stays at its last consistent point.
    fn stage_room(&mut self, range: ByteRange) -> bool {
        if self.log.staged_bytes() + range.len <= self.stage_log_max_bytes {
            self.stage_full = false;
            return true;
        }
        if !self.stage_full {
            tracing::warn!(
                %range,
                staged_bytes = self.log.staged_bytes(),
                cap = self.stage_log_max_bytes,
                "the stage log is at its cap (replication.stage_log_max_bytes): staged writes are refused, the pair falls back to the bitmap"
            );
            self.stage_full = true;
        }
        false
    }

    /// Puts an aligned write on the ring once its blocks are free. Returns false if an
    /// overlapping write is in flight (the caller retries after it completes).
    fn submit_write(
        &mut self,
        range: ByteRange,
        buf: AlignedBuf,
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
        self.inflight_bytes += buf.len() as u64;
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
            Some(seq) => self.barrier.completed(seq),
            None => {}
        }
        if slot.unit {
            let applying = self
                .applying
                .as_mut()
                .expect("a unit write belongs to a unit");
            applying.left -= 1;
            if applying.left == 0 && self.unit_queue.is_empty() {
                self.finish_unit()?;
            }
        }
        Ok(())
    }

    /// A seal: the unit is made durable and acknowledged, then applied. A replayed seal is
    /// durable already.
    fn seal(&mut self, epoch: Epoch, cut_ms: u64, append: bool) -> io::Result<()> {
        match self.units.seal_arrived(epoch, append) {
            SealArrival::Staged => {
                self.emit(ApplyEvent::Staged(epoch));
                return Ok(());
            }
            SealArrival::Dropped => return Ok(()),
            SealArrival::Append => {
                self.log.seal(epoch, cut_ms)?;
                self.units.appended(epoch);
                self.emit(ApplyEvent::Staged(epoch));
            }
            SealArrival::Replay => {}
        }
        let allowed = self.allowed.load(std::sync::atomic::Ordering::SeqCst);
        // Held, staged, if its group has not committed it (rule 3).
        match self.units.unit_ready(SealRecord { epoch, cut_ms }, allowed) {
            Some(seal) => self.apply_unit(seal),
            None => Ok(()),
        }
    }

    /// Applies the unit that `seal` ends: every staged write up to its epoch.
    fn apply_unit(&mut self, seal: SealRecord) -> io::Result<()> {
        let SealRecord { epoch, cut_ms } = seal;
        let unit = self.log.take_unit(epoch);
        self.applying = Some(Applying {
            epoch,
            cut_ms,
            left: unit.len(),
        });
        self.unit_queue = unit.into();
        if self.unit_queue.is_empty() {
            return self.finish_unit();
        }
        self.submit_unit()
    }

    /// Submits the unit's writes, in log order, as far as the ring and the locks allow.
    fn submit_unit(&mut self) -> io::Result<()> {
        while let Some(staged) = self.unit_queue.front().cloned() {
            self.beat.progress();
            if !self.room_in_flight(staged.range.len) {
                return Ok(());
            }
            // Read back from disk: checked like any input.
            if staged.range.end() > self.volume.size() {
                return Err(io::Error::other(format!(
                    "staged write {} lies past the end of the {}-byte DR volume",
                    staged.range,
                    self.volume.size()
                )));
            }
            if staged.range.is_empty() {
                self.unit_queue.pop_front();
                self.applying.as_mut().expect("applying").left -= 1;
                continue;
            }
            if self.inflight >= MAX_INFLIGHT {
                return Ok(());
            }
            let fast = !staged.zeroes && staged.range.is_aligned(DIRECT_IO_ALIGN);
            if !fast {
                if self.inflight > 0 {
                    return Ok(());
                }
                self.unit_queue.pop_front();
                if staged.zeroes {
                    self.write_zeroes(staged.range)?;
                } else {
                    let mut data = vec![0u8; staged.range.len as usize];
                    self.log.read(&staged, &mut data)?;
                    self.volume
                        .read_modify_write(staged.range, Some(&data), false)?;
                }
                let applying = self.applying.as_mut().expect("applying");
                applying.left -= 1;
                continue;
            }
            let mut buf = AlignedBuf::new(staged.range.len as usize);
            self.log.read(&staged, &mut buf)?;
            if !self.submit_write(staged.range, buf, false, None, true)? {
                return Ok(());
            }
            self.unit_queue.pop_front();
        }
        if self
            .applying
            .as_ref()
            .is_some_and(|a| a.left == 0 && self.inflight == 0)
        {
            self.finish_unit()?;
        }
        Ok(())
    }

    /// Zeroes `range` in pieces, each one progress: zeroing gigabytes is one long call.
    fn write_zeroes(&self, range: ByteRange) -> io::Result<()> {
        let mut at = range.offset;
        while at < range.end() {
            let piece = ByteRange::new(at, ZEROES_PIECE.min(range.end() - at));
            self.volume.write_zeroes(piece, true, false)?;
            self.beat.progress();
            at = piece.end();
        }
        Ok(())
    }

    /// Every write of the unit is on the volume: sync it, record the epoch, report.
    fn finish_unit(&mut self) -> io::Result<()> {
        let Some(applying) = self.applying.take() else {
            return Ok(());
        };
        self.volume.backing().sync_data()?;
        self.synced_outside();
        self.units.unit_applied(SealRecord {
            epoch: applying.epoch,
            cut_ms: applying.cut_ms,
        });
        self.save_state()?;
        // Seals of units not yet applied are durable and acknowledged: a rewritten log
        // keeps them, and a log holding one is never emptied (its unit may have no writes).
        let unapplied = self.seals_not_applied();
        if !(unapplied.is_empty() && self.log.truncate_if_empty()?) {
            let beat = &self.beat;
            self.log
                .compact(self.compact_after_bytes, &unapplied, &|| beat.progress())?;
        }
        self.emit(ApplyEvent::Applied {
            epoch: applying.epoch,
            cut_ms: applying.cut_ms,
        });
        // The volume now holds every write of epochs ≤ this one and none later.
        let (due, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held_verifies)
            .into_iter()
            .partition(|v| v.after.is_none_or(|e| e <= applying.epoch));
        self.held_verifies = held;
        for v in &due {
            self.verify(v)?;
        }
        Ok(())
    }

    /// The seals in the stage log whose units are not applied: held for their group's
    /// commit, or queued for replay at start. In epoch order.
    fn seals_not_applied(&self) -> Vec<SealRecord> {
        let replays = self.queue.iter().filter_map(|cmd| match *cmd {
            ApplyCmd::Replay { epoch, cut_ms } => Some(SealRecord { epoch, cut_ms }),
            _ => None,
        });
        self.units.seals_not_applied(replays)
    }

    /// Records the state durably, after checking the machine's invariants.
    fn save_state(&self) -> io::Result<()> {
        if let Err(broken) = self.units.check_invariants() {
            return Err(io::Error::other(format!(
                "the DR side's units broke an invariant: {broken}"
            )));
        }
        dr_state::save(self.units.state(), &self.state_path)
    }

    /// Reads back the blocks a verify names and reports those whose CRC differs.
    fn verify(&self, v: &VerifyCmd) -> io::Result<()> {
        if v.block == 0 || !u64::from(v.block).is_multiple_of(DIRECT_IO_ALIGN) {
            return Err(invalid(format!(
                "a verify request with blocks of {} bytes (not a multiple of {DIRECT_IO_ALIGN})",
                v.block
            )));
        }
        let len = (u64::from(v.block) * v.crcs.len() as u64)
            .min(self.volume.size().saturating_sub(v.offset));
        let Ok(range) = ByteRange::within(v.offset, len, self.volume.size()) else {
            return Err(invalid(format!(
                "a verify request at offset {} is past the end of the {}-byte DR volume",
                v.offset,
                self.volume.size()
            )));
        };
        let aligned = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(aligned.len as usize);
        self.volume
            .backing()
            .read_exact_at(&mut buf, aligned.offset)?;
        let start = (range.offset - aligned.offset) as usize;
        let here = block_crcs(&buf[start..start + len as usize], v.block as usize);
        let differing = v
            .crcs
            .iter()
            .enumerate()
            .filter(|&(i, crc)| here.get(i) != Some(crc))
            .map(|(i, _)| i as u16)
            .collect();
        self.emit(ApplyEvent::Verified {
            id: v.id,
            differing,
        });
        Ok(())
    }

    fn emit(&self, event: ApplyEvent) {
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

/// What a command is to the gate of a hypermetro group's direct writes (`None`: it never
/// waits there: journaled writes, seals, commits).
fn gating(cmd: &ApplyCmd) -> Option<Gating> {
    match cmd {
        ApplyCmd::Write { header, .. } if header.flags.has(WriteFlags::GATED) => {
            Some(Gating::Gated)
        }
        ApplyCmd::Write { header, .. } if header.flags.has(WriteFlags::DIRECT) => {
            Some(Gating::Direct)
        }
        ApplyCmd::Flush { .. } | ApplyCmd::Verify(_) => Some(Gating::Ordered),
        _ => None,
    }
}

/// The payload bytes a command puts on the ring (none but a write's).
fn payload_bytes(cmd: &ApplyCmd) -> u64 {
    match cmd {
        ApplyCmd::Write { payload, .. } => payload.len() as u64,
        _ => 0,
    }
}

/// A frame the applier cannot act on.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A write the ring takes: data, 4 KiB-aligned.
fn is_fast(header: &WriteHeader) -> bool {
    !header.flags.has(WriteFlags::ZEROES)
        && header.offset.is_multiple_of(DIRECT_IO_ALIGN)
        && u64::from(header.len).is_multiple_of(DIRECT_IO_ALIGN)
}

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    /// With `BLOCKREP_FAULT_DISK_MBPS=N`, the applier takes as long over each write as a
    /// disk writing N MB/s would: a slow DR disk.
    #[cfg(feature = "fault-injection")]
    pub fn slow_disk(bytes: u64) {
        static MBPS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let mbps = MBPS.get_or_init(|| {
            std::env::var("BLOCKREP_FAULT_DISK_MBPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
        });
        if let Some(mbps) = mbps {
            std::thread::sleep(std::time::Duration::from_micros(bytes / mbps));
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    #[inline]
    pub fn slow_disk(_bytes: u64) {}

    /// In unit tests, the applier labelled this has the ring refuse its writes from the
    /// fourth on, as a submission that fails does.
    #[cfg(test)]
    pub const PUSH_FAILS: &str = "push-fails";

    #[cfg(test)]
    pub fn refuse_write() -> std::io::Result<()> {
        thread_local!(static PUSHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        let named = std::thread::current().name() == Some(&format!("apply-{PUSH_FAILS}"));
        if named && PUSHED.replace(PUSHED.get() + 1) >= 3 {
            return Err(std::io::Error::other(
                "fault injection: the ring refuses the write",
            ));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline]
    pub fn refuse_write() -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use blockrep_volume::Backing;
    use std::os::unix::fs::FileExt;

    use super::*;

    const SIZE: u64 = 1 << 20;

    fn staged_write(epoch: u64, seq: u64, offset: u64, byte: u8, corrupt: bool) -> ApplyCmd {
        let payload = Bytes::from(vec![byte; 4096]);
        let crc = payload_crc(&payload) ^ u32::from(corrupt);
        ApplyCmd::Write {
            header: WriteHeader {
                flags: WriteFlags(0),
                epoch: Epoch(epoch),
                seq: WriteSeq(seq),
                offset,
                len: 4096,
                crc,
            },
            payload,
            budget: 0,
        }
    }

    fn seal(epoch: u64, cut_ms: u64) -> ApplyCmd {
        ApplyCmd::Seal {
            epoch: Epoch(epoch),
            cut_ms,
        }
    }

    /// Events until the flush of `seq` is answered (everything submitted before it is done).
    fn events_until_flush(
        events: &mut tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
        seq: WriteSeq,
    ) -> Vec<ApplyEvent> {
        let mut seen = Vec::new();
        loop {
            let event = events.blocking_recv().expect("the applier runs");
            if event == ApplyEvent::FlushAck(seq) {
                return seen;
            }
            seen.push(event);
        }
    }

    fn direct_write(seq: u64, offset: u64, len: u32, byte: u8) -> ApplyCmd {
        let payload = Bytes::from(vec![byte; len as usize]);
        ApplyCmd::Write {
            header: WriteHeader {
                flags: WriteFlags(WriteFlags::DIRECT | WriteFlags::ACK),
                epoch: Epoch(1),
                seq: WriteSeq(seq),
                offset,
                len,
                crc: payload_crc(&payload),
            },
            payload,
            budget: 0,
        }
    }

    /// An applier on a `size`-byte volume at `path` (created sparse if missing), its stage
    /// log in `dir`.
    fn start_applier(
        dir: &std::path::Path,
        path: &std::path::Path,
        size: u64,
    ) -> (
        Applier,
        tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
        tokio::runtime::Runtime,
    ) {
        let recovered = StageLog::open(&dir.join("stage-log"), Epoch::ZERO).unwrap();
        start_applier_on(
            dir,
            path,
            recovered,
            Setup {
                size,
                ..Setup::default()
            },
        )
    }

    /// How a test's applier differs from the usual one.
    struct Setup {
        label: &'static str,
        /// The volume's size, if it is created.
        size: u64,
        compact_after_bytes: u64,
        /// The group's committed epoch: units above it stay staged.
        allowed: Arc<AtomicU64>,
    }

    impl Default for Setup {
        fn default() -> Self {
            Self {
                label: "test",
                size: SIZE,
                compact_after_bytes: COMPACT_BYTES,
                allowed: Arc::new(AtomicU64::new(u64::MAX)),
            }
        }
    }

    /// An applier that starts from the stage log `recovered` (replaying its seals).
    fn start_applier_on(
        dir: &std::path::Path,
        path: &std::path::Path,
        recovered: crate::stage_log::Recovered,
        setup: Setup,
    ) -> (
        Applier,
        tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
        tokio::runtime::Runtime,
    ) {
        let Setup {
            label,
            size,
            compact_after_bytes,
            allowed,
        } = setup;
        if !path.exists() {
            std::fs::File::create(path).unwrap().set_len(size).unwrap();
        }
        let volume = Arc::new(Volume::new(
            "dr".into(),
            Backing::open(path, blockrep_core::CacheMode::Writeback).unwrap(),
            None,
        ));
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let applier = Applier::start(
            ApplierSetup {
                label: label.into(),
                volume,
                log: recovered.log,
                replay: recovered.seals,
                state: DrState::default(),
                state_path: dir.join("dr.json"),
                allowed,
                queue_bytes: 64 << 20,
                stage_log_max_bytes: 64 << 20,
                compact_after_bytes,
            },
            tx,
            Arc::new(ApplyCounters::default()),
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        (applier, events, runtime)
    }

    /// The events until the applier's thread ends (its channel closes).
    fn events_until_the_end(
        events: &mut tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
    ) -> Vec<ApplyEvent> {
        std::iter::from_fn(|| events.blocking_recv()).collect()
    }

    /// A write whose range wraps past u64::MAX (the wire refuses one, but the applier must
    /// not trust that), or runs past the volume's end, ends the applier with an error, and
    /// nothing behind it in the stream is applied.
    #[test]
    fn a_malformed_write_ends_the_applier_and_nothing_after_it_applies() {
        for bad_offset in [u64::MAX - 4095, SIZE] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("dr.img");
            let (applier, mut events, runtime) = start_applier(dir.path(), &path, SIZE);
            runtime.block_on(applier.submit(direct_write(1, bad_offset, 8192, 0xee)));
            runtime.block_on(applier.submit(direct_write(2, 0, 4096, 0xaa)));
            runtime.block_on(applier.submit(ApplyCmd::Flush { seq: WriteSeq(3) }));
            let seen = events_until_the_end(&mut events);
            assert!(
                matches!(seen.as_slice(), [ApplyEvent::Failed(reason)] if reason.contains("a write for the DR volume")),
                "offset {bad_offset}: {seen:?}"
            );
            applier.stop();
            let mut block = [1u8; 4096];
            std::fs::File::open(&path)
                .unwrap()
                .read_exact_at(&mut block, 0)
                .unwrap();
            assert_eq!(
                block, [0; 4096],
                "offset {bad_offset}: a later write applied"
            );
        }
    }

    /// A tmpfs of `size` mounted at a new directory, unmounted when dropped (needs root).
    struct SmallTmpfs(tempfile::TempDir);

    impl SmallTmpfs {
        fn mount(size: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs (this test needs root)");
            Self(dir)
        }
    }

    impl Drop for SmallTmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    /// Writes on the ring that fail together (a full file system: each answers ENOSPC) end
    /// the applier at once: every completion after the first error is accounted for, so the
    /// ring's drain waits for none of them (it would wait its 30 s patience, then leak).
    #[test]
    fn writes_failing_together_end_the_applier_at_once() {
        let fs = SmallTmpfs::mount("64k");
        let dir = tempfile::tempdir().unwrap();
        let path = fs.0.path().join("dr.img");
        let (applier, mut events, runtime) = start_applier(dir.path(), &path, 4 * SIZE);
        for i in 0..16u64 {
            runtime.block_on(applier.submit(direct_write(i, i * (128 << 10), 128 << 10, 0x5a)));
        }
        let started = std::time::Instant::now();
        let seen = events_until_the_end(&mut events);
        let waited = started.elapsed();
        assert!(
            matches!(seen.last(), Some(ApplyEvent::Failed(reason)) if reason.contains("space")),
            "{seen:?}"
        );
        assert!(
            waited < std::time::Duration::from_secs(10),
            "the applier took {waited:?} to end: it waited for completions it had taken"
        );
        applier.stop();
    }

    #[test]
    fn a_refused_staged_write_spoils_its_unit_until_the_discard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let (applier, mut events, runtime) = start_applier(dir.path(), &path, SIZE);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));

        // Epoch 2's first write fails its CRC; its second and its seal follow in the stream
        // before the production side hears of it.
        submit(staged_write(2, 1, 0, 0xaa, true));
        submit(staged_write(2, 2, 8192, 0xbb, false));
        submit(seal(2, 5));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        let seen = events_until_flush(&mut events, WriteSeq(9));
        assert!(
            seen.contains(&ApplyEvent::Reject {
                seq: WriteSeq(1),
                reason: RejectReason::Checksum
            }),
            "{seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, ApplyEvent::Staged(_) | ApplyEvent::Applied { .. })),
            "a unit missing a write was staged or applied: {seen:?}"
        );

        // The production side fell back: its Discard, then its catch-up's unit.
        submit(ApplyCmd::Discard { after: Epoch(1) });
        submit(staged_write(3, 3, 0, 0xcc, false));
        submit(seal(3, 6));
        submit(ApplyCmd::Flush { seq: WriteSeq(10) });
        let seen = events_until_flush(&mut events, WriteSeq(10));
        assert!(seen.contains(&ApplyEvent::Staged(Epoch(3))), "{seen:?}");
        assert!(
            seen.iter()
                .any(|e| matches!(e, ApplyEvent::Applied { epoch, .. } if *epoch == Epoch(3))),
            "{seen:?}"
        );
        applier.stop();
        let file = std::fs::File::open(&path).unwrap();
        let mut block = [0u8; 4096];
        file.read_exact_at(&mut block, 0).unwrap();
        assert_eq!(block, [0xcc; 4096]);
        file.read_exact_at(&mut block, 8192).unwrap();
        assert_eq!(
            block, [0; 4096],
            "the spoiled epoch's other write was dropped"
        );
    }

    /// Units replayed at start are applied one by one, and the stage log may be compacted
    /// after each: the seals of the units still to replay are durable and acknowledged, so
    /// the compacted log keeps them. Here the second unit's apply fails (its volume's file
    /// system is full): its seal must still be in the log for the next start.
    #[test]
    fn compaction_during_replay_keeps_the_seals_still_to_replay() {
        let fs = SmallTmpfs::mount("64k");
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("stage-log");
        let mut log = StageLog::open(&log_path, Epoch::ZERO).unwrap().log;
        let first = ByteRange::new(0, 4096);
        let second = ByteRange::new(1 << 20, 256 << 10);
        log.append_write(Epoch(1), first, false, &Bytes::from(vec![0x11; 4096]))
            .unwrap();
        log.seal(Epoch(1), 10).unwrap();
        log.append_write(Epoch(2), second, false, &Bytes::from(vec![0x22; 256 << 10]))
            .unwrap();
        log.seal(Epoch(2), 20).unwrap();
        drop(log);

        let recovered = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        assert_eq!(recovered.seals.len(), 2);
        let path = fs.0.path().join("dr.img");
        let setup = Setup {
            size: 4 * SIZE,
            compact_after_bytes: 0,
            ..Setup::default()
        };
        let (applier, mut events, _runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        let seen = events_until_the_end(&mut events);
        applier.stop();
        assert!(
            matches!(seen.as_slice(), [ApplyEvent::Applied { epoch: Epoch(1), .. }, ApplyEvent::Failed(reason)] if reason.contains("space")),
            "{seen:?}"
        );

        let again = StageLog::open(&log_path, Epoch(1)).unwrap();
        assert_eq!(
            again.seals,
            [crate::stage_log::SealRecord {
                epoch: Epoch(2),
                cut_ms: 20
            }],
            "the second unit's seal was dropped from the stage log"
        );
        assert_eq!(again.log.staged_bytes(), second.len);
    }

    /// A unit with no writes, sealed and held for its group's commit while an earlier unit
    /// applies, leaves nothing staged: the log must keep its seal all the same (it was
    /// acknowledged), not be emptied.
    #[test]
    fn an_empty_unit_held_for_its_group_keeps_its_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let log_path = dir.path().join("stage-log");
        let recovered = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        let allowed = Arc::new(AtomicU64::new(0));
        let setup = Setup {
            allowed: Arc::clone(&allowed),
            ..Setup::default()
        };
        let (applier, mut events, runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        submit(staged_write(1, 1, 0, 0xaa, false));
        submit(seal(1, 10));
        submit(seal(2, 20));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        let seen = events_until_flush(&mut events, WriteSeq(9));
        assert_eq!(
            seen,
            [ApplyEvent::Staged(Epoch(1)), ApplyEvent::Staged(Epoch(2))]
        );

        // The group commits the first unit only.
        allowed.store(1, std::sync::atomic::Ordering::SeqCst);
        submit(ApplyCmd::Allowed);
        submit(ApplyCmd::Flush { seq: WriteSeq(10) });
        let seen = events_until_flush(&mut events, WriteSeq(10));
        assert!(
            matches!(
                seen.as_slice(),
                [ApplyEvent::Applied {
                    epoch: Epoch(1),
                    ..
                }]
            ),
            "{seen:?}"
        );
        applier.stop();

        let again = StageLog::open(&log_path, Epoch(1)).unwrap();
        assert_eq!(
            again.seals,
            [crate::stage_log::SealRecord {
                epoch: Epoch(2),
                cut_ms: 20
            }],
            "the empty unit's acknowledged seal was dropped from the stage log"
        );
    }

    /// A write the ring refuses (its submission fails) is not in flight: the applier ends
    /// at once, not after waiting out its drain's patience for a completion that cannot
    /// come (and leaking every buffer).
    #[test]
    fn a_write_the_ring_refuses_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let recovered = StageLog::open(&dir.path().join("stage-log"), Epoch::ZERO).unwrap();
        let setup = Setup {
            label: fault::PUSH_FAILS,
            size: 4 * SIZE,
            ..Setup::default()
        };
        let (applier, mut events, runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        for i in 0..8u64 {
            runtime.block_on(applier.submit(direct_write(i, i * (128 << 10), 128 << 10, 0x5a)));
        }
        let started = std::time::Instant::now();
        let seen = events_until_the_end(&mut events);
        let waited = started.elapsed();
        applier.stop();
        assert!(
            matches!(seen.last(), Some(ApplyEvent::Failed(reason)) if reason.contains("refuses")),
            "{seen:?}"
        );
        assert!(
            waited < std::time::Duration::from_secs(10),
            "the applier took {waited:?} to end: it waited for a write never on the ring"
        );
    }

    /// A seal of an epoch already covered by a later seal is answered (its writes are
    /// staged) but not appended: the log's seals stay in epoch order.
    #[test]
    fn a_seal_of_an_epoch_already_sealed_is_not_appended_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let log_path = dir.path().join("stage-log");
        let recovered = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        let setup = Setup {
            allowed: Arc::new(AtomicU64::new(0)),
            ..Setup::default()
        };
        let (applier, mut events, runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        submit(staged_write(4, 1, 0, 0xaa, false));
        submit(staged_write(5, 2, 8192, 0xbb, false));
        submit(seal(5, 5));
        submit(seal(4, 4));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        let seen = events_until_flush(&mut events, WriteSeq(9));
        assert_eq!(
            seen,
            [ApplyEvent::Staged(Epoch(5)), ApplyEvent::Staged(Epoch(4))]
        );
        applier.stop();
        let again = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        assert_eq!(
            again.seals.iter().map(|s| s.epoch).collect::<Vec<_>>(),
            [Epoch(5)]
        );
    }
}
