//! The production half of a pair, as the write path sees it: [`PairLink`] sits in the
//! volume's write gate and queues what goes to the DR side, in the order it must arrive.
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
//! the blocks were written here. The pair's tasks take frames with [`PairLink::take_frames`]
//! and hand the DR side's answers back through the `handle_*` methods.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use blockrep_core::ByteRange;
use blockrep_core::pair::atomic_spans::{AtomicSpan, AtomicSpans};
use blockrep_core::pair::hold_times::{HoldSummary, HoldTimes};
use blockrep_core::pair::probes::{Probe, ProbeResult, Probes};
use blockrep_core::replication::answer_hold::AnswerHold;
use blockrep_core::replication::group_cut::{CutMode, Live, RoundOutcome};
use blockrep_core::replication::{
    Completed, Epoch, Journal, Mode, Outgoing, Payload, PayloadLen, ProbeId, ReplicationModel,
    Ticket, WriteSeq,
};
use blockrep_volume::{
    AfterLocal, AnswerToken, DirtyTracker, Mailbox, ReplicaData, ReplicaLink, ReplicaMode,
    Replicated,
};
use blockrep_wire::RejectReason;
use bytes::Bytes;

use crate::clock::Clock;

/// Journal payloads: shared, never copied.
#[derive(Clone, Debug)]
pub struct Data(pub Bytes);

impl PayloadLen for Data {
    fn payload_len(&self) -> u64 {
        self.0.len() as u64
    }
}

/// A frame waiting for the DR side's acknowledgement.
#[derive(Debug)]
enum Pending {
    /// A hypermetro write: redeem its ticket and deliver its token.
    Write {
        ticket: Option<Ticket>,
        token: AnswerToken,
        mailbox: Arc<Mailbox>,
        local_failed: bool,
        range: ByteRange,
        payload: Payload<Data>,
        fua: bool,
    },
    Flush {
        token: AnswerToken,
        mailbox: Arc<Mailbox>,
    },
    /// A resync extent written direct: redeem its ticket.
    Extent {
        ticket: Ticket,
        range: ByteRange,
        payload: Payload<Data>,
    },
}

/// What the pair counts, for `pair show` and the metrics.
#[derive(Debug, Default)]
pub struct PairCounters {
    pub bytes_sent: AtomicU64,
    pub extents_sent: AtomicU64,
    pub extents_rejected: AtomicU64,
    pub resync_bytes_sent: AtomicU64,
    /// Bytes a resync brought up to date, data or zeroes (a zero range has no payload).
    pub resync_bytes_copied: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Journal overflows into bitmap mode.
    pub overflows: AtomicU64,
}

struct State {
    live: Live,
    journal: Journal<Data>,
    pending: HashMap<WriteSeq, Pending>,
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
    /// When the DR side last answered, or when a frame began waiting with none waiting.
    answered_at_us: u64,
    /// Online verify probes waiting for the DR side, and answered.
    probes: Probes,
    /// The pair's epochs are cut by its consistency group, not by its own ticker.
    grouped: bool,
    /// Answers held for a group cut or trip.
    hold: AnswerHold<HeldAnswer>,
    /// Epoch spans the DR side can only take whole (a catch-up's unit): its group must
    /// never commit an epoch strictly inside one.
    atomic: AtomicSpans,
    hold_times: HoldTimes,
    /// The link's one clock, read only where an event needs the time (not on every write).
    clock: Arc<dyn Clock>,
}

impl State {
    /// Now, in µs on the link's monotonic clock.
    fn now_us(&self) -> u64 {
        self.clock.monotonic_us()
    }

