//! Production's digests of its blocks at points in time, so that a drill can prove its
//! content (no I/O). The design and its argument are in docs/POINT-IN-TIME.md, "Verifying
//! a drill's content".
//!
//! - Production ([`Touched`]): the journal notes the 64 KiB blocks each epoch's journaled
//!   writes touched; once the epoch is sealed they are due to be read (with the write gate
//!   held) and their CRCs queued in stream order as a digest.
//! - The DR side ([`HeldDigest`]): a digest is held until the unit covering its epoch is
//!   applied; a staged write that arrives after it spoils the blocks it overlaps. The blocks
//!   left are production's content at the end of that unit.
//! - The DR side ([`DigestRecords`]): what was recorded, per block; with the undo index, the
//!   CRC a block had at any retained point, where one is known.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::extent::ByteRange;
use crate::replication::Epoch;
use crate::replication::undo::UndoIndex;

/// Bytes each digest CRC covers.
pub const DIGEST_BLOCK: u64 = 64 << 10;
/// Blocks noted per epoch at most (256 MiB to read): an epoch that touches more has only
/// the first it touched digested.
pub const MAX_BLOCKS_PER_EPOCH: usize = 4096;
/// Records a DR volume keeps at most (about 40 bytes each in memory: some 80 MiB): past it
/// new ones are not kept, and their blocks are not comparable.
pub const MAX_RECORDS: usize = 2 << 20;
/// Blocks due to be read at most, over the epochs sealed and not yet read: past it, the
/// blocks of further epochs are not digested.
pub const MAX_BLOCKS_DUE: usize = 4 * MAX_BLOCKS_PER_EPOCH;
/// Blocks one digest frame covers at most.
pub const MAX_BLOCKS_PER_DIGEST: u64 = 64;

/// The blocks of `range`, by index.
fn blocks_of(range: ByteRange) -> std::ops::Range<u64> {
    if range.len == 0 {
        return 0..0;
    }
    range.offset / DIGEST_BLOCK..range.end().div_ceil(DIGEST_BLOCK)
}

/// Production's notes of the blocks each open epoch touched, and the blocks due to be
/// digested.
#[derive(Debug, Default)]
pub struct Touched {
    on: bool,
    /// At most [`MAX_BLOCKS_PER_EPOCH`] blocks an epoch.
    by_epoch: BTreeMap<Epoch, BTreeSet<u64>>,
    due: BTreeSet<u64>,
}

impl Touched {
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Digests are taken (the group keeps points) or not; off forgets every note.
    pub fn set_on(&mut self, on: bool) {
        self.on = on;
        if !on {
            self.forget();
        }
    }

    pub fn has_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// A journaled write of `epoch` to `range` was queued.
    pub fn note(&mut self, epoch: Epoch, range: ByteRange) {
        if !self.on {
            return;
        }
        let blocks = self.by_epoch.entry(epoch).or_default();
        for b in blocks_of(range) {
            if blocks.len() >= MAX_BLOCKS_PER_EPOCH {
                break;
            }
            blocks.insert(b);
        }
    }

    /// Every epoch ≤ `through` is sealed: its blocks are due.
    pub fn sealed(&mut self, through: Epoch) {
        let open = self.by_epoch.split_off(&through.next());
        for blocks in std::mem::replace(&mut self.by_epoch, open).into_values() {
            for b in blocks {
                if self.due.len() >= MAX_BLOCKS_DUE {
                    return;
                }
                self.due.insert(b);
            }
        }
    }

    /// The journal left journal mode, or the queue was dropped: nothing noted is digested.
    pub fn forget(&mut self) {
        self.by_epoch.clear();
        self.due.clear();
    }

