//! The extents a resync (initial sync or catch-up) reads and sends, with its progress.

use std::collections::VecDeque;

use crate::extent::ByteRange;

/// Runs to copy, handed out as extents of at most `max_extent` bytes, in order.
#[derive(Debug, Clone)]
pub struct ResyncPlan {
    runs: VecDeque<ByteRange>,
    max_extent: u64,
    total: u64,
    handed_out: u64,
}

impl ResyncPlan {
    pub fn new(runs: impl IntoIterator<Item = ByteRange>, max_extent: u64) -> Self {
        assert!(max_extent > 0, "extents must have a size");
        let runs: VecDeque<ByteRange> = runs.into_iter().filter(|r| !r.is_empty()).collect();
        let total = runs.iter().map(|r| r.len).sum();
        Self {
            runs,
            max_extent,
            total,
            handed_out: 0,
        }
    }

    /// The next extent to read, or `None` when the plan is done.
    pub fn next_extent(&mut self) -> Option<ByteRange> {
        let run = self.runs.front_mut()?;
        let len = run.len.min(self.max_extent);
        let extent = ByteRange::new(run.offset, len);
        run.offset += len;
        run.len -= len;
        if run.is_empty() {
            self.runs.pop_front();
        }
        self.handed_out += len;
        Some(extent)
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    pub fn remaining_bytes(&self) -> u64 {
        self.total - self.handed_out
    }

    pub fn is_done(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_cut_into_extents_in_order() {
        let mut plan = ResyncPlan::new(
            [
                ByteRange::new(0, 10),
                ByteRange::new(20, 0),
                ByteRange::new(100, 4),
            ],
            4,
        );
        assert_eq!(plan.total_bytes(), 14);
        let extents: Vec<_> = std::iter::from_fn(|| plan.next_extent()).collect();
        assert_eq!(
            extents,
            [
                ByteRange::new(0, 4),
                ByteRange::new(4, 4),
                ByteRange::new(8, 2),
                ByteRange::new(100, 4)
            ]
        );
        assert!(plan.is_done());
        assert_eq!(plan.remaining_bytes(), 0);
    }
}
