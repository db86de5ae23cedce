//! The write path's bookkeeping: tracker admission into a hot region, and CRC32 of extents
//! (the per-extent checksum replication will carry).

use std::hint::black_box;

use blockrep_core::ByteRange;
use blockrep_volume::{DirtyTracker, TrackerConfig};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (tracker, _) =
        DirtyTracker::open(dir.path(), 1 << 30, TrackerConfig::default()).expect("tracker");
    // Warm: every region of the first 64 MiB is in the durable activity log.
    tracker
        .admit(&[ByteRange::new(0, 64 << 20)])
        .expect("admit");
    c.bench_function("DirtyTracker::admit 4k, hot region", |b| {
        let mut offset = 0;
        b.iter(|| {
            tracker
                .admit(&[ByteRange::new(offset, 4096)])
                .expect("admit");
            offset = (offset + 4096) % (64 << 20);
        })
    });
    c.bench_function("DirtyTracker::admit batch of 32 × 4k, hot regions", |b| {
        let ranges: Vec<_> = (0..32)
            .map(|i| ByteRange::new(i * 1_970_176 % (64 << 20) / 4096 * 4096, 4096))
            .collect();
        b.iter(|| tracker.admit(black_box(&ranges)).expect("admit"))
    });

    let mut group = c.benchmark_group("crc32");
    for size in [4096usize, 65536, 1 << 20] {
        let data = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size} bytes"), |b| {
            b.iter(|| black_box(crc32fast::hash(black_box(&data))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
