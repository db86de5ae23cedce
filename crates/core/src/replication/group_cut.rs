//! A consistency group's epoch cuts across hosts (rule 3), as state machines that do no
//! I/O: [`CutCoordinator`] on the coordinator; each production agent of the group holds its
//! answers with [`super::answer_hold::AnswerHold`]. docs/GROUPS.md argues why they keep
//! write order; the seeded simulations in `tests/group_cut_sim.rs` and
//! `tests/hypermetro_group_sim.rs` check it with hosts that crash and messages that are lost
//! or late.
//!
//! ```text
//!  coordinator                          each production host of the group
//!   Cut(to) ───────────────────────────► hold answers, switch admissions to `to`
//!          ◄─────────────────────────── CutAck(to, staged epochs of its pairs)
//!   (every host acked)
//!   Release(to) ───────────────────────► answer what was held
//!   commit: the highest epoch E ≤ every pair's staged epoch whose end is a completed cut
//! ```
//!
//! A round that does not complete in time is abandoned: its hosts are released, and its
//! boundary is *broken* — a host released early may have answered a write of the new epoch
//! on which a write admitted in the old one, on a host that never switched, depends. A
//! broken boundary is never committed: the epochs on both sides of it apply together, up to
//! the next completed cut.
//!
//! A host that holds longer than its timeout releases on its own (the application must not
//! stall on a lost coordinator). Its hold timeout is longer than the coordinator's round
//! timeout, and it starts holding only after the round started, so it can release on its
//! own only after the round completed (every host switched: the boundary is good) or after
//! the coordinator abandoned it (the boundary is broken). A coordinator that restarts in the
//! middle of a round (it records the round before it sends a cut) abandons it.

use std::collections::{BTreeMap, BTreeSet};

use super::Epoch;

/// How long the coordinator waits for every host's ack before it abandons a cut.
pub const ROUND_TIMEOUT_MS: u64 = 1_000;
/// How long a host holds answers without a release: longer than a round may take.
pub const HOLD_TIMEOUT_MS: u64 = 2 * ROUND_TIMEOUT_MS;

/// A production host of the group (its node name on the wire).
pub type HostId = String;

/// What a cut does to a hypermetro group's pairs besides holding answers and switching
/// epochs (docs/GROUPS.md, "Hypermetro: the group trip and the way back").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CutMode {
    /// Epochs only (every async cut).
    #[default]
    Keep,
    /// A trip: synchronous pairs journal from this cut on.
    Trip,
    /// Back to synchronous: journaled pairs that caught up go direct, their direct writes
    /// gated until the release of a cut every host switched at.
    Direct,
}

impl CutMode {
    pub fn code(self) -> u32 {
        match self {
            CutMode::Keep => 0,
            CutMode::Trip => 1,
            CutMode::Direct => 2,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(CutMode::Keep),
            1 => Some(CutMode::Trip),
            2 => Some(CutMode::Direct),
            _ => None,
        }
    }
}

/// How a released round ended, as its release tells the hosts. An abandoned round (a host
/// did not switch in time) is neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundOutcome {
    /// A trip cut every host switched at: no pair of the group writes its DR side directly
    /// any more, so a tripped pair's held answers may be given.
    pub tripped: bool,
    /// A direct cut every host switched at, each synchronous after it: the DR sides may
    /// write the gated writes once they applied the cut's epoch.
    pub synchronous: bool,
}

impl RoundOutcome {
    /// The outcome of a round in `mode` that `completed` (every host acked in time), whose
    /// hosts all said they were synchronous after it (`all_synchronous`).
    pub fn of(mode: CutMode, completed: bool, all_synchronous: bool) -> Self {
        Self {
            tripped: completed && mode == CutMode::Trip,
            synchronous: completed && mode == CutMode::Direct && all_synchronous,
        }
    }
}

/// What the coordinator sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CutMessage {
    /// Hold answers and switch admissions to epoch `to`.
    Cut { host: HostId, to: Epoch },
    /// Answer what was held for the cut to `to`.
    Release { host: HostId, to: Epoch },
}

/// How a production host's pair sends its live writes (its link's mode, and what it
/// reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Live {
    /// Direct, answered once the DR side wrote them (hypermetro).
    Sync,
    /// In epochs, staged on the DR side.
    Journal,
    /// Not sent: the bitmap has them (link down, catch-up running).
    Tracked,
}

