//! Planned reverse and reprotect of a consistency group, with the coordinator killed
//! (`kill -9`) in the middle of each at seeded moments: the job resumes after the restart
//! and ends with the group whole, no answered write lost, and both sides identical.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, sha256, wait_until};
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

struct Group {
    cluster: TestCluster,
    dir: tempfile::TempDir,
    model: &'static str,
    production: [Member; 2],
    dr: [Member; 2],
}

impl Group {
    /// node-co (the coordinator, az3); node-a and node-c in az1 with p1 and p2; node-b in
    /// az2 with d1 and d2; group "app" of p1→d1 and p2→d2.
    fn start(model: &'static str) -> Self {
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
        let group = Self {
            cluster,
            dir,
            model,
            production: [Member::new("node-a", "p1"), Member::new("node-c", "p2")],
            dr: [Member::new("node-b", "d1"), Member::new("node-b", "d2")],
        };
        for m in group.production.iter().chain(&group.dr) {
            sparse_file(&group.image(m), RECORDS / 2 * RECORD);
            group
                .cluster
                .add_volume(&m.node, &m.volume, &group.image(m));
        }
        create_group_of_two(&group.cluster, model);
        group
    }

    fn image(&self, m: &Member) -> std::path::PathBuf {
        self.dir.path().join(format!("{}.img", m.volume))
    }

    fn nodes(members: &[Member]) -> Vec<String> {
        let mut nodes: Vec<String> = members.iter().map(|m| m.node.clone()).collect();
        nodes.dedup();
        nodes
    }

    /// Starts `action` and returns its job id.
    fn start_action(&self, action: &str) -> String {
        let started = self
            .cluster
            .coordinator()
            .cli_json(&["group", action, "app"]);
        started["job_id"].as_str().expect("a job").to_owned()
    }

    /// Starts `action` with the coordinator set to die (as by `kill -9`) right after the
    /// operation records the step described by `crash_at`; starts the coordinator again and
    /// returns the job id.
    fn start_action_crashing(&mut self, action: &str, crash_at: &str) -> String {
        let co = self.cluster.node_mut("node-co");
        co.stop();
        co.env = vec![(
            "BLOCKREP_FAULT_COORDINATOR_CRASH_AT".into(),
            crash_at.into(),
        )];
        co.start();
        self.cluster.wait_nodes_alive();
        // The coordinator may die before it answers: the job is found again afterwards.
        let _ = self
            .cluster
            .coordinator()
            .daemon()
            .cli(&["group", action, "app"]);
        let crashed = self
            .cluster
            .node_mut("node-co")
            .wait_crash(Duration::from_secs(60));
        assert!(
            crashed,
            "the coordinator never reached {crash_at:?}; group: {}\n{}",
            self.cluster
                .coordinator()
                .cli_json(&["group", "show", "app"]),
            self.cluster.log_tails(60)
        );
        let co = self.cluster.node_mut("node-co");
        eprintln!("the coordinator died after recording {crash_at:?}");
        co.env.clear();
        co.start();
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
                    && j["status"] == "RUNNING"
            })
            .unwrap_or_else(|| panic!("no running {action} job after the restart: {jobs}"))["id"]
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

    /// Waits until the DR side applied everything answered so far (async: an epoch past the
    /// production side's current one).
    fn wait_applied(&self) {
        if self.model == "hypermetro" {
            return;
        }
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

    fn assert_identical(&self) {
        for (p, d) in self.production.iter().zip(&self.dr) {
            assert_eq!(
                sha256(&self.image(p)),
                sha256(&self.image(d)),
                "{} and {} differ",
                p.volume,
                d.volume
            );
        }
    }
}

