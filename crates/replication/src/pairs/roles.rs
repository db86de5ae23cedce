//! A consistency group's role changes on this agent (docs/GROUPS.md):
//!
//! - **promotion** at failover: the DR side rolls to the group's commit (applies the units
//!   up to it, drops the rest and marks their blocks dirty), begins the generation the
//!   coordinator issued, and becomes production with replication stopped;
//! - **fences**: a production side draining for a reverse, one demoted by a failover, and
//!   one that restarted and waits for the coordinator to confirm it;
//! - **the dirty blocks** reprotect hands from the old production side to the new one.
//!
//! Every command carries the coordinator's term; one from an older term than the side holds
//! is refused. Each is idempotent: the coordinator repeats a step it is not sure was taken.

use std::time::Duration;

use blockrep_core::ByteRange;

use super::*;
use crate::dr_state::{self, DrState};
use crate::membership::{Fence, Promotion};

/// Before anything changes: the point a failover rolls back to is kept from retention
/// (the units the roll to the commit applies trim it otherwise), and it is held.
fn check_point_held(
    dr: &DrPair,
    point: Option<Epoch>,
    handle: &VolumeHandle,
) -> Result<(), ApiError> {
    let Some(point) = point else {
        return Ok(());
    };
    dr.points().pin(point, Duration::from_secs(3600));
    let held = dr.points().list().map_err(|e| {
        ApiError::Internal(format!(
            "volume {}: read the undo journal: {e}",
            handle.name
        ))
    })?;
    if held.iter().any(|p| p.point.epoch == point) {
        return Ok(());
    }
    Err(ApiError::FailedPrecondition(format!(
        "volume {} does not hold point {point}: nothing was changed",
        handle.name
    )))
}

