//! Consistency groups, measured: how long a failover takes from the call to writable DR
//! exports, what a reprotect copies against the union of both sides' dirty blocks, and what
//! an async group's cuts cost in 4k IOPS (with how long they hold answers).
//!
//! Each scenario runs its own small cluster: a coordinator on a witness node (zone az3,
//! no volumes), the production agent in az1 and the DR agent in az2, all on this machine,
//! volumes on files of the run. In the pinned layout node-a (az1) and fio are on CPU 0,
//! node-b (az2) and the witness on CPU 1, whichever side is production at the time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::env::{Env, Host, check_interrupted, host_of, run};
use crate::outages::BackgroundFio;
use crate::pairs::{NodeConfig, NodeProc, path, start_nodes};
use crate::report::{Goal, GoalFormat, ScenarioResult};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A witness coordinator, node-a (az1) and node-b (az2), with volumes and a group.
pub(crate) struct GroupCluster {
    bin: PathBuf,
    dir: PathBuf,
    nodes: Vec<NodeProc>,
    /// The node the coordinator is asked through (the witness, or an agent when the
    /// coordinator's candidates may be killed).
    via: &'static str,
}

impl GroupCluster {
    pub(crate) fn start(
        env: &mut Env,
        work: &Path,
        bin: &Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(env, work, bin, name, NodeConfig::default())
    }

    fn start_with(
        env: &mut Env,
        work: &Path,
        bin: &Path,
        name: &str,
        config: NodeConfig<'_>,
    ) -> anyhow::Result<Self> {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        Self::start_nodes(
            env,
            &dir,
            bin,
            &[("node-w", "az3"), ("node-a", "az1"), ("node-b", "az2")],
            config,
            "node-w",
        )
    }

    /// An HA coordinator's candidates (one per zone: az1, az2, az3), then node-a (az1) and
    /// node-b (az2), in `dir`; the coordinator is asked through node-b.
    pub(crate) fn start_ha(
        env: &mut Env,
        dir: &Path,
        bin: &Path,
        candidates: &[&str; 3],
        config: NodeConfig<'_>,
    ) -> anyhow::Result<Self> {
        let nodes = [
            (candidates[0], "az1"),
            (candidates[1], "az2"),
            (candidates[2], "az3"),
            ("node-a", "az1"),
            ("node-b", "az2"),
        ];
        let config = NodeConfig {
            candidates: candidates.len(),
            ..config
        };
        Self::start_nodes(env, dir, bin, &nodes, config, "node-b")
    }

