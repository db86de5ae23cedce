//! Async pairs: the DR volume is always a crash-consistent past image of production (a
//! prefix of a sequence of dependent writes); a corrupted extent is rejected and sent
//! again; a journal that overflows falls back to bitmap mode without slowing the
//! application to the link, and the pair converges once the writer stops; a client
//! connection abandoned with writes in flight does not stop the pair; compressed payloads
//! arrive whole.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blockrep_tests::cluster::{NetNs, TestCluster, local_pair_state, sha256, wait_until};
use blockrep_tests::nbd::CMD_WRITE;
use blockrep_tests::records::{RECORD, prefix_length, record};
use blockrep_tests::{NbdClient, require_tool, seed, sparse_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = RECORD;

#[test]
fn the_dr_volume_always_holds_a_prefix_of_dependent_writes() {
    let seed = seed(0x9e3779b9);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(
        dir.path(),
        &[("node-a", "az1"), ("node-b", "az2")],
        "[replication]\nepoch_interval_ms = 200\n",
    );
    let records: u64 = 16 * 1024; // 64 MiB of records
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, records * BLOCK);
    sparse_file(&dr, records * BLOCK);
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("chain", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));
    wait_until(
        Duration::from_secs(30),
        "the DR side to hold a consistent image",
        || {
            local_pair_state(cluster.node("node-b"), &pair)
                .is_some_and(|s| s["consistent_epoch"].as_u64().unwrap_or(0) > 0)
        },
    );

    // The writer: record n+1 is written only once record n was answered.
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    let writer = {
        let written = Arc::clone(&written);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(&socket, "prod").unwrap();
            for n in 0..records {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                assert_eq!(c.write(n * BLOCK, &record(n)).unwrap(), 0);
                written.store(n + 1, Ordering::Relaxed);
            }
            c.disconnect().unwrap();
        })
    };

    let mut last = 0;
    for round in 0..5 {
        // Stop the DR agent at a seeded moment while the writer runs, and read its volume.
        let at = written.load(Ordering::Relaxed) + rng.random_range(200..1500);
        wait_until(Duration::from_secs(60), "the writer to go on", || {
            written.load(Ordering::Relaxed) >= at.min(records)
        });
        cluster.node_mut("node-b").stop();
        let answered = written.load(Ordering::Relaxed);
        let held = prefix_length(&dr, records)
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        eprintln!("round {round}: the DR volume holds records 0..{held} of {answered} answered");
        assert!(
            held <= answered,
            "round {round}: more on DR than production answered"
        );
        assert!(
            held >= last,
            "round {round}: the DR image went back in time"
        );
        last = held;
        cluster.node_mut("node-b").start();
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let answered = written.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(120), "the pair to converge", || {
        local_pair_state(cluster.node("node-a"), &pair)
            .is_some_and(|s| s["out_of_sync_bytes"] == 0 && s["replication_status"] == "active")
    });
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(
        prefix_length(&dr, records).unwrap(),
        answered,
        "every answered record arrived"
    );
    assert_eq!(sha256(&prod), sha256(&dr));
}

#[test]
fn a_corrupted_extent_is_rejected_counted_and_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    // The production agent corrupts the 20th data extent it sends (test-only hook).
    cluster
        .node_mut("node-a")
        .restart_with_fault("BLOCKREP_FAULT_CORRUPT_EXTENT", "20");
    cluster.wait_nodes_alive();
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 128 * MIB);
    sparse_file(&dr, 128 * MIB);
    {
        let file = std::fs::OpenOptions::new().write(true).open(&prod).unwrap();
        for i in 0..48u64 {
            file.write_all_at(&vec![(i as u8) | 1; MIB as usize], i * 2 * MIB)
                .unwrap();
        }
    }
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("crc", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));
    wait_until(
        Duration::from_secs(30),
        "the rejection to be counted",
        || {
            local_pair_state(cluster.node("node-a"), &pair)
                .is_some_and(|s| s["counters"]["extents_rejected"].as_u64().unwrap() >= 1)
        },
    );
    let dr_state = local_pair_state(cluster.node("node-b"), &pair).unwrap();
    assert_eq!(
        dr_state["counters"]["extents_rejected"], 1,
        "the DR side rejected one"
    );
    wait_until(Duration::from_secs(60), "the pair to converge", || {
        local_pair_state(cluster.node("node-a"), &pair)
            .is_some_and(|s| s["out_of_sync_bytes"] == 0 && s["replication_status"] == "active")
    });
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr), "the extent was sent again");
}

