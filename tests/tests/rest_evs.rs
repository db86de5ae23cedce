//! The EVS v2 REST API with `curl` on a real two-zone cluster: every call of the seed's
//! replication pairs and consistency groups, answered with the documents' status codes and
//! fields; every refusal (400, 401, 403, 404, 409) with nothing changed; and another
//! project that never sees the first one's records.

use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, wait_until};
use blockrep_tests::rest::{curl, keys, token};
use blockrep_tests::sparse_file;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;
const PAIRS: &str = "/v2/tenant-a/os-vendor-replications";
const GROUPS: &str = "/v2/tenant-a/os-vendor-replication-consistency-groups";

/// The fields of each answer, as the seed documents list them.
const PAIR_CREATED: [&str; 9] = [
    "created_at",
    "description",
    "id",
    "name",
    "priority_station",
    "replication_consistency_group_id",
    "status",
    "updated_at",
    "volume_ids",
];
const PAIR_SHOWN: [&str; 15] = [
    "created_at",
    "description",
    "failure_detail",
    "fault_level",
    "id",
    "name",
    "priority_station",
    "progress",
    "record_metadata",
    "replication_consistency_group_id",
    "replication_model",
    "replication_status",
    "status",
    "updated_at",
    "volume_ids",
];
const GROUP_CREATED: [&str; 7] = [
    "created_at",
    "description",
    "id",
    "name",
    "priority_station",
    "status",
    "updated_at",
];
const GROUP_SHOWN: [&str; 12] = [
    "created_at",
    "description",
    "failure_detail",
    "fault_level",
    "id",
    "name",
    "priority_station",
    "replication_ids",
    "replication_model",
    "replication_status",
    "status",
    "updated_at",
];

struct Api<'a> {
    cluster: &'a TestCluster,
    token: String,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        curl(
            self.cluster.node("node-b"),
            method,
            path,
            Some(&self.token),
            body.as_ref(),
        )
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let (got, answer) = self.call(method, path, body);
        assert_eq!(
            got,
            status,
            "{method} {path}: {answer}\n{}",
            self.cluster.log_tails(30)
        );
        answer
    }

    /// Refused with `status`, a message naming `words`, and the seed's error shape.
    fn refused(&self, method: &str, path: &str, body: Option<Value>, status: u16, words: &str) {
        let (got, answer) = self.call(method, path, body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{message:?} names {words:?}");
        assert_eq!(answer["error"]["code"], format!("EVS.{status}"));
    }

    fn pair(&self, id: &str) -> Value {
        self.ok("GET", &format!("{PAIRS}/{id}"), None, 200)["replication"].clone()
    }

    fn group(&self, id: &str) -> Value {
        self.ok("GET", &format!("{GROUPS}/{id}"), None, 200)["replication_consistency_group"]
            .clone()
    }

    /// Everything the project's lists show now.
    fn everything(&self) -> (Value, Value) {
        (
            self.ok("GET", PAIRS, None, 200),
            self.ok("GET", GROUPS, None, 200),
        )
    }

    fn action(&self, group: &str, action: &str) {
        let answer = self.ok(
            "POST",
            &format!("{GROUPS}/{group}/action"),
            Some(json!({ action: null })),
            200,
        );
        assert_eq!(answer, Value::Null, "{action} answers without a body");
    }

    fn wait_group(&self, group: &str, what: &str, done: impl Fn(&Value) -> bool) {
        wait_until(Duration::from_secs(120), what, || done(&self.group(group)));
    }
}

