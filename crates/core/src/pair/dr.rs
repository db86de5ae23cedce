//! The DR side of a pair as a machine, as far as its units go: which staged writes and
//! seals it takes, which units wait for the group's commit, which apply, and what the
//! volume is a consistent image of (docs/PAIR-MACHINE.md, "The DR machine"). No I/O: the
//! applier (`crates/replication/src/applier/`) is its shell, with the ring, the stage log's
//! file and the volume; the simulations drive it with a stage log and a volume in memory.
//!
//! ```text
//!  staged write ─► staged_write ─► Stage | Drop (its unit is spoiled) | Refuse (CRC, no room: spoils)
//!  seal ─► seal_arrived ─► Append ─► (shell appends, syncs) ─► appended ─► unit_ready ─► apply | held
//!                        └ Staged (applied or sealed already: answer only) | Dropped (spoiled)
//!  group commit ─► committed_held_seal ─► one unit up to the commit
//!  discard ─► discard: the spoiled unit is gone; what was sealed stays
//!  unit on the volume, synced ─► unit_applied
//! ```

use serde::{Deserialize, Serialize};

use crate::replication::{Epoch, RejectReason};

/// What the DR side records about its volume: the last unit applied, and whether the volume
/// holds a consistent image at all (not before its first sync completes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrState {
    /// The last unit applied whole.
    pub applied: Epoch,
    /// When production cut that unit (ms since the Unix epoch).
    pub applied_cut_ms: u64,
    /// The volume is a consistent image of production at `applied`.
    pub consistent: bool,
    /// The initial sync ended at this epoch: the volume is consistent once a unit at or
    /// after it is applied (at once, for hypermetro).
    pub sync_done_at: Option<Epoch>,
}

/// A seal: every staged write of its epoch and earlier ones makes one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealRecord {
    pub epoch: Epoch,
    pub cut_ms: u64,
}

/// What becomes of a staged write.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StagedWrite {
    /// Append it to the stage log.
    Stage,
    /// Drop it unanswered: its unit was spoiled by an earlier refusal and can never apply;
    /// the production side catches up instead.
    Drop,
    /// Refuse it (tell the production side); its unit and every later one are spoiled until
    /// the production side's `Discard`.
    Refuse(RejectReason),
}

/// What becomes of a seal that arrived (or was found in the stage log at start).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealArrival {
    /// Its unit is applied or sealed already: answer `Staged`, nothing else.
    Staged,
    /// Its unit is spoiled: no answer, nothing staged (the production side catches up).
    Dropped,
    /// Append it to the stage log and sync it, then [`DrUnits::appended`].
    Append,
    /// Found in the stage log at start: durable already, go on to [`DrUnits::unit_ready`].
    Replay,
}

/// The DR side's units.
#[derive(Debug)]
pub struct DrUnits {
    state: DrState,
    /// The last seal appended to the stage log (its unit is durable and acknowledged): a
    /// `Discard` never drops what it covers.
    last_sealed: Epoch,
    /// A staged write of this epoch was refused: no unit covering it may apply. Staged
    /// writes and seals of it and later epochs are dropped until the production side's
    /// `Discard`, which comes once it has fallen back to its bitmap.
    spoiled_from: Option<Epoch>,
    /// Units sealed (and staged durably) whose epoch the group has not committed yet.
    held: Vec<SealRecord>,
}

impl DrUnits {
    /// The units of a DR side that recorded `state` and whose stage log's last seal is
    /// `last_seal` (its seals not applied are replayed).
    pub fn new(state: DrState, last_seal: Option<Epoch>) -> Self {
        let last_sealed = last_seal.unwrap_or(state.applied).max(state.applied);
        Self {
            state,
            last_sealed,
            spoiled_from: None,
            held: Vec::new(),
        }
    }

    pub fn state(&self) -> &DrState {
        &self.state
    }

    pub fn applied(&self) -> Epoch {
        self.state.applied
    }

    /// A staged write of `epoch` arrived: its CRC held (`crc_ok`), and the stage log has
    /// `room` for it.
    pub fn staged_write(&mut self, epoch: Epoch, crc_ok: bool, room: bool) -> StagedWrite {
        if self.spoiled_from.is_some_and(|from| epoch >= from) {
            return StagedWrite::Drop;
        }
        let refused = match (crc_ok, room) {
            (false, _) => RejectReason::Checksum,
            (true, false) => RejectReason::StageFull,
            (true, true) => return StagedWrite::Stage,
        };
        self.spoiled_from = Some(self.spoiled_from.map_or(epoch, |from| from.min(epoch)));
        StagedWrite::Refuse(refused)
    }

