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
//! - each DR side is `blockrep_core::pair::dr_side::DrSide` (the applier's machine: which
//!   staged writes and seals it takes, which units the group's commit lets apply, the gate
//!   of gated direct writes, the barrier that answers a direct write once a sync that began
//!   after it returned), over a volume that loses unsynced writes at a power cut and a
//!   stage log whose unsealed tail is lost with it;
//! - the coordinator is the core's `CutCoordinator` with the coordinator's choice of cut,
//!   `hypermetro_cut`.
//!
//! Every write takes a block of its own, so a DR volume shows which writes it holds.
//! Application chains write record after record, each issued once the previous one was
//! answered, each on the next host; a fifth of the writes take the slow path (an unaligned
//! write, or a WRITE_ZEROES), whose local write starts later, often after a trip began.
//! Faults, until they stop: replication links cut and healed (what was on the way is lost),
//! production hosts crashing, DR hosts losing power, the coordinator crashing, its messages
//! lost, late or twice, the DR side's answers late (in stream order), frames
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

// Two test binaries share this harness, each with its own mutations.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::shell::{BLOCK, Value, blocks, unsent_runs};
use super::{Clock, Fault, FaultPlan, host_name, host_of};
use blockrep_core::ByteRange;
use blockrep_core::dirty_map::{DirtyMap, Granularity};
use blockrep_core::pair::atomic_spans::unit_to_record;
use blockrep_core::pair::dr::{DrState, SealArrival, SealRecord, StagedWrite};
use blockrep_core::pair::dr_side::DrSide;
use blockrep_core::pair::production::{
    AfterLocal, Effects, LocalWrite, Production, ReplicaMode, Transmit,
};
use blockrep_core::pair::state::PairState;
use blockrep_core::replication::direct_gate::Gating;
use blockrep_core::replication::durability::SyncTicket;
use blockrep_core::replication::group_cut::{
    CutCoordinator, CutMessage, CutMode, Live, PairMode, RoundOutcome, hypermetro_cut,
};
use blockrep_core::replication::{
    AnswerToken, Epoch, Payload, Redeemed, RejectReason, ReplicationModel, TicketRegistry,
    WriteFrame, WriteSeq,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

mod check;
mod dr;
mod production;
mod undo;

use production::new_host;

/// Blocks of each host's volume: every write takes one of its own.
const BLOCKS: u64 = 8192;
/// What a block holds before any write.
const UNWRITTEN: u64 = u64::MAX;
/// Small, so that journaled stretches overflow now and then.
const JOURNAL_BYTES: u64 = 24 * BLOCK;
/// The resync reader's read-ahead: below the journal's bound, as in the agent.
const READ_AHEAD_BYTES: u64 = 8 * BLOCK;
/// A catch-up's final pass starts once this little is left.
const FINAL_PASS_BYTES: u64 = 4 * BLOCK;
const CUT_INTERVAL_MS: u64 = 100;
/// How often, between rounds, the coordinator asks what the hosts staged.
const STAGED_ASK_MS: u64 = 25;
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
/// A restarted host takes writes once the coordinator confirmed it: within this.
const CONFIRM_MS: std::ops::Range<u64> = 2..80;
/// A fresh coordinator starts this far above the epochs reported.
const EPOCH_JUMP: u64 = 64;
const FAULTS_UNTIL_MS: u64 = 5_000;
/// Writes issued this long after the faults stopped are answered within the peer timeout.
const SETTLED_MS: u64 = FAULTS_UNTIL_MS + 3_000;
/// A coordinator up this long has cut and committed a group that went synchronous (when
/// no message is lost).
const COMMIT_WITHIN_MS: u64 = 300;
const END_MS: u64 = 12_000;

/// Answers go back to one simulated connection per host.
type Machine = Production<Value, ()>;

/// What the DR side answers on the stream.
#[derive(Clone, Debug)]
enum Answer {
    /// Writes a sync made durable, answered together (or one at a time).
    Written(Vec<WriteSeq>),
    Staged(Epoch),
    Refused(WriteSeq, RejectReason),
}

#[derive(Debug)]
enum Event {
    CutTimer,
    /// Between rounds, the coordinator asks the hosts what they staged while the last
    /// completed cut's epoch is not committed.
    StagedTimer,
    AskStaged(usize),
    Staged {
        host: usize,
        staged: Epoch,
        spans: Vec<(Epoch, Option<Epoch>)>,
    },
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
    /// Write `w`'s local write on host `h` starts (a parked one: its frame goes now).
    Start(usize, u32, usize),
    /// Host `h`'s catch-up reader takes a step, in stream session `session`.
    CatchUpStep(usize, u32),
    /// A frame reaches host `h`'s DR side, in stream session `session`; `corrupted`: its
    /// CRC fails there.
    ToDr(usize, u32, Transmit<Value>, bool),
    ToProduction(usize, u32, Answer),
    /// A sync of host `h`'s DR volume returns (for its applier `applier`).
    DrSynced(usize, u32),
    /// The next write of the unit host `h`'s DR applier `applier` is applying reaches the
    /// volume.
    UnitWrite(usize, u32),
    Issue(usize),
    LinkCut(usize),
    LinkHeal(usize),
    /// Host `h` notices its stream `session` is gone.
    StreamLost(usize, u32),
    Reconnect(usize),
    Confirm(usize),
    HostCrash(usize),
    /// A crash whose agent systemd restarts at once (within a few ms).
    HostBounce(usize),
    HostRestart(usize),
    DrPowerCut(usize),
    DrRestart(usize),
    CoordinatorCrash,
    CoordinatorRestart,
}

impl Event {
    /// The same control message again, for a duplicate.
    fn again(&self) -> Option<Event> {
        Some(match self {
            Event::ToHost(h, message, mode, outcome) => {
                Event::ToHost(*h, message.clone(), *mode, *outcome)
            }
            Event::Ack {
                host,
                to,
                staged,
                synchronous,
                spans,
            } => Event::Ack {
                host: *host,
                to: *to,
                staged: *staged,
                synchronous: *synchronous,
                spans: spans.clone(),
            },
            Event::Report(h, mode) => Event::Report(*h, *mode),
            Event::AskStaged(h) => Event::AskStaged(*h),
            Event::Staged {
                host,
                staged,
                spans,
            } => Event::Staged {
                host: *host,
                staged: *staged,
                spans: spans.clone(),
            },
            Event::Commit(h, epoch) => Event::Commit(*h, *epoch),
            _ => return None,
        })
    }
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
    /// The fast path, parked while the activity log syncs: its frame goes when it starts.
    Parked,
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
    /// Its host crashed before it was answered: it never will be.
    lost: bool,
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
    /// Blocks of writes not answered yet: the agent keeps a write's blocks locked until it
    /// is answered, so the catch-up reader does not read them.
    locked: BTreeSet<u64>,
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
    /// For the checks: where the catch-up unit being made really began (kept through a
    /// crash, unlike the agent's memory), and the units made, (from, end).
    unit_from: Option<Epoch>,
    units: Vec<(Epoch, Epoch)>,
}

/// The DR side of one host's pair: its applier's machines over a volume and a stage log.
struct Dr {
    up: bool,
    /// Counts appliers (one per stream, one after a power cut): syncs of an earlier one
    /// are void.
    applier: u32,
    /// The stream it takes frames of.
    session: Option<u32>,
    /// The applier's machine; what it holds aside is a direct write and whether its CRC
    /// failed on the way (it verifies no probes).
    side: DrSide<(WriteFrame<Value>, bool), ()>,
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
    /// When the last answer sent arrives (the stream keeps them in order).
    answer_clock: u64,
    /// What arrived and waits, in order, while a unit is being applied (the applier takes
    /// no command meanwhile): the stream's frames, and a new applier's replayed seals.
    inbox: VecDeque<DrInput>,
    /// The unit being applied.
    applying: Option<UnitApply>,
    /// Units apply at once (an applier that stops finishes what arrived before the next
    /// one starts).
    draining: bool,
    /// The undo journal: points in time, kept before each unit applies.
    undo: undo::Undo,
}

/// A unit being applied: its seal, its writes (block, value) and how many are on the
/// volume.
struct UnitApply {
    seal: SealRecord,
    writes: Vec<(u64, u64)>,
    done: usize,
}

/// What the DR applier takes, in order.
enum DrInput {
    /// A frame of the stream, and whether its CRC fails here.
    Frame(Transmit<Value>, bool),
    /// A seal found in the stage log at the applier's start.
    Replay(SealRecord),
}

/// A rule of the protocol broken on purpose, for the checks to catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
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
    /// A host switches epochs and gives the held answers in one step, at the cut.
    ReleaseOnCut,
    /// The coordinator takes a host's staged epoch asked between rounds without the
    /// catch-up units that came with it.
    StagedWithoutUnits,
    /// A restarted agent forgets the catch-up unit its pair record names.
    ForgetRecordedUnit,
    /// The DR side records a unit applied when it begins applying it, before its writes
    /// are on the volume and synced.
    RecordUnitAtItsStart,
    /// The DR side takes a replayed unit's undo again, from the volume the unit half
    /// changed before a power cut.
    UndoTakenAgainOnReplay,
    /// A drill's view does not take a unit's undo before the unit applies.
    DrillViewNotExtended,
}

