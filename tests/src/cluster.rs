//! A cluster of real daemons on this machine: one CA, a certificate per node made with the
//! CLI, each node in its own directory with its own QUIC port on loopback. The first node
//! runs the coordinator.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{Daemon, binary};
use crate::run;

pub struct Node {
    pub name: String,
    pub az: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub daemon: Option<Daemon>,
    /// Extra environment for the daemon (test-only fault hooks).
    pub env: Vec<(String, String)>,
    /// The network namespace the daemon runs in, if not the test's.
    pub netns: Option<String>,
    /// Where the daemon serves Prometheus metrics.
    pub metrics_port: u16,
    /// Where the daemon serves the REST API (plain HTTP on loopback).
    pub api_port: u16,
}

impl Node {
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("node running")
    }

    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "node {} already running", self.name);
        let wrapper: Vec<&str> = match &self.netns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => Vec::new(),
        };
        // Another test may take the metrics port between choosing it and the daemon binding
        // it: then the node gets another.
        for _ in 0..5 {
            match Daemon::start_wrapped(
                &wrapper,
                &binary("blockrepd"),
                &self.dir,
                &self.config,
                &self.env,
            ) {
                Ok(daemon) => {
                    self.daemon = Some(daemon);
                    return;
                }
                Err(e) if format!("{e:#}").contains("cannot listen on metrics_listen") => {
                    let port = free_tcp_port();
                    let config = std::fs::read_to_string(&self.config).unwrap().replace(
                        &format!("metrics_listen = \"127.0.0.1:{}\"", self.metrics_port),
                        &format!("metrics_listen = \"127.0.0.1:{port}\""),
                    );
                    std::fs::write(&self.config, config).unwrap();
                    self.metrics_port = port;
                }
                Err(e) if format!("{e:#}").contains("cannot listen on api.listen") => {
                    let port = free_tcp_port();
                    let config = std::fs::read_to_string(&self.config).unwrap().replace(
                        &format!("[api]\nlisten = \"127.0.0.1:{}\"", self.api_port),
                        &format!("[api]\nlisten = \"127.0.0.1:{port}\""),
                    );
                    std::fs::write(&self.config, config).unwrap();
                    self.api_port = port;
                }
                Err(e) => panic!("start node {}: {e:#}", self.name),
            }
        }
        panic!("start node {}: no free metrics or API port", self.name);
    }

    /// Restarts the node with a test-only fault hook set in its environment, and checks
    /// the daemon was built with the hooks (scripts/test.sh builds it so).
    pub fn restart_with_fault(&mut self, variable: &str, value: &str) {
        self.stop();
        self.env.push((variable.into(), value.into()));
        self.start();
        assert!(
            self.daemon()
                .log_text()
                .contains("built with test-only fault injection"),
            "this test needs the daemon built with --features blockrepd/fault-injection (scripts/test.sh does it)"
        );
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.daemon.take().expect("node running").stop().unwrap();
    }

    pub fn kill9(&mut self) {
        self.daemon.take().expect("node running").kill9();
    }

    /// Waits up to `timeout` for the daemon to die on its own (a test-only fault hook);
    /// returns whether it did.
    pub fn wait_crash(&mut self, timeout: std::time::Duration) -> bool {
        let crashed = self
            .daemon
            .as_mut()
            .expect("node running")
            .wait_exit(timeout);
        if crashed {
            self.daemon = None;
        }
        crashed
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        self.daemon().cli_json(args)
    }

    /// The daemon's Prometheus text metrics (an HTTP GET on its metrics address).
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }
}

pub struct TestCluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// The coordinator's etcd, when the tests run on it (`BLOCKREP_TEST_COORDINATOR_STORE`);
    /// dropped after the nodes.
    pub etcd: Option<crate::etcd::EtcdCluster>,
}

/// The store a test cluster's one coordinator keeps its records in: redb (embedded), or a
/// one-member etcd the cluster starts, with `BLOCKREP_TEST_COORDINATOR_STORE=etcd` (the
/// test command runs the group tests both ways).
fn coordinator_store_of_tests() -> Option<&'static str> {
    match std::env::var("BLOCKREP_TEST_COORDINATOR_STORE").as_deref() {
        Ok("etcd") => Some("etcd"),
        Ok("redb") | Ok("") | Err(_) => None,
        Ok(other) => panic!("BLOCKREP_TEST_COORDINATOR_STORE={other:?}: redb or etcd"),
    }
}

