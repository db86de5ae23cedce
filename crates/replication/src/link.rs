//! The production half of a pair, as the write path sees it: [`PairLink`] sits in the
//! volume's write gate and is the shell of the pair's machine
//! ([`blockrep_core::pair::production::Production`], which makes every decision and says
//! how live writes are handled in each mode).
//!
//! The shell holds the machine under one lock, hands each event the time from the agent's
//! one [`Clock`], and once the lock is released does what the event's [`Effects`] ask:
//! redeems or forgets tickets in the dirty tracker, gives answers to the connections'
//! mailboxes, wakes the sender and the resync reader, counts and logs. After each event it
//! checks the machine's invariants and publishes its [`PairState`] to whoever watches it
//! (the pair's session task). The pair's tasks
//! take frames with [`PairLink::take_frames`] and hand the DR side's answers back through
//! the `handle_*` methods.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use blockrep_core::ByteRange;
use blockrep_core::pair::atomic_spans::AtomicSpan;
use blockrep_core::pair::hold_times::HoldSummary;
use blockrep_core::pair::probes::{Probe, ProbeResult};
use blockrep_core::pair::production::{Effects, LocalWrite, Production, Transmit};
use blockrep_core::pair::state::{IllegalTransition, PairState};
use blockrep_core::replication::group_cut::{CutMode, Live, RoundOutcome};
use blockrep_core::replication::{
    Admitted, Epoch, Payload, PayloadLen, ProbeId, RejectReason, ReplicationModel, Ticket, WriteSeq,
};
use blockrep_volume::{
    AfterLocal, AnswerToken, DirtyTracker, Mailbox, ReplicaData, ReplicaLink, ReplicaMode,
    Replicated,
};
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

/// The production machine as the agent runs it: payloads are shared buffers, answers go to
/// a connection's mailbox.
type Machine = Production<Data, Arc<Mailbox>>;

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

pub struct PairLink {
    clock: Arc<dyn Clock>,
    tracker: Arc<DirtyTracker>,
    machine: Mutex<Machine>,
    /// The machine's state, published after each event that changes it.
    state: tokio::sync::watch::Sender<PairState>,
    /// An invariant broke (logged once, in a release build).
    broken: AtomicBool,
    /// Signalled when frames are taken (room for the resync reader) or answered.
    changed: Condvar,
    /// Signalled when sealed epochs' blocks become due to be digested. The digest thread,
    /// which lives as long as the session, waits on this alone: `changed` fires for every
    /// batch of frames the sender takes, and waking a thread per batch costs the production
    /// host's core a context switch and the machine's lock each time.
    digests_became_due: Condvar,
    /// Wakes the sender task.
    pub wake_sender: tokio::sync::Notify,
    pub counters: Arc<PairCounters>,
}

