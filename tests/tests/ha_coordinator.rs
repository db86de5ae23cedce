//! An HA coordinator: three candidates (one per zone, az3 the witness) on a three-member
//! etcd, the agents of two zones, and a consistency group of two pairs.
//!
//! - The leader is killed (`kill -9`, by the test-only crash hook) right after it records a
//!   step of a reverse (seeded), a failover (its plan) and a reprotect (seeded): another
//!   candidate leads within two lease TTLs, and each job finishes from its recorded plan;
//!   the write-order checker's prefix holds on every side that takes over.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockrep_tests::cluster::{ClusterConfig, NodeSpec, TestCluster, sha256, wait_until};
use blockrep_tests::etcd::EtcdCluster;
use blockrep_tests::group::{
    Member, RecordWriter, create_group_of_two, number, pair_state, sockets, wait_consistent,
    write_error,
};
use blockrep_tests::records::{RECORD, prefix_length_across};
use blockrep_tests::{seed, sparse_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const RECORDS: u64 = 32 * 1024;
const EPERM: u32 = 1;
const LEASE_TTL: Duration = Duration::from_secs(2);
const CANDIDATES: [&str; 3] = ["co-1", "co-2", "co-3"];

struct Ha {
    cluster: TestCluster,
    // Dropped after the cluster: the daemons stop before etcd does.
    _etcd: EtcdCluster,
    dir: tempfile::TempDir,
    /// Holds the step the leader dies after (read by every candidate's crash hook).
    crash_file: std::path::PathBuf,
    production: [Member; 2],
    dr: [Member; 2],
}

impl Ha {
    /// Candidates co-1 (az1), co-2 (az2), co-3 (az3, the witness); node-a (az1) with p1 and
    /// p2, node-b (az2) with d1 and d2; group "app" of p1→d1 and p2→d2.
    fn start(model: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3);
        let crash_file = dir.path().join("crash-at");
        let section = format!(
            "store = \"etcd\"\netcd_endpoints = {}\nlease_ttl_secs = {}\n",
            etcd.endpoints_toml(),
            LEASE_TTL.as_secs()
        );
        let specs: Vec<NodeSpec> = [
            ("co-1", "az1"),
            ("co-2", "az2"),
            ("co-3", "az3"),
            ("node-a", "az1"),
            ("node-b", "az2"),
        ]
        .iter()
        .map(|(name, az)| NodeSpec::new(name, az))
        .collect();
        let mut cluster = TestCluster::start_nodes(
            dir.path(),
            &specs,
            ClusterConfig {
                extra: "[replication]\nepoch_interval_ms = 200\n",
                candidates: 3,
                coordinator_section: &section,
                ..ClusterConfig::default()
            },
        );
        // Every candidate shares the crash hook's file: whichever leads dies at its step,
        // once.
        for name in CANDIDATES {
            let node = cluster.node_mut(name);
            node.stop();
            node.env = vec![(
                "BLOCKREP_FAULT_COORDINATOR_CRASH_FILE".into(),
                crash_file.display().to_string(),
            )];
            node.start();
        }
        cluster.wait_nodes_alive();
        let ha = Self {
            cluster,
            _etcd: etcd,
            dir,
            crash_file,
            production: [Member::new("node-a", "p1"), Member::new("node-a", "p2")],
            dr: [Member::new("node-b", "d1"), Member::new("node-b", "d2")],
        };
        for m in ha.production.iter().chain(&ha.dr) {
            sparse_file(&ha.image(m), RECORDS / 2 * RECORD);
            ha.cluster.add_volume(&m.node, &m.volume, &ha.image(m));
        }
        create_group_of_two(&ha.cluster, model);
        ha
    }

    fn image(&self, m: &Member) -> std::path::PathBuf {
        self.dir.path().join(format!("{}.img", m.volume))
    }

    /// The candidate that leads, once one does.
    fn wait_leader(&self, timeout: Duration) -> String {
        let mut leader = None;
        wait_until(timeout, "a coordinator leader", || {
            leader = self.cluster.leader();
            leader.is_some()
        });
        leader.unwrap()
    }

    /// Starts `action` with the leader set to die right after it records the step
    /// `crash_at`; checks another candidate leads within two lease TTLs of the death, starts
    /// the dead one again (a candidate once more), and returns the job's id.
    fn start_action_killing_the_leader(&mut self, action: &str, crash_at: &str) -> String {
        let leader = self.wait_leader(Duration::from_secs(30));
        std::fs::write(&self.crash_file, crash_at).unwrap();
        // The leader may die before it answers: the job is found again afterwards.
        let _ = self
            .cluster
            .coordinator()
            .daemon()
            .cli(&["group", action, "app"]);
        let crashed = self
            .cluster
            .node_mut(&leader)
            .wait_crash(Duration::from_secs(60));
        assert!(
            crashed,
            "the leader {leader} never reached {crash_at:?}\n{}",
            self.cluster.log_tails(60)
        );
        let died = Instant::now();
        let mut next = None;
        wait_until(
            2 * LEASE_TTL + Duration::from_secs(5),
            "a new leader",
            || {
                next = self.cluster.leader().filter(|l| *l != leader);
                next.is_some()
            },
        );
        let took = died.elapsed();
        let next = next.unwrap();
        eprintln!(
            "{leader} died after {crash_at:?}; {next} leads {:.2} s later",
            took.as_secs_f64()
        );
        assert!(
            took <= 2 * LEASE_TTL,
            "a new leader took {took:?}, more than two lease TTLs\n{}",
            self.cluster.log_tails(30)
        );
        self.cluster.node_mut(&leader).start();
        let group = self
            .cluster
            .coordinator()
            .cli_json(&["group", "show", "app"]);
        let jobs = self.cluster.coordinator().cli_json(&["job", "list"]);
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| {
                j["replication_consistency_group_id"] == group["id"]
                    && j["job_type"].as_str().unwrap().starts_with(action)
                    && j["status"] != "FAIL"
                    && j["end_time"].is_null()
            })
            .or_else(|| {
                // It may have ended already: the newest job of the action.
                jobs.as_array().unwrap().iter().rev().find(|j| {
                    j["replication_consistency_group_id"] == group["id"]
                        && j["job_type"].as_str().unwrap().starts_with(action)
                })
            })
            .unwrap_or_else(|| panic!("no {action} job after the leader died: {jobs}"))["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn held(&self, members: &[Member; 2]) -> u64 {
        prefix_length_across(
            &[&self.image(&members[0]), &self.image(&members[1])],
            RECORDS,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn wait_applied(&self) {
        let current = self
            .production
            .iter()
            .map(|m| number(&pair_state(&self.cluster, m), "current_epoch"))
            .max()
            .unwrap();
        wait_until(
            Duration::from_secs(60),
            "the DR side to apply it all",
            || {
                self.dr
                    .iter()
                    .all(|m| number(&pair_state(&self.cluster, m), "consistent_epoch") > current)
            },
        );
    }
}

#[test]
fn a_killed_leader_is_replaced_and_the_group_operations_it_led_finish() {
    let seed = seed(0x19_0001);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut ha = Ha::start("async");
    let next = Arc::new(AtomicU64::new(0));

    // A planned reverse, the leader dying at a seeded step of it.
    wait_consistent(&ha.cluster, "app", Duration::from_secs(120));
    let writer = RecordWriter::start(
        sockets(&ha.cluster, &ha.production),
        Arc::clone(&next),
        RECORDS,
    );
    writer.wait_for(0, 200, Duration::from_secs(60));
    let step = [
        "reverse: production refuses writes",
        "reverse: swapping sides (0 of 2",
        "reverse: swapping sides (1 of 2",
    ][rng.random_range(0..3)];
    let job = ha.start_action_killing_the_leader("reverse", step);
    ha.cluster.wait_job(&job, Duration::from_secs(180));
    let answered = writer.stop();
    std::mem::swap(&mut ha.production, &mut ha.dr);
    let held = ha.held(&ha.production);
    eprintln!("reverse: {held} records held of {answered} answered");
    assert!(
        held == answered || held == answered + 1,
        "{held} of {answered}"
    );
    next.store(held, Ordering::SeqCst);
    for m in &ha.dr {
        assert_eq!(
            write_error(&ha.cluster, m),
            EPERM,
            "the new DR side took a write"
        );
    }

    // The production zone lost, a failover, the leader dying at a seeded step of it.
    wait_consistent(&ha.cluster, "app", Duration::from_secs(120));
    let writer = RecordWriter::start(
        sockets(&ha.cluster, &ha.production),
        Arc::clone(&next),
        RECORDS,
    );
    writer.wait_for(held, 200, Duration::from_secs(60));
    ha.cluster.node_mut(&ha.production[0].node.clone()).kill9();
    let answered = writer.stop();
    // A failover records one step (its plan) before it promotes the DR sides together.
    let job =
        ha.start_action_killing_the_leader("failover", "failover: promoting the DR sides (0 of 2");
    ha.cluster.wait_job(&job, Duration::from_secs(120));
    let held = ha.held(&ha.dr);
    eprintln!("failover: {held} records held of {answered} answered");
    assert!(held <= answered + 1, "{held} of {answered}");
    ha.cluster.node_mut(&ha.production[0].node.clone()).start();
    for m in &ha.production {
        wait_until(
            Duration::from_secs(30),
            "the old production side to be demoted",
            || pair_state(&ha.cluster, m)["fence"] == "demoted",
        );
    }

    // Reprotect, the leader dying at a seeded step of it.
    let step = [
        "reprotect: the old production sides become DR (0 of 2",
        "reprotect: the old production sides become DR (1 of 2",
    ][rng.random_range(0..2)];
    let job = ha.start_action_killing_the_leader("reprotect", step);
    ha.cluster.wait_job(&job, Duration::from_secs(180));
    std::mem::swap(&mut ha.production, &mut ha.dr);
    next.store(held, Ordering::SeqCst);
    let shown = ha.cluster.coordinator().cli_json(&["group", "show", "app"]);
    assert_eq!(shown["status"], "available");
    assert_eq!(shown["replication_status"], "active");

    // Writes go on in the new direction and reach the other side, identical.
    let writer = RecordWriter::start(
        sockets(&ha.cluster, &ha.production),
        Arc::clone(&next),
        RECORDS,
    );
    writer.wait_for(held, 200, Duration::from_secs(60));
    writer.stop();
    ha.wait_applied();
    let names: Vec<String> = ha.cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for node in names {
        ha.cluster.node_mut(&node).stop();
    }
    for (p, d) in ha.production.iter().zip(&ha.dr) {
        assert_eq!(
            sha256(&ha.image(p)),
            sha256(&ha.image(d)),
            "{} and {} differ",
            p.volume,
            d.volume
        );
    }
}