/// A node to start: its name and zone, and where it runs (a network namespace and the
/// address it listens on there; loopback of the test's namespace by default).
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub az: String,
    pub netns: Option<String>,
    pub address: String,
}

impl NodeSpec {
    pub fn new(name: &str, az: &str) -> Self {
        Self {
            name: name.into(),
            az: az.into(),
            netns: None,
            address: "127.0.0.1".into(),
        }
    }

    pub fn in_netns(mut self, netns: &str, address: &str) -> Self {
        self.netns = Some(netns.into());
        self.address = address.into();
        self
    }
}

/// What every node's configuration adds: top-level keys and sections (`extra`, where
/// `{node_dir}` stands for the node's own directory), and keys of the `[cluster]` section
/// (`cluster_extra`).
///
/// With `candidates` > 0, the first `candidates` nodes are the candidates of an HA
/// coordinator (their `[coordinator]` section is `coordinator_section`), and every node
/// lists them all (`cluster.coordinators`). Otherwise the first node runs the coordinator.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterConfig<'a> {
    pub extra: &'a str,
    pub cluster_extra: &'a str,
    pub candidates: usize,
    pub coordinator_section: &'a str,
}

/// Ports a test chooses for its daemons to listen on come from outside the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`): an outgoing socket of another test (a
/// QUIC client endpoint binds port 0) can then never take one between choosing and binding
/// it. Under nextest, each test running at the same time has its own share of that range
/// (by `NEXTEST_TEST_GLOBAL_SLOT`, unique among the tests running), so another test cannot
/// choose it either. A slot beyond the range's shares of 1000 ports, and a test under
/// `cargo test`, chooses from the whole range, with a small chance of a clash.
fn listen_ports() -> std::ops::Range<u16> {
    let outside = outside_the_ephemeral_range();
    let slot = std::env::var("NEXTEST_TEST_GLOBAL_SLOT")
        .ok()
        .and_then(|slot| slot.parse::<usize>().ok());
    let Some(slot) = slot else {
        return outside;
    };
    const SHARE: usize = 1000;
    if slot >= outside.len() / SHARE {
        return outside;
    }
    let start = outside.start as usize + slot * SHARE;
    start as u16..(start + SHARE) as u16
}

fn outside_the_ephemeral_range() -> std::ops::Range<u16> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut ends = text.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((ends.next()??, ends.next()??))
        });
    match ephemeral {
        Some((low, _)) if low >= 4096 => low.saturating_sub(12_000).max(1024)..low,
        Some((_, high)) if high <= 61_000 => high + 1..65_535,
        // No room outside it: any port, and the small chance of a clash.
        _ => 20_000..32_768,
    }
}