    /// The ranges due to be read and digested, in runs of at most
    /// [`MAX_BLOCKS_PER_DIGEST`] contiguous blocks, of the whole blocks of a volume of
    /// `size` bytes (a partial last block is not digested: its length changes when the
    /// volume grows).
    pub fn take_due(&mut self, size: u64) -> Vec<ByteRange> {
        let whole = size / DIGEST_BLOCK;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in std::mem::take(&mut self.due) {
            match runs.last_mut() {
                Some((start, end)) if *end == b && b - *start < MAX_BLOCKS_PER_DIGEST => {
                    *end = b + 1
                }
                _ => runs.push((b, b + 1)),
            }
        }
        runs.into_iter()
            .filter_map(|(start, end)| {
                let end = end.min(whole);
                (start < end)
                    .then(|| ByteRange::new(start * DIGEST_BLOCK, (end - start) * DIGEST_BLOCK))
            })
            .collect()
    }
}

/// A digest on the DR side, held until the unit covering its epoch is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldDigest {
    /// Compared once the unit covering this epoch is applied.
    pub after: Epoch,
    pub offset: u64,
    pub crcs: Vec<u32>,
    /// Blocks a later staged write overlapped.
    spoiled: Vec<bool>,
}

impl HeldDigest {
    pub fn new(after: Epoch, offset: u64, crcs: Vec<u32>) -> Self {
        let spoiled = vec![false; crcs.len()];
        Self {
            after,
            offset,
            crcs,
            spoiled,
        }
    }

    fn range(&self) -> ByteRange {
        ByteRange::new(self.offset, self.crcs.len() as u64 * DIGEST_BLOCK)
    }

    /// A staged write to `range` arrived after the digest.
    pub fn spoil(&mut self, range: ByteRange) {
        if !self.range().overlaps(&range) {
            return;
        }
        let first = self.offset / DIGEST_BLOCK;
        for b in blocks_of(range) {
            if let Some(s) = b
                .checked_sub(first)
                .and_then(|i| self.spoiled.get_mut(i as usize))
            {
                *s = true;
            }
        }
    }

    /// The blocks not spoiled, by index, with their CRC.
    pub fn clean(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let first = self.offset / DIGEST_BLOCK;
        self.crcs
            .iter()
            .zip(&self.spoiled)
            .enumerate()
            .filter(|(_, (_, spoiled))| !**spoiled)
            .map(move |(i, (crc, _))| (first + i as u64, *crc))
    }
}

/// The first bytes of a saved [`DigestRecords`].
const MAGIC: &[u8; 8] = b"BRDIGST1";

/// Production's CRCs the DR side recorded: `(block, point) → crc`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DigestRecords {
    records: BTreeMap<(u64, Epoch), u32>,
}

impl DigestRecords {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn clear(&mut self) {
        self.records.clear();
    }

    /// Keeps only the records at points from `oldest` to `newest` (those of the journal
    /// the records were saved beside, as it opened).
    pub fn retain_between(&mut self, oldest: Epoch, newest: Epoch) {
        self.records
            .retain(|(_, at), _| oldest <= *at && *at <= newest);
    }

