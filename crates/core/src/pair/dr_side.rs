//! The DR side of a pair as one machine: its units ([`DrUnits`]: what is staged, held for
//! the group's commit, applied), the gate of a hypermetro group's direct writes
//! ([`DirectGate`]), the barrier that answers a direct write only once a sync made it
//! durable ([`AckBarrier`]), the unit being applied, and the verifies that wait for the
//! unit of their epoch. No I/O: the applier (`crates/replication/src/applier/`) is its
//! shell, with the ring, the stage log's file and the volume; the group simulations drive
//! it with a volume and a stage log in memory.
//!
//! ```text
//!  direct write ─► must_set_aside? ─► set_aside (gate) | written ─► direct_written ─► (sync) ─► synced: answers
//!  staged write, seal, discard ─► the units (DrUnits)
//!  unit ready ─► begin_unit ─► unit_write_done × n ─► (shell syncs) ─► finish_unit: answers, verifies due
//!  Ungate ─► ungate ─► let_go: what was aside, in order
//!  verify ─► verify_arrived: now, or held until its epoch's unit is applied
//! ```
//!
//! `C` is a command the gate holds aside (the applier's `ApplyCmd`), `V` a verify held for
//! its unit.

use std::collections::VecDeque;

use crate::pair::dr::{DrState, DrUnits, SealArrival, SealRecord, StagedWrite};
use crate::replication::direct_gate::{DirectGate, Gating};
use crate::replication::durability::{AckBarrier, SyncTicket};
use crate::replication::{Epoch, WriteSeq};

/// The most verify requests held for later epochs at once (production keeps 8 probes out,
/// and retakes one unanswered for a minute).
pub const MAX_HELD_VERIFIES: usize = 64;

/// A unit being applied: its seal and how many of its writes are not yet on the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Applying {
    seal: SealRecord,
    left: usize,
}

/// A unit is on the volume, synced: what the shell does next, in this order.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub struct UnitApplied<V> {
    /// The unit: record the state (`DrSide::state`), then report it applied.
    pub seal: SealRecord,
    /// Direct writes the unit's sync made durable: answer them.
    pub answers: Vec<WriteSeq>,
    /// Verifies that waited for this unit: compare them now.
    pub verifies: Vec<V>,
}

#[derive(Debug)]
pub struct DrSide<C, V> {
    units: DrUnits,
    gate: DirectGate<C>,
    barrier: AckBarrier<WriteSeq>,
    applying: Option<Applying>,
    /// Verifies waiting for the unit of their epoch, in arrival order.
    held_verifies: Vec<(Epoch, V)>,
}

impl<C, V> DrSide<C, V> {
    /// The DR side of a volume that recorded `state`, whose stage log's last seal is
    /// `last_seal`: nothing aside, nothing waiting for a sync (a new stream sends again what
    /// was not answered).
    pub fn new(state: DrState, last_seal: Option<Epoch>) -> Self {
        Self {
            units: DrUnits::new(state, last_seal),
            gate: DirectGate::default(),
            barrier: AckBarrier::default(),
            applying: None,
            held_verifies: Vec::new(),
        }
    }

    pub fn state(&self) -> &DrState {
        self.units.state()
    }

    pub fn applied(&self) -> Epoch {
        self.units.applied()
    }

    // ---- staged writes and units ----

    /// A staged write of `epoch` arrived (see [`DrUnits::staged_write`]).
    pub fn staged_write(&mut self, epoch: Epoch, crc_ok: bool, room: bool) -> StagedWrite {
        self.units.staged_write(epoch, crc_ok, room)
    }

    /// A seal arrived or was found in the stage log (see [`DrUnits::seal_arrived`]).
    pub fn seal_arrived(&mut self, epoch: Epoch, append: bool) -> SealArrival {
        self.units.seal_arrived(epoch, append)
    }

    /// The seal of `epoch` is in the stage log, durably.
    pub fn appended(&mut self, epoch: Epoch) {
        self.units.appended(epoch);
    }

    /// The unit `seal` ends is staged: returns it if it applies now, else holds it for the
    /// group's commit (`allowed`).
    pub fn unit_ready(&mut self, seal: SealRecord, allowed: u64) -> Option<SealRecord> {
        self.units.unit_ready(seal, allowed)
    }

    /// A unit the group's commit (`allowed`) lets apply now, once nothing is being applied.
    pub fn committed_unit(&mut self, allowed: u64) -> Option<SealRecord> {
        if self.applying.is_some() {
            return None;
        }
        self.units.committed_held_seal(allowed)
    }

    /// The production side fell back to its bitmap: staged writes after the returned epoch
    /// are dropped from the stage log.
    pub fn discard(&mut self, after: Epoch) -> Epoch {
        self.units.discard(after)
    }

