//! The HA coordinator, measured.
//!
//! - **Leader failover**: three coordinator candidates (co-1 in az1, co-2 in az2, co-3 in
//!   az3) on a three-member etcd, node-a (az1) and node-b (az2) with a 2-pair async group.
//!   The leader is killed with `kill -9`; the time runs until the DR agent applies a commit
//!   made after the kill (so by the new leader): the coordinator's whole absence, election,
//!   load and first cut included. Then the killed candidate is started again.
//! - **Group failover, etcd against redb**: the `group-failover` rounds, once with the
//!   coordinator's records in redb and once in a three-member etcd.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::env::{Env, check_interrupted};
use crate::groups::{GroupCluster, percentile};
use crate::pairs::{NodeConfig, path};
use crate::report::{Goal, GoalFormat, ScenarioResult};

const MIB: u64 = 1 << 20;
/// The candidates' lease TTL in seconds (the product's default).
const LEASE_TTL_S: u64 = 5;
const CANDIDATES: [&str; 3] = ["co-1", "co-2", "co-3"];

/// A three-member etcd of the run (each member a server of the run, stopped at its end).
pub(crate) struct Etcd {
    pub endpoints: Vec<String>,
}

impl Etcd {
    pub(crate) fn start(env: &mut Env, dir: &Path) -> anyhow::Result<Self> {
        let members: Vec<(String, u16, u16)> = (0..3)
            .map(|i| Ok((format!("etcd{i}"), free_tcp_port()?, free_tcp_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let cluster = members
            .iter()
            .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        for (name, client, peer) in &members {
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let data = dir.join(name);
            env.start_server(
                name,
                Command::new("etcd")
                    .args(["--name", name, "--data-dir", path(&data)])
                    .args(["--listen-client-urls", &client_url])
                    .args(["--advertise-client-urls", &client_url])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &cluster])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--logger", "zap", "--log-level", "warn"])
                    .stderr(log),
                // A member serves clients only once the cluster has a quorum: the members
                // are started together and then waited for.
                || true,
            )?;
        }
        let endpoints: Vec<String> = members
            .iter()
            .map(|(_, client, _)| format!("http://127.0.0.1:{client}"))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !members.iter().all(|(_, client, _)| healthy(*client)) {
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!(
                    "etcd has no healthy quorum after 30 s (logs in {})",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { endpoints })
    }

    /// The `[coordinator]` section of a candidate on this etcd.
    pub(crate) fn section(&self) -> String {
        let quoted: Vec<String> = self.endpoints.iter().map(|e| format!("{e:?}")).collect();
        format!(
            "[coordinator]\nstore = \"etcd\"\netcd_endpoints = [{}]\nlease_ttl_secs = {LEASE_TTL_S}\n",
            quoted.join(", ")
        )
    }
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn health(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

fn healthy(port: u16) -> bool {
    health(port).is_some_and(|a| a.contains("\"health\":\"true\""))
}

/// The DR side's consistent epoch of `d1`, as node-b reports it (no coordinator asked).
fn dr_consistent(cluster: &GroupCluster, dr: &str) -> anyhow::Result<u64> {
    cluster
        .pair_state(dr, "d1")?
        .get("consistent_epoch")
        .and_then(|e| e.as_u64())
        .context("consistent_epoch")
}

/// Which candidate leads, as node-b's node list says.
fn leader(cluster: &GroupCluster) -> anyhow::Result<String> {
    let nodes = cluster.json("node-b", &["node", "list"])?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["coordinator_role"] == "leader"))
        .and_then(|n| n["name"].as_str().map(str::to_owned))
        .context("no leader in the node list")
}

pub fn ha(
    env: &mut Env,
    work: &Path,
    bin: &Path,
    kills: u32,
    rounds: u32,
) -> anyhow::Result<ScenarioResult> {
    let dir = work.join("ha");
    std::fs::create_dir_all(&dir)?;

    // Leader failover: kill the leader, time until a commit of the new one is applied.
    let etcd = Etcd::start(env, &dir)?;
    let section = etcd.section();
    let mut cluster = GroupCluster::start_ha(
        env,
        &dir,
        bin,
        &CANDIDATES,
        NodeConfig {
            coordinator_extra: &section,
            ..NodeConfig::default()
        },
    )?;
    cluster.group(2, 256 * MIB, "async")?;
    let mut takeovers = Vec::new();
    for kill in 0..kills {
        check_interrupted()?;
        let dead = leader(&cluster)?;
        let before = dr_consistent(&cluster, "node-b")?;
        // A cut of the current leader applied since: the group is cutting.
        cluster.wait("a cut before the kill", 60, |c| {
            Ok(dr_consistent(c, "node-b")? > before)
        })?;
        let killed = Instant::now();
        cluster.kill_node(env, &dead);
        // Once another candidate leads, what the DR side applied by then came from the
        // dead leader (a commit it sent just before dying): the new one cuts only after its
        // agents took its term.
        cluster.wait("another leader", 120, |c| Ok(leader(c)? != dead))?;
        let next = leader(&cluster)?;
        let before_new = dr_consistent(&cluster, "node-b")?;
        cluster.wait("a commit of the new leader", 120, |c| {
            Ok(dr_consistent(c, "node-b")? > before_new)
        })?;
        let took = killed.elapsed().as_secs_f64();
        eprintln!(
            "bench: leader kill {}: {dead} killed; {next} leads, its first commit applied {took:.2} s later",
            kill + 1
        );
        takeovers.push(took);
        cluster.restart(env, &dead)?;
    }
    cluster.stop(env);

    // Group failover with each store.
    let (redb, _) = crate::groups::failover_rounds(env, work, bin, rounds, "ha-redb", None)?;
    let etcd_dir = work.join("ha-etcd-store");
    std::fs::create_dir_all(&etcd_dir)?;
    let etcd = Etcd::start(env, &etcd_dir)?;
    let one_candidate = etcd.section();
    let (on_etcd, _) =
        crate::groups::failover_rounds(env, work, bin, rounds, "ha-etcd", Some(&one_candidate))?;

    let mut sorted = takeovers.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, max) = (
        percentile(&sorted, 0.5),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
    let median = |times: &[f64]| {
        let mut t = times.to_vec();
        t.sort_by(f64::total_cmp);
        percentile(&t, 0.5)
    };
    let (redb_p50, etcd_p50) = (median(&redb), median(&on_etcd));
    Ok(ScenarioResult {
        name: "ha",
        summary: format!(
            "leader kill to the new leader's first commit: median {p50:.2} s, max {max:.2} s over {kills}; group failover median {redb_p50:.3} s on redb, {etcd_p50:.3} s on etcd"
        ),
        markdown: format!(
            "- **HA coordinator, leader failover** (three candidates, a three-member etcd, lease TTL {LEASE_TTL_S} s, a 2-pair async group): from `kill -9` of the leader to the DR agent applying the new leader's first commit, median {p50:.2} s, max {max:.2} s over {kills} kills ({}).\n- **Group failover, etcd against redb** ({rounds} rounds each, as `group-failover`): median {redb_p50:.3} s with redb, {etcd_p50:.3} s with a three-member etcd.\n",
            sorted
                .iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        json: json!({
            "lease_ttl_s": LEASE_TTL_S,
            "leader_failover_s": takeovers,
            "leader_failover_median_s": p50,
            "leader_failover_max_s": max,
            "group_failover_redb_s": redb,
            "group_failover_etcd_s": on_etcd,
        }),
        goals: vec![Goal::at_most(
            format!(
                "leader killed to the new leader's first commit ≤ 2 × lease TTL ({} s), the slowest",
                2 * LEASE_TTL_S
            ),
            Some(max),
            (2 * LEASE_TTL_S) as f64,
            GoalFormat::Seconds,
        )],
    })
}
