//! Pairs under faults: agents killed with `kill -9`, links cut and lossy, a split brain,
//! and blocks changed behind the DR agent's back. After each, what the design promises is
//! checked on the DR side's own disk: no answered hypermetro write lost, the DR volume a
//! consistent image, a catch-up that sends only what changed, no resync in the wrong
//! direction.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockrep_tests::cluster::{
    ClusterConfig, NetNs, NetNsPair, NodeSpec, TestCluster, local_pair_state, sha256, wait_until,
};
use blockrep_tests::records::{RECORD, prefix_length, record};
use blockrep_tests::{NbdClient, require_tool, rss_bytes, seed, sparse_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// A peer silent for a second is gone: the tests do not wait five.
const FAST_TIMEOUT: ClusterConfig<'static> = ClusterConfig {
    extra: "",
    cluster_extra: "peer_timeout_ms = 1000",
    candidates: 0,
    coordinator_section: "",
};

fn two_nodes() -> Vec<NodeSpec> {
    vec![
        NodeSpec::new("node-a", "az1"),
        NodeSpec::new("node-b", "az2"),
    ]
}

/// Sparse files of `size` bytes registered as volume `prod` on node-a and `dr` on node-b.
fn file_volumes(cluster: &TestCluster, dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let prod = dir.join("prod.img");
    let dr = dir.join("dr.img");
    for (node, name, path) in [("node-a", "prod", &prod), ("node-b", "dr", &dr)] {
        sparse_file(path, size);
        cluster.add_volume(node, name, path);
    }
    (prod, dr)
}

fn state(cluster: &TestCluster, node: &str, pair: &str) -> Value {
    local_pair_state(cluster.node(node), pair).unwrap_or(Value::Null)
}

fn wait_converged(cluster: &TestCluster, production: &str, pair: &str, timeout: Duration) {
    wait_until(timeout, "the pair to converge", || {
        let s = state(cluster, production, pair);
        s["replication_status"] == "active" && s["out_of_sync_bytes"] == 0
    });
}

/// fio through NBD: `args` after the common ones; fails the test if fio fails.
fn fio(dir: &Path, uri: &str, args: &[&str]) {
    let out = Command::new("fio")
        .current_dir(dir)
        .args(["--name=w", "--ioengine=nbd", "--output-format=terse"])
        .arg(format!("--uri={uri}"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

/// Waits for a job to end and returns it (success or not).
fn job_outcome(cluster: &TestCluster, job: &str) -> Value {
    let _ = cluster
        .coordinator()
        .daemon()
        .cli(&["job", "wait", job, "--timeout", "120"]);
    cluster.coordinator().cli_json(&["job", "show", job])
}

#[test]
fn a_dr_agent_killed_mid_stream_is_caught_up_with_only_what_changed() {
    require_tool("fio");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_nodes(
        dir.path(),
        &two_nodes(),
        ClusterConfig {
            extra: "[replication]\njournal_bytes = \"32MiB\"\n",
            cluster_extra: FAST_TIMEOUT.cluster_extra,
            candidates: 0,
            coordinator_section: "",
        },
    );
    let (prod, dr) = file_volumes(&cluster, dir.path(), 1024 * MIB);
    let (pair, job) = cluster.create_pair("kill-dr", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));
    let uri = cluster.node("node-a").daemon().nbd_uri("prod");

    // Writing while the stream runs; the DR agent dies in the middle.
    let writer = {
        let (dir, uri) = (dir.path().to_owned(), uri.clone());
        std::thread::spawn(move || {
            fio(
                &dir,
                &uri,
                &[
                    "--rw=randwrite",
                    "--bs=64k",
                    "--iodepth=8",
                    "--size=768M",
                    "--io_size=128M",
                ],
            )
        })
    };
    wait_until(Duration::from_secs(60), "the stream to carry data", || {
        counter(&state(&cluster, "node-a", &pair), "bytes_sent") > 32 * MIB
    });
    cluster.node_mut("node-b").kill9();
    writer.join().unwrap();

    // 256 MiB more while the DR agent is gone: memory stays within the journal's bound.
    let pid = cluster.node("node-a").daemon().pid();
    let before = rss_bytes(pid);
    fio(
        dir.path(),
        &uri,
        &[
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--size=768M",
            "--io_size=256M",
        ],
    );
    let after = rss_bytes(pid);
    eprintln!(
        "production agent RSS: {} MiB before, {} MiB after",
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + 64 * MIB,
        "the production agent grew from {before} to {after} bytes with its peer gone"
    );
    wait_until(Duration::from_secs(30), "the pair to leave active", || {
        state(&cluster, "node-a", &pair)["replication_status"] != "active"
    });

    let s = state(&cluster, "node-a", &pair);
    let dirty = s["out_of_sync_bytes"].as_u64().unwrap();
    let sent_before = counter(&s, "bytes_sent");
    cluster.node_mut("node-b").start();
    wait_converged(&cluster, "node-a", &pair, Duration::from_secs(120));
    let sent = counter(&state(&cluster, "node-a", &pair), "bytes_sent") - sent_before;
    eprintln!(
        "catch-up sent {} MiB on the stream for {} MiB dirty: {:.3}×",
        sent >> 20,
        dirty >> 20,
        sent as f64 / dirty as f64
    );
    assert!(dirty > 200 * MIB, "the outage left {dirty} dirty bytes");
    assert!(
        sent as f64 <= 1.05 * dirty as f64,
        "the catch-up sent {sent} bytes for {dirty} dirty"
    );
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr));
}