    /// The initial sync ended at `epoch`, every extent of it durable.
    pub fn sync_done(&mut self, epoch: Epoch) {
        self.units.sync_done(epoch);
    }

    /// The seals in the stage log whose units are not applied (held, or `replays` still to
    /// come), in epoch order: a rewritten log keeps them.
    pub fn seals_not_applied(
        &self,
        replays: impl IntoIterator<Item = SealRecord>,
    ) -> Vec<SealRecord> {
        self.units.seals_not_applied(replays)
    }

    /// The shell starts applying the unit `seal` ends, of `writes` staged writes.
    pub fn begin_unit(&mut self, seal: SealRecord, writes: usize) {
        assert!(self.applying.is_none(), "one unit at a time");
        self.applying = Some(Applying { seal, left: writes });
    }

    pub fn is_applying(&self) -> bool {
        self.applying.is_some()
    }

    /// Every write of the unit being applied is on the volume.
    pub fn unit_written(&self) -> bool {
        self.applying.is_some_and(|a| a.left == 0)
    }

    /// One of the unit's writes is on the volume. Returns whether every one is: the shell
    /// then syncs the volume and calls [`DrSide::finish_unit`].
    pub fn unit_write_done(&mut self) -> bool {
        let applying = self
            .applying
            .as_mut()
            .expect("a unit write belongs to a unit");
        applying.left -= 1;
        applying.left == 0
    }

    /// The unit's writes are on the volume and the volume is synced: the volume holds every
    /// write of epochs up to it and none later. `None` if no unit was being applied.
    pub fn finish_unit(&mut self) -> Option<UnitApplied<V>> {
        let Applying { seal, left } = self.applying.take()?;
        debug_assert_eq!(left, 0, "a unit finished with writes left");
        // The sync after the unit covers every direct write written before it.
        let answers = self.barrier.synced_outside();
        self.units.unit_applied(seal);
        let (due, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held_verifies)
            .into_iter()
            .partition(|(after, _)| *after <= seal.epoch);
        self.held_verifies = held;
        Some(UnitApplied {
            seal,
            answers,
            verifies: due.into_iter().map(|(_, v)| v).collect(),
        })
    }

    // ---- the gate of direct writes ----

    /// The epoch the gate compares with: none while a unit is half applied.
    fn gate_applied(&self) -> Option<Epoch> {
        self.applying.is_none().then(|| self.units.applied())
    }

    /// Whether a command of kind `gating` must wait aside now.
    pub fn must_set_aside(&self, gating: Gating) -> bool {
        self.gate.must_wait(gating, self.gate_applied())
    }

    pub fn set_aside(&mut self, gating: Gating, cmd: C) {
        self.gate.set_aside(gating, cmd);
    }

    /// The stream's `Ungate`: what is aside goes once `epoch` is applied.
    pub fn ungate(&mut self, epoch: Epoch) {
        self.gate.ungate(epoch);
    }

    /// What was aside and may go now, in order (gated no more).
    pub fn let_go(&mut self) -> VecDeque<C> {
        self.gate.let_go(self.gate_applied())
    }

    // ---- the barrier of direct writes ----

    /// A direct write to be answered is on the volume, not yet durable.
    pub fn direct_written(&mut self, seq: WriteSeq) {
        self.barrier.completed(seq);
    }

    /// A sync to start now, if answers wait for one and there is room for it.
    pub fn start_sync(&mut self) -> Option<SyncTicket> {
        self.barrier.wants_sync().then(|| self.barrier.start_sync())
    }

    /// The sync of `ticket` returned: the direct writes to answer.
    pub fn synced(&mut self, ticket: SyncTicket) -> Vec<WriteSeq> {
        self.barrier.synced(ticket)
    }

    /// The volume was synced outside the barrier (a flush, a FUA write's sync, the sync
    /// end): the direct writes to answer.
    pub fn synced_outside(&mut self) -> Vec<WriteSeq> {
        self.barrier.synced_outside()
    }

    // ---- verifies ----

    /// A verify to compare once epoch `after` is applied: returns it if it may be compared
    /// now, else holds it for [`DrSide::finish_unit`].
    /// Past [`MAX_HELD_VERIFIES`] held, the oldest is dropped: production retakes a probe
    /// unanswered for a minute, so the oldest is one it gave up on.
    pub fn verify_arrived(&mut self, after: Option<Epoch>, verify: V) -> Option<V> {
        match after {
            Some(epoch) if epoch > self.units.applied() => {
                if self.held_verifies.len() >= MAX_HELD_VERIFIES {
                    self.held_verifies.remove(0);
                }
                self.held_verifies.push((epoch, verify));
                None
            }
            _ => Some(verify),
        }
    }

