//! Replication pairs between two real agents on loopback (certificates made by the CLI):
//! the DR volume fills with the production data during the initial sync while fio writes,
//! follows every write, and ends identical.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, local_pair_state, sha256};
use blockrep_tests::{NbdClient, require_tool, run, sparse_file};

const MIB: u64 = 1 << 20;

/// Writes `len` bytes of a repeating pattern at `offset` of a file, before it is a volume.
fn prefill(path: &Path, offset: u64, len: u64, byte: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let chunk = vec![byte; MIB as usize];
    let mut at = 0;
    while at < len {
        file.write_all_at(&chunk, offset + at).unwrap();
        at += MIB;
    }
}

fn fio_verify(uri: &str, work: &Path, size_mib: u64, bs: &str) -> std::process::Child {
    Command::new("fio")
        .current_dir(work)
        .args([
            "--name=pair",
            "--ioengine=nbd",
            "--rw=randwrite",
            &format!("--bs={bs}"),
            "--iodepth=16",
            &format!("--size={size_mib}M"),
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={uri}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Waits until the production side has nothing left to send, then stops both agents
/// (the DR side applies what it staged before it exits) and compares the two volumes.
pub fn converge_and_compare(cluster: &mut TestCluster, pair: &str, prod: &Path, dr: &Path) {
    let production = cluster.nodes[0].name.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let state = local_pair_state(cluster.node(&production), pair);
        if state
            .as_ref()
            .is_some_and(|s| s["out_of_sync_bytes"] == 0 && s["replication_status"] == "active")
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| format!("--- {} ---\n{}", n.name, n.daemon().log_text()))
                .collect();
            panic!("the pair did not converge: {state:#?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(prod), sha256(dr), "production and DR volumes differ");
}

fn pair_replicates_fio_during_the_initial_sync(model: &str) {
    require_tool("fio");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 512 * MIB);
    sparse_file(&dr, 512 * MIB);
    // Data the initial sync has to copy, and old data on the DR side it has to replace.
    prefill(&prod, 300 * MIB, 64 * MIB, 0x5a);
    prefill(&dr, 100 * MIB, 16 * MIB, 0xee);
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);

    let (pair, job) = cluster.create_pair("p1", "prod,dr", "az1", model);
    let shown = cluster.pair(&pair);
    assert_eq!(shown["replication_model"], model);
    assert_eq!(shown["priority_station"], "az1");
    // fio writes 256 MiB (and verifies it) while the initial sync runs.
    let uri = cluster.node("node-a").daemon().nbd_uri("prod");
    let fio = fio_verify(&uri, dir.path(), 256, "64k");
    cluster.wait_job(&job, Duration::from_secs(300));
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = cluster.pair(&pair);
    assert_eq!(shown["status"], "available");
    assert_eq!(shown["replication_status"], "active");
    // Every daemon serves the whole API: node-b forwards to the coordinator on node-a.
    let from_b = cluster.node("node-b").cli_json(&["pair", "show", &pair]);
    assert_eq!(from_b["id"], pair.as_str());
    assert_eq!(from_b["volume_ids"], shown["volume_ids"]);
    let status_b = cluster.node("node-b").cli_json(&["status"]);
    assert_eq!(status_b["pairs"][0]["side"], "dr");
    // Metrics name the pair on both sides.
    let metrics = cluster.node("node-a").metrics();
    assert!(
        metrics.contains(&format!("blockrep_pair_sent_bytes_total{{pair=\"{pair}\"")),
        "{metrics}"
    );
    assert!(
        cluster
            .node("node-b")
            .metrics()
            .contains("blockrep_pair_received_bytes_total")
    );
    // The DR export is read-only while it is the DR side: it says so, and a write gets
    // EPERM and changes nothing.
    let socket = cluster.node("node-b").daemon().nbd_socket("dr");
    let mut client = NbdClient::connect(&socket, "dr").unwrap();
    assert_ne!(client.transmission_flags & 2, 0, "READ_ONLY advertised");
    let before = client.read(0, 4096).unwrap();
    assert_eq!(client.write(0, &[0x77; 4096]).unwrap(), 1, "EPERM");
    assert_eq!(client.read(0, 4096).unwrap(), before);
    client.disconnect().unwrap();
    converge_and_compare(&mut cluster, &pair, &prod, &dr);
}

#[test]
fn an_async_pair_copies_and_follows_fio_writes() {
    pair_replicates_fio_during_the_initial_sync("async");
}

#[test]
fn a_hypermetro_pair_copies_and_follows_fio_writes() {
    pair_replicates_fio_during_the_initial_sync("hypermetro");
}

/// The same with a loop device under each volume.
#[test]
fn a_pair_of_loop_devices_ends_identical() {
    require_tool("fio");
    require_tool("losetup");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    let mut loops = Vec::new();
    for name in ["prod", "dr"] {
        let file = dir.path().join(format!("{name}.img"));
        blockrep_tests::preallocated(&file, 256 * MIB);
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&file));
        loops.push(LoopDevice(dev));
    }
    prefill(Path::new(&loops[0].0), 0, 32 * MIB, 0x42);
    cluster.add_volume("node-a", "prod", Path::new(&loops[0].0));
    cluster.add_volume("node-b", "dr", Path::new(&loops[1].0));
    let (pair, job) = cluster.create_pair("loops", "prod,dr", "az1", "async");
    let uri = cluster.node("node-a").daemon().nbd_uri("prod");
    let fio = fio_verify(&uri, dir.path(), 128, "4k");
    cluster.wait_job(&job, Duration::from_secs(300));
    assert!(fio.wait_with_output().unwrap().status.success());
    converge_and_compare(
        &mut cluster,
        &pair,
        Path::new(&loops[0].0),
        Path::new(&loops[1].0),
    );
}

/// Detaches a loop device when the test ends, however it ends.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