    fn start_nodes(
        env: &mut Env,
        dir: &Path,
        bin: &Path,
        nodes: &[(&str, &str)],
        config: NodeConfig<'_>,
        via: &'static str,
    ) -> anyhow::Result<Self> {
        let nodes = start_nodes(env, dir, bin, nodes, &[], config)?;
        for n in &nodes {
            crate::env::pin(n.pid, host_of(&n.name))?;
        }
        let count = nodes.len();
        let cluster = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            nodes,
            via,
        };
        cluster.wait("the agents to register", 60, |c| {
            let nodes = c.json(c.via, &["node", "list"])?;
            Ok(nodes
                .as_array()
                .is_some_and(|a| a.iter().filter(|n| n["alive"] == true).count() == count))
        })?;
        Ok(cluster)
    }

    pub(crate) fn node(&self, name: &str) -> &NodeProc {
        self.nodes.iter().find(|n| n.name == name).expect("a node")
    }

    pub(crate) fn cli(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(self.bin.join("blockrep"))
            .arg("--socket")
            .arg(self.node(node).socket())
            .args(args))
    }

    pub(crate) fn json(&self, node: &str, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.cli(node, &all)?)?)
    }

    pub(crate) fn wait(
        &self,
        what: &str,
        seconds: u64,
        mut done: impl FnMut(&Self) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            check_interrupted()?;
            if done(self).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A sparse file of `size` bytes as volume `name` on `node`.
    fn add_volume(&self, node: &str, name: &str, size: u64) -> anyhow::Result<()> {
        let file = self.dir.join(format!("{name}.img"));
        std::fs::File::create(&file)?.set_len(size)?;
        self.cli(
            node,
            &["volume", "add", "--name", name, "--path", path(&file)],
        )?;
        Ok(())
    }

    /// Pairs `p<i>` → `d<i>` of `size` bytes, synced, in group `app` of `model`.
    pub(crate) fn group(&self, pairs: usize, size: u64, model: &str) -> anyhow::Result<()> {
        for i in 1..=pairs {
            self.add_volume("node-a", &format!("p{i}"), size)?;
            self.add_volume("node-b", &format!("d{i}"), size)?;
        }
        self.wait("the coordinator to see the volumes", 60, |c| {
            let nodes = c.json(c.via, &["node", "list"])?;
            Ok(nodes.as_array().is_some_and(|a| {
                a.iter()
                    .filter(|n| n["name"] == "node-a" || n["name"] == "node-b")
                    .all(|n| n["volumes"].as_u64().unwrap_or(0) >= pairs as u64)
            }))
        })?;
        let mut names = Vec::new();
        for i in 1..=pairs {
            let name = format!("g{i}");
            let created = self.json(
                self.via,
                &[
                    "pair",
                    "create",
                    "--name",
                    &name,
                    "--volumes",
                    &format!("p{i},d{i}"),
                    "--priority-station",
                    "az1",
                    "--model",
                    model,
                ],
            )?;
            let job = created["job_id"].as_str().context("job id")?.to_owned();
            self.cli(self.via, &["job", "wait", &job, "--timeout", "600"])?;
            names.push(name);
        }
        self.create_group(&names.join(","), model)
    }

    fn create_group(&self, pairs: &str, model: &str) -> anyhow::Result<()> {
        self.cli(
            self.via,
            &[
                "group",
                "create",
                "--name",
                "app",
                "--pairs",
                pairs,
                "--priority-station",
                "az1",
                "--model",
                model,
            ],
        )?;
        self.wait_consistent()
    }

    /// Until the group replicates and has a consistent point.
    fn wait_consistent(&self) -> anyhow::Result<()> {
        self.wait("the group's consistent point", 300, |c| {
            let g = c.json(c.via, &["group", "show", "app"])?;
            Ok(g["replication_status"] == "active" && g["consistent_epoch"].as_u64() > Some(0))
        })
    }

    /// Runs a group action and waits for its job; returns the job.
    fn action(&self, action: &str) -> anyhow::Result<Value> {
        let started = self.json("node-w", &["group", action, "app"])?;
        let job = started["job_id"].as_str().context("job id")?.to_owned();
        self.cli("node-w", &["job", "wait", &job, "--timeout", "600"])?;
        self.json("node-w", &["job", "show", &job])
    }

    /// The pair states `node` reports, by volume name.
    /// Until both pairs sent and applied everything.
    pub(crate) fn settle(&self) -> anyhow::Result<()> {
        self.wait("the pairs to settle", 300, |c| {
            Ok(["p1", "p2"].iter().all(|v| {
                c.pair_state("node-a", v).is_ok_and(|s| {
                    s["replication_status"] == "active"
                        && s["out_of_sync_bytes"] == 0
                        && s["counters"]["journal_bytes"] == 0
                })
            }))
        })
    }

    pub(crate) fn pair_state(&self, node: &str, volume: &str) -> anyhow::Result<Value> {
        let status = self.json(node, &["status"])?;
        status["pairs"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["volume_name"] == volume))
            .cloned()
            .with_context(|| format!("no pair of volume {volume} on {node}"))
    }

    pub(crate) fn kill_node(&mut self, env: &mut Env, node: &str) {
        let pid = self.node(node).pid;
        env.kill_server(pid);
    }

    pub(crate) fn restart(&mut self, env: &mut Env, node: &str) -> anyhow::Result<()> {
        let (dir, config) = {
            let n = self.node(node);
            (n.dir.clone(), n.config.clone())
        };
        let _ = std::fs::remove_file(dir.join("notify.sock"));
        let pid = crate::env::start_daemon_in(env, &self.bin, &dir, &config, None, host_of(node))?;
        crate::env::pin(pid, host_of(node))?;
        self.nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("a node")
            .pid = pid;
        Ok(())
    }

    pub(crate) fn stop(self, env: &mut Env) {
        for n in self.nodes.iter().rev() {
            env.stop_server(n.pid);
        }
    }
}

