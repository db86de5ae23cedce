//! Two agents on this machine as a small cluster: certificates made with the CLI, a
//! coordinator on a witness node of its own (zone az3, no volumes, on the DR host's CPU in
//! the pinned layout), and a pair between a volume on each agent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::env::{Env, Host, check_interrupted, run};

/// A two-agent cluster, and its pair if one was created.
pub struct Cluster {
    pub production_pid: u32,
    pub dr_pid: u32,
    pub coordinator_pid: u32,
    /// The production volume's NBD URI.
    pub uri: String,
    pub production_socket: PathBuf,
    pub dr_socket: PathBuf,
    /// The DR agent's QUIC address, and a client certificate for the link test.
    pub dr_address: String,
    pub client_tls: PathBuf,
    pub pair: Option<String>,
    bin: PathBuf,
    pub netns: Option<String>,
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How a bench cluster is laid out.
#[derive(Clone, Copy, Default)]
pub struct ClusterSpec<'a> {
    /// Production and DR volumes; with a model, a pair between them.
    pub devices: Option<(&'a Path, &'a Path)>,
    pub model: Option<&'a str>,
    /// Added to both agents' configuration: at the top, and inside `[cluster]`.
    pub extra: &'a str,
    pub cluster_extra: &'a str,
    /// Both agents run in this network namespace (made with [`Env::netns`]).
    pub netns: Option<&'a str>,
    /// The DR agent's directory (its state, the stage log) goes here instead of beside the
    /// others: the DR host's own disk.
    pub dr_home: Option<&'a Path>,
}

impl Cluster {
    /// Starts two agents in `work/name`; with a model, registers `production` and `dr` as
    /// volumes and creates a pair between them, waiting until its initial sync is done.
    pub fn start(
        env: &mut Env,
        work: &Path,
        bin: &Path,
        name: &str,
        spec: ClusterSpec<'_>,
    ) -> anyhow::Result<Self> {
        let ClusterSpec {
            devices,
            model,
            extra,
            cluster_extra,
            netns,
            dr_home,
        } = spec;
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        if let Some(home) = dr_home {
            let dr_dir = home.join(name).join("node-b");
            std::fs::create_dir_all(&dr_dir)?;
            std::os::unix::fs::symlink(&dr_dir, dir.join("node-b"))
                .context("link the DR agent's directory")?;
        }
        let nodes = start_nodes(
            env,
            &dir,
            bin,
            &[("node-w", "az3"), ("node-a", "az1"), ("node-b", "az2")],
            &["client"],
            NodeConfig {
                extra,
                cluster_extra,
                netns,
                ..Default::default()
            },
        )?;
        let pids: Vec<u32> = nodes.iter().map(|n| n.pid).collect();
        crate::env::pin(pids[0], Host::Dr)?;
        crate::env::pin(pids[1], Host::Production)?;
        crate::env::pin(pids[2], Host::Dr)?;
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let production_socket = dir.join("node-a/run/control.sock");
        let dr_socket = dir.join("node-b/run/control.sock");
        let mut cluster = Self {
            coordinator_pid: pids[0],
            production_pid: pids[1],
            dr_pid: pids[2],
            uri: format!(
                "nbd+unix:///prod?socket={}",
                dir.join("node-a/run/nbd/prod.sock").display()
            ),
            production_socket,
            dr_socket,
            dr_address: format!("127.0.0.1:{}", ports[2]),
            client_tls: dir.join("client/tls"),
            pair: None,
            bin: bin.to_owned(),
            netns: netns.map(str::to_owned),
        };
        cluster.wait_nodes(3)?;
        let (Some((production, dr)), Some(model)) = (devices, model) else {
            return Ok(cluster);
        };
        cluster.cli_a(&[
            "volume",
            "add",
            "--name",
            "prod",
            "--path",
            path(production),
        ])?;
        cluster.cli_b(&["volume", "add", "--name", "dr", "--path", path(dr)])?;
        cluster.wait_volumes()?;
        let created = cluster.json_a(&[
            "pair",
            "create",
            "--name",
            name,
            "--volumes",
            "prod,dr",
            "--priority-station",
            "az1",
            "--model",
            model,
        ])?;
        let job = created["job_id"].as_str().context("job id")?.to_owned();
        cluster.pair = created["replication"]["id"].as_str().map(str::to_owned);
        cluster.cli_a(&["job", "wait", &job, "--timeout", "1800"])?;
        cluster.wait_idle()?;
        Ok(cluster)
    }