    /// A seal of `epoch` arrived on the stream (`append`), or was found in the stage log.
    pub fn seal_arrived(&mut self, epoch: Epoch, append: bool) -> SealArrival {
        if epoch <= self.state.applied {
            return SealArrival::Staged;
        }
        if !append {
            return SealArrival::Replay;
        }
        if self.spoiled_from.is_some_and(|from| epoch >= from) {
            // It would cover a refused write: never staged, never acknowledged.
            return SealArrival::Dropped;
        }
        if epoch <= self.last_sealed {
            // A later seal covers it already: its writes are staged. Appended again, it
            // would stand after that seal in the log, out of epoch order.
            return SealArrival::Staged;
        }
        SealArrival::Append
    }

    /// The seal of `epoch` is in the stage log, durably: its unit is staged.
    pub fn appended(&mut self, epoch: Epoch) {
        self.last_sealed = self.last_sealed.max(epoch);
    }

    /// The unit of `seal` is staged: returns it if it applies now, or holds it if the
    /// group has not committed its epoch (`allowed`: the group's commit, `u64::MAX` for a
    /// pair of no group; rule 3). A unit that applies takes every staged write up to its
    /// seal: the seals held before it (the commit moved meanwhile) go with it.
    pub fn unit_ready(&mut self, seal: SealRecord, allowed: u64) -> Option<SealRecord> {
        if seal.epoch.0 > allowed {
            self.held.push(seal);
            return None;
        }
        self.held.retain(|s| s.epoch > seal.epoch);
        Some(seal)
    }

    /// What the group's commit (`allowed`) lets apply now, as one unit: every staged write
    /// up to the committed epoch, once a seal at or past it is staged (a seal covers every
    /// write of its epoch and earlier). The pair's own seals need not fall on the group's
    /// commit: a seal delayed past a cut by a write still in flight covers two of the
    /// group's epochs, and applying only up to the seal before the commit would leave this
    /// volume an epoch behind the group's others.
    pub fn committed_held_seal(&mut self, allowed: u64) -> Option<SealRecord> {
        let newest = self.held.iter().map(|s| s.epoch).max()?;
        let target = Epoch(allowed.min(newest.0));
        if target <= self.state.applied {
            return None;
        }
        // The cut time of the target if a seal falls on it; else the last one known before
        // it (the consistent point is then reported as of no later than it is).
        let cut_ms = self
            .held
            .iter()
            .filter(|s| s.epoch <= target)
            .max_by_key(|s| s.epoch)
            .map_or(self.state.applied_cut_ms, |s| s.cut_ms);
        self.held.retain(|s| s.epoch > target);
        Some(SealRecord {
            epoch: target,
            cut_ms,
        })
    }

    /// The production side fell back to its bitmap after a refusal: staged writes after
    /// the returned epoch are dropped from the stage log (never what was sealed: it is
    /// durable and acknowledged), and staged writes are taken again.
    pub fn discard(&mut self, after: Epoch) -> Epoch {
        self.spoiled_from = None;
        after.max(self.last_sealed)
    }

    /// The unit of `seal` is on the volume, synced: the volume holds every write of epochs
    /// up to it and none later.
    pub fn unit_applied(&mut self, seal: SealRecord) {
        self.state.applied = seal.epoch;
        self.state.applied_cut_ms = seal.cut_ms;
        if self.state.sync_done_at.is_some_and(|at| at <= seal.epoch) {
            self.state.consistent = true;
        }
    }

    /// The initial sync ended at `epoch`, every extent of it durable.
    pub fn sync_done(&mut self, epoch: Epoch) {
        self.state.sync_done_at = Some(epoch);
        if epoch <= self.state.applied {
            self.state.consistent = true;
        }
    }

    /// The seals in the stage log whose units are not applied: held for their group's
    /// commit, or still to be replayed (`replays`). In epoch order: a rewritten log keeps
    /// them.
    pub fn seals_not_applied(
        &self,
        replays: impl IntoIterator<Item = SealRecord>,
    ) -> Vec<SealRecord> {
        let mut seals: Vec<_> = self.held.iter().copied().chain(replays).collect();
        seals.sort_by_key(|s| s.epoch);
        seals
    }

