//! Seeded simulation of a hypermetro consistency group's trip and way back (docs/GROUPS.md,
//! "Hypermetro: the group trip and the way back"), on a virtual clock.
//!
//! The coordinator is the core's [`CutCoordinator`] with the coordinator's choice of cut,
//! [`hypermetro_cut`]; each production host holds answers with the agent's [`AnswerHold`],
//! each DR side gates direct writes with the applier's [`DirectGate`]. The rest of what the
//! agents do (`blockrep-replication`'s `PairLink` and applier) is written out here over a
//! model of their streams:
//!
//! - a synchronous pair sends each write direct and answers once the DR side wrote it; one
//!   that loses its link holds every answer (a trip hold) and asks for a trip;
//! - a cut holds answers, switches epochs, and in `Trip` mode switches synchronous pairs to
//!   journaled, in `Direct` mode journaled pairs that caught up to synchronous, gated; the
//!   release of a direct cut every host switched at sends `Ungate`;
//! - the DR side stages journaled writes, applies them by the group's commits, and holds
//!   gated direct writes aside (unwritten, unanswered) until `Ungate(S)` came and it applied
//!   epoch S;
//! - a pair whose link comes back catches up: what it tracked is sent as one unit, reported
//!   as a span no commit may fall inside.
//!
//! Application chains write record after record, each issued once the previous one was
//! answered, each on the next host. Faults, until they stop: replication links cut and
//! healed, production hosts crashing, the coordinator crashing, its messages lost or late.
//! After every event, what a failover would give (every DR side's applied writes and its
//! staged ones up to the group's commit) must hold, for each chain, a prefix of its records.
//! Once the faults stop, the group must be synchronous again with every answered record on
//! its DR side. A failure prints its seed; `BLOCKREP_SEED=n` replays one.

use blockrep_core::replication::Epoch;
use blockrep_core::replication::answer_hold::AnswerHold;
use blockrep_core::replication::direct_gate::{DirectGate, Gating};
use blockrep_core::replication::group_cut::{
    CutCoordinator, CutMessage, CutMode, Live, PairMode, RoundOutcome, hypermetro_cut,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sim::{Clock, Fault, FaultPlan, host_name, host_of};

mod sim;

const HOSTS: usize = 2;
const CHAINS: usize = 2;
const CUT_INTERVAL_MS: u64 = 100;
const ROUND_TIMEOUT_MS: u64 = 50;
const HOLD_TIMEOUT_MS: u64 = 80;
const REPORT_MS: u64 = 50;
/// How long a host takes to notice its link is gone, and to connect again once it is back.
const LINK_DETECT_MS: u64 = 30;
const RECONNECT_MS: u64 = 40;
/// A restarted host takes writes once the coordinator confirmed it.
const CONFIRM_MS: u64 = 60;
/// A fresh coordinator starts this far above the epochs reported.
const EPOCH_JUMP: u64 = 64;
const FAULTS_UNTIL_MS: u64 = 5_000;
const END_MS: u64 = 12_000;

/// What runs on a pair's replication stream, in order.
#[derive(Clone, Copy, Debug)]
enum Frame {
    Direct { w: usize, gated: bool },
    Staged { w: usize, epoch: Epoch },
    Seal(Epoch),
    Ungate(Epoch),
}

/// What the DR side answers on the stream.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Written(usize),
    Staged(Epoch),
}

#[derive(Clone, Debug)]
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
    /// A frame reaches host `h`'s DR side, in stream session `session`.
    ToDr(usize, u32, Frame),
    ToProduction(usize, u32, Answer),
    Issue(usize),
    LinkCut(usize),
    LinkHeal(usize),
    LinkLost(usize),
    Reconnect(usize),
    HostCrash(usize),
    HostRestart(usize),
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

#[derive(Clone, Debug)]
struct Write {
    host: usize,
    chain: usize,
    record: u64,
    answered: bool,
}

