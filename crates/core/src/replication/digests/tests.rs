use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::replication::undo::{RecordAt, UndoRange};

const BLOCKS: u64 = 24;
const SIZE: u64 = BLOCKS * DIGEST_BLOCK - 4096;

/// A DR volume's history in whole blocks: what each block holds at every point, its undo
/// index and the digests recorded.
struct History {
    /// Block contents (a CRC stands for them) at every point, oldest first.
    images: BTreeMap<Epoch, Vec<u32>>,
    index: UndoIndex,
    records: DigestRecords,
}

impl History {
    fn new() -> Self {
        Self {
            images: BTreeMap::from([(Epoch(0), vec![0; BLOCKS as usize])]),
            index: UndoIndex::new(Epoch(0)),
            records: DigestRecords::default(),
        }
    }

    fn block_range(b: u64) -> ByteRange {
        let offset = b * DIGEST_BLOCK;
        ByteRange::new(offset, DIGEST_BLOCK.min(SIZE - offset))
    }

    /// Unit `epoch` writes part of each of `blocks`; production's digest of some of them
    /// (`digested`) is recorded at the unit.
    fn apply(&mut self, epoch: Epoch, blocks: &[u64], digested: &[u64]) {
        let mut image = self.images.values().next_back().unwrap().clone();
        let undo: Vec<UndoRange> = blocks
            .iter()
            .map(|&b| {
                image[b as usize] = epoch.0 as u32 * 1000 + b as u32;
                let r = Self::block_range(b);
                UndoRange {
                    // Part of the block: a digest is of the whole block all the same.
                    range: ByteRange::new(r.offset + 4096, 4096),
                    at: RecordAt {
                        segment: 0,
                        offset: 0,
                    },
                }
            })
            .collect();
        self.index.push_unit(epoch, &undo).unwrap();
        for &b in digested {
            self.records.record(epoch, b, image[b as usize]);
        }
        self.images.insert(epoch, image);
    }

    /// Every answer the records give at every retained point is the block's content there.
    /// Every answer the records give at every retained point is the block's content there,
    /// and the same as the rule applied record by record (`UndoIndex::unchanged`) gives.
    fn check(&self, seed: u64) -> u64 {
        let mut known = 0;
        for point in self.index.points() {
            let image = &self.images[&point];
            let expected = self.records.expected_at(&self.index, point);
            for b in 0..BLOCKS {
                assert_eq!(
                    expected.get(&b).copied(),
                    self.one_by_one(point, b),
                    "seed {seed}: block {b} at {point}"
                );
                if let Some(crc) = expected.get(&b) {
                    assert_eq!(*crc, image[b as usize], "seed {seed}: block {b} at {point}");
                    known += 1;
                }
            }
        }
        known
    }

    /// The newest record of `block` at or before `point` the block did not change after,
    /// else the oldest after it the block did not change before.
    fn one_by_one(&self, point: Epoch, block: u64) -> Option<u32> {
        let range = ByteRange::new(block * DIGEST_BLOCK, DIGEST_BLOCK);
        let of_block: Vec<(Epoch, u32)> = self
            .records
            .records
            .iter()
            .filter(|((b, _), _)| *b == block)
            .map(|((_, at), crc)| (*at, *crc))
            .collect();
        let valid = |r: &&(Epoch, u32)| self.index.unchanged(range, r.0, point);
        of_block
            .iter()
            .rev()
            .filter(|r| r.0 <= point)
            .find(valid)
            .or_else(|| of_block.iter().filter(|r| r.0 > point).find(valid))
            .map(|r| r.1)
    }
}

