//! The production side of a pair as one machine: every decision the link makes about a
//! write, a frame or an answer, with no I/O (docs/PAIR-MACHINE.md).
//!
//! How live writes are handled depends on the pair's model and on where it is:
//!
//! | live mode | write's data | answer |
//! |---|---|---|
//! | `Sync` (hypermetro, active) | direct frame, sent when the local write starts | after the DR side's acknowledgement |
//! | `Journal` (async; hypermetro at the end of a catch-up) | journaled in its epoch | after the local write |
//! | `Tracked` (link down, catch-up running) | not sent: the bitmap has it | after the local write |
//!
//! Every frame goes through one [`Journal`] queue, so the DR side sees them in the order
//! the blocks were written here. Each event is a method that takes the time it needs
//! (`now_us`, µs on a monotonic clock; `wall_ms`, ms since the Unix epoch) and returns the
//! [`Effects`] its shell must carry out once it no longer holds the machine: tickets to
//! redeem or forget, answers to give, the sender or the resync reader to wake. `P` is a
//! write's payload; `A` is where an answer goes (the connection's mailbox in the agent).

use std::collections::{BTreeMap, HashMap};

use smallvec::SmallVec;

use crate::ByteRange;
use crate::pair::atomic_spans::{AtomicSpan, AtomicSpans};
use crate::pair::hold_times::{HoldSummary, HoldTimes};
use crate::pair::probes::{Probe, ProbeResult, Probes};
use crate::pair::state::{IllegalTransition, PairState};
use crate::replication::answer_hold::AnswerHold;
use crate::replication::group_cut::{CutMode, Live, RoundOutcome};
use crate::replication::{
    Admitted, AnswerToken, Completed, Epoch, Journal, Mode, Outgoing, Payload, PayloadLen, ProbeId,
    RejectReason, ReplicationModel, Ticket, WriteFrame, WriteSeq,
};

/// How the link replicates one write; set at its admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaMode {
    /// Only the bitmap tracks it (the pair is not replicating live writes now).
    Tracked,
    /// Async: its data joins the journal when the local write is done.
    Journal(Admitted),
    /// Hypermetro: its answer waits for the peer.
    Sync,
}

impl ReplicaMode {
    /// Whether the write takes a ticket at its admission (its data goes to the peer).
    pub fn wants_ticket(self) -> bool {
        match self {
            ReplicaMode::Sync => true,
            ReplicaMode::Journal(admitted) => admitted.journaled,
            ReplicaMode::Tracked => false,
        }
    }
}

/// What happens to a write's answer once its local write is done.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterLocal {
    Answer,
    /// The machine gives the write's answer later (in an event's [`Effects`]).
    WaitForPeer,
}

/// A write whose local write ended, as the machine sees it.
#[derive(Debug)]
pub struct LocalWrite<P> {
    pub range: ByteRange,
    /// What the DR side must write; `None` if nothing changed (a TRIM the device could not
    /// do).
    pub payload: Option<Payload<P>>,
    pub fua: bool,
    pub token: AnswerToken,
    pub mode: ReplicaMode,
    pub ticket: Option<Ticket>,
    /// Its data was sent when the local write started, under `seq`.
    pub sent: Option<WriteSeq>,
}

/// What the shell does after an event, once the machine's lock is released.
#[must_use]
#[derive(Debug)]
pub struct Effects<A> {
    /// Tickets whose blocks the DR side now holds: clear them in the dirty tracker.
    pub redeem: SmallVec<[Ticket; 1]>,
    /// Tickets that will not be redeemed: their blocks stay dirty.
    pub forget: SmallVec<[Ticket; 1]>,
    /// A range to mark dirty durably again (a hypermetro write that failed here after the
    /// peer took it).
    pub mark_dirty: Option<ByteRange>,
    /// Answers to give, in order.
    pub answers: SmallVec<[(AnswerToken, A); 1]>,
    /// Frames were queued: wake the sender.
    pub wake_sender: bool,
    /// Frames were taken or answered: wake what waits on the machine (the resync reader,
    /// verify).
    pub notify: bool,
    /// The journal overflowed: the pair fell back to the bitmap (or tripped).
    pub overflowed: bool,
    /// The DR side rejected a frame whose CRC failed on the way.
    pub corrupted_in_transit: bool,
    /// The DR side's stage log became full.
    pub stage_full_began: bool,
}

impl<A> Default for Effects<A> {
    fn default() -> Self {
        Self {
            redeem: SmallVec::new(),
            forget: SmallVec::new(),
            mark_dirty: None,
            answers: SmallVec::new(),
            wake_sender: false,
            notify: false,
            overflowed: false,
            corrupted_in_transit: false,
            stage_full_began: false,
        }
    }
}

impl<A> Effects<A> {
    fn woke_sender() -> Self {
        Self {
            wake_sender: true,
            ..Self::default()
        }
    }

    fn notified() -> Self {
        Self {
            notify: true,
            ..Self::default()
        }
    }

    /// Whether the shell has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.redeem.is_empty()
            && self.forget.is_empty()
            && self.mark_dirty.is_none()
            && self.answers.is_empty()
            && !self.wake_sender
            && !self.notify
            && !self.overflowed
            && !self.corrupted_in_transit
            && !self.stage_full_began
    }
}

/// A frame for the sender: what crosses the link, before the shell's one conversion to the
/// wire's frame (which computes the CRCs outside the machine's lock).
#[derive(Debug)]
pub enum Transmit<P> {
    Write(WriteFrame<P>),
    Ungate {
        epoch: Epoch,
    },
    Flush {
        seq: WriteSeq,
    },
    Seal {
        epoch: Epoch,
        /// When the epoch was cut (ms since the Unix epoch; 0 if unknown).
        cut_ms: u64,
    },
    Discard {
        after: Epoch,
    },
    SyncDone {
        epoch: Epoch,
    },
    Verify {
        id: ProbeId,
        offset: u64,
        after: Option<Epoch>,
        crcs: Vec<u32>,
    },
    /// Production's CRC of each 64 KiB block from `offset`, for the DR side to record once
    /// the unit covering `after` is applied.
    Digest {
        offset: u64,
        after: Epoch,
        crcs: Vec<u32>,
    },
}

/// Bytes a frame's header costs against a take's budget.
const FRAME_HEADER_BYTES: u64 = 48;

/// How far the resync reader reads ahead of the stream by default: it adds nothing while
/// this much is queued and not yet sent (live writes included). That keeps a link busy
/// while it reads the next extents (64 MiB is 54 ms of a 10 Gbit/s link). It does not
/// fill the whole journal: that would be memory held for nothing (the link takes it no
/// faster), and during a catch-up the journal's room is for live writes, which overflow it
/// when it is full.
pub const RESYNC_READ_AHEAD: u64 = 64 << 20;

/// A frame waiting for the DR side's acknowledgement.
#[derive(Debug)]
enum Pending<P, A> {
    /// A hypermetro write: redeem its ticket and give its answer.
    Write {
        ticket: Option<Ticket>,
        token: AnswerToken,
        to: A,
        local_failed: bool,
        range: ByteRange,
        payload: Payload<P>,
        fua: bool,
    },
    Flush {
        token: AnswerToken,
        to: A,
    },
    /// A resync extent written direct: redeem its ticket.
    Extent {
        ticket: Ticket,
        range: ByteRange,
        payload: Payload<P>,
    },
}

impl<P, A> Pending<P, A> {
    /// What a direct frame carries, to send it again: its range, data and FUA flag.
    fn data(&self) -> Option<(ByteRange, &Payload<P>, bool)> {
        match self {
            Pending::Write {
                range,
                payload,
                fua,
                ..
            } => Some((*range, payload, *fua)),
            Pending::Extent { range, payload, .. } => Some((*range, payload, false)),
            Pending::Flush { .. } => None,
        }
    }
}

/// An answer held for the group (`crate::replication::answer_hold`): the write's token,
/// where it goes, and when it was held (µs on the monotonic clock).
type HeldAnswer<A> = (AnswerToken, A, u64);

/// The production side of one pair.
#[derive(Debug)]
pub struct Production<P, A> {
    model: ReplicationModel,
    /// Where the pair is in its life; changed only through checked transitions.
    state: PairState,
    /// How live writes reach the DR side while a stream is up (`Tracked` when none is).
    live: Live,
    journal: Journal<P>,
    pending: HashMap<WriteSeq, Pending<P, A>>,
    /// When each epoch was cut (ms since the Unix epoch).
    cut_times: BTreeMap<Epoch, u64>,
    /// The journal overflowed (or an async write was rejected): a catch-up is needed.
    needs_catch_up: bool,
    /// A synchronous pair of a group must leave synchronous replication, and does it as
    /// when its link breaks: the stream ends (why, for the log), so that every write still
    /// waiting for the DR side is held by the group's trip.
    end_stream: Option<&'static str>,
    /// Resync extents acknowledged, in bytes.
    resync_acked: u64,
    /// The last end of an initial sync the DR side recorded durably.
    sync_done_acked: Option<Epoch>,
    /// When the DR side last rejected a staged write for want of room in its stage log.
    stage_full_at_us: Option<u64>,
    /// Payload bytes of resync extents sent direct and not yet acknowledged (kept to be sent
    /// again if rejected): bounded with the journal (rule 6).
    unacked_extent_bytes: u64,
    /// How far the resync reader reads ahead of the stream ([`RESYNC_READ_AHEAD`]).
    resync_read_ahead: u64,
    /// When the DR side last answered, or when a frame began waiting with none waiting.
    answered_at_us: u64,
    /// Online verify probes waiting for the DR side, and answered.
    probes: Probes,
    /// The pair's epochs are cut by its consistency group, not by its own ticker.
    grouped: bool,
    /// Answers held for a group cut or trip.
    hold: AnswerHold<HeldAnswer<A>>,
    /// Epoch spans the DR side can only take whole (a catch-up's unit): its group must
    /// never commit an epoch strictly inside one.
    atomic: AtomicSpans,
    hold_times: HoldTimes,
    /// The last cut whose release reached the pair: a cut message for it that comes later
    /// (control calls may overtake each other) holds nothing.
    released: Epoch,
}

impl<P: PayloadLen + Clone, A: Clone> Production<P, A> {
    /// A pair whose DR side holds everything up to `staged`, with a journal of at most
    /// `journal_bytes`; its live writes are tracked until it goes live.
    pub fn new(model: ReplicationModel, journal_bytes: u64, staged: Epoch) -> Self {
        let mut journal = Journal::new(journal_bytes, staged);
        journal.stop_journaling();
        Self {
            model,
            state: PairState::Connecting,
            live: Live::Tracked,
            journal,
            pending: HashMap::new(),
            cut_times: BTreeMap::new(),
            needs_catch_up: false,
            end_stream: None,
            resync_acked: 0,
            sync_done_acked: None,
            stage_full_at_us: None,
            unacked_extent_bytes: 0,
            resync_read_ahead: RESYNC_READ_AHEAD,
            answered_at_us: 0,
            probes: Probes::default(),
            grouped: false,
            hold: AnswerHold::default(),
            atomic: AtomicSpans::default(),
            hold_times: HoldTimes::default(),
            released: Epoch::ZERO,
        }
    }

    /// The machine of a pair that starts in `state` rather than connecting: a restarted
    /// agent's (unconfirmed, paused or demoted, as its membership recorded).
    pub fn starting_in(mut self, state: PairState) -> Self {
        self.state = state;
        self
    }

