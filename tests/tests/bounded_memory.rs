//! Memory and disk stay bounded when the DR side is slow (rule 6). The DR agent writes as a
//! disk of 40 MB/s would (a test-only fault hook), under an initial sync of 256 MiB and
//! under hypermetro writes at queue depth 128: each agent's resident memory stays under its
//! configured bounds plus 64 MiB. And an async pair whose DR stage log reaches its cap
//! falls back to the bitmap, says so, keeps the DR volume a consistent image, and catches
//! up once the cap is raised.
//!
//! The bounds: production holds at most `replication.journal_bytes` of data for the peer
//! (queued, or sent and not yet acknowledged); the DR side holds at most
//! `replication.apply_queue_bytes` received and as much on its ring, and 16 MiB of staged
//! data kept for applying; QUIC holds up to its 16 MiB send window on the production side
//! and a stream's 16 MiB receive window on the DR side.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockrep_tests::cluster::{ClusterConfig, NodeSpec, TestCluster, local_pair_state, wait_until};
use blockrep_tests::records::{RECORD, prefix_length, record};
use blockrep_tests::{NbdClient, PeakRss, require_tool, rss_bytes, sparse_file};

const MIB: u64 = 1 << 20;
const JOURNAL: u64 = 32 * MIB;
const APPLY_QUEUE: u64 = 16 * MIB;
const SEND_WINDOW: u64 = 16 * MIB;
const STREAM_RECEIVE_WINDOW: u64 = 16 * MIB;
const STAGED_IN_MEMORY: u64 = 16 * MIB;
const SLACK: u64 = 64 * MIB;

fn bounded_cluster(dir: &Path) -> TestCluster {
    let mut cluster = TestCluster::start_nodes(
        dir,
        &[
            NodeSpec::new("node-a", "az1"),
            NodeSpec::new("node-b", "az2"),
        ],
        ClusterConfig {
            extra: "[replication]\njournal_bytes = \"32MiB\"\napply_queue_bytes = \"16MiB\"\n",
            cluster_extra: "",
            candidates: 0,
            coordinator_section: "",
        },
    );
    cluster
        .node_mut("node-b")
        .restart_with_fault("BLOCKREP_FAULT_DISK_MBPS", "40");
    cluster.wait_nodes_alive();
    cluster
}

/// Checks the peaks against the bounds and prints the figures.
fn check_peaks(what: &str, base: [u64; 2], peaks: [u64; 2]) {
    let production_bound = JOURNAL + SEND_WINDOW + SLACK;
    let dr_bound = 2 * APPLY_QUEUE + STAGED_IN_MEMORY + STREAM_RECEIVE_WINDOW + SLACK;
    eprintln!(
        "{what}: production agent {} MiB at the start, {} MiB at its peak (bound: +{} MiB); \
         DR agent {} MiB, peak {} MiB (bound: +{} MiB)",
        base[0] / MIB,
        peaks[0] / MIB,
        production_bound / MIB,
        base[1] / MIB,
        peaks[1] / MIB,
        dr_bound / MIB
    );
    assert!(
        peaks[0] <= base[0] + production_bound,
        "{what}: the production agent grew past its bound"
    );
    assert!(
        peaks[1] <= base[1] + dr_bound,
        "{what}: the DR agent grew past its bound"
    );
}

fn pids(cluster: &TestCluster) -> Vec<u32> {
    ["node-a", "node-b"]
        .iter()
        .map(|n| cluster.node(n).daemon().pid())
        .collect()
}

