//! A real file system on each of a group's two volumes (ext4 through nbdfuse + a loop
//! device), files written and synced on both while the group replicates asynchronously,
//! the production agents killed with `kill -9`, and a failover: both DR file systems pass
//! `fsck -n` (after the journal replay a mount does) and hold every file synced before the
//! consistent point the failover reached, with its content.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use blockrep_tests::cluster::{TestCluster, wait_until};
use blockrep_tests::group::{create_group, group_action, wait_consistent};
use blockrep_tests::{preallocated, require_tool, run, seed};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const FILE_BYTES: usize = 96 * 1024;

/// What the test mounted, torn down in reverse order whatever happens (lazily: the NBD
/// server behind a mount may be dead).
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse_mounts: Vec<PathBuf>,
    nbdfuse: Vec<Child>,
}

impl Cleanup {
    fn unmount_all(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for l in self.loops.drain(..).rev() {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        for m in self.fuse_mounts.drain(..).rev() {
            let _ = Command::new("fusermount3").arg("-uz").arg(&m).status();
        }
        for mut child in self.nbdfuse.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// Serves `uri` as a FUSE file with nbdfuse, attaches a loop device to it (direct I/O) and
/// returns the device.
fn block_device(cleanup: &mut Cleanup, mountpoint: &Path, uri: &str) -> String {
    std::fs::create_dir_all(mountpoint).unwrap();
    let pidfile = mountpoint.with_extension("pid");
    let _ = std::fs::remove_file(&pidfile);
    let mut child = Command::new("nbdfuse")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg(mountpoint)
        .arg(uri)
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdfuse");
    wait_until(Duration::from_secs(30), "nbdfuse to serve", || {
        assert!(child.try_wait().unwrap().is_none(), "nbdfuse exited early");
        pidfile.exists()
    });
    cleanup.nbdfuse.push(child);
    cleanup.fuse_mounts.push(mountpoint.to_owned());
    let dev = run(Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(mountpoint.join("nbd")));
    cleanup.loops.push(dev.clone());
    dev
}

fn mount(cleanup: &mut Cleanup, dev: &str, at: &Path) {
    std::fs::create_dir_all(at).unwrap();
    run(Command::new("mount").arg(dev).arg(at));
    cleanup.mounts.push(at.to_owned());
}

/// File `n`'s content: seeded bytes.
fn content(seed: u64, n: u64) -> Vec<u8> {
    let mut x = (seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut out = vec![0u8; FILE_BYTES];
    for chunk in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn ext4_on_two_grouped_volumes_is_clean_after_a_failover_and_holds_every_synced_file() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (loop devices, mounts)"
    );
    for tool in [
        "losetup",
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "e2fsck",
        "mount",
    ] {
        require_tool(tool);
    }
    let seed = seed(0x9_4001);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(
        dir.path(),
        &[
            ("node-co", "az3"),
            ("node-a", "az1"),
            ("node-c", "az1"),
            ("node-b", "az2"),
        ],
        "[replication]\nepoch_interval_ms = 200\n",
    );
    let image = |v: &str| dir.path().join(format!("{v}.img"));
    for (node, v) in [
        ("node-a", "p1"),
        ("node-c", "p2"),
        ("node-b", "d1"),
        ("node-b", "d2"),
    ] {
        preallocated(&image(v), 128 * MIB);
        cluster.add_volume(node, v, &image(v));
    }
    create_group(
        &cluster,
        "fs",
        &[("fs1", "p1,d1"), ("fs2", "p2,d2")],
        "async",
    );
    wait_consistent(&cluster, "fs", Duration::from_secs(120));

    // Two file systems, made and mounted through the production exports.
    let mut cleanup = Cleanup::default();
    let mounts: Vec<PathBuf> = [("node-a", "p1"), ("node-c", "p2")]
        .iter()
        .map(|(node, v)| {
            let dev = block_device(
                &mut cleanup,
                &dir.path().join(format!("fuse-{v}")),
                &cluster.node(node).daemon().nbd_uri(v),
            );
            run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
            let at = dir.path().join(format!("mnt-{v}"));
            mount(&mut cleanup, &dev, &at);
            at
        })
        .collect();
    // The file systems exist on the DR side too before anything is checked: wait until an
    // epoch cut after mkfs is committed.
    let made = now_ms();
    wait_until(Duration::from_secs(60), "a commit after mkfs", || {
        let g = cluster.coordinator().cli_json(&["group", "show", "fs"]);
        g["consistent_at"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64
                    > made
            })
    });

    // Files on both, each synced; when each sync returned is recorded.
    let mut synced: Vec<(u64, usize, u64)> = Vec::new(); // (file, volume, sync returned at)
    let until = std::time::Instant::now() + Duration::from_millis(rng.random_range(1000..3000));
    let mut n = 0u64;
    while std::time::Instant::now() < until {
        let volume = (n % 2) as usize;
        let path = mounts[volume].join(format!("file-{n:05}"));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&content(seed, n)).unwrap();
        f.sync_all().unwrap();
        synced.push((n, volume, now_ms()));
        n += 1;
    }
    // The production zone fails with the file systems mounted.
    for node in ["node-a", "node-c"] {
        cluster.node_mut(node).kill9();
    }
    cleanup.unmount_all();

    let job = group_action(&cluster, "fs", "failover", Duration::from_secs(60));
    let group = cluster.coordinator().cli_json(&["group", "show", "fs"]);
    let point = group["consistent_at"].as_str().expect("a consistent point");
    let point_ms = humantime::parse_rfc3339(point)
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let before: Vec<&(u64, usize, u64)> =
        synced.iter().filter(|(_, _, at)| *at < point_ms).collect();
    eprintln!(
        "{} files synced, {} of them before the consistent point {point}; {}",
        synced.len(),
        before.len(),
        job["result"]
    );

    // The DR volumes, now production, through their exports: the mount replays the
    // journal, then fsck finds nothing to fix, and every file synced before the point is
    // there, whole.
    for (volume, v) in ["d1", "d2"].iter().enumerate() {
        let dev = block_device(
            &mut cleanup,
            &dir.path().join(format!("fuse-{v}")),
            &cluster.node("node-b").daemon().nbd_uri(v),
        );
        let at = dir.path().join(format!("mnt-{v}"));
        mount(&mut cleanup, &dev, &at);
        for (file, _, _) in before.iter().filter(|(_, vol, _)| *vol == volume) {
            let got = std::fs::read(at.join(format!("file-{file:05}")))
                .unwrap_or_else(|e| panic!("seed {seed}: file-{file:05} on {v}: {e}"));
            assert!(
                got == content(seed, *file),
                "seed {seed}: file-{file:05} on {v} differs"
            );
        }
        run(Command::new("umount").arg(&at));
        cleanup.mounts.pop();
        let fsck = Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&dev)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "seed {seed}: fsck -n of {v}: {}\n{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
    }
    cleanup.unmount_all();
    for node in ["node-b", "node-co"] {
        cluster.node_mut(node).stop();
    }
}