    // ---- what the machine is ----

    pub fn model(&self) -> ReplicationModel {
        self.model
    }

    pub fn state(&self) -> PairState {
        self.state
    }

    /// What must hold after every event; the shell checks it after each step, and the
    /// simulations after each event. Cheap: no walk over the journal or the pending map.
    pub fn check_invariants(&self) -> Result<(), String> {
        let state = self.state;
        if !state.streaming() {
            if self.live != Live::Tracked {
                return Err(format!(
                    "{state}: live writes go {} with no stream",
                    self.live.as_str()
                ));
            }
            if !self.pending.is_empty() {
                return Err(format!(
                    "{state}: {} frames wait for an answer from a DR side with no stream",
                    self.pending.len()
                ));
            }
        }
        if state == PairState::Live
            && self.live == Live::Tracked
            && !self.needs_catch_up
            && self.end_stream.is_none()
        {
            return Err(
                "live, but its writes are tracked only and neither a catch-up nor the stream's end is asked for"
                    .into(),
            );
        }
        if matches!(state, PairState::Demoted | PairState::Stopped) && self.hold.holding() {
            return Err(format!("{state}, but answers are still held for the group"));
        }
        if self.hold.trip_wanted() && !self.grouped {
            return Err("tripped, but not in a group".into());
        }
        Ok(())
    }

    pub fn live(&self) -> Live {
        self.live
    }

    /// Bytes queued for the DR side and the bound they may reach.
    pub fn journal_fill(&self) -> (u64, u64) {
        (self.journal.queued_bytes(), self.journal.limit())
    }

    pub fn current_epoch(&self) -> Epoch {
        self.journal.current_epoch()
    }

    pub fn staged_epoch(&self) -> Epoch {
        self.journal.staged_epoch()
    }

    /// Whether the journal overflowed since the last catch-up started.
    pub fn needs_catch_up(&self) -> bool {
        self.needs_catch_up
    }

