//! The DR side's undo journal in the simulation (docs/POINT-IN-TIME.md), as the applier
//! keeps it: before a unit applies, the core decides (`unit_undo`) whether its old contents
//! are kept, already kept (a replay after a power cut in the middle of the unit) or the
//! journal starts again; kept undo is durable at once (the applier syncs it before the
//! unit's first write). The core's `UndoIndex` says, for every point held, which blocks come
//! from which undo record and which from the volume.
//!
//! The check: after every DR power cut and every unit applied, every point held (whose
//! unit is applied) reads back, through the index, as the image the volume had right after
//! that unit applied. Retention trims the oldest points now and then.
//!
//! A drill of the DR volume comes and goes: its view is the core's `Coverage`, built from
//! the index at its first read and extended with each unit's undo before the unit applies
//! (as `Points::extend_views` does); its writes go to an overlay, of which a power cut keeps
//! what a flush made durable, and its view is built again after it. Checked after its
//! writes, after units and after power cuts: the drill reads its own writes where it wrote,
//! and elsewhere the image of its point, whatever units applied since.

use std::collections::BTreeMap;

use blockrep_core::ByteRange;
use blockrep_core::pair::dr::DrState;
use blockrep_core::replication::Epoch;
use blockrep_core::replication::undo::{
    Coverage, Piece, RecordAt, UndoIndex, UndoRange, UnitUndo, unit_undo,
};
use rand::Rng;
use rand::rngs::SmallRng;

use super::super::shell::BLOCK;

/// One unit's undo: its epoch and the old value of each block it changed.
struct Step {
    epoch: Epoch,
    old: Vec<(u64, u64)>,
}

/// A drill of the DR volume at `point`.
struct Drill {
    point: Epoch,
    /// Built at the first read; extended before each unit applies.
    view: Option<Coverage>,
    /// Block → the value the drill wrote there.
    overlay: BTreeMap<u64, u64>,
    /// What the last flush made durable of it.
    durable: BTreeMap<u64, u64>,
    next_value: u64,
}

#[derive(Default)]
pub(super) struct Undo {
    drill: Option<Drill>,
    /// Blocks a drill read and checked.
    pub(super) drill_reads: u64,
    /// Broken: a unit's undo does not join the drill's view.
    pub(super) drill_views_not_extended: bool,
    /// The oldest point, and the steps after it; `None`: no points held.
    base: Option<Epoch>,
    steps: Vec<Step>,
    /// The image the volume had right after each point's unit applied (the checker's).
    images: BTreeMap<Epoch, Vec<u64>>,
    /// How many units had their undo kept, and how many replays found it kept already.
    pub(super) kept: u64,
    pub(super) replayed: u64,
    /// The unit being applied is a replay whose undo was kept before the power cut: its
    /// end is checked.
    replaying: bool,
}

/// Retention in the simulation: at most this many points are held (the oldest go).
const MAX_POINTS: usize = 12;

impl Undo {
    /// The core's index over the steps: each record at (step, block's place in it).
    fn index(&self) -> Option<UndoIndex> {
        let mut index = UndoIndex::new(self.base?);
        for step in &self.steps {
            let ranges: Vec<UndoRange> = step
                .old
                .iter()
                .enumerate()
                .map(|(i, (b, _))| record(step.epoch, i, *b))
                .collect();
            index
                .push_unit(step.epoch, &ranges)
                .expect("the steps are in epoch order and a unit's blocks distinct");
        }
        Some(index)
    }

    fn newest(&self) -> Option<Epoch> {
        self.base.map(|b| self.steps.last().map_or(b, |s| s.epoch))
    }

    fn clear(&mut self) {
        self.base = None;
        self.steps.clear();
        self.images.clear();
        // Its view can no longer be read: the drill is lost.
        self.drill = None;
    }

    /// Before unit `epoch` (of `blocks`) applies on a volume at `state` holding `image`.
    /// `again`: the broken applier that takes a replayed unit's undo again.
    pub(super) fn before_unit(
        &mut self,
        epoch: Epoch,
        state: &DrState,
        blocks: &[u64],
        image: &[u64],
        again: bool,
    ) {
        match unit_undo(self.newest(), state.applied, state.consistent, epoch) {
            UnitUndo::Keep => {
                self.kept += 1;
                let mut blocks = blocks.to_vec();
                blocks.sort_unstable();
                blocks.dedup();
                // The unit's undo joins the drill's view before the unit applies.
                if let Some(view) = self
                    .drill
                    .as_mut()
                    .and_then(|d| d.view.as_mut())
                    .filter(|_| !self.drill_views_not_extended)
                {
                    for (i, b) in blocks.iter().enumerate() {
                        view.add_gaps(record(epoch, i, *b));
                    }
                }
                self.steps.push(Step {
                    epoch,
                    old: blocks.iter().map(|&b| (b, image[b as usize])).collect(),
                });
            }
            UnitUndo::Kept => {
                self.replayed += 1;
                self.replaying = true;
                if again && let Some(step) = self.steps.iter_mut().find(|s| s.epoch >= epoch) {
                    // Broken: the undo is read again from the half-applied volume.
                    for (b, old) in &mut step.old {
                        *old = image[*b as usize];
                    }
                }
            }
            UnitUndo::NotKept => {}
            UnitUndo::Restart => self.clear(),
        }
    }