/// The newest point of group `group` cut after `after_ms`, once there is one.
fn point_cut_after(cluster: &TestCluster, group: &str, after_ms: u64) -> u64 {
    let mut found = 0;
    wait_until(
        Duration::from_secs(60),
        "a point cut after the writes",
        || {
            let listed = cluster.coordinator().cli_json(&["group", "points", group]);
            let newest = listed["points"].as_array().and_then(|p| p.last()).cloned();
            newest.is_some_and(|p| {
                let cut_ms = humantime::parse_rfc3339(p["cut_at"].as_str().unwrap_or(""))
                    .map(|t| {
                        t.duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap()
                            .as_millis() as u64
                    })
                    .unwrap_or(0);
                found = p["epoch"].as_u64().unwrap_or(0);
                cut_ms > after_ms
            })
        },
    );
    found
}

/// Checks the ext4 file system on `dev`: every file of `files` (file, volume) on `volume`
/// holds its content, and `fsck -n` finds nothing to fix.
fn check_files(
    cleanup: &mut Cleanup,
    dev: &str,
    at: &Path,
    files: &[(u64, usize)],
    volume: usize,
    seed: u64,
    what: &str,
) {
    mount(cleanup, dev, at);
    for (file, _) in files.iter().filter(|(_, vol)| *vol == volume) {
        let got = std::fs::read(at.join(format!("file-{file:05}")))
            .unwrap_or_else(|e| panic!("seed {seed}: {what}: file-{file:05}: {e}"));
        assert!(
            got == content(seed, *file),
            "seed {seed}: {what}: file-{file:05} is not its original content"
        );
    }
    run(Command::new("umount").arg(at));
    cleanup.mounts.pop();
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(dev)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "seed {seed}: {what}: fsck -n: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// Points in time against "ransomware" (docs/POINT-IN-TIME.md): files are written on ext4
/// on the group's two volumes, then a pass overwrites every one of them and replicates. A
/// drill at the point before the pass mounts clean with the original files; the group then
/// fails over to that point, and the DR file systems are clean with the original files.
#[test]
fn ext4_overwritten_by_ransomware_comes_back_from_the_point_before_it() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (loop devices, mounts)"
    );
    for tool in [
        "losetup",
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "e2fsck",
        "mount",
    ] {
        require_tool(tool);
    }
    let seed = seed(0x9_4002);
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        dir.path(),
        &[
            ("node-co", "az3"),
            ("node-a", "az1"),
            ("node-c", "az1"),
            ("node-b", "az2"),
        ],
        "[replication]\nepoch_interval_ms = 200\n",
    );
    let image = |v: &str| dir.path().join(format!("{v}.img"));
    for (node, v) in [
        ("node-a", "p1"),
        ("node-c", "p2"),
        ("node-b", "d1"),
        ("node-b", "d2"),
    ] {
        preallocated(&image(v), 64 * MIB);
        cluster.add_volume(node, v, &image(v));
    }
    create_group(
        &cluster,
        "fs",
        &[("fs1", "p1,d1"), ("fs2", "p2,d2")],
        "async",
    );
    cluster
        .coordinator()
        .cli_json(&["group", "update", "fs", "--retention", "1h"]);
    wait_consistent(&cluster, "fs", Duration::from_secs(120));

    let mut cleanup = Cleanup::default();
    let devices: Vec<String> = [("node-a", "p1"), ("node-c", "p2")]
        .iter()
        .map(|(node, v)| {
            let dev = block_device(
                &mut cleanup,
                &dir.path().join(format!("fuse-{v}")),
                &cluster.node(node).daemon().nbd_uri(v),
            );
            run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
            dev
        })
        .collect();
    let mounts: Vec<PathBuf> = ["p1", "p2"]
        .iter()
        .zip(&devices)
        .map(|(v, dev)| {
            let at = dir.path().join(format!("mnt-{v}"));
            mount(&mut cleanup, dev, &at);
            at
        })
        .collect();
    let files: Vec<(u64, usize)> = (0..40).map(|n| (n, (n % 2) as usize)).collect();
    for &(n, volume) in &files {
        let mut f = std::fs::File::create(mounts[volume].join(format!("file-{n:05}"))).unwrap();
        f.write_all(&content(seed, n)).unwrap();
        f.sync_all().unwrap();
    }
    run(&mut Command::new("sync"));
    let clean = point_cut_after(&cluster, "fs", now_ms());

    // The "ransomware" pass: every file overwritten in place, and synced.
    for &(n, volume) in &files {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(mounts[volume].join(format!("file-{n:05}")))
            .unwrap();
        f.write_all(&vec![0xe5; FILE_BYTES]).unwrap();
        f.sync_all().unwrap();
    }
    run(&mut Command::new("sync"));
    let damaged = point_cut_after(&cluster, "fs", now_ms());
    eprintln!("seed {seed}: files clean at point {clean}, overwritten by point {damaged}");

    // A drill at the clean point, while the group replicates.
    let drill = cluster.coordinator().cli_json(&[
        "group",
        "drill",
        "create",
        "fs",
        "--name",
        "before",
        "--point",
        &clean.to_string(),
    ]);
    assert_eq!(drill["point_epoch"], clean, "{drill}");
    for (volume, pair) in ["fs1", "fs2"].iter().enumerate() {
        let export = format!("before-{pair}");
        let socket = cluster.node("node-b").daemon().nbd_socket(&export);
        let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
        let dev = block_device(
            &mut cleanup,
            &dir.path().join(format!("fuse-drill-{pair}")),
            &uri,
        );
        let at = dir.path().join(format!("mnt-drill-{pair}"));
        check_files(
            &mut cleanup,
            &dev,
            &at,
            &files,
            volume,
            seed,
            &format!("drill {export}"),
        );
    }

    // The application stops; the group fails over to the clean point.
    for m in &mounts {
        run(Command::new("umount").arg(m));
    }
    cleanup.unmount_all();
    let started =
        cluster
            .coordinator()
            .cli_json(&["group", "failover", "fs", "--point", &clean.to_string()]);
    let job = started["job_id"].as_str().expect("a job").to_owned();
    cluster.wait_job(&job, Duration::from_secs(60));
    let job = cluster.coordinator().cli_json(&["job", "show", &job]);
    eprintln!("seed {seed}: {}", job["result"]);
    for (volume, v) in ["d1", "d2"].iter().enumerate() {
        let dev = block_device(
            &mut cleanup,
            &dir.path().join(format!("fuse-{v}")),
            &cluster.node("node-b").daemon().nbd_uri(v),
        );
        let at = dir.path().join(format!("mnt-{v}"));
        check_files(&mut cleanup, &dev, &at, &files, volume, seed, v);
    }
    cleanup.unmount_all();
}