/// A random port of [`listen_ports`] that `bind` accepts now and that this test has not
/// chosen before: a daemon killed and started again finds its port still free.
fn free_port(bind: impl Fn(u16) -> bool) -> u16 {
    use rand::{Rng, SeedableRng};
    static CHOSEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    // Not a test's random choice (no run depends on which port it gets).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(nanos ^ u64::from(std::process::id()) << 32);
    let ports = listen_ports();
    let mut chosen = CHOSEN.lock().unwrap();
    let port = (0..1000)
        .map(|_| rng.random_range(ports.clone()))
        .find(|&port| !chosen.contains(&port) && bind(port))
        .expect("a free port outside the ephemeral range");
    chosen.insert(port);
    port
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> u16 {
    free_port(|port| std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> u16 {
    free_port(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// Runs the CLI without a daemon.
pub fn cli(args: &[&str]) -> String {
    run(Command::new(binary("blockrep")).args(args))
}

impl TestCluster {
    /// Makes a CA and `(name, az)` nodes in `dir`, with `extra` TOML in every config, and
    /// starts them; the first runs the coordinator.
    pub fn start(dir: &Path, nodes: &[(&str, &str)], extra: &str) -> Self {
        Self::start_in(dir, nodes, extra, None)
    }

    /// As [`TestCluster::start`], every daemon inside network namespace `netns` (on its
    /// loopback), if given.
    pub fn start_in(dir: &Path, nodes: &[(&str, &str)], extra: &str, netns: Option<&str>) -> Self {
        let specs: Vec<NodeSpec> = nodes
            .iter()
            .map(|(name, az)| {
                let spec = NodeSpec::new(name, az);
                match netns {
                    Some(ns) => spec.in_netns(ns, "127.0.0.1"),
                    None => spec,
                }
            })
            .collect();
        Self::start_nodes(
            dir,
            &specs,
            ClusterConfig {
                extra,
                ..ClusterConfig::default()
            },
        )
    }

    /// Makes a CA and the nodes of `specs` in `dir` and starts them; the first runs the
    /// coordinator.
    pub fn start_nodes(dir: &Path, specs: &[NodeSpec], config: ClusterConfig<'_>) -> Self {
        let ClusterConfig {
            extra,
            cluster_extra,
            candidates,
            coordinator_section,
        } = config;
        let nodes: Vec<(&str, &str)> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.az.as_str()))
            .collect();
        let ca = dir.join("ca");
        cli(&["cluster", "init-ca", "--dir", ca.to_str().unwrap()]);
        let ports: Vec<u16> = nodes.iter().map(|_| free_udp_port()).collect();
        let metrics_ports: Vec<u16> = nodes.iter().map(|_| free_tcp_port()).collect();
        let api_ports: Vec<u16> = nodes.iter().map(|_| free_tcp_port()).collect();
        let runs_coordinator = |i: usize| i < candidates.max(1);
        let coordinators = if candidates == 0 {
            format!("coordinator = \"{}:{}\"", specs[0].address, ports[0])
        } else {
            let listed: Vec<String> = (0..candidates)
                .map(|i| format!("\"{}:{}\"", specs[i].address, ports[i]))
                .collect();
            format!("coordinators = [{}]", listed.join(", "))
        };
        let mut cluster = Self {
            dir: dir.to_owned(),
            nodes: Vec::new(),
            etcd: None,
        };
        // The one coordinator on etcd, if the tests run so.
        let on_etcd;
        let (candidates_section, coordinator_section) =
            if candidates == 0 && coordinator_store_of_tests() == Some("etcd") {
                let etcd = crate::etcd::EtcdCluster::start(&dir.join("etcd"), 1);
                on_etcd = format!(
                    "store = \"etcd\"\netcd_endpoints = {}\nlease_ttl_secs = 2\n",
                    etcd.endpoints_toml()
                );
                cluster.etcd = Some(etcd);
                (true, on_etcd.as_str())
            } else {
                (candidates > 0, coordinator_section)
            };
        for (i, (name, az)) in nodes.iter().enumerate() {
            let node_dir = dir.join(name);
            std::fs::create_dir_all(&node_dir).unwrap();
            let tls = node_dir.join("tls");
            let mut issue = vec![
                "cluster",
                "issue-cert",
                "--ca-dir",
                ca.to_str().unwrap(),
                "--node",
                name,
                "--out-dir",
                tls.to_str().unwrap(),
            ];
            if runs_coordinator(i) {
                issue.push("--coordinator");
            }
            cli(&issue);
            let config = node_dir.join("blockrepd.toml");
            // `{node_dir}` in the shared text is each node's own directory.
            let extra = extra.replace("{node_dir}", &node_dir.display().to_string());
            let section = if candidates_section && runs_coordinator(i) {
                format!("[coordinator]\n{coordinator_section}\n")
            } else {
                String::new()
            };
            std::fs::write(
                &config,
                format!(
                    "node_name = \"{name}\"\navailability_zone = \"{az}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n{extra}\n[api]\nlisten = \"127.0.0.1:{}\"\n[cluster]\nlisten = \"{}:{}\"\n{coordinators}\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncoordinator_role = {}\n{cluster_extra}\n{section}",
                    node_dir.join("state").display(),
                    node_dir.join("run").display(),
                    metrics_ports[i],
                    api_ports[i],
                    specs[i].address,
                    ports[i],
                    tls.join("ca.pem").display(),
                    tls.join("node.pem").display(),
                    tls.join("node.key").display(),
                    runs_coordinator(i)
                ),
            )
            .unwrap();
            cluster.nodes.push(Node {
                name: name.to_string(),
                az: az.to_string(),
                dir: node_dir,
                config,
                port: ports[i],
                daemon: None,
                env: Vec::new(),
                netns: specs[i].netns.clone(),
                metrics_port: metrics_ports[i],
                api_port: api_ports[i],
            });
        }
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster.wait_nodes_alive();
        cluster
    }

    /// The node the tests call the coordinator through: the first node (which runs it, or
    /// is a candidate of an HA coordinator), or while that one is down, the first running
    /// node (which forwards to the coordinator).
    pub fn coordinator(&self) -> &Node {
        if self.nodes[0].daemon.is_some() {
            return &self.nodes[0];
        }
        self.nodes
            .iter()
            .find(|n| n.daemon.is_some())
            .unwrap_or(&self.nodes[0])
    }

    /// The node whose coordinator leads, as the cluster's node list says.
    pub fn leader(&self) -> Option<String> {
        let nodes = self
            .coordinator()
            .daemon()
            .cli(&["--output", "json", "node", "list"]);
        if !nodes.status.success() {
            return None;
        }
        let nodes: Value = serde_json::from_slice(&nodes.stdout).ok()?;
        nodes
            .as_array()?
            .iter()
            .find(|n| n["coordinator_role"] == "leader")
            .and_then(|n| n["name"].as_str().map(str::to_owned))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node of the cluster")
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node of the cluster")
    }

    /// Waits until the coordinator sees every running node alive.
    pub fn wait_nodes_alive(&self) {
        let running: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.daemon.is_some())
            .map(|n| n.name.as_str())
            .collect();
        wait_until(Duration::from_secs(30), "every node registered", || {
            // An HA coordinator may not have elected its leader yet: not an error.
            let out = self
                .coordinator()
                .daemon()
                .cli(&["--output", "json", "node", "list"]);
            let Ok(nodes) = serde_json::from_slice::<Value>(&out.stdout) else {
                return false;
            };
            running.iter().all(|name| {
                nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n["name"] == *name && n["alive"] == true)
            })
        });
    }

    /// Adds a volume on `node` and waits until the coordinator knows it (the node's next
    /// report carries it).
    pub fn add_volume(&self, node: &str, name: &str, path: &Path) -> Value {
        let v = self.node(node).daemon().add_volume(name, path);
        let count = self
            .node(node)
            .cli_json(&["volume", "list"])
            .as_array()
            .unwrap()
            .len() as u64;
        wait_until(
            Duration::from_secs(30),
            "the coordinator sees the volume",
            || {
                let nodes = self.coordinator().cli_json(&["node", "list"]);
                nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n["name"] == node && n["volumes"].as_u64().unwrap_or(0) >= count)
            },
        );
        v
    }

    /// Adds a volume of `project` on `node` (writeback), without waiting: its id.
    pub fn add_volume_of(&self, node: &str, name: &str, path: &Path, project: &str) -> String {
        let v = self.node(node).cli_json(&[
            "volume",
            "add",
            "--name",
            name,
            "--path",
            path.to_str().unwrap(),
            "--cache",
            "writeback",
            "--project",
            project,
        ]);
        v["id"].as_str().expect("a volume id").to_owned()
    }

    /// Two sparse files of `size` bytes in `dir`, volume `prod` on node-a and `dr` on
    /// node-b, paired as `model` (production in az1), the creation waited for. Returns the
    /// two files and the pair's id.
    pub fn pair_two_files(
        &self,
        dir: &Path,
        name: &str,
        model: &str,
        size: u64,
    ) -> (PathBuf, PathBuf, String) {
        let prod = dir.join("prod.img");
        let dr = dir.join("dr.img");
        crate::sparse_file(&prod, size);
        crate::sparse_file(&dr, size);
        self.add_volume("node-a", "prod", &prod);
        self.add_volume("node-b", "dr", &dr);
        let (pair, job) = self.create_pair(name, "prod,dr", "az1", model);
        self.wait_job(&job, Duration::from_secs(120));
        (prod, dr, pair)
    }

    /// Creates a pair (production volume first) and returns (pair id, job id).
    pub fn create_pair(
        &self,
        name: &str,
        volumes: &str,
        az: &str,
        model: &str,
    ) -> (String, String) {
        let created = self.coordinator().cli_json(&[
            "pair",
            "create",
            "--name",
            name,
            "--volumes",
            volumes,
            "--priority-station",
            az,
            "--model",
            model,
        ]);
        let pair = created["replication"]["id"].as_str().unwrap().to_owned();
        let job = created["job_id"].as_str().unwrap().to_owned();
        (pair, job)
    }

    /// Waits for a job to succeed.
    pub fn wait_job(&self, job: &str, timeout: Duration) {
        let out = self.coordinator().daemon().cli(&[
            "job",
            "wait",
            job,
            "--timeout",
            &timeout.as_secs().to_string(),
        ]);
        assert!(
            out.status.success(),
            "job {job}: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.log_tails(40)
        );
    }

    /// The last `lines` lines of every running node's log, for a failure's message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in self.nodes.iter().filter(|n| n.daemon.is_some()) {
            let log = node.daemon().log_text();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {} ---\n", node.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    pub fn pair(&self, pair: &str) -> Value {
        self.coordinator().cli_json(&["pair", "show", pair])
    }
}