/// Writes records on the group's production side until the reverse's fence refuses them;
/// reverses (the coordinator dying right after the step `crash_at`, if given); checks the
/// new production side holds every answered record and takes writes, and the old one
/// refuses them.
fn reverse_once(g: &mut Group, next: &Arc<AtomicU64>, crash_at: Option<&str>) {
    wait_consistent(&g.cluster, "app", Duration::from_secs(120));
    let writer = RecordWriter::start(
        sockets(&g.cluster, &g.production),
        Arc::clone(next),
        RECORDS,
    );
    writer.wait_for(next.load(Ordering::SeqCst), 100, Duration::from_secs(60));
    let job = match crash_at {
        Some(step) => g.start_action_crashing("reverse", step),
        None => g.start_action("reverse"),
    };
    g.cluster.wait_job(&job, Duration::from_secs(180));
    let answered = writer.stop();
    let shown = g.cluster.coordinator().cli_json(&["group", "show", "app"]);
    assert_eq!(shown["status"], "available");
    std::mem::swap(&mut g.production, &mut g.dr);
    let station = if g.production[0].node == "node-b" {
        "az2"
    } else {
        "az1"
    };
    assert_eq!(shown["priority_station"], station);
    // No data loss: the new production side holds every answered record.
    let held = g.held(&g.production);
    eprintln!("reverse to {station}: {held} records held of {answered} answered");
    assert!(
        held == answered || held == answered + 1,
        "{held} of {answered}"
    );
    next.store(held, Ordering::SeqCst);
    for m in &g.dr {
        assert_eq!(
            write_error(&g.cluster, m),
            EPERM,
            "the new DR side took a write"
        );
    }
}

fn reverse_and_back(model: &'static str) {
    let mut g = Group::start(model);
    let next = Arc::new(AtomicU64::new(0));
    reverse_once(&mut g, &next, None);
    reverse_once(&mut g, &next, None);
    g.wait_applied();
    let names: Vec<String> = g.cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for node in names {
        g.cluster.node_mut(&node).stop();
    }
    g.assert_identical();
}

#[test]
fn an_async_group_reverses_with_no_data_loss_and_back() {
    reverse_and_back("async");
}

#[test]
fn a_hypermetro_group_reverses_with_no_data_loss_and_back() {
    reverse_and_back("hypermetro");
}

/// The coordinator dies (as by `kill -9`) right after a reverse records each of its steps,
/// and after a reprotect records a seeded one; each job resumes after the restart and ends
/// well.
#[test]
fn a_coordinator_killed_mid_reverse_and_mid_reprotect_resumes_them() {
    let seed = seed(0x9_2003);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut g = Group::start("async");
    let next = Arc::new(AtomicU64::new(0));
    for step in [
        "reverse: production refuses writes",
        "reverse: swapping sides (0 of 2",
        "reverse: swapping sides (1 of 2",
    ] {
        reverse_once(&mut g, &next, Some(step));
    }

    // An AZ failure, a failover, the zone back, and a reprotect the coordinator dies in.
    wait_consistent(&g.cluster, "app", Duration::from_secs(120));
    let writer = RecordWriter::start(
        sockets(&g.cluster, &g.production),
        Arc::clone(&next),
        RECORDS,
    );
    writer.wait_for(next.load(Ordering::SeqCst), 200, Duration::from_secs(60));
    for node in Group::nodes(&g.production) {
        g.cluster.node_mut(&node).kill9();
    }
    writer.stop();
    let job = g.start_action("failover");
    g.cluster.wait_job(&job, Duration::from_secs(60));
    let held = g.held(&g.dr);
    for node in Group::nodes(&g.production) {
        g.cluster.node_mut(&node).start();
    }
    for m in &g.production {
        wait_until(
            Duration::from_secs(30),
            "the old production side to be demoted",
            || pair_state(&g.cluster, m)["fence"] == "demoted",
        );
    }
    let step = [
        "reprotect: the old production sides become DR (0 of 2",
        "reprotect: the old production sides become DR (1 of 2",
    ][rng.random_range(0..2)];
    let job = g.start_action_crashing("reprotect", step);
    g.cluster.wait_job(&job, Duration::from_secs(180));
    std::mem::swap(&mut g.production, &mut g.dr);
    next.store(held, Ordering::SeqCst);
    let shown = g.cluster.coordinator().cli_json(&["group", "show", "app"]);
    assert_eq!(shown["status"], "available");
    assert_eq!(shown["replication_status"], "active");

    // Writes go on in the new direction and reach the other side.
    let writer = RecordWriter::start(
        sockets(&g.cluster, &g.production),
        Arc::clone(&next),
        RECORDS,
    );
    writer.wait_for(held, 200, Duration::from_secs(60));
    writer.stop();
    g.wait_applied();
    let names: Vec<String> = g.cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for node in names {
        g.cluster.node_mut(&node).stop();
    }
    g.assert_identical();
}
