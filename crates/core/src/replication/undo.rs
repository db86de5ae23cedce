//! The DR side's points in time, as an index over its undo journal (no I/O): which bytes of
//! the image at a retained point come from which undo record, and which from the volume as
//! it is now. The design and its argument are in docs/POINT-IN-TIME.md.
//!
//! Before unit `E` applies, the DR side keeps the old contents of every range `E` writes
//! (each byte once per unit): an undo record of `E` holds the image at `E − 1` for its
//! range. The image at a point `P` is then, for each byte, the undo record of the first unit
//! after `P` that changed it, or the volume now if none did ([`UndoIndex::view`]). A drill
//! keeps its view current while units go on applying by adding each new unit's ranges where
//! its view has none ([`Coverage::add_gaps`]): those bytes had not changed since `P` until
//! that unit.
//!
//! Retention drops the oldest steps ([`UndoIndex::trim_through`]); keeping one point an hour
//! merges the steps between two kept points into one, the first record of each byte
//! winning ([`UndoIndex::merge`]).

use std::collections::BTreeMap;

use crate::extent::ByteRange;
use crate::replication::Epoch;

/// Where an undo record's bytes are in the journal: opaque to the index, but a position of
/// the byte at the start of its range, so that a part of a record is found by adding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordAt {
    pub segment: u64,
    pub offset: u64,
}

impl RecordAt {
    /// Where a record of zeroes is: it has no bytes in the journal (its range is all zero).
    pub const ZEROES: Self = Self {
        segment: u64::MAX,
        offset: 0,
    };

    pub fn is_zeroes(self) -> bool {
        self.segment == u64::MAX
    }

    fn plus(self, by: u64) -> Self {
        if self.is_zeroes() {
            return self;
        }
        Self {
            segment: self.segment,
            offset: self.offset + by,
        }
    }
}

/// One range of a unit's undo: the volume's contents there before the unit applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoRange {
    pub range: ByteRange,
    pub at: RecordAt,
}

/// Where a piece of an image is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// From an undo record, at `at`.
    Undo { range: ByteRange, at: RecordAt },
    /// From the volume as it is now.
    Volume { range: ByteRange },
}

/// Ranges that do not overlap, each with where its bytes are: the first range given for a
/// byte keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// start → (end, where the byte at start is).
    map: BTreeMap<u64, (u64, RecordAt)>,
}

impl Coverage {
    /// Adds the parts of `undo` that no range covers yet.
    pub fn add_gaps(&mut self, undo: UndoRange) {
        let (start, end) = (undo.range.offset, undo.range.end());
        let mut at = start;
        // Ranges that may overlap [start, end): the one starting before it, and those in it.
        let before = self
            .map
            .range(..start)
            .next_back()
            .map(|(s, (e, _))| (*s, *e));
        let mut covered: Vec<(u64, u64)> = before.filter(|(_, e)| *e > start).into_iter().collect();
        covered.extend(self.map.range(start..end).map(|(s, (e, _))| (*s, *e)));
        let mut gaps = Vec::new();
        for (s, e) in covered {
            if s > at {
                gaps.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            gaps.push((at, end));
        }
        for (s, e) in gaps {
            self.map.insert(s, (e, undo.at.plus(s - start)));
        }
    }

    /// The pieces of `range` in order: where covered, the undo record's bytes; elsewhere
    /// the volume's.
    pub fn pieces(&self, range: ByteRange) -> Vec<Piece> {
        let (start, end) = (range.offset, range.end());
        let mut pieces = Vec::new();
        let mut at = start;
        let before = self
            .map
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v));
        let inside = self.map.range(start..end).map(|(s, v)| (*s, *v));
        for (s, (e, record)) in before.into_iter().chain(inside) {
            let from = s.max(start);
            if from > at {
                pieces.push(Piece::Volume {
                    range: ByteRange::new(at, from - at),
                });
            }
            let to = e.min(end);
            pieces.push(Piece::Undo {
                range: ByteRange::new(from, to - from),
                at: record.plus(from - s),
            });
            at = to;
        }
        if at < end {
            pieces.push(Piece::Volume {
                range: ByteRange::new(at, end - at),
            });
        }
        pieces
    }

    /// Whether any covered range overlaps `range`.
    pub fn overlaps(&self, range: ByteRange) -> bool {
        let before = self
            .map
            .range(..range.offset)
            .next_back()
            .is_some_and(|(_, (e, _))| *e > range.offset);
        before || self.map.range(range.offset..range.end()).next().is_some()
    }

    /// The bytes covered.
    pub fn bytes(&self) -> u64 {
        self.map.iter().map(|(s, (e, _))| e - s).sum()
    }

    /// The covered ranges with where their bytes are, in order.
    pub fn ranges(&self) -> impl Iterator<Item = UndoRange> + '_ {
        self.map.iter().map(|(s, (e, at))| UndoRange {
            range: ByteRange::new(*s, e - s),
            at: *at,
        })
    }
}