/// The content of write `seq` of round `round`.
fn block_of(round: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&round.to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ (i as u64) << 40).to_le_bytes());
    }
    b
}

#[test]
fn hypermetro_answered_writes_survive_kill_9_of_the_production_agent() {
    let seed = seed(0x5eed_0008);
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_nodes(dir.path(), &two_nodes(), FAST_TIMEOUT);
    let blocks: u64 = 16 * 1024; // 64 MiB
    let (prod, dr) = file_volumes(&cluster, dir.path(), blocks * BLOCK);
    let (pair, job) = cluster.create_pair("sync", "prod,dr", "az1", "hypermetro");
    cluster.wait_job(&job, Duration::from_secs(120));

    for round in 0..10u64 {
        // The client logs every write it got an answer for.
        let answered: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let socket = cluster.node("node-a").daemon().nbd_socket("prod");
        let writer_seed = rng.random::<u64>();
        let writer = {
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(writer_seed);
                let Ok(mut c) = NbdClient::connect(&socket, "prod") else {
                    return;
                };
                for seq in 0.. {
                    let block = rng.random_range(0..blocks);
                    match c.write(block * BLOCK, &block_of(round, seq)) {
                        Ok(0) => answered.lock().unwrap().push((block, seq)),
                        _ => return,
                    }
                }
            })
        };
        let kill_after = rng.random_range(20..600);
        wait_until(Duration::from_secs(60), "the writer to get answers", || {
            answered.lock().unwrap().len() >= kill_after
        });
        cluster.node_mut("node-a").kill9();
        writer.join().unwrap();
        cluster.node_mut("node-b").stop();

        // Every block's last answered write is on the DR volume, or else ...
        let log = answered.lock().unwrap().clone();
        let mut last = std::collections::BTreeMap::new();
        for (block, seq) in &log {
            last.insert(*block, *seq);
        }
        let file = std::fs::File::open(&dr).unwrap();
        let mut missing = Vec::new();
        let mut buf = vec![0u8; BLOCK as usize];
        for (&block, &seq) in &last {
            file.read_exact_at(&mut buf, block * BLOCK).unwrap();
            if buf != block_of(round, seq) {
                missing.push(block);
            }
        }
        // ... its block is dirty once the production agent is back.
        cluster.node_mut("node-a").start();
        let dirty = cluster.node("node-a").daemon().dirty_extents("prod");
        for block in &missing {
            let at = block * BLOCK;
            assert!(
                dirty.iter().any(|&(o, l)| o <= at && at + BLOCK <= o + l),
                "round {round} (seed {seed}): block {block}'s answered write is not on the DR volume and the block is not dirty"
            );
        }
        eprintln!(
            "round {round}: killed after {} answered writes; {} blocks not (yet) on the DR side, all dirty",
            log.len(),
            missing.len()
        );
        cluster.node_mut("node-b").start();
        wait_converged(&cluster, "node-a", &pair, Duration::from_secs(60));
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr));
}

fn nft(ns: &NetNs, rule: &str) {
    let args: Vec<&str> = rule.split(' ').collect();
    let mut all = vec!["nft"];
    all.extend(args);
    ns.exec(&all);
}

/// The pair record (`pair.json`) of the node's only production volume.
fn production_record(node_dir: &std::path::Path) -> Value {
    let volumes = node_dir.join("state/volumes");
    std::fs::read_dir(&volumes)
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.unwrap().path().join("pair.json")).ok())
        .map(|text| serde_json::from_slice::<Value>(&text).unwrap())
        .find(|record| record["side"] == "production")
        .expect("a production volume")
}