/// Whether a write through `uri` is taken (qemu-io exits non-zero on an error answer).
fn writable(uri: &str) -> bool {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 4k", uri])
        .output()
        .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"))
}

/// fio 4k random writes at `rate` IOPS on each of `uris`, in the background.
fn background_writes(uris: &[String], rate: u32) -> anyhow::Result<BackgroundFio> {
    let rate = format!("--rate_iops={rate}");
    BackgroundFio::start_on(
        uris,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=64m",
            &rate,
        ],
    )
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The rounds of [`failover`] on a cluster named `name`: the seconds from each failover
/// call to writable DR exports, and each job's result. The coordinator keeps its records in
/// redb, or with `section` (a `[coordinator]` section naming an etcd) in etcd.
pub(crate) fn failover_rounds(
    env: &mut Env,
    work: &Path,
    bin: &Path,
    rounds: u32,
    name: &str,
    section: Option<&str>,
) -> anyhow::Result<(Vec<f64>, Vec<Value>)> {
    let config = NodeConfig {
        coordinator_section: section.unwrap_or(""),
        ..NodeConfig::default()
    };
    let mut cluster = GroupCluster::start_with(env, work, bin, name, config)?;
    cluster.group(2, 256 * MIB, "async")?;
    let mut production = "node-a";
    let mut dr = "node-b";
    let mut volumes = (["p1", "p2"], ["d1", "d2"]);
    let mut times = Vec::new();
    let mut results = Vec::new();
    for round in 0..rounds {
        check_interrupted()?;
        cluster.wait_consistent()?;
        let uris: Vec<String> = volumes
            .0
            .iter()
            .map(|v| cluster.node(production).nbd_uri(v))
            .collect();
        let fio = background_writes(&uris, 2000)?;
        std::thread::sleep(Duration::from_secs(2));
        cluster.kill_node(env, production);
        fio.kill_now();
        let asked = Instant::now();
        let started = cluster.json("node-w", &["group", "failover", "app"])?;
        let dr_uris: Vec<String> = volumes
            .1
            .iter()
            .map(|v| cluster.node(dr).nbd_uri(v))
            .collect();
        let mut open: Vec<&String> = dr_uris.iter().collect();
        while !open.is_empty() {
            check_interrupted()?;
            if asked.elapsed() > Duration::from_secs(60) {
                bail!("the DR exports did not take writes within 60 s of the failover call");
            }
            open.retain(|uri| !writable(uri));
        }
        let took = asked.elapsed().as_secs_f64();
        let job = started["job_id"].as_str().context("job id")?.to_owned();
        cluster.cli("node-w", &["job", "wait", &job, "--timeout", "60"])?;
        let shown = cluster.json("node-w", &["job", "show", &job])?;
        eprintln!(
            "bench: failover {} → {dr}: DR exports writable {took:.3} s after the call; {}",
            round + 1,
            shown["result"]
        );
        times.push(took);
        results.push(shown["result"].clone());
        // The zone comes back; reprotect; next round fails over the other way.
        cluster.restart(env, production)?;
        cluster.wait("the old production side to be demoted", 60, |c| {
            Ok(volumes.0.iter().all(|v| {
                c.pair_state(production, v)
                    .is_ok_and(|s| s["fence"] == "demoted")
            }))
        })?;
        cluster.action("reprotect")?;
        std::mem::swap(&mut production, &mut dr);
        volumes = (volumes.1, volumes.0);
    }
    cluster.stop(env);
    Ok((times, results))
}

