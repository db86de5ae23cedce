//! The coordinator dies (as by `kill -9`) in the middle of creating a pair: right after
//! recording it, and right after the DR agent took its role. After its restart the pair is
//! there and becomes active, and no volume is left holding a role the coordinator does not
//! know. A DR agent that does not answer leaves the pair to the driver, which completes it
//! once the agent is back.

use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, wait_until};
use blockrep_tests::sparse_file;

const MIB: u64 = 1 << 20;

/// A coordinator of its own (node-co), volume `prod` on node-a and `dr` on node-b.
fn cluster_with_two_volumes(dir: &std::path::Path) -> TestCluster {
    let cluster = TestCluster::start(
        dir,
        &[("node-co", "az3"), ("node-a", "az1"), ("node-b", "az2")],
        "",
    );
    for (node, volume) in [("node-a", "prod"), ("node-b", "dr")] {
        let path = dir.join(format!("{volume}.img"));
        sparse_file(&path, 64 * MIB);
        cluster.add_volume(node, volume, &path);
    }
    cluster
}

fn create_with_the_coordinator_dying_at(step: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = cluster_with_two_volumes(dir.path());
    let co = cluster.node_mut("node-co");
    co.stop();
    co.env = vec![("BLOCKREP_FAULT_COORDINATOR_CRASH_AT".into(), step.into())];
    co.start();
    cluster.wait_nodes_alive();
    // The coordinator dies before it answers.
    let out = cluster.coordinator().daemon().cli(&[
        "pair",
        "create",
        "--name",
        "p",
        "--volumes",
        "prod,dr",
        "--priority-station",
        "az1",
        "--model",
        "async",
    ]);
    assert!(!out.status.success(), "the coordinator answered");
    assert!(
        cluster
            .node_mut("node-co")
            .wait_crash(Duration::from_secs(30)),
        "the coordinator never reached {step:?}"
    );
    let co = cluster.node_mut("node-co");
    co.env.clear();
    co.start();
    cluster.wait_nodes_alive();

    // The pair the coordinator recorded is completed.
    let pairs = cluster.coordinator().cli_json(&["pair", "list"]);
    let pairs = pairs.as_array().unwrap();
    assert_eq!(pairs.len(), 1, "{step}: {pairs:?}");
    let pair = pairs[0]["id"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(60), "the pair to become active", || {
        let p = cluster.pair(&pair);
        p["status"] == "available" && p["replication_status"] == "active"
    });
    // And the volumes' agents say they are in that pair, and no other.
    for (node, volume) in [("node-a", "prod"), ("node-b", "dr")] {
        let v = cluster.node(node).cli_json(&["volume", "show", volume]);
        assert_eq!(v["pair_id"], pair.as_str(), "{step}: {node} {v}");
    }
}

#[test]
fn a_coordinator_dying_after_recording_a_pair_completes_it_after_its_restart() {
    create_with_the_coordinator_dying_at("pair recorded");
}

#[test]
fn a_coordinator_dying_after_the_dr_agent_took_its_role_completes_the_pair() {
    create_with_the_coordinator_dying_at("DR role taken");
}

/// The DR agent dies just before a pair is created, so the request for its role gets no
/// answer. The pair is kept (creating, its job running) and completed once the agent is
/// back: had the agent taken the role and only its answer been lost, forgetting the pair
/// would leave a DR role nobody knows.
#[test]
fn a_pair_whose_dr_agent_does_not_answer_is_completed_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = cluster_with_two_volumes(dir.path());
    cluster.wait_nodes_alive();
    cluster.node_mut("node-b").kill9();
    let (pair, job) = cluster.create_pair("p", "prod,dr", "az1", "async");
    assert_eq!(cluster.pair(&pair)["status"], "creating");

    cluster.node_mut("node-b").start();
    cluster.wait_job(&job, Duration::from_secs(120));
    wait_until(Duration::from_secs(60), "the pair to become active", || {
        let p = cluster.pair(&pair);
        p["status"] == "available" && p["replication_status"] == "active"
    });
    let v = cluster.node("node-b").cli_json(&["volume", "show", "dr"]);
    assert_eq!(v["pair_id"], pair.as_str(), "{v}");
}
