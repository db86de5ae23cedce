//! Dirty map set/clear/iterate over realistic patterns.

use std::hint::black_box;

use blockrep_core::{ByteRange, DirtyMap, Granularity};
use criterion::{Criterion, criterion_group, criterion_main};

const TIB: u64 = 1 << 40;
const BLOCK: u64 = 4096;

/// Deterministic offsets: a xorshift sequence over a TiB, 4k-aligned.
fn offsets(n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (TIB / BLOCK)) * BLOCK
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let random = offsets(4096);
    let mut map = DirtyMap::new(TIB, Granularity::DEFAULT);
    c.bench_function("set_range 4k random over 1 TiB", |b| {
        let mut i = 0;
        b.iter(|| {
            map.set_range(ByteRange::new(random[i % random.len()], BLOCK));
            i += 1;
        })
    });
    c.bench_function("set_range 1 MiB sequential", |b| {
        let mut offset = 0;
        b.iter(|| {
            map.set_range(ByteRange::new(offset, 1 << 20));
            offset = (offset + (1 << 20)) % TIB;
        })
    });
    c.bench_function("clear_range 4k random over 1 TiB", |b| {
        let mut i = 0;
        b.iter(|| {
            map.clear_range(ByteRange::new(random[i % random.len()], BLOCK));
            i += 1;
        })
    });

    // Iterating: 100k scattered 4k blocks in a 1 TiB map, and a dense 1 GiB run.
    let mut sparse = DirtyMap::new(TIB, Granularity::DEFAULT);
    for offset in offsets(100_000) {
        sparse.set_range(ByteRange::new(offset, BLOCK));
    }
    c.bench_function("runs: 100k scattered blocks in 1 TiB", |b| {
        b.iter(|| black_box(sparse.runs().count()))
    });
    let mut dense = DirtyMap::new(TIB, Granularity::DEFAULT);
    dense.set_range(ByteRange::new(0, 1 << 30));
    c.bench_function("runs: one 1 GiB run in 1 TiB", |b| {
        b.iter(|| black_box(dense.runs().count()))
    });
    c.bench_function("take_changed_pages after 4096 random sets", |b| {
        b.iter(|| {
            for &offset in &random {
                sparse.set_range(ByteRange::new(offset, BLOCK));
                sparse.clear_range(ByteRange::new(offset, BLOCK));
            }
            black_box(sparse.take_changed_pages().len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