struct Host {
    up: bool,
    /// Takes writes (after a restart, once confirmed).
    serving: bool,
    epoch: Epoch,
    live: Live,
    gated: bool,
    /// The agent's hold on answers (`AnswerHold`), of writes by index.
    hold: AnswerHold<usize>,
    /// The replication link is up (the network), and a stream session runs over it.
    link_up: bool,
    session: u32,
    connected: bool,
    /// When the last frame sent will arrive (frames keep their order).
    stream_clock: u64,
    /// Direct writes waiting for the DR side.
    pending: Vec<usize>,
    /// Journaled writes not yet staged-acknowledged, with their epochs.
    journaled: Vec<(usize, Epoch)>,
    /// Writes the DR side may lack: sent again by the next catch-up.
    tracked: Vec<usize>,
    staged: Epoch,
    catching_up: Option<Epoch>,
    spans: Vec<(Epoch, Option<Epoch>)>,
}

#[derive(Default)]
struct Dr {
    session: u32,
    applied: Vec<usize>,
    staged: Vec<(usize, Epoch)>,
    sealed: Epoch,
    applied_epoch: Epoch,
    allowed: Epoch,
    gate: DirectGate<Frame>,
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
    chains: Vec<(u64, usize)>,
    committed: Epoch,
    /// The rule broken on purpose.
    broken: Broken,
    /// Per chain, the records a failover's image holds (it only grows).
    present: Vec<std::collections::BTreeSet<u64>>,
    /// Per DR side, how many applied writes were added to `present`.
    counted: Vec<usize>,
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
            direct_at: Some(Epoch(1)),
            reports: vec![None; HOSTS],
            hosts: (0..HOSTS)
                .map(|_| Host {
                    up: true,
                    serving: true,
                    epoch: Epoch(1),
                    live: Live::Sync,
                    gated: false,
                    hold: AnswerHold::default(),
                    link_up: true,
                    session: 0,
                    connected: true,
                    stream_clock: 0,
                    pending: Vec::new(),
                    journaled: Vec::new(),
                    tracked: Vec::new(),
                    staged: Epoch::ZERO,
                    catching_up: None,
                    spans: Vec::new(),
                })
                .collect(),
            drs: (0..HOSTS).map(|_| Dr::default()).collect(),
            writes: Vec::new(),
            chains: (0..CHAINS).map(|c| (0, c % HOSTS)).collect(),
            committed: Epoch::ZERO,
            broken,
            present: vec![std::collections::BTreeSet::new(); CHAINS],
            counted: vec![0; HOSTS],
        };
        sim.at(CUT_INTERVAL_MS, Event::CutTimer);
        sim.at(10, Event::CoordinatorTick);
        for h in 0..HOSTS {
            sim.at(5, Event::HostTick(h));
        }
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
        sim
    }

    fn at(&mut self, when: u64, event: Event) {
        self.clock.at(when, event);
    }

    fn after(&mut self, delay: u64, event: Event) {
        self.clock.after(delay, event);
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

    /// A frame on host `h`'s stream, after the ones before it.
    fn send_frame(&mut self, h: usize, frame: Frame) {
        let host = &mut self.hosts[h];
        if !host.connected {
            return;
        }
        let at = (self.clock.now() + 1 + self.rng.random_range(0..8)).max(host.stream_clock);
        self.hosts[h].stream_clock = at;
        let session = self.hosts[h].session;
        self.at(at, Event::ToDr(h, session, frame));
    }

    fn answer_now(&mut self, w: usize) {
        let write = &mut self.writes[w];
        if write.answered {
            return;
        }
        write.answered = true;
        let (chain, record, host) = (write.chain, write.record, write.host);
        if self.chains[chain].0 == record {
            self.chains[chain] = (record + 1, (host + 1) % HOSTS);
            let delay = self.rng.random_range(0..5);
            self.after(delay, Event::Issue(chain));
        }
    }

    /// Answers `w` unless host `h` holds its answers.
    fn answer_or_hold(&mut self, h: usize, w: usize) {
        if let Some(w) = self.hosts[h].hold.hold_or_give(w) {
            self.answer_now(w);
        }
    }

    fn answer_all(&mut self, answers: Vec<usize>) {
        for w in answers {
            self.answer_now(w);
        }
    }

    fn report(&mut self, h: usize) {
        let host = &self.hosts[h];
        if !host.up {
            return;
        }
        let mode = PairMode {
            live: host.live,
            gated: host.gated,
            trip_wanted: host.hold.trip_wanted(),
            catching_up: host.catching_up.is_some(),
            epoch: host.epoch,
        };
        self.control(Event::Report(h, mode));
    }

    /// Host `h` moves admissions to `to`, sealing what came before (unless it only tracks).
    fn switch_epoch(&mut self, h: usize, to: Epoch) {
        if to <= self.hosts[h].epoch {
            return;
        }
        self.hosts[h].epoch = to;
        if self.hosts[h].live != Live::Tracked {
            self.send_frame(h, Frame::Seal(Epoch(to.0 - 1)));
        }
    }

    fn open_span(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        if host.spans.last().is_none_or(|s| s.1.is_some()) {
            host.spans.push((host.staged, None));
        }
    }

    /// The stream broke (the host noticed): writes the DR side may lack are tracked; a
    /// synchronous pair trips.
    fn disconnected(&mut self, h: usize) {
        let trip = self.hosts[h].live == Live::Sync;
        if self.hosts[h].live != Live::Sync || trip {
            self.open_span(h);
        }
        let host = &mut self.hosts[h];
        host.connected = false;
        host.live = Live::Tracked;
        host.gated = false;
        host.catching_up = None;
        let pending = std::mem::take(&mut host.pending);
        let journaled = std::mem::take(&mut host.journaled);
        host.tracked.extend(pending.iter().copied());
        host.tracked.extend(journaled.iter().map(|(w, _)| *w));
        if trip {
            host.hold.trip(self.clock.now(), pending);
            self.report(h);
        } else {
            self.answer_all(pending);
        }
    }

    /// A new stream: the DR side says what it staged; what the pair tracked is sent as one
    /// catch-up unit, ending at the group's next cut; the pair journals from now on.
    fn reconnect(&mut self, h: usize) {
        self.hosts[h].session += 1;
        self.drs[h].session = self.hosts[h].session;
        self.drs[h].gate = DirectGate::default();
        let host = &mut self.hosts[h];
        host.connected = true;
        host.stream_clock = self.clock.now();
        host.staged = host.staged.max(self.drs[h].sealed);
        self.open_span(h);
        let tracked = std::mem::take(&mut self.hosts[h].tracked);
        let epoch = self.hosts[h].epoch;
        for w in tracked {
            self.send_frame(h, Frame::Staged { w, epoch });
            self.hosts[h].journaled.push((w, epoch));
        }
        let host = &mut self.hosts[h];
        host.live = Live::Journal;
        host.catching_up = Some(epoch);
        if let Some(span) = host.spans.last_mut().filter(|s| s.1.is_none()) {
            span.1 = Some(epoch);
        }
    }

    fn dr_apply(&mut self, h: usize) {
        let dr = &mut self.drs[h];
        let target = dr.allowed.min(dr.sealed);
        if target > dr.applied_epoch {
            let (now, later): (Vec<_>, Vec<_>) =
                dr.staged.drain(..).partition(|(_, e)| *e <= target);
            dr.applied.extend(now.into_iter().map(|(w, _)| w));
            dr.staged = later;
            dr.applied_epoch = target;
        }
        // Let go: no longer gated.
        for frame in dr.gate.let_go(Some(dr.applied_epoch)) {
            let frame = match frame {
                Frame::Direct { w, .. } => Frame::Direct { w, gated: false },
                other => other,
            };
            self.dr_frame(h, frame);
        }
    }

    /// What a frame is to the DR side's gate (the applier's rule, with the rules broken on
    /// purpose).
    fn gating(&self, frame: &Frame) -> Option<Gating> {
        match frame {
            Frame::Direct { gated: true, .. } if self.broken != Broken::IgnoreGate => {
                Some(Gating::Gated)
            }
            // Broken: it waits only behind writes aside, not for the Ungate's epoch.
            Frame::Direct { .. } if self.broken == Broken::WriteAfterUngateAtOnce => {
                Some(Gating::Ordered)
            }
            Frame::Direct { .. } => Some(Gating::Direct),
            _ => None,
        }
    }

    fn dr_frame(&mut self, h: usize, frame: Frame) {
        let gating = self.gating(&frame);
        let dr = &mut self.drs[h];
        let session = dr.session;
        if let Some(gating) = gating
            && dr.gate.must_wait(gating, Some(dr.applied_epoch))
        {
            dr.gate.set_aside(gating, frame);
            return;
        }
        let answer = match frame {
            Frame::Direct { w, .. } => {
                dr.applied.push(w);
                Some(Answer::Written(w))
            }
            Frame::Staged { w, epoch } => {
                dr.staged.push((w, epoch));
                None
            }
            Frame::Seal(e) => {
                dr.sealed = dr.sealed.max(e);
                Some(Answer::Staged(e))
            }
            Frame::Ungate(e) => {
                dr.gate.ungate(e);
                None
            }
        };
        if let Some(answer) = answer {
            self.answer_to_production(h, session, answer);
        }
        self.dr_apply(h);
    }

    fn answer_to_production(&mut self, h: usize, session: u32, answer: Answer) {
        let delay = self.rng.random_range(1..8);
        self.after(delay, Event::ToProduction(h, session, answer));
    }

    fn step(&mut self) -> Result<bool, String> {
        let Some(event) = self.clock.next(END_MS) else {
            return Ok(false);
        };
        if std::env::var("BLOCKREP_TRACE").is_ok() {
            eprintln!("{:>6} {event:?}", self.clock.now());
        }
        match event {
            Event::CutTimer => {
                if self.coordinator_up && self.round.is_none() {
                    let direct = self.direct_at.map(|at| (at, self.cut.committed() >= at));
                    if let Some(mode) = hypermetro_cut(&self.reports, direct) {
                        if mode == CutMode::Trip {
                            self.direct_at = None;
                        }
                        let cuts = self.cut.start_cut(self.clock.now());
                        self.round = Some((mode, true));
                        self.send_cuts(cuts, mode, RoundOutcome::default());
                    } else {
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
                }
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
                if !self.hosts[h].up {
                    return Ok(true);
                }
                match message {
                    CutMessage::Cut { to, .. } => self.host_cut(h, to, mode),
                    CutMessage::Release { to, .. } => self.host_release(h, to, outcome),
                }
            }
            Event::Ack {
                host,
                to,
                staged,
                synchronous,
                spans,
            } => {
                if self.coordinator_up {
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
                        }
                        self.round = None;
                        self.send_cuts(releases, CutMode::Keep, outcome);
                    }
                    self.commit()?;
                }
            }
            Event::Report(h, mode) => {
                if self.coordinator_up {
                    self.reports[h] = Some(mode);
                }
            }
            Event::Commit(h, e) => {
                self.drs[h].allowed = self.drs[h].allowed.max(e);
                self.dr_apply(h);
            }
            Event::HostTick(h) => {
                if self.hosts[h].up {
                    let now = self.clock.now();
                    let expired = self.hosts[h].hold.expire(now, HOLD_TIMEOUT_MS);
                    self.answer_all(expired);
                }
                if self.clock.now().is_multiple_of(REPORT_MS) || self.hosts[h].hold.trip_wanted() {
                    self.report(h);
                }
                self.after(5, Event::HostTick(h));
            }
            Event::ToDr(h, session, frame) => {
                if session == self.drs[h].session && self.hosts[h].link_up {
                    self.dr_frame(h, frame);
                }
            }
            Event::ToProduction(h, session, answer) => {
                let host = &self.hosts[h];
                if !host.up || session != host.session || !host.connected || !host.link_up {
                    return Ok(true);
                }
                match answer {
                    Answer::Written(w) => {
                        if let Some(i) = self.hosts[h].pending.iter().position(|p| *p == w) {
                            self.hosts[h].pending.remove(i);
                            self.answer_now(w);
                        }
                    }
                    Answer::Staged(e) => {
                        let host = &mut self.hosts[h];
                        host.staged = host.staged.max(e);
                        host.journaled.retain(|(_, we)| *we > e);
                        if host.catching_up.is_some_and(|end| end <= e) {
                            host.catching_up = None;
                        }
                    }
                }
            }
            Event::Issue(c) => self.issue(c),
            Event::LinkCut(h) => {
                if self.hosts[h].link_up {
                    self.hosts[h].link_up = false;
                    self.after(LINK_DETECT_MS, Event::LinkLost(h));
                    let down = self.rng.random_range(50..800);
                    self.after(down, Event::LinkHeal(h));
                }
            }
            Event::LinkLost(h) => {
                if self.hosts[h].up && self.hosts[h].connected && !self.hosts[h].link_up {
                    self.disconnected(h);
                }
            }
            Event::LinkHeal(h) => {
                self.hosts[h].link_up = true;
                self.after(LINK_DETECT_MS + RECONNECT_MS, Event::Reconnect(h));
            }
            Event::Reconnect(h) => {
                if self.hosts[h].up {
                    // Restarted: the coordinator has confirmed it by now.
                    self.hosts[h].serving = true;
                }
                let host = &self.hosts[h];
                if host.up && host.link_up {
                    if host.connected {
                        // The cut was shorter than the detection: the stream broke anyway.
                        self.disconnected(h);
                    }
                    self.reconnect(h);
                }
            }
            Event::HostCrash(h) => {
                if self.hosts[h].up {
                    self.crash(h);
                    let down = self.rng.random_range(20..300);
                    self.after(down, Event::HostRestart(h));
                }
            }
            Event::HostRestart(h) => {
                let host = &mut self.hosts[h];
                host.up = true;
                host.serving = false;
                host.live = Live::Tracked;
                host.gated = false;
                host.connected = false;
                // It starts tripped: others may still write their DR sides directly.
                if self.broken != Broken::StartUntripped {
                    host.hold.trip(self.clock.now(), []);
                }
                self.report(h);
                self.after(CONFIRM_MS, Event::Reconnect(h));
            }
            Event::CoordinatorCrash => {
                if self.coordinator_up {
                    self.coordinator_up = false;
                    let down = self.rng.random_range(20..400);
                    self.after(down, Event::CoordinatorRestart);
                }
            }
            Event::CoordinatorRestart => {
                self.coordinator_up = true;
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
                self.direct_at =
                    (self.broken != Broken::RestartForgetsDirect).then_some(self.cut.epoch());
                self.reports = vec![None; HOSTS];
            }
        }
        self.check()?;
        Ok(true)
    }

    fn issue(&mut self, c: usize) {
        let (record, h) = self.chains[c];
        if !self.hosts[h].up || !self.hosts[h].serving {
            // Down, or not confirmed yet: the chain waits and tries the next host.
            self.chains[c].1 = (h + 1) % HOSTS;
            self.after(5, Event::Issue(c));
            return;
        }
        self.writes.push(Write {
            host: h,
            chain: c,
            record,
            answered: false,
        });
        let w = self.writes.len() - 1;
        let epoch = self.hosts[h].epoch;
        match self.hosts[h].live {
            Live::Sync if self.hosts[h].connected => {
                let gated = self.hosts[h].gated;
                self.hosts[h].pending.push(w);
                self.send_frame(h, Frame::Direct { w, gated });
            }
            Live::Journal if self.hosts[h].connected => {
                self.hosts[h].journaled.push((w, epoch));
                self.send_frame(h, Frame::Staged { w, epoch });
                self.answer_or_hold(h, w);
            }
            _ => {
                self.hosts[h].tracked.push(w);
                self.answer_or_hold(h, w);
            }
        }
    }

    fn host_cut(&mut self, h: usize, to: Epoch, mode: CutMode) {
        let switched = to > self.hosts[h].epoch;
        self.switch_epoch(h, to);
        let host = &mut self.hosts[h];
        match mode {
            CutMode::Trip if host.live == Live::Sync => {
                host.live = Live::Journal;
                host.gated = false;
            }
            CutMode::Direct
                if host.live == Live::Journal && host.catching_up.is_none() && host.connected =>
            {
                host.live = Live::Sync;
                host.gated = true;
                // The last journaled epoch is sealed before any direct frame.
                let last = host.epoch;
                host.epoch = last.next();
                self.send_frame(h, Frame::Seal(last));
            }
            _ => {}
        }
        let now = self.clock.now();
        let host = &mut self.hosts[h];
        host.hold.on_cut(to, mode, switched, now);
        // A catch-up's unit ends at the group's cut after it was sent.
        let staged = host.staged;
        let synchronous = host.live == Live::Sync;
        let spans = host.spans.clone();
        self.control(Event::Ack {
            host: h,
            to,
            staged,
            synchronous,
            spans,
        });
    }

    fn host_release(&mut self, h: usize, to: Epoch, outcome: RoundOutcome) {
        self.switch_epoch(h, to);
        let host = &self.hosts[h];
        if outcome.synchronous && host.live == Live::Sync && host.gated {
            self.hosts[h].gated = false;
            self.send_frame(h, Frame::Ungate(to));
        }
        let outcome = match self.broken {
            // Broken: every release counts as a completed trip.
            Broken::TripOnAnyRelease => RoundOutcome {
                tripped: true,
                ..outcome
            },
            _ => outcome,
        };
        let answers = self.hosts[h].hold.on_release(to, outcome);
        self.answer_all(answers);
    }

    fn crash(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        host.up = false;
        host.connected = false;
        host.session += 1;
        host.hold = AnswerHold::default();
        host.catching_up = None;
        host.pending.clear();
        host.journaled.clear();
        // After the restart, its bitmap has every write of its that its DR side may lack.
        let on_dr: Vec<bool> = (0..self.writes.len())
            .map(|w| self.drs[h].applied.contains(&w))
            .collect();
        host.tracked = (0..self.writes.len())
            .filter(|&w| self.writes[w].host == h && !on_dr[w])
            .collect();
        self.open_span(h);
        // Chains whose write was never answered write the record again elsewhere.
        let mut stalled = Vec::new();
        for w in &mut self.writes {
            if w.host == h && !w.answered && self.chains[w.chain].0 == w.record {
                stalled.push(w.chain);
            }
        }
        for c in stalled {
            self.chains[c].1 = (h + 1) % HOSTS;
            self.after(5, Event::Issue(c));
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        let committed = self.cut.committed();
        if committed > self.committed {
            self.committed = committed;
            for h in 0..HOSTS {
                self.control(Event::Commit(h, committed));
            }
        }
        Ok(())
    }

    /// What a failover would give (each DR side's applied writes and its staged ones up to
    /// the group's commit, the highest any DR side or the coordinator knows) holds, for each
    /// chain, a prefix of its records. The image only grows: each record that joins it must
    /// find its predecessor there.
    fn check(&mut self) -> Result<(), String> {
        let commit = self
            .drs
            .iter()
            .map(|d| d.allowed)
            .max()
            .unwrap_or(Epoch::ZERO)
            .max(self.cut.committed());
        let mut joined = Vec::new();
        for (h, dr) in self.drs.iter().enumerate() {
            let keep = commit.min(dr.sealed);
            let new = dr.applied[self.counted[h]..].iter().copied();
            let staged = dr
                .staged
                .iter()
                .filter(|(_, e)| *e <= keep)
                .map(|(w, _)| *w);
            for w in new.chain(staged) {
                let write = &self.writes[w];
                if self.present[write.chain].insert(write.record) {
                    joined.push((write.chain, write.record));
                }
            }
            self.counted[h] = dr.applied.len();
        }
        for (chain, record) in joined {
            if record > 0 && !self.present[chain].contains(&(record - 1)) {
                return Err(format!(
                    "at {} ms a failover (commit {}) would hold chain {chain}'s record {record} but not record {}, answered before it was issued; {}; {}",
                    self.clock.now(),
                    commit.0,
                    record - 1,
                    self.describe(chain, record),
                    self.describe(chain, record - 1)
                ));
            }
        }
        Ok(())
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
                .filter(|(x, _)| *x == w)
                .map(|(_, e)| e.0)
                .collect();
            out.push(format!(
                "record {record} is write {w} on host {} (answered {}, applied {}, staged in {staged:?}, DR sealed {} applied-epoch {} allowed {})",
                write.host,
                write.answered,
                dr.applied.contains(&w),
                dr.sealed.0,
                dr.applied_epoch.0,
                dr.allowed.0
            ));
        }
        out.join("; ")
    }

    fn run(&mut self) -> Result<(), String> {
        while self.step()? {}
        // Liveness: with the faults over, the group is synchronous again and every answered
        // record is on its DR side.
        for (h, host) in self.hosts.iter().enumerate() {
            if host.live != Live::Sync || host.gated {
                return Err(format!(
                    "at the end host {h} is {:?}{}, not synchronous",
                    host.live,
                    if host.gated { " (gated)" } else { "" }
                ));
            }
        }
        let applied: Vec<bool> = {
            let mut a = vec![false; self.writes.len()];
            for dr in &self.drs {
                for &w in &dr.applied {
                    a[w] = true;
                }
            }
            a
        };
        if let Some(w) = (0..self.writes.len()).find(|&w| self.writes[w].answered && !applied[w]) {
            let (chain, record) = (self.writes[w].chain, self.writes[w].record);
            return Err(format!(
                "at the end record {record} of chain {chain} was answered but is not on its DR side; {}",
                self.describe(chain, record)
            ));
        }
        let answered = self.writes.iter().filter(|w| w.answered).count();
        if answered < 200 {
            return Err(format!("only {answered} records were answered"));
        }
        Ok(())
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("BLOCKREP_SEED") {
        Ok(s) => vec![s.parse().expect("BLOCKREP_SEED is a number")],
        Err(_) => (0..300).collect(),
    }
}

