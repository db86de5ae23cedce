//! Odd commands a client may send to a replicated volume: zero-length WRITE, TRIM and
//! WRITE_ZEROES, an unaligned TRIM (only its whole blocks are discarded), an unaligned
//! WRITE_ZEROES. Sent with libnbd (`nbdsh`) to a hypermetro and an async pair; each is
//! answered, replicates harmlessly, and the pair stays `active`, converges, and `pair
//! verify` and checksums find both sides identical.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, local_pair_state, sha256};
use blockrep_tests::daemon::require_tool;
use blockrep_tests::preallocated;

const MIB: u64 = 1 << 20;

/// Runs a Python snippet against an NBD export with libnbd's shell; `h` is the handle.
/// (Debian's Python, which python3-libnbd installs into, whatever `python3` is first on
/// the path: `nbdsh` is `python3 -m nbd`.)
fn nbdsh(uri: &str, script: &str) {
    let out = Command::new("/usr/bin/python3")
        .args(["-m", "nbd", "-u", uri, "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdsh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The commands: data first, then the odd ones over it. libnbd refuses zero-length requests
/// itself unless its strict mode allows them.
const ODD_COMMANDS: &str = r#"
import nbd
h.pwrite(bytes(range(256)) * 4096, 0)
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ZERO_SIZE)
h.pwrite(b"", 4096)
h.trim(0, 4096)
h.zero(0, 8192)
h.trim(12800, 8192)
h.zero(70000, 1000)
h.trim(100, 300000)
h.zero(5, 1 << 20)
h.pwrite(b"\x5a" * 3, 2 << 20)
h.flush()
"#;

fn production_log_tail(cluster: &TestCluster, from: usize) -> String {
    cluster.node("node-a").daemon().log_text()[from..].to_owned()
}

fn check_pair(cluster: &mut TestCluster, dir: &Path, model: &str) {
    let prod = dir.join(format!("prod-{model}.img"));
    let dr = dir.join(format!("dr-{model}.img"));
    for (node, name, path) in [
        ("node-a", format!("prod-{model}"), &prod),
        ("node-b", format!("dr-{model}"), &dr),
    ] {
        preallocated(path, 16 * MIB);
        cluster.add_volume(node, &name, path);
    }
    let volumes = format!("prod-{model},dr-{model}");
    let (pair, job) = cluster.create_pair(model, &volumes, "az1", model);
    cluster.wait_job(&job, Duration::from_secs(120));

    let log_from = cluster.node("node-a").daemon().log_text().len();
    let uri = cluster
        .node("node-a")
        .daemon()
        .nbd_uri(&format!("prod-{model}"));
    nbdsh(&uri, ODD_COMMANDS);

    // Every block those commands marked dirty is sent and acknowledged.
    let mut last = serde_json::Value::Null;
    let converged = (0..600).any(|_| {
        last = local_pair_state(cluster.node("node-a"), &pair).unwrap();
        let done = last["replication_status"] == "active" && last["out_of_sync_bytes"] == 0;
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(
        converged,
        "{model}: the pair did not converge: {last}\n{}",
        cluster.log_tails(20)
    );
    let log = production_log_tail(cluster, log_from);
    assert!(
        !log.contains("replication stream ended"),
        "{model}: the stream broke:\n{log}"
    );
    let started = cluster.coordinator().cli_json(&["pair", "verify", &pair]);
    let job = started["job_id"].as_str().unwrap();
    cluster.wait_job(job, Duration::from_secs(60));
    let result = cluster.coordinator().cli_json(&["job", "show", job]);
    assert!(
        result["result"].as_str().unwrap().contains("0 B differing"),
        "{model}: {result}"
    );

    cluster.node_mut("node-a").stop();
    cluster.node_mut("node-b").stop();
    assert_eq!(sha256(&prod), sha256(&dr), "{model}: the copies differ");
    cluster.node_mut("node-a").start();
    cluster.node_mut("node-b").start();
    cluster.wait_nodes_alive();
}

#[test]
fn zero_length_and_unaligned_discards_and_zeroes_replicate_exactly() {
    require_tool("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(dir.path(), &[("node-a", "az1"), ("node-b", "az2")], "");
    check_pair(&mut cluster, dir.path(), "hypermetro");
    check_pair(&mut cluster, dir.path(), "async");
}
