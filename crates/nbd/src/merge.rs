//! Sub-block writes, merged. A client that writes less than a block at a time, pipelined
//! (sequential 1 KiB requests, as the reference NBD project's tester does), would cost one
//! read-modify-write of the block per request, one after the other on the block's lock.
//! Instead, the data writes that arrive in one turn of the connection's loop and touch one
//! another (overlap or abut) become one write of their union, laid down in arrival order:
//! the same bytes as applying them one by one. Its requests are answered together once it
//! is done; they were all in flight at once, so none of them was answered before another
//! began (NBD orders nothing between requests in flight).

use blockrep_core::ByteRange;
use blockrep_volume::{AlignedBuf, BufPool};

/// The largest union a run grows to.
pub(crate) const MAX_MERGED: u64 = 1 << 20;

/// A run of data writes becoming one.
pub(crate) struct Merged {
    pub range: ByteRange,
    /// The union's bytes.
    pub data: AlignedBuf,
    /// The first request it answers, and the others, in arrival order (a lone sub-block
    /// write allocates nothing more).
    pub first: u64,
    pub more: Vec<u64>,
    /// Any of them asked for FUA.
    pub fua: bool,
}

impl Merged {
    pub fn new(handle: u64, range: ByteRange, data: AlignedBuf, fua: bool) -> Self {
        debug_assert_eq!(data.len() as u64, range.len);
        Self {
            range,
            data,
            first: handle,
            more: Vec::new(),
            fua,
        }
    }

    /// Whether a write of `range` may join: it overlaps or abuts the run, and the union
    /// stays within [`MAX_MERGED`].
    pub fn takes(&self, range: ByteRange) -> bool {
        let touches = range.offset <= self.range.end() && self.range.offset <= range.end();
        touches && union(self.range, range).len <= MAX_MERGED
    }

    /// Lays a write that arrived after every one in the run over it (`takes` said it may
    /// join); a bigger union gets a buffer from `pool`, and the old one goes back.
    pub fn absorb(
        &mut self,
        handle: u64,
        range: ByteRange,
        data: &[u8],
        fua: bool,
        pool: &mut BufPool,
    ) {
        let whole = union(self.range, range);
        if whole != self.range {
            let mut bigger = pool.take(whole.len as usize);
            let at = (self.range.offset - whole.offset) as usize;
            bigger[at..at + self.data.len()].copy_from_slice(&self.data);
            let old = std::mem::replace(&mut self.data, bigger);
            pool.give(old);
            self.range = whole;
        }
        let at = (range.offset - self.range.offset) as usize;
        self.data[at..at + data.len()].copy_from_slice(data);
        self.more.push(handle);
        self.fua |= fua;
    }
}

fn union(a: ByteRange, b: ByteRange) -> ByteRange {
    let offset = a.offset.min(b.offset);
    ByteRange::new(offset, a.end().max(b.end()) - offset)
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn buf(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new(bytes.len().max(1));
        b.set_len(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    #[test]
    fn only_writes_that_touch_the_run_join_it() {
        let run = Merged::new(1, ByteRange::new(1024, 1024), buf(&[0; 1024]), false);
        assert!(run.takes(ByteRange::new(2048, 100)), "abuts its end");
        assert!(run.takes(ByteRange::new(0, 1024)), "abuts its start");
        assert!(run.takes(ByteRange::new(1500, 10)), "inside");
        assert!(!run.takes(ByteRange::new(2049, 10)), "a gap after");
        assert!(!run.takes(ByteRange::new(0, 1000)), "a gap before");
        assert!(
            !run.takes(ByteRange::new(2048, MAX_MERGED)),
            "too big a union"
        );
    }

    /// Seeded: random runs of touching writes, merged, hold what applying them one by
    /// one in arrival order holds.
    #[test]
    fn a_merged_run_holds_the_writes_applied_in_order() {
        let seed = std::env::var("BLOCKREP_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5b10c);
        eprintln!("seed {seed}");
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut pool = BufPool::default();
        for _ in 0..500 {
            let mut model = vec![0u8; 64 << 10];
            let start = rng.random_range(0..8192u64);
            let len = rng.random_range(1..3000u64);
            let first: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            model[start as usize..(start + len) as usize].copy_from_slice(&first);
            let mut run = Merged::new(0, ByteRange::new(start, len), buf(&first), false);
            for handle in 1..rng.random_range(1..20u64) {
                // Somewhere touching the run: overlapping, inside, or abutting either end.
                let len = rng.random_range(1..3000u64);
                let lowest = run.range.offset.saturating_sub(len);
                let offset = rng.random_range(lowest..=run.range.end());
                let range = ByteRange::new(offset, len);
                if range.end() > model.len() as u64 || !run.takes(range) {
                    continue;
                }
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                model[offset as usize..range.end() as usize].copy_from_slice(&data);
                let fua = rng.random_bool(0.1);
                run.absorb(handle, range, &data, fua, &mut pool);
            }
            assert_eq!(run.data.len() as u64, run.range.len);
            assert_eq!(
                &run.data[..],
                &model[run.range.offset as usize..run.range.end() as usize],
                "seed {seed}"
            );
            assert!(run.more.iter().all(|&h| h > run.first));
            assert!(run.more.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