    /// What must hold after every event.
    pub fn check_invariants(&self) -> Result<(), String> {
        let applied = self.state.applied;
        if self.last_sealed < applied {
            return Err(format!(
                "applied {applied} is past the last seal {}",
                self.last_sealed
            ));
        }
        if let Some(s) = self.held.iter().find(|s| s.epoch <= applied) {
            return Err(format!(
                "the seal of {} is held though {applied} is applied",
                s.epoch
            ));
        }
        if let Some(s) = self.held.iter().find(|s| s.epoch > self.last_sealed) {
            return Err(format!(
                "the seal of {} is held but was never appended (last seal {})",
                s.epoch, self.last_sealed
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(epoch: u64) -> SealRecord {
        SealRecord {
            epoch: Epoch(epoch),
            cut_ms: epoch * 100,
        }
    }

    /// Appends the seal of `epoch` as the applier does; returns what to apply now.
    fn arrive(units: &mut DrUnits, epoch: u64, allowed: u64) -> Option<SealRecord> {
        assert_eq!(units.seal_arrived(Epoch(epoch), true), SealArrival::Append);
        units.appended(Epoch(epoch));
        let ready = units.unit_ready(seal(epoch), allowed);
        units.check_invariants().unwrap();
        ready
    }

    #[test]
    fn a_refused_staged_write_spoils_its_unit_and_later_ones_until_the_discard() {
        let mut units = DrUnits::new(DrState::default(), None);
        assert_eq!(units.staged_write(Epoch(3), true, true), StagedWrite::Stage);
        assert_eq!(
            units.staged_write(Epoch(4), true, false),
            StagedWrite::Refuse(RejectReason::StageFull)
        );
        assert_eq!(units.staged_write(Epoch(5), true, true), StagedWrite::Drop);
        assert_eq!(units.seal_arrived(Epoch(5), true), SealArrival::Dropped);
        // An earlier epoch's seal still goes: its writes were all staged.
        assert_eq!(arrive(&mut units, 3, u64::MAX), Some(seal(3)));
        assert_eq!(units.discard(Epoch(2)), Epoch(3), "what was sealed stays");
        assert_eq!(units.staged_write(Epoch(5), true, true), StagedWrite::Stage);
    }

    #[test]
    fn a_seal_already_covered_is_answered_and_not_appended_again() {
        let mut units = DrUnits::new(DrState::default(), None);
        let _ = arrive(&mut units, 4, 0);
        assert_eq!(units.seal_arrived(Epoch(3), true), SealArrival::Staged);
        units.unit_applied(seal(4));
        assert_eq!(units.seal_arrived(Epoch(4), false), SealArrival::Staged);
    }

    #[test]
    fn held_units_apply_as_one_up_to_the_groups_commit() {
        let mut units = DrUnits::new(DrState::default(), None);
        assert_eq!(arrive(&mut units, 2, 0), None);
        assert_eq!(arrive(&mut units, 4, 0), None);
        assert_eq!(arrive(&mut units, 6, 0), None);
        assert_eq!(units.committed_held_seal(0), None, "nothing committed yet");
        // A commit of 5 falls between seals: everything staged up to 5 applies, as of the
        // last cut time known before it.
        assert_eq!(
            units.committed_held_seal(5),
            Some(SealRecord {
                epoch: Epoch(5),
                cut_ms: 400
            })
        );
        units.unit_applied(SealRecord {
            epoch: Epoch(5),
            cut_ms: 400,
        });
        assert_eq!(units.seals_not_applied([]), vec![seal(6)]);
        units.check_invariants().unwrap();
    }

    #[test]
    fn the_volume_is_consistent_once_a_unit_at_or_after_the_syncs_end_applies() {
        let mut units = DrUnits::new(DrState::default(), None);
        units.sync_done(Epoch(3));
        assert!(!units.state().consistent);
        let ready = arrive(&mut units, 3, u64::MAX).unwrap();
        units.unit_applied(ready);
        assert!(units.state().consistent);
    }

    /// The group's commit moved between the applier's look at its held seals and a later
    /// seal's arrival (it is read from another thread): the later unit, applied up to its
    /// seal, covers the held ones, which are not left held behind it.
    #[test]
    fn a_unit_ready_at_once_takes_the_held_seals_it_covers_with_it() {
        let mut units = DrUnits::new(DrState::default(), None);
        assert_eq!(
            arrive(&mut units, 4, 3),
            None,
            "held: the group committed 3"
        );
        assert_eq!(arrive(&mut units, 6, 6), Some(seal(6)));
        units.unit_applied(seal(6));
        units.check_invariants().unwrap();
        assert_eq!(units.seals_not_applied([]), vec![]);
    }
}
