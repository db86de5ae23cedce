//! Points in time of an async group (docs/POINT-IN-TIME.md), checked by the write-order
//! checker: a writer puts numbered, checksummed records on the group's two production
//! volumes in turn, each issued only once the one before was answered. Between seeded
//! bursts of writes the writer pauses and the group's newest point is noted with the
//! records answered by then. A "ransomware" pass then overwrites the first records, and
//! the group fails over to a point noted before it: the DR volumes must hold exactly the
//! records answered by that point, nothing after. Reprotect then copies only what differs,
//! and both sides end identical.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockrep_tests::cluster::{TestCluster, sha256, wait_until};
use blockrep_tests::group::{
    Member, RecordWriter, create_group_of_two, number, pair_state, sockets, wait_consistent,
    write_error,
};
use blockrep_tests::records::{RECORD, place, prefix_length_across};
use blockrep_tests::{NbdClient, seed, sparse_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const RECORDS: u64 = 16 * 1024;
const EPERM: u32 = 1;

/// The group's points: (epoch, bytes of undo behind it), oldest first.
fn points(cluster: &TestCluster) -> Vec<(u64, u64)> {
    let listed = cluster.coordinator().cli_json(&["group", "points", "app"]);
    listed["points"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|p| (number(p, "epoch"), number(p, "bytes_behind")))
        .collect()
}

fn newest_point(cluster: &TestCluster) -> u64 {
    points(cluster).last().map_or(0, |p| p.0)
}

/// The drill volume `export` on node-b, read whole over NBD into a file of `dir`.
fn read_drill_volume(cluster: &TestCluster, dir: &Path, export: &str) -> PathBuf {
    let socket = cluster.node("node-b").daemon().nbd_socket(export);
    let mut client = NbdClient::connect(&socket, export).unwrap();
    let size = RECORDS / 2 * RECORD;
    let mut image = Vec::with_capacity(size as usize);
    for offset in (0..size).step_by(1 << 20) {
        image.extend(
            client
                .read(offset, (1u64 << 20).min(size - offset) as u32)
                .unwrap(),
        );
    }
    client.disconnect().unwrap();
    let path = dir.join(format!("{export}.read"));
    std::fs::write(&path, image).unwrap();
    path
}

fn drill_each_point(cluster: &TestCluster, dir: &Path, noted: &[(u64, u64)], seed: u64) {
    let dr_before = [sha256(&dir.join("d1.img")), sha256(&dir.join("d2.img"))];
    for (k, (point, answered)) in noted.iter().enumerate() {
        let name = format!("drill{k}");
        let started = Instant::now();
        let drill = cluster.coordinator().cli_json(&[
            "group",
            "drill",
            "create",
            "app",
            "--name",
            &name,
            "--point",
            &point.to_string(),
        ]);
        eprintln!(
            "drill {name} at point {point} made in {:?}",
            started.elapsed()
        );
        assert_eq!(drill["point_epoch"], *point, "{drill}");
        let exports: Vec<String> = ["g1", "g2"].iter().map(|p| format!("{name}-{p}")).collect();
        let images: Vec<PathBuf> = exports
            .iter()
            .map(|e| read_drill_volume(cluster, dir, e))
            .collect();
        let held = prefix_length_across(&[&images[0], &images[1]], RECORDS)
            .unwrap_or_else(|e| panic!("seed {seed}: drill at {point}: {e}"));
        assert_eq!(
            held, *answered,
            "seed {seed}: the drill at point {point} holds records 0..{held}, not 0..{answered}"
        );
        // The drill takes writes; they stay in it.
        let socket = cluster.node("node-b").daemon().nbd_socket(&exports[0]);
        let mut client = NbdClient::connect(&socket, &exports[0]).unwrap();
        assert_eq!(client.write(0, &[0x5a; RECORD as usize]).unwrap(), 0);
        assert_eq!(client.read(0, 16).unwrap(), vec![0x5a; 16]);
        client.disconnect().unwrap();
        // Marked as a drill in the DR agent's status and metrics.
        let status = cluster.node("node-b").cli_json(&["status"]);
        let shown = status["drills"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["export"] == exports[0].as_str())
            .cloned()
            .unwrap_or_else(|| panic!("drill {} not in status: {status}", exports[0]));
        assert_eq!(shown["role"], "drill");
        assert_eq!(shown["point_epoch"], *point);
        assert!(
            shown["written_bytes"].as_u64().unwrap() >= RECORD,
            "{shown}"
        );
        let metrics = cluster.node("node-b").metrics();
        assert!(
            metrics.contains(&format!("drill_written_bytes{{export=\"{}\"", exports[0])),
            "no drill metric for {}",
            exports[0]
        );
        // Its image at the point matches production's digests of that point (the drill's
        // own write above is not part of the point).
        let verified = verify_drill(cluster, &name, seed);
        let written = answered / 2 * RECORD;
        for v in verified["volumes"].as_array().unwrap() {
            assert_eq!(v["state"], "done", "seed {seed}: {verified}");
            assert_eq!(v["differing_bytes"], 0, "seed {seed}: {verified}");
            assert!(
                number(v, "compared_bytes") >= written / 2,
                "seed {seed}: the drill at {point} compared less than half of the {written} bytes written to each volume by then: {verified}"
            );
        }
    }
    // A block of the DR volume changed behind the agent is found by a drill at a point it
    // has not changed since, and only that block; put back, the drill is clean again.
    let (last, _) = *noted.last().unwrap();
    let name = format!("drill{}", noted.len() - 1);
    let of_d1 = |v: &serde_json::Value| -> (serde_json::Value, serde_json::Value) {
        let volumes = v["volumes"].as_array().unwrap();
        let (d1, d2): (Vec<_>, Vec<_>) = volumes
            .iter()
            .cloned()
            .partition(|v| v["export"] == format!("{name}-g1").as_str());
        (d1[0].clone(), d2[0].clone())
    };
    let verified = verify_drill(cluster, &name, seed);
    let block = compared_block(&of_d1(&verified).0, seed);
    let d1 = dir.join("d1.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&d1)
        .unwrap();
    let mut kept = vec![0u8; 4096];
    file.read_exact_at(&mut kept, block).unwrap();
    let mut changed = kept.clone();
    changed[100] ^= 0xff;
    file.write_all_at(&changed, block).unwrap();
    file.sync_all().unwrap();
    let out = cluster
        .coordinator()
        .daemon()
        .cli(&["--output", "json", "group", "drill", "verify", &name]);
    assert!(
        !out.status.success(),
        "seed {seed}: a drill verify that found a difference succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (d1_found, d2_found) = of_d1(&found);
    assert_eq!(
        d1_found["differing"],
        serde_json::json!([{ "offset": block, "length": 64 << 10 }]),
        "seed {seed}: the drill at {last} after block {block} of d1 changed: {found}"
    );
    assert_eq!(d2_found["differing_bytes"], 0, "{found}");
    file.write_all_at(&kept, block).unwrap();
    file.sync_all().unwrap();
    let again = verify_drill(cluster, &name, seed);
    assert_eq!(of_d1(&again).0["differing_bytes"], 0, "{again}");
    let listed = cluster
        .coordinator()
        .cli_json(&["group", "drill", "list", "app"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(noted.len()),
        "{listed}"
    );
    for k in 0..noted.len() {
        cluster
            .coordinator()
            .cli_json(&["group", "drill", "delete", &format!("drill{k}")]);
    }
    assert_eq!(
        [sha256(&dir.join("d1.img")), sha256(&dir.join("d2.img"))],
        dr_before,
        "seed {seed}: a drill changed a DR volume"
    );
}

/// Verifies drill `name` and waits for the end, requiring success (nothing differs).
fn verify_drill(cluster: &TestCluster, name: &str, seed: u64) -> serde_json::Value {
    let started = Instant::now();
    let verified = cluster
        .coordinator()
        .cli_json(&["group", "drill", "verify", name]);
    eprintln!(
        "seed {seed}: drill {name} verified in {:?}: {verified}",
        started.elapsed()
    );
    assert_eq!(verified["done"], true, "{verified}");
    verified
}

/// The offset of a 64 KiB block of a verified drill volume that was compared: the last
/// one not listed as not comparable (the first ones were overwritten since, by the
/// "ransomware": the drill reads them from undo records).
fn compared_block(volume: &serde_json::Value, seed: u64) -> u64 {
    let block = 64 << 10;
    let gaps: Vec<(u64, u64)> = volume["not_comparable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                number(r, "offset"),
                number(r, "offset") + number(r, "length"),
            )
        })
        .collect();
    (0..RECORDS / 2 * RECORD / block)
        .rev()
        .map(|i| i * block)
        .find(|b| !gaps.iter().any(|(s, e)| s <= b && b < e))
        .unwrap_or_else(|| panic!("seed {seed}: no block was compared: {volume}"))
}

/// Waits until the group holds a point after every epoch the production volumes have
/// opened so far (so every record answered before this call is in it); returns it.
fn point_after_the_writes(cluster: &TestCluster, production: &[Member]) -> u64 {
    let open = production
        .iter()
        .map(|m| number(&pair_state(cluster, m), "current_epoch"))
        .max()
        .unwrap();
    let mut point = 0;
    wait_until(Duration::from_secs(60), "a point after the writes", || {
        point = newest_point(cluster);
        point > open
    });
    point
}

#[test]
fn an_async_group_fails_over_to_a_point_before_the_damage_and_reprotects() {
    fail_over_to_a_point(0x9_1801, false);
}

/// The DR agent dies (as with `kill -9`) halfway through writing a volume back to the
/// point; restarted, it takes no replication until the failover, carried on by the
/// coordinator, rolls back again and completes: the same prefix.
#[test]
fn a_rollback_cut_short_by_the_dr_agent_dying_completes_when_it_returns() {
    fail_over_to_a_point(0x9_1802, true);
}

fn fail_over_to_a_point(default_seed: u64, dies_mid_rollback: bool) {
    let seed = seed(default_seed);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let image = |name: &str| dir.path().join(format!("{name}.img"));
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
    for (node, name) in [
        ("node-a", "p1"),
        ("node-c", "p2"),
        ("node-b", "d1"),
        ("node-b", "d2"),
    ] {
        sparse_file(&image(name), RECORDS / 2 * RECORD);
        cluster.add_volume(node, name, &image(name));
    }
    create_group_of_two(&cluster, "async");
    let mut cluster = cluster;
    if dies_mid_rollback {
        cluster
            .node_mut("node-b")
            .restart_with_fault("BLOCKREP_FAULT_ROLLBACK_DIES", "1");
    }
    let refused =
        cluster
            .coordinator()
            .daemon()
            .cli(&["group", "update", "app", "--keep-hourly", "24"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--retention"), "{why}");
    let shown = cluster.coordinator().cli_json(&[
        "group",
        "update",
        "app",
        "--retention",
        "1h",
        "--keep-hourly",
        "24",
    ]);
    assert_eq!(
        shown["replication_consistency_group"]["retention"]["keep_hourly"], 24,
        "{shown}"
    );
    assert_eq!(
        shown["replication_consistency_group"]["retention"]["max_age_secs"], 3600,
        "{shown}"
    );
    wait_consistent(&cluster, "app", Duration::from_secs(120));
    let production = [Member::new("node-a", "p1"), Member::new("node-c", "p2")];
    let dr = [Member::new("node-b", "d1"), Member::new("node-b", "d2")];

    // Bursts of records, each followed by the point that holds them.
    let next = Arc::new(AtomicU64::new(0));
    let mut noted: Vec<(u64, u64)> = Vec::new();
    for burst in 0..3 {
        let writer =
            RecordWriter::start(sockets(&cluster, &production), Arc::clone(&next), RECORDS);
        let from = next.load(Ordering::SeqCst);
        writer.wait_for(from, rng.random_range(200..1500), Duration::from_secs(120));
        let answered = writer.stop();
        let point = point_after_the_writes(&cluster, &production);
        eprintln!("burst {burst}: records 0..{answered} held by point {point}");
        noted.push((point, answered));
    }
    let listed = points(&cluster);
    for (point, _) in &noted {
        assert!(
            listed.iter().any(|(e, _)| e == point),
            "seed {seed}: point {point} is not listed: {listed:?}"
        );
    }

    // The damage: the first records are overwritten on production, and replicate.
    let damaged = noted[0].1.min(64);
    for (i, (socket, export)) in sockets(&cluster, &production).iter().enumerate() {
        let mut client = NbdClient::connect(socket, export).unwrap();
        for n in (0..damaged).filter(|n| place(*n, 2).0 == i) {
            assert_eq!(
                client
                    .write(place(n, 2).1, &[0xee; RECORD as usize])
                    .unwrap(),
                0
            );
        }
        client.disconnect().unwrap();
    }
    let after_damage = point_after_the_writes(&cluster, &production);
    assert!(
        prefix_length_across(&[&image("d1"), &image("d2")], RECORDS).is_err(),
        "the damage did not reach the DR volumes"
    );

    // A drill at each noted point, made while the group replicates: each drill holds
    // exactly the records answered by its point, and its writes stay in it.
    if !dies_mid_rollback {
        drill_each_point(&cluster, dir.path(), &noted, seed);
    }

    // Failover to a noted point, before the damage.
    let (target, held_then) = noted[rng.random_range(0..noted.len())];
    let started = cluster.coordinator().cli_json(&[
        "group",
        "failover",
        "app",
        "--point",
        &target.to_string(),
    ]);
    let job = started["job_id"].as_str().expect("a job").to_owned();
    if dies_mid_rollback {
        assert!(
            cluster
                .node_mut("node-b")
                .wait_crash(Duration::from_secs(60)),
            "the DR agent did not die in the rollback"
        );
        let node = cluster.node_mut("node-b");
        node.env.clear();
        node.start();
    }
    cluster.wait_job(&job, Duration::from_secs(120));
    let job = cluster.coordinator().cli_json(&["job", "show", &job]);
    eprintln!(
        "seed {seed}: failover to point {target} (damage at {after_damage}): {}",
        job["result"]
    );
    assert!(
        job["result"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("rolled back to point: epoch {target}"))),
        "{job}"
    );
    let held = prefix_length_across(&[&image("d1"), &image("d2")], RECORDS)
        .unwrap_or_else(|e| panic!("seed {seed}: after the failover to {target}: {e}"));
    assert_eq!(
        held, held_then,
        "seed {seed}: point {target} held records 0..{held_then}; the DR volumes hold 0..{held}"
    );
    let group = cluster.coordinator().cli_json(&["group", "show", "app"]);
    assert_eq!(group["status"], "failovered");
    assert_eq!(group["consistent_epoch"], target, "{group}");

    // The old production side is demoted; reprotect copies what differs, and the group
    // replicates the other way until both sides are identical.
    for m in &production {
        wait_until(
            Duration::from_secs(30),
            "the old production side to be demoted",
            || pair_state(&cluster, m)["fence"] == "demoted",
        );
        assert_eq!(write_error(&cluster, m), EPERM);
    }
    let reprotect = cluster
        .coordinator()
        .cli_json(&["group", "reprotect", "app"]);
    let job = reprotect["job_id"].as_str().expect("a job").to_owned();
    cluster.wait_job(&job, Duration::from_secs(180));
    wait_consistent(&cluster, "app", Duration::from_secs(120));
    let current = dr
        .iter()
        .map(|m| number(&pair_state(&cluster, m), "current_epoch"))
        .max()
        .unwrap();
    wait_until(
        Duration::from_secs(120),
        "the new DR side to apply it all",
        || {
            production
                .iter()
                .all(|m| number(&pair_state(&cluster, m), "consistent_epoch") > current)
        },
    );
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for node in names {
        cluster.node_mut(&node).stop();
    }
    for (p, d) in production.iter().zip(&dr) {
        assert_eq!(
            sha256(&image(&p.volume)),
            sha256(&image(&d.volume)),
            "seed {seed}: {} and {} differ after the reprotect",
            p.volume,
            d.volume
        );
    }
}