    /// What must hold after every event.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.units.check_invariants()?;
        let applied = self.units.applied();
        if let Some(a) = self.applying
            && a.seal.epoch <= applied
        {
            return Err(format!(
                "applying the unit of {} though {applied} is applied",
                a.seal.epoch
            ));
        }
        if self.applying.is_none()
            && let Some((after, _)) = self.held_verifies.iter().find(|(e, _)| *e <= applied)
        {
            return Err(format!(
                "a verify after {after} is held though {applied} is applied"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Side = DrSide<&'static str, &'static str>;

    fn seal(epoch: u64) -> SealRecord {
        SealRecord {
            epoch: Epoch(epoch),
            cut_ms: epoch * 10,
        }
    }

    fn stage_and_seal(side: &mut Side, epoch: u64, allowed: u64) -> Option<SealRecord> {
        assert_eq!(
            side.staged_write(Epoch(epoch), true, true),
            StagedWrite::Stage
        );
        assert_eq!(side.seal_arrived(Epoch(epoch), true), SealArrival::Append);
        side.appended(Epoch(epoch));
        side.unit_ready(seal(epoch), allowed)
    }

    #[test]
    fn a_unit_applied_answers_the_direct_writes_before_it_and_its_verifies() {
        let mut side = Side::new(DrState::default(), None);
        side.direct_written(WriteSeq(1));
        assert_eq!(side.verify_arrived(Some(Epoch(2)), "probe"), None, "held");
        assert_eq!(side.verify_arrived(None, "now"), Some("now"));
        let ready = stage_and_seal(&mut side, 2, u64::MAX).unwrap();
        side.begin_unit(ready, 2);
        assert!(!side.unit_write_done());
        assert!(side.unit_write_done());
        side.check_invariants().unwrap();
        let done = side.finish_unit().unwrap();
        assert_eq!(
            done,
            UnitApplied {
                seal: seal(2),
                answers: vec![WriteSeq(1)],
                verifies: vec!["probe"],
            }
        );
        assert_eq!(side.applied(), Epoch(2));
        assert_eq!(side.finish_unit(), None);
        side.check_invariants().unwrap();
    }

    #[test]
    fn a_held_unit_applies_once_committed_and_not_while_another_applies() {
        let mut side = Side::new(DrState::default(), None);
        assert_eq!(stage_and_seal(&mut side, 3, 0), None);
        side.begin_unit(seal(1), 1);
        assert_eq!(side.committed_unit(3), None, "one unit at a time");
        assert!(side.unit_write_done());
        let _ = side.finish_unit().unwrap();
        assert_eq!(side.committed_unit(3), Some(seal(3)));
    }

    #[test]
    fn gated_writes_wait_while_a_unit_is_half_applied_and_go_in_order() {
        let mut side = Side::new(DrState::default(), None);
        assert!(side.must_set_aside(Gating::Gated));
        side.set_aside(Gating::Gated, "gated");
        assert!(side.must_set_aside(Gating::Direct), "behind what is aside");
        side.set_aside(Gating::Direct, "direct");
        side.ungate(Epoch(1));
        let ready = stage_and_seal(&mut side, 1, u64::MAX).unwrap();
        side.begin_unit(ready, 1);
        assert!(side.let_go().is_empty(), "the unit is half applied");
        assert!(side.unit_write_done());
        let _ = side.finish_unit().unwrap();
        side.check_invariants().unwrap();
        assert_eq!(side.let_go(), ["gated", "direct"]);
        assert!(!side.must_set_aside(Gating::Direct));
    }

    #[test]
    fn a_sync_answers_what_was_written_before_it_began() {
        let mut side = Side::new(DrState::default(), None);
        assert!(side.start_sync().is_none(), "nothing waits");
        side.direct_written(WriteSeq(1));
        let first = side.start_sync().unwrap();
        side.direct_written(WriteSeq(2));
        assert_eq!(side.synced(first), [WriteSeq(1)]);
        assert_eq!(side.synced_outside(), [WriteSeq(2)]);
    }

    /// Verifies held for a later epoch are bounded: past [`MAX_HELD_VERIFIES`] the oldest is
    /// dropped, not the stream (production retakes a probe unanswered for a minute, so a
    /// group commit that stalls while a verify runs holds its retakes here).
    #[test]
    fn past_max_held_verifies_the_oldest_held_is_dropped() {
        let mut side = Side::new(DrState::default(), None);
        let names: Vec<&'static str> = (0..=MAX_HELD_VERIFIES)
            .map(|i| &*Box::leak(format!("v{i}").into_boxed_str()))
            .collect();
        for name in &names {
            let _ = side.verify_arrived(Some(Epoch(2)), name);
        }
        side.check_invariants().unwrap();
        let ready = stage_and_seal(&mut side, 2, u64::MAX).unwrap();
        side.begin_unit(ready, 1);
        assert!(side.unit_write_done());
        let done = side.finish_unit().unwrap();
        assert_eq!(
            done.verifies,
            names[1..],
            "the oldest dropped, the rest compared"
        );
    }
}