#[test]
fn every_crc_a_point_is_given_is_its_content_there() {
    let mut known = 0;
    for seed in 0..300u64 {
        println!("seed {seed}");
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut h = History::new();
        for e in 1..=40u64 {
            let n = rng.random_range(0..6);
            let mut blocks: Vec<u64> = (0..n).map(|_| rng.random_range(0..BLOCKS)).collect();
            blocks.sort_unstable();
            blocks.dedup();
            // Digests of some of the written blocks, and sometimes of unwritten ones (an
            // online verify's probe, or a digest whose epoch's unit merged with the next).
            let mut digested: Vec<u64> = blocks
                .iter()
                .copied()
                .filter(|_| rng.random_bool(0.7))
                .collect();
            if rng.random_bool(0.2) {
                digested.push(rng.random_range(0..BLOCKS));
            }
            h.apply(Epoch(e), &blocks, &digested);
            if rng.random_bool(0.1) {
                let points = h.index.points();
                let oldest = points[rng.random_range(0..points.len())];
                h.records.trim(&h.index, oldest);
                h.index.trim_through(oldest).unwrap();
            }
            if rng.random_bool(0.1) {
                let points = h.index.points();
                let i = rng.random_range(0..points.len());
                let j = rng.random_range(i..points.len());
                h.index.merge(points[i], points[j]).unwrap();
            }
            known += h.check(seed);
        }
    }
    assert!(known > 10_000, "the records told too little: {known}");
}

#[test]
fn a_record_tells_every_point_until_the_block_changes() {
    let mut h = History::new();
    h.apply(Epoch(1), &[3], &[3]);
    h.apply(Epoch(2), &[4], &[]);
    h.apply(Epoch(3), &[3], &[]);
    let crc = h.images[&Epoch(1)][3];
    assert_eq!(h.records.expected(&h.index, Epoch(1), 3), Some(crc));
    assert_eq!(h.records.expected(&h.index, Epoch(2), 3), Some(crc));
    assert_eq!(
        h.records.expected(&h.index, Epoch(3), 3),
        None,
        "changed, undigested"
    );
    assert_eq!(
        h.records.expected(&h.index, Epoch(0), 3),
        None,
        "before the record"
    );
    // A later record tells earlier points the block did not change since.
    h.records.record(Epoch(3), 4, h.images[&Epoch(3)][4]);
    assert_eq!(
        h.records.expected(&h.index, Epoch(2), 4),
        Some(h.images[&Epoch(2)][4])
    );
    assert_eq!(h.records.expected(&h.index, Epoch(1), 4), None);
}

#[test]
fn a_trim_keeps_the_newest_record_still_true_at_the_new_oldest_point() {
    let mut h = History::new();
    h.apply(Epoch(1), &[3, 5], &[3, 5]);
    h.apply(Epoch(2), &[5], &[]);
    h.apply(Epoch(3), &[], &[]);
    h.records.trim(&h.index, Epoch(2));
    h.index.trim_through(Epoch(2)).unwrap();
    assert_eq!(
        h.records.len(),
        1,
        "block 5's record went: it changed since"
    );
    assert_eq!(
        h.records.expected(&h.index, Epoch(3), 3),
        Some(h.images[&Epoch(1)][3])
    );
}

#[test]
fn touched_blocks_are_due_once_sealed_in_runs() {
    let mut t = Touched::default();
    t.note(Epoch(1), ByteRange::new(0, 4096));
    assert!(t.take_due(SIZE).is_empty(), "off: nothing noted");
    t.set_on(true);
    t.note(Epoch(1), ByteRange::new(4096, 4096));
    t.note(Epoch(1), ByteRange::new(DIGEST_BLOCK - 512, 1024));
    t.note(Epoch(2), ByteRange::new(10 * DIGEST_BLOCK, 4096));
    t.note(Epoch(3), ByteRange::new((BLOCKS - 1) * DIGEST_BLOCK, 4096));
    assert!(t.take_due(SIZE).is_empty(), "nothing sealed");
    t.sealed(Epoch(1));
    assert_eq!(t.take_due(SIZE), vec![ByteRange::new(0, 2 * DIGEST_BLOCK)]);
    t.sealed(Epoch(3));
    assert_eq!(
        t.take_due(SIZE),
        vec![ByteRange::new(10 * DIGEST_BLOCK, DIGEST_BLOCK)],
        "the volume's partial last block is not digested"
    );
    let past = MAX_BLOCKS_PER_EPOCH as u64 + 10;
    t.note(Epoch(4), ByteRange::new(0, past * DIGEST_BLOCK));
    t.note(Epoch(5), ByteRange::new((past - 1) * DIGEST_BLOCK, 4096));
    t.sealed(Epoch(5));
    let due = t.take_due(u64::MAX);
    let blocks: u64 = due.iter().map(|r| r.len / DIGEST_BLOCK).sum();
    assert_eq!(
        blocks,
        MAX_BLOCKS_PER_EPOCH as u64 + 1,
        "an epoch past the cap has its first blocks digested; the next one all of its"
    );
    assert_eq!(due.last().unwrap().end(), past * DIGEST_BLOCK);
    t.note(Epoch(6), ByteRange::new(0, 4096));
    t.forget();
    t.sealed(Epoch(6));
    assert!(t.take_due(SIZE).is_empty());
}

