//! The agent's send limit (`replication.max_bytes_per_sec`, `blockrep send-limit`) and a
//! pair's own (`pair update --max-rate`): what
//! its pairs send goes no faster than the limit, the limit changes while the agent runs,
//! and a limit out of range is refused with nothing changed.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use blockrep_tests::cluster::{ClusterConfig, NodeSpec, TestCluster, local_pair_state, wait_until};
use blockrep_tests::{NbdClient, sparse_file};

const MIB: u64 = 1 << 20;

fn bytes_sent(cluster: &TestCluster, pair: &str) -> u64 {
    local_pair_state(cluster.node("node-a"), pair)
        .and_then(|s| s["counters"]["bytes_sent"].as_u64())
        .unwrap_or(0)
}

/// Writes `mib` MiB of `byte` from MiB `first` on, and waits until the pair has sent as
/// much: how long that took from the first write.
fn write_until_sent(
    cluster: &TestCluster,
    pair: &str,
    c: &mut NbdClient,
    first: u64,
    mib: u64,
    byte: u8,
) -> Duration {
    let before = bytes_sent(cluster, pair);
    let started = Instant::now();
    for i in 0..mib {
        assert_eq!(
            c.write((first + i) * MIB, &vec![byte; MIB as usize])
                .unwrap(),
            0
        );
    }
    wait_until(
        Duration::from_secs(60),
        &format!("{mib} MiB to be sent"),
        || bytes_sent(cluster, pair) >= before + mib * MIB,
    );
    started.elapsed()
}

#[test]
fn a_send_limit_holds_what_a_pair_sends_and_changes_while_the_agent_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(
        dir.path(),
        &[("node-a", "az1"), ("node-b", "az2")],
        "[replication]\nmax_bytes_per_sec = \"4MiB\"\n",
    );
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 64 * MIB);
    sparse_file(&dr, 64 * MIB);
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("limited", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));
    let node = cluster.node("node-a");
    assert_eq!(node.cli_json(&["send-limit"])["max_bytes_per_sec"], 4 * MIB);

    // 12 MiB written: at 4 MiB/s they take at least 2.5 s to go (less the first burst).
    let socket = node.daemon().nbd_socket("prod");
    let mut c = NbdClient::connect(&socket, "prod").unwrap();
    let took = write_until_sent(&cluster, &pair, &mut c, 0, 12, 0x5a);
    assert!(
        took >= Duration::from_millis(2500),
        "12 MiB went in {took:?} under a 4 MiB/s limit"
    );

    // Out of range: refused, the limit as it was.
    let out = node.daemon().cli(&["send-limit", "100KiB"]);
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("below the least"), "{error}");
    assert_eq!(node.cli_json(&["send-limit"])["max_bytes_per_sec"], 4 * MIB);

    // Lifted while the agent runs: the next 24 MiB go at once.
    assert!(node.cli_json(&["send-limit", "off"])["max_bytes_per_sec"].is_null());
    let took = write_until_sent(&cluster, &pair, &mut c, 16, 24, 0xa5);
    assert!(
        took < Duration::from_secs(5),
        "24 MiB took {took:?} with no limit (the old limit would hold them 6 s)"
    );
    c.disconnect().unwrap();
    for n in ["node-a", "node-b"] {
        cluster.node_mut(n).stop();
    }
}

/// A limit far below what a pair has to send (1 MiB/s, 4 MiB resync extents) with a short
/// peer timeout: the sender waits on the limit, not on the peer, so the pair is not taken
/// for silent, and its initial sync completes.
#[test]
fn a_pair_held_back_by_the_send_limit_is_not_taken_for_a_silent_peer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_nodes(
        dir.path(),
        &[
            NodeSpec::new("node-a", "az1"),
            NodeSpec::new("node-b", "az2"),
        ],
        ClusterConfig {
            extra: "[replication]\nmax_bytes_per_sec = \"1MiB\"\n",
            cluster_extra: "peer_timeout_ms = 1000\n",
            candidates: 0,
            coordinator_section: "",
        },
    );
    cluster.wait_nodes_alive();
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 16 * MIB);
    sparse_file(&dr, 16 * MIB);
    // 6 MiB of data for the initial sync to send.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&prod)
        .unwrap()
        .write_all_at(&vec![0x3c; 6 * MIB as usize], 0)
        .unwrap();
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("slow", "prod,dr", "az1", "hypermetro");
    cluster.wait_job(&job, Duration::from_secs(60));
    let state = local_pair_state(cluster.node("node-a"), &pair).unwrap();
    assert_eq!(state["replication_status"], "active", "{state}");
    for n in ["node-a", "node-b"] {
        cluster.node_mut(n).stop();
    }
}

/// A pair's own limit (`pair update --max-rate`), with no agent limit: the coordinator
/// records it, the production agent takes it up, what the pair sends goes no faster, and
/// `off` lifts it; a limit out of range is refused with nothing changed.
#[test]
fn a_pairs_own_limit_holds_what_it_sends_and_changes_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 64 * MIB);
    sparse_file(&dr, 64 * MIB);
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("limited", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));
    let node = cluster.node("node-a");
    assert!(node.cli_json(&["send-limit"])["max_bytes_per_sec"].is_null());

    let shown = node.cli_json(&["pair", "update", "limited", "--max-rate", "4MiB"]);
    assert_eq!(shown["max_bytes_per_sec"], 4 * MIB, "{shown}");
    wait_until(
        Duration::from_secs(30),
        "the agent to take up the pair's limit",
        || {
            local_pair_state(cluster.node("node-a"), &pair)
                .is_some_and(|s| s["max_bytes_per_sec"] == 4 * MIB)
        },
    );

    // 12 MiB written: at 4 MiB/s they take at least 2.5 s to go (less the first burst).
    let socket = node.daemon().nbd_socket("prod");
    let mut c = NbdClient::connect(&socket, "prod").unwrap();
    let took = write_until_sent(&cluster, &pair, &mut c, 0, 12, 0x5a);
    assert!(
        took >= Duration::from_millis(2500),
        "12 MiB went in {took:?} under the pair's 4 MiB/s limit"
    );

    // Out of range: refused, the limit as it was.
    let out = node
        .daemon()
        .cli(&["pair", "update", "limited", "--max-rate", "100KiB"]);
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("below the least"), "{error}");
    assert_eq!(
        node.cli_json(&["pair", "show", "limited"])["max_bytes_per_sec"],
        4 * MIB
    );

    // Lifted while it runs: the next 24 MiB go at once.
    let shown = node.cli_json(&["pair", "update", "limited", "--max-rate", "off"]);
    assert!(shown["max_bytes_per_sec"].is_null(), "{shown}");
    wait_until(
        Duration::from_secs(30),
        "the agent to lift the pair's limit",
        || {
            local_pair_state(cluster.node("node-a"), &pair)
                .is_some_and(|s| s["max_bytes_per_sec"].is_null())
        },
    );
    let took = write_until_sent(&cluster, &pair, &mut c, 16, 24, 0xa5);
    assert!(
        took < Duration::from_secs(5),
        "24 MiB took {took:?} with no limit (the old limit would hold them 6 s)"
    );
    c.disconnect().unwrap();
    for n in ["node-a", "node-b"] {
        cluster.node_mut(n).stop();
    }
}