/// One step back: the undo of one unit, or of several merged (`first..=last`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Step {
    first: Epoch,
    last: Epoch,
    undo: Coverage,
}

/// Where the steps changed each block, around a point (see [`UndoIndex::changes_around`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockChanges {
    /// Block → the end of the last step at or before the point that changed it.
    pub last_until: std::collections::HashMap<u64, Epoch>,
    /// Block → the start of the first step after the point that changed it.
    pub first_after: std::collections::HashMap<u64, Epoch>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UndoError {
    #[error("{epoch} is not after the last unit kept ({last})")]
    OutOfOrder { epoch: Epoch, last: Epoch },
    #[error("a unit's undo ranges overlap at {range}: each byte is kept once per unit")]
    Overlap { range: ByteRange },
    #[error("{0} is not a retained point")]
    NotAPoint(Epoch),
}

/// The undo steps a volume keeps, oldest first, and so its retained points: the oldest
/// (the image before the first step), and the end of every step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoIndex {
    oldest: Epoch,
    steps: Vec<Step>,
}

impl UndoIndex {
    /// A volume whose image is at `applied`, with no undo kept: its one point.
    pub fn new(applied: Epoch) -> Self {
        Self {
            oldest: applied,
            steps: Vec::new(),
        }
    }

    /// The newest point: the image the volume holds now.
    pub fn newest(&self) -> Epoch {
        self.steps.last().map_or(self.oldest, |s| s.last)
    }

    /// The retained points, oldest first.
    pub fn points(&self) -> Vec<Epoch> {
        std::iter::once(self.oldest)
            .chain(self.steps.iter().map(|s| s.last))
            .collect()
    }

    pub fn holds(&self, point: Epoch) -> bool {
        point == self.oldest || self.steps.iter().any(|s| s.last == point)
    }

    /// The bytes of undo kept behind `point`: what the image at it takes beside the volume.
    pub fn bytes_behind(&self, point: Epoch) -> u64 {
        self.steps
            .iter()
            .filter(|s| s.first > point)
            .map(|s| s.undo.bytes())
            .sum()
    }

    /// Whether no step that changed part of `range` lies between points `a` and `b` (either
    /// order): the image there is the same at both. A merged step that changed it counts
    /// whole, wherever in it the change came. Before the oldest point nothing is known: a
    /// bound older than it is taken as the oldest. (The rule record by record, against
    /// which the tests check [`UndoIndex::changes_around`]'s one pass.)
    #[cfg(test)]
    pub(crate) fn unchanged(&self, range: ByteRange, a: Epoch, b: Epoch) -> bool {
        let (lo, hi) = (a.min(b).max(self.oldest), a.max(b).max(self.oldest));
        !self
            .steps
            .iter()
            .any(|s| s.first <= hi && s.last > lo && s.undo.overlaps(range))
    }

    /// For each `block`-byte block some step changed, of those `wanted`: the end of the
    /// last step that changed it at or before `point`, and the start of the first that
    /// changed it after. A step across `point` (none, when `point` is a point) counts as
    /// both.
    pub fn changes_around(
        &self,
        point: Epoch,
        block: u64,
        wanted: impl Fn(u64) -> bool,
    ) -> BlockChanges {
        let mut changes = BlockChanges::default();
        for step in &self.steps {
            for r in step.undo.ranges() {
                if r.range.len == 0 {
                    continue;
                }
                for b in r.range.offset / block..r.range.end().div_ceil(block) {
                    if !wanted(b) {
                        continue;
                    }
                    if step.first <= point {
                        let last = changes.last_until.entry(b).or_insert(step.last);
                        *last = (*last).max(step.last);
                    }
                    if step.last > point {
                        let first = changes.first_after.entry(b).or_insert(step.first);
                        *first = (*first).min(step.first);
                    }
                }
            }
        }
        changes
    }

    /// The oldest point.
    pub fn oldest(&self) -> Epoch {
        self.oldest
    }

