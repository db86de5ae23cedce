//! `group extend`: both volumes of a pair grow online, the DR volume first. A DR volume on
//! a loop device too small for the new size refuses (nothing changes anywhere); grown with
//! `losetup -c`, the extend goes through, new clients see the new size, and writes past the
//! old end replicate.

use std::process::Command;
use std::time::Duration;

use blockrep_tests::cluster::{TestCluster, sha256, wait_until};
use blockrep_tests::group::{create_group, wait_consistent};
use blockrep_tests::{NbdClient, preallocated, require_tool, run};

const MIB: u64 = 1 << 20;

/// A loop device over `file`, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn refused(cluster: &TestCluster, args: &[&str]) -> String {
    let out = cluster.coordinator().daemon().cli(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

fn size_of(cluster: &TestCluster, node: &str, volume: &str) -> u64 {
    cluster.node(node).cli_json(&["volume", "show", volume])["size_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_pair_grows_online_and_a_volume_without_room_refuses_with_nothing_changed() {
    require_tool("losetup");
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(
        dir.path(),
        &[("node-co", "az3"), ("node-a", "az1"), ("node-b", "az2")],
        "[replication]\nepoch_interval_ms = 200\n",
    );
    let production = dir.path().join("p.img");
    let dr_file = dir.path().join("d.img");
    preallocated(&production, 64 * MIB);
    preallocated(&dr_file, 64 * MIB);
    let dr_dev = Loop(run(Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(&dr_file)));
    cluster.add_volume("node-a", "p", &production);
    cluster.add_volume("node-b", "d", std::path::Path::new(&dr_dev.0));
    create_group(&cluster, "app", &[("grow", "p,d")], "async");
    wait_consistent(&cluster, "app", Duration::from_secs(60));

    // Bad requests: refused before anything is done.
    for (args, expected) in [
        (
            vec![
                "group", "extend", "app", "--pair", "grow", "--size", "32MiB",
            ],
            "invalid argument (400): pair grow is 67108864 bytes; extend takes a larger size",
        ),
        (
            vec![
                "group",
                "extend",
                "app",
                "--pair",
                "grow",
                "--size",
                "100000000",
            ],
            "invalid argument (400): 100000000 bytes is not a multiple of 4096",
        ),
        (
            vec![
                "group", "extend", "app", "--pair", "nope", "--size", "128MiB",
            ],
            "not found (404): no pair \"nope\"",
        ),
    ] {
        let err = refused(&cluster, &args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }

    // The DR device has no room: the job fails, and neither volume grew.
    let started = cluster.coordinator().cli_json(&[
        "group", "extend", "app", "--pair", "grow", "--size", "128MiB",
    ]);
    let job = started["job_id"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(30), "the extend to fail", || {
        cluster.coordinator().cli_json(&["job", "show", &job])["status"] == "FAIL"
    });
    let failed = cluster.coordinator().cli_json(&["job", "show", &job]);
    assert!(
        failed["fail_reason"]
            .as_str()
            .unwrap()
            .contains("grow it to 134217728 first"),
        "{failed}"
    );
    assert_eq!(size_of(&cluster, "node-a", "p"), 64 * MIB);
    assert_eq!(size_of(&cluster, "node-b", "d"), 64 * MIB);
    let group = cluster.coordinator().cli_json(&["group", "show", "app"]);
    assert_eq!(group["status"], "available");

    // The operator grows the device; the extend goes through.
    run(Command::new("truncate").args(["-s", "128M"]).arg(&dr_file));
    run(Command::new("losetup").arg("-c").arg(&dr_dev.0));
    let started = cluster.coordinator().cli_json(&[
        "group", "extend", "app", "--pair", "grow", "--size", "128MiB",
    ]);
    cluster.wait_job(started["job_id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(size_of(&cluster, "node-a", "p"), 128 * MIB);
    assert_eq!(size_of(&cluster, "node-b", "d"), 128 * MIB);
    assert_eq!(std::fs::metadata(&production).unwrap().len(), 128 * MIB);

    // A new client sees the new size, and a write past the old end replicates.
    let socket = cluster.node("node-a").daemon().nbd_socket("p");
    let mut c = NbdClient::connect(&socket, "p").unwrap();
    assert_eq!(c.size, 128 * MIB);
    assert_eq!(c.write(100 * MIB, &[0x77; 4096]).unwrap(), 0);
    c.disconnect().unwrap();
    let current = cluster.node("node-a").cli_json(&["status"])["pairs"][0]["current_epoch"]
        .as_u64()
        .unwrap();
    wait_until(
        Duration::from_secs(60),
        "the DR side to apply the write",
        || {
            cluster.node("node-b").cli_json(&["status"])["pairs"][0]["consistent_epoch"]
                .as_u64()
                .unwrap_or(0)
                > current
        },
    );
    // The coordinator's metrics count the group's cut rounds and say when the cut behind
    // its consistent point was made.
    let metrics = cluster.coordinator().metrics();
    let value = |prefix: &str, with: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains(with))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let completed = value(
        "blockrep_group_cut_rounds_total{group=\"app\"",
        "outcome=\"completed\"",
    );
    assert!(completed.is_some_and(|n| n > 0.0), "{metrics}");
    let cut_at = value(
        "blockrep_group_consistent_cut_time_seconds{group=\"app\"",
        "",
    )
    .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(cut_at > now - 600.0 && cut_at <= now + 1.0, "{metrics}");
    // The sizes survive a restart of both agents.
    for node in ["node-a", "node-b"] {
        cluster.node_mut(node).stop();
        cluster.node_mut(node).start();
    }
    assert_eq!(size_of(&cluster, "node-a", "p"), 128 * MIB);
    assert_eq!(size_of(&cluster, "node-b", "d"), 128 * MIB);
    for node in ["node-a", "node-b", "node-co"] {
        cluster.node_mut(node).stop();
    }
    assert_eq!(sha256(&production), sha256(std::path::Path::new(&dr_dev.0)));
}
