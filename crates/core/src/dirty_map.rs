//! The dirty map: one bit per block of a volume, set when the block is written and cleared
//! once the peer has it.
//!
//! The bits are kept in 4 KiB pages, the unit the tracker writes to disk; the map remembers
//! which pages changed since they were last taken for writing. At 4 KiB granularity a TiB
//! costs 32 MiB of memory.

use crate::extent::ByteRange;

/// Bytes in one on-disk page of bits.
pub const BITMAP_PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = BITMAP_PAGE_BYTES / 8;
const BITS_PER_PAGE: u64 = BITMAP_PAGE_BYTES as u64 * 8;

/// Bytes of volume covered by one bit: a power of two from 4 KiB to 1 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granularity(u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bitmap granularity {bytes} must be a power of two from 4096 (4 KiB) to 1048576 (1 MiB)")]
pub struct GranularityError {
    pub bytes: u64,
}

impl Granularity {
    pub const MIN: u64 = 4096;
    pub const MAX: u64 = 1 << 20;
    pub const DEFAULT: Granularity = Granularity(4096);

    pub fn new(bytes: u64) -> Result<Self, GranularityError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(Self(bytes as u32))
        } else {
            Err(GranularityError { bytes })
        }
    }

    pub const fn bytes(self) -> u64 {
        self.0 as u64
    }

    const fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

/// Index of a 4 KiB page of bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

impl PageIndex {
    /// Byte offset of this page within the bit array.
    pub const fn byte_offset(self) -> u64 {
        self.0 * BITMAP_PAGE_BYTES as u64
    }
}

#[derive(Clone, Debug)]
pub struct DirtyMap {
    granularity: Granularity,
    volume_size: u64,
    nbits: u64,
    /// Padded to whole pages; bits past `nbits` are always zero.
    words: Vec<u64>,
    dirty_blocks: u64,
    /// One bit per page: changed since last taken by `take_changed_pages`.
    changed_pages: Vec<u64>,
}

impl DirtyMap {
    pub fn new(volume_size: u64, granularity: Granularity) -> Self {
        let nbits = volume_size.div_ceil(granularity.bytes());
        let pages = nbits.div_ceil(BITS_PER_PAGE).max(1);
        Self {
            granularity,
            volume_size,
            nbits,
            words: vec![0; pages as usize * WORDS_PER_PAGE],
            dirty_blocks: 0,
            changed_pages: vec![0; (pages as usize).div_ceil(64)],
        }
    }