    /// Keeps unit `epoch`'s undo (its ranges must not overlap): `epoch` becomes the newest
    /// point. Nothing changes if it is refused.
    pub fn push_unit(&mut self, epoch: Epoch, ranges: &[UndoRange]) -> Result<(), UndoError> {
        let last = self.newest();
        if epoch <= last {
            return Err(UndoError::OutOfOrder { epoch, last });
        }
        let mut undo = Coverage::default();
        for r in ranges {
            let before = undo.bytes();
            undo.add_gaps(*r);
            if undo.bytes() - before != r.range.len {
                return Err(UndoError::Overlap { range: r.range });
            }
        }
        self.steps.push(Step {
            first: last.next(),
            last: epoch,
            undo,
        });
        Ok(())
    }

    /// The image at `point`: for each byte, the record of the first step after it that
    /// changed it; the volume where none did.
    pub fn view(&self, point: Epoch) -> Result<Coverage, UndoError> {
        if !self.holds(point) {
            return Err(UndoError::NotAPoint(point));
        }
        let mut view = Coverage::default();
        for step in self.steps.iter().filter(|s| s.first > point) {
            for r in step.undo.ranges() {
                view.add_gaps(r);
            }
        }
        Ok(view)
    }

    /// Drops every step up to `point`, which becomes the oldest point (retention).
    pub fn trim_through(&mut self, point: Epoch) -> Result<(), UndoError> {
        if !self.holds(point) {
            return Err(UndoError::NotAPoint(point));
        }
        self.steps.retain(|s| s.last > point);
        self.oldest = self.oldest.max(point);
        Ok(())
    }

    /// Merges the steps between points `from` and `to` into one: the points between them
    /// are gone, and each byte keeps its first record after `from` (the image at `from`).
    pub fn merge(&mut self, from: Epoch, to: Epoch) -> Result<(), UndoError> {
        let undo = self.merged(from, to)?;
        self.replace_between(from, to, undo);
        Ok(())
    }

    /// What a merge of the steps between points `from` and `to` keeps: for each byte, its
    /// first record after `from`.
    pub fn merged(&self, from: Epoch, to: Epoch) -> Result<Coverage, UndoError> {
        self.check_points(from, to)?;
        let mut undo = Coverage::default();
        for step in self.steps.iter().filter(|s| s.first > from && s.last <= to) {
            for r in step.undo.ranges() {
                undo.add_gaps(r);
            }
        }
        Ok(undo)
    }

    /// Merges the steps between points `from` and `to` into one whose records are `undo`
    /// (what [`UndoIndex::merged`] gave, written out again elsewhere).
    pub fn merge_into(
        &mut self,
        from: Epoch,
        to: Epoch,
        undo: &[UndoRange],
    ) -> Result<(), UndoError> {
        self.check_points(from, to)?;
        let mut coverage = Coverage::default();
        for r in undo {
            let before = coverage.bytes();
            coverage.add_gaps(*r);
            if coverage.bytes() - before != r.range.len {
                return Err(UndoError::Overlap { range: r.range });
            }
        }
        self.replace_between(from, to, coverage);
        Ok(())
    }

    /// Both `from` and `to` are retained points.
    fn check_points(&self, from: Epoch, to: Epoch) -> Result<(), UndoError> {
        match [from, to].into_iter().find(|p| !self.holds(*p)) {
            Some(p) => Err(UndoError::NotAPoint(p)),
            None => Ok(()),
        }
    }

    fn replace_between(&mut self, from: Epoch, to: Epoch, undo: Coverage) {
        if to <= from {
            return;
        }
        self.steps.retain(|s| !(s.first > from && s.last <= to));
        self.steps.push(Step {
            first: from.next(),
            last: to,
            undo,
        });
        self.steps.sort_by_key(|s| s.first);
    }
}

/// How long a group's DR volumes keep their points: every point younger than `max_age_secs`
/// (0: no bound by age), within `max_bytes` of undo per volume (0: no bound by size). Both
/// 0: no points are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retention {
    pub max_age_secs: u64,
    pub max_bytes: u64,
    /// Beyond `max_age_secs`, one point per clock hour is kept for this many hours more.
    #[serde(default)]
    pub keep_hourly: u32,
}

/// A clock hour, of a time in ms since the Unix epoch.
pub fn hour_of(ms: u64) -> u64 {
    ms / 3_600_000
}