    /// Why the stream must end so that the pair trips with its group, if it must.
    pub fn stream_must_end(&self) -> Option<&'static str> {
        self.end_stream
    }

    /// Sets how many bytes of the open epoch's staged writes wait in the journal for a later
    /// write to the same range to replace them (zero: none wait; the default is a
    /// sixteenth of the journal's bound).
    pub fn set_coalesce_window(&mut self, bytes: u64) {
        self.journal.set_coalesce_window(bytes);
    }

    /// Payload bytes not sent because a later write of the same epoch replaced them.
    pub fn coalesced_bytes(&self) -> u64 {
        self.journal.coalesced_bytes()
    }

    /// Nothing waits for the DR side: no acknowledgement, nothing queued, no catch-up.
    pub fn idle(&self) -> bool {
        self.pending.is_empty() && self.journal.is_empty() && !self.journal.catching_up()
    }

    /// The pair tripped and waits for its group's trip cut.
    pub fn trip_wanted(&self) -> bool {
        self.hold.trip_wanted()
    }

    /// Its direct writes are gated: the DR side holds them until the group is synchronous.
    pub fn gated(&self) -> bool {
        self.journal.gated()
    }

    /// Whether a catch-up runs, or its last unit is not yet staged on the DR side.
    pub fn catching_up(&self) -> bool {
        self.journal.catching_up()
    }

    /// Whether the pair's epochs are cut by its consistency group.
    pub fn grouped(&self) -> bool {
        self.grouped
    }

    /// The spans the DR side can only take whole, for the group's commit.
    pub fn atomic_spans(&self) -> Vec<AtomicSpan> {
        self.atomic.list()
    }

    /// Where the catch-up unit being made began (the DR side had staged that epoch), if
    /// one is: its span is open.
    pub fn unit_in_progress(&self) -> Option<Epoch> {
        self.atomic.in_progress()
    }

    /// How long the group's cuts held this pair's answers.
    pub fn hold_summary(&self) -> HoldSummary {
        let (recent, held) = self.hold_times.snapshot();
        HoldTimes::summary(recent, held)
    }

    /// How long (µs) frames the DR side acknowledges one by one (hypermetro writes, flushes,
    /// direct resync extents) have waited with no answer; `None` when none waits.
    pub fn unanswered_for_us(&self, now_us: u64) -> Option<u64> {
        (!self.pending.is_empty()).then(|| now_us.saturating_sub(self.answered_at_us))
    }

    /// How long ago (µs) the DR side last refused a staged write for want of room in its
    /// stage log, if it did since the pair last went live.
    pub fn stage_full_for_us(&self, now_us: u64) -> Option<u64> {
        self.stage_full_at_us.map(|at| now_us.saturating_sub(at))
    }

    /// Resync bytes acknowledged so far.
    pub fn resync_acked(&self) -> u64 {
        self.resync_acked
    }

    /// Whether the resync reader may queue `bytes` more (what it waits for). Two bounds:
    /// - what is queued and not yet sent, live writes included, stays within the
    ///   read-ahead (or the journal's bound, if smaller), unless all of it is live writes
    ///   held to coalesce (they wait for a fence, and the reader's next initial-sync extent
    ///   is one);
    /// - initial-sync extents sent and not yet acknowledged stay within the journal's bound.
    ///
    /// Each bound lets one extent through when nothing is counted against it, so an extent
    /// larger than a bound still goes, alone.
    pub fn has_room_for(&self, bytes: u64) -> bool {
        let queued = self.journal.queued_bytes();
        let read_ahead = self.resync_read_ahead.min(self.journal.limit());
        let unacked = self.unacked_extent_bytes;
        (queued == 0 || queued + bytes <= read_ahead || self.journal.holds_to_coalesce())
            && (unacked == 0 || unacked + bytes <= self.journal.limit())
    }

    /// Sets how far the resync reader reads ahead of the stream (the simulations vary it;
    /// the agent keeps [`RESYNC_READ_AHEAD`]).
    pub fn set_resync_read_ahead(&mut self, bytes: u64) {
        self.resync_read_ahead = bytes;
    }

    /// Whether a catch-up ending with `end` is settled: the DR side staged `end`, or the
    /// catch-up was given up before its seal was sent (that seal never will be).
    pub fn catch_up_settled(&self, end: Epoch) -> bool {
        self.journal.staged_epoch() >= end || self.journal.mode() == Mode::Bitmap
    }

    /// Whether every resync extent sent direct was acknowledged. Once the stream must end,
    /// extents it dropped are neither pending nor on the DR side: never, until the session
    /// stops the sync.
    pub fn extents_acknowledged(&self) -> bool {
        self.end_stream.is_none()
            && !self
                .pending
                .values()
                .any(|p| matches!(p, Pending::Extent { .. }))
    }

    /// Whether the DR side recorded the end of the initial sync of `epoch` (or a later one).
    pub fn sync_done_acknowledged(&self, epoch: Epoch) -> bool {
        self.sync_done_acked >= Some(epoch)
    }

    // ---- the connection's life ----

    /// The DR side accepted the stream, holding everything up to `staged`; the pair
    /// resyncs if `copying` (an initial sync or a catch-up comes next), else it goes live
    /// at once. Refused unless the pair is connecting (it was paused, demoted or stopped
    /// meanwhile).
    pub fn connected(
        &mut self,
        staged: Epoch,
        copying: bool,
    ) -> Result<Effects<A>, IllegalTransition> {
        let to = if copying {
            PairState::Resyncing
        } else {
            PairState::Live
        };
        // Only from Connecting: a stream accepted while resyncing or live is not this one.
        if self.state != PairState::Connecting {
            return Err(IllegalTransition {
                from: self.state,
                to,
                event: "stream accepted",
            });
        }
        self.state.become_(to, "stream accepted")?;
        self.journal.reconnected(staged);
        self.needs_catch_up = false;
        // A sync's end is acknowledged on the stream that sent it; a new stream starts over.
        self.sync_done_acked = None;
        Ok(match copying {
            true => Effects::default(),
            false => self.go_live(),
        })
    }

    /// The initial sync or the catch-up ended: the DR side holds everything but what live
    /// writes are bringing it.
    /// Refused unless the pair is resyncing (a pause, or the end of the session, came
    /// first: this end belongs to a stream that is gone).
    pub fn resync_done(&mut self) -> Result<(), IllegalTransition> {
        match self.state {
            PairState::Resyncing | PairState::Live => {
                self.state.become_(PairState::Live, "resync done")
            }
            from => Err(IllegalTransition {
                from,
                to: PairState::Live,
                event: "resync done",
            }),
        }
    }

    /// Live writes start flowing: direct in hypermetro, journaled in async.
    /// With no stream (the pair was paused, demoted or stopped while its resync reader
    /// ran), nothing: live writes stay tracked.
    pub fn go_live(&mut self) -> Effects<A> {
        if !self.state.streaming() {
            return Effects::default();
        }
        self.stage_full_at_us = None;
        // Reconnected with nothing to catch up: what the DR side gets next is journaled,
        // epoch by epoch, from the current one.
        let current = self.journal.current_epoch();
        self.atomic.close(current);
        match self.model {
            // A pair of a hypermetro group goes synchronous only with its whole group (a
            // direct cut); until then it journals like an async pair.
            ReplicationModel::Hypermetro if !self.grouped => {
                self.journal.switch_to_direct();
                self.live = Live::Sync;
            }
            _ => {
                self.journal.start_journaling();
                self.live = Live::Journal;
            }
        }
        Effects::woke_sender()
    }

    /// A catch-up starts: live writes are tracked only, extents are staged. Refused
    /// unless a stream is up.
    pub fn begin_catch_up(&mut self) -> Result<(), IllegalTransition> {
        if !self.state.streaming() {
            return Err(IllegalTransition {
                from: self.state,
                to: PairState::Resyncing,
                event: "catch-up",
            });
        }
        self.state = PairState::Resyncing;
        self.open_atomic_span();
        self.journal.begin_catch_up();
        self.live = Live::Tracked;
        self.needs_catch_up = false;
        Ok(())
    }

    /// The catch-up's dirty set is small: live writes are journaled with it. Returns false
    /// if the catch-up was given up (the journal overflowed or the DR side refused a staged
    /// write): the reader stops, and a new catch-up starts from the bitmap.
    #[must_use]
    pub fn begin_final_pass(&mut self) -> bool {
        if !self.state.streaming() {
            return false;
        }
        let going_on = self.journal.begin_final_pass();
        if going_on {
            self.live = Live::Journal;
        }
        going_on
    }

    /// The last extent is queued: returns the epoch whose seal ends the catch-up, or `None`
    /// if the catch-up was given up (nothing is sealed).
    pub fn finish_catch_up(&mut self, wall_ms: u64) -> (Option<Epoch>, Effects<A>) {
        if !self.state.streaming() {
            return (None, Effects::default());
        }
        let cut = !self.grouped;
        let Some(end) = self.journal.finish_catch_up(cut) else {
            return (None, Effects::default());
        };
        if cut {
            self.cut_times.insert(end, wall_ms);
        }
        self.atomic.close(end);
        (Some(end), Effects::woke_sender())
    }

    /// The stream broke: nothing more reaches the DR side until a new one. Writes waiting
    /// for the peer are answered (their blocks stay dirty: rule 1), tickets are forgotten,
    /// and live writes are tracked by the bitmap.
    ///
    /// A synchronous pair of a consistency group *trips* instead: the answers of the writes
    /// that waited, and of every later one, are held until its group's trip cut, so no write
    /// that depends on them is answered before every pair of the group stopped writing its
    /// DR side directly.
    pub fn disconnected(&mut self, now_us: u64) -> Effects<A> {
        let to = if self.state.in_session() {
            PairState::Connecting
        } else {
            self.state
        };
        self.leave_stream(to, "disconnected", now_us)
            .expect("a pair in session can always connect again")
    }

    // ---- the pair's life ----

    /// The coordinator confirmed this side is still production: it connects, or stays
    /// paused if the operator `paused` it. Confirming a confirmed side changes nothing.
    pub fn confirm(&mut self, paused: bool) -> Result<(), IllegalTransition> {
        if self.state != PairState::Unconfirmed {
            return Ok(());
        }
        let to = if paused {
            PairState::Paused
        } else {
            PairState::Connecting
        };
        self.state.become_(to, "confirm")
    }

    /// The operator paused (`group stop`) or resumed (`group sync`) replication. Pausing
    /// ends the stream as a broken link does. An unconfirmed or diverged side learns it
    /// when it is confirmed or resolved; a demoted or stopped one never replicates again.
    pub fn pause(&mut self, paused: bool, now_us: u64) -> Effects<A> {
        match (paused, self.state) {
            (true, PairState::Connecting | PairState::Resyncing | PairState::Live) => self
                .leave_stream(PairState::Paused, "pause", now_us)
                .expect("a pair in session can pause"),
            (false, PairState::Paused) => {
                self.state
                    .become_(PairState::Connecting, "resume")
                    .expect("a paused pair can resume");
                Effects::default()
            }
            _ => Effects::default(),
        }
    }

    /// The DR side refused the stream: the sides hold different data.
    pub fn diverged(&mut self) -> Result<(), IllegalTransition> {
        self.state.become_(PairState::Diverged, "diverged")
    }

    /// The operator resolved a divergence: the pair connects again, or stays paused.
    pub fn resolved(&mut self, paused: bool) -> Result<(), IllegalTransition> {
        if self.state != PairState::Diverged {
            return Ok(());
        }
        let to = if paused {
            PairState::Paused
        } else {
            PairState::Connecting
        };
        self.state.become_(to, "resolved")
    }

    /// The pair's group failed over: this side is production no more. The stream ends, and
    /// the answers a trip held are returned to be failed: their writes are on this volume
    /// only, which the group left; acknowledging them would be acknowledging writes the
    /// group lost.
    pub fn demote(&mut self, now_us: u64) -> (Vec<(AnswerToken, A)>, Effects<A>) {
        match self.leave_stream(PairState::Demoted, "demote", now_us) {
            Ok(fx) => (self.fail_held(), fx),
            Err(_) => (Vec::new(), Effects::default()),
        }
    }

    /// The pair is removed, switches to the DR side, or its agent stops: nothing more is
    /// sent. The answers its group held are returned, since nothing would release them now:
    /// the shell gives them if the pair is deleted (nothing depends on its DR side any
    /// more) and fails them otherwise (the DR side is still the group's image, as for a
    /// demote).
    pub fn stop(&mut self, now_us: u64) -> (Vec<(AnswerToken, A)>, Effects<A>) {
        let fx = self
            .leave_stream(PairState::Stopped, "stop", now_us)
            .expect("anything may stop");
        (self.fail_held(), fx)
    }

    /// Moves to `to`, a state with no stream, as when the link breaks (see
    /// [`Production::disconnected`]).
    fn leave_stream(
        &mut self,
        to: PairState,
        event: &'static str,
        now_us: u64,
    ) -> Result<Effects<A>, IllegalTransition> {
        debug_assert!(!to.streaming());
        self.state.become_(to, event)?;
        self.end_stream = None;
        let mut fx = Effects::default();
        self.cut_off(now_us, &mut fx);
        Ok(fx)
    }

    /// Copy the dirty blocks again (a verify's repair marked them): starts a catch-up.
    pub fn request_catch_up(&mut self, now_us: u64) -> Effects<A> {
        let mut fx = Effects::default();
        if self.synchronous_in_a_group() {
            self.end_stream_to_trip("blocks must be copied again", now_us, &mut fx);
            return fx;
        }
        self.open_atomic_span();
        self.needs_catch_up = true;
        fx
    }

    // ---- the group ----

    /// A production agent starts with its pair in a consistency group, whose last cut it
    /// recorded switching to is `to`: it admits in `to` (never in an epoch the group left),
    /// and holds its answers as for that cut, whose round may still be running while
    /// another host admits in the epoch before (`AnswerHold::restarted`).
    /// A demoted side holds nothing: its group failed over without it.
    pub fn start_in_group(&mut self, to: Epoch, now_us: u64) {
        self.grouped = true;
        if self.state == PairState::Demoted {
            return;
        }
        self.journal.advance_epoch_to(to);
        self.hold = AnswerHold::restarted(to, now_us / 1000);
    }

    /// A side its group's failover promoted: it admits after the commit it was rolled to,
    /// and holds no answer. The group is not cut again before its reprotect (the coordinator
    /// starts its cuts only then), so no round runs whose release an answer would wait for.
    pub fn promoted_in_group(&mut self, to: Epoch) {
        self.grouped = true;
        self.journal.advance_epoch_to(to);
    }

    /// A production agent that starts with its pair in a hypermetro group starts tripped:
    /// the others may still write their DR sides directly, and this pair's writes are only
    /// tracked until it catches up.
    pub fn start_tripped(&mut self, now_us: u64) {
        self.grouped = true;
        if self.state == PairState::Demoted {
            return;
        }
        self.hold.trip(now_us / 1000, []);
    }

    /// The periodic cut: new writes go to the next epoch.
    pub fn advance_epoch(&mut self, wall_ms: u64) -> Effects<A> {
        let cut = self.journal.current_epoch();
        self.cut_times.insert(cut, wall_ms);
        self.journal.advance_epoch();
        Effects::woke_sender()
    }

    /// A restarted agent whose pair was making a catch-up unit after `from` (as its record
    /// says): the unit's span is reported open again, until a catch-up ends it or the pair
    /// goes live; its end may be staged already, before any cut ack said where it ended.
    pub fn resume_unit(&mut self, from: Epoch) {
        self.atomic.open(from);
    }

    /// Puts the pair under its group's cuts, or back under its own ticker (answers still
    /// held are given).
    pub fn set_grouped(&mut self, grouped: bool) -> Effects<A> {
        self.grouped = grouped;
        let mut fx = Effects::default();
        if !grouped {
            give(&mut fx, self.hold.give_all());
        }
        fx
    }

    /// The group's cut to `to`: answers of writes that complete from now on are held until
    /// the release, and admissions take epoch `to`; `mode` may also switch a hypermetro pair
    /// between synchronous and journaled. Returns the last epoch the DR side staged, for the
    /// coordinator's commit, and whether the pair is synchronous now. `cut_ms`: when the
    /// cut happened (wall time, the same for every pair of the agent).
    pub fn group_cut(
        &mut self,
        to: Epoch,
        mode: CutMode,
        cut_ms: u64,
        now_us: u64,
    ) -> ((Epoch, bool), Effects<A>) {
        self.grouped = true;
        let current = self.journal.current_epoch();
        let switched = to > current;
        if switched {
            self.cut_times.insert(current, cut_ms);
            self.journal.advance_epoch_to(to);
        }
        match mode {
            CutMode::Trip if self.live == Live::Sync => {
                // Gated writes already sent stay held on the DR side: unanswered, they time
                // out and the pair trips again.
                self.journal.set_gated(false);
                self.live = Live::Journal;
            }
            // Only at a cut it switched at: a cut to an epoch it passed already (a late
            // message, a coordinator that lost track of the epochs) does not start the
            // group's way back, whose `Ungate` would name an epoch already applied.
            CutMode::Direct
                if switched && self.live == Live::Journal && !self.journal.catching_up() =>
            {
                self.journal.switch_to_direct();
                self.journal.set_gated(true);
                self.live = Live::Sync;
            }
            _ => {}
        }
        // A side the group left, or a stopped pair, holds nothing for it. A pair that
        // admits in `to` already holds as if it switched now: it went synchronous at the
        // last direct cut, which left it one epoch past that cut; a write it journals in `to`
        // must not be answered while another host still admits in the epoch before.
        if !matches!(self.state, PairState::Demoted | PairState::Stopped) {
            let at_it = to == current && to > self.released;
            self.hold.on_cut(to, mode, switched || at_it, now_us / 1000);
        }
        let answer = (
            self.journal.staged_epoch(),
            self.live == Live::Sync && self.model == ReplicationModel::Hypermetro,
        );
        (answer, Effects::woke_sender())
    }

    /// The group's release of the cut to `to`: the held answers are given. A pair that
    /// missed the cut switches now. A trip hold is given only if the round `tripped` (and the
    /// trip cut reached it). If it went `synchronous` (a direct cut every host switched at),
    /// the DR side may write the gated writes once it applied epoch `to`.
    pub fn group_release(
        &mut self,
        to: Epoch,
        outcome: RoundOutcome,
        cut_ms: u64,
        now_us: u64,
    ) -> Effects<A> {
        let current = self.journal.current_epoch();
        if to > current {
            self.cut_times.insert(current, cut_ms);
            self.journal.advance_epoch_to(to);
        }
        self.released = self.released.max(to);
        if outcome.synchronous && self.live == Live::Sync && self.journal.gated() {
            self.journal.ungate(to);
        }
        let held = self.hold.on_release(to, outcome);
        self.hold_times
            .record(held.iter().map(|(_, _, at)| *at), now_us);
        let mut fx = Effects::woke_sender();
        give(&mut fx, held);
        fx
    }

    /// The pair's volume is no longer production (its group failed over): the answers a
    /// trip held, to be failed. Their writes are on this volume only, which the group left:
    /// acknowledging them would be acknowledging writes the group lost.
    fn fail_held(&mut self) -> Vec<(AnswerToken, A)> {
        self.hold
            .give_all()
            .into_iter()
            .map(|(token, to, _)| (token, to))
            .collect()
    }

    /// Gives the answers held longer than `timeout_ms` (the coordinator is away): the
    /// coordinator never commits a cut it did not release itself.
    pub fn release_held_longer_than(&mut self, timeout_ms: u64, now_us: u64) -> Effects<A> {
        let held = self.hold.expire(now_us / 1000, timeout_ms);
        self.hold_times
            .record(held.iter().map(|(_, _, at)| *at), now_us);
        let mut fx = Effects::default();
        give(&mut fx, held);
        fx
    }

    // ---- the write path ----

    /// A write was admitted (blocks locked, bits set), in admission order: how it is
    /// replicated.
    pub fn admit(&mut self, range: ByteRange) -> ReplicaMode {
        if !self.probes.is_empty() {
            self.probes.spoil(range);
        }
        match self.live {
            Live::Tracked if self.model == ReplicationModel::Hypermetro => ReplicaMode::Tracked,
            Live::Sync => ReplicaMode::Sync,
            // Async (and hypermetro's final pass): every write counts in its epoch, so the
            // epoch is not sealed before it completes, journaled or not.
            Live::Tracked | Live::Journal => ReplicaMode::Journal(self.journal.admit()),
        }
    }

    /// Queues a hypermetro write's frame (when its local write starts), unless the link went
    /// down since its admission or there is nothing to send: returns its frame's key if
    /// the peer will answer it (the answer goes `to`), and forgets its ticket otherwise.
    pub fn send_direct(
        &mut self,
        write: &mut LocalWrite<P>,
        to: &A,
        now_us: u64,
    ) -> (Option<WriteSeq>, Effects<A>) {
        let mut fx = Effects::default();
        let payload = match &write.payload {
            Some(payload) if self.live == Live::Sync => payload.clone(),
            // Journaling since its admission: `local_done` journals it, with its ticket.
            Some(_) if self.live == Live::Journal && write.mode == ReplicaMode::Sync => {
                return (None, fx);
            }
            _ => {
                fx.forget.extend(write.ticket.take());
                return (None, fx);
            }
        };
        let was_idle = self.journal.nothing_to_send();
        let seq = self
            .journal
            .push_direct(write.range, payload.clone(), write.fua);
        self.await_ack(
            seq,
            Pending::Write {
                ticket: write.ticket.take(),
                token: write.token,
                to: to.clone(),
                local_failed: false,
                range: write.range,
                payload,
                fua: write.fua,
            },
            now_us,
        );
        fx.wake_sender = was_idle && !self.journal.nothing_to_send();
        write.sent = Some(seq);
        (Some(seq), fx)
    }

    /// The local write succeeded: its data is journaled (async), or its answer waits for the
    /// peer (hypermetro), or a group's cut or trip holds it.
    pub fn local_done(
        &mut self,
        mut write: LocalWrite<P>,
        to: &A,
        now_us: u64,
    ) -> (AfterLocal, Effects<A>) {
        match write.mode {
            ReplicaMode::Tracked => (
                self.answer_or_hold(write.token, to, now_us),
                Effects::default(),
            ),
            ReplicaMode::Sync if write.sent.is_some() => {
                (AfterLocal::WaitForPeer, Effects::default())
            }
            ReplicaMode::Sync if self.live == Live::Journal => {
                // The pair journals since the write's admission (its group's trip cut, or a
                // catch-up's final pass, came while a slow-path write waited to start): it
                // is journaled in the epoch it ends in, as if admitted now. Only tracked, it
                // would be answered with its data on no stream while the writes that depend
                // on it are journaled and committed.
                write.mode = ReplicaMode::Journal(self.journal.admit());
                self.local_done(write, to, now_us)
            }
            ReplicaMode::Sync => {
                let (sent, fx) = self.send_direct(&mut write, to, now_us);
                if sent.is_some() {
                    (AfterLocal::WaitForPeer, fx)
                } else {
                    // The link went down since its admission (a slow-path write, or one
                    // parked while the activity log synced): a trip holds it like any other.
                    (self.answer_or_hold(write.token, to, now_us), fx)
                }
            }
            ReplicaMode::Journal(admitted) => {
                let mut fx = Effects::default();
                let was_idle = self.journal.nothing_to_send();
                let completed = match write.payload {
                    Some(payload) => {
                        self.journal
                            .complete(admitted, write.range, payload, write.ticket)
                    }
                    None => {
                        self.journal.abandon(admitted);
                        Completed::NotJournaled
                    }
                };
                match completed {
                    Completed::Queued => {}
                    Completed::NotJournaled => fx.forget.extend(write.ticket),
                    Completed::Overflowed { forget } => {
                        fx.overflowed = true;
                        fx.forget.extend(forget);
                        if self.synchronous_in_a_group() {
                            self.end_stream_to_trip("the journal overflowed", now_us, &mut fx);
                        } else {
                            self.fall_back_to_the_bitmap();
                        }
                    }
                }
                // The sender drains everything once woken: only the first frame after it
                // went idle needs to wake it.
                fx.wake_sender = was_idle && !self.journal.nothing_to_send();
                // Decided in the same step: a cut either came before (held) or after.
                (self.answer_or_hold(write.token, to, now_us), fx)
            }
        }
    }

    /// The local write failed: nothing goes to the peer, the blocks stay dirty (and a
    /// catch-up is needed). If its data was already sent, or a group holds answers, its
    /// answer comes later.
    pub fn local_failed(
        &mut self,
        write: LocalWrite<P>,
        to: &A,
        now_us: u64,
    ) -> (AfterLocal, Effects<A>) {
        let mut fx = Effects::default();
        match (write.mode, write.sent) {
            (ReplicaMode::Sync, Some(seq)) => {
                // The DR side has the data; this side's blocks hold whatever the failed
                // write left. They stay dirty (the peer's answer forgets the ticket), and a
                // catch-up makes the two the same again.
                let answered = match self.pending.get_mut(&seq) {
                    Some(Pending::Write { local_failed, .. }) => {
                        *local_failed = true;
                        false
                    }
                    _ => true,
                };
                self.catch_up_failed_write(now_us, &mut fx);
                // If the peer's answer came first, it cleared them.
                if answered {
                    fx.mark_dirty = Some(write.range);
                }
                (AfterLocal::WaitForPeer, fx)
            }
            (mode, _) => {
                if let ReplicaMode::Journal(admitted) = mode {
                    self.journal.abandon(admitted);
                }
                fx.forget.extend(write.ticket);
                self.catch_up_failed_write(now_us, &mut fx);
                (self.answer_or_hold(write.token, to, now_us), fx)
            }
        }
    }

    /// A FLUSH: a synchronous pair's waits for the peer's flush too (its answer goes `to`).
    pub fn flush(&mut self, token: AnswerToken, to: &A, now_us: u64) -> (AfterLocal, Effects<A>) {
        if self.live != Live::Sync {
            return (AfterLocal::Answer, Effects::default());
        }
        let seq = self.journal.push_flush();
        self.await_ack(
            seq,
            Pending::Flush {
                token,
                to: to.clone(),
            },
            now_us,
        );
        (AfterLocal::WaitForPeer, Effects::woke_sender())
    }

    // ---- the sender ----

    /// Takes up to `max_bytes` of frames to send, in order (`poll_transmit`).
    pub fn take_frames(&mut self, max_bytes: u64, out: &mut Vec<Transmit<P>>) -> Effects<A> {
        let mut bytes = 0;
        while bytes < max_bytes {
            let Some(frame) = self.journal.poll_send() else {
                break;
            };
            let frame = match frame {
                Outgoing::Seal { epoch } => {
                    let cut_ms = self.cut_times.get(&epoch).copied().unwrap_or(0);
                    // Older cut times are no longer needed.
                    self.cut_times = self.cut_times.split_off(&epoch);
                    Transmit::Seal { epoch, cut_ms }
                }
                Outgoing::Write(write) => {
                    bytes += payload_len(&write.payload) + FRAME_HEADER_BYTES;
                    Transmit::Write(write)
                }
                Outgoing::Ungate { epoch } => Transmit::Ungate { epoch },
                Outgoing::Flush { seq } => Transmit::Flush { seq },
                Outgoing::Discard { after } => Transmit::Discard { after },
                Outgoing::SyncDone { epoch } => Transmit::SyncDone { epoch },
                Outgoing::Digest {
                    offset,
                    crcs,
                    after,
                } => Transmit::Digest {
                    offset,
                    after,
                    crcs,
                },
                Outgoing::Verify { id, after } => match self.probes.get(id) {
                    Some(probe) => Transmit::Verify {
                        id,
                        offset: probe.range.offset,
                        after,
                        crcs: probe.crcs.clone(),
                    },
                    None => continue,
                },
            };
            out.push(frame);
        }
        Effects::notified()
    }

    // ---- the DR side's answers ----

    /// A direct write or a flush was acknowledged (the shells take them in runs:
    /// [`Production::handle_acks`]).
    #[cfg(test)]
    pub fn handle_ack(&mut self, seq: WriteSeq, now_us: u64) -> Effects<A> {
        self.handle_acks(&[seq], now_us)
    }

    /// Direct writes and flushes were acknowledged together (the DR side answers a sync's
    /// writes at once): one step, so the shell gives their answers with one wake-up.
    pub fn handle_acks(&mut self, seqs: &[WriteSeq], now_us: u64) -> Effects<A> {
        self.answered_at_us = now_us;
        let mut fx = Effects::default();
        for &seq in seqs {
            self.take_ack(seq, &mut fx);
        }
        fx
    }

    fn take_ack(&mut self, seq: WriteSeq, fx: &mut Effects<A>) {
        match self.pending.remove(&seq) {
            Some(Pending::Write {
                ticket,
                token,
                to,
                local_failed,
                ..
            }) => {
                if local_failed {
                    fx.forget.extend(ticket);
                } else {
                    fx.redeem.extend(ticket);
                }
                fx.answers.push((token, to));
            }
            Some(Pending::Flush { token, to }) => fx.answers.push((token, to)),
            Some(Pending::Extent {
                ticket,
                range,
                payload,
            }) => {
                fx.redeem.push(ticket);
                self.resync_acked += range.len;
                self.unacked_extent_bytes -= payload_len(&payload);
                fx.notify = true;
            }
            // An acknowledgement of nothing pending (of a frame sent again, say).
            None => {}
        }
    }

    /// The DR side synced every epoch ≤ `epoch` into its stage log.
    pub fn handle_staged(&mut self, epoch: Epoch, now_us: u64) -> Effects<A> {
        self.answered_at_us = now_us;
        let mut fx = Effects::notified();
        fx.redeem = SmallVec::from_vec(self.journal.handle_staged(epoch));
        fx
    }

    /// The DR side rejected a frame: its CRC failed on the way (a direct one is sent again;
    /// a staged one spoils its unit, so the pair falls back to a catch-up), or its stage log
    /// is at its cap (the pair falls back to the bitmap, and catches up once there is room).
    pub fn handle_reject(
        &mut self,
        seq: WriteSeq,
        reason: RejectReason,
        now_us: u64,
    ) -> Effects<A> {
        let mut fx = Effects::woke_sender();
        if reason == RejectReason::StageFull {
            fx.stage_full_began = self.stage_full_at_us.is_none();
            self.stage_full_at_us = Some(now_us);
        } else {
            fx.corrupted_in_transit = true;
        }
        match self.pending.remove(&seq) {
            // A direct frame: sent again, under a new sequence number (a flush carries no
            // data and waits on).
            Some(pending) => {
                let again = match pending.data() {
                    Some((range, payload, fua)) => {
                        self.journal.push_direct(range, payload.clone(), fua)
                    }
                    None => seq,
                };
                self.await_ack(again, pending, now_us);
            }
            None => {
                // A staged write: its epoch cannot be applied whole, nor any later one (the
                // DR side drops their writes and seals until the Discard this queues). Start
                // over from the bitmap.
                if self.synchronous_in_a_group() {
                    fx.wake_sender = false;
                    self.end_stream_to_trip("the DR side refused a staged write", now_us, &mut fx);
                    return fx;
                }
                fx.forget.extend(self.journal.spoiled());
                self.fall_back_to_the_bitmap();
            }
        }
        fx
    }

    /// The DR side recorded the end of the initial sync of `epoch` durably.
    pub fn handle_sync_done_ack(&mut self, epoch: Epoch, now_us: u64) -> Effects<A> {
        self.answered_at_us = now_us;
        self.sync_done_acked = self.sync_done_acked.max(Some(epoch));
        Effects::notified()
    }

    // ---- digests for points in time ----

    /// Production digests each sealed epoch's blocks (the group keeps points), or not.
    pub fn set_digests(&mut self, on: bool) {
        self.journal.set_digests(on);
    }

    /// Whether sealed epochs' blocks wait to be digested.
    pub fn digests_due(&self) -> bool {
        self.journal.digests_due()
    }

    /// The ranges due to be read (each with its blocks locked) and digested, clipped to a
    /// volume of `size` bytes, and the round they belong to.
    pub fn take_digests_due(&mut self, size: u64) -> (u64, Vec<ByteRange>) {
        self.journal.take_digests_due(size)
    }

    /// Queues production's CRCs of the blocks from `offset`, read in `round` with the blocks
    /// locked; dropped unless the journal stayed in journal mode since the round began.
    pub fn push_digest(&mut self, round: u64, offset: u64, crcs: Vec<u32>) -> Effects<A> {
        if self.live != Live::Journal || !self.journal.push_digest(round, offset, crcs) {
            return Effects::default();
        }
        Effects::woke_sender()
    }

    // ---- online verify ----

    /// Queues verify probe `id` behind everything queued so far. Returns false if nothing
    /// reaches the DR side now (no stream, or bitmap mode).
    pub fn push_verify(&mut self, id: ProbeId, probe: Probe) -> (bool, Effects<A>) {
        let epochs = match self.live {
            Live::Tracked => return (false, Effects::default()),
            Live::Sync => false,
            Live::Journal => true,
        };
        if !self.journal.push_verify(id, epochs) {
            return (false, Effects::default());
        }
        self.probes.insert(id, probe);
        (true, Effects::woke_sender())
    }

    /// The DR side compared probe `id`: these blocks differ there.
    pub fn handle_verified(&mut self, id: ProbeId, differing: &[u16], now_us: u64) -> Effects<A> {
        self.answered_at_us = now_us;
        self.probes.answer(id, differing);
        Effects::notified()
    }

    /// The probes answered (or lost) so far.
    pub fn take_verify_results(&mut self) -> Vec<(ProbeId, ProbeResult)> {
        self.probes.take_done()
    }

    // ---- the resync reader ----

    /// Queues an extent read for an initial sync: written direct on the DR side. With no
    /// stream (the reader has not stopped yet), dropped: its blocks stay dirty.
    pub fn push_sync_extent(
        &mut self,
        range: ByteRange,
        payload: Payload<P>,
        ticket: Ticket,
        now_us: u64,
    ) -> Effects<A> {
        if !self.state.streaming() {
            let mut fx = Effects::default();
            fx.forget.push(ticket);
            return fx;
        }
        self.unacked_extent_bytes += payload_len(&payload);
        let seq = self.journal.push_direct(range, payload.clone(), false);
        self.await_ack(
            seq,
            Pending::Extent {
                ticket,
                range,
                payload,
            },
            now_us,
        );
        Effects::woke_sender()
    }

    /// Admits a catch-up extent about to be read (its epoch is taken now, with its blocks
    /// locked).
    pub fn admit_catch_up_extent(&mut self) -> Admitted {
        self.journal.admit()
    }

    /// Queues a catch-up extent: staged on the DR side until the catch-up's seal. Returns
    /// false if the catch-up was given up: the extent is dropped (its blocks stay dirty),
    /// and the reader stops.
    pub fn push_catch_up_extent(
        &mut self,
        admitted: Admitted,
        range: ByteRange,
        payload: Payload<P>,
        ticket: Ticket,
    ) -> (bool, Effects<A>) {
        let mut fx = Effects::default();
        if !self.state.streaming() {
            self.journal.abandon(admitted);
            fx.forget.push(ticket);
            return (false, fx);
        }
        match self
            .journal
            .complete_resync(admitted, range, payload, ticket)
        {
            Completed::Queued => {
                fx.wake_sender = true;
                (true, fx)
            }
            Completed::NotJournaled => {
                fx.forget.push(ticket);
                (false, fx)
            }
            Completed::Overflowed { forget } => {
                // Live writes are journaled only in the final pass, as an async pair's
                // are: never synchronous here, so the pair falls back to the bitmap.
                fx.overflowed = true;
                fx.forget.extend(forget);
                self.fall_back_to_the_bitmap();
                // The Discard goes out now.
                fx.wake_sender = true;
                (false, fx)
            }
        }
    }

    /// A catch-up extent admitted but not read (the read failed): it leaves its epoch
    /// without data, and its blocks stay dirty.
    pub fn abandon_catch_up_extent(&mut self, admitted: Admitted) {
        self.journal.abandon(admitted);
    }

    /// Queues the end of an initial sync.
    pub fn push_sync_done(&mut self) -> (Epoch, Effects<A>) {
        if !self.state.streaming() {
            // Never acknowledged: the reader stops with its session.
            return (self.journal.current_epoch(), Effects::default());
        }
        let direct = self.live == Live::Sync;
        (self.journal.push_sync_done(direct), Effects::woke_sender())
    }

    pub fn reset_resync_progress(&mut self) {
        self.resync_acked = 0;
    }

    // ---- the steps the events share ----

    /// `seq` waits for the DR side's acknowledgement.
    fn await_ack(&mut self, seq: WriteSeq, pending: Pending<P, A>, now_us: u64) {
        if self.pending.is_empty() {
            self.answered_at_us = now_us;
        }
        self.pending.insert(seq, pending);
    }

    /// Holds `token`'s answer if a group cut or trip holds answers; else it is answered now.
    fn answer_or_hold(&mut self, token: AnswerToken, to: &A, now_us: u64) -> AfterLocal {
        if !self.hold.holding() {
            return AfterLocal::Answer;
        }
        let held = self.hold.hold_or_give((token, to.clone(), now_us));
        debug_assert!(held.is_none(), "checked that answers are held");
        AfterLocal::WaitForPeer
    }

    /// Live writes leave the journal (link down, overflow, a catch-up starts): what the DR
    /// side gets next is a catch-up unit from the last epoch it staged.
    fn open_atomic_span(&mut self) {
        let staged = self.journal.staged_epoch();
        self.atomic.open(staged);
    }

    /// A write failed locally: its blocks stay dirty, and nothing sends them but a
    /// catch-up (what the device holds there now is what the DR side must get).
    fn catch_up_failed_write(&mut self, now_us: u64, fx: &mut Effects<A>) {
        match self.live {
            Live::Tracked => {}
            Live::Sync if self.grouped => {
                self.end_stream_to_trip("a write failed here", now_us, fx);
            }
            _ => self.needs_catch_up = true,
        }
    }

    /// Live writes stop reaching the DR side (its stage log refused one, the journal
    /// overflowed): they are tracked in the bitmap until a catch-up, which this asks for.
    fn fall_back_to_the_bitmap(&mut self) {
        self.open_atomic_span();
        self.live = Live::Tracked;
        self.needs_catch_up = true;
        self.probes.lose_all();
    }

    /// Writes of this pair go to its DR side directly, as the group's other pairs' do.
    fn synchronous_in_a_group(&self) -> bool {
        self.live == Live::Sync && self.grouped
    }

    /// A synchronous pair of a group cannot fall back to the bitmap on its own: writes
    /// answered while tracked here could have dependants that reach another pair's DR side
    /// directly first. It leaves as when its link breaks, at once: it trips (every write
    /// still waiting for the DR side, and every later one, is answered at the group's trip
    /// cut), and its stream ends (`why`, for the log) so that the next one catches up.
    fn end_stream_to_trip(&mut self, why: &'static str, now_us: u64, fx: &mut Effects<A>) {
        self.end_stream.get_or_insert(why);
        self.cut_off(now_us, fx);
    }

    /// Nothing more reaches the DR side on this stream (see [`Production::disconnected`]).
    fn cut_off(&mut self, now_us: u64, fx: &mut Effects<A>) {
        // A trip not yet released holds what waited for the DR side too. So does a grouped
        // pair's direct write still waiting (a trip cut made the pair journal while its
        // gated writes waited on the DR side for an Ungate that will not come): answered
        // now, with its data on no DR volume, its dependants could be journaled and
        // committed before it.
        let direct_waiting = self.grouped
            && self
                .pending
                .values()
                .any(|p| matches!(p, Pending::Write { .. } | Pending::Flush { .. }));
        let trip = self.synchronous_in_a_group() || self.hold.trip_wanted() || direct_waiting;
        if self.live != Live::Sync || trip {
            self.open_atomic_span();
        }
        self.live = Live::Tracked;
        self.probes.lose_all();
        fx.forget.extend(self.journal.disconnect());
        self.unacked_extent_bytes = 0;
        let mut answers = Vec::new();
        for (_, p) in std::mem::take(&mut self.pending) {
            match p {
                Pending::Write {
                    ticket, token, to, ..
                } => {
                    fx.forget.extend(ticket);
                    answers.push((token, to, now_us));
                }
                Pending::Flush { token, to } => answers.push((token, to, now_us)),
                Pending::Extent { ticket, .. } => fx.forget.push(ticket),
            }
        }
        // Tripping again with nothing new to hold would forget a trip cut that reached it.
        if trip && (!self.hold.trip_wanted() || !answers.is_empty()) {
            self.hold.trip(now_us / 1000, answers.drain(..));
        }
        give(fx, answers);
        fx.notify = true;
    }
}