    /// Grows the map to cover a volume of `volume_size` bytes (a smaller size changes
    /// nothing). The new blocks are clean; the pages that changed are marked so.
    pub fn grow(&mut self, volume_size: u64) {
        if volume_size <= self.volume_size {
            return;
        }
        let old_pages = self.page_count();
        self.volume_size = volume_size;
        self.nbits = volume_size.div_ceil(self.granularity.bytes());
        let pages = self.nbits.div_ceil(BITS_PER_PAGE).max(1);
        self.words.resize(pages as usize * WORDS_PER_PAGE, 0);
        self.changed_pages.resize((pages as usize).div_ceil(64), 0);
        for page in old_pages.saturating_sub(1)..pages {
            self.changed_pages[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    pub fn page_count(&self) -> u64 {
        (self.words.len() / WORDS_PER_PAGE) as u64
    }

    /// Bytes of the volume marked dirty (the last block counts only up to the volume's end).
    pub fn dirty_bytes(&self) -> u64 {
        let g = self.granularity.bytes();
        let mut bytes = self.dirty_blocks * g;
        if self.nbits > 0 && self.bit(self.nbits - 1) {
            bytes -= self.nbits * g - self.volume_size;
        }
        bytes
    }

    pub fn is_clean(&self) -> bool {
        self.dirty_blocks == 0
    }

    /// Whether the block holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let bit = offset >> self.granularity.shift();
        bit < self.nbits && self.bit(bit)
    }

    /// Marks every block the range touches.
    pub fn set_range(&mut self, range: ByteRange) {
        if let Some((first, end)) = self.touched_bits(range) {
            self.update_bits(first, end, true);
        }
    }

    /// Clears the blocks the range covers whole; a block only partly covered stays dirty.
    pub fn clear_range(&mut self, range: ByteRange) {
        let shift = self.granularity.shift();
        let first = range.offset.div_ceil(self.granularity.bytes());
        let end = if range.end() >= self.volume_size {
            self.nbits
        } else {
            range.end() >> shift
        };
        if first < end {
            self.update_bits(first, end.min(self.nbits), false);
        }
    }

    /// The dirty runs, in order, each as long as possible.
    pub fn runs(&self) -> DirtyRuns<'_> {
        DirtyRuns {
            map: self,
            next_bit: 0,
        }
    }

    /// The pages changed since the last call, which are then considered unchanged.
    pub fn take_changed_pages(&mut self) -> Vec<PageIndex> {
        let mut pages = Vec::new();
        for (i, word) in self.changed_pages.iter_mut().enumerate() {
            let mut w = std::mem::take(word);
            while w != 0 {
                pages.push(PageIndex(i as u64 * 64 + u64::from(w.trailing_zeros())));
                w &= w - 1;
            }
        }
        pages
    }

    /// Marks pages as changed again, after an attempt to write them failed.
    pub fn mark_pages_changed(&mut self, pages: &[PageIndex]) {
        for page in pages {
            self.changed_pages[(page.0 / 64) as usize] |= 1 << (page.0 % 64);
        }
    }

    /// Marks every page as changed, so the next write covers the whole map.
    pub fn mark_all_pages_changed(&mut self) {
        let pages = self.page_count();
        for page in 0..pages {
            self.changed_pages[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Copies a page's bits, little-endian, into `out`.
    pub fn copy_page(&self, page: PageIndex, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            BITMAP_PAGE_BYTES,
            "a bitmap page is {BITMAP_PAGE_BYTES} bytes"
        );
        let words = &self.words[page.0 as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
    }

    /// Adds the bits of a page read back from disk (bits past the volume's end are ignored).
    pub fn merge_page(&mut self, page: PageIndex, bytes: &[u8]) {
        assert_eq!(
            bytes.len(),
            BITMAP_PAGE_BYTES,
            "a bitmap page is {BITMAP_PAGE_BYTES} bytes"
        );
        let base_bit = page.0 * BITS_PER_PAGE;
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut w = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
            while w != 0 {
                let bit = base_bit + i as u64 * 64 + u64::from(w.trailing_zeros());
                if bit >= self.nbits {
                    break;
                }
                // Runs of set bits are rare enough in a recovered page to set them one by one.
                self.update_bits(bit, bit + 1, true);
                w &= w - 1;
            }
        }
    }

    fn touched_bits(&self, range: ByteRange) -> Option<(u64, u64)> {
        if range.is_empty() || range.offset >= self.volume_size {
            return None;
        }
        let shift = self.granularity.shift();
        let first = range.offset >> shift;
        let end = ((range.end().min(self.volume_size) - 1) >> shift) + 1;
        Some((first, end))
    }

    fn bit(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn update_bits(&mut self, first: u64, end: u64, set: bool) {
        debug_assert!(first < end && end <= self.nbits);
        let first_word = (first / 64) as usize;
        let last_word = ((end - 1) / 64) as usize;
        for w in first_word..=last_word {
            let lo = if w == first_word { first % 64 } else { 0 };
            let hi = if w == last_word {
                (end - 1) % 64 + 1
            } else {
                64
            };
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                self.words[w] = new;
                self.dirty_blocks =
                    self.dirty_blocks + u64::from(new.count_ones()) - u64::from(old.count_ones());
                let page = w / WORDS_PER_PAGE;
                self.changed_pages[page / 64] |= 1 << (page % 64);
            }
        }
    }

    /// First set bit at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        self.scan(from, |w| w)
    }

    /// First clear bit at or after `from` (or `nbits`).
    fn next_clear(&self, from: u64) -> u64 {
        self.scan(from, |w| !w)
            .map_or(self.nbits, |b| b.min(self.nbits))
    }

    fn scan(&self, from: u64, view: impl Fn(u64) -> u64) -> Option<u64> {
        if from >= self.nbits {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = view(self.words[w]) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                return Some(bit);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = view(self.words[w]);
        }
    }
}

/// Iterator over the dirty runs of a [`DirtyMap`].
pub struct DirtyRuns<'a> {
    map: &'a DirtyMap,
    next_bit: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = ByteRange;

    fn next(&mut self) -> Option<ByteRange> {
        let start = self
            .map
            .next_set(self.next_bit)
            .filter(|&b| b < self.map.nbits)?;
        let end = self.map.next_clear(start);
        self.next_bit = end;
        let g = self.map.granularity.bytes();
        let offset = start * g;
        let end_byte = (end * g).min(self.map.volume_size);
        Some(ByteRange::new(offset, end_byte - offset))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const G: u64 = 4096;

    #[test]
    fn granularity_bounds() {
        assert!(Granularity::new(4096).is_ok());
        assert!(Granularity::new(1 << 20).is_ok());
        assert_eq!(
            Granularity::new(2048),
            Err(GranularityError { bytes: 2048 })
        );
        assert_eq!(
            Granularity::new(6000),
            Err(GranularityError { bytes: 6000 })
        );
        assert_eq!(
            Granularity::new(2 << 20),
            Err(GranularityError { bytes: 2 << 20 })
        );
    }

    #[test]
    fn set_rounds_out_and_clear_rounds_in() {
        let mut map = DirtyMap::new(64 * G, Granularity::DEFAULT);
        map.set_range(ByteRange::new(G + 1, 10));
        assert_eq!(map.runs().collect::<Vec<_>>(), vec![ByteRange::new(G, G)]);
        map.clear_range(ByteRange::new(G + 1, G));
        assert!(map.is_dirty(G), "a partly covered block stays dirty");
        map.clear_range(ByteRange::new(G, G));
        assert!(map.is_clean());
    }

    #[test]
    fn last_partial_block_counts_only_to_the_end() {
        let size = 10 * G + 512;
        let mut map = DirtyMap::new(size, Granularity::DEFAULT);
        map.set_range(ByteRange::new(10 * G, 512));
        assert_eq!(map.dirty_bytes(), 512);
        assert_eq!(
            map.runs().collect::<Vec<_>>(),
            vec![ByteRange::new(10 * G, 512)]
        );
        map.clear_range(ByteRange::new(10 * G, 512));
        assert!(map.is_clean());
    }

    #[test]
    fn growing_keeps_the_bits_and_adds_clean_blocks() {
        let mut map = DirtyMap::new(10 * G, Granularity::DEFAULT);
        map.set_range(ByteRange::new(9 * G, G));
        map.take_changed_pages();
        map.grow(BITS_PER_PAGE * G * 3);
        assert_eq!(map.volume_size(), BITS_PER_PAGE * G * 3);
        assert_eq!(map.page_count(), 3);
        assert_eq!(
            map.runs().collect::<Vec<_>>(),
            vec![ByteRange::new(9 * G, G)]
        );
        assert_eq!(
            map.take_changed_pages().len(),
            3,
            "every page to be written"
        );
        map.set_range(ByteRange::new(BITS_PER_PAGE * G * 3 - G, G));
        assert_eq!(map.dirty_bytes(), 2 * G);
        map.grow(G);
        assert_eq!(map.page_count(), 3, "growing smaller changes nothing");
    }

    #[test]
    fn a_tib_at_4k_costs_32_mib() {
        let map = DirtyMap::new(1 << 40, Granularity::DEFAULT);
        assert_eq!(map.words.len() * 8, 32 << 20);
    }

    #[test]
    fn changed_pages_are_tracked_and_taken_once() {
        let mut map = DirtyMap::new(1 << 30, Granularity::DEFAULT); // 262144 bits: 8 pages
        assert_eq!(map.page_count(), 8);
        map.set_range(ByteRange::new(0, G));
        map.set_range(ByteRange::new(BITS_PER_PAGE * 3 * G, G));
        assert_eq!(map.take_changed_pages(), vec![PageIndex(0), PageIndex(3)]);
        assert!(map.take_changed_pages().is_empty());
        map.set_range(ByteRange::new(0, G));
        assert!(
            map.take_changed_pages().is_empty(),
            "setting a set bit changes nothing"
        );
    }

    fn model_runs(model: &BTreeSet<u64>, size: u64) -> Vec<ByteRange> {
        let mut runs: Vec<ByteRange> = Vec::new();
        for &b in model {
            let (off, end) = (b * G, ((b + 1) * G).min(size));
            match runs.last_mut() {
                Some(last) if last.end() == off => last.len += end - off,
                _ => runs.push(ByteRange::new(off, end - off)),
            }
        }
        runs
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let range = (0..size, 1..size / 4);
        prop_oneof![
            range.clone().prop_map(|(o, l)| Op::Set(o, l)),
            range.prop_map(|(o, l)| Op::Clear(o, l)),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_set_of_blocks(ops in proptest::collection::vec(op(300 * G + 700), 1..60)) {
            let size = 300 * G + 700;
            let nblocks = size.div_ceil(G);
            let mut map = DirtyMap::new(size, Granularity::DEFAULT);
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Set(o, l) => {
                        map.set_range(ByteRange::new(o, l));
                        let end = (o + l).min(size);
                        model.extend(o / G..end.div_ceil(G));
                    }
                    Op::Clear(o, l) => {
                        map.clear_range(ByteRange::new(o, l));
                        let end = if o + l >= size { nblocks } else { (o + l) / G };
                        for b in o.div_ceil(G)..end { model.remove(&b); }
                    }
                }
                let runs: Vec<_> = map.runs().collect();
                prop_assert_eq!(&runs, &model_runs(&model, size));
                prop_assert_eq!(map.dirty_bytes(), runs.iter().map(|r| r.len).sum::<u64>());
            }
        }

        #[test]
        fn pages_round_trip(sets in proptest::collection::vec((0u64..1 << 32, 1u64..1 << 22), 1..40)) {
            let size = 1u64 << 32;
            let mut map = DirtyMap::new(size, Granularity::DEFAULT);
            for (o, l) in sets { map.set_range(ByteRange::new(o, l)); }
            let mut copy = DirtyMap::new(size, Granularity::DEFAULT);
            let mut buf = vec![0u8; BITMAP_PAGE_BYTES];
            for page in map.take_changed_pages() {
                map.copy_page(page, &mut buf);
                copy.merge_page(page, &buf);
            }
            prop_assert_eq!(map.runs().collect::<Vec<_>>(), copy.runs().collect::<Vec<_>>());
            prop_assert_eq!(map.dirty_bytes(), copy.dirty_bytes());
        }
    }
}
