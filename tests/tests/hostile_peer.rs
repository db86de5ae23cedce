//! A node with a valid certificate of the cluster's CA is authenticated, not authorised.
//!
//! A cluster of a coordinator and two agents in two zones replicates two pairs, one of each
//! model. A third node, `evil`, holds a certificate of the same CA (not a coordinator's). It
//! sends each agent every command agents serve, aimed at that agent's own volumes, with a
//! term of u64::MAX where one is taken; a forged `Hello` for each pair, with and without
//! `discard_peer`, to the DR agent; and heartbeats naming the agents. Each is refused and
//! counted, and nothing changes: all four volumes are byte-identical to before, each side of
//! each pair keeps its status, term, fence and generation, and the coordinator's record of
//! each agent keeps its address and volumes.
//!
//! A certificate the CA issued to a coordinator is still held to the volume's bounds: a
//! `MarkDirty` of u64::MAX bytes, and an `Extend` to a size that is unaligned, smaller, or
//! more than the backing can hold, are refused and change nothing. A daemon whose
//! `node_name` is not its certificate's does not start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockrep_api::proto::{
    self, ClusterRequest, ClusterResponse, cluster_request::Request, cluster_response::Response,
};
use blockrep_core::replication::{GenerationId, Lineage, ReplicationModel};
use blockrep_replication::endpoint::ClusterEndpoint;
use blockrep_tests::cluster::{TestCluster, cli, local_pair_state, sha256, wait_until};
use blockrep_tests::{Daemon, sparse_file};
use blockrep_tls::{COORDINATOR_NAME, NodeTls, TlsFiles};
use blockrep_wire::{Frame, Hello, HelloFlags, ProtocolVersion};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const PRODUCTION: &str = "node-a";
const DR: &str = "node-b";

/// A pair of the test: its id, and its volumes' ids and files.
struct Pair {
    id: String,
    model: ReplicationModel,
    production_volume: String,
    dr_volume: String,
    files: [PathBuf; 2],
}