    fn cli(&self, socket: &Path, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(self.bin.join("blockrep"))
            .arg("--socket")
            .arg(socket)
            .args(args))
    }

    pub fn cli_a(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cli(&self.production_socket, args)
    }

    fn cli_b(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cli(&self.dr_socket, args)
    }

    pub fn json_a(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.cli_a(&all)?)?)
    }

    fn wait_nodes(&self, n: usize) -> anyhow::Result<()> {
        self.wait("the agents to register", Duration::from_secs(60), || {
            let nodes = self.json_a(&["node", "list"])?;
            Ok(nodes
                .as_array()
                .is_some_and(|a| a.iter().filter(|n| n["alive"] == true).count() >= n))
        })
    }

    fn wait_volumes(&self) -> anyhow::Result<()> {
        self.wait(
            "the coordinator to see the volumes",
            Duration::from_secs(60),
            || {
                let nodes = self.json_a(&["node", "list"])?;
                Ok(nodes.as_array().is_some_and(|a| {
                    a.iter()
                        .filter(|n| n["name"] != "node-w")
                        .all(|n| n["volumes"].as_u64().unwrap_or(0) >= 1)
                }))
            },
        )
    }

    /// The production side's view of the pair, now.
    pub fn pair_state(&self) -> anyhow::Result<Value> {
        let status = self.json_a(&["status"])?;
        Ok(status["pairs"][0].clone())
    }

    /// Waits until the pair has nothing left to send and the DR side has applied all it
    /// staged: a run starts from a quiet pair (a DR agent still applying a big unit would
    /// take CPU and disk from the next run).
    pub fn wait_idle(&self) -> anyhow::Result<()> {
        self.wait("the pair to settle", Duration::from_secs(600), || {
            let p = self.pair_state()?;
            let applied = p["consistent_epoch"].as_u64().unwrap_or(0);
            let staged = p["staged_epoch"].as_u64().unwrap_or(0);
            Ok(p["replication_status"] == "active"
                && p["out_of_sync_bytes"] == 0
                && p["counters"]["journal_bytes"] == 0
                && applied >= staged)
        })
    }

    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            if done().unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `program`, run inside the agents' network namespace if they have one.
    pub fn in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// As [`Cluster::in_netns`], on the production host's CPU in the pinned layout.
    pub fn on_production(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = crate::env::on_host(Host::Production, "ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => crate::env::on_host(Host::Production, program),
        }
    }

    /// Stops both agents, then the coordinator.
    pub fn stop(self, env: &mut Env) {
        env.stop_server(self.dr_pid);
        env.stop_server(self.production_pid);
        env.stop_server(self.coordinator_pid);
    }

    /// The production agent's counters a run is measured by: the bytes it has sent to the
    /// DR side so far (every frame of its streams, catch-ups and syncs included), the bytes
    /// clients wrote to the production volume, and its journal's overflows.
    pub fn counts(&self) -> anyhow::Result<crate::meter::PairCounts> {
        let status = self.json_a(&["status"])?;
        let pair = &status["pairs"][0];
        let counters = &pair["counters"];
        let count = |key: &str| {
            counters[key]
                .as_u64()
                .with_context(|| format!("counter {key}"))
        };
        let volume = status["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == pair["volume_name"]))
            .context("the pair's volume in the production agent's status")?;
        Ok(crate::meter::PairCounts {
            bytes_sent: count("bytes_sent")?,
            bytes_written: volume["bytes_written"]
                .as_u64()
                .context("the volume's bytes_written")?,
            journal_overflows: count("journal_overflows")?,
        })
    }

    /// The pair's journal bound, as the production agent reports it.
    pub fn journal_limit(&self) -> Option<u64> {
        self.pair_state().ok()?["counters"]["journal_limit"].as_u64()
    }

    /// One link test from the production host to the DR agent.
    pub fn link_test(&self, seconds: u32) -> anyhow::Result<LinkTest> {
        self.link_test_with(seconds, "cubic")
    }

    /// As [`Cluster::link_test`], with this congestion controller.
    pub fn link_test_with(
        &self,
        seconds: u32,
        congestion_control: &str,
    ) -> anyhow::Result<LinkTest> {
        let cpu_before = crate::env::children_cpu_seconds();
        let mut link_test = self.on_production(self.bin.join("blockrep"));
        link_test.args([
            "--output",
            "json",
            "cluster",
            "link-test",
            "--address",
            &self.dr_address,
            "--node",
            "node-b",
            "--tls-dir",
            path(&self.client_tls),
            "--seconds",
            &seconds.to_string(),
            "--congestion-control",
            congestion_control,
        ]);
        if let Some(bytes) = crate::env::max_udp_payload() {
            link_test.args(["--max-udp-payload", &bytes.to_string()]);
        }
        let out = run(&mut link_test)?;
        // The sender was the only child waited for since.
        let sender_cpu_s = crate::env::children_cpu_seconds() - cpu_before;
        let v: Value = serde_json::from_str(&out)?;
        Ok(LinkTest {
            megabytes_per_second: v["megabytes_per_second"]
                .as_f64()
                .context("link test figure")?,
            bytes: v["bytes"].as_u64().context("link test bytes")?,
            sender_cpu_s,
        })
    }
}