/// Adds held answers to the answers to give.
fn give<A>(fx: &mut Effects<A>, held: Vec<HeldAnswer<A>>) {
    fx.answers
        .extend(held.into_iter().map(|(token, to, _)| (token, to)));
}

fn payload_len<P: PayloadLen>(payload: &Payload<P>) -> u64 {
    match payload {
        Payload::Data(d) => d.payload_len(),
        Payload::Zeroes => 0,
    }
}

#[cfg(test)]
mod tests {
    //! The machine driven directly: each event's effects are what the shell would do.

    use super::*;
    use crate::replication::TicketRegistry;

    /// Answers go to a connection named by a number.
    type Machine = Production<Vec<u8>, u32>;

    const CONNECTION: u32 = 7;

    fn live(model: ReplicationModel) -> Machine {
        let mut m = Machine::new(model, 1 << 20, Epoch(1));
        assert!(m.connected(Epoch(1), false).unwrap().wake_sender);
        m
    }

    /// Admits a 4 KiB write at `offset`, with a ticket if it wants one.
    fn admit(
        m: &mut Machine,
        tickets: &mut TicketRegistry,
        offset: u64,
        token: u64,
    ) -> LocalWrite<Vec<u8>> {
        let range = ByteRange::new(offset, 4096);
        let mode = m.admit(range);
        LocalWrite {
            range,
            payload: Some(Payload::Data(vec![token as u8; 4096])),
            fua: false,
            token: AnswerToken(token),
            mode,
            ticket: mode.wants_ticket().then(|| tickets.issue(range)),
            sent: None,
        }
    }