/// fio's write IOPS from its JSON output.
fn fio_write_iops(output: &[u8]) -> f64 {
    let text = String::from_utf8_lossy(output);
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    json["jobs"][0]["write"]["iops"].as_f64().unwrap()
}

#[test]
fn an_overflowing_journal_falls_back_to_bitmap_mode_and_converges() {
    require_tool("fio");
    require_tool("nft");
    let ns = NetNs::new("ovf");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_in(
        dir.path(),
        &[("node-a", "az1"), ("node-b", "az2")],
        "[replication]\njournal_bytes = \"1MiB\"\n",
        Some(&ns.name),
    );
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 256 * MIB);
    sparse_file(&dr, 256 * MIB);
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("slow", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));

    // The link to the DR agent now moves at most 2 MB/s: 500 4k writes a second.
    let dr_port = cluster.node("node-b").port.to_string();
    ns.exec(&["nft", "add", "table", "inet", "slow"]);
    ns.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "slow",
        "out",
        "{ type filter hook output priority 0 ; }",
    ]);
    ns.exec(&[
        "nft",
        "add",
        "rule",
        "inet",
        "slow",
        "out",
        "udp",
        "dport",
        &dr_port,
        "limit",
        "rate",
        "over",
        "2",
        "mbytes/second",
        "drop",
    ]);
    let uri = cluster.node("node-a").daemon().nbd_uri("prod");
    let out = Command::new("fio")
        .current_dir(dir.path())
        .args([
            "--name=fast",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--runtime=5",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let iops = fio_write_iops(&out.stdout);
    let link_iops = 2e6 / 4096.0;
    eprintln!("fio wrote {iops:.0} IOPS through a link of {link_iops:.0} 4k writes a second");
    assert!(
        iops > 5.0 * link_iops,
        "the application was throttled to the link: {iops:.0} IOPS"
    );
    let state = local_pair_state(cluster.node("node-a"), &pair).unwrap();
    assert!(
        state["counters"]["journal_overflows"].as_u64().unwrap() >= 1,
        "the journal overflowed into bitmap mode: {state}"
    );
    assert!(
        state["counters"]["journal_bytes"].as_u64().unwrap() <= MIB,
        "the journal stays within its bound: {state}"
    );
    wait_until(
        Duration::from_secs(120),
        "the pair to converge through the slow link",
        || {
            local_pair_state(cluster.node("node-a"), &pair)
                .is_some_and(|s| s["out_of_sync_bytes"] == 0 && s["replication_status"] == "active")
        },
    );
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr));
}

/// A connection whose ring fails (a test-only hook) is abandoned with writes on the ring:
/// each of them still leaves its epoch through the link, failed (its blocks stay dirty), so
/// the epoch is sealed and replication goes on. Were one left open, no later epoch would
/// ever be sealed, and the DR side would stay where it was.
#[test]
fn a_connection_abandoned_with_writes_in_flight_does_not_stop_the_pair() {
    abandon_a_connection_with_writes_in_flight(false);
}

/// The same when the abandoned connection's ring cannot be drained (its operations do not
/// complete within the drain's patience): every write on it still leaves its epoch at
/// once, failed, and its blocks are given back once the ring gave the write back.
#[test]
fn a_connection_abandoned_with_a_ring_that_does_not_drain_does_not_stop_the_pair() {
    abandon_a_connection_with_writes_in_flight(true);
}

