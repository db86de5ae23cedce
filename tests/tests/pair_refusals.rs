//! Every refusal of a pair create, with the seed's code and a message naming the rule, and
//! nothing left behind on either agent; pair delete's precondition; peers with a foreign
//! CA's certificate or none refused and counted.

use std::io::Read;
use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, cli, wait_until};
use blockrep_tests::{NbdClient, sparse_file};

const MIB: u64 = 1 << 20;

/// Runs a CLI command on the coordinator that must fail; returns its stderr.
fn refused(cluster: &TestCluster, args: &[&str]) -> String {
    let out = cluster.coordinator().daemon().cli(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

fn create_args<'a>(name: &'a str, volumes: &'a str, az: &'a str, model: &'a str) -> Vec<&'a str> {
    vec![
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
    ]
}

#[test]
fn bad_pair_requests_are_refused_with_their_code_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    for (node, name, size) in [
        ("node-a", "prod", 64 * MIB),
        ("node-a", "prod2", 64 * MIB),
        ("node-a", "small", 32 * MIB),
        ("node-b", "dr", 64 * MIB),
        ("node-b", "dr2", 64 * MIB),
        ("node-b", "busy", 64 * MIB),
    ] {
        let path = dir.path().join(format!("{name}.img"));
        sparse_file(&path, size);
        cluster.add_volume(node, name, &path);
    }
    let long = "x".repeat(256);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            args(&create_args("p", "prod", "az1", "async")),
            "invalid argument (400): a pair needs exactly two volumes",
        ),
        (
            args(&create_args("p", "prod,dr,dr2", "az1", "async")),
            "invalid argument (400): a pair needs exactly two volumes",
        ),
        (
            args(&create_args("p", "prod,nope", "az1", "async")),
            "not found (404): no volume \"nope\"",
        ),
        (
            args(&create_args("p", "prod,prod2", "az1", "async")),
            "invalid argument (400): both volumes are in availability zone az1",
        ),
        (
            args(&create_args("p", "small,dr", "az1", "async")),
            "invalid argument (400): volume sizes differ",
        ),
        (
            args(&create_args("p", "prod,dr", "az2", "async")),
            "invalid argument (400): priority_station \"az2\" is not the production volume's availability zone az1",
        ),
        (
            args(&create_args("p", "prod,dr", "az1", "sync")),
            "invalid argument (400): replication_model: \"sync\" is not a ReplicationModel",
        ),
        (
            args(&create_args(&long, "prod,dr", "az1", "async")),
            "invalid argument (400): name is 256 bytes; the limit is 255",
        ),
        (
            {
                let mut a = args(&create_args("p", "prod,dr", "az1", "async"));
                a.extend(["--description".into(), long.clone()]);
                a
            },
            "invalid argument (400): description is 256 bytes; the limit is 255",
        ),
    ];
    for (case, expected) in &cases {
        let case: Vec<&str> = case.iter().map(String::as_str).collect();
        let err = refused(&cluster, &case);
        assert!(err.contains(expected), "{case:?}: {err}");
    }

    // The DR volume has an NBD client: 409, and the DR agent keeps it writable.
    let busy_socket = cluster.node("node-b").daemon().nbd_socket("busy");
    let client = NbdClient::connect(&busy_socket, "busy").unwrap();
    wait_until(Duration::from_secs(10), "the client to be reported", || {
        cluster.node("node-b").cli_json(&["volume", "show", "busy"])["connected_clients"] == 1
    });
    wait_until(
        Duration::from_secs(10),
        "the coordinator to see the client",
        || {
            let err = refused(&cluster, &create_args("p", "prod2,busy", "az1", "async"));
            err.contains("refused (409): DR volume busy has 1 connected NBD client(s)")
        },
    );
    client.disconnect().unwrap();

    // Nothing was created, on the coordinator or either agent.
    assert_eq!(
        cluster.coordinator().cli_json(&["pair", "list"]),
        serde_json::json!([])
    );
    for node in ["node-a", "node-b"] {
        for v in cluster
            .node(node)
            .cli_json(&["volume", "list"])
            .as_array()
            .unwrap()
        {
            assert_eq!(v["role"], "standalone", "{node}: {v}");
        }
    }

    // A good pair, then the volumes it holds are refused for another.
    let (pair, job) = cluster.create_pair("good", "prod,dr", "az1", "hypermetro");
    cluster.wait_job(&job, Duration::from_secs(120));
    let err = refused(&cluster, &create_args("p2", "prod,dr2", "az1", "async"));
    assert!(
        err.contains("refused (409): volume prod is already in pair"),
        "{err}"
    );
    let err = refused(&cluster, &create_args("p2", "prod2,dr", "az1", "async"));
    assert!(
        err.contains("refused (409): volume dr is already in pair"),
        "{err}"
    );
    // A volume in a pair cannot be removed.
    let out = cluster
        .node("node-b")
        .daemon()
        .cli(&["volume", "remove", "dr"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("refused (409): volume dr is the dr side of pair")
    );
    // Unknown pair and job.
    let err = refused(&cluster, &["pair", "show", "nope"]);
    assert!(err.contains("not found (404): no pair \"nope\""), "{err}");
    let err = refused(&cluster, &["job", "show", "nope"]);
    assert!(err.contains("not found (404)"), "{err}");

    // Delete: the DR volume becomes writable again; the pair is gone.
    let deleted = cluster.coordinator().cli_json(&["pair", "delete", &pair]);
    let delete_job = deleted["job_id"].as_str().unwrap().to_owned();
    cluster.wait_job(&delete_job, Duration::from_secs(60));
    assert_eq!(
        cluster.coordinator().cli_json(&["pair", "list"]),
        serde_json::json!([])
    );
    let dr = cluster.node("node-b").cli_json(&["volume", "show", "dr"]);
    assert_eq!(dr["role"], "standalone");
    let mut c =
        NbdClient::connect(&cluster.node("node-b").daemon().nbd_socket("dr"), "dr").unwrap();
    assert_eq!(
        c.write(0, &[1; 4096]).unwrap(),
        0,
        "the DR volume takes writes again"
    );
    c.disconnect().unwrap();
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn peers_with_a_foreign_certificate_or_none_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(dir.path(), &[("node-a", "az1")], "");
    let address = format!("127.0.0.1:{}", cluster.coordinator().port);
    // Our own certificate works.
    let own = dir.path().join("node-a/tls");
    cli(&[
        "cluster",
        "ping",
        "--address",
        &address,
        "--tls-dir",
        own.to_str().unwrap(),
    ]);

    // A certificate from another CA.
    let foreign_ca = dir.path().join("foreign-ca");
    let foreign = dir.path().join("foreign");
    cli(&["cluster", "init-ca", "--dir", foreign_ca.to_str().unwrap()]);
    cli(&[
        "cluster",
        "issue-cert",
        "--ca-dir",
        foreign_ca.to_str().unwrap(),
        "--node",
        "intruder",
        "--out-dir",
        foreign.to_str().unwrap(),
    ]);
    // The intruder trusts our CA (so only its own certificate is at fault).
    std::fs::copy(own.join("ca.pem"), foreign.join("ca.pem")).unwrap();
    let ping = |tls: &std::path::Path, extra: &[&str]| {
        std::process::Command::new(blockrep_tests::binary("blockrep"))
            .args(["cluster", "ping", "--address", &address, "--tls-dir"])
            .arg(tls)
            .args(extra)
            .output()
            .unwrap()
    };
    let foreign_ping = ping(&foreign, &[]);
    assert!(
        !foreign_ping.status.success(),
        "a foreign certificate is refused"
    );
    // No certificate at all.
    let bare = ping(&own, &["--danger-no-certificate"]);
    assert!(!bare.status.success(), "no certificate is refused");

    wait_until(Duration::from_secs(10), "two refusals counted", || {
        let nodes = cluster.coordinator().cli_json(&["node", "list"]);
        nodes[0]["peers_refused"].as_u64().unwrap() >= 2
    });
    let mut log = String::new();
    std::fs::File::open(&cluster.coordinator().daemon().log)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("refused a peer: TLS handshake failed"),
        "refusals are logged"
    );
}