impl Pair {
    fn create(cluster: &TestCluster, dir: &Path, name: &str, model: ReplicationModel) -> Self {
        let files = [
            dir.join(format!("{name}-production.img")),
            dir.join(format!("{name}-dr.img")),
        ];
        for file in &files {
            sparse_file(file, SIZE);
        }
        let volume_id = |node: &str, volume: &str, file: &Path| {
            cluster.add_volume(node, volume, file)["id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let production_volume = volume_id(PRODUCTION, &format!("{name}-prod"), &files[0]);
        let dr_volume = volume_id(DR, &format!("{name}-dr"), &files[1]);
        let (id, job) = cluster.create_pair(
            name,
            &format!("{name}-prod,{name}-dr"),
            "az1",
            &model.to_string(),
        );
        cluster.wait_job(&job, Duration::from_secs(120));
        Self {
            id,
            model,
            production_volume,
            dr_volume,
            files,
        }
    }

    /// This node's volume of the pair.
    fn volume_on(&self, node: &str) -> &str {
        if node == PRODUCTION {
            &self.production_volume
        } else {
            &self.dr_volume
        }
    }

    fn wait_active(&self, cluster: &TestCluster) {
        let active = || {
            local_pair_state(cluster.node(PRODUCTION), &self.id)
                .is_some_and(|s| s["replication_status"] == "active" && s["out_of_sync_bytes"] == 0)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !active() {
            assert!(
                std::time::Instant::now() < deadline,
                "pair {} ({}) is not active and in sync: {:#?}\n{}",
                self.id,
                self.model,
                local_pair_state(cluster.node(PRODUCTION), &self.id),
                cluster.log_tails(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a hostile peer must not change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    checksums: Vec<String>,
    /// Each side of each pair as its agent sees it.
    sides: Vec<Value>,
    /// The coordinator's record of each agent: address and volume count.
    records: Vec<(Value, Value)>,
}

impl Snapshot {
    fn take(cluster: &TestCluster, pairs: &[Pair]) -> Self {
        let checksums = pairs
            .iter()
            .flat_map(|p| p.files.iter().map(|f| sha256(f)))
            .collect();
        let mut sides = Vec::new();
        for pair in pairs {
            for node in [PRODUCTION, DR] {
                // A side the agent no longer knows is all nulls.
                let s = local_pair_state(cluster.node(node), &pair.id).unwrap_or_default();
                let fields = [
                    "pair_id",
                    "volume_id",
                    "side",
                    "peer_node",
                    "replication_status",
                    "term",
                    "fence",
                    "generation",
                    "grouped",
                    "group_commit",
                    "needs_resolve",
                    "out_of_sync_bytes",
                ];
                sides.push(Value::Object(
                    fields
                        .iter()
                        .map(|f| (f.to_string(), s[*f].clone()))
                        .collect(),
                ));
            }
        }
        Self {
            checksums,
            sides,
            records: agent_records(cluster),
        }
    }
}

impl Snapshot {
    /// What differs in `now`, one line each.
    fn differences(&self, now: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        if now.checksums != self.checksums {
            out.push(format!(
                "volumes changed: checksums {:?}, before {:?}",
                now.checksums, self.checksums
            ));
        }
        for (then, now) in self.sides.iter().zip(&now.sides) {
            let changed: Vec<String> = then
                .as_object()
                .unwrap()
                .iter()
                .filter(|(field, value)| now[field.as_str()] != **value)
                .map(|(field, value)| format!("{field} {} (was {value})", now[field.as_str()]))
                .collect();
            if !changed.is_empty() {
                out.push(format!(
                    "the {} side of pair {} changed: {}",
                    then["side"],
                    then["pair_id"],
                    changed.join(", ")
                ));
            }
        }
        if now.records != self.records {
            out.push(format!(
                "the coordinator's records of the agents changed: {:?}, before {:?}",
                now.records, self.records
            ));
        }
        out
    }
}

/// The coordinator's record of each agent: address and volume count.
fn agent_records(cluster: &TestCluster) -> Vec<(Value, Value)> {
    let nodes = cluster.coordinator().cli_json(&["node", "list"]);
    [PRODUCTION, DR]
        .iter()
        .map(|name| {
            let n = node_entry(&nodes, name);
            (n["address"].clone(), n["volumes"].clone())
        })
        .collect()
}

fn node_entry<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {nodes}"))
}

/// A certificate of the cluster's CA for `node` (a coordinator's with `coordinator`).
fn certificate(dir: &Path, node: &str, coordinator: bool) -> NodeTls {
    let out = dir.join(node).join("tls");
    let ca = dir.join("ca");
    let mut args = vec![
        "cluster",
        "issue-cert",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--node",
        node,
        "--out-dir",
        out.to_str().unwrap(),
    ];
    if coordinator {
        args.push("--coordinator");
    }
    cli(&args);
    NodeTls::load(&TlsFiles::in_dir(&out)).unwrap()
}

/// Every command an agent serves, about `pair` and the agent's own `volume` in it, as a
/// node that is not the coordinator would forge them: each would change the pair if obeyed.
fn agent_commands(pair: &Pair, volume: &str) -> Vec<Request> {
    let assignment = |side: &str| proto::PairAssignment {
        pair_id: pair.id.clone(),
        replication_model: pair.model.to_string(),
        local_volume_id: volume.into(),
        peer_volume_id: volume.into(),
        peer_node: "evil".into(),
        peer_address: "127.0.0.1:9".into(),
        size_bytes: SIZE,
        side: side.into(),
        discard_peer: true,
        generation: 7,
        term: u64::MAX,
        grouped: true,
        max_bytes_per_sec: 1,
    };
    let command = proto::PairCommand {
        pair_id: pair.id.clone(),
        job_id: "evil-job".into(),
        repair: true,
    };
    let cut = proto::GroupCut {
        pair_ids: vec![pair.id.clone()],
        epoch: u64::MAX - 1,
        mode: 1,
        synchronous: true,
        tripped: true,
        digests: true,
        cut_ms: u64::MAX,
    };
    let commit = proto::GroupCommit {
        pair_ids: vec![pair.id.clone()],
        epoch: u64::MAX - 1,
        grouped: true,
        retention: Some(proto::Retention {
            max_age_secs: u64::MAX,
            max_bytes: u64::MAX,
            keep_hourly: u32::MAX,
        }),
    };
    vec![
        Request::Fence(proto::FenceCommand {
            pair_id: pair.id.clone(),
            fence: "demoted".into(),
            term: u64::MAX,
        }),
        Request::Promote(proto::Promote {
            pair_id: pair.id.clone(),
            volume_id: volume.into(),
            commit: 0,
            has_commit: true,
            generation: 7,
            term: u64::MAX,
            point: 1,
            has_point: true,
        }),
        Request::HoldPoint(proto::HoldPoint {
            pair_ids: vec![pair.id.clone()],
            epoch: 0,
        }),
        Request::ListPoints(proto::PairIds {
            pair_ids: vec![pair.id.clone()],
        }),
        Request::CreateDrill(proto::DrillCommand {
            drill_id: "evil".into(),
            pair_id: pair.id.clone(),
            export: "../../etc/evil".into(),
            point: 0,
        }),
        Request::DeleteDrill(proto::DrillCommand {
            drill_id: "evil".into(),
            pair_id: pair.id.clone(),
            export: volume.into(),
            point: 0,
        }),
        Request::CheckDrill(proto::DrillCheckCommand {
            drill: Some(proto::DrillCommand {
                drill_id: "evil".into(),
                pair_id: pair.id.clone(),
                export: volume.into(),
                point: 0,
            }),
            start: true,
        }),
        Request::SwitchSide(assignment("production")),
        Request::SwitchSide(assignment("dr")),
        Request::LeavePair(assignment("")),
        Request::BecomeDr(assignment("dr")),
        Request::BecomeProduction(assignment("production")),
        Request::KeepProduction(command.clone()),
        Request::Verify(command.clone()),
        Request::PausePair(command.clone()),
        Request::ResumePair(command.clone()),
        Request::GroupCut(cut.clone()),
        Request::GroupRelease(cut),
        Request::GroupCommit(commit.clone()),
        Request::ProductionGrouping(commit),
        Request::DirtyRuns(command),
        Request::MarkDirty(mark_dirty_everything(&pair.id)),
        Request::Extend(proto::Extend {
            pair_id: pair.id.clone(),
            volume_id: volume.into(),
            size_bytes: 2 * SIZE,
        }),
    ]
}

fn mark_dirty_everything(pair: &str) -> proto::MarkDirty {
    proto::MarkDirty {
        pair_id: pair.into(),
        runs: vec![proto::Extent {
            offset: 0,
            length: u64::MAX,
        }],
    }
}

fn error_code(response: &ClusterResponse) -> Option<u32> {
    match &response.response {
        Some(Response::Error(e)) => Some(e.code),
        _ => None,
    }
}

/// A peer of the cluster that speaks the protocol directly, with a certificate of its own.
struct RawPeer<'a> {
    cluster: &'a TestCluster,
    runtime: &'a tokio::runtime::Runtime,
    endpoint: Arc<ClusterEndpoint>,
}

impl<'a> RawPeer<'a> {
    fn new(cluster: &'a TestCluster, runtime: &'a tokio::runtime::Runtime, tls: &NodeTls) -> Self {
        let endpoint = runtime
            .block_on(async { ClusterEndpoint::client_only(tls, Default::default()) })
            .unwrap();
        Self {
            cluster,
            runtime,
            endpoint,
        }
    }

    fn address(&self, node: &str) -> SocketAddr {
        format!("127.0.0.1:{}", self.cluster.node(node).port)
            .parse()
            .unwrap()
    }

    /// Calls `node` (dialled by its node name, or the coordinator's).
    fn call(&self, node: &str, request: Request) -> ClusterResponse {
        self.call_in_term(node, request, 0)
    }

    /// Calls `node` with a command of coordinator term `term`.
    fn call_in_term(&self, node: &str, request: Request, term: u64) -> ClusterResponse {
        let name = if node == self.cluster.coordinator().name {
            COORDINATOR_NAME
        } else {
            node
        };
        let request = ClusterRequest {
            request: Some(request),
            scope: None,
            leader_term: term,
        };
        self.runtime
            .block_on(self.endpoint.call(self.address(node), name, &request))
            .unwrap_or_else(|e| {
                panic!(
                    "{node} did not answer {request:?}: {e}\n{}",
                    self.cluster.log_tails(40)
                )
            })
    }

    /// Opens a replication stream to `node` with `hello`, and returns its first answer.
    fn hello(&self, node: &str, hello: Hello) -> Result<Option<Frame>, String> {
        self.runtime.block_on(async {
            let mut stream = self
                .endpoint
                .open_replication(self.address(node), node, hello)
                .await
                .map_err(|e| e.to_string())?;
            stream.reader.next().await.map_err(|e| e.to_string())
        })
    }
}

impl Drop for RawPeer<'_> {
    fn drop(&mut self) {
        self.endpoint.close();
    }
}

/// `blockrep_requests_refused_total` by reason, from a node's metrics.
fn refusals(node: &blockrep_tests::cluster::Node) -> BTreeMap<String, u64> {
    node.metrics()
        .lines()
        .filter_map(|l| l.strip_prefix("blockrep_requests_refused_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once("\"}")?;
            Some((reason.to_owned(), rest.trim().parse().ok()?))
        })
        .filter(|(_, count)| *count > 0)
        .collect()
}

fn counts(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
    entries.iter().map(|(r, n)| (r.to_string(), *n)).collect()
}

#[test]
fn a_node_of_the_cluster_cannot_command_another_nor_pose_as_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        dir.path(),
        &[("node-co", "az3"), (PRODUCTION, "az1"), (DR, "az2")],
        "",
    );
    let pairs = [
        Pair::create(&cluster, dir.path(), "async-pair", ReplicationModel::Async),
        Pair::create(
            &cluster,
            dir.path(),
            "metro-pair",
            ReplicationModel::Hypermetro,
        ),
    ];
    for pair in &pairs {
        pair.wait_active(&cluster);
    }
    let before = Snapshot::take(&cluster, &pairs);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let evil = RawPeer::new(&cluster, &runtime, &certificate(dir.path(), "evil", false));

    // Every agent command, to each agent about its own volumes: refused as not the
    // coordinator's.
    let mut not_refused = Vec::new();
    let mut sent = 0;
    for node in [PRODUCTION, DR] {
        for pair in &pairs {
            for request in agent_commands(pair, pair.volume_on(node)) {
                let what = format!("{node} {}: {request:?}", pair.model);
                let response = evil.call(node, request);
                sent += 1;
                if error_code(&response) != Some(403) {
                    not_refused.push(format!("not refused: {what}\n  -> {response:?}"));
                }
            }
        }
    }

    // A forged Hello for each pair, with and without discard_peer, to its DR agent.
    let mut hellos_accepted = Vec::new();
    for pair in &pairs {
        for discard_peer in [false, true] {
            let hello = Hello {
                version: ProtocolVersion::CURRENT,
                pair: pair.id.parse().unwrap(),
                volume: pair.dr_volume.parse().unwrap(),
                size: SIZE,
                model: pair.model,
                node: PRODUCTION.into(),
                lineage: Lineage::new(GenerationId(42)),
                flags: HelloFlags {
                    dirty: true,
                    full_sync_done: false,
                    discard_peer,
                },
            };
            match evil.hello(DR, hello) {
                Ok(Some(Frame::Refuse { reason, .. })) if reason.contains("not evil") => {}
                other => hellos_accepted.push(format!(
                    "a forged Hello not refused: {} discard_peer={discard_peer}: {other:?}",
                    pair.model
                )),
            }
        }
    }

    // Heartbeats naming each agent, to the coordinator, moving it to evil's address with
    // no volumes. The record is read at once, before the agent's next heartbeat.
    let mut reports_taken = Vec::new();
    for (node, az) in [(PRODUCTION, "az1"), (DR, "az2")] {
        let report = proto::NodeReport {
            node: node.into(),
            availability_zone: az.into(),
            ..Default::default()
        };
        let response = evil.call("node-co", Request::Report(report));
        if error_code(&response) != Some(403) {
            reports_taken.push(format!("a heartbeat as {node} not refused: {response:?}"));
        }
    }
    let records_right_after = agent_records(&cluster);

    // Nothing changed: the volumes, the pairs' sides, the agents' records, also after the
    // agents' next heartbeats; and everything was refused.
    let mut obeyed = Vec::new();
    if records_right_after != before.records {
        obeyed.push(format!(
            "the coordinator took a forged heartbeat: (address, volumes) of the agents {:?}, before {:?}",
            records_right_after, before.records
        ));
    }
    wait_for_heartbeats(&cluster);
    obeyed.extend(before.differences(&Snapshot::take(&cluster, &pairs)));
    obeyed.extend(not_refused);
    obeyed.extend(hellos_accepted);
    obeyed.extend(reports_taken);
    assert!(
        obeyed.is_empty(),
        "a hostile peer was obeyed:\n{}",
        obeyed.join("\n")
    );

    // Counted where refused: each refusal once.
    let per_agent = sent / 2;
    assert_eq!(
        refusals(cluster.node(PRODUCTION)),
        counts(&[("not_coordinator", per_agent)])
    );
    assert_eq!(
        refusals(cluster.node(DR)),
        counts(&[("not_coordinator", per_agent), ("wrong_peer", 4)])
    );
    assert_eq!(
        refusals(cluster.coordinator()),
        counts(&[("wrong_node", 2)])
    );
    wait_until(
        Duration::from_secs(10),
        "node list to show each agent's refusals",
        || {
            let nodes = cluster.coordinator().cli_json(&["node", "list"]);
            node_entry(&nodes, PRODUCTION)["requests_refused"] == per_agent
                && node_entry(&nodes, DR)["requests_refused"] == per_agent + 4
        },
    );
    drop(evil);

    ranges_are_checked_even_from_a_coordinator_certificate(&cluster, &runtime, &pairs, &before);
    an_impostor_daemon_does_not_start(&cluster, dir.path());
    // Last: it leaves the agent following a term the cluster's coordinator does not have.
    a_deposed_coordinators_commands_are_refused(&cluster, &runtime, &pairs, &before);
}

/// An HA coordinator's leader sends its term to every agent when it takes over; a
/// coordinator of an older term (deposed, and unaware of it) is then refused, counted as
/// `stale_term`, and changes nothing. The term is kept in the agent's state directory (its
/// reload is `leader_term`'s unit test).
fn a_deposed_coordinators_commands_are_refused(
    cluster: &TestCluster,
    runtime: &tokio::runtime::Runtime,
    pairs: &[Pair],
    before: &Snapshot,
) {
    let leaders = RawPeer::new(
        cluster,
        runtime,
        &certificate(&cluster.dir, "co-elsewhere", true),
    );
    let taken = leaders.call_in_term(PRODUCTION, Request::AdoptTerm(proto::AdoptTerm {}), 50);
    assert!(
        matches!(taken.response, Some(Response::Done(_))),
        "{taken:?}"
    );
    let pair = &pairs[0];
    let stale = [
        Request::PausePair(proto::PairCommand {
            pair_id: pair.id.clone(),
            ..Default::default()
        }),
        Request::MarkDirty(proto::MarkDirty {
            pair_id: pair.id.clone(),
            runs: vec![proto::Extent {
                offset: 0,
                length: MIB,
            }],
        }),
        Request::AdoptTerm(proto::AdoptTerm {}),
    ];
    let sent = stale.len() as u64;
    for request in stale {
        let what = format!("{request:?}");
        let response = leaders.call_in_term(PRODUCTION, request, 49);
        assert_eq!(error_code(&response), Some(409), "{what}: {response:?}");
        let Some(Response::Error(e)) = &response.response else {
            unreachable!()
        };
        assert!(
            e.message
                .contains("of coordinator term 49 refused: this node follows term 50"),
            "{e:?}"
        );
    }
    assert_eq!(refusals(cluster.node(PRODUCTION))["stale_term"], sent);
    for pair in pairs {
        pair.wait_active(cluster);
    }
    assert_eq!(
        before.differences(&Snapshot::take(cluster, pairs)),
        Vec::<String>::new()
    );
    let kept =
        std::fs::read_to_string(cluster.node(PRODUCTION).dir.join("state/leader-term")).unwrap();
    assert_eq!(kept.trim(), "50");
}

/// Waits until the coordinator has heard from both agents since now. (`last_seen` reads
/// "0.4 s ago", to a tenth: its text changes as time passes, so a heartbeat is one heard
/// less long ago than the wait has lasted.)
fn wait_for_heartbeats(cluster: &TestCluster) {
    let since = std::time::Instant::now();
    let seconds_ago = |nodes: &Value, name: &str| -> Option<f64> {
        node_entry(nodes, name)["last_seen"]
            .as_str()?
            .strip_suffix(" s ago")?
            .parse()
            .ok()
    };
    wait_until(
        Duration::from_secs(10),
        "the agents' next heartbeats",
        || {
            let waited = since.elapsed().as_secs_f64();
            let nodes = cluster.coordinator().cli_json(&["node", "list"]);
            [PRODUCTION, DR]
                .iter()
                .all(|name| seconds_ago(&nodes, name).is_some_and(|ago| ago + 0.05 < waited))
        },
    );
}

/// A certificate the CA issued with the coordinator's role, but the ranges and sizes it
/// sends do not fit the volume: refused (and counted), and the volume, its size and its
/// pair are as they were.
fn ranges_are_checked_even_from_a_coordinator_certificate(
    cluster: &TestCluster,
    runtime: &tokio::runtime::Runtime,
    pairs: &[Pair],
    before: &Snapshot,
) {
    let rogue = RawPeer::new(
        cluster,
        runtime,
        &certificate(&cluster.dir, "rogue-co", true),
    );
    let pair = &pairs[0];
    let extend = |size_bytes| {
        Request::Extend(proto::Extend {
            pair_id: pair.id.clone(),
            volume_id: pair.production_volume.clone(),
            size_bytes,
        })
    };
    let refused = [
        (Request::MarkDirty(mark_dirty_everything(&pair.id)), 400),
        (extend(SIZE + 512), 400),
        (extend(SIZE / 2), 400),
        // Aligned, but no file system here holds an exabyte: refused before anything grows
        // for it (the dirty map for it would take 32 TiB of memory).
        (extend(1 << 60), 409),
    ];
    for (request, code) in refused {
        let what = format!("{request:?}");
        let response = rogue.call(PRODUCTION, request);
        assert_eq!(error_code(&response), Some(code), "{what}: {response:?}");
    }
    let volumes = cluster.node(PRODUCTION).cli_json(&["volume", "list"]);
    assert!(
        volumes
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["size_bytes"] == SIZE),
        "a volume changed size: {volumes}"
    );
    assert_eq!(
        refusals(cluster.node(PRODUCTION))["bad_range"],
        3,
        "the 400s are counted"
    );
    for pair in pairs {
        pair.wait_active(cluster);
    }
    assert_eq!(
        before.differences(&Snapshot::take(cluster, pairs)),
        Vec::<String>::new()
    );
}

/// A daemon configured as the DR agent's node but holding evil's certificate does not start
/// (and if it did, its heartbeats would be refused as above).
fn an_impostor_daemon_does_not_start(cluster: &TestCluster, dir: &Path) {
    let impostor = dir.join("impostor");
    std::fs::create_dir_all(&impostor).unwrap();
    let config = impostor.join("blockrepd.toml");
    let tls = dir.join("evil").join("tls");
    std::fs::write(
        &config,
        format!(
            "node_name = \"{DR}\"\navailability_zone = \"az2\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n[cluster]\nlisten = \"127.0.0.1:0\"\ncoordinator = \"127.0.0.1:{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            impostor.join("state").display(),
            impostor.join("run").display(),
            cluster.coordinator().port,
            tls.join("ca.pem").display(),
            tls.join("node.pem").display(),
            tls.join("node.key").display(),
        ),
    )
    .unwrap();
    let refused = Daemon::start_with_config(&impostor, &config)
        .err()
        .expect("the impostor started");
    assert!(
        refused.to_string().contains("is node \"evil\""),
        "{refused:#}"
    );
}