impl PairLink {
    /// The link of a pair that starts in `state` (connecting, unless its agent restarted
    /// it unconfirmed, paused or demoted).
    pub fn new(
        model: ReplicationModel,
        tracker: Arc<DirtyTracker>,
        journal_bytes: u64,
        staged: Epoch,
        state: PairState,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            clock,
            tracker,
            machine: Mutex::new(Production::new(model, journal_bytes, staged).starting_in(state)),
            state: tokio::sync::watch::Sender::new(state),
            broken: AtomicBool::new(false),
            changed: Condvar::new(),
            digests_became_due: Condvar::new(),
            wake_sender: tokio::sync::Notify::new(),
            counters: Arc::new(PairCounters::default()),
        }
    }

    /// The wall time on the link's clock (ms since the Unix epoch).
    pub fn wall_ms(&self) -> u64 {
        self.clock.wall_ms()
    }

    fn now_us(&self) -> u64 {
        self.clock.monotonic_us()
    }

    pub fn model(&self) -> ReplicationModel {
        self.lock().model()
    }

    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }

    /// The machine, to read it.
    fn lock(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The machine, to apply an event to it: when the guard goes, the invariants are
    /// checked and a new state is published.
    fn stepping(&self) -> Stepping<'_> {
        let machine = self.lock();
        let before = machine.state();
        let digests_were_due = machine.digests_due();
        Stepping {
            link: self,
            machine,
            before,
            digests_were_due,
        }
    }

    /// Applies one event to the machine under the lock, then does what it asks.
    fn step<T>(&self, event: impl FnOnce(&mut Machine) -> (T, Effects<Arc<Mailbox>>)) -> T {
        let (out, effects) = event(&mut self.stepping());
        self.carry_out(effects);
        out
    }

    /// After an event: a broken invariant is a bug that may lose track of a write. A debug
    /// build (every test) stops at once; a release build says so, once, and goes on.
    fn check(&self, machine: &Machine) {
        let Err(broken) = machine.check_invariants() else {
            return;
        };
        if cfg!(debug_assertions) {
            panic!("the pair's machine broke an invariant: {broken}");
        }
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::error!(%broken, "the pair's machine broke an invariant");
        }
    }

    /// As [`PairLink::step`], for an event that returns only effects.
    fn apply(&self, event: impl FnOnce(&mut Machine) -> Effects<Arc<Mailbox>>) {
        self.step(|m| ((), event(m)));
    }

    /// Does what an event's effects ask, the machine's lock released: the tracker first (a
    /// write's blocks are clean or dirty before its answer is given), then the answers,
    /// then the wake-ups.
    fn carry_out(&self, fx: Effects<Arc<Mailbox>>) {
        if fx.is_empty() {
            return;
        }
        if fx.overflowed {
            self.counters.overflows.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("journal full: the pair falls back to bitmap mode");
            // The journal's data was just freed, and the catch-up reads again (up to its
            // read-ahead).
            let _ = crate::memory_release::release_freed();
        }
        if fx.corrupted_in_transit {
            self.counters
                .extents_rejected
                .fetch_add(1, Ordering::Relaxed);
        }
        if fx.stage_full_began {
            tracing::warn!("the DR side's stage log is full: the pair falls back to the bitmap");
        }
        if !fx.forget.is_empty() {
            self.tracker.forget(fx.forget);
        }
        if !fx.redeem.is_empty() {
            self.tracker.redeem(fx.redeem);
        }
        if let Some(range) = fx.mark_dirty
            && let Err(e) = self.tracker.mark_durably(&[range])
        {
            tracing::error!(
                %range,
                error = %e,
                "cannot mark a write that failed here dirty again"
            );
        }
        for (token, mailbox) in fx.answers {
            mailbox.deliver(token);
        }
        if fx.wake_sender {
            self.wake_sender.notify_one();
        }
        if fx.notify {
            self.changed.notify_all();
        }
    }

    // ---- what the pair is ----

    pub fn state(&self) -> PairState {
        *self.state.borrow()
    }

    /// Watches the pair's state (the session task waits on it).
    pub fn states(&self) -> tokio::sync::watch::Receiver<PairState> {
        self.state.subscribe()
    }

    pub fn live(&self) -> Live {
        self.lock().live()
    }

    /// Bytes queued for the DR side and the bound they may reach.
    /// Bytes of async writes a later write of the same epoch replaced before they were sent.
    pub fn coalesced_bytes(&self) -> u64 {
        self.lock().coalesced_bytes()
    }

    pub fn journal_fill(&self) -> (u64, u64) {
        self.lock().journal_fill()
    }

    pub fn current_epoch(&self) -> Epoch {
        self.lock().current_epoch()
    }

    pub fn staged_epoch(&self) -> Epoch {
        self.lock().staged_epoch()
    }

    /// Whether the journal overflowed since the last catch-up started.
    pub fn needs_catch_up(&self) -> bool {
        self.lock().needs_catch_up()
    }

    /// Why the stream must end so that the pair trips with its group, if it must.
    pub fn stream_must_end(&self) -> Option<&'static str> {
        self.lock().stream_must_end()
    }

    /// Nothing waits for the DR side: no acknowledgement, nothing queued, no catch-up.
    pub fn idle(&self) -> bool {
        self.lock().idle()
    }

    /// The pair tripped and waits for its group's trip cut.
    pub fn trip_wanted(&self) -> bool {
        self.lock().trip_wanted()
    }

    /// Its direct writes are gated: the DR side holds them until the group is synchronous.
    pub fn gated(&self) -> bool {
        self.lock().gated()
    }

    /// Whether a catch-up runs, or its last unit is not yet staged on the DR side.
    pub fn catching_up(&self) -> bool {
        self.lock().catching_up()
    }

    /// Whether the pair's epochs are cut by its consistency group.
    pub fn grouped(&self) -> bool {
        self.lock().grouped()
    }

    /// The spans the DR side can only take whole, for the group's commit.
    pub fn atomic_spans(&self) -> Vec<AtomicSpan> {
        self.lock().atomic_spans()
    }

    /// The epoch the DR side staged and the catch-up units, read together.
    pub fn staged_and_spans(&self) -> (Epoch, Vec<AtomicSpan>) {
        let machine = self.lock();
        (machine.staged_epoch(), machine.atomic_spans())
    }

    /// Where the catch-up unit being made began, if one is.
    pub fn unit_in_progress(&self) -> Option<Epoch> {
        self.lock().unit_in_progress()
    }

    /// How long the group's cuts held this pair's answers.
    pub fn hold_summary(&self) -> HoldSummary {
        self.lock().hold_summary()
    }

    /// How long frames the DR side acknowledges one by one have waited with no answer;
    /// `None` when none waits.
    pub fn unanswered_for(&self) -> Option<Duration> {
        let now_us = self.now_us();
        self.lock()
            .unanswered_for_us(now_us)
            .map(Duration::from_micros)
    }

    /// How long ago the DR side last refused a staged write for want of room in its stage
    /// log, if it did since the pair last went live.
    pub fn stage_full_for(&self) -> Option<Duration> {
        let now_us = self.now_us();
        self.lock()
            .stage_full_for_us(now_us)
            .map(Duration::from_micros)
    }

    /// Resync bytes acknowledged so far.
    pub fn resync_acked(&self) -> u64 {
        self.lock().resync_acked()
    }

    // ---- the connection's life ----

    /// The DR side accepted the stream, holding everything up to `staged`; a resync
    /// follows if `copying` (see [`Production::connected`]).
    pub fn connected(&self, staged: Epoch, copying: bool) -> Result<(), IllegalTransition> {
        let fx = self.stepping().connected(staged, copying)?;
        self.carry_out(fx);
        Ok(())
    }

    /// The initial sync or the catch-up ended: the pair is live.
    pub fn resync_done(&self) -> Result<(), IllegalTransition> {
        self.stepping().resync_done()
    }

    /// Live writes start flowing: direct in hypermetro, journaled in async.
    pub fn go_live(&self) {
        self.apply(Machine::go_live);
    }

    /// A catch-up starts: live writes are tracked only, extents are staged.
    pub fn begin_catch_up(&self) -> Result<(), IllegalTransition> {
        self.stepping().begin_catch_up()
    }

    /// The catch-up's dirty set is small: live writes are journaled with it. Returns false
    /// if the catch-up was given up: the reader stops, and a new catch-up starts from the
    /// bitmap.
    #[must_use]
    pub fn begin_final_pass(&self) -> bool {
        self.stepping().begin_final_pass()
    }

    /// The last extent is queued: returns the epoch whose seal ends the catch-up, or `None`
    /// if the catch-up was given up (nothing is sealed).
    #[must_use]
    pub fn finish_catch_up(&self) -> Option<Epoch> {
        let wall_ms = self.clock.wall_ms();
        self.step(|m| m.finish_catch_up(wall_ms))
    }

    /// The stream broke (see [`Production::disconnected`]).
    pub fn disconnected(&self) {
        let now_us = self.now_us();
        self.apply(|m| m.disconnected(now_us));
    }

    // ---- the pair's life (see `PairState`) ----

    /// The coordinator confirmed this side is still production.
    pub fn confirm(&self, paused: bool) -> Result<(), IllegalTransition> {
        self.stepping().confirm(paused)
    }

    /// The operator paused or resumed replication; pausing ends the stream.
    pub fn pause(&self, paused: bool) {
        let now_us = self.now_us();
        self.apply(|m| m.pause(paused, now_us));
    }

    /// The DR side refused the stream: the sides diverged.
    pub fn diverged(&self) -> Result<(), IllegalTransition> {
        self.stepping().diverged()
    }

    /// The operator resolved the divergence.
    pub fn resolved(&self, paused: bool) -> Result<(), IllegalTransition> {
        self.stepping().resolved(paused)
    }

    /// The pair's group failed over: the stream ends, and the answers a trip held fail with
    /// `errno` (see [`Production::demote`]).
    pub fn demote(&self, errno: i32) {
        let now_us = self.now_us();
        let failed = self.step(|m| m.demote(now_us));
        for (token, mailbox) in failed {
            mailbox.deliver_failed(token, errno);
        }
    }

    /// The pair is removed, switches sides, or its agent stops. The answers its group held
    /// are given if `fail` is `None` (the pair is deleted), else failed with that errno.
    pub fn stop(&self, fail: Option<i32>) {
        let now_us = self.now_us();
        let held = self.step(|m| m.stop(now_us));
        for (token, mailbox) in held {
            match fail {
                None => mailbox.deliver(token),
                Some(errno) => mailbox.deliver_failed(token, errno),
            }
        }
    }

    /// Copy the dirty blocks again (a verify's repair marked them): starts a catch-up.
    pub fn request_catch_up(&self) {
        let now_us = self.now_us();
        self.apply(|m| m.request_catch_up(now_us));
    }

    // ---- consistency groups ----

    /// A production agent starts with its pair in a consistency group whose last cut it
    /// recorded switching to is `to` (see [`Production::start_in_group`]).
    pub fn start_in_group(&self, to: Epoch) {
        let now_us = self.now_us();
        self.stepping().start_in_group(to, now_us);
    }

    /// A side its group's failover promoted (see [`Production::promoted_in_group`]).
    pub fn promoted_in_group(&self, to: Epoch) {
        self.stepping().promoted_in_group(to);
    }

    /// A production agent that starts with its pair in a hypermetro group starts tripped.
    pub fn start_tripped(&self) {
        let now_us = self.now_us();
        self.stepping().start_tripped(now_us);
    }

    /// The periodic cut: new writes go to the next epoch.
    pub fn advance_epoch(&self) {
        let wall_ms = self.clock.wall_ms();
        self.apply(|m| m.advance_epoch(wall_ms));
    }

    /// A restarted agent whose pair was making a catch-up unit after `from`: its span is
    /// reported open again (see [`Production::resume_unit`]).
    pub fn resume_unit(&self, from: Epoch) {
        self.stepping().resume_unit(from);
    }

    /// Puts the pair under its group's cuts, or back under its own ticker (answers still
    /// held are given).
    pub fn set_grouped(&self, grouped: bool) {
        self.apply(|m| m.set_grouped(grouped));
    }

    /// The group's cut to `to` (see [`Production::group_cut`]). `now_ms`: when the cut
    /// happened (wall time, read once per cut from the agent's clock).
    pub fn group_cut(&self, to: Epoch, mode: CutMode, now_ms: u64) -> (Epoch, bool) {
        let now_us = self.now_us();
        self.step(|m| m.group_cut(to, mode, now_ms, now_us))
    }

    /// The group's release of the cut to `to` (see [`Production::group_release`]).
    pub fn group_release(&self, to: Epoch, outcome: RoundOutcome, now_ms: u64) {
        let now_us = self.now_us();
        self.apply(|m| m.group_release(to, outcome, now_ms, now_us));
    }

    /// Gives the answers held longer than `timeout` (the coordinator is away).
    pub fn release_held_longer_than(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let now_us = self.now_us();
        self.apply(|m| m.release_held_longer_than(timeout_ms, now_us));
    }

    // ---- the sender and the DR side's answers ----

    /// Takes up to `max_bytes` of frames to send, in order.
    pub fn take_frames(&self, max_bytes: u64, out: &mut Vec<Transmit<Data>>) {
        self.apply(|m| m.take_frames(max_bytes, out));
    }

    /// The DR side acknowledged these direct writes and flushes, received together: one
    /// step of the machine, and their answers with one wake-up of each connection.
    pub fn handle_acks(&self, seqs: &[WriteSeq]) {
        let now_us = self.now_us();
        self.apply(|m| m.handle_acks(seqs, now_us));
    }

    /// The DR side synced every epoch ≤ `epoch` into its stage log.
    pub fn handle_staged(&self, epoch: Epoch) {
        let now_us = self.now_us();
        self.apply(|m| m.handle_staged(epoch, now_us));
    }

    /// The DR side rejected a frame (see [`Production::handle_reject`]).
    pub fn handle_reject(&self, seq: WriteSeq, reason: RejectReason) {
        let now_us = self.now_us();
        self.apply(|m| m.handle_reject(seq, reason, now_us));
    }

    /// The DR side recorded the end of the initial sync of `epoch` durably.
    pub fn handle_sync_done_ack(&self, epoch: Epoch) {
        let now_us = self.now_us();
        self.apply(|m| m.handle_sync_done_ack(epoch, now_us));
    }

    // ---- digests for points in time ----

    /// Production digests each sealed epoch's blocks (the group keeps points), or not.
    pub fn set_digests(&self, on: bool) {
        self.lock().set_digests(on);
    }

    /// Waits (the digest thread, blocking) until blocks are due to be digested. Returns
    /// false if `stop` says to give up.
    pub fn wait_digests_due(&self, stop: &dyn Fn() -> bool) -> bool {
        self.wait_on(&self.digests_became_due, stop, |m| m.digests_due())
    }

    /// The ranges due to be digested, clipped to a volume of `size` bytes, and their round.
    pub fn take_digests_due(&self, size: u64) -> (u64, Vec<ByteRange>) {
        self.lock().take_digests_due(size)
    }

    /// Queues production's CRCs of the blocks from `offset`, read in `round` with the blocks
    /// locked (dropped if the journal left journal mode since).
    pub fn push_digest(&self, round: u64, offset: u64, crcs: Vec<u32>) {
        self.apply(|m| m.push_digest(round, offset, crcs));
    }

    // ---- online verify ----

    /// Queues verify probe `id` behind everything queued so far. Returns false if nothing
    /// reaches the DR side now (no stream, or bitmap mode).
    pub fn push_verify(&self, id: ProbeId, probe: Probe) -> bool {
        self.step(|m| m.push_verify(id, probe))
    }

    /// The DR side compared probe `id`: these blocks differ there.
    pub fn handle_verified(&self, id: ProbeId, differing: &[u16]) {
        let now_us = self.now_us();
        self.apply(|m| m.handle_verified(id, differing, now_us));
    }

    /// The probes answered (or lost) so far; waits up to `timeout` for one if none is.
    pub fn wait_verify_results(&self, timeout: Duration) -> Vec<(ProbeId, ProbeResult)> {
        let mut machine = self.lock();
        let done = machine.take_verify_results();
        if !done.is_empty() {
            return done;
        }
        let (mut machine, _) = self
            .changed
            .wait_timeout(machine, timeout)
            .unwrap_or_else(|e| e.into_inner());
        machine.take_verify_results()
    }

    // ---- the resync reader ----

    /// Waits until the reader may queue `bytes` more: within its read-ahead of the stream,
    /// and among the initial-sync extents not yet acknowledged (see
    /// [`Production::has_room_for`]). Returns false if `stop` says to give up.
    pub fn wait_for_room(&self, bytes: u64, stop: &dyn Fn() -> bool) -> bool {
        self.wait_until(stop, |m| m.has_room_for(bytes))
    }

    /// Whether the reader may queue `bytes` more now ([`PairLink::wait_for_room`] without
    /// the wait).
    pub fn has_room_for(&self, bytes: u64) -> bool {
        self.lock().has_room_for(bytes)
    }

    /// Waits (the resync thread, blocking) until `ready` holds of the machine, waking
    /// whenever frames are taken or answered. Returns false if `stop` says to give up.
    fn wait_until(&self, stop: &dyn Fn() -> bool, ready: impl Fn(&Machine) -> bool) -> bool {
        self.wait_on(&self.changed, stop, ready)
    }

    /// As [`PairLink::wait_until`], woken by `signal` (and every 100 ms, to see `stop`).
    fn wait_on(
        &self,
        signal: &Condvar,
        stop: &dyn Fn() -> bool,
        ready: impl Fn(&Machine) -> bool,
    ) -> bool {
        let mut machine = self.lock();
        loop {
            if stop() {
                return false;
            }
            if ready(&machine) {
                return true;
            }
            machine = signal
                .wait_timeout(machine, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the DR side has staged `end`, the catch-up's last epoch. Returns false
    /// if `stop` says to give up, or if the catch-up was given up before its seal was sent
    /// (that seal never will be).
    pub fn wait_for_catch_up_end(&self, end: Epoch, stop: &dyn Fn() -> bool) -> bool {
        self.wait_until(stop, |m| m.catch_up_settled(end)) && self.lock().staged_epoch() >= end
    }

    /// Waits until every resync extent sent direct was acknowledged.
    pub fn wait_for_extents(&self, stop: &dyn Fn() -> bool) -> bool {
        self.wait_until(stop, Machine::extents_acknowledged)
    }

    /// Waits until the DR side recorded the end of the initial sync of `epoch` (or a later
    /// one). Returns false if `stop` says to give up.
    pub fn wait_for_sync_done(&self, epoch: Epoch, stop: &dyn Fn() -> bool) -> bool {
        self.wait_until(stop, |m| m.sync_done_acknowledged(epoch))
    }

    /// Queues an extent read for an initial sync: written direct on the DR side.
    pub fn push_sync_extent(&self, range: ByteRange, payload: Payload<Data>, ticket: Ticket) {
        let now_us = self.now_us();
        self.apply(|m| m.push_sync_extent(range, payload, ticket, now_us));
    }

    /// Admits a catch-up extent about to be read (its epoch is taken now, with its blocks
    /// locked).
    pub fn admit_catch_up_extent(&self) -> Admitted {
        self.stepping().admit_catch_up_extent()
    }

    /// Queues a catch-up extent: staged on the DR side until the catch-up's seal. Returns
    /// false if the catch-up was given up: the extent is dropped (its blocks stay dirty),
    /// and the reader stops.
    #[must_use]
    pub fn push_catch_up_extent(
        &self,
        admitted: Admitted,
        range: ByteRange,
        payload: Payload<Data>,
        ticket: Ticket,
    ) -> bool {
        self.step(|m| m.push_catch_up_extent(admitted, range, payload, ticket))
    }

    /// A catch-up extent admitted but not read (the read failed): it leaves its epoch
    /// without data, and its blocks stay dirty.
    pub fn abandon_catch_up_extent(&self, admitted: Admitted) {
        self.stepping().abandon_catch_up_extent(admitted);
    }

    /// Queues the end of an initial sync.
    pub fn push_sync_done(&self) -> Epoch {
        self.step(Machine::push_sync_done)
    }

    pub fn reset_resync_progress(&self) {
        self.stepping().reset_resync_progress();
    }
}

/// The machine under its lock while an event is applied to it (see
/// [`PairLink::stepping`]).
struct Stepping<'a> {
    link: &'a PairLink,
    machine: MutexGuard<'a, Machine>,
    before: PairState,
    digests_were_due: bool,
}

impl Deref for Stepping<'_> {
    type Target = Machine;

    fn deref(&self) -> &Machine {
        &self.machine
    }
}

