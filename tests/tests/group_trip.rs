//! A consistency group's replication links cut (nft inside a network namespace; the
//! coordinator still reaches every agent) while the write-order checker writes: a hypermetro
//! group trips as a whole (its writes go on, answered locally; fault level 5), an async one
//! goes on journaling. The links come back slowly, and in the middle of the catch-up that
//! follows the production agents are killed with `kill -9` and the group fails over: the DR
//! volumes must hold, together, exactly a prefix of the records.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockrep_tests::cluster::{ClusterConfig, NetNs, NodeSpec, TestCluster, sha256, wait_until};
use blockrep_tests::group::{
    Member, RecordWriter, create_group_of_two, group_action, number, pair_state, sockets,
    wait_consistent,
};
use blockrep_tests::records::{RECORD, prefix_length_across};
use blockrep_tests::small_fs::SmallFs;
use blockrep_tests::{require_tool, run, seed, sparse_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const RECORDS: u64 = 16 * 1024;
/// Bytes written beside the records while the links are down, so the catch-up takes time.
const BULK: u64 = 48 << 20;
/// Each volume's size: the records' blocks, then the bulk.
const IMAGE_BYTES: u64 = RECORDS / 2 * RECORD + BULK;

fn nft(ns: &NetNs, rule: &str) {
    run(Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft"])
        .args(rule.split_whitespace()));
}

/// Writes `BULK` bytes of seeded data after the records' blocks, in 1 MiB writes.
fn bulk_write(cluster: &TestCluster, m: &Member, seed: u64) {
    let socket = cluster.node(&m.node).daemon().nbd_socket(&m.volume);
    let mut c = blockrep_tests::NbdClient::connect(&socket, &m.volume).unwrap();
    let mut x = seed | 1;
    let mut data = vec![0u8; 1 << 20];
    for i in 0..BULK >> 20 {
        for chunk in data.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let offset = RECORDS / 2 * RECORD + (i << 20);
        assert_eq!(c.write(offset, &data).unwrap(), 0);
    }
    c.disconnect().unwrap();
}

/// Where the group's volumes are.
struct Layout {
    production: [Member; 2],
    dr: [Member; 2],
}

/// A witness coordinator (az3), node-a and node-c (az1) with p1 and p2, node-b (az2) with
/// d1 and d2, all inside `ns`; group "app" of p1→d1 and p2→d2, consistent.
fn group_in_namespace(ns: &NetNs, dir: &std::path::Path, model: &str) -> (TestCluster, Layout) {
    group_in_namespace_at(ns, dir, model, &|v| dir.join(format!("{v}.img")))
}

/// The same, with each volume's image where `image` says.
fn group_in_namespace_at(
    ns: &NetNs,
    dir: &std::path::Path,
    model: &str,
    image: &dyn Fn(&str) -> PathBuf,
) -> (TestCluster, Layout) {
    let specs: Vec<NodeSpec> = [
        ("node-co", "az3"),
        ("node-a", "az1"),
        ("node-c", "az1"),
        ("node-b", "az2"),
    ]
    .iter()
    .map(|(n, az)| NodeSpec::new(n, az).in_netns(&ns.name, "127.0.0.1"))
    .collect();
    let cluster = TestCluster::start_nodes(
        dir,
        &specs,
        ClusterConfig {
            extra: "[replication]\nepoch_interval_ms = 200\n",
            cluster_extra: "peer_timeout_ms = 1000",
            candidates: 0,
            coordinator_section: "",
        },
    );
    let production = [Member::new("node-a", "p1"), Member::new("node-c", "p2")];
    let dr = [Member::new("node-b", "d1"), Member::new("node-b", "d2")];
    for m in production.iter().chain(&dr) {
        sparse_file(&image(&m.volume), IMAGE_BYTES);
        cluster.add_volume(&m.node, &m.volume, &image(&m.volume));
    }
    create_group_of_two(&cluster, model);
    wait_consistent(&cluster, "app", Duration::from_secs(120));
    (cluster, Layout { production, dr })
}

/// Cuts the replication links (production agents to the DR agent, both ways); the
/// coordinator's traffic is untouched.
fn cut_links(cluster: &TestCluster, ns: &NetNs) {
    let port = |n: &str| cluster.node(n).port;
    let (pa, pc, pb) = (port("node-a"), port("node-c"), port("node-b"));
    nft(ns, "add table inet link");
    nft(
        ns,
        "add chain inet link out { type filter hook output priority 0 ; }",
    );
    nft(
        ns,
        &format!("add rule inet link out udp sport {{ {pa}, {pc} }} udp dport {pb} drop"),
    );
    nft(
        ns,
        &format!("add rule inet link out udp sport {pb} udp dport {{ {pa}, {pc} }} drop"),
    );
}

/// Waits (90 s at most) for group "app" to be active with every production pair
/// synchronous, ungated and live.
fn wait_synchronous_again(cluster: &TestCluster, production: &[Member]) {
    let synchronous = || {
        let g = cluster.coordinator().cli_json(&["group", "show", "app"]);
        g["replication_status"] == "active"
            && production.iter().all(|m| {
                let s = pair_state(cluster, m);
                s["live"] == "sync" && s["gated"] == false && s["state"] == "live"
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !synchronous() {
        assert!(
            std::time::Instant::now() < deadline,
            "the group did not go synchronous again: {}\n{:#?}\n{}",
            cluster.coordinator().cli_json(&["group", "show", "app"]),
            production
                .iter()
                .map(|m| pair_state(cluster, m))
                .collect::<Vec<_>>(),
            cluster.log_tails(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn trip_then_failover_mid_catch_up(model: &str, default_seed: u64) {
    require_tool("nft");
    let seed = seed(default_seed);
    let mut rng = SmallRng::seed_from_u64(seed);
    let ns = NetNs::new(if model == "async" { "gta" } else { "gth" });
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, Layout { production, .. }) = group_in_namespace(&ns, dir.path(), model);
    let image = |v: &str| dir.path().join(format!("{v}.img"));
    let pb = cluster.node("node-b").port;

    let next = Arc::new(AtomicU64::new(0));
    let writer = RecordWriter::start(sockets(&cluster, &production), Arc::clone(&next), RECORDS);
    writer.wait_for(0, 100, Duration::from_secs(60));
    cut_links(&cluster, &ns);
    wait_until(
        Duration::from_secs(30),
        "the group to see the link down",
        || {
            let g = cluster.coordinator().cli_json(&["group", "show", "app"]);
            g["fault_level"] == 5 && g["replication_status"] == "inactive"
        },
    );
    // Writes go on, answered locally (a hypermetro group tripped as a whole).
    let before = next.load(Ordering::SeqCst);
    writer.wait_for(before, 200, Duration::from_secs(30));
    if model == "hypermetro" {
        for m in &production {
            assert_ne!(
                pair_state(&cluster, m)["live"],
                "sync",
                "{m:?} did not trip"
            );
        }
    }
    for (i, m) in production.iter().enumerate() {
        bulk_write(&cluster, m, seed + i as u64);
    }
    std::thread::sleep(Duration::from_millis(rng.random_range(0..1000)));

    // The links come back slowly; in the middle of the catch-up, the production zone fails.
    run(Command::new("ip").args([
        "netns", "exec", &ns.name, "nft", "flush", "chain", "inet", "link", "out",
    ]));
    nft(
        &ns,
        &format!("add rule inet link out udp dport {pb} limit rate over 16 mbytes/second drop"),
    );
    wait_until(Duration::from_secs(60), "a catch-up to run", || {
        production.iter().any(|m| {
            let s = pair_state(&cluster, m);
            s["replication_status"] == "copying" && number(&s["counters"], "resync_bytes_sent") > 0
        })
    });
    std::thread::sleep(Duration::from_millis(rng.random_range(0..500)));
    let progress: Vec<String> = production
        .iter()
        .map(|m| {
            let s = pair_state(&cluster, m);
            format!(
                "{}: {} {:.0}%",
                m.volume,
                s["replication_status"],
                s["progress"].as_f64().unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    for node in ["node-a", "node-c"] {
        cluster.node_mut(node).kill9();
    }
    let answered = writer.stop();
    run(Command::new("ip").args([
        "netns", "exec", &ns.name, "nft", "delete", "table", "inet", "link",
    ]));

    let job = group_action(&cluster, "app", "failover", Duration::from_secs(60));
    let held = prefix_length_across(&[&image("d1"), &image("d2")], RECORDS)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    eprintln!(
        "{model}: killed during the catch-up ({progress:?}); the DR volumes hold records 0..{held} of {answered} answered; {}",
        job["result"]
    );
    assert!(held <= answered + 1, "seed {seed}: {held} of {answered}");
    for node in ["node-b", "node-co"] {
        cluster.node_mut(node).stop();
    }
}

/// After a trip and the links' return, a hypermetro group goes synchronous again as a
/// whole: every answered write is on the DR side again (a failover then keeps them all).
#[test]
fn a_tripped_hypermetro_group_goes_synchronous_again() {
    require_tool("nft");
    let ns = NetNs::new("gts");
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, Layout { production, dr }) =
        group_in_namespace(&ns, dir.path(), "hypermetro");
    let image = |m: &Member| dir.path().join(format!("{}.img", m.volume));
    let next = Arc::new(AtomicU64::new(0));
    let writer = RecordWriter::start(sockets(&cluster, &production), Arc::clone(&next), RECORDS);
    writer.wait_for(0, 100, Duration::from_secs(60));
    cut_links(&cluster, &ns);
    wait_until(Duration::from_secs(30), "the trip", || {
        production
            .iter()
            .all(|m| pair_state(&cluster, m)["live"] != "sync")
    });
    writer.wait_for(next.load(Ordering::SeqCst), 300, Duration::from_secs(30));
    run(Command::new("ip").args([
        "netns", "exec", &ns.name, "nft", "delete", "table", "inet", "link",
    ]));
    // The pairs catch up, then the group goes synchronous, while the writer goes on.
    wait_synchronous_again(&cluster, &production);
    let from = next.load(Ordering::SeqCst);
    writer.wait_for(from, 300, Duration::from_secs(60));
    for node in ["node-a", "node-c"] {
        cluster.node_mut(node).kill9();
    }
    let answered = writer.stop();
    group_action(&cluster, "app", "failover", Duration::from_secs(60));
    let held = prefix_length_across(&[&image(&dr[0]), &image(&dr[1])], RECORDS).unwrap();
    eprintln!("synchronous again: the DR volumes hold records 0..{held} of {answered} answered");
    assert!(
        held == answered || held == answered + 1,
        "{held} records for {answered} answered: a synchronous group lost answered writes"
    );
    for node in ["node-b", "node-co"] {
        cluster.node_mut(node).stop();
    }
}

#[test]
fn a_hypermetro_group_trips_as_a_whole_and_fails_over_mid_catch_up_to_a_prefix() {
    trip_then_failover_mid_catch_up("hypermetro", 0x9_3001);
}

#[test]
fn an_async_group_fails_over_mid_catch_up_after_a_link_cut_to_a_prefix() {
    trip_then_failover_mid_catch_up("async", 0x9_3002);
}

/// A write that fails on a production volume of a synchronous hypermetro group (its file
/// system is full) after its data went to the DR side: the pair cannot fall back to the
/// bitmap alone, so it ends its stream and the group trips as on a link loss; the pair
/// catches up, the group goes synchronous again, and the DR volume ends holding what the
/// production volume holds where the write failed.
#[test]
fn a_write_failing_in_a_synchronous_group_trips_it_and_the_copies_converge() {
    let ns = NetNs::new("gwf");
    let dir = tempfile::tempdir().unwrap();
    let small = SmallFs::mount(
        &dir.path().join("p1fs"),
        &format!("{}", IMAGE_BYTES + (4 << 20)),
    );
    let image = |v: &str| {
        if v == "p1" {
            small.at.join("p1.img")
        } else {
            dir.path().join(format!("{v}.img"))
        }
    };
    let (mut cluster, Layout { production, dr }) =
        group_in_namespace_at(&ns, dir.path(), "hypermetro", &image);
    wait_synchronous_again(&cluster, &production);

    // The last MiB of p1 was never written: writing it needs space its file system no
    // longer has.
    let filler = small.fill();
    let socket = cluster.node("node-a").daemon().nbd_socket("p1");
    let mut c = blockrep_tests::NbdClient::connect(&socket, "p1").unwrap();
    let failed = c
        .write(IMAGE_BYTES - (1 << 20), &vec![0x5a; 1 << 20])
        .unwrap();
    assert_eq!(failed, 28, "the write fails with ENOSPC");
    c.disconnect().unwrap();
    std::fs::remove_file(filler).unwrap();
    wait_until(
        Duration::from_secs(30),
        "p1's stream to end for the trip",
        || {
            cluster
                .node("node-a")
                .daemon()
                .log_text()
                .contains("the stream ends so that the group trips")
        },
    );
    wait_synchronous_again(&cluster, &production);
    // A direct write is answered only once the DR side applied every unit before it, the
    // catch-up's too.
    let mut c = blockrep_tests::NbdClient::connect(&socket, "p1").unwrap();
    assert_eq!(c.write(0, &vec![0x11; 4096]).unwrap(), 0);
    c.disconnect().unwrap();
    for node in ["node-a", "node-c", "node-b", "node-co"] {
        cluster.node_mut(node).stop();
    }
    assert_eq!(
        sha256(&image("p1")),
        sha256(&image(&dr[0].volume)),
        "the DR volume does not hold what production holds"
    );
}
