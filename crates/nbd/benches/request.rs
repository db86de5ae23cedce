//! NBD request header parsing.

use std::hint::black_box;

use blockrep_nbd::proto::{REQUEST_HEADER_LEN, Request, put_simple_reply};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    header[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    header[7] = 1; // WRITE
    header[16..24].copy_from_slice(&(1u64 << 30).to_be_bytes());
    header[24..28].copy_from_slice(&4096u32.to_be_bytes());
    c.bench_function("Request::parse", |b| {
        b.iter(|| black_box(Request::parse(black_box(&header))))
    });
    let mut out = Vec::with_capacity(1 << 16);
    c.bench_function("put_simple_reply", |b| {
        b.iter(|| {
            if out.len() > 60_000 {
                out.clear();
            }
            put_simple_reply(&mut out, 0, black_box(42));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