impl DerefMut for Stepping<'_> {
    fn deref_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }
}

impl Drop for Stepping<'_> {
    fn drop(&mut self) {
        let after = self.machine.state();
        if after != self.before {
            tracing::debug!(from = %self.before, to = %after, "pair state");
            self.link.state.send_replace(after);
        }
        if !self.digests_were_due && self.machine.digests_due() {
            self.link.digests_became_due.notify_one();
        }
        if !std::thread::panicking() {
            self.link.check(&self.machine);
        }
    }
}

/// The machine's view of a write on its way through the gate; its data moves, not copied.
fn local_write(write: Replicated) -> LocalWrite<Data> {
    LocalWrite {
        range: write.range,
        payload: match write.data {
            ReplicaData::Data(bytes) => Some(Payload::Data(Data(bytes))),
            ReplicaData::Zeroes => Some(Payload::Zeroes),
            ReplicaData::Unchanged => None,
        },
        fua: write.fua,
        token: write.token,
        mode: write.mode,
        ticket: write.ticket,
        sent: write.seq.filter(|_| write.sent),
    }
}

impl ReplicaLink for PairLink {
    fn admit(&self, writes: &mut [Replicated]) {
        let mut machine = self.stepping();
        for write in writes.iter_mut() {
            write.mode = machine.admit(write.range);
        }
        drop(machine);
        let wants_ticket = |w: &Replicated| w.mode.wants_ticket();
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
        // The connection keeps the write (its local write runs now): its data is shared.
        let mut local = local_write(Replicated {
            data: write.data.clone(),
            ..*write
        });
        let now_us = self.now_us();
        let sent = self.step(|m| m.send_direct(&mut local, mailbox, now_us));
        write.ticket = local.ticket;
        write.sent = sent.is_some();
        write.seq = sent;
    }