#[test]
fn a_link_cut_during_a_catch_up_leaves_the_dr_volume_a_consistent_image() {
    require_tool("nft");
    let seed = seed(0xc07_0008);
    let mut rng = SmallRng::seed_from_u64(seed);
    let ns = NetNs::new("cut");
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<NodeSpec> = two_nodes()
        .into_iter()
        .map(|s| s.in_netns(&ns.name, "127.0.0.1"))
        .collect();
    let mut cluster = TestCluster::start_nodes(
        dir.path(),
        &specs,
        ClusterConfig {
            extra: "[replication]\nepoch_interval_ms = 200\n",
            cluster_extra: FAST_TIMEOUT.cluster_extra,
            candidates: 0,
            coordinator_section: "",
        },
    );
    let records: u64 = 32 * 1024; // 128 MiB of records
    let (prod, dr) = file_volumes(&cluster, dir.path(), records * RECORD);
    let (pair, job) = cluster.create_pair("cut", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));

    // A slow link to the DR agent, so a catch-up takes seconds.
    let dr_port = cluster.node("node-b").port;
    nft(&ns, "add table inet link");
    nft(
        &ns,
        "add chain inet link out { type filter hook output priority 0 ; }",
    );
    nft(
        &ns,
        &format!("add rule inet link out udp dport {dr_port} limit rate over 8 mbytes/second drop"),
    );

    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    let writer = {
        let (written, stop) = (Arc::clone(&written), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(&socket, "prod").unwrap();
            for n in 0..records {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                assert_eq!(c.write(n * RECORD, &record(n)).unwrap(), 0);
                written.store(n + 1, Ordering::Relaxed);
                if n % 32 == 0 {
                    // At most 2.6 MB/s: the link keeps up, and catches up in seconds.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            c.disconnect().unwrap();
        })
    };
    let mut last = 0;
    for round in 0..4 {
        // The DR side follows the writer: a few epochs applied while it writes.
        let applied = |cluster: &TestCluster| {
            state(cluster, "node-b", &pair)["consistent_epoch"]
                .as_u64()
                .unwrap_or(0)
        };
        wait_until(Duration::from_secs(120), "the pair to be active", || {
            state(&cluster, "node-a", &pair)["replication_status"] == "active"
        });
        let from = applied(&cluster);
        wait_until(
            Duration::from_secs(60),
            "the DR side to apply epochs",
            || applied(&cluster) >= from + 3,
        );
        // A backlog while the DR agent is away, then a catch-up the link cuts short.
        cluster.node_mut("node-b").stop();
        let from = written.load(Ordering::Relaxed);
        let backlog = rng.random_range(2000..5000);
        wait_until(Duration::from_secs(60), "a backlog", || {
            written.load(Ordering::Relaxed) >= (from + backlog).min(records)
        });
        let resync_before = counter(&state(&cluster, "node-a", &pair), "resync_bytes_sent");
        cluster.node_mut("node-b").start();
        wait_until(Duration::from_secs(60), "the catch-up to run", || {
            let s = state(&cluster, "node-a", &pair);
            s["replication_status"] == "copying" && counter(&s, "resync_bytes_sent") > resync_before
        });
        // The production agent recorded where the unit began before sending any of it: a
        // restarted agent reports its span again (docs/GROUPS.md).
        let recorded = production_record(&cluster.node("node-a").dir)["catch_up_from"].clone();
        assert!(
            recorded.is_u64(),
            "round {round}: no catch-up start recorded ({recorded})"
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
        nft(
            &ns,
            &format!("insert rule inet link out udp dport {dr_port} drop"),
        );
        if round % 2 == 1 {
            // Killed mid-apply: the restarted agent completes the units it sealed before
            // anything can read the volume (the link is still cut).
            cluster.node_mut("node-b").kill9();
            cluster.node_mut("node-b").start();
        }
        cluster.node_mut("node-b").stop();
        let answered = written.load(Ordering::Relaxed);
        let held = prefix_length(&dr, records)
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        eprintln!("round {round}: the DR volume holds records 0..{held} of {answered} answered");
        assert!(
            held <= answered && held >= last,
            "round {round}: {held} records"
        );
        assert!(held > 0, "round {round}: the DR image never moved");
        last = held;
        // Heal: only the rate limit stays.
        nft(&ns, "flush chain inet link out");
        nft(
            &ns,
            &format!(
                "add rule inet link out udp dport {dr_port} limit rate over 8 mbytes/second drop"
            ),
        );
        cluster.node_mut("node-b").start();
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let answered = written.load(Ordering::Relaxed);
    nft(&ns, "flush chain inet link out");
    wait_converged(&cluster, "node-a", &pair, Duration::from_secs(120));
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(prefix_length(&dr, records).unwrap(), answered);
    assert_eq!(sha256(&prod), sha256(&dr));
}

#[test]
fn a_pair_over_a_lossy_link_converges() {
    require_tool("nft");
    require_tool("fio");
    let link = NetNsPair::new("loss");
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![
        NodeSpec::new("node-a", "az1").in_netns(&link.a.name, &link.address_a),
        NodeSpec::new("node-b", "az2").in_netns(&link.b.name, &link.address_b),
    ];
    let mut cluster = TestCluster::start_nodes(dir.path(), &specs, ClusterConfig::default());
    let (prod, dr) = file_volumes(&cluster, dir.path(), 256 * MIB);
    let uri = cluster.node("node-a").daemon().nbd_uri("prod");
    fio(
        dir.path(),
        &uri,
        &["--rw=write", "--bs=1M", "--iodepth=4", "--size=128M"],
    );

    link.drop_percent(5);
    let started = Instant::now();
    let (pair, job) = cluster.create_pair("lossy", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(300));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "initial sync of 128 MiB over a link dropping 5% each way: {secs:.1} s, {:.0} MB/s",
        128.0 * 1.048_576 / secs
    );
    fio(
        dir.path(),
        &uri,
        &[
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=16",
            "--size=256M",
            "--io_size=32M",
        ],
    );
    wait_converged(&cluster, "node-a", &pair, Duration::from_secs(300));
    link.heal();
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr));
}

