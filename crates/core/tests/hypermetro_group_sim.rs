//! Seeded simulation of a hypermetro consistency group's trip and way back (docs/GROUPS.md,
//! "Hypermetro: the group trip and the way back"), on a virtual clock, driving the machines
//! the agents and the coordinator run:
//!
//! - each production host is `blockrep_core::pair::production::Production` (the machine
//!   `PairLink` wraps), with the shell's duties done here as `PairLink` and the production
//!   session do them: the dirty map and its tickets, the sender, the catch-up reader, the
//!   session's tick (the peer timeout, a stream the machine wants ended, a catch-up it asks
//!   for), and the membership record a restart reads (the group's last cut, a catch-up
//!   unit's start);
//! - each DR side is `blockrep_core::pair::dr::DrUnits` (the applier's machine: which staged
//!   writes and seals it takes, which units the group's commit lets apply), the applier's
//!   `DirectGate` for gated direct writes and its `AckBarrier` (a direct write is answered
//!   once a sync that began after it returned), over a volume that loses unsynced writes at
//!   a power cut and a stage log whose unsealed tail is lost with it;
//! - the coordinator is the core's `CutCoordinator` with the coordinator's choice of cut,
//!   `hypermetro_cut`.
//!
//! Every write takes a block of its own, so a DR volume shows which writes it holds.
//! Application chains write record after record, each issued once the previous one was
//! answered, each on the next host; a fifth of the writes take the slow path (an unaligned
//! write, or a WRITE_ZEROES), whose local write starts later, often after a trip began.
//! Faults, until they stop: replication links cut and healed (what was on the way is lost),
//! production hosts crashing, DR hosts losing power, the coordinator crashing, its messages
//! lost or late, the DR side's answers late, out of order and now and then twice, frames
//! corrupted on the way (their CRC fails), the stage log full now and then.
//!
//! After every event: what a failover would give (each DR volume, and its sealed staged
//! writes up to the group's commit) holds, for each chain, a prefix of its records; both
//! machines' invariants hold; every write is answered at most once. After each DR power
//! cut, a block clean at production holds production's data on the DR side (its volume
//! and its stage log). Once the faults stop, the group is synchronous again with every
//! answered record on its DR side.
//!
//! Each mutation check switches on one deliberate bug (`Broken`) and must be caught.
//! A failure prints its seed; `BLOCKREP_SEED=n` replays one, `BLOCKREP_SIM_SEEDS` sets how
//! many run, `BLOCKREP_TRACE` prints the events.

use std::collections::{BTreeSet, HashMap, VecDeque};

use blockrep_core::ByteRange;
use blockrep_core::dirty_map::{DirtyMap, Granularity};
use blockrep_core::pair::atomic_spans::unit_to_record;
use blockrep_core::pair::dr::{DrState, DrUnits, SealArrival, SealRecord, StagedWrite};
use blockrep_core::pair::production::{
    AfterLocal, Effects, LocalWrite, Production, ReplicaMode, Transmit,
};
use blockrep_core::pair::state::PairState;
use blockrep_core::replication::direct_gate::{DirectGate, Gating};
use blockrep_core::replication::durability::{AckBarrier, SyncTicket};
use blockrep_core::replication::group_cut::{
    CutCoordinator, CutMessage, CutMode, Live, PairMode, RoundOutcome, hypermetro_cut,
};
use blockrep_core::replication::{
    AnswerToken, Epoch, Payload, PayloadLen, Redeemed, RejectReason, ReplicationModel,
    TicketRegistry, WriteFrame, WriteSeq,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sim::{Clock, Fault, FaultPlan, host_name, host_of};

mod sim;

const HOSTS: usize = 2;
const CHAINS: usize = 2;
const BLOCK: u64 = 4096;
/// Blocks of each host's volume: every write takes one of its own.
const BLOCKS: u64 = 8192;
/// What a block holds before any write.
const UNWRITTEN: u64 = u64::MAX;
/// Small, so that journaled stretches overflow now and then.
const JOURNAL_BYTES: u64 = 24 * BLOCK;
/// A catch-up's final pass starts once this little is left.
const FINAL_PASS_BYTES: u64 = 4 * BLOCK;
const CUT_INTERVAL_MS: u64 = 100;
const ROUND_TIMEOUT_MS: u64 = 50;
const HOLD_TIMEOUT_MS: u64 = 80;
const REPORT_MS: u64 = 50;
/// A session ends when the DR side leaves a frame unanswered this long (gated writes it
/// still holds when its group trips again are never answered on their stream): five cut
/// intervals, as the agent's 5 s are five of its 1 s epochs.
const PEER_TIMEOUT_MS: u64 = 500;
/// How long a host takes to notice its stream is gone, and to connect again.
const LINK_DETECT_MS: u64 = 30;
const RECONNECT_MS: u64 = 40;
/// A restarted host takes writes once the coordinator confirmed it.
const CONFIRM_MS: u64 = 60;
/// A fresh coordinator starts this far above the epochs reported.
const EPOCH_JUMP: u64 = 64;
const FAULTS_UNTIL_MS: u64 = 5_000;
/// Writes issued this long after the faults stopped are answered within the peer timeout.
const SETTLED_MS: u64 = FAULTS_UNTIL_MS + 3_000;
/// A coordinator up this long has cut and committed a group that went synchronous (when
/// no message is lost).
const COMMIT_WITHIN_MS: u64 = 300;
const END_MS: u64 = 12_000;

/// A write's data: the value each block it covers takes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Value(Vec<u64>);

impl PayloadLen for Value {
    fn payload_len(&self) -> u64 {
        self.0.len() as u64 * BLOCK
    }
}

/// Answers go back to one simulated connection per host.
type Machine = Production<Value, ()>;

/// What the DR side answers on the stream.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Written(WriteSeq),
    Staged(Epoch),
    Refused(WriteSeq, RejectReason),
}

#[derive(Debug)]
enum Event {
    CutTimer,
    CoordinatorTick,
    ToHost(usize, CutMessage, CutMode, RoundOutcome),
    Ack {
        host: usize,
        to: Epoch,
        staged: Epoch,
        synchronous: bool,
        spans: Vec<(Epoch, Option<Epoch>)>,
    },
    Report(usize, PairMode),
    Commit(usize, Epoch),
    HostTick(usize),
    /// Write `w`'s local write on host `h` (in its life `life`) is done.
    LocalDone(usize, u32, usize),
    /// Host `h`'s catch-up reader takes a step, in stream session `session`.
    CatchUpStep(usize, u32),
    /// A frame reaches host `h`'s DR side, in stream session `session`; `corrupted`: its
    /// CRC fails there.
    ToDr(usize, u32, Transmit<Value>, bool),
    ToProduction(usize, u32, Answer),
    /// A sync of host `h`'s DR volume returns (for its applier `applier`).
    DrSynced(usize, u32),
    Issue(usize),
    LinkCut(usize),
    LinkHeal(usize),
    /// Host `h` notices its stream `session` is gone.
    StreamLost(usize, u32),
    Reconnect(usize),
    Confirm(usize),
    HostCrash(usize),
    HostRestart(usize),
    DrPowerCut(usize),
    DrRestart(usize),
    CoordinatorCrash,
    CoordinatorRestart,
}

impl From<Fault> for Event {
    fn from(fault: Fault) -> Self {
        match fault {
            Fault::HostCrash(h) => Event::HostCrash(h),
            Fault::CoordinatorCrash => Event::CoordinatorCrash,
            Fault::LinkCut(h) => Event::LinkCut(h),
        }
    }
}

