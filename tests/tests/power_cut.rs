//! The DR host loses power under load. Its agent runs with the test-only volatile backing
//! (`BLOCKREP_FAULT_VOLATILE_WRITES`): its volume's writes stay in memory until a sync makes
//! them durable in the volume's file, so `kill -9` of the agent is a power cut of its disk,
//! and the file is exactly what survived.
//!
//! What is checked on that file: every write production answered (hypermetro) is on it or
//! dirty on production, so nothing answered is lost and the catch-up copies what the DR
//! side lost; after the catch-up both sides are identical. An async pair and an initial sync
//! cut in the middle converge to identical copies too.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_tests::cluster::{
    ClusterConfig, NodeSpec, TestCluster, local_pair_state, sha256, wait_until,
};
use blockrep_tests::{NbdClient, preallocated, seed, sparse_file};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// A peer silent for a second is gone: the tests do not wait five.
const FAST_TIMEOUT: ClusterConfig<'static> = ClusterConfig {
    extra: "",
    cluster_extra: "peer_timeout_ms = 1000",
    candidates: 0,
    coordinator_section: "",
};

/// Two nodes; node-b (the DR side) loses its unsynced writes when it dies.
fn cluster_with_volatile_dr(dir: &Path) -> TestCluster {
    let mut cluster = TestCluster::start_nodes(
        dir,
        &[
            NodeSpec::new("node-a", "az1"),
            NodeSpec::new("node-b", "az2"),
        ],
        FAST_TIMEOUT,
    );
    cluster
        .node_mut("node-b")
        .restart_with_fault("BLOCKREP_FAULT_VOLATILE_WRITES", "1");
    cluster.wait_nodes_alive();
    cluster
}

fn volumes(cluster: &TestCluster, dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let prod = dir.join("prod.img");
    let dr = dir.join("dr.img");
    for (node, name, path) in [("node-a", "prod", &prod), ("node-b", "dr", &dr)] {
        preallocated(path, size);
        cluster.add_volume(node, name, path);
    }
    (prod, dr)
}

fn state(cluster: &TestCluster, node: &str, pair: &str) -> Value {
    local_pair_state(cluster.node(node), pair).unwrap_or(Value::Null)
}

fn wait_converged(cluster: &TestCluster, pair: &str) {
    wait_until(Duration::from_secs(120), "the pair to converge", || {
        let s = state(cluster, "node-a", pair);
        s["replication_status"] == "active" && s["out_of_sync_bytes"] == 0
    });
}

/// Writes a MiB of data (each its own non-zero byte) every `stride` bytes of the file's
/// first `size`.
fn write_mibs(path: &Path, size: u64, stride: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (i, offset) in (0..size).step_by(stride as usize).enumerate() {
        file.write_all_at(&vec![(i as u8) | 1; MIB as usize], offset)
            .unwrap();
    }
}

/// The content of write `seq` of round `round`: every 16 bytes say which write it is.
fn block_of(round: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&(round + 1).to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ (i as u64) << 40).to_le_bytes());
    }
    b
}

