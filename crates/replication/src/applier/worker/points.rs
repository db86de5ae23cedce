//! The applier's part in the DR volume's points (docs/POINT-IN-TIME.md): before a unit
//! applies, its undo is kept durably (or found kept already, on a replay); after it, the
//! journal starts if it holds no points and is trimmed to the group's retention; before a
//! direct write, which changes the volume outside any unit, the journal is emptied.

use std::collections::VecDeque;
use std::io;

use blockrep_core::ByteRange;
use blockrep_core::pair::dr::SealRecord;
use blockrep_core::replication::Epoch;
use blockrep_core::replication::digests::{DIGEST_BLOCK, HeldDigest};
use blockrep_core::replication::undo::{UnitUndo, undo_ranges, unit_undo};
use blockrep_volume::AlignedBuf;

use super::Worker;
use crate::stage_log::Staged;
use crate::undo_journal::{BLOCK, PIECE_BYTES, Point};

/// Production's digests held for their units at most: past it the oldest is dropped (its
/// blocks are then not comparable). Production sends at most 64 a sealed epoch.
const MAX_HELD_DIGESTS: usize = 1024;

impl Worker {
    /// Opens the volume's undo journal (in the applier's thread: it reads every segment).
    pub(super) fn open_points(&mut self) -> io::Result<()> {
        let journal = self.points.journal()?;
        self.points_held = journal.as_ref().is_some_and(|j| j.newest().is_some());
        self.points.set_applied(self.side.applied());
        Ok(())
    }

    /// Keeps the undo of the unit `seal` ends, whose writes are `unit`, before any of them
    /// reaches the volume: durable when this returns.
    pub(super) fn keep_undo(&mut self, seal: SealRecord, unit: &[Staged]) -> io::Result<()> {
        let retention = self.points.retention();
        let mut guard = self.points.journal()?;
        let journal = guard.as_mut().expect("opened");
        if !retention.is_on() {
            if journal.newest().is_some() {
                self.points
                    .lose_views("the group's retention of points was turned off");
            }
            journal.clear()?;
            self.points_held = false;
            return Ok(());
        }
        let state = self.side.state();
        match unit_undo(
            journal.newest(),
            state.applied,
            state.consistent,
            seal.epoch,
        ) {
            UnitUndo::Keep => {
                let size = self.volume.size();
                let ranges: Vec<ByteRange> =
                    undo_ranges(unit.iter().map(|s| s.range), BLOCK, PIECE_BYTES)
                        .into_iter()
                        .filter_map(|r| {
                            let end = r.end().min(size);
                            (end > r.offset).then(|| ByteRange::new(r.offset, end - r.offset))
                        })
                        .collect();
                let backing = self.volume.backing();
                let mut aligned = AlignedBuf::new(PIECE_BYTES as usize);
                let beat = &self.beat;
                let undo = journal.keep_unit(seal.epoch, seal.cut_ms, &ranges, |range, out| {
                    let whole = range.len.next_multiple_of(BLOCK) as usize;
                    aligned.set_len(whole);
                    if range.len as usize == whole {
                        backing.read_exact_at(&mut aligned[..whole], range.offset)?;
                    } else {
                        // The volume's last, partial block.
                        aligned[..whole].fill(0);
                        let file_read = &mut aligned[..range.len as usize];
                        backing.read_exact_at(file_read, range.offset)?;
                    }
                    out.copy_from_slice(&aligned[..range.len as usize]);
                    beat.progress();
                    Ok(())
                })?;
                // Released first: a drill's read holds its view, then takes the journal.
                drop(guard);
                self.points.extend_views(&undo);
            }
            UnitUndo::Kept | UnitUndo::NotKept => {}
            UnitUndo::Restart => {
                tracing::warn!(
                    unit = %seal.epoch,
                    journal = ?journal.newest(),
                    applied = %state.applied,
                    consistent = state.consistent,
                    "the undo journal does not end where the DR volume is: its points are dropped, and it starts again after this unit"
                );
                self.points
                    .lose_views("the undo journal did not end where the DR volume was");
                journal.clear()?;
                self.points_held = false;
            }
        }
        Ok(())
    }

    /// After a unit is applied and recorded: a journal with no points starts at it (the
    /// volume is a consistent image now), and the retention is applied.
    pub(super) fn unit_kept(&mut self) -> io::Result<()> {
        self.points.set_applied(self.side.applied());
        let retention = self.points.retention();
        if !retention.is_on() {
            return Ok(());
        }
        let state = self.side.state().clone();
        let mut guard = self.points.journal()?;
        let journal = guard.as_mut().expect("opened");
        if journal.newest().is_none() {
            if !state.consistent {
                return Ok(());
            }
            journal.start(Point {
                epoch: state.applied,
                cut_ms: state.applied_cut_ms,
            })?;
            self.points_held = true;
        }
        // The digests of this unit and before: production's content at its end, but
        // where a later staged write spoiled them.
        let (ready, held): (VecDeque<HeldDigest>, VecDeque<HeldDigest>) =
            std::mem::take(&mut self.held_digests)
                .into_iter()
                .partition(|d| d.after <= state.applied);
        self.held_digests = held;
        if state.consistent {
            for digest in ready {
                journal.record_digests(state.applied, digest.clean());
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        journal.trim(retention, now_ms, self.points.pinned())?;
        if let Err(e) = journal.save_digests(false) {
            // Drill verification only loses them at a crash: replication goes on.
            tracing::warn!(error = %e, "cannot save the digest records; trying again in a minute");
        }
        Ok(())
    }

    /// Production's digest of the blocks from `offset`, read after every frame before it:
    /// held until the unit covering `after` is applied, if points are kept.
    pub(super) fn digest_arrived(&mut self, offset: u64, after: Epoch, mut crcs: Vec<u32>) {
        if !self.points.retention().is_on() {
            return;
        }
        // Only whole blocks of the volume are recorded (production digests no others).
        let blocks = self.volume.size().saturating_sub(offset) / DIGEST_BLOCK;
        crcs.truncate(usize::try_from(blocks).unwrap_or(usize::MAX));
        if crcs.is_empty() {
            return;
        }
        if self.held_digests.len() >= MAX_HELD_DIGESTS {
            self.held_digests.pop_front();
        }
        self.held_digests
            .push_back(HeldDigest::new(after, offset, crcs));
    }

    /// A staged write to `range` arrived: the held digests' blocks it overlaps may differ
    /// at the end of their unit.
    pub(super) fn spoil_digests(&mut self, range: ByteRange) {
        for digest in &mut self.held_digests {
            digest.spoil(range);
        }
    }

    /// A direct write is about to change the volume outside any unit: no point held
    /// survives it, so the journal is emptied first, durably.
    pub(super) fn before_direct_write(&mut self) -> io::Result<()> {
        if !self.points_held {
            return Ok(());
        }
        let mut guard = self.points.journal()?;
        if let Some(journal) = guard.as_mut() {
            tracing::info!("a direct write reaches the DR volume: its points are dropped");
            self.points
                .lose_views("a direct write (a full copy) rewrote the DR volume outside units");
            journal.clear()?;
        }
        self.points_held = false;
        Ok(())
    }
}
