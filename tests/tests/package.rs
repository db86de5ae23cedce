//! The Debian package: built by `scripts/package.sh`, its file list checked, installed with
//! `dpkg -i`, its configuration checked and its control socket used by a member of the
//! `blockrep` group without root, then purged, leaving the system as it was.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use blockrep_tests::{Daemon, require_tool, run};

fn group_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["group", name])
        .output()
        .unwrap()
        .status
        .success()
}

fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "blockrep"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
}

/// Purges the package if a failed run left it installed.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        if package_installed() {
            let _ = Command::new("dpkg").args(["-P", "blockrep"]).status();
        }
    }
}

const FILES: &[&str] = &[
    "./usr/bin/blockrepd",
    "./usr/bin/blockrep",
    "./etc/blockrep/blockrepd.toml",
    "./usr/lib/systemd/system/blockrepd.service",
    "./usr/share/doc/blockrep/README.md",
    "./usr/share/doc/blockrep/ARCHITECTURE.md",
];

#[test]
fn the_package_installs_serves_its_group_and_purges_cleanly() {
    require_tool("dpkg");
    require_tool("setpriv");
    assert!(
        !package_installed(),
        "blockrep is already installed on this host; this test installs and purges it"
    );
    let group_before = group_exists("blockrep");
    let _purge = Purge;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = tempfile::tempdir().unwrap();

    // Built from the debug binaries the test run already has (not rebuilt: the other
    // tests run on them as scripts/test.sh built them, with the test-only fault hooks).
    let deb = run(Command::new(repo.join("scripts/package.sh"))
        .args(["--profile", "dev", "--no-build", "--out"])
        .arg(out.path()));
    let deb = Path::new(deb.lines().last().unwrap()).to_owned();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("blockrep_{version}_amd64.deb")
    );
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for file in FILES {
        assert!(
            listing.lines().any(|l| l.ends_with(file)),
            "{file} missing from the package:\n{listing}"
        );
    }
    let conffiles = run(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles, "/etc/blockrep/blockrepd.toml");

    run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(package_installed());
    assert!(
        group_exists("blockrep"),
        "installing creates the blockrep group"
    );
    run(Command::new("/usr/bin/blockrepd").args([
        "--check-config",
        "--config",
        "/etc/blockrep/blockrepd.toml",
    ]));

    // The installed daemon with the installed configuration, its directories moved into a
    // scratch directory: the control socket belongs to the blockrep group, and a member of
    // the group (no root) runs the CLI.
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = std::fs::read_to_string("/etc/blockrep/blockrepd.toml").unwrap();
    let config = config
        .replace(
            "\"/var/lib/blockrep\"",
            &format!("{:?}", scratch.path().join("state")),
        )
        .replace(
            "\"/run/blockrep\"",
            &format!("{:?}", scratch.path().join("run")),
        );
    let config_path = scratch.path().join("blockrepd.toml");
    std::fs::write(&config_path, config).unwrap();
    let daemon = Daemon::start_program(
        Path::new("/usr/bin/blockrepd"),
        scratch.path(),
        &config_path,
    )
    .unwrap();
    let gid = run(Command::new("getent").args(["group", "blockrep"]))
        .split(':')
        .nth(2)
        .unwrap()
        .parse::<u32>()
        .unwrap();
    let socket = &daemon.socket;
    assert_eq!(
        std::fs::metadata(socket).unwrap().gid(),
        gid,
        "socket group"
    );
    let cli_as = |groups: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                groups,
                "/usr/bin/blockrep",
                "--socket",
            ])
            .arg(socket)
            .arg("status")
            .output()
            .unwrap()
    };
    let member = cli_as(&format!("--groups={gid}"));
    assert!(
        member.status.success(),
        "a blockrep group member runs the CLI: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    let outsider = cli_as("--clear-groups");
    assert!(!outsider.status.success(), "others are refused");
    assert!(
        String::from_utf8_lossy(&outsider.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&outsider.stderr)
    );
    daemon.stop().unwrap();

    run(Command::new("dpkg").args(["-P", "blockrep"]));
    assert!(!package_installed());
    for file in FILES {
        let path = Path::new(&file[1..]);
        assert!(!path.exists(), "{} left behind", path.display());
    }
    assert!(
        !Path::new("/etc/blockrep").exists(),
        "/etc/blockrep left behind"
    );
    assert_eq!(
        group_exists("blockrep"),
        group_before,
        "the group is as before"
    );
}
