//! Structured replies and NBD_CMD_BLOCK_STATUS (`base:allocation`): allocation maps through
//! nbdinfo and qemu-img match the backing file, and sparse copies read only what is there.

use std::path::Path;
use std::process::Command;

use blockrep_tests::{Daemon, require_tool, run, sparse_file};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 2048 * MIB;
/// (offset, length) of the data written into the sparse volume: 2 MiB in all.
const WRITTEN: [(u64, u64); 3] = [(0, MIB / 2), (700 * MIB, MIB), (SIZE - MIB / 2, MIB / 2)];

/// The file's data runs, from SEEK_DATA/SEEK_HOLE.
fn data_runs(path: &Path) -> Vec<(u64, u64)> {
    use nix::unistd::{Whence, lseek};
    let file = std::fs::File::open(path).unwrap();
    let fd = &file;
    let size = file.metadata().unwrap().len();
    let mut runs = Vec::new();
    let mut at = 0i64;
    while (at as u64) < size {
        let Ok(data) = lseek(fd, at, Whence::SeekData) else {
            break;
        };
        let hole = lseek(fd, data, Whence::SeekHole).unwrap();
        runs.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    runs
}

fn same_content(a: &Path, b: &Path) {
    run(Command::new("cmp").arg(a).arg(b));
}

fn bytes_read(daemon: &Daemon) -> u64 {
    daemon.cli_json(&["volume", "show", "vol1"])["bytes_read"]
        .as_u64()
        .unwrap()
}

fn setup(dir: &Path) -> (Daemon, std::path::PathBuf) {
    let image = dir.join("vol.img");
    sparse_file(&image, SIZE);
    let daemon = Daemon::start(dir, "").unwrap();
    daemon.add_volume("vol1", &image);
    let mut writes = Vec::new();
    for (i, (offset, len)) in WRITTEN.iter().enumerate() {
        writes.push("-c".to_owned());
        writes.push(format!("write -P {} {offset} {len}", i + 1));
    }
    run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(&writes)
        .arg(daemon.nbd_uri("vol1")));
    (daemon, image)
}

#[test]
fn nbdinfo_map_and_qemu_img_map_match_the_backing_file() {
    require_tool("nbdinfo");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (daemon, image) = setup(dir.path());
    let expected = data_runs(&image);
    let allocated: u64 = expected.iter().map(|(_, l)| l).sum();
    assert!(
        (2 * MIB..=3 * MIB).contains(&allocated),
        "the file holds about the 2 MiB written: {expected:?}"
    );

    // nbdinfo --map: one entry per extent, type 0 for data, 3 for hole+zero.
    let map = run(Command::new("nbdinfo")
        .args(["--map", "--json"])
        .arg(daemon.nbd_uri("vol1")));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut covered = 0;
    for e in map.as_array().unwrap() {
        let (offset, length) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(offset, covered, "extents are contiguous");
        covered += length;
        match e["type"].as_u64().unwrap() {
            0 => data.push((offset, length)),
            3 => {}
            other => panic!("unexpected extent type {other}: {e}"),
        }
    }
    assert_eq!(covered, SIZE);
    assert_eq!(
        data, expected,
        "nbdinfo --map agrees with SEEK_DATA on the file"
    );

    // qemu-img map over NBD agrees with qemu-img map of the file itself.
    let map_of = |target: &str| -> Vec<(u64, u64, bool)> {
        let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", target]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for e in v.as_array().unwrap() {
            let (start, length) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            let is_data = e["data"].as_bool().unwrap() && !e["zero"].as_bool().unwrap();
            match runs.last_mut() {
                Some(last) if last.2 == is_data && last.0 + last.1 == start => last.1 += length,
                _ => runs.push((start, length, is_data)),
            }
        }
        runs
    };
    let through_nbd = map_of(&daemon.nbd_uri("vol1"));
    let of_file = map_of(image.to_str().unwrap());
    assert_eq!(
        through_nbd, of_file,
        "qemu-img map over NBD and of the file"
    );
    daemon.stop().unwrap();
}

#[test]
fn sparse_copies_read_only_the_allocated_bytes() {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (daemon, image) = setup(dir.path());
    let allocated: u64 = data_runs(&image).iter().map(|(_, l)| l).sum();
    let limit = allocated + allocated / 20;

    let before = bytes_read(&daemon);
    let copy = dir.path().join("nbdcopy.img");
    run(Command::new("nbdcopy")
        .arg(daemon.nbd_uri("vol1"))
        .arg(&copy));
    let nbdcopy_read = bytes_read(&daemon) - before;
    eprintln!("nbdcopy read {nbdcopy_read} bytes of a volume with {allocated} allocated");
    assert!(
        nbdcopy_read <= limit,
        "nbdcopy read {nbdcopy_read} bytes, allocated {allocated}"
    );
    same_content(&copy, &image);
    std::fs::remove_file(&copy).unwrap();

    let before = bytes_read(&daemon);
    let converted = dir.path().join("converted.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(daemon.nbd_uri("vol1"))
        .arg(&converted));
    let convert_read = bytes_read(&daemon) - before;
    eprintln!("qemu-img convert read {convert_read} bytes of a volume with {allocated} allocated");
    assert!(
        convert_read <= limit,
        "qemu-img convert read {convert_read} bytes, allocated {allocated}"
    );
    same_content(&converted, &image);
    daemon.stop().unwrap();
}
