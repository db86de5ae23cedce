//! An etcd cluster for tests: members from the Debian package `etcd-server`, on loopback
//! ports, with their data in the test's directory. Members can be killed and started again;
//! every member still running is killed when the cluster is dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::free_tcp_port;
use crate::require_tool;

pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    /// Clients must present a certificate of this CA, and reach the members over TLS.
    tls: Option<ServerTls>,
}

/// The members' certificate and key (for the name `localhost`), and the CA their clients'
/// certificates must be signed by.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP: `/health`, whatever the clients' TLS.
    metrics_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader.
    pub fn start(dir: &Path, size: usize) -> Self {
        Self::start_with(dir, size, None)
    }

    /// As [`EtcdCluster::start`], clients held to mutual TLS (`https://localhost:PORT`).
    pub fn start_tls(dir: &Path, size: usize, tls: ServerTls) -> Self {
        Self::start_with(dir, size, Some(tls))
    }

    fn start_with(dir: &Path, size: usize, tls: Option<ServerTls>) -> Self {
        require_tool("etcd");
        std::fs::create_dir_all(dir).expect("etcd's directory");
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("etcd{i}"),
                client_port: free_tcp_port(),
                peer_port: free_tcp_port(),
                metrics_port: free_tcp_port(),
                data_dir: dir.join(format!("etcd{i}")),
                log: dir.join(format!("etcd{i}.log")),
                process: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            tls,
        };
        for i in 0..size {
            cluster.start_member(i);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| self.client_url(m)).collect()
    }

    fn client_url(&self, m: &Member) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", m.client_port),
            None => format!("http://127.0.0.1:{}", m.client_port),
        }
    }

    /// The endpoints as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        format!("[{}]", quoted.join(", "))
    }

    pub fn kill(&mut self, member: usize) {
        if let Some(mut process) = self.members[member].process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts a member again (after [`EtcdCluster::kill`]), with the data it had.
    pub fn start_member(&mut self, member: usize) {
        let client = self.client_url(&self.members[member]);
        let tls: Vec<String> = match &self.tls {
            Some(t) => vec![
                "--cert-file".into(),
                t.cert.display().to_string(),
                "--key-file".into(),
                t.key.display().to_string(),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                t.ca.display().to_string(),
            ],
            None => Vec::new(),
        };
        let m = &mut self.members[member];
        assert!(m.process.is_none(), "{} is running", m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let process = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-metrics-urls", &metrics])
            .args(&tls)
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "blockrep-test"])
            // A leader lost is noticed in a second (the defaults: 100 ms and 1 s).
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        m.process = Some(process);
    }

    /// Waits until every running member says it is healthy (it has a leader).
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for m in self.members.iter().filter(|m| m.process.is_some()) {
            while !healthy(m.metrics_port) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} is not healthy after {timeout:?}; its log:\n{}",
                    m.name,
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Waits until a running member says it leads, and returns which. After a kill, a
    /// member's health still says it has a leader until it notices the leader gone; this
    /// waits for the election that follows.
    pub fn wait_for_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut running = self
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.process.is_some());
            if let Some((i, _)) = running.find(|(_, m)| leads(m.metrics_port)) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no running etcd member leads after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Whether the member at `port` answers its health check with a leader.
fn healthy(port: u16) -> bool {
    get(port, "/health").is_some_and(|answer| answer.contains("\"health\":\"true\""))
}

/// Whether the member at `port` says it is the cluster's leader.
fn leads(port: u16) -> bool {
    get(port, "/metrics")
        .is_some_and(|answer| answer.lines().any(|line| line == "etcd_server_is_leader 1"))
}

/// The answer of the member's plain HTTP endpoint `path`, or `None` if it does not answer.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    Some(answer)
}