#[test]
fn every_evs_call_answers_as_the_seed_documents_say_for_its_project_only() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    for (node, name, project) in [
        ("node-a", "db", "tenant-a"),
        ("node-a", "logs", "tenant-a"),
        ("node-b", "db-dr", "tenant-a"),
        ("node-b", "logs-dr", "tenant-a"),
        ("node-a", "other", "tenant-b"),
        ("node-b", "other-dr", "tenant-b"),
    ] {
        let path = dir.path().join(format!("{name}.img"));
        sparse_file(&path, GIB);
        cluster.add_volume_of(node, name, &path, project);
    }
    let volume_id = |node: &str, name: &str| -> String {
        let v = cluster.node(node).cli_json(&["volume", "show", name]);
        assert_eq!(
            v["project_id"],
            if name.starts_with("other") {
                "tenant-b"
            } else {
                "tenant-a"
            }
        );
        v["id"].as_str().unwrap().to_owned()
    };
    let ids: Vec<String> = [
        ("node-a", "db"),
        ("node-b", "db-dr"),
        ("node-a", "logs"),
        ("node-b", "logs-dr"),
    ]
    .iter()
    .map(|(n, v)| volume_id(n, v))
    .collect();
    wait_until(
        Duration::from_secs(30),
        "the coordinator sees the volumes",
        || {
            cluster
                .coordinator()
                .cli_json(&["node", "list"])
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["volumes"] == 3)
        },
    );
    let a = Api {
        cluster: &cluster,
        token: token(&cluster, "tenant-a", "a"),
    };
    let b = Api {
        cluster: &cluster,
        token: token(&cluster, "tenant-b", "b"),
    };

    // Pairs: created (202, the nine fields of the seed's answer), listed, shown.
    let mut pairs = Vec::new();
    for (name, volumes) in [("db", &ids[0..2]), ("logs", &ids[2..4])] {
        let created = a.ok(
            "POST",
            PAIRS,
            Some(json!({"replication": {
                "name": name, "description": "my replication",
                "volume_ids": volumes, "priority_station": "az1",
                "replication_model": "hypermetro"}})),
            202,
        )["replication"]
            .clone();
        assert_eq!(keys(&created), PAIR_CREATED);
        assert_eq!(created["status"], "creating");
        assert_eq!(
            created["volume_ids"],
            format!("{}, {}", volumes[0], volumes[1])
        );
        assert_eq!(created["replication_consistency_group_id"], Value::Null);
        pairs.push(created["id"].as_str().unwrap().to_owned());
    }
    for pair in &pairs {
        wait_until(Duration::from_secs(120), "the pair is active", || {
            let p = a.pair(pair);
            p["status"] == "available" && p["replication_status"] == "active"
        });
        let shown = a.pair(pair);
        assert_eq!(keys(&shown), PAIR_SHOWN);
        assert_eq!(shown["progress"], "100");
        assert_eq!(shown["fault_level"], "0");
        assert_eq!(shown["replication_model"], "hypermetro");
        let metadata: Value =
            serde_json::from_str(shown["record_metadata"].as_str().unwrap()).unwrap();
        assert_eq!(metadata["volume_size"], 1);
    }
    for path in [PAIRS.to_owned(), format!("{PAIRS}/detail")] {
        let listed = a.ok("GET", &path, None, 200)["replications"].clone();
        assert_eq!(listed.as_array().unwrap().len(), 2);
        assert_eq!(keys(&listed[0]), PAIR_SHOWN);
    }
    let one = a.ok("GET", &format!("{PAIRS}?name=logs"), None, 200)["replications"].clone();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["id"], pairs[1].as_str());
    let first =
        a.ok("GET", &format!("{PAIRS}?limit=1"), None, 200)["replications"][0]["id"].clone();
    let second = a.ok(
        "GET",
        &format!("{PAIRS}?limit=1&marker={}", first.as_str().unwrap()),
        None,
        200,
    )["replications"]
        .clone();
    assert_eq!(second.as_array().unwrap().len(), 1);
    assert_ne!(second[0]["id"], first);

    // Another project sees none of it: 404 by id, empty lists, and its own token is
    // refused on this project's paths (403); no token or a bad one is 401.
    let before = a.everything();
    b.refused(
        "GET",
        &format!("/v2/tenant-b/os-vendor-replications/{}", pairs[0]),
        None,
        404,
        "no pair",
    );
    b.refused(
        "DELETE",
        &format!("/v2/tenant-b/os-vendor-replications/{}", pairs[0]),
        None,
        404,
        "no pair",
    );
    assert_eq!(
        b.ok("GET", "/v2/tenant-b/os-vendor-replications", None, 200),
        json!({"replications": []})
    );
    b.refused("GET", PAIRS, None, 403, "not for project");
    b.refused(
        "POST",
        "/v2/tenant-b/os-vendor-replications",
        Some(json!({"replication": {"volume_ids": [ids[0], ids[1]], "priority_station": "az1", "replication_model": "hypermetro"}})),
        404,
        "no volume",
    );
    let (status, answer) = curl(cluster.node("node-a"), "GET", PAIRS, None, None);
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (401, json!("EVS.401"))
    );
    let (status, _) = curl(
        cluster.node("node-a"),
        "GET",
        PAIRS,
        Some("brt_forged"),
        None,
    );
    assert_eq!(status, 401);
    assert_eq!(a.everything(), before, "nothing changed");

    // The seed's refusals: a group with no pair (400), a pair's volume in use (409), an
    // unknown pair (404), a missing field (400).
    let create_group = |pairs: &[&str]| {
        json!({"replication_consistency_group": {
            "name": "cg", "description": "my replication consistency group",
            "replication_ids": pairs, "priority_station": "az1",
            "replication_model": "hypermetro"}})
    };
    a.refused(
        "POST",
        GROUPS,
        Some(create_group(&[])),
        400,
        "at least one pair",
    );
    a.refused(
        "POST",
        GROUPS,
        Some(create_group(&["00000000-0000-4000-8000-000000000000"])),
        404,
        "no pair",
    );
    a.refused(
        "POST",
        PAIRS,
        Some(json!({"replication": {"volume_ids": [ids[0], ids[1]], "priority_station": "az1", "replication_model": "hypermetro"}})),
        409,
        "already in pair",
    );
    a.refused(
        "POST",
        PAIRS,
        Some(json!({"replication": {"volume_ids": [ids[0], ids[1]], "priority_station": "az1"}})),
        400,
        "replication_model is required",
    );
    assert_eq!(a.everything(), before, "nothing changed");

    // A group: created (202), shown and listed with the twelve fields.
    let group = a.ok(
        "POST",
        GROUPS,
        Some(create_group(&[&pairs[0], &pairs[1]])),
        202,
    )["replication_consistency_group"]
        .clone();
    assert_eq!(keys(&group), GROUP_CREATED);
    let g = group["id"].as_str().unwrap().to_owned();
    let shown = a.group(&g);
    assert_eq!(keys(&shown), GROUP_SHOWN);
    assert_eq!(shown["replication_ids"].as_array().unwrap().len(), 2);
    assert_eq!(
        a.pair(&pairs[0])["replication_consistency_group_id"],
        g.as_str()
    );
    for path in [GROUPS.to_owned(), format!("{GROUPS}/detail")] {
        let listed = a.ok("GET", &path, None, 200)["replication_consistency_groups"].clone();
        assert_eq!(listed.as_array().unwrap().len(), 1);
        assert_eq!(keys(&listed[0]), GROUP_SHOWN);
    }
    let holding = a.ok("GET", &format!("{GROUPS}?volume_id={}", ids[2]), None, 200);
    assert_eq!(
        holding["replication_consistency_groups"][0]["id"],
        g.as_str()
    );
    assert_eq!(
        b.ok(
            "GET",
            "/v2/tenant-b/os-vendor-replication-consistency-groups",
            None,
            200
        ),
        json!({"replication_consistency_groups": []})
    );

    // Refusals of a group in use: delete a grouped pair (409), delete a group with pairs
    // (409), reprotect when not failed over (409), an unknown action (400).
    let before = a.everything();
    a.refused(
        "DELETE",
        &format!("{PAIRS}/{}", pairs[0]),
        None,
        409,
        "is in consistency group",
    );
    a.refused("DELETE", &format!("{GROUPS}/{g}"), None, 409, "");
    a.refused(
        "POST",
        &format!("{GROUPS}/{g}/action"),
        Some(json!({"os-reprotect-replication-consistency-group": null})),
        409,
        "failovered",
    );
    a.refused(
        "POST",
        &format!("{GROUPS}/{g}/action"),
        Some(json!({"os-dance": null})),
        400,
        "unknown action",
    );
    a.refused(
        "PUT",
        &format!("{GROUPS}/{g}"),
        Some(json!({"replication_consistency_group": {"replication_model": "async"}})),
        400,
        "cannot change",
    );
    assert_eq!(a.everything(), before, "nothing changed");

    // Stop, update (name, a pair out and back in), sync.
    a.action(&g, "os-stop-replication-consistency-group");
    a.wait_group(&g, "the group stops", |g| {
        g["replication_status"] == "active-stopped"
    });
    let updated = a.ok("PUT", &format!("{GROUPS}/{g}"), Some(json!({"replication_consistency_group": {"name": "renamed", "remove_replication_ids": [pairs[1]]}})), 202)["replication_consistency_group"].clone();
    assert_eq!(keys(&updated), GROUP_CREATED);
    assert_eq!(updated["name"], "renamed");
    assert_eq!(a.group(&g)["replication_ids"], json!([pairs[0]]));
    a.ok("PUT", &format!("{GROUPS}/{g}"), Some(json!({"replication_consistency_group": {"replication_model": "hypermetro", "add_replication_ids": [pairs[1]]}})), 202);
    assert_eq!(a.group(&g)["replication_ids"].as_array().unwrap().len(), 2);
    a.action(&g, "os-sync-replication-consistency-group");
    a.wait_group(&g, "the group replicates", |g| {
        g["replication_status"] == "active"
    });

    // Extend both pairs to 2 GB: answered once both volumes grew.
    a.ok(
        "POST",
        &format!("{GROUPS}/{g}/action"),
        Some(json!({"os-extend-replication-volumes": {"replications": [
            {"id": pairs[0], "new_size": 2}, {"id": pairs[1], "new_size": 2}]}})),
        200,
    );
    for pair in &pairs {
        let metadata: Value =
            serde_json::from_str(a.pair(pair)["record_metadata"].as_str().unwrap()).unwrap();
        assert_eq!(metadata["volume_size"], 2);
    }
    for file in ["db", "db-dr", "logs", "logs-dr"] {
        let size = std::fs::metadata(dir.path().join(format!("{file}.img")))
            .unwrap()
            .len();
        assert_eq!(size, 2 * GIB, "{file}");
    }

    // Reverse (planned switchover), failover, reprotect.
    a.action(&g, "os-reverse-replication-consistency-group");
    a.wait_group(&g, "the group reversed", |g| {
        g["status"] == "available"
            && g["priority_station"] == "az2"
            && g["replication_status"] == "active"
    });
    a.action(&g, "os-failover-replication-consistency-group");
    a.wait_group(&g, "the group failed over", |g| g["status"] == "failovered");
    a.action(&g, "os-reprotect-replication-consistency-group");
    a.wait_group(&g, "the group is protected again", |g| {
        g["status"] == "available" && g["replication_status"] == "active"
    });

    // Delete: stop, remove the pairs, delete the group (202), then the pairs (202).
    a.action(&g, "os-stop-replication-consistency-group");
    a.wait_group(&g, "the group stops", |g| {
        g["replication_status"] == "active-stopped"
    });
    a.ok(
        "PUT",
        &format!("{GROUPS}/{g}"),
        Some(json!({"replication_consistency_group": {"remove_replication_ids": pairs}})),
        202,
    );
    assert_eq!(
        a.ok("DELETE", &format!("{GROUPS}/{g}"), None, 202),
        Value::Null
    );
    a.refused(
        "GET",
        &format!("{GROUPS}/{g}"),
        None,
        404,
        "no consistency group",
    );
    for pair in &pairs {
        assert_eq!(
            a.ok("DELETE", &format!("{PAIRS}/{pair}"), None, 202),
            Value::Null
        );
    }
    wait_until(Duration::from_secs(60), "the pairs are gone", || {
        a.ok("GET", PAIRS, None, 200) == json!({"replications": []})
    });
}

