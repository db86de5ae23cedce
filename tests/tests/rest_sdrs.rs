//! The SDRS v1 REST API driven by the public OTC SDK (`otcextensions`, in a venv the test
//! command makes), on a real two-zone cluster whose DR zone has a storage pool: protection
//! groups (paged, found by name, renamed), replication pairs whose DR volumes the pool
//! makes, protection started; data written over NBD; a failover, a reprotect and a reverse
//! through the API, the DR volumes holding the data each time; an extend; the refusals
//! (400, 404 for another project, 409, 501); and the teardown deleting the DR volumes.

use std::time::Duration;

use blockrep_tests::NbdClient;
use blockrep_tests::cluster::{TestCluster, sha256, wait_until};
use blockrep_tests::rest::{sdk_step, token};
use blockrep_tests::{seed, sparse_file};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;

/// Writes `count` seeded 64 KiB blocks to a volume over NBD.
fn write_blocks(
    socket: &std::path::Path,
    export: &str,
    rng: &mut rand::rngs::SmallRng,
    count: usize,
) {
    let mut client = NbdClient::connect(socket, export).unwrap();
    for _ in 0..count {
        let offset = rng.random_range(0..SIZE / (64 << 10)) * (64 << 10);
        let data: Vec<u8> = (0..64 << 10).map(|_| rng.random()).collect();
        assert_eq!(client.write(offset, &data).unwrap(), 0, "write at {offset}");
    }
    client.disconnect().unwrap();
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_otc_sdk_drives_protection_groups_whose_dr_volumes_a_pool_makes() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed(17));
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        dir.path(),
        &[("node-a", "az1"), ("node-b", "az2")],
        "[pool]\npath = \"{node_dir}/pool\"\ncapacity_bytes = \"2GiB\"\n",
    );
    let mut production = Vec::new();
    for name in ["db", "logs"] {
        let path = dir.path().join(format!("{name}.img"));
        sparse_file(&path, SIZE);
        let id = cluster.add_volume_of("node-a", name, &path, "tenant-a");
        production.push((name, path, id));
    }
    wait_until(
        Duration::from_secs(30),
        "the coordinator sees the volumes and the pool",
        || {
            let nodes = cluster.coordinator().cli_json(&["node", "list"]);
            nodes
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["pool"]["capacity_bytes"] == 2u64 << 30)
                && nodes.as_array().unwrap().iter().any(|n| n["volumes"] == 2)
        },
    );
    let api = cluster.node("node-b");
    let a = token(&cluster, "tenant-a", "a");
    let b = token(&cluster, "tenant-b", "b");
    let step = |step: &str, args: &[&str]| sdk_step(api, "tenant-a", &a, step, args);

    // Protection groups and pairs through the SDK; the pool made a DR volume per pair.
    let ids: Vec<&str> = production.iter().map(|(_, _, id)| id.as_str()).collect();
    let mut args = vec!["az1", "az2"];
    args.extend(&ids);
    let setup = step("setup", &args);
    let group = setup["group"].as_str().unwrap().to_owned();
    let pairs = strings(&setup["pairs"]);
    let dr_ids = strings(&setup["dr_volumes"]);
    let dr: Vec<(String, std::path::PathBuf)> = dr_ids
        .iter()
        .map(|id| {
            let v = cluster.node("node-b").cli_json(&["volume", "show", id]);
            assert_eq!(v["pool"], true, "{v}");
            assert_eq!(v["project_id"], "tenant-a");
            (
                v["name"].as_str().unwrap().to_owned(),
                v["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    wait_until(
        Duration::from_secs(10),
        "the pool holds the two DR volumes",
        || {
            let nodes = cluster.coordinator().cli_json(&["node", "list"]);
            let used: u64 = nodes
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["pool"]["used_bytes"].as_u64().unwrap())
                .sum();
            used == 2 * SIZE
        },
    );

    // Data written to production over NBD is on the DR volumes after a failover.
    for (name, _, _) in &production {
        write_blocks(
            &cluster.node("node-a").daemon().nbd_socket(name),
            name,
            &mut rng,
            64,
        );
    }
    assert_eq!(step("act", &[&group, "failover"])["status"], "failed-over");
    for ((_, prod, _), (_, dr)) in production.iter().zip(&dr) {
        assert_eq!(
            sha256(prod),
            sha256(dr),
            "the DR volume holds what production had"
        );
    }
    // Reprotect: the old production volumes become the DR side; writes on the new
    // production (the pool's volumes) reach them; a reverse brings production home.
    assert_eq!(
        step("act", &[&group, "reprotect"])["priority_station"],
        "target"
    );
    for (name, _) in &dr {
        write_blocks(
            &cluster.node("node-b").daemon().nbd_socket(name),
            name,
            &mut rng,
            32,
        );
    }
    assert_eq!(
        step("act", &[&group, "reverse-to-source"])["priority_station"],
        "source"
    );
    for ((_, prod, _), (_, dr)) in production.iter().zip(&dr) {
        assert_eq!(
            sha256(prod),
            sha256(dr),
            "both sides match after the reverse"
        );
    }

    // An extend through the SDK grows both volumes of the pair.
    assert_eq!(step("extend", &[&pairs[0], "1"])["volume_size"], 1);
    assert_eq!(std::fs::metadata(&dr[0].1).unwrap().len(), 1 << 30);

    // The refusals, and another project's view.
    let messages = step("refusals", &["tenant-b", &b, &group, &pairs[0]]);
    for key in [
        "bad_domain",
        "reverse_to_itself",
        "delete_busy_group",
        "other_project",
        "instances",
        "drills",
    ] {
        assert!(messages[key].is_string(), "{key}: {messages}");
    }
    assert!(
        messages["instances"].as_str().unwrap().contains("servers"),
        "{messages}"
    );

    // Drills of an async protection group that keeps points (the operator's retention):
    // made, shown and renamed through the SDK, its drill volume served by the DR agent and
    // holding what production had at the point, then deleted.
    let app = dir.path().join("app.img");
    sparse_file(&app, SIZE);
    let app_id = cluster.add_volume_of("node-a", "app", &app, "tenant-a");
    wait_until(
        Duration::from_secs(30),
        "the coordinator sees volume app",
        || {
            cluster
                .coordinator()
                .cli_json(&["node", "list"])
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["volumes"] == 3)
        },
    );
    let made = step("async_setup", &["az1", "az2", &app_id]);
    let async_group = made["group"].as_str().unwrap().to_owned();
    let async_pair = made["pair"].as_str().unwrap().to_owned();
    cluster
        .coordinator()
        .cli_json(&["group", "update", &async_group, "--retention", "1h"]);
    write_blocks(
        &cluster.node("node-a").daemon().nbd_socket("app"),
        "app",
        &mut rng,
        64,
    );
    let open_epoch = cluster.node("node-a").cli_json(&["status"])["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["volume_name"] == "app")
        .map(|p| p["current_epoch"].as_u64().unwrap())
        .unwrap();
    wait_until(Duration::from_secs(60), "a point after the writes", || {
        let points = cluster
            .coordinator()
            .cli_json(&["group", "points", &async_group]);
        points["points"]
            .as_array()
            .and_then(|p| p.last())
            .is_some_and(|p| p["epoch"].as_u64().unwrap() > open_epoch)
    });
    let drill = step("drills", &["tenant-b", &b, &async_group]);
    let drill_id = drill["drill"].as_str().unwrap().to_owned();
    let socket = cluster
        .node("node-b")
        .daemon()
        .nbd_socket("drill-a-rep-app");
    let mut client = NbdClient::connect(&socket, "drill-a-rep-app").unwrap();
    let mut image = Vec::with_capacity(SIZE as usize);
    for offset in (0..SIZE).step_by(1 << 20) {
        image.extend(client.read(offset, 1 << 20).unwrap());
    }
    client.disconnect().unwrap();
    assert!(
        image == std::fs::read(&app).unwrap(),
        "the drill volume does not hold what production had"
    );
    step("drill_done", &[&drill_id]);
    assert_eq!(step("act", &[&async_group, "stop"])["status"], "available");
    step("teardown", &[&async_group, &async_pair]);

    // Teardown: protection stopped, pairs deleted with their DR volumes, the group deleted.
    assert_eq!(step("act", &[&group, "stop"])["status"], "available");
    let mut args = vec![group.as_str()];
    args.extend(pairs.iter().map(String::as_str));
    step("teardown", &args);
    for (_, path) in &dr {
        assert!(!path.exists(), "{} was deleted", path.display());
    }
    // The coordinator sees the pool empty with the DR node's next report.
    wait_until(Duration::from_secs(10), "the pools are empty", || {
        let nodes = cluster.coordinator().cli_json(&["node", "list"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["pool"]["used_bytes"] == 0)
    });
    for (_, prod, _) in &production {
        assert!(prod.exists(), "production volumes stay");
    }
}