    /// A unit applied and synced: the volume at `state` is `image`. Retention keeps the
    /// newest [`MAX_POINTS`]. Returns whether the unit was a replay whose undo was kept
    /// before a power cut (its end is worth a check).
    pub(super) fn after_unit(&mut self, state: &DrState, image: &[u64]) -> bool {
        if self.base.is_none() && state.consistent {
            self.base = Some(state.applied);
            self.steps.clear();
        }
        if self.newest() == Some(state.applied) {
            self.images.insert(state.applied, image.to_vec());
        }
        if self.images.len() > MAX_POINTS {
            self.trim(self.images.len() - MAX_POINTS);
        }
        std::mem::take(&mut self.replaying)
    }

    /// A direct write lands: the journal is emptied first.
    pub(super) fn direct_write(&mut self) {
        self.clear();
    }

    /// Retention: drops every step up to `nth` point held (whose image is known).
    pub(super) fn trim(&mut self, nth: usize) {
        let Some(&point) = self.images.keys().nth(nth) else {
            return;
        };
        // A drill keeps its point.
        let point = self.drill.as_ref().map_or(point, |d| d.point.min(point));
        self.steps.retain(|s| s.epoch > point);
        self.base = Some(point);
        self.images.retain(|e, _| *e >= point);
    }

    pub(super) fn points(&self) -> usize {
        self.images.len()
    }

    /// Every point held whose image is known reads back as that image, through the index
    /// (undo records, else the volume `image` as it is now).
    pub(super) fn check(&self, image: &[u64]) -> Result<(), String> {
        let Some(index) = self.index() else {
            return Ok(());
        };
        for (point, expected) in &self.images {
            let view = index
                .view(*point)
                .map_err(|e| format!("point {point} is not in the index: {e}"))?;
            for (b, got, from_undo) in self.read(&view, image) {
                if got != expected[b as usize] {
                    return Err(format!(
                        "the image at point {point} reads {got} at block {b}, not {} (from {})",
                        expected[b as usize],
                        if from_undo {
                            "an undo record"
                        } else {
                            "the volume"
                        }
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every block of the volume read through `view`: (block, value, from an undo record);
    /// elsewhere the volume `image` as it is now.
    fn read(&self, view: &Coverage, image: &[u64]) -> Vec<(u64, u64, bool)> {
        let size = image.len() as u64 * BLOCK;
        let mut blocks = Vec::with_capacity(image.len());
        for piece in view.pieces(ByteRange::new(0, size)) {
            let (range, from) = match piece {
                Piece::Undo { range, at } => (range, Some(at)),
                Piece::Volume { range } => (range, None),
            };
            for i in 0..range.len / BLOCK {
                let b = range.offset / BLOCK + i;
                let value = match from {
                    Some(at) => self.record_value(at, i),
                    None => image[b as usize],
                };
                blocks.push((b, value, from.is_some()));
            }
        }
        blocks
    }

    /// The old value an undo record holds, `i` blocks into it.
    fn record_value(&self, at: RecordAt, i: u64) -> u64 {
        let step = self
            .steps
            .iter()
            .find(|s| s.epoch.0 == at.segment)
            .expect("a record of a step held");
        step.old[(at.offset / BLOCK + i) as usize].1
    }

    /// A drill's turn: made at a point held, written to, flushed, read and checked, or
    /// deleted.
    pub(super) fn drill_step(&mut self, rng: &mut SmallRng, image: &[u64]) -> Result<(), String> {
        let Some(drill) = self.drill.as_mut() else {
            if !self.images.is_empty() {
                let points: Vec<Epoch> = self.images.keys().copied().collect();
                self.drill = Some(Drill {
                    point: points[rng.random_range(0..points.len())],
                    view: None,
                    overlay: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    next_value: 1 << 40,
                });
            }
            return Ok(());
        };
        match rng.random_range(0..10) {
            0..=3 => {
                let b = rng.random_range(0..image.len() as u64);
                drill.next_value += 1;
                drill.overlay.insert(b, drill.next_value);
            }
            4 => drill.durable = drill.overlay.clone(),
            5 => self.drill = None,
            _ => {}
        }
        self.check_drill(image)
    }

    /// The DR host lost power: the drill keeps the writes a flush made durable, and builds
    /// its view again at its next read.
    pub(super) fn drill_power_cut(&mut self) {
        if let Some(drill) = self.drill.as_mut() {
            drill.overlay = drill.durable.clone();
            drill.view = None;
        }
    }

    /// The drill reads its writes where it wrote, and elsewhere its point's image: through
    /// its view, undo records or the volume `image` as it is now.
    pub(super) fn check_drill(&mut self, image: &[u64]) -> Result<(), String> {
        let Some(index) = self.index() else {
            return Ok(());
        };
        let Some(drill) = self.drill.as_mut() else {
            return Ok(());
        };
        if drill.view.is_none() {
            drill.view = Some(
                index
                    .view(drill.point)
                    .map_err(|e| format!("a drill's point {} is gone: {e}", drill.point))?,
            );
        }
        let (point, view) = (drill.point, drill.view.clone().expect("built"));
        let overlay = drill.overlay.clone();
        let expected = self
            .images
            .get(&point)
            .ok_or_else(|| format!("a drill's point {point} has no image"))?;
        for (b, below, _) in self.read(&view, image) {
            let (got, want) = match overlay.get(&b) {
                Some(v) => (*v, *v),
                None => (below, expected[b as usize]),
            };
            if got != want {
                return Err(format!(
                    "a drill at point {point} reads {got} at block {b}, not {want}"
                ));
            }
        }
        self.drill_reads += image.len() as u64;
        Ok(())
    }
}

/// Unit `epoch`'s undo record of block `b`, the `i`th of the unit.
fn record(epoch: Epoch, i: usize, b: u64) -> UndoRange {
    UndoRange {
        range: ByteRange::new(b * BLOCK, BLOCK),
        at: RecordAt {
            segment: epoch.0,
            offset: i as u64 * BLOCK,
        },
    }
}