fn write_block(socket: &Path, export: &str, offset: u64, byte: u8) -> u32 {
    let mut c = NbdClient::connect(socket, export).unwrap();
    let status = c.write(offset, &vec![byte; BLOCK as usize]).unwrap();
    c.disconnect().unwrap();
    status
}

#[test]
fn a_split_brain_copies_nothing_until_resolved_in_the_chosen_direction() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_nodes(dir.path(), &two_nodes(), FAST_TIMEOUT);
    let (prod, dr) = file_volumes(&cluster, dir.path(), 64 * MIB);
    let prod_socket = cluster.node("node-a").daemon().nbd_socket("prod");
    let dr_socket = cluster.node("node-b").daemon().nbd_socket("dr");
    let (_, job) = cluster.create_pair("sb", "prod,dr", "az1", "hypermetro");
    cluster.wait_job(&job, Duration::from_secs(60));
    assert_eq!(write_block(&prod_socket, "prod", 0, 0xa1), 0);

    for (round, keep) in [(1u8, "az2"), (2, "az1")] {
        // Both sides written while apart: the pair is deleted, each side written on its own.
        let pair = cluster.pair("sb")["id"].as_str().unwrap().to_owned();
        let deleted = cluster.coordinator().cli_json(&["pair", "delete", &pair]);
        cluster.wait_job(deleted["job_id"].as_str().unwrap(), Duration::from_secs(60));
        assert_eq!(write_block(&prod_socket, "prod", MIB, 0xb0 + round), 0);
        assert_eq!(write_block(&dr_socket, "dr", 2 * MIB, 0xc0 + round), 0);
        let (prod_before, dr_before) = (sha256(&prod), sha256(&dr));

        let (pair, job) = cluster.create_pair("sb", "prod,dr", "az1", "hypermetro");
        let job = job_outcome(&cluster, &job);
        assert_eq!(job["status"], "FAIL", "{job}");
        assert!(
            job["fail_reason"].as_str().unwrap().contains("split brain"),
            "{job}"
        );
        let shown = cluster.pair(&pair);
        assert_eq!(shown["needs_resolve"], true, "{shown}");
        assert_eq!(shown["replication_status"], "error", "{shown}");
        assert_eq!(
            sha256(&dr),
            dr_before,
            "round {round}: the DR volume was written"
        );
        assert_eq!(
            sha256(&prod),
            prod_before,
            "round {round}: production was written"
        );

        // A zone not the pair's is refused.
        let out = cluster
            .coordinator()
            .daemon()
            .cli(&["pair", "resolve", &pair, "--keep", "az9"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("(400)"));

        let resolved = cluster
            .coordinator()
            .cli_json(&["pair", "resolve", &pair, "--keep", keep]);
        cluster.wait_job(
            resolved["job_id"].as_str().unwrap(),
            Duration::from_secs(60),
        );
        let shown = cluster.pair(&pair);
        let (kept, kept_sha, production_node) = match keep {
            "az2" => (&dr, &dr_before, "node-b"),
            _ => (&prod, &prod_before, "node-a"),
        };
        assert_eq!(shown["priority_station"], keep, "{shown}");
        assert_eq!(shown["production_node"], production_node, "{shown}");
        wait_converged(&cluster, production_node, &pair, Duration::from_secs(60));
        assert_eq!(
            &sha256(kept),
            kept_sha,
            "round {round}: the kept side changed"
        );
        assert_eq!(sha256(&prod), sha256(&dr), "round {round}");

        // Resolving a pair that has not diverged is refused.
        let out = cluster
            .coordinator()
            .daemon()
            .cli(&["pair", "resolve", &pair, "--keep", keep]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("(409)"));
        if keep == "az2" {
            // node-a's volume is the DR side now: its export refuses writes.
            assert_eq!(
                write_block(&prod_socket, "prod", 0, 0xee),
                1 /* EPERM */
            );
        }
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
}

#[test]
fn verify_finds_a_block_changed_behind_the_dr_agent_and_repair_copies_it_again() {
    let seed = seed(0x7e21_0008);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_nodes(
        dir.path(),
        &two_nodes(),
        ClusterConfig {
            extra: "[replication]\nepoch_interval_ms = 200\n",
            cluster_extra: FAST_TIMEOUT.cluster_extra,
            candidates: 0,
            coordinator_section: "",
        },
    );
    let (prod, dr) = file_volumes(&cluster, dir.path(), 64 * MIB);
    let socket = cluster.node("node-a").daemon().nbd_socket("prod");
    for i in 0..64 {
        assert_eq!(write_block(&socket, "prod", i * MIB, i as u8 + 1), 0);
    }
    let (pair, job) = cluster.create_pair("v", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(60));
    wait_converged(&cluster, "node-a", &pair, Duration::from_secs(60));

    // Behind the DR agent's back: 4 KiB of its backing file changed.
    let bad_offset = 5 * MIB + 8192;
    {
        let f = std::fs::OpenOptions::new().write(true).open(&dr).unwrap();
        f.write_all_at(&[0xee; BLOCK as usize], bad_offset).unwrap();
        f.sync_all().unwrap();
    }
    // A writer keeps the pair busy elsewhere meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, socket) = (Arc::clone(&stop), socket.clone());
        std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut c = NbdClient::connect(&socket, "prod").unwrap();
            while !stop.load(Ordering::Relaxed) {
                let at = 40 * MIB + rng.random_range(0..1024) * BLOCK;
                assert_eq!(
                    c.write(at, &[rng.random::<u8>(); BLOCK as usize]).unwrap(),
                    0
                );
            }
            c.disconnect().unwrap();
        })
    };
    let started = cluster.coordinator().cli_json(&["pair", "verify", &pair]);
    let job = job_outcome(&cluster, started["job_id"].as_str().unwrap());
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(job["status"], "SUCCESS", "{job}");
    let result = job["result"].as_str().unwrap();
    eprintln!("verify: {result}");
    let block = 64 * 1024;
    let expected = format!("differing: {}+{block}", bad_offset / block * block);
    assert!(result.contains(&expected), "{result}");
    assert!(result.contains("64.0 KiB differing"), "{result}");

    wait_converged(&cluster, "node-a", &pair, Duration::from_secs(60));
    let started = cluster
        .coordinator()
        .cli_json(&["pair", "verify", &pair, "--repair"]);
    let job = job_outcome(&cluster, started["job_id"].as_str().unwrap());
    assert_eq!(job["status"], "SUCCESS", "{job}");
    assert!(
        job["result"].as_str().unwrap().contains("copied again"),
        "{job}"
    );
    let started = cluster.coordinator().cli_json(&["pair", "verify", &pair]);
    let job = job_outcome(&cluster, started["job_id"].as_str().unwrap());
    assert!(
        job["result"].as_str().unwrap().contains("0 B differing"),
        "{job}"
    );

    // Verify compares an active pair only.
    cluster.node_mut("node-b").stop();
    wait_until(Duration::from_secs(30), "the pair to leave active", || {
        cluster.pair(&pair)["replication_status"] != "active"
    });
    let out = cluster
        .coordinator()
        .daemon()
        .cli(&["pair", "verify", &pair]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("(409)"));
    cluster.node_mut("node-b").start();
    wait_converged(&cluster, "node-a", &pair, Duration::from_secs(60));
    for node in &mut cluster.nodes {
        node.stop();
    }
    assert_eq!(sha256(&prod), sha256(&dr));
}