#[test]
fn past_its_bound_a_volume_keeps_no_new_record() {
    let mut records = DigestRecords::default();
    for b in 0..MAX_RECORDS as u64 {
        records.record(Epoch(1), b, 1);
    }
    records.record(Epoch(2), 0, 2);
    records.record(Epoch(2), MAX_RECORDS as u64, 2);
    assert_eq!(records.len(), MAX_RECORDS);
    let index = UndoIndex::new(Epoch(0));
    assert_eq!(records.expected(&index, Epoch(0), MAX_RECORDS as u64), None);
    records.record(Epoch(1), 0, 3);
    assert_eq!(
        records.expected(&index, Epoch(0), 0),
        Some(3),
        "a point's own record is replaced"
    );
}

#[test]
fn blocks_due_and_not_yet_read_are_bounded() {
    let mut t = Touched::default();
    t.set_on(true);
    for e in 1..=10u64 {
        let first = e * MAX_BLOCKS_PER_EPOCH as u64;
        t.note(
            Epoch(e),
            ByteRange::new(
                first * DIGEST_BLOCK,
                MAX_BLOCKS_PER_EPOCH as u64 * DIGEST_BLOCK,
            ),
        );
        t.sealed(Epoch(e));
    }
    let due: u64 = t
        .take_due(u64::MAX)
        .iter()
        .map(|r| r.len / DIGEST_BLOCK)
        .sum();
    assert_eq!(due, MAX_BLOCKS_DUE as u64);
}

#[test]
fn runs_hold_at_most_a_digest_frames_blocks() {
    let mut t = Touched::default();
    t.set_on(true);
    t.note(Epoch(1), ByteRange::new(0, 100 * DIGEST_BLOCK));
    t.sealed(Epoch(1));
    let due = t.take_due(u64::MAX);
    assert_eq!(
        due,
        vec![
            ByteRange::new(0, MAX_BLOCKS_PER_DIGEST * DIGEST_BLOCK),
            ByteRange::new(
                MAX_BLOCKS_PER_DIGEST * DIGEST_BLOCK,
                (100 - MAX_BLOCKS_PER_DIGEST) * DIGEST_BLOCK
            ),
        ]
    );
}

#[test]
fn a_later_staged_write_spoils_the_blocks_it_overlaps() {
    let mut d = HeldDigest::new(Epoch(4), 2 * DIGEST_BLOCK, vec![7, 8, 9]);
    d.spoil(ByteRange::new(0, 4096));
    d.spoil(ByteRange::new(3 * DIGEST_BLOCK + 100, DIGEST_BLOCK));
    assert_eq!(d.clean().collect::<Vec<_>>(), vec![(2, 7)]);
}

#[test]
fn records_read_back_as_written_and_damage_is_refused() {
    let mut records = DigestRecords::default();
    records.record(Epoch(3), 7, 0xdead_beef);
    records.record(Epoch(9), 7, 1);
    records.record(Epoch(9), u64::MAX / DIGEST_BLOCK, 2);
    let bytes = records.to_bytes();
    assert_eq!(DigestRecords::from_bytes(&bytes), Ok(records.clone()));
    for cut in [0, 3, 8, bytes.len() - 1] {
        assert!(
            DigestRecords::from_bytes(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let mut flipped = bytes.clone();
    flipped[20] ^= 1;
    assert!(DigestRecords::from_bytes(&flipped).is_err());
    records.retain_between(Epoch(4), Epoch(9));
    assert_eq!(records.len(), 2);
}