/// Writers on `connections` NBD connections, each writing its share of `blocks` (every block
/// once, in a seeded order) and logging every write it got an answer for.
fn start_writers(
    socket: &Path,
    round: u64,
    blocks: Vec<u64>,
    connections: usize,
    answered: &Arc<Mutex<Vec<(u64, u64)>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let share = blocks.len().div_ceil(connections);
    blocks
        .chunks(share)
        .map(|mine| {
            let (socket, mine, answered) = (socket.to_owned(), mine.to_vec(), Arc::clone(answered));
            std::thread::spawn(move || {
                let Ok(mut c) = NbdClient::connect(&socket, "prod") else {
                    return;
                };
                for block in mine {
                    let seq = block;
                    match c.write(block * BLOCK, &block_of(round, seq)) {
                        Ok(0) => answered.lock().unwrap().push((block, seq)),
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// `count` of the first `blocks` blocks (all of them if fewer), in the seeded order `rng`
/// gives.
fn shuffled_blocks(rng: &mut SmallRng, blocks: u64, count: usize) -> Vec<u64> {
    let mut order: Vec<u64> = (0..blocks).collect();
    order.shuffle(rng);
    order.truncate(count);
    order
}

/// Waits until the writers have logged `at_least` answered writes.
fn wait_answered(answered: &Mutex<Vec<(u64, u64)>>, at_least: usize, what: &str) {
    wait_until(Duration::from_secs(60), what, || {
        answered.lock().unwrap().len() >= at_least
    });
}

#[test]
fn hypermetro_answered_writes_survive_a_power_cut_of_the_dr_host() {
    let seed = seed(0x5eed_0c07);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = cluster_with_volatile_dr(dir.path());
    let blocks: u64 = 16 * 1024; // 64 MiB
    let (prod, dr) = volumes(&cluster, dir.path(), blocks * BLOCK);
    let (pair, job) = cluster.create_pair("sync", "prod,dr", "az1", "hypermetro");
    cluster.wait_job(&job, Duration::from_secs(120));
    let socket = cluster.node("node-a").daemon().nbd_socket("prod");

    for round in 0..4u64 {
        let answered: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let order = shuffled_blocks(&mut rng, blocks, usize::MAX);
        let writers = start_writers(&socket, round, order, 4, &answered);
        let cut_after = rng.random_range(200..2000);
        wait_answered(&answered, cut_after, "the writers to get answers");
        // The DR host loses power: its file holds what its agent synced, nothing more.
        cluster.node_mut("node-b").kill9();
        let survived = std::fs::read(&dr).unwrap();
        // The writers go on against the production side alone for a while.
        let more = answered.lock().unwrap().len() + 200;
        wait_answered(&answered, more, "writes answered without the DR side");
        // Taken before the bitmap: every write answered by then was admitted (its blocks
        // dirty) before it was answered.
        let log = answered.lock().unwrap().clone();
        let dirty = cluster.node("node-a").daemon().dirty_extents("prod");
        let mut lost = 0;
        for (i, &(block, seq)) in log.iter().enumerate() {
            let at = (block * BLOCK) as usize;
            if survived[at..at + BLOCK as usize] == block_of(round, seq)[..] {
                continue;
            }
            lost += 1;
            let there = &survived[at..at + 16];
            assert!(
                dirty
                    .iter()
                    .any(|&(o, l)| o <= at as u64 && at as u64 + BLOCK <= o + l),
                "round {round} (seed {seed}): block {block} (answer {i} of {}) was answered, is not \
                 on the DR volume after its power cut (it holds {there:?}), and is not dirty on \
                 production: a catch-up would never copy it",
                log.len()
            );
        }
        eprintln!(
            "round {round}: power cut after {cut_after} answered writes; {} answered in all, \
             {lost} not on the DR volume, every one of them dirty on production",
            log.len()
        );
        cluster.node_mut("node-b").start();
        for writer in writers {
            writer.join().unwrap();
        }
        wait_converged(&cluster, &pair);
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr), "seed {seed}");
}

#[test]
fn an_async_pair_and_an_initial_sync_converge_after_power_cuts_of_the_dr_host() {
    let seed = seed(0x5eed_0c08);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = cluster_with_volatile_dr(dir.path());
    let size = 128 * MIB;
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    // Production holds data before the pair exists: the initial sync copies it.
    sparse_file(&prod, size);
    write_mibs(&prod, size, 2 * MIB);
    sparse_file(&dr, size);
    cluster.add_volume("node-a", "prod", &prod);
    cluster.add_volume("node-b", "dr", &dr);
    let (pair, job) = cluster.create_pair("async", "prod,dr", "az1", "async");

    // The power goes in the middle of the initial sync.
    wait_until(Duration::from_secs(60), "the initial sync to copy", || {
        state(&cluster, "node-a", &pair)["counters"]["resync_bytes_sent"]
            .as_u64()
            .unwrap_or(0)
            > 8 * MIB
    });
    cluster.node_mut("node-b").kill9();
    cluster.node_mut("node-b").start();
    cluster.wait_job(&job, Duration::from_secs(120));

    // Then twice under a write load.
    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    for round in 0..2u64 {
        let answered: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let order = shuffled_blocks(&mut rng, size / BLOCK, 6000);
        let writers = start_writers(&socket, round, order, 4, &answered);
        let cut_after = rng.random_range(500..3000);
        wait_answered(&answered, cut_after, "the writers to get answers");
        cluster.node_mut("node-b").kill9();
        cluster.node_mut("node-b").start();
        for writer in writers {
            writer.join().unwrap();
        }
        wait_converged(&cluster, &pair);
        eprintln!("round {round}: power cut after {cut_after} answered writes; converged");
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr), "seed {seed}");
}

/// The DR host dies while a hypermetro pair's initial sync runs under writes. Writes then
/// waiting for the DR side hold their blocks, and the sync's reader may be queued for some
/// of them; the production side must still answer them once the stream is gone (the pair
/// leaves the stream before it waits for its reader), then sync again when the DR host is
/// back.
#[test]
fn a_hypermetro_initial_sync_under_writes_survives_a_power_cut_of_the_dr_host() {
    let seed = seed(0x5eed_0c09);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = cluster_with_volatile_dr(dir.path());
    let size = 512 * MIB;
    let (prod, dr) = volumes(&cluster, dir.path(), size);
    // Data everywhere: the sync reads and sends the whole volume, held to 64 MiB/s so
    // that it is still copying when the DR host dies (at least 8 s for the volume alone).
    // A write waits behind the extents queued before it (up to the reader's 64 MiB
    // read-ahead): each of the eight writers has about one write answered each time that
    // much is sent, so ten answers come with about a quarter of the volume queued.
    write_mibs(&prod, size, MIB);
    let limited = cluster.node("node-a").cli_json(&["send-limit", "64MiB"]);
    assert_eq!(limited["max_bytes_per_sec"], 64 * MIB);
    let (pair, job) = cluster.create_pair("sync", "prod,dr", "az1", "hypermetro");
    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    let answered: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let order = shuffled_blocks(&mut rng, size / BLOCK, 20_000);
    let writers = start_writers(&socket, 0, order, 8, &answered);
    wait_until(
        Duration::from_secs(60),
        "the sync to copy under writes",
        || {
            state(&cluster, "node-a", &pair)["counters"]["resync_bytes_sent"]
                .as_u64()
                .unwrap_or(0)
                > 16 * MIB
                && answered.lock().unwrap().len() >= 10
        },
    );
    let sent = state(&cluster, "node-a", &pair)["counters"]["resync_bytes_sent"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        sent < size,
        "seed {seed}: the sync ended ({sent} bytes sent) before the power cut"
    );
    eprintln!(
        "power cut after {sent} of {size} bytes sent, {} writes answered",
        answered.lock().unwrap().len()
    );
    cluster.node_mut("node-b").kill9();
    let more = answered.lock().unwrap().len() + 200;
    wait_answered(&answered, more, "writes answered without the DR side");
    // The copy starts again once the DR host is back: at full speed.
    let lifted = cluster.node("node-a").cli_json(&["send-limit", "off"]);
    assert!(lifted["max_bytes_per_sec"].is_null());
    cluster.node_mut("node-b").start();
    for writer in writers {
        writer.join().unwrap();
    }
    cluster.wait_job(&job, Duration::from_secs(120));
    wait_converged(&cluster, &pair);
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr), "seed {seed}");
}