fn abandon_a_connection_with_writes_in_flight(drain_gives_up: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(
        dir.path(),
        &[("node-a", "az1"), ("node-b", "az2")],
        "[replication]\nepoch_interval_ms = 100\n",
    );
    let node = cluster.node_mut("node-a");
    if drain_gives_up {
        node.env
            .push(("BLOCKREP_FAULT_NBD_DRAIN_GIVES_UP".into(), "1".into()));
    }
    node.restart_with_fault("BLOCKREP_FAULT_NBD_RING_ERROR_AFTER", "4");
    cluster.wait_nodes_alive();
    let (prod, dr, pair) = cluster.pair_two_files(dir.path(), "abandoned", "async", 64 * MIB);

    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    let mut c = NbdClient::connect(&socket, "prod").unwrap();
    let chunk = vec![0x3cu8; 256 * 1024];
    // Sending stops where the server hangs up.
    for i in 0..16u64 {
        if c.send(
            CMD_WRITE,
            0,
            i,
            i * chunk.len() as u64,
            chunk.len() as u32,
            &chunk,
        )
        .is_err()
        {
            break;
        }
    }
    // The connection is cut once its ring failed: the answers not sent by then never come.
    let answers = std::iter::from_fn(|| c.reply().ok()).count();
    assert!(answers < 16, "the connection was cut: {answers} answers");
    assert!(
        cluster
            .node("node-a")
            .daemon()
            .log_text()
            .contains("this connection's ring fails"),
        "the fault hook fired"
    );
    if drain_gives_up {
        // Logged once the connection, cut first, is abandoned; then its thread waits for
        // the ring's operations and gives their writes' blocks back.
        wait_until(Duration::from_secs(10), "the drain to give up", || {
            cluster
                .node("node-a")
                .daemon()
                .log_text()
                .contains("its thread waits for them")
        });
        wait_until(
            Duration::from_secs(10),
            "the ring's operations back",
            || {
                cluster
                    .node("node-a")
                    .daemon()
                    .log_text()
                    .contains("gave back its last operations")
            },
        );
    }
    drop(c);

    let mut c = NbdClient::connect(&socket, "prod").unwrap();
    assert_eq!(c.write(32 * MIB, &vec![0x77u8; MIB as usize]).unwrap(), 0);
    drop(c);
    wait_until(Duration::from_secs(60), "the pair to converge", || {
        local_pair_state(cluster.node("node-a"), &pair)
            .is_some_and(|s| s["out_of_sync_bytes"] == 0 && s["replication_status"] == "active")
    });
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr), "the DR volume caught up");
}

/// With `replication.compression = "zstd"`, compressible data (the initial sync's and live
/// writes') goes on the wire in a fraction of its size, random data as it is, and the DR
/// volume ends identical to production.
#[test]
fn compressed_payloads_arrive_whole_in_fewer_bytes() {
    let seed = seed(0xc0de_5eed);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(
        dir.path(),
        &[("node-a", "az1"), ("node-b", "az2")],
        "[replication]\ncompression = \"zstd\"\n",
    );
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 32 * MIB);
    sparse_file(&dr, 32 * MIB);
    // Text-like data: runs of a few values, which compresses several times over.
    let compressible = |n: u64| -> Vec<u8> {
        (0..MIB)
            .map(|i| b"blockrep replicates blocks "[((i / 7 + n) % 27) as usize])
            .collect()
    };
    let file = std::fs::OpenOptions::new().write(true).open(&prod).unwrap();
    for n in 0..8 {
        file.write_all_at(&compressible(n), n * MIB).unwrap();
    }
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("packed", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));

    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    let mut c = NbdClient::connect(&socket, "prod").unwrap();
    for n in 0..8 {
        assert_eq!(c.write((8 + n) * MIB, &compressible(100 + n)).unwrap(), 0);
    }
    let mut random = vec![0u8; MIB as usize];
    rng.fill(&mut random[..]);
    assert_eq!(c.write(20 * MIB, &random).unwrap(), 0);
    c.disconnect().unwrap();
    wait_until(Duration::from_secs(60), "the pair to converge", || {
        local_pair_state(cluster.node("node-a"), &pair).is_some_and(|s| {
            s["out_of_sync_bytes"] == 0
                && s["replication_status"] == "active"
                && s["counters"]["journal_bytes"] == 0
        })
    });
    let state = local_pair_state(cluster.node("node-a"), &pair).unwrap();
    let sent = state["counters"]["bytes_sent"].as_u64().unwrap();
    eprintln!("seed {seed:#x}: 17 MiB of data went in {sent} bytes");
    assert!(
        sent < 17 * MIB / 3,
        "16 MiB of compressible and 1 MiB of random data went in {sent} bytes"
    );
    assert!(sent > MIB, "the random MiB cannot shrink: {sent} bytes");
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr));
}