#[test]
fn a_hypermetro_group_stays_a_crash_image_through_trips_and_goes_synchronous_again() {
    let (mut answered, mut abandoned) = (0, 0);
    for seed in seeds() {
        let mut sim = Sim::new(seed, Broken::Nothing);
        if let Err(e) = sim.run() {
            panic!("seed {seed} (replay with BLOCKREP_SEED={seed}): {e}");
        }
        answered += sim.writes.iter().filter(|w| w.answered).count();
        abandoned += sim.cut.broken_boundaries();
    }
    eprintln!("{answered} records answered; {abandoned} cuts abandoned");
}

/// A DR side that writes gated direct writes at once (before the group committed what came
/// before them) lets a failover hold a write whose predecessor it lacks: the checks must
/// catch it.
#[test]
fn writing_gated_writes_at_once_is_caught() {
    let caught = (0..300).any(|seed| Sim::new(seed, Broken::IgnoreGate).run().is_err());
    assert!(caught, "no seed caught gated writes written at once");
}

/// A production host that restarts and journals while its group's other pairs still write
/// their DR sides directly: the checks must catch it.
#[test]
fn a_restart_that_does_not_trip_is_caught() {
    let caught = (0..300).any(|seed| Sim::new(seed, Broken::StartUntripped).run().is_err());
    assert!(caught, "no seed caught a restart without a trip");
}

