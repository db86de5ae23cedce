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

/// The Python of the venv that holds the OTC SDK (`otcextensions`): `BLOCKREP_SDK_PYTHON`,
/// or the one `scripts/sdk-venv.sh` makes (the test command runs it first).
pub fn sdk_python() -> std::path::PathBuf {
    let python = std::env::var_os("BLOCKREP_SDK_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sdk-venv/bin/python")
        });
    assert!(
        python.exists(),
        "no Python with the OTC SDK at {}: run scripts/sdk-venv.sh (scripts/test.sh does)",
        python.display()
    );
    python
}

/// One step of `tests/sdk/sdrs.py` against `node`'s API: the JSON object it printed last.
pub fn sdk_step(node: &Node, project: &str, token: &str, step: &str, args: &[&str]) -> Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/sdrs.py");
    let out = Command::new(sdk_python())
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}", node.api_port))
        .args([project, token, step])
        .args(args)
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK step {step} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("step {step} printed {last:?}: {e}"))
}
