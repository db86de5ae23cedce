//! The state directory's file system fills up. Writes to a volume go on, tracked (the dirty
//! bitmap and activity log are allocated whole when a volume comes online, so recording a
//! write needs no new space); a write that needs a new record gets a clear error; an
//! operation that needs space fails naming what is full; a restart with the file system
//! still full loses none of the recorded dirty blocks; freeing space is enough to go on.

use blockrep_tests::small_fs::SmallFs;
use blockrep_tests::{Daemon, NbdClient, preallocated};

const MIB: u64 = 1 << 20;
/// NBD's error number for a full device.
const NBD_ENOSPC: u32 = 28;

fn is_dirty(dirty: &[(u64, u64)], offset: u64) -> bool {
    dirty.iter().any(|&(o, l)| o <= offset && offset < o + l)
}

#[test]
fn a_full_state_directory_tracks_writes_says_what_is_full_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&dir.path().join("state"), "8M");
    let image = dir.path().join("vol.img");
    preallocated(&image, 64 * MIB);
    let fresh = dir.path().join("fresh.img");
    preallocated(&fresh, 16 * MIB);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("vol1", &image);
    // Never written: its first write must record that its generation holds data.
    daemon.add_volume("fresh", &fresh);
    let socket = daemon.nbd_socket("vol1");
    let mut client = NbdClient::connect(&socket, "vol1").unwrap();
    assert_eq!(client.write(0, &[1; 4096]).unwrap(), 0);

    let filler = fs.fill();
    // A write that needs a new record is refused with ENOSPC (not a bare EIO), and the log
    // says which file of the state directory could not be written.
    let mut fresh_client = NbdClient::connect(&daemon.nbd_socket("fresh"), "fresh").unwrap();
    assert_eq!(
        fresh_client.write(0, &[9; 4096]).unwrap(),
        NBD_ENOSPC,
        "the first write of a volume with the state directory full"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("lineage.json") && log.contains("No space left on device"),
        "{log}"
    );
    // Writes go on, tracked.
    for i in 1..200u64 {
        assert_eq!(
            client.write(i * 64 * 1024, &[2; 4096]).unwrap(),
            0,
            "write {i} with the state directory full"
        );
    }
    client.disconnect().unwrap();
    let dirty = daemon.dirty_extents("vol1");
    assert!((0..200u64).all(|i| is_dirty(&dirty, i * 64 * 1024)));

    // What needs space fails, saying what is full.
    let other = dir.path().join("other.img");
    preallocated(&other, 16 * MIB);
    let out = daemon.cli(&[
        "volume",
        "add",
        "--name",
        "vol2",
        "--path",
        other.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left on device") && err.contains(fs.at.to_str().unwrap()),
        "{err}"
    );

    // A crash and a restart with the file system still full: nothing recorded is lost.
    daemon.kill9();
    let daemon = Daemon::start(dir.path(), "").unwrap();
    let dirty = daemon.dirty_extents("vol1");
    assert!(
        (0..200u64).all(|i| is_dirty(&dirty, i * 64 * 1024)),
        "dirty blocks lost: {dirty:?}"
    );
    let mut client = NbdClient::connect(&socket, "vol1").unwrap();
    assert_eq!(client.write(300 * 64 * 1024, &[3; 4096]).unwrap(), 0);
    client.disconnect().unwrap();

    // Room again: what needed it works.
    std::fs::remove_file(filler).unwrap();
    let added = daemon.add_volume("vol2", &other);
    assert_eq!(added["name"], "vol2");
    let mut fresh_client = NbdClient::connect(&daemon.nbd_socket("fresh"), "fresh").unwrap();
    assert_eq!(fresh_client.write(0, &[9; 4096]).unwrap(), 0);
    fresh_client.disconnect().unwrap();
    daemon.stop().unwrap();
}