impl Live {
    /// Its name in a report.
    pub fn as_str(self) -> &'static str {
        match self {
            Live::Sync => "sync",
            Live::Journal => "journal",
            Live::Tracked => "tracked",
        }
    }

    /// The mode a report names; anything else is taken as tracked (nothing sent).
    pub fn from_report(name: &str) -> Self {
        match name {
            "sync" => Live::Sync,
            "journal" => Live::Journal,
            _ => Live::Tracked,
        }
    }
}

/// What a hypermetro group's cut decision needs of a pair, from its production host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairMode {
    pub live: Live,
    /// Its direct writes are gated (the group is going synchronous).
    pub gated: bool,
    /// It lost its link while synchronous; its answers wait for a trip cut.
    pub trip_wanted: bool,
    pub catching_up: bool,
    /// The epoch it admits writes in.
    pub epoch: Epoch,
}

/// The next cut of a hypermetro group, from its pairs' reports (`None`: no report yet): a
/// trip if a pair lost its link, a direct cut once every pair journals caught up (or is
/// synchronous already), epochs only while some pair is not ready or the last direct cut
/// (`direct`: its epoch, and whether it is committed) is not committed yet; none while the
/// group is synchronous, or while the reports predate the last direct cut.
pub fn hypermetro_cut(
    pairs: &[Option<PairMode>],
    direct: Option<(Epoch, bool)>,
) -> Option<CutMode> {
    if pairs.iter().flatten().any(|p| p.trip_wanted) {
        return Some(CutMode::Trip);
    }
    match direct {
        Some((_, false)) => return Some(CutMode::Keep),
        Some((at, true)) if pairs.iter().any(|p| p.is_none_or(|p| p.epoch <= at)) => return None,
        _ => {}
    }
    let synchronous = |p: &PairMode| p.live == Live::Sync && !p.gated;
    if pairs.iter().all(|p| p.as_ref().is_some_and(synchronous)) {
        return None;
    }
    let ready = |p: &PairMode| p.live == Live::Sync || (p.live == Live::Journal && !p.catching_up);
    if pairs.iter().all(|p| p.as_ref().is_some_and(ready)) {
        return Some(CutMode::Direct);
    }
    Some(CutMode::Keep)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Round {
    to: Epoch,
    started_ms: u64,
    acked: BTreeSet<HostId>,
}

/// The coordinator's side of a group's cuts.
#[derive(Clone, Debug)]
pub struct CutCoordinator {
    hosts: BTreeSet<HostId>,
    /// The epoch admissions take on every host once the last cut completed.
    epoch: Epoch,
    /// The lowest epoch that may be committed (see [`CutCoordinator::new`]).
    floor: Epoch,
    round: Option<Round>,
    /// Epochs whose end is a cut that did not complete.
    broken: BTreeSet<Epoch>,
    /// The last epoch staged by each host (the lowest of its pairs').
    staged: BTreeMap<HostId, Epoch>,
    /// Spans a pair's DR side can only take whole (a catch-up's unit): epochs strictly
    /// inside are never committed. `None`: the unit is still being made.
    atomic: BTreeMap<HostId, BTreeSet<(Epoch, Option<Epoch>)>>,
    committed: Epoch,
    round_timeout_ms: u64,
}

impl CutCoordinator {
    /// A group whose hosts admit writes in epochs below `epoch` (cut by anyone: the pairs on
    /// their own before they joined, or a coordinator that restarted since). No boundary
    /// below `epoch` is known to be a group cut, so nothing below it is ever committed: the
    /// first commit is `epoch` or later, once the cut past it completes.
    pub fn new(
        hosts: impl IntoIterator<Item = HostId>,
        epoch: Epoch,
        round_timeout_ms: u64,
    ) -> Self {
        let hosts: BTreeSet<HostId> = hosts.into_iter().collect();
        Self {
            staged: hosts.iter().map(|h| (h.clone(), Epoch::ZERO)).collect(),
            hosts,
            epoch,
            floor: epoch,
            atomic: BTreeMap::new(),
            round: None,
            broken: BTreeSet::new(),
            committed: Epoch::ZERO,
            round_timeout_ms,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The highest epoch the DR side may apply, group-wide.
    pub fn committed(&self) -> Epoch {
        self.committed
    }

    pub fn cutting(&self) -> bool {
        self.round.is_some()
    }

    /// How many cuts were abandoned (their boundaries are never committed).
    pub fn broken_boundaries(&self) -> usize {
        self.broken.len()
    }

    /// Starts a cut to the next epoch (unless one is running): every host gets `Cut`.
    pub fn start_cut(&mut self, now_ms: u64) -> Vec<CutMessage> {
        if self.round.is_some() {
            return Vec::new();
        }
        let to = self.epoch.next();
        self.round = Some(Round {
            to,
            started_ms: now_ms,
            acked: BTreeSet::new(),
        });
        self.hosts
            .iter()
            .map(|h| CutMessage::Cut {
                host: h.clone(),
                to,
            })
            .collect()
    }

    /// A host switched to `to` and holds its answers; `staged` is the last epoch its pairs
    /// staged on the DR side. Once every host acked, all are released and the cut is done.
    pub fn on_ack(&mut self, host: &str, to: Epoch, staged: Epoch) -> Vec<CutMessage> {
        if let Some(s) = self.staged.get_mut(host) {
            *s = (*s).max(staged);
        }
        let mut out = Vec::new();
        if let Some(round) = self.round.as_mut()
            && round.to == to
            && self.hosts.contains(host)
        {
            round.acked.insert(host.to_owned());
            if round.acked == self.hosts {
                self.epoch = to;
                self.round = None;
                out = self.release_all(to);
            }
        }
        self.advance_commit();
        out
    }

    /// A host's staged epoch, asked for between cuts: taken as an ack's is, without a round.
    /// The commit then follows what the DR sides staged within a fraction of an interval,
    /// instead of waiting for the next round's acks. The host's catch-up units come first
    /// ([`CutCoordinator::note_atomic`]), as with an ack.
    pub fn on_staged(&mut self, host: &str, staged: Epoch) {
        if let Some(s) = self.staged.get_mut(host) {
            *s = (*s).max(staged);
        }
        self.advance_commit();
    }

    /// The last completed cut's epoch is not committed yet: asking the hosts what they
    /// staged may commit it.
    pub fn commit_trails(&self) -> bool {
        let last = Epoch(self.epoch.0.saturating_sub(1));
        self.round.is_none() && last >= self.floor && self.committed < last
    }

    /// Abandons a round that has not completed in time: its boundary is broken, every host
    /// is released (and switches to the new epoch if it had not).
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<CutMessage> {
        match &self.round {
            Some(round) if now_ms.saturating_sub(round.started_ms) >= self.round_timeout_ms => {
                self.abandon()
            }
            _ => Vec::new(),
        }
    }

    /// After a restart: a round that was in flight is abandoned.
    pub fn restart(&mut self) -> Vec<CutMessage> {
        self.abandon()
    }

    fn abandon(&mut self) -> Vec<CutMessage> {
        let Some(round) = self.round.take() else {
            return Vec::new();
        };
        let to = round.to;
        self.broken.insert(Epoch(to.0 - 1));
        self.epoch = to;
        self.release_all(to)
    }

    fn release_all(&self, to: Epoch) -> Vec<CutMessage> {
        self.hosts
            .iter()
            .map(|h| CutMessage::Release {
                host: h.clone(),
                to,
            })
            .collect()
    }

    /// The spans `host` reports with its ack: for each of its pairs' DR sides, epochs from
    /// `from` (exclusive) to `to` (exclusive; `None`: not known yet) come in one unit it can
    /// only apply whole, and none of them is committed. Closed spans are kept (a restarted
    /// host forgets them). An open span the host no longer reports belongs to an agent that
    /// restarted: its unit may have ended, its end seal staged, before any ack said where.
    /// It is closed at the highest epoch the host can have reached, the last one it was cut
    /// or released to, which no unit of it can end past.
    pub fn note_atomic(
        &mut self,
        host: &str,
        spans: impl IntoIterator<Item = (Epoch, Option<Epoch>)>,
    ) {
        let reached = self
            .round
            .as_ref()
            .map_or(self.epoch, |round| round.to.max(self.epoch));
        let reported: BTreeSet<(Epoch, Option<Epoch>)> = spans.into_iter().collect();
        let known = self.atomic.entry(host.to_owned()).or_default();
        let forgotten: Vec<(Epoch, Option<Epoch>)> = known
            .iter()
            .filter(|(from, to)| to.is_none() && !reported.iter().any(|(f, _)| f == from))
            .map(|(from, _)| (*from, Some(reached)))
            .collect();
        known.retain(|(_, to)| to.is_some());
        known.extend(reported);
        known.extend(forgotten);
    }

    fn inside_atomic(&self, e: Epoch) -> bool {
        self.atomic
            .values()
            .flatten()
            .any(|(from, to)| *from < e && to.is_none_or(|t| e < t))
    }

    /// Commits the highest epoch every host staged whose end is a completed cut, and that
    /// no pair's DR side must skip.
    fn advance_commit(&mut self) {
        let staged = self.staged.values().copied().min().unwrap_or(Epoch::ZERO);
        // An epoch's end is a completed cut once admissions moved past it without breaking.
        let mut e = staged.min(Epoch(self.epoch.0.saturating_sub(1)));
        while e > self.committed && (self.broken.contains(&e) || self.inside_atomic(e)) {
            e = Epoch(e.0 - 1);
        }
        if e >= self.floor && e > self.committed {
            self.committed = e;
            let committed = self.committed;
            for spans in self.atomic.values_mut() {
                spans.retain(|(_, to)| to.is_none_or(|t| t > committed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::answer_hold::AnswerHold;

    fn hosts() -> Vec<HostId> {
        vec!["a".into(), "b".into()]
    }

    /// What the hosts staged, asked for between rounds, commits the last completed cut's
    /// epoch without waiting for the next round; never past it, nor inside a catch-up unit.
    #[test]
    fn staged_epochs_asked_between_rounds_move_the_commit() {
        let mut c = CutCoordinator::new(hosts(), Epoch(1), 1000);
        c.start_cut(0);
        c.on_ack("a", Epoch(2), Epoch(0));
        c.on_ack("b", Epoch(2), Epoch(0));
        assert_eq!(c.committed(), Epoch(0));
        assert!(c.commit_trails());
        c.on_staged("a", Epoch(1));
        assert_eq!(c.committed(), Epoch(0), "b has not staged epoch 1");
        c.on_staged("b", Epoch(5));
        assert_eq!(c.committed(), Epoch(1), "never past the last completed cut");
        assert!(!c.commit_trails());

        // Host a's catch-up unit spans epochs 1 to 3: nothing strictly inside commits.
        c.start_cut(10);
        c.on_ack("a", Epoch(3), Epoch(1));
        c.on_ack("b", Epoch(3), Epoch(5));
        c.start_cut(20);
        c.on_ack("a", Epoch(4), Epoch(1));
        c.on_ack("b", Epoch(4), Epoch(5));
        c.note_atomic("a", [(Epoch(1), Some(Epoch(3)))]);
        c.on_staged("a", Epoch(2));
        assert_eq!(c.committed(), Epoch(1), "epoch 2 lies inside a's unit");
        c.on_staged("a", Epoch(3));
        assert_eq!(c.committed(), Epoch(3));
        assert!(!c.commit_trails());
    }

    #[test]
    fn a_cut_releases_only_after_every_host_switched() {
        let mut c = CutCoordinator::new(hosts(), Epoch(1), 1000);
        let mut a = AnswerHold::default();
        let mut b = AnswerHold::<u32>::default();
        let cuts = c.start_cut(0);
        assert_eq!(cuts.len(), 2);
        a.on_cut(Epoch(2), CutMode::Keep, true, 0);
        assert_eq!(a.hold_or_give(1), None);
        assert!(
            c.on_ack("a", Epoch(2), Epoch(1)).is_empty(),
            "b has not switched"
        );
        b.on_cut(Epoch(2), CutMode::Keep, true, 1);
        let releases = c.on_ack("b", Epoch(2), Epoch(1));
        assert_eq!(releases.len(), 2);
        assert_eq!(a.on_release(Epoch(2), RoundOutcome::default()), vec![1]);
        assert!(b.on_release(Epoch(2), RoundOutcome::default()).is_empty());
        assert_eq!(c.epoch(), Epoch(2));
        assert_eq!(c.committed(), Epoch(1));
    }

    #[test]
    fn an_abandoned_cut_breaks_its_boundary_and_is_never_committed() {
        // The cut 1 → 2 is abandoned (b never acked): the end of epoch 1 is broken.
        let mut c = CutCoordinator::new(hosts(), Epoch(1), 1000);
        c.start_cut(0);
        c.on_ack("a", Epoch(2), Epoch(1));
        assert_eq!(c.on_tick(999), Vec::new());
        assert_eq!(c.on_tick(1000).len(), 2, "everyone is released");
        assert_eq!(c.epoch(), Epoch(2));
        // The cut 2 → 3 completes with epoch 1 staged everywhere: 1 is not committed.
        c.start_cut(1000);
        c.on_ack("a", Epoch(3), Epoch(1));
        c.on_ack("b", Epoch(3), Epoch(1));
        assert_eq!(c.committed(), Epoch(0));
        // Once epoch 2 is staged everywhere, 1 and 2 commit together.
        c.start_cut(2000);
        c.on_ack("a", Epoch(4), Epoch(2));
        c.on_ack("b", Epoch(4), Epoch(2));
        assert_eq!(c.committed(), Epoch(2));
        // A restart in the middle of a round abandons it.
        c.start_cut(3000);
        assert_eq!(c.restart().len(), 2);
        c.start_cut(3000);
        c.on_ack("a", Epoch(6), Epoch(5));
        c.on_ack("b", Epoch(6), Epoch(4));
        assert_eq!(c.committed(), Epoch(3), "the end of epoch 4 is broken");
    }

    #[test]
    fn an_epoch_inside_a_catch_up_unit_is_never_committed() {
        let mut c = CutCoordinator::new(hosts(), Epoch(1), 1000);
        for to in 2..=6 {
            c.start_cut(0);
            // b's pair is catching up from epoch 2: its unit ends at epoch 5.
            c.note_atomic(
                "b",
                [(Epoch(2), if to >= 5 { Some(Epoch(5)) } else { None })],
            );
            c.on_ack("a", Epoch(to), Epoch(to - 1));
            c.on_ack("b", Epoch(to), Epoch(to - 1));
            let committed = c.committed().0;
            assert!(
                committed <= 2 || committed >= 5,
                "committed {committed} inside (2, 5)"
            );
        }
        assert_eq!(c.committed(), Epoch(5));
        // A host that restarted no longer reports its open span: it holds commits only up
        // to the last epoch the host was cut to (8, in the round of the ack), past which its
        // unit cannot end.
        c.start_cut(0);
        c.note_atomic("a", [(Epoch(5), None)]);
        c.on_ack("a", Epoch(7), Epoch(6));
        c.on_ack("b", Epoch(7), Epoch(6));
        assert_eq!(c.committed(), Epoch(5));
        c.start_cut(0);
        c.note_atomic("a", []);
        c.on_ack("a", Epoch(8), Epoch(7));
        c.on_ack("b", Epoch(8), Epoch(7));
        assert_eq!(c.committed(), Epoch(5), "7 is inside (5, 8)");
        c.start_cut(0);
        c.note_atomic("a", []);
        c.on_ack("a", Epoch(9), Epoch(8));
        c.on_ack("b", Epoch(9), Epoch(8));
        assert_eq!(c.committed(), Epoch(8));
    }

    /// A unit closed at 90 whose end was never staged (the link broke again), and a new
    /// unit from the same staged epoch: the new one, still open, holds commits past 90.
    #[test]
    fn a_new_unit_from_the_same_staged_epoch_as_a_closed_one_holds_commits() {
        let mut c = CutCoordinator::new(hosts(), Epoch(87), 1000);
        for to in 88..=94 {
            c.start_cut(0);
            c.note_atomic("b", [(Epoch(87), Some(Epoch(90))), (Epoch(87), None)]);
            c.on_ack("a", Epoch(to), Epoch(to - 1));
            c.on_ack("b", Epoch(to), Epoch(87));
        }
        // b's new unit ends at 93 and is staged.
        c.start_cut(0);
        c.note_atomic(
            "b",
            [(Epoch(87), Some(Epoch(90))), (Epoch(87), Some(Epoch(93)))],
        );
        c.on_ack("a", Epoch(95), Epoch(94));
        c.on_ack("b", Epoch(95), Epoch(93));
        assert_eq!(c.committed(), Epoch(93));
        let mut c = CutCoordinator::new(hosts(), Epoch(87), 1000);
        for to in 88..=94 {
            c.start_cut(0);
            c.note_atomic("b", [(Epoch(87), Some(Epoch(90))), (Epoch(87), None)]);
            // a's DR side trails one epoch.
            c.on_ack("a", Epoch(to), Epoch(to - 2));
            // The end of the new unit (93) is staged before an ack says it closed.
            c.on_ack("b", Epoch(to), if to == 94 { Epoch(93) } else { Epoch(87) });
            let committed = c.committed().0;
            assert!(
                !(88..=92).contains(&committed),
                "committed {committed} inside b's open unit from 87"
            );
        }
    }

    /// A host's catch-up ended (its unit's end seal staged on the DR side) and its agent
    /// was killed before an ack told the coordinator the span closed: restarted, it reports
    /// no span, and staged the unit's end. An epoch inside the unit must still not be
    /// committed (the DR side would apply part of the unit).
    #[test]
    fn an_open_span_a_restarted_host_no_longer_reports_still_holds_what_it_could_cover() {
        let mut c = CutCoordinator::new(hosts(), Epoch(87), 1000);
        c.start_cut(0);
        c.note_atomic("b", [(Epoch(87), None)]);
        c.on_ack("a", Epoch(88), Epoch(87));
        c.on_ack("b", Epoch(88), Epoch(87));
        for to in 89..=90 {
            c.start_cut(0);
            c.note_atomic("b", [(Epoch(87), None)]);
            c.on_ack("a", Epoch(to), Epoch(to - 1));
            c.on_ack("b", Epoch(to), Epoch(87));
        }
        assert_eq!(c.committed(), Epoch(87));
        // The cut to 91 is abandoned (b missed it; its release switched b, which sealed its
        // unit's end, 90); b is killed before its next ack.
        c.start_cut(0);
        c.on_ack("a", Epoch(91), Epoch(90));
        c.on_tick(1000);
        // Restarted, b reports no span and the staged end of its unit.
        c.start_cut(1000);
        c.note_atomic("b", []);
        c.on_ack("a", Epoch(92), Epoch(91));
        c.on_ack("b", Epoch(92), Epoch(90));
        let committed = c.committed().0;
        assert!(
            !(88..=89).contains(&committed),
            "committed {committed}, inside b's unit (87, 90)"
        );
    }

    #[test]
    fn a_hypermetro_group_is_cut_only_while_it_is_not_synchronous() {
        let mode = |live, epoch| PairMode {
            live,
            gated: false,
            trip_wanted: false,
            catching_up: false,
            epoch: Epoch(epoch),
        };
        let sync = mode(Live::Sync, 10);
        let journal = mode(Live::Journal, 12);
        assert_eq!(hypermetro_cut(&[Some(sync), Some(sync)], None), None);
        let tripped = PairMode {
            trip_wanted: true,
            ..mode(Live::Tracked, 10)
        };
        assert_eq!(
            hypermetro_cut(&[Some(sync), Some(tripped)], Some((Epoch(9), false))),
            Some(CutMode::Trip)
        );
        let catching_up = PairMode {
            catching_up: true,
            ..journal
        };
        assert_eq!(
            hypermetro_cut(&[Some(journal), Some(catching_up)], None),
            Some(CutMode::Keep)
        );
        assert_eq!(
            hypermetro_cut(&[Some(journal), Some(mode(Live::Tracked, 12))], None),
            Some(CutMode::Keep)
        );
        let gated = PairMode {
            gated: true,
            ..mode(Live::Sync, 12)
        };
        assert_eq!(
            hypermetro_cut(&[Some(journal), Some(gated)], None),
            Some(CutMode::Direct)
        );
        assert_eq!(
            hypermetro_cut(&[Some(journal), Some(journal)], Some((Epoch(12), false))),
            Some(CutMode::Keep)
        );
        assert_eq!(
            hypermetro_cut(&[Some(journal), Some(journal)], Some((Epoch(12), true))),
            None,
            "reports older than the direct cut"
        );
        let after = mode(Live::Sync, 14);
        assert_eq!(
            hypermetro_cut(&[Some(after), Some(after)], Some((Epoch(12), true))),
            None
        );
        assert_eq!(
            hypermetro_cut(&[Some(journal), None], None),
            Some(CutMode::Keep)
        );
    }

    #[test]
    fn a_live_mode_reads_back_from_its_name_in_a_report() {
        for live in [Live::Sync, Live::Journal, Live::Tracked] {
            assert_eq!(Live::from_report(live.as_str()), live);
        }
        assert_eq!(Live::from_report("something else"), Live::Tracked);
    }

    #[test]
    fn late_and_repeated_messages_change_nothing() {
        let mut c = CutCoordinator::new(hosts(), Epoch(3), 1000);
        assert!(c.on_ack("a", Epoch(2), Epoch(2)).is_empty());
        assert!(c.on_ack("nobody", Epoch(4), Epoch(9)).is_empty());
    }
}