/// How a write reaches the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The fast path: its frame goes as its local write starts.
    Aligned,
    /// A read-modify-write: its local write starts later.
    Unaligned,
    /// A WRITE_ZEROES: later, and its payload is zeroes.
    Zeroes,
}

#[derive(Debug)]
struct Write {
    host: usize,
    chain: usize,
    record: u64,
    block: u64,
    /// What its block holds once written.
    value: u64,
    kind: Kind,
    issued_ms: u64,
    answered: bool,
}

/// The production session's catch-up reader.
struct Reader {
    runs: VecDeque<ByteRange>,
    final_pass: bool,
    /// The unit's last seal is queued: the session waits for it to be staged.
    ends: Option<Epoch>,
}

struct Host {
    up: bool,
    /// Counts the host's lives: events of an earlier one are void.
    life: u32,
    /// Takes writes (after a restart, once confirmed).
    serving: bool,
    machine: Machine,
    dirty: DirtyMap,
    tickets: TicketRegistry,
    image: Vec<u64>,
    next_block: u64,
    /// Writes admitted whose local write is not done.
    inflight: HashMap<usize, LocalWrite<Value>>,
    /// The replication network is up.
    link_up: bool,
    /// Counts stream sessions: answers of an earlier one are void.
    session: u32,
    /// When the last frame sent arrives (a stream keeps its frames in order).
    stream_clock: u64,
    reader: Option<Reader>,
    /// What the DR side said it applied when the stream was accepted.
    dr_applied: Epoch,
    /// The membership record: the group's last cut this host switched to, and where the
    /// catch-up unit it made last began.
    recorded_cut: Epoch,
    catch_up_from: Option<Epoch>,
}

/// The DR side of one host's pair: its applier's machines over a volume and a stage log.
struct Dr {
    up: bool,
    /// Counts appliers (one per stream, one after a power cut): syncs of an earlier one
    /// are void.
    applier: u32,
    /// The stream it takes frames of.
    session: Option<u32>,
    units: DrUnits,
    gate: DirectGate<(WriteFrame<Value>, bool)>,
    barrier: AckBarrier<WriteSeq>,
    /// Syncs in flight, each with how far into `volatile` it reaches.
    syncs: VecDeque<(SyncTicket, usize)>,
    image: Vec<u64>,
    /// Direct writes no sync has covered yet: (block, what it held before), oldest first;
    /// `volatile_base` of them were made durable before.
    volatile: VecDeque<(u64, u64)>,
    volatile_base: usize,
    /// The stage log: staged writes (epoch, block, value, synced) in stream order, and the
    /// seals appended whose units are not applied.
    staged: Vec<(Epoch, u64, u64, bool)>,
    seals: Vec<SealRecord>,
    last_seal: Epoch,
    /// The group's commit, recorded.
    allowed: Epoch,
}

impl Dr {
    fn new() -> Self {
        Dr {
            up: true,
            applier: 0,
            session: None,
            units: DrUnits::new(DrState::default(), None),
            gate: DirectGate::default(),
            barrier: AckBarrier::default(),
            syncs: VecDeque::new(),
            image: vec![UNWRITTEN; BLOCKS as usize],
            volatile: VecDeque::new(),
            volatile_base: 0,
            staged: Vec::new(),
            seals: Vec::new(),
            last_seal: Epoch::ZERO,
            allowed: Epoch::ZERO,
        }
    }

    /// A new applier, from what the DR side recorded: the units, the stage log's sealed
    /// units (replayed), no gate, no barrier. Returns the seals to replay.
    fn new_applier(&mut self) -> Vec<SealRecord> {
        self.applier += 1;
        let state = self.units.state().clone();
        self.units = DrUnits::new(state, Some(self.last_seal));
        self.gate = DirectGate::default();
        self.barrier = AckBarrier::default();
        self.syncs.clear();
        // The log's tail after its last seal belongs to a stream that is gone.
        let last = self.last_seal;
        self.staged.retain(|(e, ..)| *e <= last);
        self.seals.clone()
    }

    /// The volume is synced: every direct write on it is durable.
    fn synced_all(&mut self) {
        self.volatile_base += self.volatile.len();
        self.volatile.clear();
    }
}

/// A rule of the protocol broken on purpose, for the checks to catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broken {
    Nothing,
    /// The DR side writes gated direct writes at once.
    IgnoreGate,
    /// A host that restarts journals without tripping its group.
    StartUntripped,
    /// A trip hold is given at any release after a trip cut reached it, even one of an
    /// abandoned round (some host may still write its DR side directly).
    TripOnAnyRelease,
    /// The DR side writes a direct write that follows an `Ungate` before it applied the
    /// epoch the `Ungate` names.
    WriteAfterUngateAtOnce,
    /// A restarted coordinator takes a group whose pairs report synchronous as done, with
    /// no cut until its first commit.
    RestartForgetsDirect,
    /// The DR side answers a direct write once it is written, before a sync covers it.
    AckBeforeSync,
}

struct Sim {
    rng: SmallRng,
    clock: Clock<Event>,
    cut: CutCoordinator,
    coordinator_up: bool,
    /// The mode of the round in progress, and whether every ack said synchronous.
    round: Option<(CutMode, bool)>,
    direct_at: Option<Epoch>,
    reports: Vec<Option<PairMode>>,
    hosts: Vec<Host>,
    drs: Vec<Dr>,
    writes: Vec<Write>,
    /// Per host, which write owns each block.
    owners: Vec<Vec<usize>>,
    /// Per chain: the next record, and the host it goes to.
    chains: Vec<(u64, usize)>,
    committed: Epoch,
    broken: Broken,
    /// Per chain and record, how many of its writes the DR volumes hold.
    on_volumes: Vec<Vec<u32>>,
    /// The records a failover finds in the stage logs, as of the last check.
    in_logs: BTreeSet<(usize, u64)>,
    /// Records whose presence changed since the last check.
    touched: BTreeSet<(usize, u64)>,
    /// The write issued once the faults had settled that waited longest for its answer.
    slowest: Option<(usize, u64)>,
    coordinator_up_since: u64,
    /// The coordinator crashed after a direct cut once the faults had stopped.
    crashed_after_faults: bool,
}