/// Failovers of a 2-pair async group under light writes: the production agent killed with
/// kill -9, then `group failover`; the time from the call until a write through each DR
/// export is taken. Each round reprotects and fails over back the other way.
pub fn failover(
    env: &mut Env,
    work: &Path,
    bin: &Path,
    rounds: u32,
) -> anyhow::Result<ScenarioResult> {
    let (mut times, results) = failover_rounds(env, work, bin, rounds, "group-failover", None)?;
    times.sort_by(f64::total_cmp);
    let (p50, max) = (
        percentile(&times, 0.5),
        times.last().copied().unwrap_or(f64::NAN),
    );
    Ok(ScenarioResult {
        name: "group-failover",
        summary: format!(
            "failover to writable DR exports: median {p50:.3} s, max {max:.3} s over {rounds} rounds"
        ),
        markdown: format!(
            "- **Group failover** (2 async pairs, the production agent killed with kill -9 under 2×2000 IOPS of 4k writes): the DR exports took writes {p50:.2} s after `group failover` (median of {rounds}; max {max:.2} s; each timed until a qemu-io write through both DR exports succeeded).\n"
        ),
        json: json!({"seconds": times, "median_s": p50, "max_s": max, "results": results}),
        goals: vec![Goal::at_most(
            "group failover: call to writable DR exports ≤ 2 s (the slowest round)".into(),
            Some(max),
            2.0,
            GoalFormat::Seconds,
        )],
    })
}

/// The union of two lists of extents, in bytes.
fn union_bytes(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).map(|&(o, l)| (o, o + l)).collect();
    all.sort_unstable();
    let mut total = 0;
    let mut current: Option<(u64, u64)> = None;
    for (start, end) in all {
        match current {
            Some((s, e)) if start <= e => current = Some((s, e.max(end))),
            Some((s, e)) => {
                total += e - s;
                current = Some((start, end));
            }
            None => current = Some((start, end)),
        }
    }
    total + current.map_or(0, |(s, e)| e - s)
}

fn dirty_extents(
    cluster: &GroupCluster,
    node: &str,
    volume: &str,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let v = cluster.json(node, &["volume", "dirty", volume])?;
    Ok(v["extents"]
        .as_array()
        .context("extents")?
        .iter()
        .filter_map(|e| Some((e["offset"].as_u64()?, e["length"].as_u64()?)))
        .collect())
}

/// fio writing `bytes` of distinct random 4 KiB blocks through `uri`, then waiting. The
/// offsets follow `seed` (fio ignores `randseed` unless `randrepeat` is off).
fn write_percent(uri: &str, bytes: u64, seed: u64) -> anyhow::Result<()> {
    run(Command::new("fio")
        .args([
            "--name=onepercent",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
        ])
        .arg("--randrepeat=0")
        .arg(format!("--uri={uri}"))
        .arg(format!("--io_size={bytes}"))
        .arg(format!("--randseed={seed}")))?;
    Ok(())
}

/// A 4 GiB async pair in a group: 1% written on the production side and not replicated
/// (the group stopped), the production agent killed a few seconds later, a failover, 1%
/// written on the new production side, the old zone back, and a reprotect: the bytes the
/// reprotect copied against the union of the two sides' dirty blocks.
pub fn reprotect(env: &mut Env, work: &Path, bin: &Path) -> anyhow::Result<ScenarioResult> {
    let size = 4 * GIB;
    let one_percent = size / 100 / 4096 * 4096;
    let mut cluster = GroupCluster::start(env, work, bin, "group-reprotect")?;
    cluster.group(1, size, "async")?;
    // Production writes that do not reach the DR side: the group is stopped.
    cluster.action("stop")?;
    write_percent(&cluster.node("node-a").nbd_uri("p1"), one_percent, 1)?;
    // Idle a few seconds (the activity log retires the regions), then the zone fails.
    std::thread::sleep(Duration::from_secs(4));
    cluster.kill_node(env, "node-a");
    let failover = cluster.action("failover")?;
    write_percent(&cluster.node("node-b").nbd_uri("d1"), one_percent, 2)?;
    cluster.restart(env, "node-a")?;
    cluster.wait("the old production side to be demoted", 60, |c| {
        c.pair_state("node-a", "p1")
            .map(|s| s["fence"] == "demoted")
    })?;
    let old_side = dirty_extents(&cluster, "node-a", "p1")?;
    let new_side = dirty_extents(&cluster, "node-b", "d1")?;
    let union = union_bytes(&old_side, &new_side);
    let sum = |e: &[(u64, u64)]| e.iter().map(|(_, l)| l).sum::<u64>();
    eprintln!(
        "bench: reprotect: the old production side has {} dirty bytes, the new one {}, their union {union}",
        sum(&old_side),
        sum(&new_side)
    );
    let asked = Instant::now();
    let job = cluster.action("reprotect")?;
    let took = asked.elapsed().as_secs_f64();
    let state = cluster.pair_state("node-b", "d1")?;
    let copied = state["counters"]["resync_bytes_copied"]
        .as_u64()
        .unwrap_or(0);
    let ratio = copied as f64 / union as f64;
    cluster.stop(env);
    let mb = |b: u64| b as f64 / 1e6;
    Ok(ScenarioResult {
        name: "group-reprotect",
        summary: format!(
            "reprotect of a 4 GiB pair: copied {:.1} MB for a union of {:.1} MB dirty ({ratio:.3}×)",
            mb(copied),
            mb(union)
        ),
        markdown: format!(
            "- **Reprotect** of a 4 GiB async pair with 1% ({:.1} MB) written on each side: the old production side's bitmap held {:.1} MB, the new side's {:.1} MB, their union {:.1} MB; the reprotect copied {:.1} MB ({ratio:.3} × the union) and ended {took:.1} s after the call. Failover: {}.\n",
            mb(one_percent),
            mb(sum(&old_side)),
            mb(sum(&new_side)),
            mb(union),
            mb(copied),
            failover["result"].as_str().unwrap_or("")
        ),
        json: json!({
            "volume_bytes": size,
            "written_each_side": one_percent,
            "old_side_dirty": sum(&old_side),
            "new_side_dirty": sum(&new_side),
            "union": union,
            "copied": copied,
            "ratio": ratio,
            "seconds": took,
            "job": job,
        }),
        goals: vec![Goal::at_most(
            "reprotect: bytes copied ≤ 1.1 × the union of both sides' dirty blocks".into(),
            Some(ratio),
            1.1,
            GoalFormat::Ratio,
        )],
    })
}