pub struct Sim {
    /// Hypermetro (two hosts, two chains) or async (three and three).
    model: ReplicationModel,
    hosts_n: usize,
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
    /// Per chain and record, the writes that carried it (one, or more after a crash).
    attempts: Vec<Vec<Vec<usize>>>,
    /// The records a failover finds in the stage logs, as of the last check.
    in_logs: BTreeSet<usize>,
    /// Records whose presence changed since the last check.
    touched: BTreeSet<(usize, u64)>,
    /// The write issued once the faults had settled that waited longest for its answer.
    slowest: Option<(usize, u64)>,
    /// When the coordinator last started its cuts (at the start, or after a restart once
    /// every host had reported).
    cutting_since: u64,
    /// The coordinator restarted and has not started its cuts again yet.
    starting: bool,
    /// The coordinator crashed after a direct cut once the faults had stopped.
    crashed_after_faults: bool,
    /// DR power cuts that fell while a unit was half applied.
    cuts_mid_unit: usize,
    /// What the undo journal's check found (it runs where units end and power is cut).
    undo_failure: Option<String>,
}

impl Sim {
    pub fn new(seed: u64, model: ReplicationModel, broken: Broken) -> Self {
        let n = match model {
            ReplicationModel::Hypermetro => 2,
            ReplicationModel::Async => 3,
        };
        let names: Vec<String> = (0..n).map(host_name).collect();
        let mut sim = Sim {
            model,
            hosts_n: n,
            rng: SmallRng::seed_from_u64(seed),
            clock: Clock::new(),
            cut: CutCoordinator::new(names, Epoch(1), ROUND_TIMEOUT_MS),
            coordinator_up: true,
            round: None,
            // A fresh coordinator cuts a hypermetro group until it commits.
            direct_at: (model == ReplicationModel::Hypermetro).then_some(Epoch(1)),
            reports: vec![None; n],
            hosts: (0..n).map(|_| new_host(model)).collect(),
            drs: (0..n).map(|_| Dr::new()).collect(),
            writes: Vec::new(),
            owners: vec![vec![usize::MAX; BLOCKS as usize]; n],
            chains: (0..n).map(|c| (0, c % n)).collect(),
            committed: Epoch::ZERO,
            broken,
            attempts: vec![Vec::new(); n],
            in_logs: BTreeSet::new(),
            touched: BTreeSet::new(),
            slowest: None,
            cutting_since: 0,
            starting: false,
            crashed_after_faults: false,
            cuts_mid_unit: 0,
            undo_failure: None,
        };
        for h in 0..n {
            sim.connect(h);
            sim.at(5, Event::HostTick(h));
        }
        sim.at(CUT_INTERVAL_MS, Event::CutTimer);
        sim.at(CUT_INTERVAL_MS + STAGED_ASK_MS, Event::StagedTimer);
        sim.at(10, Event::CoordinatorTick);
        for c in 0..n {
            sim.at(1, Event::Issue(c));
        }
        FaultPlan {
            hosts: n,
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
            let h = sim.rng.random_range(0..n);
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
        // Now and then a call is made twice (a retry whose first try went through).
        if self.faults()
            && self.rng.random_bool(0.03)
            && let Some(again) = event.again()
        {
            let delay = self.rng.random_range(1..30);
            self.after(delay, again);
        }
        // Now and then a message is slow, though within the round's timeout.
        let delay = if self.rng.random_bool(0.1) {
            self.rng.random_range(15..ROUND_TIMEOUT_MS)
        } else {
            self.rng.random_range(1..15)
        };
        self.after(delay, event);
    }

    fn send_cuts(&mut self, messages: Vec<CutMessage>, mode: CutMode, outcome: RoundOutcome) {
        for m in messages {
            let host = host_of(&m);
            self.control(Event::ToHost(host, m, mode, outcome));
        }
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
            Event::StagedTimer => {
                if self.coordinator_up && !self.starting && self.cut.commit_trails() {
                    for h in 0..self.hosts_n {
                        self.control(Event::AskStaged(h));
                    }
                }
                self.after(STAGED_ASK_MS, Event::StagedTimer);
            }
            Event::AskStaged(h) => {
                if self.hosts[h].up {
                    self.host_staged(h);
                }
            }
            Event::Staged {
                host,
                staged,
                spans,
            } => self.coordinator_staged(host, staged, spans)?,
            Event::CoordinatorTick => {
                // A coordinator starting again knows no round of its predecessor's.
                if self.coordinator_up && !self.starting {
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
            } => self.coordinator_ack(host, to, staged, synchronous, spans)?,
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
            Event::Start(h, life, w) => {
                if self.hosts[h].up && self.hosts[h].life == life {
                    self.start(h, w);
                    let delay = self.rng.random_range(0..3);
                    self.after(delay, Event::LocalDone(h, life, w));
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
            Event::UnitWrite(h, applier) => {
                if self.drs[h].up && self.drs[h].applier == applier {
                    self.unit_write(h);
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
            Event::HostCrash(h) | Event::HostBounce(h) => {
                if self.hosts[h].up {
                    self.crash(h);
                    let down = match event {
                        Event::HostBounce(_) => self.rng.random_range(1..5),
                        _ => self.rng.random_range(20..300),
                    };
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
                    self.reports = vec![None; self.hosts_n];
                    let down = self.rng.random_range(20..400);
                    self.after(down, Event::CoordinatorRestart);
                }
            }
            Event::CoordinatorRestart => self.coordinator_restart(),
        }
        self.note_units();
        self.check()?;
        Ok(true)
    }

    fn cut_timer(&mut self) {
        if !self.coordinator_up || self.round.is_some() || !self.start_cuts() {
            return;
        }
        let direct = self.direct_at.map(|at| (at, self.cut.committed() >= at));
        // An async group is cut at every interval.
        let mode = match self.model {
            ReplicationModel::Hypermetro => hypermetro_cut(&self.reports, direct),
            ReplicationModel::Async => Some(CutMode::Keep),
        };
        if let Some(mode) = mode {
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
        for h in 0..self.hosts_n {
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
    ) -> Result<(), String> {
        if !self.coordinator_up || self.starting {
            return Ok(());
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
        self.commit_moved()
    }

    /// A host's answer to the question what it staged, asked between rounds.
    fn coordinator_staged(
        &mut self,
        host: usize,
        staged: Epoch,
        spans: Vec<(Epoch, Option<Epoch>)>,
    ) -> Result<(), String> {
        if !self.coordinator_up || self.starting {
            return Ok(());
        }
        let name = host_name(host);
        if self.broken != Broken::StagedWithoutUnits {
            self.cut.note_atomic(&name, spans);
        }
        self.cut.on_staged(&name, staged);
        self.commit_moved()
    }

    /// Checks the commit against the hosts' catch-up units and sends it if it moved.
    fn commit_moved(&mut self) -> Result<(), String> {
        let committed = self.cut.committed();
        for (h, host) in self.hosts.iter().enumerate() {
            if let Some((from, end)) = host
                .units
                .iter()
                .find(|(from, end)| *from < committed && committed < *end)
            {
                return Err(format!(
                    "at {} ms epoch {} is committed, inside host {h}'s catch-up unit ({}, {}) whose end its DR side staged",
                    self.clock.now(),
                    committed.0,
                    from.0,
                    end.0
                ));
            }
        }
        if committed > self.committed {
            self.committed = committed;
            for h in 0..self.hosts_n {
                self.control(Event::Commit(h, committed));
            }
        }
        Ok(())
    }

    /// A coordinator that starts again has lost its cut state and the hosts' reports: it
    /// starts the group's cuts afresh once every host has reported again, above every epoch
    /// reported (the coordinator's `cut_group`).
    fn coordinator_restart(&mut self) {
        self.coordinator_up = true;
        self.round = None;
        self.reports = vec![None; self.hosts_n];
        self.starting = true;
    }

    /// The fresh cut state, once every host reported; `false` while one has not.
    fn start_cuts(&mut self) -> bool {
        if !self.starting {
            return true;
        }
        let Some(reported) = self
            .reports
            .iter()
            .map(|r| r.map(|r| r.epoch.0))
            .collect::<Option<Vec<_>>>()
        else {
            return false;
        };
        let from = Epoch(reported.into_iter().max().unwrap_or(0) + EPOCH_JUMP);
        let names = (0..self.hosts_n).map(host_name);
        self.cut = CutCoordinator::new(names, from, ROUND_TIMEOUT_MS);
        // The group may have gone synchronous just before: cut until a commit.
        self.direct_at = (self.model == ReplicationModel::Hypermetro
            && self.broken != Broken::RestartForgetsDirect)
            .then_some(from);
        self.starting = false;
        self.cutting_since = self.clock.now();
        true
    }

    pub fn run(&mut self) -> Result<(), String> {
        while self.step()? {}
        // Liveness: with the faults over, a hypermetro group is synchronous again and every
        // answered record is on its DR side; an async group journals, and every record
        // answered a second before the end is on its DR side.
        let (want, by) = match self.model {
            ReplicationModel::Hypermetro => (Live::Sync, END_MS),
            ReplicationModel::Async => (Live::Journal, END_MS - 1_000),
        };
        for (h, host) in self.hosts.iter().enumerate() {
            let m = &host.machine;
            if m.live() != want || m.gated() {
                return Err(format!(
                    "at the end host {h} is {} and {:?}{}, not {want:?}",
                    m.state(),
                    m.live(),
                    if m.gated() { " (gated)" } else { "" }
                ));
            }
        }
        if let Some(write) = self.writes.iter().find(|w| {
            w.answered && w.issued_ms < by && self.drs[w.host].image[w.block as usize] != w.value
        }) {
            return Err(format!(
                "at the end record {} of chain {} was answered but is not on its DR side; {}",
                write.record,
                write.chain,
                self.describe(write.chain, write.record)
            ));
        }
        // Every write is answered, but those whose host crashed first (and the last few).
        if let Some((w, write)) = self
            .writes
            .iter()
            .enumerate()
            .find(|(_, w)| !w.answered && !w.lost && w.issued_ms + 1_000 < END_MS)
        {
            return Err(format!(
                "write {w} (issued at {} ms) was never answered; {}",
                write.issued_ms,
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

    /// How many records were answered.
    pub fn answered(&self) -> usize {
        self.writes.iter().filter(|w| w.answered).count()
    }

    /// How many of the coordinator's cuts were abandoned (its last life's).
    pub fn abandoned_cuts(&self) -> usize {
        self.cut.broken_boundaries()
    }

    /// How many DR power cuts fell while a unit was half applied.
    pub fn cuts_mid_unit(&self) -> usize {
        self.cuts_mid_unit
    }

    /// Units whose undo was kept, replays that found it kept, and points held at the end,
    /// over the DR sides.
    pub fn undo_counts(&self) -> (u64, u64, usize) {
        self.drs.iter().fold((0, 0, 0), |(k, r, p), d| {
            (k + d.undo.kept, r + d.undo.replayed, p + d.undo.points())
        })
    }

    /// Blocks drills read and checked.
    pub fn drill_reads(&self) -> u64 {
        self.drs.iter().map(|d| d.undo.drill_reads).sum()
    }
}
