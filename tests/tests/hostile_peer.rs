//! A node with a valid certificate of the cluster's CA is authenticated, not authorised: a
//! third node `evil` sends every agent command (with a term of u64::MAX where one is
//! taken), a forged `Hello` for a pair, with and without `discard_peer`, and a heartbeat
//! naming another node. Each is refused and counted, and nothing changes: both volumes are
//! byte-identical to before, the pair stays active, the coordinator's record of the other
//! node keeps its address and volumes. A certificate the CA issued to a coordinator is
//! still held to the volume's bounds (a `MarkDirty` of u64::MAX bytes), and a daemon whose
//! `node_name` is not its certificate's does not start.

use std::net::SocketAddr;
use std::time::Duration;

use blockrep_api::proto::{
    self, ClusterRequest, ClusterResponse, cluster_request::Request, cluster_response::Response,
};
use blockrep_core::replication::{Lineage, ReplicationModel};
use blockrep_replication::endpoint::ClusterEndpoint;
use blockrep_tests::cluster::{TestCluster, cli, local_pair_state, sha256, wait_until};
use blockrep_tests::{Daemon, sparse_file};
use blockrep_tls::{COORDINATOR_NAME, NodeTls, TlsFiles};
use blockrep_wire::{Frame, Hello, HelloFlags, ProtocolVersion};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A certificate of the cluster's CA for `node` (a coordinator's with `coordinator`).
fn certificate(dir: &std::path::Path, node: &str, coordinator: bool) -> NodeTls {
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

/// Every command an agent serves, as a node that is not the coordinator would forge it.
fn agent_commands(pair: &str, volume: &str) -> Vec<Request> {
    let assignment = proto::PairAssignment {
        pair_id: pair.into(),
        replication_model: "async".into(),
        local_volume_id: volume.into(),
        peer_volume_id: volume.into(),
        peer_node: "evil".into(),
        peer_address: "127.0.0.1:9".into(),
        size_bytes: 64 * MIB,
        side: "production".into(),
        discard_peer: true,
        term: u64::MAX,
        ..Default::default()
    };
    let command = proto::PairCommand {
        pair_id: pair.into(),
        job_id: "x".into(),
        repair: true,
    };
    let cut = proto::GroupCut {
        pair_ids: vec![pair.into()],
        epoch: u64::MAX - 1,
        mode: 1,
        synchronous: true,
        tripped: true,
    };
    let commit = proto::GroupCommit {
        pair_ids: vec![pair.into()],
        epoch: u64::MAX - 1,
        grouped: true,
    };
    vec![
        Request::BecomeDr(assignment.clone()),
        Request::BecomeProduction(assignment.clone()),
        Request::LeavePair(assignment.clone()),
        Request::SwitchSide(assignment),
        Request::KeepProduction(command.clone()),
        Request::Verify(command.clone()),
        Request::PausePair(command.clone()),
        Request::ResumePair(command.clone()),
        Request::GroupCut(cut.clone()),
        Request::GroupRelease(cut),
        Request::GroupCommit(commit.clone()),
        Request::ProductionGrouping(commit),
        Request::Promote(proto::Promote {
            pair_id: pair.into(),
            volume_id: volume.into(),
            commit: 0,
            has_commit: true,
            generation: 7,
            term: u64::MAX,
        }),
        Request::Fence(proto::FenceCommand {
            pair_id: pair.into(),
            fence: "demoted".into(),
            term: u64::MAX,
        }),
        Request::DirtyRuns(command),
        Request::MarkDirty(mark_dirty_everything(pair)),
        Request::Extend(proto::Extend {
            pair_id: pair.into(),
            volume_id: volume.into(),
            size_bytes: 128 * MIB,
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

fn metric(node: &blockrep_tests::cluster::Node, line_start: &str) -> u64 {
    node.metrics()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_node_of_the_cluster_cannot_command_another_nor_pose_as_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(
        dir.path(),
        &[("node-co", "az3"), ("node-a", "az1"), ("node-b", "az2")],
        "",
    );
    let prod = dir.path().join("prod.img");
    let dr = dir.path().join("dr.img");
    sparse_file(&prod, 64 * MIB);
    sparse_file(&dr, 64 * MIB);
    cluster.add_volume("node-a", "prod", &prod);
    let dr_volume = cluster.add_volume("node-b", "dr", &dr)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (pair, job) = cluster.create_pair("p", "prod,dr", "az1", "async");
    cluster.wait_job(&job, Duration::from_secs(120));
    let converged = || {
        wait_until(
            Duration::from_secs(60),
            "the pair to be active and in sync",
            || {
                let s = local_pair_state(cluster.node("node-a"), &pair).unwrap();
                s["replication_status"] == "active" && s["out_of_sync_bytes"] == 0
            },
        )
    };
    converged();
    let before = (sha256(&prod), sha256(&dr));
    let nodes_before = cluster.coordinator().cli_json(&["node", "list"]);
    let record_of = |nodes: &Value, name: &str| -> (Value, Value) {
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap();
        (n["address"].clone(), n["volumes"].clone())
    };

    let evil = certificate(dir.path(), "evil", false);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let endpoint = runtime
        .block_on(async { ClusterEndpoint::client_only(&evil, Default::default()) })
        .unwrap();
    let address = |node: &str| -> SocketAddr {
        format!("127.0.0.1:{}", cluster.node(node).port)
            .parse()
            .unwrap()
    };
    let call = |node: &str, name: &str, request: Request| {
        runtime
            .block_on(endpoint.call(
                address(node),
                name,
                &ClusterRequest {
                    request: Some(request),
                },
            ))
            .unwrap()
    };

    // Every agent command, to both agents: refused as not the coordinator's.
    let commands = agent_commands(&pair, &dr_volume);
    let sent = commands.len() as u64;
    for node in ["node-a", "node-b"] {
        for request in agent_commands(&pair, &dr_volume) {
            let what = format!("{request:?}");
            let response = call(node, node, request);
            assert_eq!(
                error_code(&response),
                Some(403),
                "{node}: {what}: {response:?}"
            );
        }
    }

    // A forged Hello for the pair, with and without discard_peer: refused by the DR agent.
    for discard_peer in [false, true] {
        let hello = Hello {
            version: ProtocolVersion::CURRENT,
            pair: pair.parse().unwrap(),
            volume: dr_volume.parse().unwrap(),
            size: 64 * MIB,
            model: ReplicationModel::Async,
            node: "node-a".into(),
            lineage: Lineage::new(blockrep_core::replication::GenerationId(42)),
            flags: HelloFlags {
                dirty: true,
                full_sync_done: false,
                discard_peer,
            },
        };
        let answer = runtime.block_on(async {
            let mut stream = endpoint
                .open_replication(address("node-b"), "node-b", hello)
                .await
                .unwrap();
            stream.reader.next().await
        });
        match answer {
            Ok(Some(Frame::Refuse { reason, .. })) => {
                assert!(reason.contains("not evil"), "{reason}")
            }
            other => panic!("a forged Hello was not refused: {other:?}"),
        }
    }

    // A heartbeat naming node-b, to the coordinator: refused; node-b's record unchanged.
    let report = proto::NodeReport {
        node: "node-b".into(),
        availability_zone: "az2".into(),
        ..Default::default()
    };
    let response = call("node-co", COORDINATOR_NAME, Request::Report(report));
    assert_eq!(error_code(&response), Some(403), "{response:?}");

    // Counted where refused, and nothing changed.
    for node in ["node-a", "node-b"] {
        assert!(
            metric(
                cluster.node(node),
                "blockrep_requests_refused_total{reason=\"not_coordinator\"}"
            ) >= sent,
            "{node}: {}",
            cluster.node(node).metrics()
        );
    }
    assert!(
        metric(
            cluster.node("node-b"),
            "blockrep_requests_refused_total{reason=\"wrong_peer\"}"
        ) >= 2
    );
    assert!(
        metric(
            cluster.node("node-co"),
            "blockrep_requests_refused_total{reason=\"wrong_node\"}"
        ) >= 1
    );
    // Once node-b's own heartbeat reports the refusals (so it came after them), the
    // coordinator still knows node-b as it was.
    let refused_by_b = |nodes: &Value| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "node-b")
            .and_then(|n| n["requests_refused"].as_u64())
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(10), "node-b's next heartbeat", || {
        refused_by_b(&cluster.coordinator().cli_json(&["node", "list"])) >= sent
    });
    let nodes_after = cluster.coordinator().cli_json(&["node", "list"]);
    assert_eq!(
        record_of(&nodes_after, "node-b"),
        record_of(&nodes_before, "node-b")
    );
    converged();
    assert_eq!((sha256(&prod), sha256(&dr)), before, "a volume changed");

    // Even a coordinator's certificate cannot mark past the end of a volume.
    let rogue = certificate(dir.path(), "rogue-co", true);
    let rogue_endpoint = runtime
        .block_on(async { ClusterEndpoint::client_only(&rogue, Default::default()) })
        .unwrap();
    let response = runtime
        .block_on(rogue_endpoint.call(
            address("node-a"),
            "node-a",
            &ClusterRequest {
                request: Some(Request::MarkDirty(mark_dirty_everything(&pair))),
            },
        ))
        .unwrap();
    assert_eq!(error_code(&response), Some(400), "{response:?}");
    assert!(
        metric(
            cluster.node("node-a"),
            "blockrep_requests_refused_total{reason=\"bad_range\"}"
        ) >= 1
    );
    converged();
    endpoint.close();
    rogue_endpoint.close();

    // A daemon configured as node-b but holding evil's certificate does not start.
    let impostor = dir.path().join("impostor");
    std::fs::create_dir_all(&impostor).unwrap();
    let config = impostor.join("blockrepd.toml");
    let tls = dir.path().join("evil").join("tls");
    std::fs::write(
        &config,
        format!(
            "node_name = \"node-b\"\navailability_zone = \"az2\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n[cluster]\nlisten = \"127.0.0.1:0\"\ncoordinator = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            impostor.join("state").display(),
            impostor.join("run").display(),
            address("node-co"),
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