/// fio 4k randwrite QD32 on both production volumes at once: total IOPS.
fn iops_run(uris: &[String], runtime_s: u32) -> anyhow::Result<f64> {
    Ok(crate::fio::nbd_4k(Host::Production, uris, "randwrite", 1, runtime_s)?.0)
}

/// Two async pairs, 4k randwrite QD32 on both production volumes: in a group (cut every
/// second by the coordinator, answers held during each cut) against the same pairs on their
/// own (each cutting its own epochs), runs interleaved; and how long the group's cuts held
/// answers.
pub fn iops(
    env: &mut Env,
    work: &Path,
    bin: &Path,
    repeats: u32,
    runtime_s: u32,
) -> anyhow::Result<ScenarioResult> {
    let cluster = GroupCluster::start(env, work, bin, "group-iops")?;
    cluster.group(2, 512 * MIB, "async")?;
    let uris: Vec<String> = ["p1", "p2"]
        .iter()
        .map(|v| cluster.node("node-a").nbd_uri(v))
        .collect();
    // Every block written once (and replicated) first: each run then writes allocated
    // blocks on both sides, not a file system allocating them.
    for uri in &uris {
        run(Command::new("fio")
            .args([
                "--name=fill",
                "--ioengine=nbd",
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
            ])
            .arg(format!("--uri={uri}")))?;
    }
    let grouped_state = |c: &GroupCluster, grouped: bool| -> anyhow::Result<bool> {
        Ok(["p1", "p2"].iter().all(|v| {
            c.pair_state("node-a", v)
                .is_ok_and(|s| s["grouped"] == grouped)
        }) && ["d1", "d2"].iter().all(|v| {
            c.pair_state("node-b", v)
                .is_ok_and(|s| s["grouped"] == grouped)
        }))
    };
    let (mut grouped, mut alone, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repeats {
        check_interrupted()?;
        let mut this = [0.0f64; 2];
        // Alternate which goes first.
        for k in 0..2 {
            let in_group = (k + rep as usize).is_multiple_of(2);
            let now_grouped = grouped_state(&cluster, true)?;
            if in_group != now_grouped {
                if in_group {
                    cluster.create_group("g1,g2", "async")?;
                } else {
                    cluster.action("stop")?;
                    cluster.cli(
                        "node-w",
                        &["group", "update", "app", "--remove-pairs", "g1,g2"],
                    )?;
                    cluster.cli("node-w", &["group", "delete", "app"])?;
                }
                cluster.wait("the pairs to follow their group", 60, |c| {
                    grouped_state(c, in_group)
                })?;
            }
            cluster.settle()?;
            run(&mut Command::new("sync"))?;
            let value = iops_run(&uris, runtime_s)?;
            eprintln!(
                "bench: [{}/{repeats}] 4k randwrite QD32 on two async pairs {}: {value:.0} IOPS",
                rep + 1,
                if in_group { "in a group" } else { "alone" }
            );
            this[usize::from(in_group)] = value;
        }
        alone.push(this[0]);
        grouped.push(this[1]);
        ratios.push(this[1] / this[0]);
    }
    let holds: Vec<Value> = ["p1", "p2"]
        .iter()
        .filter_map(|v| cluster.pair_state("node-a", v).ok())
        .map(|s| s["hold"].clone())
        .collect();
    cluster.stop(env);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(v, 0.5)
    };
    let (g, a, r) = (
        median(&mut grouped.clone()),
        median(&mut alone.clone()),
        median(&mut ratios.clone()),
    );
    let hold_text: Vec<String> = holds
        .iter()
        .map(|h| {
            format!(
                "p50 {} µs, p99 {} µs over {} answers",
                h["p50_us"], h["p99_us"], h["held"]
            )
        })
        .collect();
    Ok(ScenarioResult {
        name: "group-iops",
        summary: format!(
            "async group {g:.0} IOPS vs {a:.0} alone: {r:.2}× (paired median); holds {}",
            hold_text.join("; ")
        ),
        markdown: format!(
            "- **Async group vs the same pairs alone**, 4k randwrite QD32 on both production volumes (512 MiB files written once beforehand; one production agent, the DR agent and a witness coordinator on this machine; 1 s cuts): {g:.0} IOPS in the group, {a:.0} alone, {r:.2}× (median of {repeats} paired runs, order alternating). The cuts held answers for {} (the two pairs).\n",
            hold_text.join(" and ")
        ),
        json: json!({"grouped_iops": grouped, "alone_iops": alone, "ratios": ratios, "median_ratio": r, "holds": holds}),
        goals: vec![Goal::at_least(
            "async group 4k randwrite QD32 ≥ 0.9 × the same pairs outside a group".into(),
            Some(r),
            0.9,
        )],
    })
}