    fn local_done(&self, write: Replicated, mailbox: &Arc<Mailbox>) -> AfterLocal {
        let local = local_write(write);
        let now_us = self.now_us();
        self.step(|m| m.local_done(local, mailbox, now_us))
    }

    fn local_failed(&self, write: Replicated, mailbox: &Arc<Mailbox>) -> AfterLocal {
        let local = local_write(write);
        let now_us = self.now_us();
        self.step(|m| m.local_failed(local, mailbox, now_us))
    }

    fn flush(&self, token: AnswerToken, mailbox: &Arc<Mailbox>) -> AfterLocal {
        let now_us = self.now_us();
        self.step(|m| m.flush(token, mailbox, now_us))
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
        PairLink::new(
            model,
            Arc::new(tracker),
            journal_bytes,
            staged,
            PairState::Connecting,
            clock,
        )
    }

    /// As [`live_link`], its time read from `clock`.
    fn live_link_on(
        dir: &std::path::Path,
        model: ReplicationModel,
        clock: Arc<ManualClock>,
    ) -> PairLink {
        let link = new_link(dir, model, 64 << 20, Epoch(1), clock);
        link.connected(Epoch(1), false).unwrap();
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
                .any(|f| matches!(f, Transmit::Seal { epoch, .. } if *epoch == Epoch(6))),
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
        link.connected(Epoch(89), false).unwrap();
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

    /// A side its group's failover promoted admits after the commit, in the group, and
    /// answers at once: the group is not cut again before its reprotect.
    #[test]
    fn a_side_promoted_in_its_group_answers_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::default());
        let link = new_link(
            dir.path(),
            ReplicationModel::Async,
            64 << 20,
            Epoch::ZERO,
            clock,
        );
        link.promoted_in_group(Epoch(91));
        assert_eq!(link.current_epoch(), Epoch(91));
        assert!(link.grouped());
        let mailbox = Arc::new(Mailbox::new(Arc::new(Waker::new().unwrap())));
        assert_eq!(
            write(&link, &mailbox, 0, 1),
            (AfterLocal::Answer, Epoch(91))
        );
        assert_eq!(link.hold_summary().held, 0);
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
        link.connected(Epoch(90), true).unwrap();
        // A catch-up goes on with the same unit, from the older start.
        link.begin_catch_up().unwrap();
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
        link.connected(Epoch(1), false).unwrap();
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
        link.handle_acks(&[w.seq.expect("sent direct")]);
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
            .position(|f| matches!(f, Transmit::Write(w) if w.gated));
        let ungate = frames
            .iter()
            .position(|f| matches!(f, Transmit::Ungate { epoch } if *epoch == Epoch(5)));
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
        link.demote(libc::EIO);
        assert_eq!(link.state(), PairState::Demoted);
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
        link.connected(Epoch(1), false).unwrap();
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
                link.handle_acks(&[seq]);
                assert!(!link.tracker.any_dirty(range), "the answer cleared it");
            }
            assert_eq!(link.local_failed(w, &mailbox), AfterLocal::WaitForPeer);
            if !peer_first {
                link.handle_acks(&[seq]);
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
