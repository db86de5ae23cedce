//! Bad configuration and bad CLI input get clear errors and change nothing; a CLI whose
//! reader went away ends quietly.

use std::process::{Command, Stdio};

use blockrep_tests::{Daemon, NbdClient, binary, sparse_file};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "node_name = \"a\"\navailability_zone = \"az1\"\n[bitmap]\ngranularity = 3000\n",
            "bitmap.granularity",
        ),
        (
            "node_name = \"a\"\navailability_zone = \"az1\"\nstate_dir = \"rel\"\n",
            "state_dir",
        ),
        (
            "node_name = \"a\"\navailability_zone = \"az1\"\nbogus = 1\n",
            "unknown field `bogus`",
        ),
        ("node_name = \"a\"\n", "missing field `availability_zone`"),
        ("node_name = \n", "TOML parse error at line 1, column 13"),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        for extra in [&["--check-config"][..], &[][..]] {
            let out = Command::new(binary("blockrepd"))
                .arg("--config")
                .arg(&path)
                .args(extra)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{text:?}");
            assert!(
                stderr_of(&out).contains(expected),
                "{text:?}: {}",
                stderr_of(&out)
            );
        }
    }
    let missing = Command::new(binary("blockrepd"))
        .args(["--config", "/nonexistent/b.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr_of(&missing).contains("cannot read /nonexistent/b.toml"));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "node_name = \"a\"\navailability_zone = \"az1\"\n").unwrap();
    let out = Command::new(binary("blockrepd"))
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn bad_cli_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    sparse_file(&image, 8 << 20);
    let odd = dir.path().join("odd.img");
    sparse_file(&odd, 4097);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("vol1", &image);

    let refused = |args: &[&str], expected: &str| {
        let out = daemon.cli(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr_of(&out).contains(expected),
            "{args:?}: {}",
            stderr_of(&out)
        );
    };
    let image_arg = image.to_str().unwrap();
    refused(
        &["volume", "add", "--name", "vol1", "--path", image_arg],
        "already exists (409): a volume named vol1",
    );
    refused(
        &["volume", "add", "--name", "vol2", "--path", image_arg],
        "is already volume vol1",
    );
    refused(
        &["volume", "add", "--name", "bad name", "--path", image_arg],
        "invalid argument (400): volume name",
    );
    refused(
        &[
            "volume",
            "add",
            "--name",
            "vol3",
            "--path",
            "/nonexistent/disk",
        ],
        "cannot open /nonexistent/disk",
    );
    refused(
        &[
            "volume",
            "add",
            "--name",
            "vol3",
            "--path",
            odd.to_str().unwrap(),
        ],
        "not a multiple of 4096",
    );
    refused(
        &["volume", "add", "--name", "vol3", "--path", "/dev/null"],
        "neither a block device nor a regular file",
    );
    refused(
        &[
            "volume", "add", "--name", "vol3", "--cache", "none", "--path", image_arg,
        ],
        "cache mode \"none\" is not one of: direct, writeback",
    );
    refused(
        &["volume", "show", "nope"],
        "not found (404): no volume \"nope\"",
    );
    refused(&["volume", "remove", "nope"], "not found");
    refused(&["volume", "frobnicate"], "unrecognized subcommand");

    // Removal is refused while a client is connected, and allowed after.
    let client = NbdClient::connect(&daemon.nbd_socket("vol1"), "vol1").unwrap();
    refused(
        &["volume", "remove", "vol1"],
        "refused (409): volume vol1 has 1 connected NBD client(s)",
    );
    client.disconnect().unwrap();
    let list = daemon.cli_json(&["volume", "list"]);
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "nothing was added by the refused calls"
    );
    let removed = daemon.cli(&["volume", "remove", "vol1"]);
    assert!(removed.status.success(), "{}", stderr_of(&removed));
    assert!(
        daemon
            .cli_json(&["volume", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        !daemon.nbd_socket("vol1").exists(),
        "export socket removed with the volume"
    );

    let down = Command::new(binary("blockrep"))
        .args(["--socket", "/nonexistent.sock", "status"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    // One line: the socket, the cause once, and what to do.
    let err = stderr_of(&down);
    assert_eq!(
        err.trim_end(),
        "blockrep: cannot reach blockrepd at /nonexistent.sock: No such file or directory \
         (os error 2); is blockrepd running? start it with `systemctl start blockrepd`, or \
         give --socket (or BLOCKREP_SOCKET)"
    );
    daemon.stop().unwrap();
}

#[test]
fn a_volume_whose_backing_vanished_stays_listed_in_error_and_can_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    sparse_file(&image, 8 << 20);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("vol1", &image);
    daemon.stop().unwrap();

    std::fs::rename(&image, dir.path().join("moved.img")).unwrap();
    let daemon = Daemon::start_with_config(dir.path(), &dir.path().join("blockrepd.toml")).unwrap();
    let shown = daemon.cli_json(&["volume", "show", "vol1"]);
    assert_eq!(shown["state"], "error");
    let error = shown["error"].as_str().unwrap();
    assert!(
        error.contains("cannot open") && error.contains("vol.img"),
        "{error}"
    );
    let status = daemon.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("vol1 error"),
        "{status:?}"
    );
    let dirty = daemon.cli(&["volume", "dirty", "vol1"]);
    assert!(
        stderr_of(&dirty).contains("refused (409): volume vol1 is offline"),
        "{}",
        stderr_of(&dirty)
    );

    daemon.cli_json(&["volume", "remove", "vol1"]);
    assert!(
        daemon
            .cli_json(&["volume", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    daemon.stop().unwrap();
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(dir.path(), "").unwrap();
    let out = Command::new(binary("blockrepd"))
        .arg("--config")
        .arg(&first.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("another blockrepd uses this state_dir"),
        "{}",
        stderr_of(&out)
    );
    assert!(
        first.cli(&["status"]).status.success(),
        "the first daemon is unaffected"
    );
    first.stop().unwrap();
}

#[test]
fn the_cli_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "").unwrap();
    // A reader that went away before the CLI printed (`| grep -q` that matched early).
    let mut child = Command::new(binary("blockrep"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--output", "json", "status"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "the CLI complained: {stderr}"
    );
    assert_ne!(out.status.code(), Some(101), "the CLI panicked: {stderr}");
}