impl Sim {
    fn new(seed: u64, broken: Broken) -> Self {
        let names: Vec<String> = (0..HOSTS).map(host_name).collect();
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(seed),
            clock: Clock::new(),
            cut: CutCoordinator::new(names, Epoch(1), ROUND_TIMEOUT_MS),
            coordinator_up: true,
            round: None,
            direct_at: None,
            reports: vec![None; HOSTS],
            hosts: (0..HOSTS).map(|_| new_host()).collect(),
            drs: (0..HOSTS).map(|_| Dr::new()).collect(),
            writes: Vec::new(),
            owners: vec![vec![usize::MAX; BLOCKS as usize]; HOSTS],
            chains: (0..CHAINS).map(|c| (0, c % HOSTS)).collect(),
            committed: Epoch::ZERO,
            broken,
            on_volumes: vec![Vec::new(); CHAINS],
            in_logs: BTreeSet::new(),
            touched: BTreeSet::new(),
            slowest: None,
            coordinator_up_since: 0,
            crashed_after_faults: false,
        };
        for h in 0..HOSTS {
            sim.connect(h);
            sim.at(5, Event::HostTick(h));
        }
        sim.at(CUT_INTERVAL_MS, Event::CutTimer);
        sim.at(10, Event::CoordinatorTick);
        for c in 0..CHAINS {
            sim.at(1, Event::Issue(c));
        }
        FaultPlan {
            hosts: HOSTS,
            first_ms: 300,
            until_ms: FAULTS_UNTIL_MS,
            gap_ms: 150..700,
            kinds: 6,
        }
        .schedule(&mut sim.rng, &mut sim.clock);
        // The last fault trips the group, so that it goes synchronous again once the faults
        // are over (and the coordinator crashes as it does).
        sim.at(FAULTS_UNTIL_MS, Event::LinkCut(0));
        // DR hosts lose power now and then too.
        let mut t = 500;
        while t < FAULTS_UNTIL_MS {
            let h = sim.rng.random_range(0..HOSTS);
            sim.at(t, Event::DrPowerCut(h));
            t += sim.rng.random_range(600..2_000);
        }
        sim
    }

    fn at(&mut self, when: u64, event: Event) {
        self.clock.at(when, event);
    }

    fn after(&mut self, delay: u64, event: Event) {
        self.clock.after(delay, event);
    }

    fn now_us(&self) -> u64 {
        self.clock.now() * 1000
    }

    fn wall_ms(&self) -> u64 {
        1_000_000 + self.clock.now()
    }

    fn faults(&self) -> bool {
        self.clock.now() < FAULTS_UNTIL_MS
    }

    /// A control message (to or from the coordinator): late, or lost while faults last.
    fn control(&mut self, event: Event) {
        if self.faults() && self.rng.random_bool(0.05) {
            return;
        }
        let delay = self.rng.random_range(1..15);
        self.after(delay, event);
    }

    fn send_cuts(&mut self, messages: Vec<CutMessage>, mode: CutMode, outcome: RoundOutcome) {
        for m in messages {
            let host = host_of(&m);
            self.control(Event::ToHost(host, m, mode, outcome));
        }
    }

    // ---- the production shell ----

    /// Does what an event's effects ask, as `PairLink` does, and lets the sender run.
    fn carry_out(&mut self, h: usize, fx: Effects<()>) {
        let host = &mut self.hosts[h];
        for t in fx.forget {
            host.tickets.forget(t);
        }
        for t in fx.redeem {
            if let Redeemed::Clear(parts) = host.tickets.redeem(t) {
                for p in parts {
                    host.dirty.clear_range(p);
                }
            }
        }
        if let Some(range) = fx.mark_dirty {
            host.dirty.set_range(range);
        }
        for (token, ()) in fx.answers {
            self.answer(token.0 as usize);
        }
        self.send(h);
    }

    /// The sender: every frame the machine has goes on the stream, in order; on a broken
    /// link they are lost.
    fn send(&mut self, h: usize) {
        if !self.hosts[h].machine.state().streaming() {
            return;
        }
        let mut out = Vec::new();
        let fx = self.hosts[h].machine.take_frames(u64::MAX, &mut out);
        debug_assert!(fx.answers.is_empty() && fx.redeem.is_empty());
        for frame in out {
            let corrupted =
                matches!(frame, Transmit::Write(_)) && self.faults() && self.rng.random_bool(0.005);
            let at = (self.clock.now() + 1 + self.rng.random_range(0..8))
                .max(self.hosts[h].stream_clock);
            self.hosts[h].stream_clock = at;
            let session = self.hosts[h].session;
            self.at(at, Event::ToDr(h, session, frame, corrupted));
        }
    }

    fn answer(&mut self, w: usize) {
        let write = &mut self.writes[w];
        assert!(
            !write.answered,
            "at {} ms write {w} was answered twice",
            self.clock.now()
        );
        write.answered = true;
        if write.issued_ms >= SETTLED_MS {
            let waited = self.clock.now() - write.issued_ms;
            if self.slowest.is_none_or(|(_, most)| waited > most) {
                self.slowest = Some((w, waited));
            }
        }
        let (chain, record, host) = (write.chain, write.record, write.host);
        if self.chains[chain].0 == record {
            self.chains[chain] = (record + 1, (host + 1) % HOSTS);
            let delay = self.rng.random_range(0..5);
            self.after(delay, Event::Issue(chain));
        }
    }

    fn report(&mut self, h: usize) {
        if !self.hosts[h].up {
            return;
        }
        let m = &self.hosts[h].machine;
        let mode = PairMode {
            live: m.live(),
            gated: m.gated(),
            trip_wanted: m.trip_wanted(),
            catching_up: m.catching_up(),
            epoch: m.current_epoch(),
        };
        self.control(Event::Report(h, mode));
    }

    /// The application's next record of chain `c`, on the host whose turn it is.
    fn issue(&mut self, c: usize) {
        let (record, h) = self.chains[c];
        let host = &self.hosts[h];
        if !host.up || !host.serving {
            // Down, or not confirmed yet: the chain tries the next host.
            self.chains[c].1 = (h + 1) % HOSTS;
            self.after(5, Event::Issue(c));
            return;
        }
        if host.next_block == BLOCKS {
            return;
        }
        let w = self.writes.len();
        let kind = match self.rng.random_range(0..10) {
            0 => Kind::Unaligned,
            1 => Kind::Zeroes,
            _ => Kind::Aligned,
        };
        let value = if kind == Kind::Zeroes {
            0
        } else {
            w as u64 + 1
        };
        // The fast path's local write is done soon; the slow path's starts later.
        let delay = match kind {
            Kind::Aligned => self.rng.random_range(0..3),
            Kind::Unaligned | Kind::Zeroes => self.rng.random_range(3..25),
        };
        let now_us = self.now_us();
        let host = &mut self.hosts[h];
        let block = host.next_block;
        host.next_block += 1;
        self.owners[h][block as usize] = w;
        self.writes.push(Write {
            host: h,
            chain: c,
            record,
            block,
            value,
            kind,
            issued_ms: self.clock.now(),
            answered: false,
        });
        if self.on_volumes[c].len() <= record as usize {
            self.on_volumes[c].resize(record as usize + 1, 0);
        }
        // The shell's admission: bits set, tickets of the range spoiled, a ticket taken.
        let range = ByteRange::new(block * BLOCK, BLOCK);
        let mode = host.machine.admit(range);
        host.dirty.set_range(range);
        host.tickets.spoil(range);
        let ticket = mode.wants_ticket().then(|| host.tickets.issue(range));
        let payload = match kind {
            Kind::Zeroes => Payload::Zeroes,
            _ => Payload::Data(Value(vec![value])),
        };
        let mut write = LocalWrite {
            range,
            payload: Some(payload),
            fua: false,
            token: AnswerToken(w as u64),
            mode,
            ticket,
            sent: None,
        };
        // The fast path sends the frame as the local write starts.
        let fx = if kind == Kind::Aligned && mode == ReplicaMode::Sync {
            host.machine.send_direct(&mut write, &(), now_us).1
        } else {
            Effects::default()
        };
        host.inflight.insert(w, write);
        self.carry_out(h, fx);
        let life = self.hosts[h].life;
        self.after(delay, Event::LocalDone(h, life, w));
    }

    fn local_done(&mut self, h: usize, w: usize) {
        let Some(write) = self.hosts[h].inflight.remove(&w) else {
            return;
        };
        let block = self.writes[w].block as usize;
        self.hosts[h].image[block] = self.writes[w].value;
        let now_us = self.now_us();
        let (after, fx) = self.hosts[h].machine.local_done(write, &(), now_us);
        self.carry_out(h, fx);
        if after == AfterLocal::Answer {
            self.answer(w);
        }
    }

    /// A stream session: the DR side takes it with a new applier and says what it holds;
    /// the pair catches up if anything is dirty, else goes live.
    fn connect(&mut self, h: usize) {
        let host = &self.hosts[h];
        if !host.up || !host.link_up || !self.drs[h].up {
            return;
        }
        if host.machine.state().streaming() {
            if self.drs[h].session == Some(host.session) {
                return;
            }
            // The stream broke while the host was not looking (a cut shorter than the
            // detection, a DR restart): it ends before a new one starts.
            self.disconnected(h);
        }
        if self.hosts[h].machine.state() != PairState::Connecting {
            return;
        }
        self.hosts[h].session += 1;
        let session = self.hosts[h].session;
        let replays = self.drs[h].new_applier();
        self.drs[h].session = Some(session);
        for seal in replays {
            self.dr_seal(h, seal.epoch, seal.cut_ms, false);
        }
        let dr = &self.drs[h];
        let staged = dr.last_seal.max(dr.units.applied());
        let applied = dr.units.applied();
        let now_ms = self.clock.now();
        let host = &mut self.hosts[h];
        host.stream_clock = now_ms;
        host.dr_applied = applied;
        let copying = !host.dirty.is_clean();
        let fx = host
            .machine
            .connected(staged, copying)
            .expect("a connecting pair takes a stream");
        self.carry_out(h, fx);
        if copying {
            self.begin_catch_up(h);
        }
        self.dr_progress(h);
    }

    /// The host noticed its stream is gone.
    fn disconnected(&mut self, h: usize) {
        let now_us = self.now_us();
        let host = &mut self.hosts[h];
        if !host.machine.state().streaming() {
            return;
        }
        let fx = host.machine.disconnected(now_us);
        host.reader = None;
        let old = host.session;
        host.session += 1;
        if self.drs[h].session == Some(old) {
            self.drs[h].session = None;
        }
        self.carry_out(h, fx);
        self.report(h);
    }

    /// The session ends the stream itself and connects again a little later.
    fn end_session(&mut self, h: usize) {
        self.disconnected(h);
        self.after(RECONNECT_MS, Event::Reconnect(h));
    }

    /// A catch-up starts; where its unit begins is recorded first, as the session does.
    fn begin_catch_up(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        host.machine
            .begin_catch_up()
            .expect("a catch-up starts on a stream");
        if let Some(new) = host.machine.unit_in_progress() {
            host.catch_up_from = Some(unit_to_record(host.catch_up_from, new, host.dr_applied));
        }
        host.reader = Some(Reader {
            runs: VecDeque::new(),
            final_pass: false,
            ends: None,
        });
        let session = host.session;
        self.after(1, Event::CatchUpStep(h, session));
    }

    /// The catch-up reader takes one extent (skipping blocks a write in flight holds, as
    /// the range lock would make it wait), or moves to its final pass, or ends.
    fn catch_up_step(&mut self, h: usize) {
        let wall_ms = self.wall_ms();
        let host = &mut self.hosts[h];
        let Some(reader) = host.reader.as_mut() else {
            return;
        };
        if let Some(end) = reader.ends {
            // The session waits for the unit's end to be staged, then goes live.
            if host.machine.catch_up_settled(end) {
                host.reader = None;
                if host.machine.staged_epoch() >= end {
                    let fx = host.machine.go_live();
                    host.machine
                        .resync_done()
                        .expect("a catch-up ends on its stream");
                    self.carry_out(h, fx);
                    self.report(h);
                }
            }
            return;
        }
        if reader.runs.is_empty() {
            if reader.final_pass {
                let (end, fx) = host.machine.finish_catch_up(wall_ms);
                match end {
                    Some(end) => host.reader.as_mut().expect("checked above").ends = Some(end),
                    // Given up on the way: the session starts another.
                    None => host.reader = None,
                }
                return self.carry_out(h, fx);
            }
            let unsent = unsent_runs(&host.dirty, &host.tickets);
            let bytes: u64 = unsent.iter().map(|r| r.len).sum();
            if bytes <= FINAL_PASS_BYTES {
                if !host.machine.begin_final_pass() {
                    host.reader = None;
                    return;
                }
                let runs = unsent_runs(&host.dirty, &host.tickets).into();
                let reader = host.reader.as_mut().expect("checked above");
                reader.final_pass = true;
                reader.runs = runs;
            } else {
                reader.runs = unsent.into();
            }
            return;
        }
        let run = reader.runs.pop_front().expect("checked above");
        let extent = ByteRange::new(run.offset, run.len.min(4 * BLOCK));
        if run.len > extent.len {
            reader
                .runs
                .push_front(ByteRange::new(extent.end(), run.len - extent.len));
        }
        let locked = host
            .inflight
            .values()
            .any(|w| w.range.offset < extent.end() && extent.offset < w.range.end());
        if locked || !host.machine.has_room_for(extent.len) {
            host.reader
                .as_mut()
                .expect("checked above")
                .runs
                .push_front(run);
            return;
        }
        let admitted = host.machine.admit_catch_up_extent();
        let values: Vec<u64> = blocks(extent).map(|b| host.image[b as usize]).collect();
        let ticket = host.tickets.issue(extent);
        let (queued, fx) = host.machine.push_catch_up_extent(
            admitted,
            extent,
            Payload::Data(Value(values)),
            ticket,
        );
        if !queued {
            // Given up (the journal overflowed, or the DR side refused): the reader stops.
            host.reader = None;
        }
        self.carry_out(h, fx);
    }

    /// The session's tick: held answers time out, a silent peer or a stream the machine
    /// wants ended ends the session, a catch-up the machine asks for starts, the pair's
    /// mode is reported.
    fn host_tick(&mut self, h: usize) -> Result<(), String> {
        if self.hosts[h].up {
            let now_us = self.now_us();
            let host = &mut self.hosts[h];
            let fx = host
                .machine
                .release_held_longer_than(HOLD_TIMEOUT_MS, now_us);
            self.carry_out(h, fx);
            let host = &self.hosts[h];
            let silent = host
                .machine
                .unanswered_for_us(now_us)
                .is_some_and(|us| us > PEER_TIMEOUT_MS * 1000);
            let m = &host.machine;
            let coordinator_settled = self.coordinator_up
                && self.clock.now() >= FAULTS_UNTIL_MS
                && self.clock.now() - self.coordinator_up_since >= COMMIT_WITHIN_MS;
            if silent
                && coordinator_settled
                && m.live() == Live::Sync
                && !m.gated()
                && !m.trip_wanted()
            {
                // A synchronous group's DR side answers every direct write within a few
                // cuts: a link or DR fault ends the stream sooner, and gated writes go once
                // the group commits the epoch of their Ungate. Silent here, it holds writes
                // for a commit that does not come.
                return Err(format!(
                    "at {} ms host {h}'s DR side left its direct writes unanswered for {PEER_TIMEOUT_MS} ms while the group was synchronous",
                    self.clock.now()
                ));
            }
            if silent || host.machine.stream_must_end().is_some() {
                self.end_session(h);
            }
            let host = &self.hosts[h];
            if host.machine.state().streaming()
                && host.reader.is_none()
                && host.machine.needs_catch_up()
            {
                self.begin_catch_up(h);
            }
            if self.clock.now().is_multiple_of(REPORT_MS) || self.hosts[h].machine.trip_wanted() {
                self.report(h);
            }
        }
        self.after(5, Event::HostTick(h));
        Ok(())
    }

    fn host_cut(&mut self, h: usize, to: Epoch, mode: CutMode) {
        let (now_us, wall_ms) = (self.now_us(), self.wall_ms());
        let host = &mut self.hosts[h];
        // Recorded before the switch is acknowledged.
        host.recorded_cut = host.recorded_cut.max(to);
        let ((staged, synchronous), fx) = host.machine.group_cut(to, mode, wall_ms, now_us);
        let spans = host
            .machine
            .atomic_spans()
            .into_iter()
            .map(|s| (s.from, s.to))
            .collect();
        self.carry_out(h, fx);
        self.control(Event::Ack {
            host: h,
            to,
            staged,
            synchronous,
            spans,
        });
    }

    fn host_release(&mut self, h: usize, to: Epoch, outcome: RoundOutcome) {
        let outcome = match self.broken {
            // Broken: every release counts as a completed trip.
            Broken::TripOnAnyRelease => RoundOutcome {
                tripped: true,
                ..outcome
            },
            _ => outcome,
        };
        let (now_us, wall_ms) = (self.now_us(), self.wall_ms());
        let fx = self.hosts[h]
            .machine
            .group_release(to, outcome, wall_ms, now_us);
        self.carry_out(h, fx);
    }

    fn crash(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        host.up = false;
        host.life += 1;
        host.reader = None;
        // Writes whose local write had not ended are lost; the dirty map is durable.
        host.inflight.clear();
        host.session += 1;
        if self.drs[h].session.is_some() {
            self.drs[h].session = None;
        }
        // Chains whose write was never answered write the record again elsewhere.
        let mut stalled = Vec::new();
        for w in &self.writes {
            if w.host == h && !w.answered && self.chains[w.chain].0 == w.record {
                stalled.push(w.chain);
            }
        }
        for c in stalled {
            self.chains[c].1 = (h + 1) % HOSTS;
            self.after(5, Event::Issue(c));
        }
    }

    /// The agent starts again: unconfirmed, in its group's last recorded cut, tripped, and
    /// with its catch-up unit's span open again if it recorded one.
    fn restart(&mut self, h: usize) {
        let now_us = self.now_us();
        let broken = self.broken;
        let host = &mut self.hosts[h];
        host.up = true;
        host.serving = false;
        host.tickets = TicketRegistry::new();
        let mut machine = Machine::new(ReplicationModel::Hypermetro, JOURNAL_BYTES, Epoch::ZERO)
            .starting_in(PairState::Unconfirmed);
        let _ = machine.set_grouped(true);
        machine.start_in_group(host.recorded_cut, now_us);
        if broken != Broken::StartUntripped {
            machine.start_tripped(now_us);
        }
        if let Some(from) = host.catch_up_from {
            machine.resume_unit(from);
        }
        host.machine = machine;
        self.report(h);
        self.after(CONFIRM_MS, Event::Confirm(h));
    }

    // ---- the DR side ----

    /// What a direct write is to the DR side's gate (the applier's rule, with the rules
    /// broken on purpose).
    fn gating(&self, frame: &WriteFrame<Value>) -> Gating {
        match self.broken {
            Broken::IgnoreGate if frame.gated => Gating::Direct,
            _ if frame.gated => Gating::Gated,
            // Broken: it waits only behind writes aside, not for the Ungate's epoch.
            Broken::WriteAfterUngateAtOnce => Gating::Ordered,
            _ => Gating::Direct,
        }
    }

    fn dr_frame(&mut self, h: usize, frame: Transmit<Value>, corrupted: bool) {
        match frame {
            Transmit::Write(write) if write.direct => {
                let gating = self.gating(&write);
                let dr = &mut self.drs[h];
                if dr.gate.must_wait(gating, Some(dr.units.applied())) {
                    dr.gate.set_aside(gating, (write, corrupted));
                } else {
                    self.dr_direct(h, write, corrupted);
                }
            }
            Transmit::Write(write) => {
                let room = !(self.faults() && self.rng.random_bool(0.003));
                let dr = &mut self.drs[h];
                match dr.units.staged_write(write.epoch, !corrupted, room) {
                    StagedWrite::Drop => {}
                    StagedWrite::Refuse(reason) => {
                        self.answer_production(h, Answer::Refused(write.seq, reason))
                    }
                    StagedWrite::Stage => {
                        for (b, v) in blocks(write.range).zip(values(&write.payload, write.range)) {
                            dr.staged.push((write.epoch, b, v, false));
                        }
                    }
                }
            }
            Transmit::Seal { epoch, cut_ms } => self.dr_seal(h, epoch, cut_ms, true),
            Transmit::Discard { after } => {
                let dr = &mut self.drs[h];
                let after = dr.units.discard(after);
                dr.staged.retain(|(e, ..)| *e <= after);
            }
            Transmit::Ungate { epoch } => self.drs[h].gate.ungate(epoch),
            Transmit::Flush { .. } | Transmit::SyncDone { .. } | Transmit::Verify { .. } => {
                panic!("the simulation sends no flush, sync end or verify")
            }
        }
        self.dr_progress(h);
    }

    /// A direct write: written, and answered once a sync covers it (its CRC failed on the
    /// way: refused, to be sent again).
    fn dr_direct(&mut self, h: usize, write: WriteFrame<Value>, corrupted: bool) {
        if corrupted {
            return self.answer_production(h, Answer::Refused(write.seq, RejectReason::Checksum));
        }
        for (b, v) in blocks(write.range).zip(values(&write.payload, write.range)) {
            let before = self.drs[h].image[b as usize];
            self.drs[h].volatile.push_back((b, before));
            self.set_dr_block(h, b, v);
        }
        if self.broken == Broken::AckBeforeSync {
            return self.answer_production(h, Answer::Written(write.seq));
        }
        self.drs[h].barrier.completed(write.seq);
        self.start_sync(h);
    }

    fn start_sync(&mut self, h: usize) {
        let dr = &mut self.drs[h];
        if !dr.barrier.wants_sync() {
            return;
        }
        let ticket = dr.barrier.start_sync();
        let reaches = dr.volatile_base + dr.volatile.len();
        dr.syncs.push_back((ticket, reaches));
        let applier = dr.applier;
        let delay = self.rng.random_range(1..6);
        self.after(delay, Event::DrSynced(h, applier));
    }

    /// A sync returned (syncs return in order here): what it covers is durable, and the
    /// writes the barrier held for it are answered.
    fn dr_synced(&mut self, h: usize) {
        let dr = &mut self.drs[h];
        let Some((ticket, reaches)) = dr.syncs.pop_front() else {
            return;
        };
        while dr.volatile_base < reaches && !dr.volatile.is_empty() {
            dr.volatile.pop_front();
            dr.volatile_base += 1;
        }
        for seq in dr.barrier.synced(ticket) {
            self.answer_production(h, Answer::Written(seq));
        }
        self.start_sync(h);
    }

    /// A seal arrived (`append`) or was found in the stage log: as the applier's `seal`.
    fn dr_seal(&mut self, h: usize, epoch: Epoch, cut_ms: u64, append: bool) {
        let dr = &mut self.drs[h];
        match dr.units.seal_arrived(epoch, append) {
            SealArrival::Staged => return self.answer_production(h, Answer::Staged(epoch)),
            SealArrival::Dropped => return,
            SealArrival::Append => {
                // The log is synced with its seal: everything staged before it is durable.
                for s in &mut dr.staged {
                    s.3 = true;
                }
                dr.seals.push(SealRecord { epoch, cut_ms });
                dr.last_seal = dr.last_seal.max(epoch);
                dr.units.appended(epoch);
                self.answer_production(h, Answer::Staged(epoch));
            }
            SealArrival::Replay => {}
        }
        let dr = &mut self.drs[h];
        if let Some(seal) = dr
            .units
            .unit_ready(SealRecord { epoch, cut_ms }, dr.allowed.0)
        {
            self.apply_unit(h, seal);
        }
    }

    /// Applies the unit `seal` ends: every staged write up to its epoch, in log order; the
    /// volume is synced after it.
    fn apply_unit(&mut self, h: usize, seal: SealRecord) {
        let (unit, rest): (Vec<_>, Vec<_>) = self.drs[h]
            .staged
            .drain(..)
            .partition(|(e, ..)| *e <= seal.epoch);
        self.drs[h].staged = rest;
        for (_, b, v, _) in unit {
            self.set_dr_block(h, b, v);
        }
        let dr = &mut self.drs[h];
        dr.seals.retain(|s| s.epoch > seal.epoch);
        dr.synced_all();
        let acks = dr.barrier.synced_outside();
        dr.units.unit_applied(seal);
        for seq in acks {
            self.answer_production(h, Answer::Written(seq));
        }
    }

    /// Starts what may start now: units the group committed, gated writes let go.
    fn dr_progress(&mut self, h: usize) {
        loop {
            let dr = &mut self.drs[h];
            if let Some(seal) = dr.units.committed_held_seal(dr.allowed.0) {
                self.apply_unit(h, seal);
                continue;
            }
            let applied = Some(dr.units.applied());
            let let_go = dr.gate.let_go(applied);
            if let_go.is_empty() {
                return;
            }
            for (mut write, corrupted) in let_go {
                write.gated = false;
                self.dr_direct(h, write, corrupted);
            }
        }
    }

    fn answer_production(&mut self, h: usize, answer: Answer) {
        let Some(session) = self.drs[h].session else {
            return;
        };
        let delay = self.rng.random_range(1..8);
        self.after(delay, Event::ToProduction(h, session, answer));
        if self.faults() && self.rng.random_bool(0.03) {
            let delay = self.rng.random_range(1..20);
            self.after(delay, Event::ToProduction(h, session, answer));
        }
    }

    fn production_hears(&mut self, h: usize, answer: Answer) {
        let now_us = self.now_us();
        let machine = &mut self.hosts[h].machine;
        let fx = match answer {
            Answer::Written(seq) => machine.handle_ack(seq, now_us),
            Answer::Staged(epoch) => machine.handle_staged(epoch, now_us),
            Answer::Refused(seq, reason) => machine.handle_reject(seq, reason, now_us),
        };
        self.carry_out(h, fx);
    }

    /// The DR host loses power: direct writes no sync covered and the stage log's unsynced
    /// tail are gone; what it recorded (its applied state, its sealed units, the group's
    /// commit) stays.
    fn dr_power_cut(&mut self, h: usize) -> Result<(), String> {
        let dr = &mut self.drs[h];
        dr.up = false;
        dr.applier += 1;
        dr.session = None;
        dr.syncs.clear();
        dr.barrier = AckBarrier::default();
        dr.gate = DirectGate::default();
        dr.staged.retain(|s| s.3);
        let lost: Vec<(u64, u64)> = dr.volatile.drain(..).rev().collect();
        dr.volatile_base += lost.len();
        for (b, before) in lost {
            self.set_dr_block(h, b, before);
        }
        self.check_clean_blocks(h)
    }

    /// Rules 1 and 2: a block clean at production holds production's data on the DR side,
    /// on its volume or, newer, in its stage log.
    fn check_clean_blocks(&self, h: usize) -> Result<(), String> {
        let (host, dr) = (&self.hosts[h], &self.drs[h]);
        let mut dr_image = dr.image.clone();
        for (_, b, v, _) in &dr.staged {
            dr_image[*b as usize] = *v;
        }
        for b in 0..host.next_block {
            if !host.dirty.is_dirty(b * BLOCK) && dr_image[b as usize] != host.image[b as usize] {
                return Err(format!(
                    "at {} ms, after host {h}'s DR side lost power, block {b} is clean at production but its DR side holds {} instead of {}",
                    self.clock.now(),
                    dr_image[b as usize],
                    host.image[b as usize]
                ));
            }
        }
        Ok(())
    }

    // ---- the checks ----

    /// A DR volume's block changes: the record whose write owns it may join or leave what
    /// a failover finds.
    fn set_dr_block(&mut self, h: usize, b: u64, value: u64) {
        let before = self.drs[h].image[b as usize];
        self.drs[h].image[b as usize] = value;
        let w = self.owners[h][b as usize];
        if w == usize::MAX {
            return;
        }
        let write = &self.writes[w];
        let (had, has) = (before == write.value, value == write.value);
        if had != has {
            let count = &mut self.on_volumes[write.chain][write.record as usize];
            if has {
                *count += 1;
            } else {
                *count -= 1;
            }
            self.touched.insert((write.chain, write.record));
        }
    }

    /// The group's commit: the highest any DR side or the coordinator knows.
    fn commit_known(&self) -> Epoch {
        self.drs
            .iter()
            .map(|d| d.allowed)
            .max()
            .unwrap_or(Epoch::ZERO)
            .max(self.cut.committed())
    }

    /// What a failover would give (each DR volume, and the sealed units of its stage log up
    /// to the group's commit) holds, for each chain, a prefix of its records.
    fn check(&mut self) -> Result<(), String> {
        let commit = self.commit_known();
        let mut in_logs = BTreeSet::new();
        for (h, dr) in self.drs.iter().enumerate() {
            let keep = commit.min(dr.last_seal);
            for (_, b, v, _) in dr.staged.iter().filter(|(e, ..)| *e <= keep) {
                let w = self.owners[h][*b as usize];
                if w != usize::MAX && self.writes[w].value == *v {
                    in_logs.insert((self.writes[w].chain, self.writes[w].record));
                }
            }
        }
        self.touched
            .extend(in_logs.symmetric_difference(&self.in_logs).copied());
        self.in_logs = in_logs;
        let touched = std::mem::take(&mut self.touched);
        for (chain, record) in touched {
            let present = self.present(chain, record);
            if present && record > 0 && !self.present(chain, record - 1) {
                return Err(self.gap(chain, record, commit));
            }
            if !present && self.present(chain, record + 1) {
                return Err(self.gap(chain, record + 1, commit));
            }
        }
        for (h, host) in self.hosts.iter().enumerate() {
            if host.up
                && let Err(broken) = host.machine.check_invariants()
            {
                return Err(format!("at {} ms host {h}: {broken}", self.clock.now()));
            }
        }
        for (h, dr) in self.drs.iter().enumerate() {
            if let Err(broken) = dr.units.check_invariants() {
                return Err(format!(
                    "at {} ms host {h}'s DR side: {broken}",
                    self.clock.now()
                ));
            }
        }
        Ok(())
    }

    fn present(&self, chain: usize, record: u64) -> bool {
        self.on_volumes[chain]
            .get(record as usize)
            .is_some_and(|n| *n > 0)
            || self.in_logs.contains(&(chain, record))
    }

    fn gap(&self, chain: usize, record: u64, commit: Epoch) -> String {
        format!(
            "at {} ms a failover (commit {}) would hold chain {chain}'s record {record} but not record {}, answered before it was issued; {}; {}",
            self.clock.now(),
            commit.0,
            record - 1,
            self.describe(chain, record),
            self.describe(chain, record - 1)
        )
    }

    /// Where the writes of a record are, for a failure's message.
    fn describe(&self, chain: usize, record: u64) -> String {
        let mut out = Vec::new();
        for (w, write) in self.writes.iter().enumerate() {
            if write.chain != chain || write.record != record {
                continue;
            }
            let dr = &self.drs[write.host];
            let staged: Vec<u64> = dr
                .staged
                .iter()
                .filter(|(_, b, v, _)| *b == write.block && *v == write.value)
                .map(|(e, ..)| e.0)
                .collect();
            out.push(format!(
                "record {record} is write {w} ({:?}) on host {} block {} (answered {}, on the DR volume {}, staged in {staged:?}; DR sealed {} applied {} allowed {})",
                write.kind,
                write.host,
                write.block,
                write.answered,
                dr.image[write.block as usize] == write.value,
                dr.last_seal.0,
                dr.units.applied().0,
                dr.allowed.0
            ));
        }
        out.join("; ")
    }

    // ---- the run ----

    fn step(&mut self) -> Result<bool, String> {
        let Some(event) = self.clock.next(END_MS) else {
            return Ok(false);
        };
        if std::env::var("BLOCKREP_TRACE").is_ok() {
            eprintln!("{:>6} {event:?}", self.clock.now());
        }
        match event {
            Event::CutTimer => {
                self.cut_timer();
                self.after(CUT_INTERVAL_MS, Event::CutTimer);
            }
            Event::CoordinatorTick => {
                if self.coordinator_up {
                    let releases = self.cut.on_tick(self.clock.now());
                    if !releases.is_empty() {
                        self.round = None;
                        self.send_cuts(releases, CutMode::Keep, RoundOutcome::default());
                    }
                }
                self.after(10, Event::CoordinatorTick);
            }
            Event::ToHost(h, message, mode, outcome) => {
                if self.hosts[h].up {
                    match message {
                        CutMessage::Cut { to, .. } => self.host_cut(h, to, mode),
                        CutMessage::Release { to, .. } => self.host_release(h, to, outcome),
                    }
                }
            }
            Event::Ack {
                host,
                to,
                staged,
                synchronous,
                spans,
            } => self.coordinator_ack(host, to, staged, synchronous, spans),
            Event::Report(h, mode) => {
                if self.coordinator_up {
                    self.reports[h] = Some(mode);
                }
            }
            Event::Commit(h, e) => {
                if self.drs[h].up {
                    self.drs[h].allowed = self.drs[h].allowed.max(e);
                    if self.drs[h].session.is_some() {
                        self.dr_progress(h);
                    }
                }
            }
            Event::HostTick(h) => self.host_tick(h)?,
            Event::LocalDone(h, life, w) => {
                if self.hosts[h].up && self.hosts[h].life == life {
                    self.local_done(h, w);
                }
            }
            Event::CatchUpStep(h, session) => {
                let host = &self.hosts[h];
                if host.up && host.session == session && host.reader.is_some() {
                    self.catch_up_step(h);
                    let delay = self.rng.random_range(1..4);
                    self.after(delay, Event::CatchUpStep(h, session));
                }
            }
            Event::ToDr(h, session, frame, corrupted) => {
                if self.drs[h].up && self.drs[h].session == Some(session) {
                    self.dr_frame(h, frame, corrupted);
                }
            }
            Event::ToProduction(h, session, answer) => {
                let host = &self.hosts[h];
                if host.up && host.session == session && host.machine.state().streaming() {
                    self.production_hears(h, answer);
                }
            }
            Event::DrSynced(h, applier) => {
                if self.drs[h].up && self.drs[h].applier == applier {
                    self.dr_synced(h);
                }
            }
            Event::Issue(c) => self.issue(c),
            Event::LinkCut(h) => {
                if self.hosts[h].link_up {
                    // The connection is gone: what was on the way is lost, the DR side
                    // ends the stream, the host notices a little later.
                    self.hosts[h].link_up = false;
                    self.drs[h].session = None;
                    let session = self.hosts[h].session;
                    self.after(LINK_DETECT_MS, Event::StreamLost(h, session));
                    let down = self.rng.random_range(50..800);
                    self.after(down, Event::LinkHeal(h));
                }
            }
            Event::LinkHeal(h) => {
                self.hosts[h].link_up = true;
                self.after(LINK_DETECT_MS + RECONNECT_MS, Event::Reconnect(h));
            }
            Event::StreamLost(h, session) => {
                if self.hosts[h].up && self.hosts[h].session == session {
                    self.disconnected(h);
                }
            }
            Event::Reconnect(h) => self.connect(h),
            Event::Confirm(h) => {
                if self.hosts[h].up {
                    self.hosts[h]
                        .machine
                        .confirm(false)
                        .expect("an unconfirmed side is confirmed");
                    self.hosts[h].serving = true;
                    self.connect(h);
                }
            }
            Event::HostCrash(h) => {
                if self.hosts[h].up {
                    self.crash(h);
                    let down = self.rng.random_range(20..300);
                    self.after(down, Event::HostRestart(h));
                }
            }
            Event::HostRestart(h) => self.restart(h),
            Event::DrPowerCut(h) => {
                if self.drs[h].up {
                    let session = self.hosts[h].session;
                    self.after(LINK_DETECT_MS, Event::StreamLost(h, session));
                    self.dr_power_cut(h)?;
                    let down = self.rng.random_range(30..300);
                    self.after(down, Event::DrRestart(h));
                }
            }
            Event::DrRestart(h) => {
                self.drs[h].up = true;
                self.after(RECONNECT_MS, Event::Reconnect(h));
            }
            Event::CoordinatorCrash => {
                if self.coordinator_up {
                    self.coordinator_up = false;
                    let down = self.rng.random_range(20..400);
                    self.after(down, Event::CoordinatorRestart);
                }
            }
            Event::CoordinatorRestart => self.coordinator_restart(),
        }
        self.check()?;
        Ok(true)
    }

    fn cut_timer(&mut self) {
        if !self.coordinator_up || self.round.is_some() {
            return;
        }
        let direct = self.direct_at.map(|at| (at, self.cut.committed() >= at));
        if let Some(mode) = hypermetro_cut(&self.reports, direct) {
            if mode == CutMode::Trip {
                self.direct_at = None;
            }
            let cuts = self.cut.start_cut(self.clock.now());
            self.round = Some((mode, true));
            self.send_cuts(cuts, mode, RoundOutcome::default());
            return;
        }
        if self.direct_at.is_some_and(|at| self.cut.committed() >= at) {
            self.direct_at = None;
        }
        // No cut: a DR side that missed the last commit gets it again.
        let committed = self.cut.committed();
        for h in 0..HOSTS {
            if self.drs[h].allowed < committed {
                self.control(Event::Commit(h, committed));
            }
        }
    }

    fn coordinator_ack(
        &mut self,
        host: usize,
        to: Epoch,
        staged: Epoch,
        synchronous: bool,
        spans: Vec<(Epoch, Option<Epoch>)>,
    ) {
        if !self.coordinator_up {
            return;
        }
        let name = host_name(host);
        self.cut.note_atomic(&name, spans);
        if let Some((_, all)) = self.round.as_mut() {
            *all &= synchronous;
        }
        let releases = self.cut.on_ack(&name, to, staged);
        if !releases.is_empty() {
            let (mode, all_synchronous) = self.round.expect("a round in progress");
            let outcome = RoundOutcome::of(mode, true, all_synchronous);
            if outcome.synchronous {
                self.direct_at = Some(self.cut.epoch());
                // The worst moment for the coordinator to crash: the group went
                // synchronous, nothing is committed past it yet. Now and then while the
                // faults last, and the first time after.
                let crash = match self.faults() {
                    true => self.rng.random_bool(0.3),
                    false => !std::mem::replace(&mut self.crashed_after_faults, true),
                };
                if crash {
                    self.after(1, Event::CoordinatorCrash);
                }
            }
            self.round = None;
            self.send_cuts(releases, CutMode::Keep, outcome);
        }
        let committed = self.cut.committed();
        if committed > self.committed {
            self.committed = committed;
            for h in 0..HOSTS {
                self.control(Event::Commit(h, committed));
            }
        }
    }

    fn coordinator_restart(&mut self) {
        self.coordinator_up = true;
        self.coordinator_up_since = self.clock.now();
        let reported = self
            .reports
            .iter()
            .flatten()
            .map(|r| r.epoch.0)
            .max()
            .unwrap_or(0);
        let names = (0..HOSTS).map(host_name);
        self.cut = CutCoordinator::new(
            names,
            Epoch(reported.max(self.cut.epoch().0) + EPOCH_JUMP),
            ROUND_TIMEOUT_MS,
        );
        self.round = None;
        // The group may have gone synchronous just before: cut until a commit.
        self.direct_at = (self.broken != Broken::RestartForgetsDirect).then_some(self.cut.epoch());
        self.reports = vec![None; HOSTS];
    }

    fn run(&mut self) -> Result<(), String> {
        while self.step()? {}
        // Liveness: with the faults over, the group is synchronous again and every answered
        // record is on its DR side.
        for (h, host) in self.hosts.iter().enumerate() {
            let m = &host.machine;
            if m.live() != Live::Sync || m.gated() {
                return Err(format!(
                    "at the end host {h} is {} and {:?}{}, not synchronous",
                    m.state(),
                    m.live(),
                    if m.gated() { " (gated)" } else { "" }
                ));
            }
        }
        if let Some(write) = self
            .writes
            .iter()
            .find(|w| w.answered && self.drs[w.host].image[w.block as usize] != w.value)
        {
            return Err(format!(
                "at the end record {} of chain {} was answered but is not on its DR side; {}",
                write.record,
                write.chain,
                self.describe(write.chain, write.record)
            ));
        }
        // Once the faults settled, nothing stalls: no write waits as long as the peer timeout
        // (a stream a silent DR side ends, say, with the writes it held).
        let now = self.clock.now();
        let unanswered = self
            .writes
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.answered && w.issued_ms >= SETTLED_MS)
            .map(|(i, w)| (i, now - w.issued_ms));
        if let Some((w, waited)) = self
            .slowest
            .into_iter()
            .chain(unanswered)
            .find(|(_, waited)| *waited >= PEER_TIMEOUT_MS)
        {
            let write = &self.writes[w];
            return Err(format!(
                "once the faults had stopped, write {w} waited {waited} ms for its answer; {}",
                self.describe(write.chain, write.record)
            ));
        }
        let answered = self.writes.iter().filter(|w| w.answered).count();
        if answered < 200 {
            return Err(format!("only {answered} records were answered"));
        }
        Ok(())
    }
}