impl Retention {
    pub fn is_on(&self) -> bool {
        self.max_age_secs > 0 || self.max_bytes > 0
    }

    /// Whether a point cut at `cut_ms`, older than `max_age_secs`, is one of those kept an
    /// hour each: its hour is within `keep_hourly` hours of the age bound.
    pub fn keeps_hourly(&self, cut_ms: u64, now_ms: u64) -> bool {
        let bound = now_ms.saturating_sub(self.max_age_secs.saturating_mul(1000));
        self.keep_hourly > 0
            && self.max_age_secs > 0
            && hour_of(cut_ms) + u64::from(self.keep_hourly) >= hour_of(bound)
    }

    /// Whether the oldest segment of a journal may go: the point it leaves oldest was cut
    /// at `next_oldest_cut_ms` (every older point is older still), the journal holds
    /// `bytes`, of which the segment `segment_bytes`.
    pub fn drops(
        &self,
        now_ms: u64,
        next_oldest_cut_ms: u64,
        bytes: u64,
        segment_bytes: u64,
    ) -> bool {
        let too_old = self.max_age_secs > 0
            && next_oldest_cut_ms.saturating_add(self.max_age_secs.saturating_mul(1000)) <= now_ms;
        let too_big = self.max_bytes > 0 && bytes > self.max_bytes && segment_bytes > 0;
        too_old || too_big
    }
}

/// What the DR side does about undo before it applies unit `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitUndo {
    /// Keep the old contents of the unit's ranges, durably, then apply.
    Keep,
    /// The unit's undo is durable already (a crash came during its apply): apply only. The
    /// volume is no longer the image before the unit, so its undo must not be taken again.
    Kept,
    /// No points are kept before this unit: apply it. A journal that is on starts at the
    /// unit's end, if the volume is a consistent image then.
    NotKept,
    /// The journal does not end where the volume is (it missed a change): it is emptied,
    /// durably, before the unit applies; the unit is then [`UnitUndo::NotKept`].
    Restart,
}

/// Decides [`UnitUndo`] for unit `epoch`: `journal` is the newest point the journal holds
/// (`None`: it holds none, or points are off), `applied` the volume's last unit and
/// `consistent` whether the volume is the image at it.
pub fn unit_undo(
    journal: Option<Epoch>,
    applied: Epoch,
    consistent: bool,
    epoch: Epoch,
) -> UnitUndo {
    match journal {
        None => UnitUndo::NotKept,
        Some(newest) if newest >= epoch && newest > applied => UnitUndo::Kept,
        Some(newest) if newest == applied && consistent && epoch > applied => UnitUndo::Keep,
        Some(_) => UnitUndo::Restart,
    }
}