/// A free TCP port on loopback, for a daemon to listen on.
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The Prometheus text a daemon serves on `port`.
fn scrape(port: u16) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// What the coordinator's metrics say of group `app`'s cuts: rounds completed and
/// abandoned, and when the cut behind its consistent point was made (Unix seconds; 0: none).
#[derive(Clone, Copy, Debug, Default)]
struct CutFigures {
    completed: f64,
    abandoned: f64,
    committed_cut_s: f64,
}

impl CutFigures {
    fn read(port: u16) -> anyhow::Result<Self> {
        let text = scrape(port)?;
        let value = |prefix: &str, with: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix) && l.contains(with))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        const ROUNDS: &str = "blockrep_group_cut_rounds_total{group=\"app\"";
        Ok(Self {
            completed: value(ROUNDS, "outcome=\"completed\""),
            abandoned: value(ROUNDS, "outcome=\"abandoned\""),
            committed_cut_s: value(
                "blockrep_group_consistent_cut_time_seconds{group=\"app\"",
                "",
            ),
        })
    }
}

/// One RPO reading: writes at `rate` IOPS on each production volume for `seconds`, the
/// group's consistent point age sampled every 100 ms from the coordinator's metrics.
struct RpoRun {
    label: String,
    rate: u32,
    ages: Vec<f64>,
    completed: f64,
    abandoned: f64,
}

impl RpoRun {
    fn p(&self, q: f64) -> f64 {
        let mut ages = self.ages.clone();
        ages.sort_by(f64::total_cmp);
        percentile(&ages, q)
    }

    fn json(&self) -> Value {
        json!({
            "label": self.label,
            "rate_iops_per_volume": self.rate,
            "age_p50_s": self.p(0.5),
            "age_p99_s": self.p(0.99),
            "age_max_s": self.p(1.0),
            "samples": self.ages.len(),
            "rounds_completed": self.completed,
            "rounds_abandoned": self.abandoned,
        })
    }
}