    /// The records as bytes: `BRDIGST1`, a count, `(block, point, crc)` each, and a CRC32
    /// of all that.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 + self.records.len() * 20 + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        for (&(block, at), &crc) in &self.records {
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&at.0.to_le_bytes());
            out.extend_from_slice(&crc.to_le_bytes());
        }
        let sum = crc32fast::hash(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// The records [`DigestRecords::to_bytes`] wrote, or why these bytes are not them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let (body, sum) = bytes
            .split_last_chunk::<4>()
            .ok_or("shorter than its checksum")?;
        if crc32fast::hash(body) != u32::from_le_bytes(*sum) {
            return Err("its checksum does not match".into());
        }
        let rest = body.strip_prefix(MAGIC).ok_or("not a digest record file")?;
        let (count, mut rest) = rest.split_first_chunk::<8>().ok_or("no count")?;
        let count = u64::from_le_bytes(*count);
        if count.checked_mul(20) != Some(rest.len() as u64) || count > MAX_RECORDS as u64 {
            return Err(format!(
                "{count} records do not fit its {} bytes",
                rest.len()
            ));
        }
        let mut records = BTreeMap::new();
        while let Some((record, tail)) = rest.split_first_chunk::<20>() {
            let u64_at = |i: usize| u64::from_le_bytes(record[i..i + 8].try_into().expect("8"));
            let crc = u32::from_le_bytes(record[16..20].try_into().expect("4"));
            records.insert((u64_at(0), Epoch(u64_at(8))), crc);
            rest = tail;
        }
        Ok(Self { records })
    }

    /// Production's content of `block` was `crc` at point `point` (the newest applied).
    /// Past [`MAX_RECORDS`] new records are not kept.
    pub fn record(&mut self, point: Epoch, block: u64, crc: u32) {
        if let Some(c) = self.records.get_mut(&(block, point)) {
            *c = crc;
        } else if self.records.len() < MAX_RECORDS {
            self.records.insert((block, point), crc);
        }
    }

    /// The CRC each block had at `point`, where a record tells it: the newest record at or
    /// before the point with no change of the block in between, else the oldest after it
    /// with none. One pass over the records and the index's steps.
    pub fn expected_at(&self, index: &UndoIndex, point: Epoch) -> HashMap<u64, u32> {
        if self.records.is_empty() {
            return HashMap::new();
        }
        let blocks: HashSet<u64> = self.records.keys().map(|(b, _)| *b).collect();
        let changes = index.changes_around(point, DIGEST_BLOCK, |b| blocks.contains(&b));
        let mut expected: HashMap<u64, (Epoch, u32)> = HashMap::new();
        for (&(block, at), &crc) in &self.records {
            let valid = if at <= point {
                changes.last_until.get(&block).is_none_or(|l| *l <= at)
            } else {
                changes.first_after.get(&block).is_none_or(|f| *f > at)
            };
            if !valid {
                continue;
            }
            // Records come oldest first: the newest valid one at or before the point wins,
            // else the oldest valid one after it.
            match expected.get(&block) {
                Some((kept, _)) if *kept <= point && at > point => {}
                Some((kept, _)) if *kept > point => {}
                _ => {
                    expected.insert(block, (at, crc));
                }
            }
        }
        expected.into_iter().map(|(b, (_, crc))| (b, crc)).collect()
    }

    /// The CRC `block` had at `point`, if a record tells it (see
    /// [`DigestRecords::expected_at`]).
    #[cfg(test)]
    pub(crate) fn expected(&self, index: &UndoIndex, point: Epoch, block: u64) -> Option<u32> {
        self.expected_at(index, point).get(&block).copied()
    }

    /// Retention is about to drop every step up to `oldest` from `index` (which still has
    /// them): each block keeps, of its records at or before `oldest`, the newest that is
    /// still its content there, as a record at `oldest`. Records after it stay. One pass
    /// over the records and the steps.
    pub fn trim(&mut self, index: &UndoIndex, oldest: Epoch) {
        // Only the blocks with records at or before the new oldest point are looked up.
        let blocks: HashSet<u64> = self
            .records
            .keys()
            .filter(|(_, at)| *at <= oldest)
            .map(|(b, _)| *b)
            .collect();
        if blocks.is_empty() {
            return;
        }
        let changes = index.changes_around(oldest, DIGEST_BLOCK, |b| blocks.contains(&b));
        let mut kept = BTreeMap::new();
        let mut survivor: Option<(u64, u32)> = None;
        for ((block, at), crc) in std::mem::take(&mut self.records) {
            if at > oldest {
                kept.insert((block, at), crc);
                continue;
            }
            if changes.last_until.get(&block).is_none_or(|l| *l <= at) {
                // Newer records of the same block come later and replace it.
                if let Some((b, _)) = survivor
                    && b != block
                {
                    let (b, c) = survivor.take().expect("checked");
                    kept.insert((b, oldest), c);
                }
                survivor = Some((block, crc));
            }
        }
        if let Some((b, c)) = survivor {
            kept.insert((b, oldest), c);
        }
        self.records = kept;
    }
}

#[cfg(test)]
mod tests;
