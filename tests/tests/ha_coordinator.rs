//! An HA coordinator: three candidates (one per zone, az3 the witness) on a three-member
//! etcd, the agents of two zones, and a consistency group of two pairs.
//!
//! - The leader is killed (`kill -9`, by the test-only crash hook) right after it records a
//!   step of a reverse (seeded), a failover (its plan) and a reprotect (seeded): another
//!   candidate leads within two lease TTLs, and each job finishes from its recorded plan;
//!   the write-order checker's prefix holds on every side that takes over.
//! - The leader paused past its lease and resumed changes nothing.
//! - Without an etcd quorum the coordinator stops changing state, saying why, while data
//!   replicates on; it resumes with the quorum.

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

// Room for every test's writes (the volumes are sparse files of RECORDS / 2 records).
const RECORDS: u64 = 128 * 1024;
const EPERM: u32 = 1;
// Short, so the tests are quick; long enough that a loaded machine's pauses do not cost
// the leader its lease.
const LEASE_TTL: Duration = Duration::from_secs(3);
const CANDIDATES: [&str; 3] = ["co-1", "co-2", "co-3"];

struct Ha {
    cluster: TestCluster,
    // Dropped after the cluster: the daemons stop before etcd does.
    etcd: std::cell::RefCell<EtcdCluster>,
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
            etcd: std::cell::RefCell::new(etcd),
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
        // Each candidate says itself whether it leads (its metrics): asked directly, not
        // through calls that first try the dead leader.
        let mut next = None;
        wait_until(
            2 * LEASE_TTL + Duration::from_secs(5),
            "a new leader",
            || {
                next = CANDIDATES
                    .iter()
                    .filter(|c| **c != leader)
                    .find(|c| metric(self, c, "blockrep_coordinator_leading") == 1)
                    .map(|c| c.to_string());
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

    /// Once the group has a consistent point: records written on its production side from
    /// `next` on, at least `count` of them answered before this returns.
    fn start_writing(&self, next: &Arc<AtomicU64>, count: u64) -> RecordWriter {
        wait_consistent(&self.cluster, "app", Duration::from_secs(120));
        let from = next.load(Ordering::SeqCst);
        let writer = RecordWriter::start(
            sockets(&self.cluster, &self.production),
            Arc::clone(next),
            RECORDS,
        );
        writer.wait_for(from, count, Duration::from_secs(60));
        writer
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
    let writer = ha.start_writing(&next, 200);
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

    // The production zone lost, a failover, the leader dying at its plan's step.
    let writer = ha.start_writing(&next, 200);
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
    ha.start_writing(&next, 200).stop();
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

/// The group as the coordinator shows it, asked through `via` (not a candidate that may be
/// paused).
fn group_via(ha: &Ha, via: &str) -> serde_json::Value {
    ha.cluster.node(via).cli_json(&["group", "show", "app"])
}

/// The node that leads, as `via` reads the node list (None while no coordinator answers).
fn leader_via(ha: &Ha, via: &str) -> Option<String> {
    let out = ha
        .cluster
        .node(via)
        .daemon()
        .cli(&["--output", "json", "node", "list"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    nodes
        .as_array()?
        .iter()
        .find(|n| n["coordinator_role"] == "leader")
        .and_then(|n| n["name"].as_str().map(str::to_owned))
}

/// A counter or gauge of a node's metrics (the test fails if the node does not serve it).
fn metric(ha: &Ha, node: &str, name: &str) -> u64 {
    let text = ha.cluster.node(node).metrics();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("node {node} serves no metric {name}:\n{text}"))
}

fn stale_term_refusals(ha: &Ha) -> u64 {
    ["node-a", "node-b"]
        .iter()
        .map(|n| {
            metric(
                ha,
                n,
                "blockrep_requests_refused_total{reason=\"stale_term\"}",
            )
        })
        .sum()
}

/// The leader paused (`SIGSTOP`) past its lease: another candidate leads and carries the
/// group on (its cuts commit, a reverse finishes); the paused one resumed (`SIGCONT`) steps
/// down, and whatever it still sends changes nothing: every record answered is on the side
/// that took over, and the old side refuses writes.
#[test]
fn a_paused_leader_that_resumes_changes_nothing() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let mut ha = Ha::start("async");
    let next = Arc::new(AtomicU64::new(0));
    let writer = ha.start_writing(&next, 200);

    let paused = ha.wait_leader(Duration::from_secs(30));
    let pid = Pid::from_raw(ha.cluster.node(&paused).daemon().pid() as i32);
    let consistent = number(&group_via(&ha, "node-b"), "consistent_epoch");
    kill(pid, Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();

    // Another leads, and acts: its cuts commit past the paused leader's last one.
    let mut next_leader = None;
    wait_until(Duration::from_secs(30), "another leader", || {
        next_leader = leader_via(&ha, "node-b").filter(|l| *l != paused);
        next_leader.is_some()
    });
    let next_leader = next_leader.unwrap();
    eprintln!(
        "{paused} paused; {next_leader} leads {:.2} s later",
        stopped.elapsed().as_secs_f64()
    );
    wait_until(Duration::from_secs(30), "a cut of the new leader", || {
        number(&group_via(&ha, "node-b"), "consistent_epoch") > consistent
    });
    let refused_before = stale_term_refusals(&ha);

    // The paused leader resumes, with its plans and loops as they were: it steps down.
    kill(pid, Signal::SIGCONT).unwrap();
    wait_until(
        Duration::from_secs(3) * LEASE_TTL.as_secs() as u32,
        "the resumed leader to step down",
        || metric(&ha, &paused, "blockrep_coordinator_leading") == 0,
    );
    assert_eq!(
        leader_via(&ha, "node-b").as_deref(),
        Some(next_leader.as_str())
    );
    let refused = stale_term_refusals(&ha) - refused_before;
    let fenced = metric(&ha, &paused, "blockrep_coordinator_commits_fenced_total");
    eprintln!(
        "after it resumed: {refused} of its agent commands refused for their term, {fenced} of its commits refused by etcd"
    );

    // The new leader reverses the group: nothing the old one sent moved a side or lost a
    // record.
    let cut = number(&group_via(&ha, "node-b"), "consistent_epoch");
    wait_until(Duration::from_secs(30), "cuts go on", || {
        number(&group_via(&ha, "node-b"), "consistent_epoch") > cut
    });
    let started = ha
        .cluster
        .node("node-b")
        .cli_json(&["group", "reverse", "app"]);
    let job = started["job_id"].as_str().unwrap().to_owned();
    let out = ha
        .cluster
        .node("node-b")
        .daemon()
        .cli(&["job", "wait", &job, "--timeout", "180"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ha.cluster.log_tails(40)
    );
    let answered = writer.stop();
    std::mem::swap(&mut ha.production, &mut ha.dr);
    let held = ha.held(&ha.production);
    eprintln!("{held} records held of {answered} answered");
    assert!(
        held == answered || held == answered + 1,
        "{held} of {answered}"
    );
    for m in &ha.dr {
        assert_eq!(
            write_error(&ha.cluster, m),
            EPERM,
            "the old side took a write"
        );
    }
}

/// etcd with one member of three down goes on, and so does the coordinator. With two down
/// there is no quorum: the coordinator changes nothing and says why, while data still
/// replicates (writes are answered and shipped to the DR side). With a member back, the
/// coordinator leads again and the group's consistent point moves on.
#[test]
fn the_coordinator_stops_without_an_etcd_quorum_and_resumes_with_it() {
    let ha = Ha::start("async");
    let mut etcd = ha.etcd.borrow_mut();
    let next = Arc::new(AtomicU64::new(0));
    let writer = ha.start_writing(&next, 100);

    // One member down: cuts go on, and a change commits.
    etcd.kill(0);
    let consistent = number(&group_via(&ha, "node-b"), "consistent_epoch");
    wait_until(Duration::from_secs(30), "cuts with one member down", || {
        number(&group_via(&ha, "node-b"), "consistent_epoch") > consistent
    });
    ha.cluster
        .node("node-b")
        .cli_json(&["api", "token", "create", "--project", "one-member-down"]);

    // Two down: no quorum. Calls that need the coordinator fail, saying why.
    etcd.kill(1);
    let mut said = String::new();
    wait_until(
        Duration::from_secs(30),
        "the coordinator to say it has no quorum",
        || {
            let out = ha
                .cluster
                .node("node-b")
                .daemon()
                .cli(&["group", "show", "app"]);
            said = String::from_utf8_lossy(&out.stderr).into_owned();
            !out.status.success() && said.contains("no quorum")
        },
    );
    eprintln!("without a quorum: {said}");
    // Data replicates on: writes are answered, and shipped to the DR side (which stages
    // them until a commit).
    let sent = |ha: &Ha| -> u64 {
        ha.production
            .iter()
            .map(|m| {
                pair_state(&ha.cluster, m)["counters"]["bytes_sent"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum()
    };
    let before = (next.load(Ordering::SeqCst), sent(&ha));
    // Without cuts the open epoch's writes are sent in batches of a sixteenth of the journal
    // (16 MiB), so that overwrites coalesce: more than that is written.
    writer.wait_for(before.0, 5000, Duration::from_secs(120));
    wait_until(
        Duration::from_secs(30),
        "writes shipped to the DR side",
        || sent(&ha) > before.1,
    );

    // A member back: a leader again, and the consistent point moves on.
    etcd.start_member(1);
    etcd.wait_healthy(Duration::from_secs(30));
    let mut resumed_at = 0;
    wait_until(Duration::from_secs(60), "the coordinator back", || {
        let out = ha
            .cluster
            .node("node-b")
            .daemon()
            .cli(&["--output", "json", "group", "show", "app"]);
        let Ok(group) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        resumed_at = number(&group, "consistent_epoch");
        out.status.success()
    });
    wait_until(Duration::from_secs(30), "cuts again", || {
        number(&group_via(&ha, "node-b"), "consistent_epoch") > resumed_at
    });
    let answered = writer.stop();
    assert!(answered > before.0 + 5000, "{answered}");
}