/// What one link test measured.
pub struct LinkTest {
    pub megabytes_per_second: f64,
    pub bytes: u64,
    /// CPU seconds of the sending process (the CLI), start to exit.
    pub sender_cpu_s: f64,
}

/// What every node's configuration adds: top-level keys and sections, keys of `[cluster]`,
/// and the network namespace the daemons run in.
#[derive(Clone, Copy, Default)]
pub struct NodeConfig<'a> {
    pub extra: &'a str,
    /// Added at the top of the coordinator's (the first node's) configuration only.
    pub coordinator_extra: &'a str,
    /// Added at the end of each coordinator's configuration (a `[coordinator]` section).
    pub coordinator_section: &'a str,
    /// With more than one, the first `candidates` nodes are the candidates of an HA
    /// coordinator (`coordinator_section` names their etcd), and every node lists them.
    pub candidates: usize,
    pub cluster_extra: &'a str,
    pub netns: Option<&'a str>,
}

/// A daemon of a bench cluster.
pub struct NodeProc {
    pub name: String,
    pub pid: u32,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl NodeProc {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/control.sock")
    }

    pub fn nbd_uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.dir.join(format!("run/nbd/{volume}.sock")).display()
        )
    }
}

/// Makes a cluster CA in `dir`, a certificate per node (and per name in `clients`), and
/// starts a daemon per `(name, zone)` on loopback; the first runs the coordinator.
pub fn start_nodes(
    env: &mut Env,
    dir: &Path,
    bin: &Path,
    nodes: &[(&str, &str)],
    clients: &[&str],
    config: NodeConfig<'_>,
) -> anyhow::Result<Vec<NodeProc>> {
    let NodeConfig {
        extra,
        coordinator_extra,
        coordinator_section,
        candidates,
        netns,
        cluster_extra,
    } = config;
    let coordinates = |i: usize| i < candidates.max(1);
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        run(Command::new(bin.join("blockrep")).args(args))
    };
    let ca = dir.join("ca");
    cli(&["cluster", "init-ca", "--dir", path(&ca)])?;
    for (i, name) in nodes
        .iter()
        .map(|(n, _)| *n)
        .chain(clients.iter().copied())
        .enumerate()
    {
        let out = dir.join(name).join("tls");
        let mut args = vec![
            "cluster",
            "issue-cert",
            "--ca-dir",
            path(&ca),
            "--node",
            name,
            "--out-dir",
            path(&out),
        ];
        // The first node runs the coordinator (or the first few are its candidates).
        if coordinates(i) {
            args.push("--coordinator");
        }
        cli(&args)?;
    }
    let ports = nodes
        .iter()
        .map(|_| free_udp_port())
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let coordinators = if candidates > 1 {
        let listed: Vec<String> = ports[..candidates]
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        format!("coordinators = [{}]", listed.join(", "))
    } else {
        format!("coordinator = \"127.0.0.1:{}\"", ports[0])
    };
    let payload = crate::env::max_udp_payload()
        .map(|bytes| format!("max_udp_payload = {bytes}"))
        .unwrap_or_default();
    let mut started = Vec::new();
    for (i, (node, az)) in nodes.iter().enumerate() {
        let node_dir = dir.join(node);
        let tls = node_dir.join("tls");
        let config = node_dir.join("blockrepd.toml");
        let own = if coordinates(i) {
            coordinator_extra
        } else {
            ""
        };
        let section = if coordinates(i) {
            coordinator_section
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!(
                "node_name = \"{node}\"\navailability_zone = \"{az}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n{own}\n{extra}\n[cluster]\nlisten = \"127.0.0.1:{}\"\n{coordinators}\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncoordinator_role = {}\n{payload}\n{cluster_extra}\n{section}\n",
                node_dir.join("state").display(),
                node_dir.join("run").display(),
                ports[i],
                tls.join("ca.pem").display(),
                tls.join("node.pem").display(),
                tls.join("node.key").display(),
                coordinates(i)
            ),
        )?;
        let pid = crate::env::start_daemon_in(
            env,
            bin,
            &node_dir,
            &config,
            netns,
            crate::env::host_of(node),
        )?;
        started.push(NodeProc {
            name: (*node).to_owned(),
            pid,
            port: ports[i],
            dir: node_dir,
            config,
        });
    }
    Ok(started)
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
