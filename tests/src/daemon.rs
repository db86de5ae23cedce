//! A `blockrepd` child process with its own state and runtime directories.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Path of a binary built by this workspace (`cargo build --workspace --bins` first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// Fails the test with a clear message if an external tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(name).exists()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: scripts/test.sh installs it"
    );
}

pub struct Daemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    pub log: PathBuf,
    /// Where the daemon's service-manager notifications (`READY=1`, `WATCHDOG=1`) arrive.
    notify: UnixDatagram,
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Daemon {
    /// Writes a config in `dir` (node `host-a`, zone `az1`, plus `extra` TOML) and starts.
    pub fn start(dir: &Path, extra: &str) -> anyhow::Result<Self> {
        let config = Self::write_config(dir, extra)?;
        Self::start_with_config(dir, &config)
    }

    /// Writes `dir/blockrepd.toml`: node `host-a`, zone `az1`, state and runtime
    /// directories in `dir`, plus `extra` TOML.
    pub fn write_config(dir: &Path, extra: &str) -> anyhow::Result<PathBuf> {
        let config = dir.join("blockrepd.toml");
        let text = format!(
            "node_name = \"host-a\"\navailability_zone = \"az1\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n{extra}",
            dir.join("state").display(),
            dir.join("run").display()
        );
        std::fs::write(&config, text)?;
        Ok(config)
    }

    /// Starts with an existing config and waits for systemd's `READY=1`.
    pub fn start_with_config(dir: &Path, config: &Path) -> anyhow::Result<Self> {
        Self::start_program(&binary("blockrepd"), dir, config)
    }

    /// Starts `program` (a blockrepd, such as an installed one) with `config`, whose
    /// runtime_dir is `dir/run`, and waits for `READY=1`.
    pub fn start_program(program: &Path, dir: &Path, config: &Path) -> anyhow::Result<Self> {
        Self::start_program_with_env(program, dir, config, &[])
    }

    /// As [`Daemon::start_program`], with extra environment (test-only fault hooks).
    pub fn start_program_with_env(
        program: &Path,
        dir: &Path,
        config: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        Self::start_wrapped(&[], program, dir, config, env)
    }

    /// As [`Daemon::start_program_with_env`], run through `wrapper` (such as
    /// `ip netns exec NS`, which execs the daemon in place: the pid stays the daemon's).
    pub fn start_wrapped(
        wrapper: &[&str],
        program: &Path,
        dir: &Path,
        config: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_millis(200)))?;
        let log = dir.join("blockrepd.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let child = command
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("BLOCKREP_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("spawn blockrepd")?;
        let mut daemon = Self {
            dir: dir.to_owned(),
            config: config.to_owned(),
            socket: dir.join("run/control.sock"),
            child: Some(child),
            log,
            notify,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = daemon.notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                return Ok(daemon);
            }
            if let Some(status) = daemon.child.as_mut().expect("running").try_wait()? {
                daemon.child = None;
                bail!(
                    "blockrepd exited before it was ready ({status}); log:\n{}",
                    daemon.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "blockrepd not ready after {READY_TIMEOUT:?}; log:\n{}",
                    daemon.log_text()
                );
            }
        }
    }

    /// The next service-manager notification, waiting up to `timeout` for it.
    pub fn next_notification(&self, timeout: Duration) -> Option<String> {
        self.notify.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = [0u8; 256];
        let n = self.notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// The NBD socket of a volume.
    pub fn nbd_socket(&self, volume: &str) -> PathBuf {
        self.dir.join("run/nbd").join(format!("{volume}.sock"))
    }

    pub fn nbd_uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.nbd_socket(volume).display()
        )
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary("blockrep"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run blockrep")
    }

    /// Runs the CLI with `--output json`, requiring success.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "blockrep {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    pub fn add_volume(&self, name: &str, path: &Path) -> serde_json::Value {
        self.cli_json(&[
            "volume",
            "add",
            "--name",
            name,
            "--path",
            path.to_str().expect("utf-8 path"),
        ])
    }

    pub fn dirty_bytes(&self, volume: &str) -> u64 {
        self.cli_json(&["volume", "show", volume])["dirty_bytes"]
            .as_u64()
            .expect("dirty_bytes")
    }

    /// The dirty extents as (offset, length).
    pub fn dirty_extents(&self, volume: &str) -> Vec<(u64, u64)> {
        let v = self.cli_json(&["volume", "dirty", volume]);
        v["extents"]
            .as_array()
            .expect("extents")
            .iter()
            .map(|e| {
                (
                    e["offset"].as_u64().expect("offset"),
                    e["length"].as_u64().expect("length"),
                )
            })
            .collect()
    }

    /// SIGTERM, then wait; fails unless it exited cleanly.
    pub fn stop(self) -> anyhow::Result<()> {
        self.stop_in_background();
        self.wait_exit_success()
    }

    /// Sends SIGTERM and returns at once; [`Daemon::wait_exit_success`] waits for the exit.
    pub fn stop_in_background(&self) {
        let pid = Pid::from_raw(self.pid() as i32);
        kill(pid, Signal::SIGTERM).expect("signal blockrepd");
    }

    /// Waits for the daemon to exit and requires a clean exit.
    pub fn wait_exit_success(mut self) -> anyhow::Result<()> {
        let status = self.child.take().expect("daemon running").wait()?;
        if !status.success() {
            bail!("blockrepd exited with {status}; log:\n{}", self.log_text());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit on its own (a test-only fault hook that
    /// aborts it); returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("daemon running");
            if child.try_wait().expect("wait for blockrepd").is_some() {
                self.child = None;
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}