/// How long a promotion waits for the DR applier to finish what it was given.
const APPLIER_STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl Pairs {
    fn check_term(&self, membership: &Membership, term: u64) -> Result<(), ApiError> {
        if term < membership.term {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {}: a command of term {term} is older than this side's term {}",
                membership.pair, membership.term
            )));
        }
        Ok(())
    }

    /// Failover on the DR side: rolls the volume to the group's commit `commit` (or to its
    /// last sealed unit, with none), begins `generation`, and becomes production with
    /// replication stopped. Blocking.
    pub fn promote(
        &self,
        pair: PairId,
        commit: Option<Epoch>,
        point: Option<Epoch>,
        generation: GenerationId,
        term: u64,
        handle: VolumeHandle,
    ) -> Result<Promotion, ApiError> {
        let membership = Membership::load(&handle.dir)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .filter(|m| m.pair == pair)
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "volume {} is not in pair {pair}",
                    handle.name
                ))
            })?;
        let lineage =
            handle.volume.gate().lineage().ok_or_else(|| {
                ApiError::Internal(format!("volume {} has no lineage", handle.name))
            })?;
        if membership.side == Side::Production {
            // Done before (the coordinator asks again when it is not sure).
            return match membership.promotion {
                Some(p) if lineage.get().current.id == generation => Ok(p),
                _ => Err(ApiError::FailedPrecondition(format!(
                    "volume {} is already the production side of pair {pair}",
                    handle.name
                ))),
            };
        }
        self.check_term(&membership, term)?;
        let dr = match self.lock().get(&pair) {
            Some(Runtime::Dr(d)) => Arc::clone(d),
            _ => {
                return Err(ApiError::Internal(format!(
                    "pair {pair} has no DR runtime on this node"
                )));
            }
        };
        let state = dr_state::load(&handle.dir.join("dr.json"))
            .map_err(|e| ApiError::Internal(format!("read dr.json: {e}")))?;
        if !state.consistent {
            return Err(ApiError::FailedPrecondition(format!(
                "DR volume {} holds no consistent image yet (its first sync has not completed)",
                handle.name
            )));
        }
        dr.shut_down(APPLIER_STOP_TIMEOUT)
            .map_err(|e| ApiError::Internal(format!("stop the DR applier: {e}")))?;
        // A rollback a crash cut short is taken up where it was: the units up to the
        // commit were applied before it began.
        let resuming = handle.dir.join(super::ROLLBACK_FILE).exists();
        let rolled = match (resuming, point) {
            (true, None) => Err(ApiError::FailedPrecondition(format!(
                "volume {}: a rollback to a point is under way; only the failover to that point completes it",
                handle.name
            ))),
            (true, Some(point)) => {
                let state = dr_state::load(&handle.dir.join("dr.json"))
                    .map_err(|e| ApiError::Internal(format!("read dr.json: {e}")))?;
                let before = Promotion {
                    epoch: state.applied,
                    cut_ms: state.applied_cut_ms,
                    dropped_bytes: 0,
                    rolled_back_bytes: 0,
                };
                self.roll_back(&dr, before, point, &handle)
            }
            (false, _) => check_point_held(&dr, point, &handle)
                .and_then(|()| self.roll_to_commit(&dr, commit, &handle))
                .and_then(|p| match point {
                    Some(point) => self.roll_back(&dr, p, point, &handle),
                    None => Ok(p),
                }),
        };
        let promotion = match rolled {
            Ok(p) => p,
            Err(e) => {
                // Serve the pair again as it was: nothing was promoted.
                self.lock().remove(&pair);
                let _ = self.start(membership, handle, Start::FromRecord);
                return Err(e);
            }
        };
        self.lock().remove(&pair);
        dr.end_drills("the group failed over: the DR volume is production now");
        lineage
            .begin(generation)
            .map_err(|e| ApiError::Internal(format!("record the new generation: {e}")))?;
        let mut promoted = membership.clone();
        promoted.side = Side::Production;
        promoted.paused = true;
        promoted.grouped = true;
        promoted.group_epoch = promoted.group_epoch.max(promotion.epoch);
        promoted.full_sync_done = true;
        promoted.discard_peer = false;
        promoted.term = term;
        promoted.fence = None;
        promoted.promotion = Some(promotion);
        promoted
            .save(&handle.dir)
            .map_err(|e| ApiError::Internal(format!("record the pair: {e}")))?;
        for file in super::DR_FILES {
            remove_if_there(&handle.dir.join(file))
                .map_err(|e| ApiError::Internal(format!("remove {file}: {e}")))?;
        }
        handle.volume.gate().restore_role(promoted.role());
        tracing::info!(volume = %handle.name, %pair, epoch = %promotion.epoch, dropped = promotion.dropped_bytes,
            "promoted: the volume is production and takes writes");
        self.start(promoted, handle, Start::Promoted)?;
        Ok(promotion)
    }

    /// After the roll to the commit: back to the retained point `point`, from the undo
    /// journal (see `rollback`).
    fn roll_back(
        &self,
        dr: &DrPair,
        rolled: Promotion,
        point: Epoch,
        handle: &VolumeHandle,
    ) -> Result<Promotion, ApiError> {
        match super::rollback::roll_back(&handle.volume, &handle.dir, dr.points(), point) {
            Ok((reached, bytes)) => {
                tracing::info!(volume = %handle.name, %point, bytes, "rolled back to a retained point");
                Ok(Promotion {
                    epoch: reached.epoch,
                    cut_ms: reached.cut_ms,
                    dropped_bytes: rolled.dropped_bytes,
                    rolled_back_bytes: bytes,
                })
            }
            Err(super::rollback::RollbackError::NotHeld(why)) => Err(ApiError::FailedPrecondition(
                format!("volume {}: {why}", handle.name),
            )),
            Err(super::rollback::RollbackError::Io(why)) => Err(ApiError::Internal(format!(
                "volume {}: rolling back to point {point}: {why}",
                handle.name
            ))),
        }
    }

    /// Applies the staged units up to `commit`, drops the rest and marks their blocks dirty
    /// (the old production side may hold them: reprotect copies them back).
    fn roll_to_commit(
        &self,
        dr: &DrPair,
        commit: Option<Epoch>,
        handle: &VolumeHandle,
    ) -> Result<Promotion, ApiError> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            ApiError::Internal(format!("volume {}: {what}: {e}", handle.name))
        };
        if let Some(commit) = commit {
            dr.set_group_commit(Some(commit))
                .map_err(|e| internal("record the group's commit", &e))?;
        }
        let state = dr_state::load(&handle.dir.join("dr.json"))
            .map_err(|e| internal("read dr.json", &e))?;
        let log = handle.dir.join("stage-log");
        let (_, newest_seal) = crate::stage_log::writes_after(&log, state.applied)
            .map_err(|e| internal("read the stage log", &e))?;
        // What applies: up to the commit, and only as far as a seal was staged.
        let keep = match (dr.group_commit(), newest_seal) {
            (Some(c), Some(s)) => c.min(s.epoch),
            (None, Some(s)) => s.epoch,
            (_, None) => state.applied,
        }
        .max(state.applied);
        let (dropped, _) = crate::stage_log::writes_after(&log, keep)
            .map_err(|e| internal("read the stage log", &e))?;
        let tracker = handle.volume.tracker().ok_or_else(|| {
            ApiError::Internal(format!("volume {} has no dirty tracker", handle.name))
        })?;
        tracker
            .mark_durably(&dropped)
            .map_err(|e| internal("mark the dropped writes dirty", &e))?;
        dr.recover()
            .map_err(|e| internal("apply the committed units", &e))?;
        let state = dr_state::load(&handle.dir.join("dr.json"))
            .map_err(|e| internal("read dr.json", &e))?;
        Ok(Promotion {
            epoch: state.applied,
            cut_ms: state.applied_cut_ms,
            dropped_bytes: dropped.iter().map(|r| r.len).sum(),
            rolled_back_bytes: 0,
        })
    }

    fn production_of(&self, pair: PairId) -> Result<Arc<ProductionPair>, ApiError> {
        self.production(pair)
    }

    /// Fences the production side of `pair` (`Draining` for a reverse, `Demoted` after a
    /// failover), or takes the fence down (`None`: a reverse that did not happen).
    pub fn set_fence(&self, pair: PairId, fence: Option<Fence>, term: u64) -> Result<(), ApiError> {
        let production = self.production_of(pair)?;
        let membership = production.membership();
        self.check_term(&membership, term)?;
        if membership.fence == fence && membership.term >= term {
            return Ok(());
        }
        if membership.fence == Some(Fence::Demoted) && fence != Some(Fence::Demoted) {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {pair}: this side was demoted by a failover; only reprotect takes it back"
            )));
        }
        production
            .set_fence(fence, term)
            .map_err(|e| ApiError::Internal(format!("record the fence: {e}")))
    }

    /// The coordinator confirmed this agent is still the production side of `pair`.
    pub fn confirm(&self, pair: PairId) {
        if let Ok(p) = self.production(pair) {
            p.confirm();
        }
    }

    /// The dirty blocks of the volume in `pair`, whichever side it is (reprotect reads the
    /// old production side's).
    pub fn dirty_runs(
        &self,
        pair: PairId,
        handle: &VolumeHandle,
    ) -> Result<Vec<ByteRange>, ApiError> {
        let in_pair = Membership::load(&handle.dir)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .is_some_and(|m| m.pair == pair);
        if !in_pair {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is not in pair {pair}",
                handle.name
            )));
        }
        let tracker = handle.volume.tracker().ok_or_else(|| {
            ApiError::Internal(format!("volume {} has no dirty tracker", handle.name))
        })?;
        Ok(tracker.dirty_runs())
    }

    /// Marks `ranges` dirty on the production side of `pair` (durably): its next catch-up
    /// copies them.
    pub fn mark_dirty(&self, pair: PairId, ranges: &[ByteRange]) -> Result<(), ApiError> {
        let production = self.production_of(pair)?;
        production
            .link
            .tracker()
            .mark_durably(ranges)
            .map_err(|e| ApiError::Internal(format!("mark the blocks dirty: {e}")))
    }
}

/// The DR state of a volume that becomes the DR side holding the same data as production
/// (a reverse), or data that differs only where production's bitmap says (a reprotect): a
/// consistent image of production's generation, nothing applied from it yet.
pub(super) fn adopted_dr_state() -> DrState {
    DrState {
        applied: Epoch::ZERO,
        applied_cut_ms: 0,
        consistent: true,
        sync_done_at: None,
    }
}
