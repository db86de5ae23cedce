//! Write order across hosts in an async consistency group (rule 3): a writer puts numbered,
//! checksummed records on the group's two production volumes in turn, on two agents, each
//! record issued only once the one before was answered. At seeded moments the production
//! agents are killed with `kill -9`, and the DR agent right after them; restarted, the DR
//! agent's two volumes must hold, together, exactly a prefix of the records.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, wait_until};
use blockrep_tests::group::create_group_of_two;
use blockrep_tests::records::{RECORD, place, prefix_length_across, record};
use blockrep_tests::{NbdClient, seed, sparse_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const RECORDS: u64 = 16 * 1024;

fn pair_state(cluster: &TestCluster, node: &str, volume: &str) -> Value {
    cluster.node(node).cli_json(&["status"])["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["volume_name"] == volume)
        .cloned()
        .unwrap_or(Value::Null)
}

fn number(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Writes records from `next` on, in turn on the two production volumes, until stopped or
/// an agent goes away; `next` ends at the first record not answered.
fn write_records(sockets: [PathBuf; 2], next: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let Ok(a) = NbdClient::connect(&sockets[0], "p1") else {
        return;
    };
    let Ok(b) = NbdClient::connect(&sockets[1], "p2") else {
        return;
    };
    let mut clients = [a, b];
    while !stop.load(Ordering::SeqCst) {
        let n = next.load(Ordering::SeqCst);
        if n >= RECORDS {
            break;
        }
        let (volume, offset) = place(n, 2);
        match clients[volume].write(offset, &record(n)) {
            Ok(0) => next.store(n + 1, Ordering::SeqCst),
            _ => return,
        }
    }
    for c in clients {
        let _ = c.disconnect();
    }
}

#[test]
fn an_async_group_keeps_write_order_across_two_agents_through_kill_9() {
    let seed = seed(0x9_0003);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(
        dir.path(),
        &[
            ("node-co", "az1"),
            ("node-a", "az1"),
            ("node-c", "az1"),
            ("node-b", "az2"),
        ],
        "[replication]\nepoch_interval_ms = 200\n",
    );
    let size = RECORDS / 2 * RECORD;
    let image = |name: &str| dir.path().join(format!("{name}.img"));
    for (node, name) in [
        ("node-a", "p1"),
        ("node-c", "p2"),
        ("node-b", "d1"),
        ("node-b", "d2"),
    ] {
        sparse_file(&image(name), size);
        cluster.add_volume(node, name, &image(name));
    }
    create_group_of_two(&cluster, "async");
    // The group's cuts run once both DR sides apply by its commits.
    let applied = |cluster: &TestCluster| {
        (
            number(&pair_state(cluster, "node-b", "d1"), "consistent_epoch"),
            number(&pair_state(cluster, "node-b", "d2"), "consistent_epoch"),
        )
    };
    wait_until(Duration::from_secs(60), "the group's first commit", || {
        let d1 = pair_state(&cluster, "node-b", "d1");
        let d2 = pair_state(&cluster, "node-b", "d2");
        d1["grouped"] == true && d2["grouped"] == true && {
            let p = number(&pair_state(&cluster, "node-a", "p1"), "current_epoch");
            let (a, b) = applied(&cluster);
            a >= p.saturating_sub(2) && b >= p.saturating_sub(2) && a > 64
        }
    });

    let sockets = [
        cluster.node("node-a").daemon().nbd_socket("p1"),
        cluster.node("node-c").daemon().nbd_socket("p2"),
    ];
    let next = Arc::new(AtomicU64::new(0));
    let mut last_prefix = 0;
    for round in 0..10 {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (sockets, next, stop) = (sockets.clone(), Arc::clone(&next), Arc::clone(&stop));
            std::thread::spawn(move || write_records(sockets, next, stop))
        };
        let from = next.load(Ordering::SeqCst);
        let run = rng.random_range(200..1200);
        wait_until(Duration::from_secs(120), "records to be written", || {
            next.load(Ordering::SeqCst) >= (from + run).min(RECORDS)
        });
        // Kill one production agent, or both, while records are being written.
        let victims: &[&str] = match rng.random_range(0..3) {
            0 => &["node-a"],
            1 => &["node-c"],
            _ => &["node-a", "node-c"],
        };
        for v in victims {
            cluster.node_mut(v).kill9();
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        let answered = next.load(Ordering::SeqCst);
        // Then the DR agent, at a seeded moment up to 3 s later (a surviving production
        // agent goes on sealing epochs once the group's cut gives up on the dead one).
        // Restarted, it applies what the group committed and no more: its volumes must hold
        // a prefix of the records (at most one past the answered ones: the write in flight
        // when its agent died).
        std::thread::sleep(Duration::from_millis(rng.random_range(0..3000)));
        cluster.node_mut("node-b").kill9();
        cluster.node_mut("node-b").start();
        cluster.node_mut("node-b").stop();
        let held = prefix_length_across(&[&image("d1"), &image("d2")], RECORDS)
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        eprintln!(
            "round {round}: killed {victims:?}; the DR volumes hold records 0..{held} of {answered} answered"
        );
        assert!(held <= answered + 1, "round {round} (seed {seed}): {held}");
        assert!(
            held + 1 >= last_prefix,
            "round {round} (seed {seed}): went back to {held}"
        );
        last_prefix = held;
        cluster.node_mut("node-b").start();
        for v in victims {
            cluster.node_mut(v).start();
        }
        // Both pairs replicate again.
        wait_until(
            Duration::from_secs(120),
            "the pairs to replicate again",
            || {
                pair_state(&cluster, "node-a", "p1")["replication_status"] == "active"
                    && pair_state(&cluster, "node-c", "p2")["replication_status"] == "active"
            },
        );
    }
    // The DR side catches up with every answered record.
    let answered = next.load(Ordering::SeqCst);
    let current = number(&pair_state(&cluster, "node-a", "p1"), "current_epoch").max(number(
        &pair_state(&cluster, "node-c", "p2"),
        "current_epoch",
    ));
    wait_until(
        Duration::from_secs(120),
        "the DR side to apply it all",
        || {
            let (a, b) = applied(&cluster);
            a > current && b > current
        },
    );
    for node in ["node-b", "node-a", "node-c"] {
        cluster.node_mut(node).stop();
    }
    let held = prefix_length_across(&[&image("d1"), &image("d2")], RECORDS).unwrap();
    // Every answered record, and maybe the one in flight when the last agent died.
    assert!(
        held == answered || held == answered + 1,
        "seed {seed}: {held} records for {answered} answered"
    );
}
