//! Sub-block writes sent pipelined (none waits for the one before) are merged into fewer
//! read-modify-writes; whatever the merging, the volume holds what applying them one by one
//! in the order sent holds, and every request gets exactly one answer.

use std::io::{Read, Write};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

mod common;
use common::{SIZE, client, reply, request, volume};

/// The part of the volume the writes land in.
const WINDOW: u64 = 256 << 10;

#[test]
fn pipelined_sub_block_writes_hold_the_writes_in_the_order_sent() {
    let seed = std::env::var("BLOCKREP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0b10c);
    eprintln!("seed {seed}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let volume = volume(dir.path());
    let (mut c, server) = client(&volume);
    let mut model = vec![0u8; WINDOW as usize];
    let base = SIZE - WINDOW;
    let mut sent = 0u64;
    for round in 0..20 {
        // A burst sent at once: runs of sequential 1 KiB writes, overlapping odd-sized
        // ones, and whole blocks among them.
        let mut burst = Vec::new();
        let first = sent;
        let mut at = rng.random_range(0..WINDOW / 2);
        for _ in 0..rng.random_range(20..200) {
            let len = match rng.random_range(0..10) {
                0 => 4096,
                1..=6 => 1024,
                _ => rng.random_range(1..6000),
            };
            let offset = match rng.random_range(0..4) {
                0 => rng.random_range(0..WINDOW - len),
                _ => at.min(WINDOW - len),
            };
            at = offset + len;
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            burst.extend_from_slice(&request(1, sent, base + offset, len as u32));
            burst.extend_from_slice(&data);
            sent += 1;
        }
        c.write_all(&burst).unwrap();
        let mut answered = std::collections::BTreeSet::new();
        for _ in first..sent {
            let (error, handle) = reply(&mut c);
            assert_eq!(error, 0, "round {round}, request {handle}: seed {seed}");
            assert!(answered.insert(handle), "request {handle} answered twice");
        }
        assert!(
            answered.iter().copied().eq(first..sent),
            "round {round}: answers to {answered:?}, not to each of {first}..{sent}"
        );
    }
    // Every request answered once; the volume holds the serial result.
    c.write_all(&request(0, u64::MAX, base, WINDOW as u32))
        .unwrap();
    assert_eq!(reply(&mut c), (0, u64::MAX));
    let mut held = vec![0u8; WINDOW as usize];
    c.read_exact(&mut held).unwrap();
    assert!(
        held == model,
        "the volume differs from the writes applied in order: seed {seed}"
    );
    c.write_all(&request(2, 0, 0, 0)).unwrap();
    server.join().unwrap();
}