    /// Holds `token`'s answer if a group cut or trip holds answers; else it is answered now.
    fn answer_or_hold(&mut self, token: AnswerToken, mailbox: &Arc<Mailbox>) -> AfterLocal {
        if !self.hold.holding() {
            return AfterLocal::Answer;
        }
        let held = self
            .hold
            .hold_or_give((token, Arc::clone(mailbox), self.now_us()));
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
    fn catch_up_failed_write(&mut self) -> Option<CutOff> {
        match self.live {
            Live::Tracked => None,
            Live::Sync if self.grouped => Some(self.end_stream_to_trip("a write failed here")),
            _ => {
                self.needs_catch_up = true;
                None
            }
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
    fn end_stream_to_trip(&mut self, why: &'static str) -> CutOff {
        self.end_stream.get_or_insert(why);
        self.cut_off()
    }

    /// Nothing more reaches the DR side on this stream (see [`PairLink::disconnected`]).
    fn cut_off(&mut self) -> CutOff {
        // A trip not yet released holds what waited for the DR side too.
        let trip = (self.live == Live::Sync && self.grouped) || self.hold.trip_wanted();
        if self.live != Live::Sync || trip {
            self.open_atomic_span();
        }
        self.live = Live::Tracked;
        self.probes.lose_all();
        let mut forget = self.journal.disconnect();
        self.unacked_extent_bytes = 0;
        let mut answers = Vec::new();
        for (_, p) in std::mem::take(&mut self.pending) {
            match p {
                Pending::Write {
                    ticket,
                    token,
                    mailbox,
                    ..
                } => {
                    forget.extend(ticket);
                    answers.push((token, mailbox, self.now_us()));
                }
                Pending::Flush { token, mailbox } => answers.push((token, mailbox, self.now_us())),
                Pending::Extent { ticket, .. } => forget.push(ticket),
            }
        }
        // Tripping again with nothing new to hold would forget a trip cut that reached it.
        if trip && (!self.hold.trip_wanted() || !answers.is_empty()) {
            self.hold.trip(self.now_us() / 1000, answers.drain(..));
        }
        CutOff { forget, answers }
    }
}

/// What a cut-off leaves to do once the state's lock is released: tickets to forget (their
/// blocks stay dirty), and answers to give now (those a trip does not hold).
#[must_use]
struct CutOff {
    forget: Vec<Ticket>,
    answers: Vec<HeldAnswer>,
}

/// An answer held for the group (`blockrep_core::replication::answer_hold`): the write's
/// token, where to deliver it, and when it was held (µs on the link's clock).
type HeldAnswer = (AnswerToken, Arc<Mailbox>, u64);

impl State {
    /// `seq` waits for the DR side's acknowledgement.
    fn await_ack(&mut self, seq: WriteSeq, pending: Pending) {
        if self.pending.is_empty() {
            self.answered_at_us = self.now_us();
        }
        self.pending.insert(seq, pending);
    }
}

pub struct PairLink {
    model: ReplicationModel,
    clock: Arc<dyn Clock>,
    tracker: Arc<DirtyTracker>,
    state: Mutex<State>,
    /// Signalled when frames are taken (room for the resync reader) or acknowledged.
    changed: Condvar,
    /// Wakes the sender task.
    pub wake_sender: tokio::sync::Notify,
    pub counters: Arc<PairCounters>,
}

impl PairLink {
    pub fn new(
        model: ReplicationModel,
        tracker: Arc<DirtyTracker>,
        journal_bytes: u64,
        staged: Epoch,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut journal = Journal::new(journal_bytes, staged);
        journal.stop_journaling();
        Self {
            model,
            clock: Arc::clone(&clock),
            tracker,
            state: Mutex::new(State {
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
                answered_at_us: 0,
                clock,
                probes: Probes::default(),
                grouped: false,
                hold: AnswerHold::default(),
                atomic: AtomicSpans::default(),
                hold_times: HoldTimes::default(),
            }),
            changed: Condvar::new(),
            wake_sender: tokio::sync::Notify::new(),
            counters: Arc::new(PairCounters::default()),
        }
    }

    /// The wall time on the link's clock (ms since the Unix epoch).
    pub fn wall_ms(&self) -> u64 {
        self.clock.wall_ms()
    }

    pub fn model(&self) -> ReplicationModel {
        self.model
    }

    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn live(&self) -> Live {
        self.lock().live
    }

    /// Bytes queued for the DR side and the bound they may reach.
    pub fn journal_fill(&self) -> (u64, u64) {
        let state = self.lock();
        (state.journal.queued_bytes(), state.journal.limit())
    }

    pub fn current_epoch(&self) -> Epoch {
        self.lock().journal.current_epoch()
    }

    pub fn staged_epoch(&self) -> Epoch {
        self.lock().journal.staged_epoch()
    }

    /// Whether the journal overflowed since the last catch-up started.
    pub fn needs_catch_up(&self) -> bool {
        self.lock().needs_catch_up
    }

    /// Why the stream must end so that the pair trips with its group, if it must.
    pub fn stream_must_end(&self) -> Option<&'static str> {
        self.lock().end_stream
    }

    /// Nothing waits for the DR side: no acknowledgement, nothing queued, no catch-up.
    pub fn idle(&self) -> bool {
        let state = self.lock();
        state.pending.is_empty() && state.journal.nothing_to_send() && !state.journal.catching_up()
    }

    // ---- the connection's life ----

    /// The DR side accepted the stream, holding everything up to `staged`.
    pub fn connected(&self, staged: Epoch) {
        let mut state = self.lock();
        state.journal.reconnected(staged);
        state.needs_catch_up = false;
        // A sync's end is acknowledged on the stream that sent it; a new stream starts over.
        state.sync_done_acked = None;
    }

    /// Live writes start flowing: direct in hypermetro, journaled in async. With
    /// `after_catch_up`, journaled writes still outstanding are sealed before direct ones.
    pub fn go_live(&self) {
        let mut state = self.lock();
        state.stage_full_at_us = None;
        // Reconnected with nothing to catch up: what the DR side gets next is journaled,
        // epoch by epoch, from the current one.
        let current = state.journal.current_epoch();
        state.atomic.close(current);
        match self.model {
            // A pair of a hypermetro group goes synchronous only with its whole group (a
            // direct cut); until then it journals like an async pair.
            ReplicationModel::Hypermetro if !state.grouped => {
                state.journal.switch_to_direct();
                state.live = Live::Sync;
            }
            _ => {
                state.journal.start_journaling();
                state.live = Live::Journal;
            }
        }
        drop(state);
        self.wake_sender.notify_one();
    }

    /// A catch-up starts: live writes are tracked only, extents are staged.
    pub fn begin_catch_up(&self) {
        let mut state = self.lock();
        state.open_atomic_span();
        state.journal.begin_catch_up();
        state.live = Live::Tracked;
        state.needs_catch_up = false;
    }

    /// The catch-up's dirty set is small: live writes are journaled with it. Returns false
    /// if the catch-up was given up (the journal overflowed or the DR side refused a staged
    /// write): the reader stops, and a new catch-up starts from the bitmap.
    #[must_use]
    pub fn begin_final_pass(&self) -> bool {
        let mut state = self.lock();
        let going_on = state.journal.begin_final_pass();
        if going_on {
            state.live = Live::Journal;
        }
        going_on
    }

    /// The last extent is queued: returns the epoch whose seal ends the catch-up, or `None`
    /// if the catch-up was given up (nothing is sealed).
    #[must_use]
    pub fn finish_catch_up(&self) -> Option<Epoch> {
        let now_ms = self.clock.wall_ms();
        let mut state = self.lock();
        let cut = !state.grouped;
        let end = state.journal.finish_catch_up(cut)?;
        if cut {
            state.cut_times.insert(end, now_ms);
        }
        state.atomic.close(end);
        drop(state);
        self.wake_sender.notify_one();
        Some(end)
    }

    /// The stream broke: nothing more reaches the DR side until a new one. Writes waiting
    /// for the peer are answered (their blocks stay dirty: rule 1), tickets are forgotten,
    /// and live writes are tracked by the bitmap.
    ///
    /// A synchronous pair of a consistency group *trips* instead: the answers of the writes
    /// that waited, and of every later one, are held until its group's trip cut, so no write
    /// that depends on them is answered before every pair of the group stopped writing its
    /// DR side directly.
    pub fn disconnected(&self) {
        let mut state = self.lock();
        state.end_stream = None;
        let cut = state.cut_off();
        drop(state);
        self.finish_cut_off(cut);
    }

    /// A synchronous pair of a group trips, and its stream must end (see
    /// `State::end_stream_to_trip`).
    fn trip_and_end_stream(&self, mut state: MutexGuard<'_, State>, why: &'static str) {
        let cut = state.end_stream_to_trip(why);
        drop(state);
        self.finish_cut_off(cut);
    }

    /// Does what a cut-off leaves to do once the state's lock is released.
    fn finish_cut_off(&self, cut: CutOff) {
        self.tracker.forget(cut.forget);
        for (token, mailbox, _) in cut.answers {
            mailbox.deliver(token);
        }
        self.changed.notify_all();
    }

    /// A production agent starts with its pair in a consistency group, whose last cut it
    /// recorded switching to is `to`: it admits in `to` (never in an epoch the group left),
    /// and holds its answers as for that cut, whose round may still be running while
    /// another host admits in the epoch before (`AnswerHold::restarted`).
    pub fn start_in_group(&self, to: Epoch) {
        let mut state = self.lock();
        state.grouped = true;
        state.journal.advance_epoch_to(to);
        state.hold = AnswerHold::restarted(to, state.now_us() / 1000);
    }

    /// A production agent that starts with its pair in a hypermetro group starts tripped:
    /// the others may still write their DR sides directly, and this pair's writes are only
    /// tracked until it catches up.
    pub fn start_tripped(&self) {
        let mut state = self.lock();
        state.grouped = true;
        let now_ms = state.now_us() / 1000;
        state.hold.trip(now_ms, []);
    }

    /// The pair tripped and waits for its group's trip cut.
    pub fn trip_wanted(&self) -> bool {
        self.lock().hold.trip_wanted()
    }

    /// Its direct writes are gated: the DR side holds them until the group is synchronous.
    pub fn gated(&self) -> bool {
        self.lock().journal.gated()
    }

    /// Whether a catch-up runs, or its last unit is not yet staged on the DR side.
    pub fn catching_up(&self) -> bool {
        self.lock().journal.catching_up()
    }

    /// The periodic cut: new writes go to the next epoch.
    pub fn advance_epoch(&self) {
        let now_ms = self.clock.wall_ms();
        let mut state = self.lock();
        let cut = state.journal.current_epoch();
        state.cut_times.insert(cut, now_ms);
        state.journal.advance_epoch();
        drop(state);
        self.wake_sender.notify_one();
    }

    // ---- consistency groups ----

    /// The spans the DR side can only take whole, for the group's commit.
    pub fn atomic_spans(&self) -> Vec<AtomicSpan> {
        self.lock().atomic.list()
    }

    /// Where the catch-up unit being made began (the DR side had staged that epoch), if
    /// one is: its span is open.
    pub fn unit_in_progress(&self) -> Option<Epoch> {
        self.lock().atomic.in_progress()
    }

    /// A restarted agent whose pair was making a catch-up unit after `from` (as its record
    /// says): the unit's span is reported open again, until a catch-up ends it or the pair
    /// goes live; its end may be staged already, before any cut ack said where it ended.
    pub fn resume_unit(&self, from: Epoch) {
        self.lock().atomic.open(from);
    }

    /// Whether the pair's epochs are cut by its consistency group.
    pub fn grouped(&self) -> bool {
        self.lock().grouped
    }

    /// Puts the pair under its group's cuts, or back under its own ticker (answers still
    /// held are given).
    pub fn set_grouped(&self, grouped: bool) {
        let mut state = self.lock();
        state.grouped = grouped;
        let held = if grouped {
            Vec::new()
        } else {
            state.hold.give_all()
        };
        drop(state);
        deliver_held(held);
    }

    /// The group's cut to `to`: answers of writes that complete from now on are held until
    /// the release, and admissions take epoch `to`; `mode` may also switch a hypermetro pair
    /// between synchronous and journaled. Returns the last epoch the DR side staged, for the
    /// coordinator's commit, and whether the pair is synchronous now. `now_ms`: when the
    /// cut happened (wall time, read once per cut from the agent's clock).
    pub fn group_cut(&self, to: Epoch, mode: CutMode, now_ms: u64) -> (Epoch, bool) {
        let mut state = self.lock();
        state.grouped = true;
        let current = state.journal.current_epoch();
        let switched = to > current;
        if switched {
            state.cut_times.insert(current, now_ms);
            state.journal.advance_epoch_to(to);
        }
        match mode {
            CutMode::Trip if state.live == Live::Sync => {
                // Gated writes already sent stay held on the DR side: unanswered, they time
                // out and the pair trips again.
                state.journal.set_gated(false);
                state.live = Live::Journal;
            }
            CutMode::Direct if state.live == Live::Journal && !state.journal.catching_up() => {
                state.journal.switch_to_direct();
                state.journal.set_gated(true);
                state.live = Live::Sync;
            }
            _ => {}
        }
        let monotonic_ms = state.now_us() / 1000;
        state.hold.on_cut(to, mode, switched, monotonic_ms);
        let answer = (
            state.journal.staged_epoch(),
            state.live == Live::Sync && self.model == ReplicationModel::Hypermetro,
        );
        drop(state);
        self.wake_sender.notify_one();
        answer
    }

    /// The group's release of the cut to `to`: the held answers are given. A pair that
    /// missed the cut switches now. A trip hold is given only if the round `tripped` (and the
    /// trip cut reached it). If it went `synchronous` (a direct cut every host switched at),
    /// the DR side may write the gated writes once it applied epoch `to`. `now_ms`: as for
    /// [`PairLink::group_cut`].
    pub fn group_release(&self, to: Epoch, outcome: RoundOutcome, now_ms: u64) {
        let mut state = self.lock();
        let current = state.journal.current_epoch();
        if to > current {
            state.cut_times.insert(current, now_ms);
            state.journal.advance_epoch_to(to);
        }
        if outcome.synchronous && state.live == Live::Sync && state.journal.gated() {
            state.journal.ungate(to);
        }
        let held = state.hold.on_release(to, outcome);
        let now_us = state.now_us();
        state
            .hold_times
            .record(held.iter().map(|(_, _, at)| *at), now_us);
        drop(state);
        self.wake_sender.notify_one();
        deliver_held(held);
    }

    /// The pair's volume is no longer production (its group failed over): the answers a
    /// trip held are given, failed with `errno`. Their writes are on this volume only, which
    /// the group left: acknowledging them would be acknowledging writes the group lost.
    pub fn fail_held(&self, errno: i32) {
        let held = self.lock().hold.give_all();
        for (token, mailbox, _) in held {
            mailbox.deliver_failed(token, errno);
        }
    }

    /// How long the group's cuts held this pair's answers.
    pub fn hold_summary(&self) -> HoldSummary {
        let (recent, held) = self.lock().hold_times.snapshot();
        HoldTimes::summary(recent, held)
    }

    /// Gives the answers held longer than `timeout` (the coordinator is away): the
    /// coordinator never commits a cut it did not release itself.
    pub fn release_held_longer_than(&self, timeout: Duration) {
        let mut state = self.lock();
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let now_us = state.now_us();
        let held = state.hold.expire(now_us / 1000, timeout_ms);
        state
            .hold_times
            .record(held.iter().map(|(_, _, at)| *at), now_us);
        drop(state);
        deliver_held(held);
    }

    // ---- the sender ----

    /// Takes up to `max_bytes` of frames to send, in order.
    pub fn take_frames(&self, max_bytes: u64, out: &mut Vec<OutFrame>) {
        let mut state = self.lock();
        let mut bytes = 0;
        while bytes < max_bytes {
            let Some(frame) = state.journal.poll_send() else {
                break;
            };
            let frame = match frame {
                Outgoing::Seal { epoch } => {
                    let cut_ms = state.cut_times.get(&epoch).copied().unwrap_or(0);
                    // Older cut times are no longer needed.
                    state.cut_times = state.cut_times.split_off(&epoch);
                    OutFrame::Seal { epoch, cut_ms }
                }
                Outgoing::Write {
                    epoch,
                    seq,
                    range,
                    payload,
                    direct,
                    fua,
                    gated,
                } => {
                    bytes += payload_len(&payload) + 48;
                    OutFrame::Write {
                        epoch,
                        seq,
                        range,
                        payload,
                        direct,
                        fua,
                        gated,
                    }
                }
                Outgoing::Ungate { epoch } => OutFrame::Ungate { epoch },
                Outgoing::Flush { seq } => OutFrame::Flush { seq },
                Outgoing::Discard { after } => OutFrame::Discard { after },
                Outgoing::SyncDone { epoch } => OutFrame::SyncDone { epoch },
                Outgoing::Verify { id, after } => match state.probes.get(id) {
                    Some(probe) => OutFrame::Verify {
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
        drop(state);
        self.changed.notify_all();
    }

    // ---- the DR side's answers ----

    /// A direct write or a flush was acknowledged.
    pub fn handle_ack(&self, seq: WriteSeq) {
        let pending = {
            let mut state = self.lock();
            state.answered_at_us = state.now_us();
            state.pending.remove(&seq)
        };
        match pending {
            Some(Pending::Write {
                ticket,
                token,
                mailbox,
                local_failed,
                ..
            }) => {
                if local_failed {
                    self.tracker.forget(ticket);
                } else {
                    self.tracker.redeem(ticket);
                }
                mailbox.deliver(token);
            }
            Some(Pending::Flush { token, mailbox }) => mailbox.deliver(token),
            Some(Pending::Extent {
                ticket,
                range,
                payload,
            }) => {
                self.tracker.redeem([ticket]);
                let mut state = self.lock();
                state.resync_acked += range.len;
                state.unacked_extent_bytes -= payload_len(&payload);
                drop(state);
                self.changed.notify_all();
            }
            None => tracing::debug!(%seq, "acknowledgement of nothing pending"),
        }
    }

    /// How long frames the DR side acknowledges one by one (hypermetro writes, flushes,
    /// direct resync extents) have waited with no answer; `None` when none waits.
    pub fn unanswered_for(&self) -> Option<Duration> {
        let state = self.lock();
        (!state.pending.is_empty())
            .then(|| Duration::from_micros(state.now_us().saturating_sub(state.answered_at_us)))
    }

    // ---- online verify ----

    /// Queues verify probe `id` behind everything queued so far. Returns false if nothing
    /// reaches the DR side now (no stream, or bitmap mode).
    pub fn push_verify(&self, id: ProbeId, probe: Probe) -> bool {
        let mut state = self.lock();
        let epochs = match state.live {
            Live::Tracked => return false,
            Live::Sync => false,
            Live::Journal => true,
        };
        if !state.journal.push_verify(id, epochs) {
            return false;
        }
        state.probes.insert(id, probe);
        drop(state);
        self.wake_sender.notify_one();
        true
    }

    /// The DR side compared probe `id`: these blocks differ there.
    pub fn handle_verified(&self, id: ProbeId, differing: &[u16]) {
        let mut state = self.lock();
        state.answered_at_us = state.now_us();
        state.probes.answer(id, differing);
        drop(state);
        self.changed.notify_all();
    }

    /// The probes answered (or lost) so far; waits up to `timeout` for one if none is.
    pub fn wait_verify_results(&self, timeout: Duration) -> Vec<(ProbeId, ProbeResult)> {
        let mut state = self.lock();
        let done = state.probes.take_done();
        if !done.is_empty() {
            return done;
        }
        let (mut state, _) = self
            .changed
            .wait_timeout(state, timeout)
            .unwrap_or_else(|e| e.into_inner());
        state.probes.take_done()
    }

    /// How long ago the DR side last refused a staged write for want of room in its stage
    /// log, if it did since the pair last went live.
    pub fn stage_full_for(&self) -> Option<Duration> {
        let state = self.lock();
        state
            .stage_full_at_us
            .map(|at| Duration::from_micros(state.now_us().saturating_sub(at)))
    }

    /// Copy the dirty blocks again (a verify's repair marked them): starts a catch-up.
    pub fn request_catch_up(&self) {
        let mut state = self.lock();
        if state.synchronous_in_a_group() {
            return self.trip_and_end_stream(state, "blocks must be copied again");
        }
        state.open_atomic_span();
        state.needs_catch_up = true;
    }

    /// The DR side synced every epoch ≤ `epoch` into its stage log.
    pub fn handle_staged(&self, epoch: Epoch) {
        let tickets = {
            let mut state = self.lock();
            state.answered_at_us = state.now_us();
            state.journal.handle_staged(epoch)
        };
        self.tracker.redeem(tickets);
        self.changed.notify_all();
    }

    /// The DR side rejected a frame: its CRC failed on the way (a direct one is sent again;
    /// a staged one spoils its unit, so the pair falls back to a catch-up), or its stage log
    /// is at its cap (the pair falls back to the bitmap, and catches up once there is room).
    pub fn handle_reject(&self, seq: WriteSeq, reason: RejectReason) {
        let mut state = self.lock();
        if reason == RejectReason::StageFull {
            if state.stage_full_at_us.is_none() {
                tracing::warn!(
                    "the DR side's stage log is full: the pair falls back to the bitmap"
                );
            }
            state.stage_full_at_us = Some(state.now_us());
        } else {
            self.counters
                .extents_rejected
                .fetch_add(1, Ordering::Relaxed);
        }
        match state.pending.remove(&seq) {
            Some(Pending::Write {
                ticket,
                token,
                mailbox,
                local_failed,
                range,
                payload,
                fua,
            }) => {
                let again = state.journal.push_direct(range, payload.clone(), fua);
                state.await_ack(
                    again,
                    Pending::Write {
                        ticket,
                        token,
                        mailbox,
                        local_failed,
                        range,
                        payload,
                        fua,
                    },
                );
            }
            Some(Pending::Extent {
                ticket,
                range,
                payload,
            }) => {
                let again = state.journal.push_direct(range, payload.clone(), false);
                state.await_ack(
                    again,
                    Pending::Extent {
                        ticket,
                        range,
                        payload,
                    },
                );
            }
            Some(flush @ Pending::Flush { .. }) => {
                state.await_ack(seq, flush);
            }
            None => {
                // A staged write: its epoch cannot be applied whole, nor any later one (the
                // DR side drops their writes and seals until the Discard this queues). Start
                // over from the bitmap.
                if state.synchronous_in_a_group() {
                    return self.trip_and_end_stream(state, "the DR side refused a staged write");
                }
                let forget = state.journal.spoiled();
                state.fall_back_to_the_bitmap();
                drop(state);
                self.tracker.forget(forget);
                self.wake_sender.notify_one();
                return;
            }
        }
        drop(state);
        self.wake_sender.notify_one();
    }

    // ---- the resync reader ----

    /// Waits until `bytes` more fit in the queue, and among the resync extents not yet
    /// acknowledged. Returns false if `stop` says to give up.
    pub fn wait_for_room(&self, bytes: u64, stop: &dyn Fn() -> bool) -> bool {
        self.wait_until(stop, |state| {
            let unacked = state.unacked_extent_bytes;
            state.journal.has_room(bytes)
                && (unacked == 0 || unacked + bytes <= state.journal.limit())
        })
    }

    /// Waits (the resync thread, blocking) until `ready` holds of the link's state, waking
    /// whenever frames are taken or answered. Returns false if `stop` says to give up.
    fn wait_until(&self, stop: &dyn Fn() -> bool, ready: impl Fn(&State) -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if stop() {
                return false;
            }
            if ready(&state) {
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the DR side has staged `end`, the catch-up's last epoch. Returns false
    /// if `stop` says to give up, or if the catch-up was given up before its seal was sent
    /// (that seal never will be).
    pub fn wait_for_catch_up_end(&self, end: Epoch, stop: &dyn Fn() -> bool) -> bool {
        let given_up = |state: &State| state.journal.mode() == Mode::Bitmap;
        self.wait_until(stop, |state| {
            state.journal.staged_epoch() >= end || given_up(state)
        }) && self.lock().journal.staged_epoch() >= end
    }

    /// Waits until every resync extent sent direct was acknowledged.
    pub fn wait_for_extents(&self, stop: &dyn Fn() -> bool) -> bool {
        // Once the stream must end, extents it dropped are neither pending nor on the DR
        // side: the wait lasts until the session stops the sync.
        self.wait_until(stop, |state| {
            state.end_stream.is_none()
                && !state
                    .pending
                    .values()
                    .any(|p| matches!(p, Pending::Extent { .. }))
        })
    }

    /// Queues an extent read for an initial sync: written direct on the DR side.
    pub fn push_sync_extent(&self, range: ByteRange, payload: Payload<Data>, ticket: Ticket) {
        let mut state = self.lock();
        state.unacked_extent_bytes += payload_len(&payload);
        let seq = state.journal.push_direct(range, payload.clone(), false);
        state.await_ack(
            seq,
            Pending::Extent {
                ticket,
                range,
                payload,
            },
        );
        drop(state);
        self.wake_sender.notify_one();
    }

    /// Admits a catch-up extent about to be read (its epoch is taken now, with its blocks
    /// locked).
    pub fn admit_catch_up_extent(&self) -> blockrep_core::replication::Admitted {
        self.lock().journal.admit()
    }

    /// Queues a catch-up extent: staged on the DR side until the catch-up's seal. Returns
    /// false if the catch-up was given up: the extent is dropped (its blocks stay dirty),
    /// and the reader stops.
    #[must_use]
    pub fn push_catch_up_extent(
        &self,
        admitted: blockrep_core::replication::Admitted,
        range: ByteRange,
        payload: Payload<Data>,
        ticket: Ticket,
    ) -> bool {
        let mut state = self.lock();
        let queued = state
            .journal
            .complete_resync(admitted, range, payload, ticket);
        drop(state);
        if queued {
            self.wake_sender.notify_one();
        } else {
            self.tracker.forget([ticket]);
        }
        queued
    }

    /// A catch-up extent admitted but not read (the read failed): it leaves its epoch
    /// without data, and its blocks stay dirty.
    pub fn abandon_catch_up_extent(&self, admitted: blockrep_core::replication::Admitted) {
        self.lock().journal.abandon(admitted);
    }

    /// The DR side recorded the end of the initial sync of `epoch` durably.
    pub fn handle_sync_done_ack(&self, epoch: Epoch) {
        let mut state = self.lock();
        state.answered_at_us = state.now_us();
        state.sync_done_acked = state.sync_done_acked.max(Some(epoch));
        drop(state);
        self.changed.notify_all();
    }

    /// Waits until the DR side recorded the end of the initial sync of `epoch` (or a later
    /// one). Returns false if `stop` says to give up.
    pub fn wait_for_sync_done(&self, epoch: Epoch, stop: &dyn Fn() -> bool) -> bool {
        self.wait_until(stop, |state| state.sync_done_acked >= Some(epoch))
    }

    /// Queues the end of an initial sync.
    pub fn push_sync_done(&self) -> Epoch {
        let mut state = self.lock();
        let direct = state.live == Live::Sync;
        let epoch = state.journal.push_sync_done(direct);
        drop(state);
        self.wake_sender.notify_one();
        epoch
    }

    /// Resync bytes acknowledged so far.
    pub fn resync_acked(&self) -> u64 {
        self.lock().resync_acked
    }

    pub fn reset_resync_progress(&self) {
        self.lock().resync_acked = 0;
    }
}

/// A frame taken for the sender.
#[derive(Debug)]
pub enum OutFrame {
    Write {
        epoch: Epoch,
        seq: WriteSeq,
        range: ByteRange,
        payload: Payload<Data>,
        direct: bool,
        fua: bool,
        gated: bool,
    },
    Ungate {
        epoch: Epoch,
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
    Verify {
        id: ProbeId,
        offset: u64,
        after: Option<Epoch>,
        crcs: Vec<u32>,
    },
}

fn payload_len(payload: &Payload<Data>) -> u64 {
    match payload {
        Payload::Data(d) => d.payload_len(),
        Payload::Zeroes => 0,
    }
}

fn to_payload(data: &ReplicaData) -> Option<Payload<Data>> {
    match data {
        ReplicaData::Data(bytes) => Some(Payload::Data(Data(bytes.clone()))),
        ReplicaData::Zeroes => Some(Payload::Zeroes),
        ReplicaData::Unchanged => None,
    }
}

impl ReplicaLink for PairLink {
    fn admit(&self, writes: &mut [Replicated]) {
        let mut state = self.lock();
        if !state.probes.is_empty() {
            for write in writes.iter() {
                state.probes.spoil(write.range);
            }
        }
        for write in writes.iter_mut() {
            write.mode = match state.live {
                Live::Tracked if matches!(self.model, ReplicationModel::Hypermetro) => {
                    ReplicaMode::Tracked
                }
                Live::Sync => ReplicaMode::Sync,
                // Async (and hypermetro's final pass): every write counts in its epoch, so
                // the epoch is not sealed before it completes, journaled or not.
                Live::Tracked | Live::Journal => ReplicaMode::Journal(state.journal.admit()),
            };
        }
        drop(state);
        let wants_ticket = |w: &Replicated| match w.mode {
            ReplicaMode::Sync => true,
            ReplicaMode::Journal(admitted) => admitted.journaled,
            ReplicaMode::Tracked => false,
        };
        let ranges: Vec<ByteRange> = writes
            .iter()
            .filter(|w| wants_ticket(w))
            .map(|w| w.range)
            .collect();
        if ranges.is_empty() {
            return;
        }
        let mut tickets = Vec::with_capacity(ranges.len());
        self.tracker.issue_tickets(ranges, &mut tickets);
        let mut tickets = tickets.into_iter();
        for write in writes.iter_mut().filter(|w| wants_ticket(w)) {
            write.ticket = tickets.next();
        }
    }

    fn start(&self, write: &mut Replicated, mailbox: &Arc<Mailbox>) {
        if write.mode != ReplicaMode::Sync {
            return;
        }
        self.send_sync(write, mailbox);
    }

    fn local_done(&self, mut write: Replicated, mailbox: &Arc<Mailbox>) -> AfterLocal {
        match write.mode {
            ReplicaMode::Tracked => self.lock().answer_or_hold(write.token, mailbox),
            ReplicaMode::Sync if write.sent => AfterLocal::WaitForPeer,
            ReplicaMode::Sync => {
                if self.send_sync(&mut write, mailbox) {
                    AfterLocal::WaitForPeer
                } else {
                    // The link went down since its admission (a slow-path write, or one
                    // parked while the activity log synced): a trip holds it like any other.
                    self.lock().answer_or_hold(write.token, mailbox)
                }
            }
            ReplicaMode::Journal(admitted) => {
                let mut state = self.lock();
                let was_idle = state.journal.nothing_to_send();
                let completed = match to_payload(&write.data) {
                    Some(payload) => {
                        state
                            .journal
                            .complete(admitted, write.range, payload, write.ticket)
                    }
                    None => {
                        state.journal.abandon(admitted);
                        Completed::NotJournaled
                    }
                };
                let overflowed = matches!(completed, Completed::Overflowed { .. });
                let mut cut = None;
                if overflowed {
                    if state.synchronous_in_a_group() {
                        cut = Some(state.end_stream_to_trip("the journal overflowed"));
                    } else {
                        state.fall_back_to_the_bitmap();
                    }
                }
                // The sender drains everything once woken: only the first frame after it
                // went idle needs to wake it.
                let wake = was_idle && !state.journal.nothing_to_send();
                // Decided under the same lock: a cut either came before (held) or after.
                let answer = state.answer_or_hold(write.token, mailbox);
                drop(state);
                if let Some(cut) = cut {
                    self.finish_cut_off(cut);
                }
                match completed {
                    Completed::Queued => {}
                    Completed::NotJournaled => self.tracker.forget(write.ticket),
                    Completed::Overflowed { forget } => {
                        self.counters.overflows.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("journal full: the pair falls back to bitmap mode");
                        self.tracker.forget(forget);
                    }
                }
                if wake {
                    self.wake_sender.notify_one();
                }
                answer
            }
        }
    }

    fn local_failed(&self, write: Replicated, mailbox: &Arc<Mailbox>) -> AfterLocal {
        match write.mode {
            ReplicaMode::Sync if write.sent => {
                // The DR side has the data; this side's blocks hold whatever the failed
                // write left. They stay dirty (the peer's answer forgets the ticket), and a
                // catch-up makes the two the same again.
                let mut state = self.lock();
                let answered = match write.seq.and_then(|seq| state.pending.get_mut(&seq)) {
                    Some(Pending::Write { local_failed, .. }) => {
                        *local_failed = true;
                        false
                    }
                    _ => true,
                };
                let cut = state.catch_up_failed_write();
                drop(state);
                if let Some(cut) = cut {
                    self.finish_cut_off(cut);
                }
                // If the peer's answer came first, it cleared them.
                if answered && let Err(e) = self.tracker.mark_durably(&[write.range]) {
                    tracing::error!(
                        range = %write.range,
                        error = %e,
                        "cannot mark a write that failed here dirty again"
                    );
                }
                AfterLocal::WaitForPeer
            }
            ReplicaMode::Journal(admitted) => {
                let mut state = self.lock();
                state.journal.abandon(admitted);
                let cut = state.catch_up_failed_write();
                let answer = state.answer_or_hold(write.token, mailbox);
                drop(state);
                if let Some(cut) = cut {
                    self.finish_cut_off(cut);
                }
                self.tracker.forget(write.ticket);
                answer
            }
            _ => {
                self.tracker.forget(write.ticket);
                let mut state = self.lock();
                let cut = state.catch_up_failed_write();
                let answer = state.answer_or_hold(write.token, mailbox);
                drop(state);
                if let Some(cut) = cut {
                    self.finish_cut_off(cut);
                }
                answer
            }
        }
    }

    fn flush(&self, token: AnswerToken, mailbox: &Arc<Mailbox>) -> AfterLocal {
        let mut state = self.lock();
        if state.live != Live::Sync {
            return AfterLocal::Answer;
        }
        let seq = state.journal.push_flush();
        state.await_ack(
            seq,
            Pending::Flush {
                token,
                mailbox: Arc::clone(mailbox),
            },
        );
        drop(state);
        self.wake_sender.notify_one();
        AfterLocal::WaitForPeer
    }
}

impl PairLink {
    /// Queues a hypermetro write's frame, unless the link went down since its admission.
    /// Returns whether the peer will answer it.
    fn send_sync(&self, write: &mut Replicated, mailbox: &Arc<Mailbox>) -> bool {
        let mut state = self.lock();
        let Some(payload) = to_payload(&write.data) else {
            drop(state);
            self.tracker.forget(write.ticket.take());
            return false;
        };
        if state.live != Live::Sync {
            drop(state);
            self.tracker.forget(write.ticket.take());
            return false;
        }
        let was_idle = state.journal.nothing_to_send();
        let seq = state
            .journal
            .push_direct(write.range, payload.clone(), write.fua);
        state.await_ack(
            seq,
            Pending::Write {
                ticket: write.ticket.take(),
                token: write.token,
                mailbox: Arc::clone(mailbox),
                local_failed: false,
                range: write.range,
                payload,
                fua: write.fua,
            },
        );
        let wake = was_idle && !state.journal.nothing_to_send();
        drop(state);
        write.sent = true;
        write.seq = Some(seq);
        if wake {
            self.wake_sender.notify_one();
        }
        true
    }
}

fn deliver_held(held: Vec<HeldAnswer>) {
    for (token, mailbox, _) in held {
        mailbox.deliver(token);
    }
}

#[cfg(test)]
mod tests {
    use blockrep_volume::{TrackerConfig, Waker};

    use super::*;
    use crate::clock::ManualClock;

    const TRIPPED: RoundOutcome = RoundOutcome {
        tripped: true,
        synchronous: false,
    };
    const SYNCHRONOUS: RoundOutcome = RoundOutcome {
        tripped: false,
        synchronous: true,
    };

    fn async_link(dir: &std::path::Path) -> PairLink {
        live_link(dir, ReplicationModel::Async)
    }

    /// A link of `model` over a 16 MiB volume, its stream accepted and live.
    fn live_link(dir: &std::path::Path, model: ReplicationModel) -> PairLink {
        live_link_on(dir, model, Arc::new(ManualClock::default()))
    }

    /// A link of `model` over a 16 MiB volume whose DR side staged `staged`, with a journal
    /// of `journal_bytes`, its time read from `clock`; not connected.
    fn new_link(
        dir: &std::path::Path,
        model: ReplicationModel,
        journal_bytes: u64,
        staged: Epoch,
        clock: Arc<ManualClock>,
    ) -> PairLink {
        let (tracker, _) = DirtyTracker::open(dir, 16 << 20, TrackerConfig::default()).unwrap();
        PairLink::new(model, Arc::new(tracker), journal_bytes, staged, clock)
    }

    /// As [`live_link`], its time read from `clock`.
    fn live_link_on(
        dir: &std::path::Path,
        model: ReplicationModel,
        clock: Arc<ManualClock>,
    ) -> PairLink {
        let link = new_link(dir, model, 64 << 20, Epoch(1), clock);
        link.connected(Epoch(1));
        link.go_live();
        link
    }

    /// Admits one 4 KiB write at `offset` (its bits set, then the link's admission).
    fn admitted(link: &PairLink, offset: u64, token: u64) -> Replicated {
        let range = ByteRange::new(offset, 4096);
        link.tracker.admit(&[range]).unwrap();
        let mut w = [Replicated::new(
            range,
            ReplicaData::Data(Bytes::from(vec![token as u8; 4096])),
            false,
            AnswerToken(token),
        )];
        link.admit(&mut w);
        let [w] = w;
        w
    }

    /// Admits and completes one 4 KiB write at `offset`; returns its answer and epoch.
    fn write(
        link: &PairLink,
        mailbox: &Arc<Mailbox>,
        offset: u64,
        token: u64,
    ) -> (AfterLocal, Epoch) {
        let w = admitted(link, offset, token);
        let ReplicaMode::Journal(admitted) = w.mode else {
            panic!("an async write is journaled");
        };
        (link.local_done(w, mailbox), admitted.epoch)
    }

    fn delivered(mailbox: &Mailbox) -> Vec<u64> {
        let mut out = Vec::new();
        mailbox.take(&mut out);
        assert!(out.iter().all(|d| d.failed.is_none()), "{out:?}");
        out.into_iter().map(|d| d.token.0).collect()
    }

    #[test]
    fn a_group_cut_holds_answers_until_its_release_and_switches_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let link = async_link(dir.path());
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        assert_eq!(write(&link, &mailbox, 0, 1), (AfterLocal::Answer, Epoch(2)));

        assert_eq!(
            link.group_cut(Epoch(7), CutMode::Keep, 0),
            (Epoch(1), false),
            "the DR side staged epoch 1"
        );
        assert!(link.grouped());
        // Completing during the cut: admitted in the new epoch, answered at the release.
        assert_eq!(
            write(&link, &mailbox, 4096, 2),
            (AfterLocal::WaitForPeer, Epoch(7))
        );
        assert_eq!(
            write(&link, &mailbox, 8192, 3),
            (AfterLocal::WaitForPeer, Epoch(7))
        );
        assert!(delivered(&mailbox).is_empty());
        // A release of an older cut leaves it held; this cut's release gives the answers.
        link.group_release(Epoch(6), RoundOutcome::default(), 0);
        assert!(delivered(&mailbox).is_empty());
        link.group_release(Epoch(7), RoundOutcome::default(), 0);
        assert_eq!(delivered(&mailbox), vec![2, 3]);
        assert_eq!(write(&link, &mailbox, 0, 4), (AfterLocal::Answer, Epoch(7)));
        // The epoch before the cut is sealed, and the pair no longer cuts on its own.
        let mut frames = Vec::new();
        link.take_frames(u64::MAX, &mut frames);
        assert!(
            frames
                .iter()
                .any(|f| matches!(f, OutFrame::Seal { epoch, .. } if *epoch == Epoch(6))),
            "{frames:?}"
        );
    }

    #[test]
    fn a_pair_that_missed_the_cut_switches_at_the_release_and_holds_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::default());
        let link = live_link_on(dir.path(), ReplicationModel::Async, Arc::clone(&clock));
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        link.group_release(Epoch(3), RoundOutcome::default(), 0);
        assert_eq!(write(&link, &mailbox, 0, 1), (AfterLocal::Answer, Epoch(3)));
        // The hold counts from the cut, not from the clock's start.
        clock.advance(Duration::from_secs(10));
        link.group_cut(Epoch(4), CutMode::Keep, 0);
        assert_eq!(write(&link, &mailbox, 0, 2).0, AfterLocal::WaitForPeer);
        let timeout = Duration::from_secs(2);
        clock.advance(Duration::from_millis(1999));
        link.release_held_longer_than(timeout);
        assert!(delivered(&mailbox).is_empty(), "held 1.999 s of 2");
        clock.advance(Duration::from_millis(1));
        link.release_held_longer_than(timeout);
        assert_eq!(delivered(&mailbox), vec![2]);
        // Leaving the group gives what is held and answers at once again.
        link.group_cut(Epoch(5), CutMode::Keep, 0);
        assert_eq!(write(&link, &mailbox, 0, 3).0, AfterLocal::WaitForPeer);
        link.set_grouped(false);
        assert_eq!(delivered(&mailbox), vec![3]);
        assert_eq!(write(&link, &mailbox, 0, 4).0, AfterLocal::Answer);
    }

    /// The link of an async pair whose agent starts in its group, which it last switched to
    /// epoch `to` of.
    fn async_link_starting_in_group(dir: &std::path::Path, to: Epoch) -> PairLink {
        let clock = Arc::new(ManualClock::default());
        let link = new_link(dir, ReplicationModel::Async, 64 << 20, Epoch::ZERO, clock);
        link.start_in_group(to);
        link
    }

    /// An agent restarted just after it switched at a cut, and the round may still be
    /// running: another host may admit in the epoch before, so what it answers now could be
    /// a write another host's write in that epoch depends on, committed without it.
    #[test]
    fn an_agent_starting_in_a_group_holds_answers_until_the_release_of_its_last_cut() {
        let dir = tempfile::tempdir().unwrap();
        let link = async_link_starting_in_group(dir.path(), Epoch(91));
        assert_eq!(link.current_epoch(), Epoch(91));
        link.connected(Epoch(89));
        link.go_live();
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        assert_eq!(
            write(&link, &mailbox, 0, 1),
            (AfterLocal::WaitForPeer, Epoch(91))
        );
        link.group_release(Epoch(90), RoundOutcome::default(), 0);
        assert!(delivered(&mailbox).is_empty(), "an older release");
        link.group_release(Epoch(91), RoundOutcome::default(), 0);
        assert_eq!(delivered(&mailbox), vec![1]);
        assert_eq!(write(&link, &mailbox, 0, 2).0, AfterLocal::Answer);
        // With no release (the coordinator is away), the hold times out like a cut's,
        // counted from the start.
        let clock = Arc::new(ManualClock::default());
        clock.advance(Duration::from_secs(60));
        let link = live_link_on(dir.path(), ReplicationModel::Async, Arc::clone(&clock));
        link.start_in_group(Epoch(5));
        assert_eq!(write(&link, &mailbox, 0, 3).0, AfterLocal::WaitForPeer);
        clock.advance(Duration::from_millis(1999));
        link.release_held_longer_than(Duration::from_secs(2));
        assert!(delivered(&mailbox).is_empty());
        clock.advance(Duration::from_millis(1));
        link.release_held_longer_than(Duration::from_secs(2));
        assert_eq!(delivered(&mailbox), vec![3]);
    }

    /// An agent killed after its catch-up's end was staged but before a cut ack said the
    /// unit closed: restarted, it must report the unit's span again, or its group could
    /// commit an epoch inside it (the DR side applies staged writes up to the commit).
    #[test]
    fn a_restarted_agent_reports_the_unit_it_was_making_until_it_goes_live() {
        let dir = tempfile::tempdir().unwrap();
        let link = async_link_starting_in_group(dir.path(), Epoch(91));
        link.resume_unit(Epoch(87));
        assert_eq!(link.unit_in_progress(), Some(Epoch(87)));
        link.connected(Epoch(90));
        // A catch-up goes on with the same unit, from the older start.
        link.begin_catch_up();
        assert_eq!(
            link.atomic_spans(),
            vec![AtomicSpan {
                from: Epoch(87),
                to: None
            }]
        );
        assert!(link.begin_final_pass());
        let end = link.finish_catch_up().expect("the catch-up ran whole");
        assert_eq!(
            link.atomic_spans(),
            vec![AtomicSpan {
                from: Epoch(87),
                to: Some(end)
            }]
        );
        assert_eq!(link.unit_in_progress(), None);
        // With nothing to catch up, going live closes it at the current epoch.
        let link = async_link(dir.path());
        link.resume_unit(Epoch(0));
        link.go_live();
        assert_eq!(
            link.atomic_spans(),
            vec![AtomicSpan {
                from: Epoch(0),
                to: Some(link.current_epoch())
            }]
        );
    }

    /// A hypermetro link of a group, connected, with a journal of `journal_bytes`.
    fn hypermetro_link_with(dir: &std::path::Path, journal_bytes: u64) -> PairLink {
        let clock = Arc::new(ManualClock::default());
        let link = new_link(
            dir,
            ReplicationModel::Hypermetro,
            journal_bytes,
            Epoch(1),
            clock,
        );
        link.set_grouped(true);
        link.connected(Epoch(1));
        link
    }

    fn hypermetro_link(dir: &std::path::Path) -> PairLink {
        hypermetro_link_with(dir, 64 << 20)
    }

    /// A hypermetro link of a group that went synchronous at the direct cut to epoch 5.
    fn synchronous_group_link(dir: &std::path::Path) -> PairLink {
        let link = hypermetro_link(dir);
        link.go_live();
        link.group_cut(Epoch(5), CutMode::Direct, 0);
        link.group_release(Epoch(5), SYNCHRONOUS, 0);
        link
    }

    /// Admits and starts one 4 KiB write at `offset`; returns it, ready for `local_done`.
    fn admit(link: &PairLink, mailbox: &Arc<Mailbox>, offset: u64, token: u64) -> Replicated {
        let mut w = admitted(link, offset, token);
        link.start(&mut w, mailbox);
        w
    }

    /// The peer timeout and the stage-full retry read how long ago something happened from
    /// the link's clock.
    #[test]
    fn how_long_the_peer_has_not_answered_and_its_stage_log_was_full_follow_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::default());
        let link = live_link_on(dir.path(), ReplicationModel::Hypermetro, Arc::clone(&clock));
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        clock.advance(Duration::from_secs(7));
        assert_eq!(link.unanswered_for(), None, "nothing waits");
        let w = admit(&link, &mailbox, 0, 1);
        clock.advance(Duration::from_millis(2500));
        assert_eq!(link.unanswered_for(), Some(Duration::from_millis(2500)));
        link.handle_ack(w.seq.expect("sent direct"));
        assert_eq!(link.unanswered_for(), None);

        assert_eq!(link.stage_full_for(), None);
        link.handle_reject(WriteSeq(999), RejectReason::StageFull);
        clock.advance(Duration::from_secs(3));
        assert_eq!(link.stage_full_for(), Some(Duration::from_secs(3)));
        link.go_live();
        assert_eq!(link.stage_full_for(), None, "going live forgets it");
    }

    #[test]
    fn a_grouped_hypermetro_pair_journals_until_its_group_goes_synchronous() {
        let dir = tempfile::tempdir().unwrap();
        let link = hypermetro_link(dir.path());
        link.go_live();
        assert_eq!(
            link.live(),
            Live::Journal,
            "grouped: not synchronous on its own"
        );
        // The direct cut: synchronous, gated; the release of a cut every host switched at
        // queues the Ungate behind the gated writes.
        assert!(link.group_cut(Epoch(5), CutMode::Direct, 0).1);
        assert!(link.gated());
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        let w = admit(&link, &mailbox, 0, 1);
        assert_eq!(link.local_done(w, &mailbox), AfterLocal::WaitForPeer);
        link.group_release(Epoch(5), SYNCHRONOUS, 0);
        assert!(!link.gated());
        let mut frames = Vec::new();
        link.take_frames(u64::MAX, &mut frames);
        let gated = frames
            .iter()
            .position(|f| matches!(f, OutFrame::Write { gated: true, .. }));
        let ungate = frames
            .iter()
            .position(|f| matches!(f, OutFrame::Ungate { epoch } if *epoch == Epoch(5)));
        assert!(gated.is_some() && gated < ungate, "{frames:?}");
    }

    #[test]
    fn a_synchronous_pair_of_a_group_holds_its_answers_until_the_trip_cut() {
        let dir = tempfile::tempdir().unwrap();
        let link = synchronous_group_link(dir.path());
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        let w = admit(&link, &mailbox, 0, 1);
        assert_eq!(link.local_done(w, &mailbox), AfterLocal::WaitForPeer);
        // The link breaks: the waiting write is not answered, nor a later one.
        link.disconnected();
        assert!(link.trip_wanted());
        assert_eq!(link.live(), Live::Tracked);
        let w = admit(&link, &mailbox, 8192, 2);
        assert_eq!(link.local_done(w, &mailbox), AfterLocal::WaitForPeer);
        assert!(delivered(&mailbox).is_empty());
        // A hold timeout and an epoch cut's release do not give them.
        link.release_held_longer_than(Duration::ZERO);
        link.group_cut(Epoch(6), CutMode::Keep, 0);
        link.group_release(Epoch(6), RoundOutcome::default(), 0);
        assert!(delivered(&mailbox).is_empty());
        // Nor the release of a trip cut that was abandoned (a host may not have switched).
        link.group_cut(Epoch(7), CutMode::Trip, 0);
        assert!(delivered(&mailbox).is_empty());
        link.group_release(Epoch(7), RoundOutcome::default(), 0);
        link.release_held_longer_than(Duration::ZERO);
        assert!(delivered(&mailbox).is_empty());
        assert!(link.trip_wanted());
        // The release of a trip cut every host switched at does.
        link.group_cut(Epoch(8), CutMode::Trip, 0);
        link.group_release(Epoch(8), TRIPPED, 0);
        assert!(!link.trip_wanted());
        assert_eq!(delivered(&mailbox), vec![1, 2]);
    }

    #[test]
    fn a_trip_holds_writes_that_did_not_take_the_fast_path_too() {
        let dir = tempfile::tempdir().unwrap();
        let link = synchronous_group_link(dir.path());
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        // Admitted while synchronous, but not started (an unaligned write, a WRITE_ZEROES or
        // a TRIM runs on the slow path; a write parked while the activity log synced): its
        // data goes at completion, after the link broke.
        let synchronous = |offset: u64, token: u64| {
            let w = admitted(&link, offset, token);
            assert_eq!(w.mode, ReplicaMode::Sync);
            w
        };
        let (slow, failing, unchanged) = (
            synchronous(0, 1),
            synchronous(8192, 2),
            synchronous(16384, 3),
        );
        link.disconnected();
        assert!(link.trip_wanted());
        assert_eq!(link.local_done(slow, &mailbox), AfterLocal::WaitForPeer);
        assert_eq!(
            link.local_failed(failing, &mailbox),
            AfterLocal::WaitForPeer
        );
        let mut unchanged = unchanged;
        unchanged.data = ReplicaData::Unchanged;
        assert_eq!(
            link.local_done(unchanged, &mailbox),
            AfterLocal::WaitForPeer
        );
        assert!(delivered(&mailbox).is_empty());
        link.group_cut(Epoch(6), CutMode::Trip, 0);
        link.group_release(Epoch(6), TRIPPED, 0);
        assert_eq!(delivered(&mailbox), vec![1, 2, 3]);
    }

    #[test]
    fn a_demoted_side_fails_the_answers_its_trip_held() {
        let dir = tempfile::tempdir().unwrap();
        let link = hypermetro_link(dir.path());
        link.start_tripped();
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        let w = admit(&link, &mailbox, 0, 1);
        assert_eq!(link.local_done(w, &mailbox), AfterLocal::WaitForPeer);
        link.disconnected();
        link.fail_held(libc::EIO);
        let mut out = Vec::new();
        mailbox.take(&mut out);
        assert_eq!(
            out,
            vec![blockrep_volume::Delivery {
                token: AnswerToken(1),
                failed: Some(libc::EIO)
            }]
        );
    }

    #[test]
    fn a_trip_release_gives_only_a_hold_its_trip_cut_reached() {
        let dir = tempfile::tempdir().unwrap();
        let link = hypermetro_link(dir.path());
        // An agent starting with its pair in a hypermetro group: writes are tracked, their
        // answers held.
        link.start_tripped();
        assert!(link.trip_wanted());
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        let w = admit(&link, &mailbox, 0, 1);
        assert_eq!(link.local_done(w, &mailbox), AfterLocal::WaitForPeer);
        // A late release of an earlier trip does not give it.
        link.group_release(Epoch(6), TRIPPED, 0);
        assert!(delivered(&mailbox).is_empty());
        link.group_cut(Epoch(7), CutMode::Trip, 0);
        link.group_release(Epoch(7), TRIPPED, 0);
        assert_eq!(delivered(&mailbox), vec![1]);
    }

    /// A stream's acknowledged `SyncDone` does not answer a later stream's: a hypermetro
    /// pair's ends always carry epoch 0, so a second full sync would otherwise be recorded
    /// done the moment it queued its `SyncDone`, before the DR side had it.
    #[test]
    fn a_sync_done_acknowledged_on_an_earlier_stream_does_not_end_a_later_sync() {
        let dir = tempfile::tempdir().unwrap();
        let link = live_link(dir.path(), ReplicationModel::Hypermetro);
        let first = link.push_sync_done();
        link.handle_sync_done_ack(first);
        assert!(link.wait_for_sync_done(first, &|| false));

        link.disconnected();
        link.connected(Epoch(1));
        link.go_live();
        let second = link.push_sync_done();
        let checks = std::cell::Cell::new(0);
        let give_up_after_one_look = || {
            checks.set(checks.get() + 1);
            checks.get() > 1
        };
        assert!(
            !link.wait_for_sync_done(second, &give_up_after_one_look),
            "the later sync is not done until its own SyncDone is acknowledged"
        );
        link.handle_sync_done_ack(second);
        assert!(link.wait_for_sync_done(second, &|| false));
    }

    /// A hypermetro write whose peer answered before its local write failed: the peer's
    /// answer cleared its blocks, but production's blocks are not what the DR side has.
    /// They are dirty again, and a catch-up is due. (The same with the local failure first:
    /// the peer's answer then leaves them dirty.)
    #[test]
    fn a_hypermetro_write_failing_locally_leaves_its_blocks_dirty_whichever_answer_comes_first() {
        for peer_first in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let link = live_link(dir.path(), ReplicationModel::Hypermetro);
            assert_eq!(link.live(), Live::Sync);
            let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
            let w = admit(&link, &mailbox, 8192, 1);
            let (range, seq) = (w.range, w.seq.expect("sent"));
            if peer_first {
                link.handle_ack(seq);
                assert!(!link.tracker.any_dirty(range), "the answer cleared it");
            }
            assert_eq!(link.local_failed(w, &mailbox), AfterLocal::WaitForPeer);
            if !peer_first {
                link.handle_ack(seq);
            }
            assert!(
                link.tracker.any_dirty(range),
                "peer first: {peer_first}: the failed write's blocks are clean"
            );
            assert!(
                link.needs_catch_up(),
                "peer first: {peer_first}: no catch-up is due"
            );
        }
    }

    /// A synchronous pair of a consistency group that must fall back to the bitmap (a
    /// write failed here, sent or not; the DR side refused a staged write) leaves as when
    /// its link breaks, at once: it trips, and its stream must end. A write that was still
    /// waiting for the DR side, and every later one (tracked), is answered only at the
    /// group's trip cut, so none can have a dependant reach another pair's DR side first;
    /// a trip cut that comes before the session has ended the stream still counts.
    #[test]
    fn a_grouped_synchronous_pair_falling_back_to_the_bitmap_trips_and_ends_its_stream() {
        for case in [
            "failed after it was sent",
            "failed before",
            "a staged write refused",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let link = synchronous_group_link(dir.path());
            assert_eq!(link.live(), Live::Sync);
            let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
            // A write sent, done here, waiting for the DR side.
            let waiting = admit(&link, &mailbox, 0, 10);
            assert_eq!(link.local_done(waiting, &mailbox), AfterLocal::WaitForPeer);
            let failed = match case {
                "failed after it was sent" => Some(admit(&link, &mailbox, 8192, 1)),
                "failed before" => Some(admitted(&link, 8192, 1)),
                _ => None,
            };
            if let Some(w) = failed {
                let range = w.range;
                let _ = link.local_failed(w, &mailbox);
                assert!(link.tracker.any_dirty(range), "{case}");
            } else {
                link.handle_reject(WriteSeq(999), RejectReason::StageFull);
            }
            assert!(
                link.stream_must_end().is_some(),
                "{case}: the stream goes on"
            );
            assert!(link.trip_wanted(), "{case}: no trip");
            assert_eq!(link.live(), Live::Tracked, "{case}: still synchronous");
            let later = admit(&link, &mailbox, 65536, 2);
            assert_eq!(later.mode, ReplicaMode::Tracked, "{case}");
            assert_eq!(link.local_done(later, &mailbox), AfterLocal::WaitForPeer);

            // The group's trip cut reaches the host before the session ended the stream.
            link.group_cut(Epoch(6), CutMode::Trip, 0);
            link.disconnected();
            assert!(link.stream_must_end().is_none());
            let mut out = Vec::new();
            mailbox.take(&mut out);
            assert!(
                out.iter()
                    .all(|d| d.token != AnswerToken(10) && d.token != AnswerToken(2)),
                "{case}: answered before the trip cut's release: {out:?}"
            );
            link.group_release(Epoch(6), TRIPPED, 0);
            mailbox.take(&mut out);
            let tokens: Vec<u64> = out.iter().map(|d| d.token.0).collect();
            assert!(
                tokens.contains(&10) && tokens.contains(&2),
                "{case}: the trip's release did not give them: {out:?}"
            );
        }
    }

    /// A journaled write admitted before the group's direct cut and completing after it
    /// overflows the journal: the pair is synchronous by then, so it trips with its group
    /// and ends its stream, as when a write fails here, instead of falling back alone.
    #[test]
    fn a_journal_overflow_right_after_a_direct_cut_trips_the_group_and_ends_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let link = hypermetro_link_with(dir.path(), 8192);
        link.go_live();
        assert_eq!(
            link.live(),
            Live::Journal,
            "a grouped pair journals until a direct cut"
        );
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        // The journal full to its bound, and one more write admitted, not yet done.
        for (offset, token) in [(0, 1), (4096, 2)] {
            assert_eq!(write(&link, &mailbox, offset, token).0, AfterLocal::Answer);
        }
        let late = admitted(&link, 8192, 3);
        link.group_cut(Epoch(5), CutMode::Direct, 0);
        link.group_release(Epoch(5), SYNCHRONOUS, 0);
        assert_eq!(link.live(), Live::Sync);
        assert!(link.stream_must_end().is_none());
        let range = late.range;
        assert_eq!(link.local_done(late, &mailbox), AfterLocal::WaitForPeer);
        assert_eq!(link.stream_must_end(), Some("the journal overflowed"));
        assert!(link.trip_wanted(), "no trip");
        assert_eq!(link.live(), Live::Tracked);
        assert!(link.tracker.any_dirty(range), "its blocks stay dirty");
    }

    /// A verify that finds blocks to copy again asks for a catch-up; a synchronous pair of
    /// a group trips for it instead of leaving synchronous replication alone. And once the
    /// stream must end, an initial sync is never taken for done: the extents the cut-off
    /// dropped were not acknowledged.
    #[test]
    fn a_grouped_synchronous_pair_asked_to_catch_up_trips_and_its_sync_is_not_done() {
        let dir = tempfile::tempdir().unwrap();
        let link = synchronous_group_link(dir.path());
        assert_eq!(link.live(), Live::Sync);
        link.request_catch_up();
        assert!(link.trip_wanted(), "no trip");
        assert_eq!(link.live(), Live::Tracked);
        assert!(
            !link.needs_catch_up(),
            "a catch-up on the stream that must end"
        );
        assert!(link.stream_must_end().is_some());
        let checks = std::cell::Cell::new(0);
        let give_up_after_two_looks = || {
            checks.set(checks.get() + 1);
            checks.get() > 2
        };
        assert!(
            !link.wait_for_extents(&give_up_after_two_looks),
            "the sync's extents were taken for acknowledged"
        );
    }
}
