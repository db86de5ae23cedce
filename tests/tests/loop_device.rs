//! The kernel path: a loop device (direct I/O) as the volume, and the export turned back into
//! a block device with nbdfuse + losetup, formatted, mounted and written through blockrepd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockrep_tests::{Daemon, preallocated, require_tool, run};

const MIB: u64 = 1 << 20;

/// Everything the test set up, torn down in reverse order whatever happens.
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse_mounts: Vec<PathBuf>,
    nbdfuse: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
        }
        for l in self.loops.drain(..).rev() {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        for m in self.fuse_mounts.drain(..).rev() {
            let _ = Command::new("fusermount3").arg("-u").arg(&m).status();
        }
        for mut child in self.nbdfuse.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn attach_loop(cleanup: &mut Cleanup, file: &Path) -> String {
    let dev = run(Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(file));
    cleanup.loops.push(dev.clone());
    dev
}

/// Waits for a condition with a deadline, checking it every few milliseconds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts nbdfuse in the foreground and waits for its pid file, which it writes once the
/// FUSE file is being served.
fn start_nbdfuse(cleanup: &mut Cleanup, mountpoint: &Path, uri: &str) -> PathBuf {
    std::fs::create_dir_all(mountpoint).unwrap();
    let pidfile = mountpoint.with_extension("pid");
    let mut child = Command::new("nbdfuse")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg(mountpoint)
        .arg(uri)
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdfuse");
    wait_until("nbdfuse to serve", || {
        assert!(child.try_wait().unwrap().is_none(), "nbdfuse exited early");
        pidfile.exists()
    });
    cleanup.nbdfuse.push(child);
    cleanup.fuse_mounts.push(mountpoint.to_owned());
    mountpoint.join("nbd")
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn ext4_on_nbdfuse_over_a_loop_device_volume() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (loop devices, mounts)"
    );
    for tool in [
        "losetup",
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "mount",
        "umount",
        "sha256sum",
    ] {
        require_tool(tool);
    }
    let seed = blockrep_tests::seed(7);
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();

    let backing = dir.path().join("backing.img");
    preallocated(&backing, 256 * MIB);
    let volume_dev = attach_loop(&mut cleanup, &backing);

    let daemon = Daemon::start(dir.path(), "").unwrap();
    let added = daemon.add_volume("kvol", Path::new(&volume_dev));
    assert_eq!(added["backing_kind"], "block-device");
    assert_eq!(added["direct_io"], true);
    assert_eq!(added["size_bytes"], 256 * MIB);

    let fuse_file = start_nbdfuse(
        &mut cleanup,
        &dir.path().join("fuse"),
        &daemon.nbd_uri("kvol"),
    );
    let kernel_dev = attach_loop(&mut cleanup, &fuse_file);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&kernel_dev));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").arg(&kernel_dev).arg(&mnt));
    cleanup.mounts.push(mnt.clone());

    // 24 MiB of seeded pseudo-random data, copied in and synced.
    let mut data = vec![0u8; 24 * MIB as usize];
    let mut x = seed | 1;
    for chunk in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let source = dir.path().join("data.bin");
    std::fs::write(&source, &data).unwrap();
    std::fs::copy(&source, mnt.join("data.bin")).unwrap();
    run(Command::new("sync").arg("-f").arg(mnt.join("data.bin")));
    let expected = sha256(&source);
    assert_eq!(sha256(&mnt.join("data.bin")), expected);

    // Unmount (drops the page cache) and mount again: the bytes come back through blockrepd.
    run(Command::new("umount").arg(&mnt));
    cleanup.mounts.clear();
    run(Command::new("mount").arg(&kernel_dev).arg(&mnt));
    cleanup.mounts.push(mnt.clone());
    assert_eq!(sha256(&mnt.join("data.bin")), expected);
    assert!(
        daemon.dirty_bytes("kvol") >= 24 * MIB,
        "the file's blocks are dirty"
    );

    drop(cleanup);
    daemon.stop().unwrap();
}
