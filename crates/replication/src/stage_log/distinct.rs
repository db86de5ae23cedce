//! What the stage log's cap counts: the bytes of the volume its unapplied units change,
//! each block once per unit.
//!
//! A catch-up sends a block again when it was written after the pass that read it, and
//! the later copy wins when the unit applies; both stay in the file until then. Counting
//! every copy would make a catch-up of a dirty set the cap holds fail under steady writes,
//! every time it is tried. The records in the file are bounded apart (see
//! `StageLog::records_bytes`).

use std::collections::VecDeque;
use std::ops::Range;

use blockrep_core::ByteRange;
use blockrep_core::replication::Epoch;
use rangemap::RangeSet;

use super::Staged;

#[derive(Debug, Default)]
pub(super) struct Distinct {
    /// The ranges of the writes after the last seal (the unit still open), merged.
    open: RangeSet<u64>,
    open_bytes: u64,
    /// The newest epoch among them.
    open_newest: Epoch,
    /// Units sealed and not yet applied, oldest first: their epoch and distinct bytes.
    sealed: VecDeque<(Epoch, u64)>,
    sealed_bytes: u64,
}

fn span(range: ByteRange) -> Range<u64> {
    range.offset..range.offset + range.len
}

impl Distinct {
    /// The accounting of `staged` (in log order) whose units are sealed at `seals` (epochs,
    /// in increasing order); writes above the last seal are the open unit.
    pub(super) fn of(staged: &[Staged], seals: &[Epoch]) -> Self {
        let mut units: Vec<RangeSet<u64>> = vec![RangeSet::new(); seals.len()];
        let mut this = Self::default();
        for s in staged.iter().filter(|s| s.range.len > 0) {
            // The unit of the first seal at or past the write's epoch (seals are in order).
            match seals.partition_point(|&e| e < s.epoch) {
                unit if unit < seals.len() => units[unit].insert(span(s.range)),
                _ => this.add(s.epoch, s.range),
            }
        }
        for (epoch, unit) in seals.iter().zip(&units) {
            let bytes = unit.iter().map(|r| r.end - r.start).sum();
            this.sealed.push_back((*epoch, bytes));
            this.sealed_bytes += bytes;
        }
        this
    }

    /// The bytes counted.
    pub(super) fn bytes(&self) -> u64 {
        self.open_bytes + self.sealed_bytes
    }

    /// The bytes counted once a write of `range` is staged too.
    pub(super) fn bytes_with(&self, range: ByteRange) -> u64 {
        self.bytes() + range.len - self.overlap(range)
    }

    fn overlap(&self, range: ByteRange) -> u64 {
        let span = span(range);
        self.open
            .overlapping(&span)
            .map(|r| r.end.min(span.end) - r.start.max(span.start))
            .sum()
    }

    /// A write of `epoch` to `range` was staged.
    pub(super) fn add(&mut self, epoch: Epoch, range: ByteRange) {
        if range.len == 0 {
            return;
        }
        self.open_bytes += range.len - self.overlap(range);
        self.open.insert(span(range));
        self.open_newest = self.open_newest.max(epoch);
    }

    /// The seal of `epoch` closed the open unit. `staged` is the log's writes, for the case
    /// the stream never makes: a write of a later epoch before the seal (it stays open).
    pub(super) fn seal(&mut self, epoch: Epoch, staged: &[Staged]) {
        if self.open_newest > epoch {
            let mut seals: Vec<Epoch> = self.sealed.iter().map(|(e, _)| *e).collect();
            seals.push(epoch);
            seals.sort_unstable();
            *self = Self::of(staged, &seals);
            return;
        }
        self.sealed.push_back((epoch, self.open_bytes));
        self.sealed_bytes += self.open_bytes;
        self.open.clear();
        self.open_bytes = 0;
    }

    /// The units up to `epoch` were taken out of the log to apply.
    pub(super) fn take(&mut self, epoch: Epoch) {
        while let Some(&(e, bytes)) = self.sealed.front()
            && e <= epoch
        {
            self.sealed.pop_front();
            self.sealed_bytes -= bytes;
        }
        if self.sealed.is_empty() && self.open_newest <= epoch {
            self.open.clear();
            self.open_bytes = 0;
        }
    }

    /// Writes after `after` were dropped from `staged`, which is what the log still holds.
    pub(super) fn discarded(&mut self, staged: &[Staged]) {
        let mut seals: Vec<Epoch> = self.sealed.iter().map(|(e, _)| *e).collect();
        seals.sort_unstable();
        *self = Self::of(staged, &seals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(epoch: u64, offset: u64, len: u64) -> Staged {
        Staged {
            epoch: Epoch(epoch),
            range: ByteRange { offset, len },
            zeroes: false,
            data_at: 0,
            data: None,
        }
    }

    #[test]
    fn a_block_counts_once_per_unit() {
        let mut d = Distinct::default();
        d.add(
            Epoch(2),
            ByteRange {
                offset: 0,
                len: 1 << 20,
            },
        );
        d.add(
            Epoch(2),
            ByteRange {
                offset: 4096,
                len: 4096,
            },
        );
        d.add(
            Epoch(3),
            ByteRange {
                offset: (1 << 20) - 4096,
                len: 8192,
            },
        );
        assert_eq!(d.bytes(), (1 << 20) + 4096);
        assert_eq!(
            d.bytes_with(ByteRange {
                offset: 0,
                len: 8192
            }),
            d.bytes()
        );
        d.seal(Epoch(3), &[]);
        // The next unit's copy of a block counts again: both units apply, one after the other.
        d.add(
            Epoch(4),
            ByteRange {
                offset: 0,
                len: 4096,
            },
        );
        assert_eq!(d.bytes(), (1 << 20) + 8192);
        d.take(Epoch(3));
        assert_eq!(d.bytes(), 4096);
        d.seal(Epoch(4), &[]);
        d.take(Epoch(4));
        assert_eq!(d.bytes(), 0);
    }

    #[test]
    fn rebuilt_from_the_log_it_counts_the_same() {
        let log = [
            staged(1, 0, 8192),
            staged(1, 4096, 8192),
            staged(2, 0, 4096),
            staged(3, 65536, 4096),
            staged(3, 65536, 4096),
        ];
        let mut kept = Distinct::default();
        for s in &log[..2] {
            kept.add(s.epoch, s.range);
        }
        kept.seal(Epoch(1), &log[..2]);
        kept.add(log[2].epoch, log[2].range);
        kept.seal(Epoch(2), &log[..3]);
        for s in &log[3..] {
            kept.add(s.epoch, s.range);
        }
        let rebuilt = Distinct::of(&log, &[Epoch(1), Epoch(2)]);
        assert_eq!(rebuilt.bytes(), kept.bytes());
        assert_eq!(rebuilt.bytes(), 12288 + 4096 + 4096);
        assert_eq!(rebuilt.sealed, kept.sealed);
    }

    /// A write of a later epoch ahead of a seal stays in the open unit.
    #[test]
    fn a_later_epochs_write_before_a_seal_stays_open() {
        let log = [staged(1, 0, 4096), staged(2, 0, 4096)];
        let mut d = Distinct::default();
        for s in &log {
            d.add(s.epoch, s.range);
        }
        d.seal(Epoch(1), &log);
        assert_eq!(d.bytes(), 8192);
        d.take(Epoch(1));
        assert_eq!(d.bytes(), 4096);
    }
}