#[test]
fn an_initial_sync_and_hypermetro_writes_to_a_slow_dr_disk_stay_in_their_bounds() {
    require_tool("fio");
    let dir = tempfile::tempdir().unwrap();
    let cluster = bounded_cluster(dir.path());

    // 256 MiB of data on a 512 MiB production volume: what the initial sync copies.
    let prod = dir.path().join("prod.img");
    sparse_file(&prod, 512 * MIB);
    {
        let file = std::fs::OpenOptions::new().write(true).open(&prod).unwrap();
        let data = vec![0x5au8; MIB as usize];
        for i in 0..256 {
            file.write_all_at(&data, 2 * i * MIB).unwrap();
        }
    }
    let dr = dir.path().join("dr.img");
    sparse_file(&dr, 512 * MIB);
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let pids = pids(&cluster);
    let base = [rss_bytes(pids[0]), rss_bytes(pids[1])];
    let sampler = PeakRss::start(pids.clone());
    let (pair, job) = cluster.create_pair("sync", "prod,dr", "az1", "hypermetro");
    cluster.wait_job(&job, Duration::from_secs(300));
    let peaks = sampler.peaks();
    check_peaks("initial sync of 256 MiB", base, [peaks[0], peaks[1]]);

    // Hypermetro writes at queue depth 128, each waiting for the slow DR disk.
    let base = [rss_bytes(pids[0]), rss_bytes(pids[1])];
    let sampler = PeakRss::start(pids);
    let uri = cluster.node("node-a").daemon().nbd_uri("prod");
    let out = Command::new("fio")
        .current_dir(dir.path())
        .args([
            "--name=qd128",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=128",
            "--size=512M",
            "--io_size=256M",
            "--output-format=terse",
        ])
        .arg(format!("--uri={uri}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peaks = sampler.peaks();
    check_peaks(
        "hypermetro 64 KiB writes at QD128",
        base,
        [peaks[0], peaks[1]],
    );
    let state = local_pair_state(cluster.node("node-a"), &pair).unwrap();
    assert_eq!(state["replication_status"], "active", "{state}");
}

#[test]
fn a_stage_log_at_its_cap_falls_back_to_the_bitmap_and_keeps_a_consistent_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_nodes(
        dir.path(),
        &[
            NodeSpec::new("node-a", "az1"),
            NodeSpec::new("node-b", "az2"),
        ],
        ClusterConfig {
            // Epochs far longer than the burst takes: its writes go to one or two units, at
            // least one of them over the cap, however slowly the machine runs them (with short epochs,
            // a DR side that keeps up never holds 4 MiB staged, and the cap is never met).
            extra: "[replication]\nepoch_interval_ms = 10000\nstage_log_max_bytes = \"4MiB\"\n",
            cluster_extra: "",
            candidates: 0,
            coordinator_section: "",
        },
    );
    let (_, dr, pair) = cluster.pair_two_files(dir.path(), "async", "async", 64 * MIB);

    // A first batch the DR side applies: the image kept later holds at least it.
    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    let mut client = NbdClient::connect(&socket, "prod").unwrap();
    let first = 256; // 1 MiB
    for n in 0..first {
        assert_eq!(client.write(n * RECORD, &record(n)).unwrap(), 0);
    }
    wait_until(
        Duration::from_secs(60),
        "the DR volume to hold the first batch",
        || prefix_length(&dr, first) == Ok(first),
    );
    // Then dependent records, 4 KiB each, in one burst: more than the DR's stage log may
    // hold.
    let records = 8 * 1024; // 32 MiB
    for n in first..records {
        assert_eq!(client.write(n * RECORD, &record(n)).unwrap(), 0);
    }
    client.disconnect().unwrap();
    wait_until(
        Duration::from_secs(60),
        "the pair to say its DR stage log is full",
        || {
            local_pair_state(cluster.node("node-a"), &pair).unwrap()["status_detail"]
                .as_str()
                .unwrap_or_default()
                .contains("stage log is full")
        },
    );
    // The DR volume is a consistent image meanwhile: a prefix of the records.
    cluster.node_mut("node-b").stop();
    let held = prefix_length(&dr, records).unwrap();
    eprintln!("with its stage log full, the DR volume holds the first {held} of {records} records");
    assert!(
        held >= first,
        "the DR volume lost the batch it had applied: {held}"
    );

    // A bigger cap: the catch-up fits, and the pair converges.
    let b = cluster.node_mut("node-b");
    let config = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(
        &b.config,
        config.replace(
            "stage_log_max_bytes = \"4MiB\"",
            "stage_log_max_bytes = \"256MiB\"",
        ),
    )
    .unwrap();
    b.start();
    wait_until(Duration::from_secs(120), "the pair to converge", || {
        let s = local_pair_state(cluster.node("node-a"), &pair).unwrap();
        s["replication_status"] == "active" && s["out_of_sync_bytes"] == 0
    });
    cluster.node_mut("node-b").stop();
    assert_eq!(prefix_length(&dr, records).unwrap(), records);
}