/// With `api.tls_cert` and `api.tls_key` the API is served over HTTPS only: a client that
/// trusts the certificate's CA gets the same answers, and plain HTTP gets none.
#[test]
fn the_api_is_served_over_tls_when_a_certificate_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    let secret = token(&cluster, "tenant-a", "a");
    let node = cluster.node_mut("node-b");
    node.stop();
    let tls = node.dir.join("tls");
    let config = std::fs::read_to_string(&node.config).unwrap().replace(
        "[api]\n",
        &format!(
            "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            tls.join("node.pem").display(),
            tls.join("node.key").display()
        ),
    );
    std::fs::write(&node.config, config).unwrap();
    node.start();
    cluster.wait_nodes_alive();
    let node = cluster.node("node-b");
    let https = |token: Option<&str>| -> (u16, Value) {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "--cacert",
            node.dir.join("tls/ca.pem").to_str().unwrap(),
            "--resolve",
            &format!("node-b:{}:127.0.0.1", node.api_port),
            &format!("https://node-b:{}{PAIRS}", node.api_port),
        ]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("X-Auth-Token: {token}")]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = text.rsplit_once('\n').unwrap();
        (status.parse().unwrap(), serde_json::from_str(body).unwrap())
    };
    assert_eq!(https(Some(&secret)), (200, json!({"replications": []})));
    let (status, answer) = https(None);
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (401, json!("EVS.401"))
    );
    // Plain HTTP to the same port is not answered.
    let plain = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{}{PAIRS}", node.api_port),
        ])
        .output()
        .unwrap();
    assert!(
        !plain.status.success() || plain.stdout.is_empty(),
        "{plain:?}"
    );
}