fn new_host() -> Host {
    let mut machine = Machine::new(ReplicationModel::Hypermetro, JOURNAL_BYTES, Epoch::ZERO);
    let _ = machine.set_grouped(true);
    Host {
        up: true,
        life: 0,
        serving: true,
        machine,
        dirty: DirtyMap::new(BLOCKS * BLOCK, Granularity::DEFAULT),
        tickets: TicketRegistry::new(),
        image: vec![UNWRITTEN; BLOCKS as usize],
        next_block: 0,
        inflight: HashMap::new(),
        link_up: true,
        session: 0,
        stream_clock: 0,
        reader: None,
        dr_applied: Epoch::ZERO,
        recorded_cut: Epoch::ZERO,
        catch_up_from: None,
    }
}

fn blocks(range: ByteRange) -> std::ops::Range<u64> {
    range.offset / BLOCK..range.end() / BLOCK
}

/// The value each block of a write's `range` takes.
fn values(payload: &Payload<Value>, range: ByteRange) -> Vec<u64> {
    match payload {
        Payload::Data(v) => v.0.clone(),
        Payload::Zeroes => vec![0; blocks(range).count()],
    }
}

/// Dirty runs minus the unspoiled parts of live tickets (what the tracker's `unsent_runs`
/// computes).
fn unsent_runs(dirty: &DirtyMap, tickets: &TicketRegistry) -> Vec<ByteRange> {
    let sent = tickets.unspoiled_ranges();
    let mut out = Vec::new();
    for run in dirty.runs() {
        let mut at = run.offset;
        for s in sent
            .iter()
            .filter(|s| s.end() > run.offset && s.offset < run.end())
        {
            if s.offset > at {
                out.push(ByteRange::new(at, s.offset - at));
            }
            at = at.max(s.end());
        }
        if at < run.end() {
            out.push(ByteRange::new(at, run.end() - at));
        }
    }
    out
}

