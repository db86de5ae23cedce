//! A consistency group of two pairs on a [`TestCluster`], and the write-order checker's
//! writer: numbered, checksummed records put on the group's production volumes in turn,
//! each issued only once the one before was answered (see [`crate::records`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::NbdClient;
use crate::cluster::{TestCluster, wait_until};
use crate::records::{place, record};

/// A volume of the group: the node that serves it and its name there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub volume: String,
}

impl Member {
    pub fn new(node: &str, volume: &str) -> Self {
        Self {
            node: node.into(),
            volume: volume.into(),
        }
    }
}

/// The pair state a node reports for one of its volumes.
pub fn pair_state(cluster: &TestCluster, member: &Member) -> Value {
    cluster.node(&member.node).cli_json(&["status"])["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["volume_name"] == member.volume.as_str())
        .cloned()
        .unwrap_or(Value::Null)
}

pub fn number(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Pairs `g1` (volumes `p1`, `d1`) and `g2` (`p2`, `d2`), their initial copies done, in the
/// group `app` of `model` with priority station `az1`.
pub fn create_group_of_two(cluster: &TestCluster, model: &str) {
    create_group(cluster, "app", &[("g1", "p1,d1"), ("g2", "p2,d2")], model);
}

/// The pairs of `pairs` (name, "production,dr" volumes), their initial copies done, in the
/// group `group` of `model` with priority station `az1`.
pub fn create_group(cluster: &TestCluster, group: &str, pairs: &[(&str, &str)], model: &str) {
    let jobs: Vec<String> = pairs
        .iter()
        .map(|(name, volumes)| cluster.create_pair(name, volumes, "az1", model).1)
        .collect();
    for job in &jobs {
        cluster.wait_job(job, Duration::from_secs(120));
    }
    let names: Vec<&str> = pairs.iter().map(|(name, _)| *name).collect();
    cluster.coordinator().cli_json(&[
        "group",
        "create",
        "--name",
        group,
        "--pairs",
        &names.join(","),
        "--priority-station",
        "az1",
        "--model",
        model,
    ]);
}

/// Runs a group action (`failover`, `reverse`, `reprotect`, `sync`, `stop`) and waits for
/// its job to succeed; returns the job as the coordinator shows it at the end.
pub fn group_action(cluster: &TestCluster, group: &str, action: &str, timeout: Duration) -> Value {
    let started = cluster.coordinator().cli_json(&["group", action, group]);
    let job = started["job_id"].as_str().expect("a job").to_owned();
    cluster.wait_job(&job, timeout);
    cluster.coordinator().cli_json(&["job", "show", &job])
}

/// Waits until the group replicates and its DR side has a consistent point (every pair
/// joined it; an async group's first commit), so that a failover has somewhere to go.
pub fn wait_consistent(cluster: &TestCluster, group: &str, timeout: Duration) {
    wait_until(timeout, "the group's consistent point", || {
        let g = cluster.coordinator().cli_json(&["group", "show", group]);
        g["replication_status"] == "active" && number(&g, "consistent_epoch") > 0
    });
}

/// Writes records from `next` on, in turn on `volumes`, until stopped or a write fails;
/// `next` ends at the first record not answered.
pub struct RecordWriter {
    pub next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RecordWriter {
    pub fn start(sockets: Vec<(PathBuf, String)>, next: Arc<AtomicU64>, max: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (next, stop) = (Arc::clone(&next), Arc::clone(&stop));
            std::thread::spawn(move || write_records(&sockets, &next, &stop, max))
        };
        Self {
            next,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until at least `count` more records than `from` were answered.
    pub fn wait_for(&self, from: u64, count: u64, timeout: Duration) {
        wait_until(timeout, "records to be written", || {
            self.next.load(Ordering::SeqCst) >= from + count || self.finished()
        });
    }

    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the writer and returns the number of records answered.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.next.load(Ordering::SeqCst)
    }
}

fn write_records(sockets: &[(PathBuf, String)], next: &AtomicU64, stop: &AtomicBool, max: u64) {
    let mut clients = Vec::new();
    for (socket, export) in sockets {
        match NbdClient::connect(socket, export) {
            Ok(c) => clients.push(c),
            Err(_) => return,
        }
    }
    while !stop.load(Ordering::SeqCst) {
        let n = next.load(Ordering::SeqCst);
        if n >= max {
            break;
        }
        let (volume, offset) = place(n, clients.len());
        match clients[volume].write(offset, &record(n)) {
            Ok(0) => next.store(n + 1, Ordering::SeqCst),
            _ => return,
        }
    }
    for c in clients {
        let _ = c.disconnect();
    }
}

/// The NBD sockets and export names of `members`, for the writer.
pub fn sockets(cluster: &TestCluster, members: &[Member]) -> Vec<(PathBuf, String)> {
    members
        .iter()
        .map(|m| {
            (
                cluster.node(&m.node).daemon().nbd_socket(&m.volume),
                m.volume.clone(),
            )
        })
        .collect()
}

/// A client of `member`'s export.
fn client_of(cluster: &TestCluster, member: &Member) -> NbdClient {
    let socket = cluster
        .node(&member.node)
        .daemon()
        .nbd_socket(&member.volume);
    NbdClient::connect(&socket, &member.volume).expect("connect")
}

/// Reads the member's first block and writes it back unchanged: the write's error code (0
/// when it was taken). The data stays as it was.
pub fn rewrite_first_block(cluster: &TestCluster, member: &Member) -> u32 {
    let mut client = client_of(cluster, member);
    let block = client.read(0, 4096).expect("read the first block");
    let error = client.write(0, &block).expect("an answer");
    let _ = client.disconnect();
    error
}

/// A write through `member`'s export: its NBD error (0 when it was taken).
pub fn write_error(cluster: &TestCluster, member: &Member) -> u32 {
    let mut client = client_of(cluster, member);
    let error = client.write(0, &[0u8; 4096]).expect("an answer");
    let _ = client.disconnect();
    error
}