/// The ranges a unit's undo keeps: every byte its writes touch, widened to whole `block`s
/// (the volume is read in blocks), merged, in offset order, each at most `max_piece` long.
pub fn undo_ranges(
    writes: impl IntoIterator<Item = ByteRange>,
    block: u64,
    max_piece: u64,
) -> Vec<ByteRange> {
    let mut spans: Vec<(u64, u64)> = writes
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            let start = r.offset / block * block;
            (start, r.end().div_ceil(block).saturating_mul(block))
        })
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut out = Vec::with_capacity(merged.len());
    for (mut s, e) in merged {
        while s < e {
            let len = (e - s).min(max_piece);
            out.push(ByteRange::new(s, len));
            s += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const SIZE: usize = 512;

    /// A volume, its undo journal (bytes kept in one buffer) and the image at every point.
    struct Model {
        volume: Vec<u8>,
        journal: Vec<u8>,
        images: BTreeMap<Epoch, Vec<u8>>,
        index: UndoIndex,
    }

    impl Model {
        fn new() -> Self {
            Self {
                volume: vec![0; SIZE],
                journal: Vec::new(),
                images: BTreeMap::from([(Epoch(0), vec![0; SIZE])]),
                index: UndoIndex::new(Epoch(0)),
            }
        }

        /// Applies unit `epoch` of `writes`, keeping its undo first.
        fn apply(&mut self, epoch: Epoch, writes: &[(u64, u64, u8)]) {
            let mut touched = Coverage::default();
            for (offset, len, _) in writes {
                touched.add_gaps(UndoRange {
                    range: ByteRange::new(*offset, *len),
                    at: RecordAt {
                        segment: 0,
                        offset: 0,
                    },
                });
            }
            let mut undo = Vec::new();
            for r in touched.ranges() {
                let at = RecordAt {
                    segment: 0,
                    offset: self.journal.len() as u64,
                };
                let (s, e) = (r.range.offset as usize, r.range.end() as usize);
                self.journal.extend_from_slice(&self.volume[s..e]);
                undo.push(UndoRange { range: r.range, at });
            }
            self.index.push_unit(epoch, &undo).unwrap();
            for (offset, len, value) in writes {
                self.volume[*offset as usize..(*offset + *len) as usize].fill(*value);
            }
            self.images.insert(epoch, self.volume.clone());
        }

        /// The image at `point`, read through the index.
        fn read(&self, point: Epoch) -> Vec<u8> {
            let view = self.index.view(point).unwrap();
            let mut out = Vec::new();
            for piece in view.pieces(ByteRange::new(0, SIZE as u64)) {
                match piece {
                    Piece::Undo { range, at } => {
                        let s = at.offset as usize;
                        out.extend_from_slice(&self.journal[s..s + range.len as usize]);
                    }
                    Piece::Volume { range } => out.extend_from_slice(
                        &self.volume[range.offset as usize..range.end() as usize],
                    ),
                }
            }
            out
        }

        fn check(&self, seed: u64) {
            let points = self.index.points();
            let kept: Vec<Epoch> = self.images.keys().copied().collect();
            assert_eq!(points, kept, "seed {seed}");
            for p in points {
                assert_eq!(self.read(p), self.images[&p], "seed {seed}: image at {p}");
            }
        }
    }

    /// Hundreds of seeded histories of units, trims and merges: the image read through the
    /// index at every retained point is the image the volume had then.
    #[test]
    fn every_retained_point_reads_as_the_image_it_was() {
        let first: u64 = std::env::var("BLOCKREP_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        eprintln!("seeds {first}..{}", first + 300);
        for seed in first..first + 300 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut m = Model::new();
            let mut epoch = Epoch(0);
            for _ in 0..rng.random_range(1..40) {
                epoch = Epoch(epoch.0 + rng.random_range(1..3));
                let writes: Vec<(u64, u64, u8)> = (0..rng.random_range(0..6))
                    .map(|_| {
                        let offset = rng.random_range(0..SIZE as u64 - 1);
                        let len = rng.random_range(1..=(SIZE as u64 - offset).min(64));
                        (offset, len, rng.random())
                    })
                    .collect();
                m.apply(epoch, &writes);
                let points = m.index.points();
                match rng.random_range(0..10) {
                    0 => {
                        let p = points[rng.random_range(0..points.len())];
                        m.index.trim_through(p).unwrap();
                        m.images.retain(|e, _| *e >= p);
                    }
                    1 if points.len() > 2 => {
                        let a = rng.random_range(0..points.len() - 1);
                        let b = rng.random_range(a + 1..points.len());
                        let (from, to) = (points[a], points[b]);
                        m.index.merge(from, to).unwrap();
                        m.images.retain(|e, _| *e <= from || *e >= to);
                    }
                    _ => {}
                }
                m.check(seed);
            }
        }
    }

    /// A drill's view kept current: once the view at a point is taken, adding each later
    /// unit's undo where the view has none keeps it the image at that point, whatever
    /// applies to the volume after.
    #[test]
    fn a_view_extended_with_later_units_stays_the_image_at_its_point() {
        for seed in 1..100u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut m = Model::new();
            for e in 1..=5 {
                let offset = rng.random_range(0..SIZE as u64 - 64);
                m.apply(Epoch(e), &[(offset, 64, rng.random())]);
            }
            let point = Epoch(rng.random_range(0..=5));
            let mut drill = m.index.view(point).unwrap();
            let image = m.images[&point].clone();
            for e in 6..=12 {
                let offset = rng.random_range(0..SIZE as u64 - 64);
                let before = m.index.steps.len();
                m.apply(Epoch(e), &[(offset, 64, rng.random())]);
                for r in m.index.steps[before].undo.ranges() {
                    drill.add_gaps(r);
                }
                let mut read = Vec::new();
                for piece in drill.pieces(ByteRange::new(0, SIZE as u64)) {
                    match piece {
                        Piece::Undo { range, at } => {
                            let s = at.offset as usize;
                            read.extend_from_slice(&m.journal[s..s + range.len as usize]);
                        }
                        Piece::Volume { range } => read.extend_from_slice(
                            &m.volume[range.offset as usize..range.end() as usize],
                        ),
                    }
                }
                assert_eq!(read, image, "seed {seed}: the drill at {point} after {e}");
            }
        }
    }

    /// The decision before each unit: keep its undo only when the journal ends exactly at
    /// a consistent volume; never keep it twice (a replayed unit whose undo is durable); a
    /// journal that missed a change starts again.
    #[test]
    fn a_units_undo_is_kept_once_and_only_from_the_image_the_journal_ends_at() {
        use UnitUndo::*;
        let e = Epoch;
        assert_eq!(unit_undo(None, e(4), true, e(5)), NotKept);
        assert_eq!(unit_undo(Some(e(4)), e(4), true, e(5)), Keep);
        // A crash after unit 5's undo was durable, during its apply.
        assert_eq!(unit_undo(Some(e(5)), e(4), true, e(5)), Kept);
        // The volume is not the image at 4 (an initial sync is under way).
        assert_eq!(unit_undo(Some(e(4)), e(4), false, e(5)), Restart);
        // The journal missed unit 5 (or ends past the volume for another unit).
        assert_eq!(unit_undo(Some(e(4)), e(5), true, e(6)), Restart);
        // Units 5 to 7 applied as one (held for their group's commit) and their undo kept
        // as 7's: the replay applies 5, then 6 and 7, from the same undo.
        assert_eq!(unit_undo(Some(e(7)), e(4), true, e(5)), Kept);
        assert_eq!(unit_undo(Some(e(7)), e(5), true, e(7)), Kept);
    }

    #[test]
    fn a_units_undo_ranges_are_whole_blocks_merged_and_cut_in_pieces() {
        let r = ByteRange::new;
        let ranges = undo_ranges(
            [
                r(9000, 10),
                r(0, 100),
                r(4096, 1),
                r(20480, 3 * 4096),
                r(5, 0),
            ],
            4096,
            8192,
        );
        assert_eq!(
            ranges,
            [r(0, 8192), r(8192, 4096), r(20480, 8192), r(28672, 4096)]
        );
        assert!(undo_ranges([r(5, 0)], 4096, 8192).is_empty());
    }

    /// Hourly points are kept for the hours just beyond the age bound, and only with one.
    #[test]
    fn hourly_points_are_those_of_the_hours_just_beyond_the_age_bound() {
        const HOUR: u64 = 3_600_000;
        let r = Retention {
            max_age_secs: 7200,
            max_bytes: 0,
            keep_hourly: 3,
        };
        let now = 20 * HOUR + 5;
        // The bound is in hour 18: hours 15, 16 and 17 are kept an hour each, and 18.
        assert!(r.keeps_hourly(15 * HOUR, now));
        assert!(r.keeps_hourly(17 * HOUR + HOUR - 1, now));
        assert!(!r.keeps_hourly(15 * HOUR - 1, now));
        let no_age = Retention {
            max_age_secs: 0,
            ..r
        };
        assert!(!no_age.keeps_hourly(19 * HOUR, now));
        let none = Retention {
            keep_hourly: 0,
            ..r
        };
        assert!(!none.keeps_hourly(19 * HOUR, now));
    }

    #[test]
    fn bad_steps_and_points_are_refused_with_nothing_changed() {
        let mut index = UndoIndex::new(Epoch(3));
        let at = RecordAt {
            segment: 0,
            offset: 0,
        };
        let r = |o, l| UndoRange {
            range: ByteRange::new(o, l),
            at,
        };
        assert_eq!(
            index.push_unit(Epoch(3), &[r(0, 8)]),
            Err(UndoError::OutOfOrder {
                epoch: Epoch(3),
                last: Epoch(3)
            })
        );
        let overlap = index.push_unit(Epoch(4), &[r(0, 8), r(4, 8)]);
        assert_eq!(
            overlap,
            Err(UndoError::Overlap {
                range: ByteRange::new(4, 8)
            })
        );
        assert_eq!(index, UndoIndex::new(Epoch(3)));
        index.push_unit(Epoch(5), &[r(0, 8)]).unwrap();
        assert_eq!(index.points(), [Epoch(3), Epoch(5)]);
        assert_eq!(index.view(Epoch(4)), Err(UndoError::NotAPoint(Epoch(4))));
        assert_eq!(
            index.trim_through(Epoch(4)),
            Err(UndoError::NotAPoint(Epoch(4)))
        );
        assert_eq!(index.bytes_behind(Epoch(3)), 8);
        assert_eq!(index.bytes_behind(Epoch(5)), 0);
    }
}
