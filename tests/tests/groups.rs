//! Consistency groups through the CLI on a real two-node cluster: create, show, list, and
//! every refusal of create, update and delete with the seed's code and a message naming the
//! rule, with nothing changed; stop (writes tracked, the DR side untouched), update, sync
//! (the DR side catches up), delete.

use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, wait_until};
use blockrep_tests::{NbdClient, sparse_file};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn refused(cluster: &TestCluster, args: &[&str]) -> String {
    let out = cluster.coordinator().daemon().cli(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

fn create<'a>(name: &'a str, pairs: &'a str, az: &'a str, model: &'a str) -> Vec<&'a str> {
    vec![
        "group",
        "create",
        "--name",
        name,
        "--pairs",
        pairs,
        "--priority-station",
        az,
        "--model",
        model,
    ]
}

#[test]
fn groups_are_created_shown_and_every_bad_request_is_refused_with_nothing_changed() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    // db and logs: async pairs az1 → az2; meta: hypermetro; back: async az2 → az1.
    for (node, name) in [
        ("node-a", "db"),
        ("node-a", "logs"),
        ("node-a", "meta"),
        ("node-a", "back-dr"),
        ("node-b", "db-dr"),
        ("node-b", "logs-dr"),
        ("node-b", "meta-dr"),
        ("node-b", "back"),
    ] {
        let path = dir.path().join(format!("{name}.img"));
        sparse_file(&path, 16 * MIB);
        cluster.add_volume(node, name, &path);
    }
    let mut jobs = Vec::new();
    for (name, volumes, az, model) in [
        ("db", "db,db-dr", "az1", "async"),
        ("logs", "logs,logs-dr", "az1", "async"),
        ("meta", "meta,meta-dr", "az1", "hypermetro"),
        ("back", "back,back-dr", "az2", "async"),
    ] {
        jobs.push(cluster.create_pair(name, volumes, az, model));
    }
    for (_, job) in &jobs {
        cluster.wait_job(job, Duration::from_secs(120));
    }

    let long = "x".repeat(256);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "group",
                "create",
                "--name",
                "g",
                "--priority-station",
                "az1",
                "--model",
                "async",
            ],
            "invalid argument (400): a consistency group needs at least one pair",
        ),
        (
            create("g", "nope", "az1", "async"),
            "not found (404): no pair \"nope\"",
        ),
        (
            create("g", "db,db", "az1", "async"),
            "invalid argument (400): pair \"db\" is listed twice",
        ),
        (
            create("g", "db,meta", "az1", "async"),
            "invalid argument (400): pair meta is hypermetro, not async",
        ),
        (
            create("g", "db,back", "az1", "async"),
            "invalid argument (400): pair back's priority station is az2, not az1",
        ),
        (
            create("g", "db", "az1", "sync"),
            "invalid argument (400): replication_model: \"sync\" is not a ReplicationModel",
        ),
        (
            create(&long, "db", "az1", "async"),
            "invalid argument (400): name is 256 bytes; the limit is 255",
        ),
    ];
    for (args, expected) in &cases {
        let err = refused(&cluster, args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert_eq!(
        cluster.coordinator().cli_json(&["group", "list"]),
        serde_json::json!([])
    );

    // A good group.
    let created = cluster
        .coordinator()
        .cli_json(&create("app", "db,logs", "az1", "async"));
    let group = created["replication_consistency_group"].clone();
    let id = group["id"].as_str().unwrap().to_owned();
    assert_eq!(group["status"], "available");
    assert_eq!(group["priority_station"], "az1");
    assert_eq!(group["replication_model"], "async");
    let job = created["job_id"].as_str().unwrap();
    assert_eq!(
        cluster.coordinator().cli_json(&["job", "show", job])["status"],
        "SUCCESS"
    );
    let shown = cluster.coordinator().cli_json(&["group", "show", "app"]);
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["replication_ids"].as_array().unwrap().len(), 2);
    assert_eq!(shown["fault_level"], 0);
    let pair_group = |pair: &str| -> Value {
        cluster.coordinator().cli_json(&["pair", "show", pair])["replication_consistency_group_id"]
            .clone()
    };
    assert_eq!(pair_group("db"), id.as_str());
    assert_eq!(pair_group("meta"), Value::Null);
    // Visible in `blockrep status` on the nodes of its pairs, and in the metrics.
    let status = cluster.node("node-b").daemon().cli(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("group app available replication:active fault-level:0 pairs:2"),
        "{status}"
    );
    let metrics = cluster.coordinator().metrics();
    assert!(
        metrics.contains("blockrep_group_fault_level{group=\"app\",model=\"async\"} 0"),
        "{metrics}"
    );

    // Refusals against the group's state, each changing nothing.
    let conflicts: Vec<(Vec<&str>, String)> = vec![
        (
            create("other", "db", "az1", "async"),
            "refused (409): pair db is already in consistency group app".into(),
        ),
        (
            vec!["pair", "delete", "logs"],
            "refused (409): pair logs is in consistency group app".into(),
        ),
        (
            vec!["group", "delete", "app"],
            "refused (409): delete refused: the group still has pairs".into(),
        ),
        (
            vec!["group", "update", "app", "--name", "renamed"],
            "refused (409): update refused: the group must be stopped first".into(),
        ),
        (
            vec!["group", "show", "nope"],
            "not found (404): no consistency group \"nope\"".into(),
        ),
        (
            vec!["group", "reprotect", "app"],
            "refused (409): reprotect refused: reprotect only follows a failover (status failovered)".into(),
        ),
    ];
    for (args, expected) in &conflicts {
        let err = refused(&cluster, args);
        assert!(err.contains(expected.as_str()), "{args:?}: {err}");
    }
    let after = cluster.coordinator().cli_json(&["group", "show", &id]);
    assert_eq!(after["name"], "app");
    assert_eq!(after["replication_ids"], shown["replication_ids"]);
    assert_eq!(
        cluster
            .coordinator()
            .cli_json(&["pair", "list"])
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Stop: every pair pauses; writes go on, tracked, and do not reach the DR volume.
    let stop = cluster.coordinator().cli_json(&["group", "stop", "app"]);
    cluster.wait_job(stop["job_id"].as_str().unwrap(), Duration::from_secs(60));
    let stopped = cluster.coordinator().cli_json(&["group", "show", "app"]);
    assert_eq!(stopped["replication_status"], "active-stopped");
    let mut c =
        NbdClient::connect(&cluster.node("node-a").daemon().nbd_socket("db"), "db").unwrap();
    assert_eq!(c.write(0, &[0x5a; 4096]).unwrap(), 0);
    c.disconnect().unwrap();
    let dr_first_block = || {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 4096];
        std::fs::File::open(dir.path().join("db-dr.img"))
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        buf
    };
    wait_until(Duration::from_secs(10), "the write to be tracked", || {
        cluster.node("node-a").cli_json(&["volume", "show", "db"])["dirty_bytes"]
            .as_u64()
            .unwrap_or(0)
            >= 4096
    });
    assert_eq!(
        cluster.coordinator().cli_json(&["pair", "show", "db"])["replication_status"],
        "active-stopped"
    );
    assert_eq!(dr_first_block(), [0; 4096], "a stopped pair copies nothing");
    let err = refused(&cluster, &["group", "reverse", "app"]);
    assert!(
        err.contains(
            "refused (409): reverse refused: a planned reverse needs the group replicating (active)"
        ),
        "{err}"
    );

    // Update while stopped: rename, and take logs out (it replicates on its own again).
    let updated = cluster.coordinator().cli_json(&[
        "group",
        "update",
        "app",
        "--name",
        "app2",
        "--remove-pairs",
        "logs",
    ]);
    assert_eq!(updated["replication_consistency_group"]["name"], "app2");
    assert_eq!(pair_group("logs"), Value::Null);
    wait_until(Duration::from_secs(30), "logs to replicate again", || {
        cluster.coordinator().cli_json(&["pair", "show", "logs"])["replication_status"] == "active"
    });

    // Sync: db catches up, and the group is active again.
    let sync = cluster.coordinator().cli_json(&["group", "sync", "app2"]);
    cluster.wait_job(sync["job_id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(
        cluster.coordinator().cli_json(&["group", "show", "app2"])["replication_status"],
        "active"
    );
    wait_until(
        Duration::from_secs(30),
        "the DR side to apply the catch-up",
        || dr_first_block() == [0x5a; 4096],
    );
    let err = refused(
        &cluster,
        &["group", "update", "app2", "--remove-pairs", "db"],
    );
    assert!(
        err.contains("refused (409): update refused: the group must be stopped first"),
        "{err}"
    );

    // Stop, empty and delete it.
    let stop = cluster.coordinator().cli_json(&["group", "stop", "app2"]);
    cluster.wait_job(stop["job_id"].as_str().unwrap(), Duration::from_secs(60));
    cluster
        .coordinator()
        .cli_json(&["group", "update", "app2", "--remove-pairs", "db"]);
    let deleted = cluster.coordinator().cli_json(&["group", "delete", "app2"]);
    assert_eq!(
        deleted["replication_consistency_group"]["status"],
        "deleting"
    );
    assert_eq!(
        cluster.coordinator().cli_json(&["group", "list"]),
        serde_json::json!([])
    );
    wait_until(
        Duration::from_secs(30),
        "db to replicate on its own again",
        || {
            cluster.coordinator().cli_json(&["pair", "show", "db"])["replication_status"]
                == "active"
        },
    );
}