/// A trip hold given at the release of an abandoned trip round: a host that missed the trip
/// cut may still write its DR side directly. The checks must catch it.
#[test]
fn giving_a_trip_hold_at_an_abandoned_round_is_caught() {
    let caught = (0..300).any(|seed| Sim::new(seed, Broken::TripOnAnyRelease).run().is_err());
    assert!(
        caught,
        "no seed caught a trip hold given at an abandoned round"
    );
}

/// A DR side that writes a direct write after an `Ungate` before the epochs it names are
/// applied: the checks must catch it.
#[test]
fn writing_after_an_ungate_at_once_is_caught() {
    let caught = (0..300).any(|seed| {
        Sim::new(seed, Broken::WriteAfterUngateAtOnce)
            .run()
            .is_err()
    });
    assert!(
        caught,
        "no seed caught a direct write before the ungated epoch was applied"
    );
}

/// A restarted coordinator that does not cut a synchronous group until its first commit
/// leaves DR sides holding direct writes for good: the checks must catch it.
#[test]
fn a_coordinator_restart_that_forgets_the_direct_cut_is_caught() {
    let caught = (0..300).any(|seed| Sim::new(seed, Broken::RestartForgetsDirect).run().is_err());
    assert!(
        caught,
        "no seed caught a restart that forgot the direct cut"
    );
}
