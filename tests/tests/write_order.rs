//! Overlapping writes from different connections behave as if applied in some serial order:
//! a read-modify-write of a partial block never writes stale bytes back over a newer write
//! into the same block from another connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blockrep_tests::nbd::{CMD_WRITE, read_reply, request};
use blockrep_tests::{Daemon, NbdClient, preallocated};

const ITERATIONS: u32 = 1500;

/// Connection A keeps rewriting the first 512 bytes of block 0 (an unaligned write: a
/// read-modify-write of the block), several at a time. Connection B writes the whole block
/// with a new value, waits for the answer and reads it back: bytes 512..4096 are written by
/// B alone, so they must hold B's latest value every time.
fn race(cache: &str) -> u32 {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    preallocated(&image, 16 << 20);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.cli_json(&[
        "volume",
        "add",
        "--name",
        "vol1",
        "--cache",
        cache,
        "--path",
        image.to_str().unwrap(),
    ]);
    let socket = daemon.nbd_socket("vol1");
    let stop = Arc::new(AtomicBool::new(false));
    let a = {
        let stop = Arc::clone(&stop);
        let client = NbdClient::connect(&socket, "vol1").unwrap();
        std::thread::spawn(move || {
            let mut writer = client.stream.try_clone().unwrap();
            let mut reader = client.stream;
            let mut frame = request(CMD_WRITE, 0, 0, 0, 512);
            frame.extend_from_slice(&[0xaa; 512]);
            let mut written = 0u64;
            // Four writes in flight at a time.
            for _ in 0..4 {
                std::io::Write::write_all(&mut writer, &frame).unwrap();
            }
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(read_reply(&mut reader).unwrap().error, 0);
                std::io::Write::write_all(&mut writer, &frame).unwrap();
                written += 1;
            }
            for _ in 0..4 {
                assert_eq!(read_reply(&mut reader).unwrap().error, 0);
            }
            written
        })
    };
    let mut b = NbdClient::connect(&socket, "vol1").unwrap();
    let mut lost = 0;
    for i in 0..ITERATIONS {
        let value = (i % 200) as u8 + 1;
        assert_eq!(b.write(0, &[value; 4096]).unwrap(), 0);
        let back = b.read(0, 4096).unwrap();
        if back[512..].iter().any(|&byte| byte != value) {
            lost += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let a_writes = a.join().unwrap();
    eprintln!(
        "{cache}: {lost} lost updates in {ITERATIONS} iterations against {a_writes} unaligned writes"
    );
    assert!(a_writes > 100, "connection A must actually race B");
    b.disconnect().unwrap();
    daemon.stop().unwrap();
    lost
}

#[test]
fn an_unaligned_write_never_undoes_an_aligned_write_from_another_connection_direct() {
    assert_eq!(race("direct"), 0, "lost updates on a direct volume");
}

#[test]
fn an_unaligned_write_never_undoes_an_aligned_write_from_another_connection_writeback() {
    assert_eq!(race("writeback"), 0, "lost updates on a writeback volume");
}
