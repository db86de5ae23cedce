//! The production side of an async pair: epochs, the bounded in-memory journal of writes on
//! their way to the DR side, and bitmap mode with its catch-up.
//!
//! ```text
//!             overflow                     catch-up starts
//!  Journal ────────────────► Bitmap ───────────────────────► CatchUp { live: false }
//!     ▲                        ▲  overflow                          │ dirty set small
//!     │                        ├──────────────────────────────────┐ ▼
//!     └─── Seal(K) queued ──── FinalPass { live: true, seal at K } ◄┘
//! ```
//!
//! - **Journal.** A write reads the current epoch when it is admitted and counts as
//!   outstanding in it; when it completes locally its data is queued, tagged with the epoch.
//!   [`Journal::advance_epoch`] moves new writes to the next epoch; an epoch is sealed (a
//!   `Seal` queued after its writes) once nothing is outstanding in it or before it. The DR
//!   side applies all staged writes of epochs ≤ E when `Seal(E)` arrives.
//! - **Overflow.** A completion that would take the queue past its bound switches to bitmap
//!   mode: the queue is dropped, the tickets of every unsent epoch are handed back to be
//!   forgotten (their blocks stay dirty) and a `Discard` tells the DR side to drop what it
//!   staged after the last seal it was sent. Writes go on, tracked by the bitmap only.
//! - **Catch-up.** The resync reader queues dirty extents like writes, with no seals: the DR
//!   side stages them. It reads a bounded way ahead of the stream, waiting for room; an
//!   extent the final pass's live writes left no room for overflows the journal as a write
//!   would. Once the dirty set is small, live writes are journaled again (final pass);
//!   when the reader has sent the last extents, the epoch is advanced and its seal covers
//!   the whole catch-up: the DR side moves from its old consistent image to the new one in
//!   one step.
//!
//! - **Coalescing.** A staged write replaced by a later one of the same epoch and range
//!   before it was sent is dropped (`send_queue`); so that there is something to replace,
//!   the open epoch's staged writes wait until a sixteenth of the bound is queued, the
//!   epoch is cut, or a frame that must not wait is queued behind them. Once that window
//!   is full the oldest go until it has 1 MiB of room again (half the window, if less), so
//!   each wake-up of the sender takes a batch.
//!
//! Data is dropped from the journal as soon as the sender takes it: the QUIC stream holds
//! it from there, and after a broken link the pair catches up from the bitmap instead of
//! resending from memory. Tickets stay until the DR side reports the epoch staged.

use std::collections::{BTreeMap, VecDeque};

use crate::extent::ByteRange;
use crate::replication::digests::Touched;
use crate::replication::ids::{Epoch, ProbeId, WriteSeq};
use crate::replication::send_queue::{SendQueue, payload_bytes};
use crate::replication::tickets::Ticket;

/// What a queued frame carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload<P> {
    Data(P),
    /// The range reads as zeroes (WRITE_ZEROES, TRIM, or an all-zero resync extent).
    Zeroes,
}

/// A write for the DR side: staged there until the seal of its epoch (`direct == false`),
/// or written at once and acknowledged by `seq` (`direct`: hypermetro writes, initial-sync
/// extents).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFrame<P> {
    pub epoch: Epoch,
    pub seq: WriteSeq,
    pub range: ByteRange,
    pub payload: Payload<P>,
    pub direct: bool,
    pub fua: bool,
    /// A direct write the DR side holds back, unwritten and unanswered, until an `Ungate`
    /// (a hypermetro group going synchronous again, docs/GROUPS.md).
    pub gated: bool,
}

/// A frame for the DR side, in the order it must be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing<P> {
    Write(WriteFrame<P>),
    /// Direct writes gated before this apply once the DR side applied epoch `epoch`.
    Ungate {
        epoch: Epoch,
    },
    /// The DR side syncs its volume and acknowledges `seq`.
    Flush {
        seq: WriteSeq,
    },
    /// The initial sync sent its last extent: the DR side is consistent once a seal at or
    /// after `epoch` is applied (hypermetro: at once).
    SyncDone {
        epoch: Epoch,
    },
    /// Every write of epochs ≤ `epoch` has been queued before this.
    Seal {
        epoch: Epoch,
    },
    /// Drop what was staged for epochs after `after`: it will not be sealed.
    Discard {
        after: Epoch,
    },
    /// Online verify request `id`, compared on the DR side after everything queued before
    /// it (and, with `after`, once that epoch's unit is applied).
    Verify {
        id: ProbeId,
        after: Option<Epoch>,
    },
    /// Production's CRC of each 64 KiB block from `offset`, read after everything queued
    /// before it (`digests`): recorded by the DR side once the unit covering `after` is
    /// applied.
    Digest {
        offset: u64,
        crcs: Vec<u32>,
        after: Epoch,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Writes are journaled and sealed per epoch.
    Journal,
    /// Overflowed: writes are tracked by the bitmap only; the DR side keeps its last epoch.
    Bitmap,
    /// The resync reader streams dirty extents; live writes are journaled only once `live`.
    CatchUp { live: bool },
}

/// How an admitted write is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub epoch: Epoch,
    /// Its data goes to the peer (and it should take a ticket); otherwise only the bitmap
    /// tracks it.
    pub journaled: bool,
}

/// What [`Journal::complete`] did with a write's data.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Completed {
    Queued,
    /// Not journaled (bitmap mode): forget the write's ticket, if it took one.
    NotJournaled,
    /// The journal overflowed: forget these tickets (this write's among them); the pair is
    /// now in bitmap mode.
    Overflowed {
        forget: Vec<Ticket>,
    },
}

