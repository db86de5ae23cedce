//! Inputs the fuzzer found (`fuzz/fuzz_targets/nbd_requests.rs`), replayed against the
//! transmission loop over a socket pair: each must be answered or end the connection, never
//! panic it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use blockrep_nbd::{Connection, Negotiated};
use blockrep_volume::{Backing, Volume};

mod common;
use common::request;

const SIZE: u64 = 1 << 20;

/// Serves `input` to a fresh connection and returns every simple reply's (error, handle).
fn serve(input: &[u8]) -> Vec<(u32, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let backing = Backing::open(&path, blockrep_core::CacheMode::Writeback).unwrap();
    let volume = Arc::new(Volume::new("v".into(), backing, None));
    let (mut client, server) = UnixStream::pair().unwrap();
    let serving = std::thread::spawn(move || {
        let negotiated = Negotiated::default();
        Connection::new(server.as_raw_fd(), volume, negotiated)
            .unwrap()
            .run()
            .map(|_| drop(server))
    });
    client.write_all(input).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut replies = Vec::new();
    client.read_to_end(&mut replies).unwrap();
    serving
        .join()
        .expect("the connection's thread ended without a panic")
        .unwrap();
    replies
        .chunks_exact(16)
        .map(|r| {
            (
                u32::from_be_bytes(r[4..8].try_into().unwrap()),
                u64::from_be_bytes(r[8..16].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn a_flush_whose_offset_and_length_wrap_is_answered() {
    // FLUSH ignores its offset and length; building a range of them wrapped past u64::MAX.
    let mut input = request(3, 1, u64::MAX - 8, 4096);
    input.extend(request(2, 0, 0, 0)); // DISC
    assert_eq!(serve(&input), vec![(0, 1)]);
}