fn rpo_run(
    uris: &[String],
    port: u16,
    label: String,
    rate: u32,
    seconds: u32,
) -> anyhow::Result<RpoRun> {
    let before = CutFigures::read(port)?;
    let mut fio = background_writes(uris, rate)?;
    let started = Instant::now();
    let mut ages = Vec::new();
    while started.elapsed() < Duration::from_secs(u64::from(seconds)) {
        check_interrupted()?;
        fio.check_running()?;
        std::thread::sleep(Duration::from_millis(100));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let figures = CutFigures::read(port)?;
        if figures.committed_cut_s > 0.0 {
            ages.push(now - figures.committed_cut_s);
        }
    }
    drop(fio);
    let after = CutFigures::read(port)?;
    Ok(RpoRun {
        label,
        rate,
        ages,
        completed: after.completed - before.completed,
        abandoned: after.abandoned - before.abandoned,
    })
}

/// How far an async group's consistent point trails under writes: a 2-pair group with 1 s
/// epochs, under the failover scenario's load (2 × 2000 IOPS of 4k writes, QD8) and at half
/// the group's maximum (measured first, 4k randwrite QD32 on both volumes), `seconds` each.
pub fn rpo(env: &mut Env, work: &Path, bin: &Path, seconds: u32) -> anyhow::Result<ScenarioResult> {
    const EPOCH_S: f64 = 1.0;
    let port = free_tcp_port()?;
    let metrics = format!("metrics_listen = \"127.0.0.1:{port}\"");
    let cluster = GroupCluster::start_with(
        env,
        work,
        bin,
        "group-rpo",
        NodeConfig {
            coordinator_extra: &metrics,
            extra: "[replication]\nepoch_interval_ms = 1000\n",
            ..Default::default()
        },
    )?;
    cluster.group(2, 256 * MIB, "async")?;
    let uris: Vec<String> = ["p1", "p2"]
        .iter()
        .map(|v| cluster.node("node-a").nbd_uri(v))
        .collect();
    let mut runs = vec![rpo_run(
        &uris,
        port,
        "2 × 2000 IOPS (the failover scenario's load)".into(),
        2000,
        seconds,
    )?];
    let max = iops_run(&uris, 5)?;
    let half = (max / 2.0 / uris.len() as f64).round() as u32;
    runs.push(rpo_run(
        &uris,
        port,
        format!("half the group's maximum ({max:.0} IOPS): 2 × {half} IOPS"),
        half,
        seconds,
    )?);
    cluster.stop(env);
    let mut markdown = format!(
        "- **Async group consistent point age** (2 pairs, 1 s epochs, 4k random writes at QD8 on both production volumes for {seconds} s; the age of the cut behind the group's commit, sampled every 100 ms from the coordinator's metrics):\n"
    );
    let mut goals = Vec::new();
    for r in &runs {
        markdown.push_str(&format!(
            "  - {}: age p50 {:.2} s, p99 {:.2} s, max {:.2} s over {} samples; cut rounds {} completed, {} abandoned\n",
            r.label,
            r.p(0.5),
            r.p(0.99),
            r.p(1.0),
            r.ages.len(),
            r.completed,
            r.abandoned
        ));
        goals.push(Goal::at_most(
            format!(
                "async group, {}: consistent point age p99 ≤ 2 × the epoch interval",
                r.label
            ),
            (!r.ages.is_empty()).then(|| r.p(0.99)),
            2.0 * EPOCH_S,
            GoalFormat::Seconds,
        ));
        goals.push(Goal::at_most(
            format!("async group, {}: cut rounds abandoned = 0", r.label),
            Some(r.abandoned),
            0.0,
            GoalFormat::Count,
        ));
    }
    let summary = runs
        .iter()
        .map(|r| {
            format!(
                "{}: age p99 {:.2} s, {} abandoned",
                r.label,
                r.p(0.99),
                r.abandoned
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok(ScenarioResult {
        name: "group-rpo",
        summary,
        markdown,
        json: json!({"epoch_interval_s": EPOCH_S, "runs": runs.iter().map(RpoRun::json).collect::<Vec<_>>()}),
        goals,
    })
}