/// The open epoch's staged writes wait to be coalesced until this part of the bound is
/// queued.
const COALESCE_WINDOW_PART: u64 = 16;
/// Once the open epoch's waiting writes fill the coalescing window, the sender takes them
/// until the window has this much room again (or half the window, if less): each wake-up of
/// the sender takes a batch, not the one write that filled the window.
const DRAIN_BATCH: u64 = 1 << 20;

#[derive(Debug)]
pub struct Journal<P> {
    limit: u64,
    mode: Mode,
    current: Epoch,
    /// Admitted and not yet completed, by epoch.
    outstanding: BTreeMap<Epoch, u64>,
    /// Every epoch ≤ this has its seal queued.
    sealed: Epoch,
    /// Seals are held back during a catch-up until it ends.
    sealing: bool,
    /// The catch-up ends with the seal of this epoch.
    catch_up_ends: Option<Epoch>,
    queue: SendQueue<P>,
    queued_bytes: u64,
    /// Staged writes of the open epoch wait in the queue until this many bytes are queued
    /// (or the epoch is cut, or a frame that must not wait is queued behind them), so that a
    /// later write to the same range replaces one not yet sent.
    coalesce_window: u64,
    /// The window filled: the open epoch's writes go until it has a batch of room again.
    draining: bool,
    /// Payload bytes dropped that way.
    coalesced_bytes: u64,
    /// The last seal handed to the sender.
    seal_sent: Epoch,
    /// Tickets of queued or sent writes, by epoch, until the DR side stages the epoch.
    tickets: BTreeMap<Epoch, Vec<Ticket>>,
    /// The last epoch the DR side reported staged.
    staged: Epoch,
    next_seq: u64,
    /// After a switch from epochs to direct writes: direct frames wait until this epoch is
    /// sealed, so the DR side applies the journaled writes before any later direct one.
    direct_after: Option<Epoch>,
    held_direct: VecDeque<Outgoing<P>>,
    /// Direct writes are queued gated.
    gated: bool,
    /// The blocks each epoch touched, for production's digests (while the group keeps
    /// points).
    touched: Touched,
    /// Counts the times `touched` was forgotten: a digest read before is not queued.
    digest_round: u64,
}

/// Bytes a payload counts against the bound (zero ranges cost their header only).
pub trait PayloadLen {
    fn payload_len(&self) -> u64;
}

impl PayloadLen for Vec<u8> {
    fn payload_len(&self) -> u64 {
        self.len() as u64
    }
}