/// The pair's state as a node sees it right now (from its local status).
pub fn local_pair_state(node: &Node, pair: &str) -> Option<Value> {
    let status = node.cli_json(&["status"]);
    status["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pair_id"] == pair)
        .cloned()
}

/// Waits on a condition that an event makes true (a daemon reaching a state), failing the
/// test with `what` if it does not within `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SHA-256 of a file or device, with sha256sum.
pub fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A network namespace of the test's, with its loopback up; deleted when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("brt-{tag}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace, failing the test if it fails.
    pub fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }
}

/// Two network namespaces joined by a veth pair, `10.<n>.0.1` in the first and `10.<n>.0.2`
/// in the second; deleted (with the veth) when dropped.
pub struct NetNsPair {
    pub a: NetNs,
    pub b: NetNs,
    pub address_a: String,
    pub address_b: String,
}

impl NetNsPair {
    pub fn new(tag: &str) -> Self {
        let a = NetNs::new(&format!("{tag}a"));
        let b = NetNs::new(&format!("{tag}b"));
        let subnet = 16 + std::process::id() % 200;
        let (veth_a, veth_b) = (
            format!("va{}", std::process::id()),
            format!("vb{}", std::process::id()),
        );
        run(Command::new("ip").args([
            "link", "add", &veth_a, "netns", &a.name, "type", "veth", "peer", "name", &veth_b,
            "netns", &b.name,
        ]));
        let address_a = format!("10.{subnet}.0.1");
        let address_b = format!("10.{subnet}.0.2");
        for (ns, veth, address) in [(&a, &veth_a, &address_a), (&b, &veth_b, &address_b)] {
            ns.exec(&["ip", "addr", "add", &format!("{address}/24"), "dev", veth]);
            ns.exec(&["ip", "link", "set", veth, "up"]);
        }
        Self {
            a,
            b,
            address_a,
            address_b,
        }
    }

    /// In both namespaces, drops `percent` % of the packets leaving (so of each direction).
    pub fn drop_percent(&self, percent: u32) {
        for ns in [&self.a, &self.b] {
            ns.exec(&["nft", "add", "table", "inet", "lossy"]);
            ns.exec(&[
                "nft",
                "add",
                "chain",
                "inet",
                "lossy",
                "out",
                "{ type filter hook output priority 0 ; }",
            ]);
            ns.exec(&[
                "nft",
                "add",
                "rule",
                "inet",
                "lossy",
                "out",
                "oifname",
                "!=",
                "lo",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &percent.to_string(),
                "drop",
            ]);
        }
    }

    /// Ends the loss.
    pub fn heal(&self) {
        for ns in [&self.a, &self.b] {
            ns.exec(&["nft", "delete", "table", "inet", "lossy"]);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