#[test]
fn a_hypermetro_group_stays_a_crash_image_through_trips_and_goes_synchronous_again() {
    let (mut answered, mut abandoned) = (0, 0);
    for seed in sim::seeds(300) {
        let mut sim = Sim::new(seed, Broken::Nothing);
        if let Err(e) = sim.run() {
            panic!("seed {seed} (replay with BLOCKREP_SEED={seed}): {e}");
        }
        answered += sim.writes.iter().filter(|w| w.answered).count();
        abandoned += sim.cut.broken_boundaries();
    }
    eprintln!("{answered} records answered; {abandoned} cuts abandoned");
}

/// Runs seeds with `broken` until one fails: the seed and what caught it.
fn caught(broken: Broken) -> (u64, String) {
    for seed in 0..300 {
        if let Err(e) = Sim::new(seed, broken).run() {
            eprintln!("{broken:?} caught by BLOCKREP_SEED={seed}: {e}");
            return (seed, e);
        }
    }
    panic!("300 seeds did not catch {broken:?}");
}

/// A DR side that writes gated direct writes at once (before the group committed what came
/// before them) lets a failover hold a write whose predecessor it lacks.
#[test]
fn writing_gated_writes_at_once_is_caught() {
    let (_, e) = caught(Broken::IgnoreGate);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A production host that restarts and journals while its group's other pairs still write
/// their DR sides directly.
#[test]
fn a_restart_that_does_not_trip_is_caught() {
    let (_, e) = caught(Broken::StartUntripped);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A trip hold given at the release of an abandoned trip round: a host that missed the trip
/// cut may still write its DR side directly.
#[test]
fn giving_a_trip_hold_at_an_abandoned_round_is_caught() {
    let (_, e) = caught(Broken::TripOnAnyRelease);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A DR side that writes a direct write after an `Ungate` before the epochs it names are
/// applied.
#[test]
fn writing_after_an_ungate_at_once_is_caught() {
    let (_, e) = caught(Broken::WriteAfterUngateAtOnce);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A restarted coordinator that does not cut a synchronous group until its first commit
/// leaves DR sides holding gated direct writes until the peer timeout ends their streams.
#[test]
fn a_coordinator_restart_that_forgets_the_direct_cut_is_caught() {
    let (_, e) = caught(Broken::RestartForgetsDirect);
    assert!(e.contains("while the group was synchronous"), "{e}");
}

/// A DR side that answers a direct write before a sync covers it: the block is clean at
/// production, and a power cut takes it from the DR side.
#[test]
fn an_answer_before_the_sync_is_caught() {
    let (_, e) = caught(Broken::AckBeforeSync);
    assert!(e.contains("is clean at production"), "{e}");
}
