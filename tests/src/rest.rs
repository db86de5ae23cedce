//! The REST API driven as its users drive it: `curl` against a node's `[api]` address.

use std::process::Command;

use serde_json::Value;

use crate::cluster::{Node, TestCluster};

/// A `curl` call: its HTTP status and JSON body (`Null` when the body is empty).
pub fn curl(
    node: &Node,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let url = format!("http://127.0.0.1:{}{path}", node.api_port);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}", &url]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("X-Auth-Token: {token}")]);
    }
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
        ]);
    }
    let out = cmd.output().expect("run curl");
    assert!(out.status.success(), "curl {method} {path}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').expect("curl printed the status");
    let status: u16 = status.trim().parse().expect("an HTTP status");
    let body = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"))
    };
    (status, body)
}

/// A new API token for `project`, made with the CLI on the coordinator.
pub fn token(cluster: &TestCluster, project: &str, name: &str) -> String {
    let created = cluster.coordinator().cli_json(&[
        "api",
        "token",
        "create",
        "--project",
        project,
        "--name",
        name,
    ]);
    created["token"].as_str().expect("a secret").to_owned()
}

/// The keys of a JSON object, sorted.
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}