impl<P: PayloadLen> Journal<P> {
    /// A journal whose DR side holds everything up to `staged` and whose queue holds at most
    /// `limit` bytes of data.
    pub fn new(limit: u64, staged: Epoch) -> Self {
        Self {
            limit,
            mode: Mode::Journal,
            current: staged.next(),
            outstanding: BTreeMap::new(),
            sealed: staged,
            sealing: true,
            catch_up_ends: None,
            queue: SendQueue::new(),
            queued_bytes: 0,
            coalesce_window: limit / COALESCE_WINDOW_PART,
            draining: false,
            coalesced_bytes: 0,
            seal_sent: staged,
            tickets: BTreeMap::new(),
            staged,
            next_seq: 0,
            direct_after: None,
            held_direct: VecDeque::new(),
            gated: false,
            touched: Touched::default(),
            digest_round: 0,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn current_epoch(&self) -> Epoch {
        self.current
    }

    /// The last epoch the DR side has staged whole.
    pub fn staged_epoch(&self) -> Epoch {
        self.staged
    }

    /// Whether nothing is queued for the DR side.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the sender has nothing to take now: the queue is empty, or it starts with
    /// staged writes of the open epoch that wait for later ones to coalesce with (until
    /// they fill the coalescing window; then they go until it has a batch of room again).
    /// With a window of zero nothing waits.
    pub fn nothing_to_send(&self) -> bool {
        match self.queue.front() {
            None => true,
            Some(Outgoing::Write(w)) => {
                !w.direct
                    && w.epoch >= self.current
                    && self.mode == Mode::Journal
                    && !self.queue.has_fence()
                    && self.coalesce_window > 0
                    && !self.draining
            }
            Some(_) => false,
        }
    }

    /// Starts draining once the queue fills the coalescing window.
    fn note_queued(&mut self) {
        if self.queued_bytes >= self.coalesce_window {
            self.draining = true;
        }
    }

    /// Stops draining once the window has a batch of room.
    fn note_taken(&mut self) {
        let batch = (self.coalesce_window / 2).min(DRAIN_BATCH);
        if self.queued_bytes + batch <= self.coalesce_window {
            self.draining = false;
        }
    }

    /// Whether all that is queued is staged writes of the open epoch held to coalesce, and
    /// the next frame is queued behind them (no direct cut holds it back), releasing them.
    pub fn holds_to_coalesce(&self) -> bool {
        !self.queue.is_empty() && self.direct_after.is_none() && self.nothing_to_send()
    }

    /// Payload bytes of staged writes dropped because a later write of the same epoch
    /// replaced them before they were sent.
    pub fn coalesced_bytes(&self) -> u64 {
        self.coalesced_bytes
    }

    /// Sets how many bytes of the open epoch's staged writes wait to be coalesced (zero:
    /// none wait).
    pub fn set_coalesce_window(&mut self, bytes: u64) {
        self.coalesce_window = bytes;
        self.draining = false;
        self.note_queued();
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether live writes' data goes to the peer now.
    fn journaling(&self) -> bool {
        matches!(self.mode, Mode::Journal | Mode::CatchUp { live: true })
    }

    /// A write (or a resync read) is admitted: its epoch.
    pub fn admit(&mut self) -> Admitted {
        *self.outstanding.entry(self.current).or_insert(0) += 1;
        Admitted {
            epoch: self.current,
            journaled: self.journaling(),
        }
    }

    /// A write admitted in `admitted.epoch` completed locally. `ticket` is the one it took if
    /// it was journaled.
    pub fn complete(
        &mut self,
        admitted: Admitted,
        range: ByteRange,
        payload: Payload<P>,
        ticket: Option<Ticket>,
    ) -> Completed {
        self.finish_outstanding(admitted.epoch);
        let result = if !admitted.journaled || !self.journaling() {
            Completed::NotJournaled
        } else {
            let len = payload_bytes(&payload);
            if self.queued_bytes + len > self.limit {
                let mut forget = self.overflow();
                forget.extend(ticket);
                Completed::Overflowed { forget }
            } else {
                self.push_write(admitted.epoch, range, payload, ticket);
                Completed::Queued
            }
        };
        self.seal_closed_epochs();
        result
    }

    /// A catch-up extent read with its blocks locked, admitted with [`Journal::admit`]: queued
    /// like a write. The reader waited for room before it read, but the final pass's live
    /// writes may have filled the queue since: an extent that does not fit overflows the
    /// journal as a write would (`Overflowed`, its ticket among those to forget), so the
    /// bound holds. `NotJournaled` if the catch-up was given up since (the journal
    /// overflowed, or the DR side refused a staged write): the extent is not queued, its
    /// ticket is the caller's to forget. Either way the reader stops (a new catch-up sends
    /// what is still dirty).
    pub fn complete_resync(
        &mut self,
        admitted: Admitted,
        range: ByteRange,
        payload: Payload<P>,
        ticket: Ticket,
    ) -> Completed {
        self.finish_outstanding(admitted.epoch);
        let len = payload_bytes(&payload);
        let result = if !matches!(self.mode, Mode::CatchUp { .. }) {
            Completed::NotJournaled
        } else if self.queued_bytes > 0 && self.queued_bytes + len > self.limit {
            let mut forget = self.overflow();
            forget.push(ticket);
            Completed::Overflowed { forget }
        } else {
            self.push_write(admitted.epoch, range, payload, Some(ticket));
            Completed::Queued
        };
        self.seal_closed_epochs();
        result
    }

    /// Moves new writes to the next epoch (the periodic cut); the old one is sealed once its
    /// writes have completed.
    pub fn advance_epoch(&mut self) {
        self.current = self.current.next();
        self.seal_closed_epochs();
    }

    /// A consistency group's cut: new writes go to epoch `to` (the group numbers its
    /// epochs; the ones skipped are empty). Nothing happens if the journal is there already.
    pub fn advance_epoch_to(&mut self, to: Epoch) {
        if to > self.current {
            self.current = to;
            self.seal_closed_epochs();
        }
    }

    /// The next frame to send, unless what is queued waits (see
    /// [`Journal::nothing_to_send`]). Data leaves the journal here.
    pub fn poll_send(&mut self) -> Option<Outgoing<P>> {
        if self.nothing_to_send() {
            return None;
        }
        let frame = self.queue.pop()?;
        match &frame {
            Outgoing::Write(w) => {
                self.queued_bytes -= payload_bytes(&w.payload);
                self.note_taken();
            }
            Outgoing::Seal { epoch } => self.seal_sent = *epoch,
            Outgoing::Discard { .. }
            | Outgoing::Flush { .. }
            | Outgoing::SyncDone { .. }
            | Outgoing::Verify { .. }
            | Outgoing::Digest { .. }
            | Outgoing::Ungate { .. } => {}
        }
        Some(frame)
    }

    /// The DR side has synced everything of epochs ≤ `epoch` into its stage log, with the
    /// seal: the tickets of those writes may be redeemed.
    pub fn handle_staged(&mut self, epoch: Epoch) -> Vec<Ticket> {
        if epoch <= self.staged {
            return Vec::new();
        }
        self.staged = epoch;
        let later = self.tickets.split_off(&epoch.next());
        let done = std::mem::replace(&mut self.tickets, later);
        if self.catch_up_ends.is_some_and(|end| end <= epoch) {
            self.catch_up_ends = None;
        }
        done.into_values().flatten().collect()
    }

    /// A write admitted but failed locally: it leaves its epoch without data.
    pub fn abandon(&mut self, admitted: Admitted) {
        self.finish_outstanding(admitted.epoch);
        self.seal_closed_epochs();
    }

    /// Live writes are tracked by the bitmap only (hypermetro while the link is down,
    /// or before a catch-up); seals wait for the catch-up.
    pub fn stop_journaling(&mut self) {
        self.forget_digests();
        self.mode = Mode::Bitmap;
        self.sealing = false;
    }

    /// The DR side (re)connected holding everything up to `staged`: the journal starts
    /// from there.
    pub fn reconnected(&mut self, staged: Epoch) {
        self.staged = staged.max(self.staged);
        self.seal_sent = self.seal_sent.max(staged);
        self.sealed = self.sealed.max(staged);
        if self.current <= self.sealed {
            self.current = self.sealed.next();
        }
    }

    /// Live writes are journaled and sealed per epoch again (a pair starting with an
    /// initial sync, whose extents are direct).
    pub fn start_journaling(&mut self) {
        self.mode = Mode::Journal;
        self.sealing = true;
        self.catch_up_ends = None;
    }

    /// The resync reader starts a catch-up: its extents are queued without seals.
    pub fn begin_catch_up(&mut self) {
        self.forget_digests();
        self.mode = Mode::CatchUp { live: false };
        self.sealing = false;
    }

    /// The dirty set is small: live writes are journaled again, as part of the catch-up.
    /// Returns false if the catch-up was given up (see [`Journal::complete_resync`]).
    #[must_use]
    pub fn begin_final_pass(&mut self) -> bool {
        if let Mode::CatchUp { .. } = self.mode {
            self.mode = Mode::CatchUp { live: true };
            true
        } else {
            false
        }
    }

    /// The reader queued the last extent: the current epoch ends the catch-up, and its
    /// seal (once its writes complete) makes the DR side apply everything staged. With
    /// `cut`, the epoch is cut now; without (a pair in a consistency group), the group's
    /// next cut ends it. Returns the epoch whose seal ends the catch-up, or `None` if the
    /// catch-up was given up: then nothing is sealed, for the DR side would apply a unit
    /// missing the extents dropped with it.
    #[must_use]
    pub fn finish_catch_up(&mut self, cut: bool) -> Option<Epoch> {
        if !matches!(self.mode, Mode::CatchUp { .. }) {
            return None;
        }
        let end = self.current;
        self.mode = Mode::Journal;
        self.sealing = true;
        // The epochs the catch-up passed through are not sealed apart: their writes the DR
        // side lacks are in the unit's extents, which `end`'s seal applies. A seal of one
        // of them would have the DR side stage it without them (and, after a restart, say
        // it holds that epoch whole).
        self.sealed = self.sealed.max(Epoch(end.0.saturating_sub(1)));
        self.catch_up_ends = Some(end);
        if cut {
            self.advance_epoch();
        }
        Some(end)
    }

    /// Whether a catch-up is running or its final seal is not yet staged on the DR side.
    pub fn catching_up(&self) -> bool {
        matches!(self.mode, Mode::CatchUp { .. } | Mode::Bitmap) || self.catch_up_ends.is_some()
    }

    fn finish_outstanding(&mut self, epoch: Epoch) {
        if let Some(n) = self.outstanding.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                self.outstanding.remove(&epoch);
            }
        }
    }

    /// Queues a write the DR side applies at once and acknowledges (hypermetro, initial
    /// sync). Its ticket is the caller's to keep, by the returned sequence number. Never
    /// overflows: hypermetro writers wait for their answers, and the resync reader waits for
    /// room (`Production::has_room_for`).
    pub fn push_direct(&mut self, range: ByteRange, payload: Payload<P>, fua: bool) -> WriteSeq {
        self.queued_bytes += payload_bytes(&payload);
        let seq = self.take_seq();
        self.push_ordered(Outgoing::Write(WriteFrame {
            epoch: self.current,
            seq,
            range,
            payload,
            direct: true,
            fua,
            gated: self.gated,
        }));
        seq
    }

    /// Direct writes queued from now on are gated (`true`), or not.
    pub fn set_gated(&mut self, gated: bool) {
        self.gated = gated;
    }

    /// Ends a gate: queues `Ungate(epoch)` behind what is queued; later direct writes are not
    /// gated.
    pub fn ungate(&mut self, epoch: Epoch) {
        if self.gated {
            self.push_ordered(Outgoing::Ungate { epoch });
            self.gated = false;
        }
    }

    pub fn gated(&self) -> bool {
        self.gated
    }

    /// Queues a flush of the DR volume, after everything queued before it.
    pub fn push_flush(&mut self) -> WriteSeq {
        let seq = self.take_seq();
        self.push_ordered(Outgoing::Flush { seq });
        seq
    }

    /// Queues verify request `id` after everything queued before it. With `epochs`, the
    /// DR side compares once the current epoch is applied; else in stream order. Returns
    /// whether it was queued (not in bitmap mode, where nothing reaches the DR side).
    pub fn push_verify(&mut self, id: ProbeId, epochs: bool) -> bool {
        if self.mode == Mode::Bitmap {
            return false;
        }
        let after = epochs.then_some(self.current);
        self.push_ordered(Outgoing::Verify { id, after });
        true
    }

    /// Production digests the blocks of each sealed epoch (the group keeps points), or not.
    pub fn set_digests(&mut self, on: bool) {
        if on != self.touched.is_on() {
            self.touched.set_on(on);
            self.digest_round += 1;
        }
    }

    /// Whether sealed epochs' blocks wait to be digested.
    pub fn digests_due(&self) -> bool {
        self.touched.has_due()
    }

    /// The ranges due to be digested (each read with its blocks locked, then queued with
    /// [`Journal::push_digest`]), clipped to a volume of `size` bytes, and the round they
    /// belong to.
    pub fn take_digests_due(&mut self, size: u64) -> (u64, Vec<ByteRange>) {
        (self.digest_round, self.touched.take_due(size))
    }

    /// Queues production's CRCs of the blocks from `offset`, read in `round` with the blocks
    /// locked. Refused (false) unless the journal has stayed in journal mode since the round
    /// began: otherwise the volume held writes the stream does not carry when it was read.
    pub fn push_digest(&mut self, round: u64, offset: u64, crcs: Vec<u32>) -> bool {
        if round != self.digest_round || !self.digesting() {
            return false;
        }
        self.push_ordered(Outgoing::Digest {
            offset,
            crcs,
            after: self.current,
        });
        true
    }

    /// Journaled writes are all the volume changes: what is read describes a point.
    fn digesting(&self) -> bool {
        self.touched.is_on()
            && self.mode == Mode::Journal
            && self.direct_after.is_none()
            && self.catch_up_ends.is_none()
    }

    /// Nothing noted so far is digested.
    fn forget_digests(&mut self) {
        self.touched.forget();
        self.digest_round += 1;
    }

    /// Queues the end of the initial sync, after every extent queued before it. With
    /// `direct` live writes (hypermetro), the DR side is consistent at once (it is told epoch
    /// 0); otherwise once the unit of the current epoch is applied.
    pub fn push_sync_done(&mut self, direct: bool) -> Epoch {
        let epoch = if direct { Epoch::ZERO } else { self.current };
        self.push_ordered(Outgoing::SyncDone { epoch });
        epoch
    }

    /// Live writes go direct from now on (hypermetro after a catch-up). Journaled writes
    /// still outstanding are sealed first: until their seal is queued, direct frames wait,
    /// so the DR side never applies a direct write before an earlier staged one.
    pub fn switch_to_direct(&mut self) {
        self.forget_digests();
        let last = self.current;
        self.mode = Mode::Journal;
        self.sealing = true;
        self.advance_epoch();
        if self.sealed < last {
            self.direct_after = Some(last);
        }
    }

    fn push_ordered(&mut self, frame: Outgoing<P>) {
        if self.direct_after.is_some() {
            self.held_direct.push_back(frame);
        } else {
            self.queue.push(frame);
        }
    }

    /// Drops everything not yet sent (the link is down): returns the tickets of every
    /// epoch not yet staged, to be forgotten. Live writes are tracked by the bitmap only
    /// until a catch-up; the DR side starts afresh on the next connection.
    pub fn disconnect(&mut self) -> Vec<Ticket> {
        let mut forget = self.overflow();
        forget.extend(std::mem::take(&mut self.tickets).into_values().flatten());
        self.queue.clear();
        forget
    }

    /// The DR side refused a staged write (its CRC failed on the way, or its stage log is
    /// full): no epoch it has not staged can apply whole now. Switches to bitmap mode like
    /// [`Journal::disconnect`] (every ticket not yet staged is returned, to forget: its
    /// blocks stay dirty, and a catch-up sends them), but the stream goes on: a `Discard`
    /// tells the DR side to drop what it staged after its last acknowledged seal, and what
    /// follows it is the catch-up's.
    pub fn spoiled(&mut self) -> Vec<Ticket> {
        let forget = self.disconnect();
        self.queue.push(Outgoing::Discard { after: self.staged });
        forget
    }

    fn take_seq(&mut self) -> WriteSeq {
        let seq = WriteSeq(self.next_seq);
        self.next_seq += 1;
        seq
    }

    fn push_write(
        &mut self,
        epoch: Epoch,
        range: ByteRange,
        payload: Payload<P>,
        ticket: Option<Ticket>,
    ) {
        self.queued_bytes += payload_bytes(&payload);
        let seq = self.take_seq();
        let frame = Outgoing::Write(WriteFrame {
            epoch,
            seq,
            range,
            payload,
            direct: false,
            fua: false,
            gated: false,
        });
        if self.digesting() {
            self.touched.note(epoch, range);
        }
        // Catch-up extents and the final pass's writes are not coalesced: they are few.
        if self.mode == Mode::Journal {
            let dropped = self.queue.push_coalescing(frame);
            self.queued_bytes -= dropped;
            self.coalesced_bytes += dropped;
        } else {
            self.queue.push(frame);
        }
        self.note_queued();
        if let Some(ticket) = ticket {
            self.tickets.entry(epoch).or_default().push(ticket);
        }
    }

    /// Queues the seals of every epoch before the current one with nothing outstanding in
    /// or before it.
    fn seal_closed_epochs(&mut self) {
        if !self.sealing {
            return;
        }
        let oldest_open = self
            .outstanding
            .keys()
            .next()
            .copied()
            .unwrap_or(self.current)
            .min(self.current);
        // Epochs < oldest_open are closed; one seal covers them all.
        let last_closed = Epoch(oldest_open.0.saturating_sub(1));
        if last_closed > self.sealed {
            self.sealed = last_closed;
            self.queue.push(Outgoing::Seal { epoch: last_closed });
            self.touched.sealed(last_closed);
        }
        if self.direct_after.is_some_and(|e| self.sealed >= e) {
            self.direct_after = None;
            for frame in self.held_direct.drain(..) {
                self.queue.push(frame);
            }
        }
    }

    /// Switches to bitmap mode; returns the tickets to forget.
    fn overflow(&mut self) -> Vec<Ticket> {
        self.forget_digests();
        self.mode = Mode::Bitmap;
        self.sealing = false;
        self.catch_up_ends = None;
        self.queue.clear();
        self.held_direct.clear();
        self.direct_after = None;
        self.gated = false;
        self.queued_bytes = 0;
        self.draining = false;
        // Epochs up to the last seal sent will be staged and acknowledged; the rest will not.
        let unsent = self.tickets.split_off(&self.seal_sent.next());
        self.sealed = self.seal_sent;
        self.queue.push(Outgoing::Discard {
            after: self.seal_sent,
        });
        unsent.into_values().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::tickets::TicketRegistry;

    fn write(j: &mut Journal<Vec<u8>>, reg: &mut TicketRegistry, offset: u64) -> Completed {
        let a = j.admit();
        let range = ByteRange::new(offset, 4);
        let ticket = a.journaled.then(|| reg.issue(range));
        j.complete(a, range, Payload::Data(vec![1; 4]), ticket)
    }

    fn drain(j: &mut Journal<Vec<u8>>) -> Vec<Outgoing<Vec<u8>>> {
        std::iter::from_fn(|| j.poll_send()).collect()
    }

    #[test]
    fn an_epoch_is_sealed_after_its_last_write_completes() {
        let mut j = Journal::new(1 << 20, Epoch(0));
        j.set_coalesce_window(0);
        let a = j.admit(); // epoch 1, still running
        j.advance_epoch();
        let b = j.admit(); // epoch 2
        let _ = j.complete(b, ByteRange::new(0, 4), Payload::Data(vec![0; 4]), None);
        assert!(
            !drain(&mut j)
                .iter()
                .any(|f| matches!(f, Outgoing::Seal { .. })),
            "epoch 1 has a write outstanding"
        );
        let _ = j.complete(a, ByteRange::new(8, 4), Payload::Data(vec![0; 4]), None);
        let frames = drain(&mut j);
        assert!(matches!(
            frames[0],
            Outgoing::Write(WriteFrame {
                epoch: Epoch(1),
                ..
            })
        ));
        assert_eq!(frames[1], Outgoing::Seal { epoch: Epoch(1) });
        j.advance_epoch();
        assert_eq!(drain(&mut j), vec![Outgoing::Seal { epoch: Epoch(2) }]);
    }

    fn write_data(j: &mut Journal<Vec<u8>>, offset: u64, value: u8) {
        let a = j.admit();
        let done = j.complete(
            a,
            ByteRange::new(offset, 4),
            Payload::Data(vec![value; 4]),
            None,
        );
        assert_eq!(done, Completed::Queued);
    }

    fn written(frames: &[Outgoing<Vec<u8>>]) -> Vec<(u64, u8)> {
        frames
            .iter()
            .filter_map(|f| match f {
                Outgoing::Write(WriteFrame {
                    range,
                    payload: Payload::Data(d),
                    ..
                }) => Some((range.offset, d[0])),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_write_of_the_open_epoch_waits_and_a_later_one_to_its_range_replaces_it() {
        let mut j = Journal::new(1 << 20, Epoch(0));
        write_data(&mut j, 0, 1);
        write_data(&mut j, 8, 2);
        assert!(
            j.nothing_to_send(),
            "the open epoch's writes wait to be coalesced"
        );
        assert!(drain(&mut j).is_empty());
        write_data(&mut j, 0, 3);
        assert_eq!(j.queued_bytes(), 8, "the first write to 0 was dropped");
        assert_eq!(j.coalesced_bytes(), 4);
        assert!(!j.is_empty());

        j.advance_epoch();
        assert!(!j.nothing_to_send(), "a cut epoch goes");
        let frames = drain(&mut j);
        assert_eq!(
            written(&frames),
            [(8, 2), (0, 3)],
            "the later write, in its place"
        );
        assert_eq!(frames.last(), Some(&Outgoing::Seal { epoch: Epoch(1) }));
    }

    #[test]
    fn writes_are_not_coalesced_across_epochs_or_a_fence() {
        let mut j = Journal::new(1 << 20, Epoch(0));
        write_data(&mut j, 0, 1);
        let a = j.admit(); // keeps epoch 1 open past the cut
        j.advance_epoch();
        write_data(&mut j, 0, 2); // epoch 2: the same range, another epoch
        assert!(j.push_verify(ProbeId(7), false), "a fence");
        write_data(&mut j, 0, 3); // behind the fence
        write_data(&mut j, 0, 4); // replaces 3 only
        j.abandon(a);
        j.advance_epoch();
        let frames = drain(&mut j);
        assert_eq!(written(&frames), [(0, 1), (0, 2), (0, 4)]);
        assert_eq!(j.coalesced_bytes(), 4);
    }

    #[test]
    fn the_open_epoch_goes_once_its_writes_fill_the_window() {
        let mut j = Journal::new(1 << 20, Epoch(0));
        j.set_coalesce_window(12);
        write_data(&mut j, 0, 1);
        write_data(&mut j, 8, 1);
        assert!(j.nothing_to_send());
        write_data(&mut j, 16, 1);
        assert!(!j.nothing_to_send(), "12 bytes wait: the window is full");
        assert_eq!(
            written(&drain(&mut j)),
            [(0, 1), (8, 1)],
            "the oldest go until half the window is free"
        );
        assert_eq!(j.queued_bytes(), 4);
        // The next write waits again, until the window is full once more.
        write_data(&mut j, 24, 1);
        assert!(j.nothing_to_send(), "8 bytes of 12 wait");
        write_data(&mut j, 32, 1);
        assert!(!j.nothing_to_send());
        assert_eq!(written(&drain(&mut j)), [(16, 1), (24, 1)]);
    }

    #[test]
    fn with_no_window_nothing_waits_zero_ranges_included() {
        let mut j = Journal::new(1 << 20, Epoch(0));
        j.set_coalesce_window(0);
        write_data(&mut j, 0, 1);
        let a = j.admit();
        let done = j.complete(a, ByteRange::new(8, 4), Payload::Zeroes, None);
        assert_eq!(done, Completed::Queued);
        let frames = drain(&mut j);
        assert_eq!(
            frames.len(),
            2,
            "the write and the zero range both go: {frames:?}"
        );
        assert!(j.nothing_to_send() && j.is_empty());
    }

    #[test]
    fn a_full_window_drains_by_a_batch_of_at_most_a_mebibyte() {
        let mut j = Journal::new(1 << 30, Epoch(0));
        j.set_coalesce_window(4 << 20);
        let block = vec![1u8; 64 << 10];
        for n in 0..64 {
            let a = j.admit();
            let done = j.complete(
                a,
                ByteRange::new(n << 16, 64 << 10),
                Payload::Data(block.clone()),
                None,
            );
            assert_eq!(done, Completed::Queued);
            assert_eq!(j.nothing_to_send(), n < 63, "write {n}");
        }
        assert_eq!(drain(&mut j).len(), 16, "1 MiB of 64 KiB writes");
        assert_eq!(j.queued_bytes(), 3 << 20);
    }

    #[test]
    fn a_direct_write_behind_waiting_writes_takes_them_along() {
        let mut j = Journal::new(1 << 20, Epoch(0));
        write_data(&mut j, 0, 1);
        let _ = j.push_flush();
        assert!(!j.nothing_to_send(), "a flush must not wait for the cut");
        let frames = drain(&mut j);
        assert_eq!(written(&frames), [(0, 1)]);
        assert!(matches!(frames[1], Outgoing::Flush { .. }));
    }

    #[test]
    fn a_catch_up_extent_that_no_longer_fits_overflows_the_journal() {
        let mut reg = TicketRegistry::new();
        let mut j: Journal<Vec<u8>> = Journal::new(8, Epoch(0));
        j.begin_catch_up();
        // The reader found room for 4 bytes, then the final pass's live writes filled the
        // queue before it queued them.
        let r = j.admit();
        assert!(j.begin_final_pass());
        assert_eq!(write(&mut j, &mut reg, 0), Completed::Queued);
        assert_eq!(write(&mut j, &mut reg, 4), Completed::Queued);
        let t = reg.issue(ByteRange::new(16, 4));
        let Completed::Overflowed { forget } =
            j.complete_resync(r, ByteRange::new(16, 4), Payload::Data(vec![2; 4]), t)
        else {
            panic!("an extent past the bound was queued");
        };
        assert!(forget.contains(&t), "its ticket is forgotten: {forget:?}");
        assert_eq!(j.mode(), Mode::Bitmap);
        assert_eq!(j.queued_bytes(), 0);
    }

    #[test]
    fn overflow_drops_the_unsent_and_keeps_what_was_sealed_and_sent() {
        let mut reg = TicketRegistry::new();
        let mut j = Journal::new(8, Epoch(0));
        assert_eq!(write(&mut j, &mut reg, 0), Completed::Queued);
        j.advance_epoch();
        drain(&mut j); // write + Seal(1) sent
        assert_eq!(write(&mut j, &mut reg, 4), Completed::Queued); // epoch 2
        assert_eq!(write(&mut j, &mut reg, 8), Completed::Queued);
        let Completed::Overflowed { forget } = write(&mut j, &mut reg, 12) else {
            panic!("12 bytes over an 8-byte bound");
        };
        assert_eq!(forget.len(), 3, "epoch 2's three writes are forgotten");
        assert_eq!(j.mode(), Mode::Bitmap);
        assert_eq!(drain(&mut j), vec![Outgoing::Discard { after: Epoch(1) }]);
        assert_eq!(write(&mut j, &mut reg, 16), Completed::NotJournaled);
        assert_eq!(
            j.handle_staged(Epoch(1)).len(),
            1,
            "epoch 1's ticket is redeemed"
        );
    }

    #[test]
    fn after_a_switch_to_direct_writes_wait_for_the_seal_of_the_journaled_ones() {
        let mut j = Journal::new(1 << 20, Epoch(0));
        let a = j.admit(); // journaled, epoch 1, still running
        j.switch_to_direct();
        let seq = j.push_direct(ByteRange::new(0, 4), Payload::Data(vec![2; 4]), false);
        assert!(
            drain(&mut j).is_empty(),
            "the direct write waits for epoch 1's seal"
        );
        let _ = j.complete(a, ByteRange::new(0, 4), Payload::Data(vec![1; 4]), None);
        let frames = drain(&mut j);
        assert!(matches!(&frames[0], Outgoing::Write(w) if !w.direct));
        assert_eq!(frames[1], Outgoing::Seal { epoch: Epoch(1) });
        assert!(matches!(&frames[2], Outgoing::Write(w) if w.direct && w.seq == seq));
    }

    #[test]
    fn a_catch_up_is_sealed_once_at_its_end() {
        let mut reg = TicketRegistry::new();
        let mut j = Journal::new(8, Epoch(0));
        j.advance_epoch();
        drain(&mut j);
        for o in [0, 4, 8] {
            let _ = write(&mut j, &mut reg, o);
        }
        assert_eq!(j.mode(), Mode::Bitmap);
        drain(&mut j);
        j.begin_catch_up();
        let a = j.admit();
        assert!(!a.journaled, "live writes are not journaled yet");
        let r = j.admit();
        let t = reg.issue(ByteRange::new(0, 12));
        assert_eq!(
            j.complete_resync(r, ByteRange::new(0, 12), Payload::Zeroes, t),
            Completed::Queued
        );
        j.advance_epoch(); // epochs go on, but are not sealed
        let _ = j.complete(a, ByteRange::new(20, 4), Payload::Data(vec![0; 4]), None);
        assert!(
            !drain(&mut j)
                .iter()
                .any(|f| matches!(f, Outgoing::Seal { .. }))
        );
        assert!(j.begin_final_pass());
        assert_eq!(write(&mut j, &mut reg, 24), Completed::Queued);
        let end = j.finish_catch_up(true).expect("the catch-up ran whole");
        let frames = drain(&mut j);
        assert_eq!(frames.last(), Some(&Outgoing::Seal { epoch: end }));
        assert!(j.catching_up(), "until the DR side stages the final seal");
        assert_eq!(
            j.handle_staged(end).len(),
            2,
            "the extent's and the live write's tickets"
        );
        assert!(!j.catching_up());
    }

    /// A unit's writes are all in its last epoch: the epochs it passed through are never
    /// sealed apart. A seal of one of them would make the DR side stage it (and report it
    /// staged after a restart) without the writes the link lost there, which come in the
    /// unit's extents: a consistency group could then commit that epoch while one of its
    /// pairs' DR sides lacks writes another's holds the dependants of.
    #[test]
    fn a_catch_up_ended_by_a_group_cut_seals_none_of_the_epochs_it_covers() {
        let mut reg = TicketRegistry::new();
        let mut j = Journal::new(1 << 20, Epoch(86));
        j.advance_epoch();
        assert_eq!(write(&mut j, &mut reg, 0), Completed::Queued); // epoch 88
        j.advance_epoch_to(Epoch(89));
        assert_eq!(write(&mut j, &mut reg, 4), Completed::Queued); // epoch 89
        let sent = drain(&mut j);
        assert!(sent.contains(&Outgoing::Seal { epoch: Epoch(88) }));
        // The link broke with the seal of 88 sent but never staged; the DR side holds 87.
        let _ = j.disconnect();
        j.reconnected(Epoch(87));
        j.begin_catch_up();
        j.advance_epoch_to(Epoch(90)); // the group's cuts go on during the catch-up
        let r = j.admit();
        let t = reg.issue(ByteRange::new(0, 8));
        assert_eq!(
            j.complete_resync(r, ByteRange::new(0, 8), Payload::Zeroes, t),
            Completed::Queued
        );
        assert!(j.begin_final_pass());
        let end = j.finish_catch_up(false).expect("the catch-up ran whole");
        assert_eq!(end, Epoch(90));
        assert_eq!(write(&mut j, &mut reg, 12), Completed::Queued); // a live write, in 90
        j.advance_epoch_to(Epoch(91)); // the group's next cut ends the unit
        let seals: Vec<Epoch> = drain(&mut j)
            .into_iter()
            .filter_map(|f| match f {
                Outgoing::Seal { epoch } => Some(epoch),
                _ => None,
            })
            .collect();
        assert_eq!(seals, vec![end], "only the unit's end is sealed");
    }

    /// A catch-up whose journal overflowed (or whose staged write the DR side refused) is
    /// given up: no later extent is queued and no seal ends it, for the DR side, told to
    /// discard what it staged, would apply a unit holding only the extents sent after.
    #[test]
    fn a_catch_up_spoiled_on_the_way_is_never_sealed() {
        let mut reg = TicketRegistry::new();
        let mut j = Journal::new(8, Epoch(0));
        j.stop_journaling();
        j.begin_catch_up();
        let r = j.admit();
        let t = reg.issue(ByteRange::new(0, 8));
        assert_eq!(
            j.complete_resync(r, ByteRange::new(0, 8), Payload::Zeroes, t),
            Completed::Queued
        );
        assert!(j.begin_final_pass());
        drain(&mut j); // the first extent is on the stream
        let forget = j.spoiled();
        assert_eq!(forget, vec![t], "the sent extent will not be staged");
        let r = j.admit();
        let t = reg.issue(ByteRange::new(8, 8));
        assert_eq!(
            j.complete_resync(r, ByteRange::new(8, 8), Payload::Zeroes, t),
            Completed::NotJournaled,
            "an extent read after the spoil is not queued"
        );
        assert_eq!(j.finish_catch_up(true), None, "no seal ends it");
        assert!(!j.begin_final_pass());
        let frames = drain(&mut j);
        assert_eq!(frames, vec![Outgoing::Discard { after: Epoch(0) }]);
        assert_eq!(
            j.mode(),
            Mode::Bitmap,
            "a new catch-up starts from the bitmap"
        );
        j.advance_epoch();
        assert!(
            drain(&mut j).is_empty(),
            "nor does a later cut seal anything"
        );
    }

    #[test]
    fn a_sealed_epochs_blocks_are_digested_behind_its_writes() {
        use crate::replication::digests::DIGEST_BLOCK;
        let mut j = Journal::new(1 << 20, Epoch(0));
        let mut reg = TicketRegistry::new();
        j.set_digests(true);
        let _ = write(&mut j, &mut reg, 0);
        let _ = write(&mut j, &mut reg, 3 * DIGEST_BLOCK);
        assert!(j.take_digests_due(1 << 30).1.is_empty(), "not sealed yet");
        j.advance_epoch();
        let (round, due) = j.take_digests_due(1 << 30);
        assert_eq!(
            due,
            vec![
                ByteRange::new(0, DIGEST_BLOCK),
                ByteRange::new(3 * DIGEST_BLOCK, DIGEST_BLOCK)
            ]
        );
        assert!(j.push_digest(round, 0, vec![7]));
        let frames = drain(&mut j);
        assert!(matches!(frames[0], Outgoing::Write(_)));
        assert!(matches!(frames[1], Outgoing::Write(_)));
        assert_eq!(frames[2], Outgoing::Seal { epoch: Epoch(1) });
        assert_eq!(
            frames[3],
            Outgoing::Digest {
                offset: 0,
                crcs: vec![7],
                after: Epoch(2)
            }
        );
    }

    #[test]
    fn a_digest_read_before_the_journal_left_journal_mode_is_not_queued() {
        let mut j = Journal::new(8, Epoch(0));
        let mut reg = TicketRegistry::new();
        j.set_digests(true);
        let _ = write(&mut j, &mut reg, 0);
        j.advance_epoch();
        let (round, due) = j.take_digests_due(1 << 30);
        assert_eq!(due.len(), 1);
        // Over the bound: bitmap mode, and the notes of the open epoch are forgotten.
        let _ = write(&mut j, &mut reg, 4096);
        let _ = write(&mut j, &mut reg, 8192);
        let _ = write(&mut j, &mut reg, 12288);
        assert_eq!(j.mode(), Mode::Bitmap);
        assert!(!j.push_digest(round, 0, vec![7]), "read in an older round");
        j.begin_catch_up();
        assert!(j.begin_final_pass());
        let end = j.finish_catch_up(true).unwrap();
        let (round, due) = j.take_digests_due(1 << 30);
        assert!(due.is_empty(), "the catch-up's blocks are not digested");
        assert!(
            !j.push_digest(round, 0, vec![7]),
            "nor anything until its seal is staged"
        );
        drain(&mut j);
        let _ = j.handle_staged(end);
        assert!(j.push_digest(round, 0, vec![7]));
        j.set_digests(false);
        let (round, _) = j.take_digests_due(1 << 30);
        assert!(!j.push_digest(round, 0, vec![7]), "off");
    }
}
