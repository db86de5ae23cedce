//! The backing device fails: clients get the NBD error, the daemon stays up.

use blockrep_tests::nbd::{CMD_READ, CMD_WRITE};
use blockrep_tests::small_fs::SmallFs;
use blockrep_tests::{Daemon, NbdClient, sparse_file};

const MIB: u64 = 1 << 20;
const EIO: u32 = 5;
const ENOSPC: u32 = 28;

#[test]
fn a_full_device_answers_enospc_and_a_shrunken_file_answers_eio() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (mount)"
    );
    let dir = tempfile::tempdir().unwrap();
    let small = SmallFs::mount(&dir.path().join("small"), "1m");
    let mnt = small.at.clone();

    // 8 MiB sparse on a 1 MiB file system: writes past the first MiB cannot be stored.
    let full = mnt.join("full.img");
    sparse_file(&full, 8 * MIB);
    let shrinking = dir.path().join("shrinking.img");
    sparse_file(&shrinking, 8 * MIB);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("full", &full);
    daemon.add_volume("shrinking", &shrinking);

    let mut c = NbdClient::connect(&daemon.nbd_socket("full"), "full").unwrap();
    let chunk = vec![0x77u8; 256 * 1024];
    let errors: Vec<u32> = (0..8u64)
        .map(|i| {
            c.send(
                CMD_WRITE,
                0,
                i,
                i * chunk.len() as u64,
                chunk.len() as u32,
                &chunk,
            )
            .unwrap();
            c.reply().unwrap().error
        })
        .collect();
    assert!(
        errors.contains(&ENOSPC),
        "no write failed with ENOSPC: {errors:?}"
    );
    assert_eq!(
        c.read(0, 4096).unwrap(),
        vec![0x77; 4096],
        "the connection goes on"
    );

    // Reads past the end of a file truncated under the daemon fail with EIO.
    std::fs::File::options()
        .write(true)
        .open(&shrinking)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let mut c = NbdClient::connect(&daemon.nbd_socket("shrinking"), "shrinking").unwrap();
    c.send(CMD_READ, 0, 1, 6 * MIB, 65536, &[]).unwrap();
    assert_eq!(c.reply().unwrap().error, EIO);
    assert_eq!(
        c.read(0, 4096).unwrap(),
        vec![0; 4096],
        "the connection goes on"
    );

    assert_eq!(
        daemon.cli_json(&["status"])["volumes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    daemon.stop().unwrap();
}