    fn answered(fx: &Effects<u32>) -> Vec<u64> {
        fx.answers.iter().map(|(t, _)| t.0).collect()
    }

    #[test]
    fn a_synchronous_write_is_answered_with_its_acknowledgement_and_its_ticket_redeemed() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        assert_eq!(w.mode, ReplicaMode::Sync);
        let ticket = w.ticket.unwrap();
        let (seq, fx) = m.send_direct(&mut w, &CONNECTION, 10);
        let seq = seq.expect("live: the frame is queued");
        assert!(fx.forget.is_empty());
        let (after, fx) = m.local_done(w, &CONNECTION, 20);
        assert_eq!(after, AfterLocal::WaitForPeer);
        assert!(fx.answers.is_empty());
        assert_eq!(
            m.unanswered_for_us(30),
            Some(20),
            "waiting since it was queued"
        );

        let fx = m.handle_ack(seq, 40);
        assert_eq!(answered(&fx), [1]);
        assert_eq!(fx.redeem.as_slice(), [ticket]);
        assert!(fx.forget.is_empty());
        assert_eq!(m.unanswered_for_us(50), None);
    }

    /// Acknowledgements taken together (`handle_acks`) do what the same ones taken one at a
    /// time, in order, do: the same answers in the same order, the same tickets redeemed or
    /// forgotten, and the same machine afterwards. Among them: a write that failed here, one
    /// acknowledged twice, one still awaited and a sequence number never sent.
    #[test]
    fn acknowledgements_taken_together_do_what_they_do_one_at_a_time() {
        let prepare = || {
            let mut tickets = TicketRegistry::new();
            let mut m = live(ReplicationModel::Hypermetro);
            let mut seqs = Vec::new();
            for token in 1..=6u64 {
                let mut w = admit(&mut m, &mut tickets, token * 4096, token);
                let (seq, _) = m.send_direct(&mut w, &CONNECTION, 0);
                seqs.push(seq.unwrap());
                if token == 3 {
                    let _ = m.local_failed(w, &CONNECTION, 0);
                } else {
                    let _ = m.local_done(w, &CONNECTION, 0);
                }
            }
            (m, seqs)
        };
        let (mut together, seqs) = prepare();
        let (mut alone, _) = prepare();
        // All but the last, the second twice, and one never sent.
        let acks = [
            seqs[0],
            seqs[1],
            seqs[2],
            seqs[1],
            WriteSeq(seqs[5].0 + 100),
            seqs[3],
            seqs[4],
        ];
        let fx = together.handle_acks(&acks, 50);
        let mut each: Effects<u32> = Effects::default();
        for &seq in &acks {
            let one = alone.handle_ack(seq, 50);
            each.answers.extend(one.answers);
            each.redeem.extend(one.redeem);
            each.forget.extend(one.forget);
            each.notify |= one.notify;
        }
        assert_eq!(answered(&fx), [1, 2, 3, 4, 5]);
        assert_eq!(answered(&fx), answered(&each));
        assert_eq!(fx.redeem, each.redeem);
        assert_eq!(fx.forget, each.forget);
        assert_eq!(fx.forget.len(), 1, "the write that failed here");
        assert_eq!(fx.notify, each.notify);
        assert!(together.check_invariants().is_ok());
        assert_eq!(together.unanswered_for_us(60), alone.unanswered_for_us(60));
        assert!(
            together.unanswered_for_us(60).is_some(),
            "the sixth still waits"
        );
        assert_eq!(answered(&together.handle_ack(seqs[5], 70)), [6]);
    }

    /// What the resync reader reads: an initial sync's extents or a catch-up's.
    #[derive(Clone, Copy, Debug)]
    enum Reading {
        Sync,
        CatchUp,
    }

    /// A pair with a `journal_bytes` journal whose resync reader is about to read.
    fn resyncing(reading: Reading, journal_bytes: u64) -> Machine {
        let mut m = Machine::new(ReplicationModel::Async, journal_bytes, Epoch(1));
        match reading {
            Reading::Sync => {
                let _ = m.connected(Epoch(1), true).unwrap();
            }
            Reading::CatchUp => {
                let _ = m.connected(Epoch(1), false).unwrap();
                m.begin_catch_up().unwrap();
            }
        }
        m
    }

    /// Queues 4 MiB extents from `offset` while the reader would find room; returns where
    /// it stopped.
    fn read_ahead(
        m: &mut Machine,
        reading: Reading,
        tickets: &mut TicketRegistry,
        mut offset: u64,
    ) -> u64 {
        const EXTENT: u64 = 4 << 20;
        while m.has_room_for(EXTENT) {
            let range = ByteRange::new(offset, EXTENT);
            let payload = Payload::Data(vec![0; EXTENT as usize]);
            let ticket = tickets.issue(range);
            match reading {
                Reading::Sync => {
                    let fx = m.push_sync_extent(range, payload, ticket, 0);
                    assert!(fx.forget.is_empty(), "streaming: the extent is queued");
                }
                Reading::CatchUp => {
                    let admitted = m.admit_catch_up_extent();
                    let (queued, _) = m.push_catch_up_extent(admitted, range, payload, ticket);
                    assert!(queued, "catching up: the extent is queued");
                }
            }
            offset += EXTENT;
        }
        offset
    }

    /// However large the journal, the resync reader keeps only [`RESYNC_READ_AHEAD`] queued
    /// ahead of the stream; room comes back as frames are sent, before any is acknowledged.
    #[test]
    fn a_resync_reads_ahead_of_the_stream_by_its_read_ahead_not_the_whole_journal() {
        for reading in [Reading::Sync, Reading::CatchUp] {
            let mut tickets = TicketRegistry::new();
            let mut m = resyncing(reading, 1 << 30);
            let queued = read_ahead(&mut m, reading, &mut tickets, 0);
            assert_eq!(queued, RESYNC_READ_AHEAD, "{reading:?}");
            let mut frames = Vec::new();
            let _ = m.take_frames(u64::MAX, &mut frames);
            assert_eq!(
                frames.len() as u64,
                RESYNC_READ_AHEAD >> 22,
                "{reading:?}: all sent"
            );
            assert_eq!(
                read_ahead(&mut m, reading, &mut tickets, queued),
                2 * RESYNC_READ_AHEAD,
                "{reading:?}: as much again, with none acknowledged"
            );
        }
    }

    /// A journal smaller than the read-ahead bounds what is queued instead; an initial
    /// sync's extents sent and not yet acknowledged stay within it too.
    #[test]
    fn a_journal_smaller_than_the_read_ahead_bounds_the_resync() {
        for reading in [Reading::Sync, Reading::CatchUp] {
            let mut tickets = TicketRegistry::new();
            let mut m = resyncing(reading, 8 << 20);
            assert_eq!(
                read_ahead(&mut m, reading, &mut tickets, 0),
                8 << 20,
                "{reading:?}"
            );
            let mut frames = Vec::new();
            let _ = m.take_frames(u64::MAX, &mut frames);
            assert_eq!(frames.len(), 2, "{reading:?}");
            let sent_but_unacknowledged_bound = matches!(reading, Reading::Sync);
            assert_eq!(
                m.has_room_for(4 << 20),
                !sent_but_unacknowledged_bound,
                "{reading:?}"
            );
        }
    }

    /// Completes journaled 1 MiB live writes (answer tokens from 100), from offset 0, a
    /// little more than the read-ahead in all; they stay queued, held to coalesce.
    fn hold_more_than_the_read_ahead(m: &mut Machine, tickets: &mut TicketRegistry) {
        const WRITE: u64 = 1 << 20;
        for token in 0..RESYNC_READ_AHEAD / WRITE + 1 {
            let range = ByteRange::new(token * WRITE, WRITE);
            let mode = m.admit(range);
            let w = LocalWrite {
                range,
                payload: Some(Payload::Data(vec![1; WRITE as usize])),
                fua: false,
                token: AnswerToken(100 + token),
                mode,
                ticket: mode.wants_ticket().then(|| tickets.issue(range)),
                sent: None,
            };
            let _ = m.local_done(w, &CONNECTION, 0);
        }
        let mut frames = Vec::new();
        let _ = m.take_frames(u64::MAX, &mut frames);
        assert!(
            frames.is_empty(),
            "held to coalesce: {} frames",
            frames.len()
        );
    }

    /// A grouped hypermetro pair in its initial sync, with a `journal_bytes` journal,
    /// whose group went synchronous (a direct cut) while a journaled write still ran
    /// locally: the cut waits for it, and what the sender could take is taken.
    fn synchronous_behind_a_waiting_direct_cut(
        journal_bytes: u64,
        tickets: &mut TicketRegistry,
    ) -> Machine {
        let mut m = Machine::new(ReplicationModel::Hypermetro, journal_bytes, Epoch(1));
        let _ = m.set_grouped(true);
        let _ = m.connected(Epoch(1), true).unwrap();
        // A grouped hypermetro pair journals until its group goes synchronous.
        let _ = m.go_live();
        let _running = admit(&mut m, tickets, 1 << 40, 1);
        let ((_, direct), _) = m.group_cut(m.current_epoch().next(), CutMode::Direct, 0, 0);
        assert!(direct, "the pair went synchronous");
        let mut frames = Vec::new();
        let _ = m.take_frames(u64::MAX, &mut frames);
        m
    }

    /// An initial sync's extents queued behind a direct cut wait with the cut's epoch, in
    /// no queue the sender takes from: they count against the read-ahead like any other.
    #[test]
    fn extents_held_behind_a_direct_cut_count_against_the_read_ahead() {
        let mut tickets = TicketRegistry::new();
        let mut m = synchronous_behind_a_waiting_direct_cut(1 << 30, &mut tickets);
        assert_eq!(
            read_ahead(&mut m, Reading::Sync, &mut tickets, 0),
            RESYNC_READ_AHEAD
        );
    }

    /// A direct cut still waiting for a write of its epoch holds back every frame queued
    /// after it, even once a trip cut made the pair journal again: writes held to
    /// coalesce then let no extent through, as it would release nothing.
    #[test]
    fn writes_held_to_coalesce_behind_a_waiting_direct_cut_let_no_extent_through() {
        let mut tickets = TicketRegistry::new();
        let mut m = synchronous_behind_a_waiting_direct_cut(2 << 30, &mut tickets);
        let ((_, direct), _) = m.group_cut(m.current_epoch().next(), CutMode::Trip, 0, 0);
        assert!(!direct, "the trip made it journal again");
        hold_more_than_the_read_ahead(&mut m, &mut tickets);
        assert_eq!(
            read_ahead(&mut m, Reading::Sync, &mut tickets, 1 << 30),
            1 << 30,
            "an extent would release nothing: none goes"
        );
    }

    /// Live writes of the open epoch held in the journal to coalesce (a large journal's
    /// window is larger than the read-ahead) are not sent until something fences them: an
    /// initial sync's next extent does, so the reader must not wait for them to leave.
    #[test]
    fn live_writes_held_to_coalesce_do_not_stall_an_initial_sync() {
        let mut tickets = TicketRegistry::new();
        let mut m = Machine::new(ReplicationModel::Async, 2 << 30, Epoch(1));
        let _ = m.connected(Epoch(1), true).unwrap();
        let _ = m.go_live();
        hold_more_than_the_read_ahead(&mut m, &mut tickets);
        assert!(
            m.has_room_for(4 << 20),
            "the sync's extent is what releases them"
        );
        let range = ByteRange::new(1 << 30, 4 << 20);
        let _ = m.push_sync_extent(range, Payload::Zeroes, tickets.issue(range), 0);
        let mut frames = Vec::new();
        let _ = m.take_frames(u64::MAX, &mut frames);
        assert_eq!(
            frames.len() as u64,
            (RESYNC_READ_AHEAD >> 20) + 2,
            "the held writes, then the extent"
        );
    }

    #[test]
    fn a_synchronous_write_that_failed_here_keeps_its_blocks_dirty_whichever_answer_comes_first() {
        let mut tickets = TicketRegistry::new();
        // The peer answers after the local failure: its ticket is forgotten, not redeemed.
        let mut m = live(ReplicationModel::Hypermetro);
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let (seq, _) = m.send_direct(&mut w, &CONNECTION, 0);
        let (after, fx) = m.local_failed(w, &CONNECTION, 0);
        assert_eq!(after, AfterLocal::WaitForPeer);
        assert_eq!(fx.mark_dirty, None);
        assert!(m.needs_catch_up());
        let fx = m.handle_ack(seq.unwrap(), 0);
        assert!(fx.redeem.is_empty());
        assert_eq!(fx.forget.len(), 1);
        assert_eq!(answered(&fx), [1]);

        // The peer answers first: its blocks were cleared, and are marked dirty again.
        let mut m = live(ReplicationModel::Hypermetro);
        let mut w = admit(&mut m, &mut tickets, 0, 2);
        let range = w.range;
        let (seq, _) = m.send_direct(&mut w, &CONNECTION, 0);
        let _ = m.handle_ack(seq.unwrap(), 0);
        let (_, fx) = m.local_failed(w, &CONNECTION, 0);
        assert_eq!(fx.mark_dirty, Some(range));
    }

    #[test]
    fn a_grouped_synchronous_pair_that_loses_its_link_holds_every_answer_until_its_trip_cut() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let _ = m.set_grouped(true);
        // Grouped, it journals until its group goes synchronous: a direct cut.
        let ((_, synchronous), _) = m.group_cut(Epoch(2), CutMode::Direct, 1, 0);
        assert!(synchronous);
        let _ = m.group_release(
            Epoch(2),
            RoundOutcome::of(CutMode::Direct, true, true),
            1,
            0,
        );
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let (seq, _) = m.send_direct(&mut w, &CONNECTION, 0);
        assert!(seq.is_some());
        let (after, _) = m.local_done(w, &CONNECTION, 0);
        assert_eq!(after, AfterLocal::WaitForPeer);

        let fx = m.disconnected(1_000);
        assert!(
            fx.answers.is_empty(),
            "a trip holds what waited for the peer"
        );
        assert_eq!(fx.forget.len(), 1, "its blocks stay dirty");
        assert!(m.trip_wanted());
        assert_eq!(m.live(), Live::Tracked);

        // A write admitted now is tracked, and its answer held too.
        let w = admit(&mut m, &mut tickets, 8192, 2);
        assert_eq!(w.mode, ReplicaMode::Tracked);
        let (after, fx) = m.local_done(w, &CONNECTION, 2_000);
        assert_eq!(after, AfterLocal::WaitForPeer);
        assert!(fx.answers.is_empty());

        // Not given by a release of a round that did not trip, nor by a timeout...
        let fx = m.group_release(
            Epoch(2),
            RoundOutcome::of(CutMode::Keep, true, false),
            1,
            3_000,
        );
        assert!(fx.answers.is_empty());
        let fx = m.release_held_longer_than(1, 10_000_000);
        assert!(fx.answers.is_empty(), "a trip hold never times out");
        // ...but by the release of the trip cut that reached it.
        let _ = m.group_cut(Epoch(3), CutMode::Trip, 2, 4_000);
        let fx = m.group_release(
            Epoch(3),
            RoundOutcome::of(CutMode::Trip, true, false),
            2,
            5_000,
        );
        let mut given = answered(&fx);
        given.sort_unstable();
        assert_eq!(given, [1, 2]);
        assert!(!m.trip_wanted());
    }

    /// A slow-path write (unaligned, WRITE_ZEROES) admitted while its group was synchronous
    /// whose local write ends after the group's trip cut made the pair journal: it is
    /// journaled in the epoch it ends in, like a write admitted then. (It was answered at
    /// the trip's release with its data on neither stream, only dirty in the bitmap, while
    /// its dependants were journaled and committed: `hypermetro_group_sim` seed 173.)
    #[test]
    fn a_synchronous_write_that_ends_after_a_trip_cut_is_journaled() {
        let mut tickets = TicketRegistry::new();
        // Live before it was grouped, the pair is synchronous already.
        let mut m = live(ReplicationModel::Hypermetro);
        let _ = m.set_grouped(true);
        // Its staged writes go at once, not coalesced.
        m.set_coalesce_window(0);
        let mut out = Vec::new();
        let _ = m.take_frames(u64::MAX, &mut out);
        let w = admit(&mut m, &mut tickets, 0, 1);
        assert_eq!(w.mode, ReplicaMode::Sync);

        let trip = m.current_epoch().next();
        let ((_, synchronous), _) = m.group_cut(trip, CutMode::Trip, 2, 1_000);
        assert!(!synchronous);
        let (after, fx) = m.local_done(w, &CONNECTION, 2_000);
        assert_eq!(
            after,
            AfterLocal::WaitForPeer,
            "held for the trip's release"
        );
        assert!(fx.forget.is_empty(), "its ticket is kept: it is journaled");
        out.clear();
        let _ = m.take_frames(u64::MAX, &mut out);
        assert!(
            out.iter().any(|f| matches!(f, Transmit::Write(w)
                if !w.direct && w.epoch == trip && w.range.offset == 0)),
            "the write goes to the DR side in the trip's epoch: {out:?}"
        );
        let fx = m.group_release(trip, RoundOutcome::of(CutMode::Trip, true, false), 2, 3_000);
        assert_eq!(answered(&fx), [1]);
    }

    /// Direct writes still waiting for the DR side when a trip cut made the pair journal (its
    /// gated writes, held there for an Ungate that will not come) are held by a trip when
    /// the stream then ends: answered at once, with their data on no DR volume, their
    /// dependants could be journaled and committed before them (`hypermetro_group_sim`
    /// seed 1426).
    #[test]
    fn direct_writes_pending_after_a_trip_cut_are_held_when_the_stream_ends() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let _ = m.set_grouped(true);
        // Live before it was grouped, it is synchronous: a trip cut makes it journal, and a
        // direct cut synchronous again, gated.
        let _ = m.group_cut(m.current_epoch().next(), CutMode::Trip, 1, 0);
        let _ = m.group_cut(m.current_epoch().next(), CutMode::Direct, 1, 0);
        assert!(m.gated());
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let (seq, _) = m.send_direct(&mut w, &CONNECTION, 0);
        assert!(seq.is_some());
        let (after, _) = m.local_done(w, &CONNECTION, 0);
        assert_eq!(after, AfterLocal::WaitForPeer);

        // The direct round did not complete; the group trips instead.
        let trip = m.current_epoch().next();
        let _ = m.group_cut(trip, CutMode::Trip, 2, 1_000);
        assert_eq!(m.live(), Live::Journal);
        let fx = m.disconnected(2_000);
        assert!(
            fx.answers.is_empty(),
            "a direct write the DR side never answered is held for a trip"
        );
        assert!(m.trip_wanted());
        let fx = m.group_release(trip, RoundOutcome::of(CutMode::Trip, true, false), 2, 3_000);
        assert!(fx.answers.is_empty(), "the trip cut came before the trip");
        let next = m.current_epoch().next();
        let _ = m.group_cut(next, CutMode::Trip, 3, 4_000);
        let fx = m.group_release(next, RoundOutcome::of(CutMode::Trip, true, false), 3, 5_000);
        assert_eq!(answered(&fx), [1]);
    }

    /// A direct cut to an epoch the pair passed already does not make it synchronous.
    #[test]
    fn a_direct_cut_it_did_not_switch_at_leaves_the_pair_journaling() {
        let mut m = Machine::new(ReplicationModel::Hypermetro, 1 << 20, Epoch(1));
        let _ = m.set_grouped(true);
        let _ = m.connected(Epoch(1), false).unwrap();
        assert_eq!(m.live(), Live::Journal);
        let ahead = Epoch(900);
        let _ = m.group_cut(ahead, CutMode::Keep, 1, 0);
        let ((_, synchronous), _) = m.group_cut(Epoch(66), CutMode::Direct, 2, 1_000);
        assert!(!synchronous);
        assert_eq!(m.live(), Live::Journal);
        assert!(!m.gated());
        let ((_, synchronous), _) = m.group_cut(ahead.next(), CutMode::Direct, 3, 2_000);
        assert!(synchronous, "a direct cut it switched at");
        assert!(m.gated());
    }

    /// A pair that stops (deleted, switched to the DR side, its agent stopping) returns the
    /// answers a trip held, for the shell to give or fail: nothing would ever release them
    /// (the connection waiting for them would hang).
    #[test]
    fn a_stopped_pair_returns_what_its_trip_held() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let _ = m.set_grouped(true);
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let _ = m.send_direct(&mut w, &CONNECTION, 0);
        let _ = m.local_done(w, &CONNECTION, 0);
        let fx = m.disconnected(1_000);
        assert!(fx.answers.is_empty() && m.trip_wanted());
        let (held, fx) = m.stop(2_000);
        assert!(fx.answers.is_empty());
        assert_eq!(held.iter().map(|(t, _)| t.0).collect::<Vec<_>>(), [1]);
        assert!(!m.trip_wanted());
        m.check_invariants().unwrap();
    }

    /// A synchronous write whose local write starts after a trip cut made the pair journal
    /// (parked while the activity log synced) keeps its ticket for its journaling: once its
    /// epoch is staged, its blocks are clean.
    #[test]
    fn a_synchronous_write_started_after_a_trip_cut_keeps_its_ticket() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let _ = m.set_grouped(true);
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let ticket = w.ticket.expect("a synchronous write takes a ticket");
        let trip = m.current_epoch().next();
        let _ = m.group_cut(trip, CutMode::Trip, 2, 1_000);
        let (seq, fx) = m.send_direct(&mut w, &CONNECTION, 1_500);
        assert!(seq.is_none(), "no direct frame once journaling");
        assert!(fx.forget.is_empty(), "its ticket is kept");
        let _ = m.local_done(w, &CONNECTION, 2_000);
        let _ = m.group_cut(trip.next(), CutMode::Keep, 3, 2_500);
        let mut out = Vec::new();
        let _ = m.take_frames(u64::MAX, &mut out);
        let fx = m.handle_staged(trip, 3_000);
        assert_eq!(fx.redeem.as_slice(), [ticket]);
    }

    /// A pair that went synchronous at a direct cut admits one epoch past it (the last
    /// journaled epoch is sealed before the first direct frame). The group's next cut, a
    /// trip to that epoch, switches nothing here, yet it must hold: a write journaled in it
    /// and answered at once could have a dependant journaled on a host that has not switched
    /// yet, in the epoch before, which the group may commit without it
    /// (`hypermetro_group_sim` seed 1894 at 100000 seeds).
    #[test]
    fn a_cut_to_the_epoch_the_pair_admits_in_holds_its_answers() {
        let mut tickets = TicketRegistry::new();
        let mut m = Machine::new(ReplicationModel::Hypermetro, 1 << 20, Epoch(1));
        let _ = m.set_grouped(true);
        let _ = m.connected(Epoch(1), false).unwrap();
        let direct = m.current_epoch().next();
        let _ = m.group_cut(direct, CutMode::Direct, 1, 0);
        let _ = m.group_release(direct, RoundOutcome::of(CutMode::Direct, true, true), 1, 0);
        let trip = direct.next();
        assert_eq!(
            m.current_epoch(),
            trip,
            "synchronous, it admits past the direct cut"
        );
        let _ = m.group_cut(trip, CutMode::Trip, 2, 1_000);
        let w = admit(&mut m, &mut tickets, 0, 1);
        assert!(matches!(w.mode, ReplicaMode::Journal(a) if a.epoch == trip));
        let (after, _) = m.local_done(w, &CONNECTION, 2_000);
        assert_eq!(
            after,
            AfterLocal::WaitForPeer,
            "held until the trip cut's release"
        );
        let fx = m.group_release(trip, RoundOutcome::of(CutMode::Trip, true, false), 2, 3_000);
        assert_eq!(answered(&fx), [1]);
    }

    /// A cut message that comes after its own release (control calls may overtake each
    /// other) holds nothing: no release would come for it, and its answers would wait for
    /// the hold timeout. A stopped or demoted side holds nothing for a cut either.
    #[test]
    fn a_cut_after_its_release_or_on_a_stopped_side_holds_nothing() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Async);
        let _ = m.set_grouped(true);
        let to = m.current_epoch().next();
        let _ = m.group_release(to, RoundOutcome::of(CutMode::Keep, true, false), 1, 0);
        let _ = m.group_cut(to, CutMode::Keep, 1, 1_000);
        let w = admit(&mut m, &mut tickets, 0, 1);
        let (after, _) = m.local_done(w, &CONNECTION, 2_000);
        assert_eq!(after, AfterLocal::Answer);

        let leaves: [fn(&mut Machine, u64); 2] =
            [|m, now| drop(m.stop(now)), |m, now| drop(m.demote(now))];
        for leave in leaves {
            let mut m = live(ReplicationModel::Async);
            let _ = m.set_grouped(true);
            leave(&mut m, 0);
            let _ = m.group_cut(m.current_epoch().next(), CutMode::Keep, 1, 1_000);
            m.check_invariants().expect("it holds nothing");
        }
    }

    #[test]
    fn an_async_write_joins_its_epoch_and_the_seal_carries_the_time_of_its_cut() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Async);
        let epoch = m.current_epoch();
        let w = admit(&mut m, &mut tickets, 0, 1);
        let ReplicaMode::Journal(admitted) = w.mode else {
            panic!("an async write is journaled: {:?}", w.mode);
        };
        assert_eq!(admitted.epoch, epoch);
        let (after, fx) = m.local_done(w, &CONNECTION, 0);
        assert_eq!(after, AfterLocal::Answer, "answered after its local write");
        assert!(
            !fx.wake_sender,
            "a write of the open epoch waits to be coalesced with later ones"
        );
        assert!(m.advance_epoch(1_234).wake_sender);

        let mut out = Vec::new();
        let fx = m.take_frames(u64::MAX, &mut out);
        assert!(fx.notify, "taking frames makes room for the resync reader");
        assert!(
            matches!(
                out.as_slice(),
                [
                    Transmit::Write(WriteFrame { epoch: e, direct: false, .. }),
                    Transmit::Seal { epoch: sealed, cut_ms: 1_234 },
                ] if *e == epoch && *sealed == epoch
            ),
            "{out:?}"
        );
        let fx = m.handle_staged(epoch, 0);
        assert_eq!(fx.redeem.len(), 1, "the staged epoch's ticket is redeemed");
    }

    #[test]
    fn a_journal_overflow_falls_back_to_the_bitmap_and_asks_for_a_catch_up() {
        let mut tickets = TicketRegistry::new();
        let mut m = Machine::new(ReplicationModel::Async, 4096, Epoch(1));
        let _ = m.connected(Epoch(1), false).unwrap();
        let first = admit(&mut m, &mut tickets, 0, 1);
        let second = admit(&mut m, &mut tickets, 4096, 2);
        let (_, fx) = m.local_done(first, &CONNECTION, 0);
        assert!(!fx.overflowed);
        let (after, fx) = m.local_done(second, &CONNECTION, 0);
        assert_eq!(after, AfterLocal::Answer);
        assert!(fx.overflowed);
        assert_eq!(fx.forget.len(), 2, "both writes' blocks stay dirty");
        assert_eq!(m.live(), Live::Tracked);
        assert!(m.needs_catch_up());
        assert_eq!(
            m.unit_in_progress(),
            Some(Epoch(1)),
            "a catch-up unit starts at what is staged"
        );
    }

    #[test]
    fn a_rejected_direct_frame_is_sent_again_and_a_rejected_staged_one_spoils_its_unit() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let (seq, _) = m.send_direct(&mut w, &CONNECTION, 0);
        let mut out = Vec::new();
        let _ = m.take_frames(u64::MAX, &mut out);
        let fx = m.handle_reject(seq.unwrap(), RejectReason::Checksum, 0);
        assert!(fx.corrupted_in_transit && fx.wake_sender);
        out.clear();
        let _ = m.take_frames(u64::MAX, &mut out);
        let [Transmit::Write(WriteFrame { seq: again, .. })] = out.as_slice() else {
            panic!("sent again: {out:?}");
        };
        assert_ne!(Some(*again), seq);
        assert_eq!(answered(&m.handle_ack(*again, 0)), [1]);

        let mut m = live(ReplicationModel::Async);
        let w = admit(&mut m, &mut tickets, 0, 2);
        let _ = m.local_done(w, &CONNECTION, 0);
        let fx = m.handle_reject(WriteSeq(999), RejectReason::StageFull, 5);
        assert!(fx.stage_full_began);
        assert_eq!(fx.forget.len(), 1);
        assert_eq!(m.live(), Live::Tracked);
        assert_eq!(m.stage_full_for_us(15), Some(10));
        let fx = m.handle_reject(WriteSeq(1000), RejectReason::StageFull, 20);
        assert!(!fx.stage_full_began, "said once");
    }

    #[test]
    fn a_pause_ends_the_stream_answers_what_waited_and_a_late_acceptance_is_refused() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let _ = m.send_direct(&mut w, &CONNECTION, 0);
        let _ = m.local_done(w, &CONNECTION, 0);
        let fx = m.pause(true, 10);
        assert_eq!(m.state(), PairState::Paused);
        assert_eq!(
            answered(&fx),
            [1],
            "answered: its blocks stay dirty (rule 1)"
        );
        assert_eq!(fx.forget.len(), 1);
        assert_eq!(m.live(), Live::Tracked);
        m.check_invariants().unwrap();

        // A stream accepted after the pause cannot make the pair live.
        let err = m.connected(Epoch(1), false).unwrap_err();
        assert_eq!((err.from, err.to), (PairState::Paused, PairState::Live));
        assert_eq!(m.state(), PairState::Paused);
        let _ = m.pause(false, 20);
        assert_eq!(m.state(), PairState::Connecting);
        let _ = m.connected(Epoch(1), true).unwrap();
        assert_eq!(m.state(), PairState::Resyncing);
        m.resync_done().unwrap();
        assert_eq!(m.state(), PairState::Live);
    }

    #[test]
    fn an_unconfirmed_side_connects_only_once_confirmed_and_a_demoted_one_never() {
        let mut m = Machine::new(ReplicationModel::Async, 1 << 20, Epoch(1))
            .starting_in(PairState::Unconfirmed);
        assert!(m.connected(Epoch(1), false).is_err());
        assert!(m.begin_catch_up().is_err(), "no stream");
        m.confirm(true).unwrap();
        assert_eq!(m.state(), PairState::Paused, "the operator's pause is kept");
        let _ = m.pause(false, 0);
        m.confirm(false).unwrap();
        assert_eq!(
            m.state(),
            PairState::Connecting,
            "confirming twice changes nothing"
        );

        let (failed, _) = m.demote(0);
        assert!(failed.is_empty());
        assert_eq!(m.state(), PairState::Demoted);
        let _ = m.pause(false, 0);
        let _ = m.disconnected(0);
        assert_eq!(m.state(), PairState::Demoted);
        assert!(m.connected(Epoch(1), false).is_err());
        let _ = m.stop(0);
        assert_eq!(m.state(), PairState::Stopped);
    }

    #[test]
    fn a_demoted_grouped_pair_fails_the_answers_its_trip_held() {
        let mut tickets = TicketRegistry::new();
        let mut m = live(ReplicationModel::Hypermetro);
        let _ = m.set_grouped(true);
        let _ = m.group_cut(Epoch(5), CutMode::Direct, 0, 0);
        let _ = m.group_release(
            Epoch(5),
            RoundOutcome {
                tripped: false,
                synchronous: true,
            },
            0,
            0,
        );
        assert_eq!(m.live(), Live::Sync);
        let mut w = admit(&mut m, &mut tickets, 0, 1);
        let _ = m.send_direct(&mut w, &CONNECTION, 0);
        let _ = m.local_done(w, &CONNECTION, 0);
        let fx = m.disconnected(10);
        assert!(fx.answers.is_empty(), "the trip holds it");
        assert!(m.trip_wanted());
        let (failed, fx) = m.demote(20);
        assert_eq!(failed.iter().map(|(t, _)| t.0).collect::<Vec<_>>(), [1]);
        assert!(fx.answers.is_empty());
        m.check_invariants().unwrap();
    }

    #[test]
    fn the_invariants_catch_a_machine_that_sends_with_no_stream() {
        let mut m = live(ReplicationModel::Async);
        m.check_invariants().unwrap();
        m.state = PairState::Connecting;
        let err = m.check_invariants().unwrap_err();
        assert!(err.contains("with no stream"), "{err}");
    }

    /// A pause (or demote, or stop) cuts the stream off while the session's resync reader
    /// still runs: what it does next reaches no DR side, and the invariants hold.
    #[test]
    fn the_resync_reader_after_a_pause_queues_nothing_and_goes_live_nowhere() {
        let mut tickets = TicketRegistry::new();
        let mut m = Machine::new(ReplicationModel::Async, 1 << 20, Epoch(1));
        let _ = m.connected(Epoch(1), true).unwrap();
        m.begin_catch_up().unwrap();
        let _ = m.pause(true, 0);
        let range = ByteRange::new(0, 4096);
        let ticket = tickets.issue(range);
        let fx = m.push_sync_extent(range, Payload::Data(vec![1; 4096]), ticket, 0);
        assert_eq!(fx.forget.as_slice(), [ticket], "its blocks stay dirty");
        m.check_invariants().unwrap();
        let admitted = m.admit_catch_up_extent();
        let ticket = tickets.issue(range);
        let (queued, fx) =
            m.push_catch_up_extent(admitted, range, Payload::Data(vec![2; 4096]), ticket);
        assert!(!queued);
        assert_eq!(fx.forget.as_slice(), [ticket]);
        assert!(!m.begin_final_pass());
        assert_eq!(m.finish_catch_up(0).0, None);
        let _ = m.go_live();
        assert_eq!(m.live(), Live::Tracked);
        m.check_invariants().unwrap();
        let mut out = Vec::new();
        let _ = m.take_frames(u64::MAX, &mut out);
        assert!(out.is_empty(), "nothing is sent with no stream: {out:?}");
    }

    /// A resync's end reported after the pair was paused and resumed (or by a session that
    /// ended) does not make a pair with no stream live.
    #[test]
    fn a_resync_end_counts_only_while_resyncing() {
        let mut m = Machine::new(ReplicationModel::Async, 1 << 20, Epoch(1));
        let _ = m.connected(Epoch(1), true).unwrap();
        let _ = m.pause(true, 0);
        let _ = m.pause(false, 0);
        assert_eq!(m.state(), PairState::Connecting);
        assert!(m.resync_done().is_err());
        assert_eq!(m.state(), PairState::Connecting);
    }

    /// A demoted side that restarts in its group holds no answer and is not tripped: its
    /// group failed over, nothing of it is ever released.
    #[test]
    fn a_demoted_side_restarting_in_its_group_holds_nothing() {
        let mut m = Machine::new(ReplicationModel::Hypermetro, 1 << 20, Epoch(1))
            .starting_in(PairState::Demoted);
        let _ = m.set_grouped(true);
        m.start_in_group(Epoch(9), 0);
        m.start_tripped(0);
        m.check_invariants().unwrap();
        assert!(!m.trip_wanted());
    }
}
