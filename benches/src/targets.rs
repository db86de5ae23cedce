//! The targets fio runs against, as a list: each sets itself up on the shared device and
//! says how fio reaches it. A new target (a replication pair, a consistency group) is one
//! more entry in [`all`].

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::env::{Env, run};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// fio io_uring with O_DIRECT straight on the device.
    Raw,
    /// `nbdkit file` with default options on a unix socket, fio's nbd engine.
    Nbdkit,
    /// blockrepd serving the device, fio's nbd engine.
    Blockrepd,
    /// The same with dirty tracking switched off: what tracking costs.
    BlockrepdNoTracking,
    /// blockrepd with the volume in writeback cache mode: the page-cache semantics of
    /// `nbdkit file`'s defaults.
    BlockrepdWriteback,
    /// blockrepd through the kernel: nbdfuse + a loop device, fio io_uring on that device.
    BlockrepdKernel,
    /// An async pair: production on the shared device, DR on a second loop device, both
    /// agents on this machine.
    AsyncPair,
    /// The same, hypermetro.
    HypermetroPair,
    /// Not fio: one replication stream between two agents (TLS, framing, CRC; no disks).
    QuicLink,
}

pub struct Spec {
    pub kind: Kind,
    pub name: &'static str,
    pub title: &'static str,
    pub needs_root: bool,
}

pub fn all() -> Vec<Spec> {
    vec![
        Spec {
            kind: Kind::Raw,
            name: "raw",
            title: "raw device (fio io_uring, O_DIRECT)",
            needs_root: false,
        },
        Spec {
            kind: Kind::Nbdkit,
            name: "nbdkit",
            title: "nbdkit file, unix socket (fio nbd)",
            needs_root: false,
        },
        Spec {
            kind: Kind::Blockrepd,
            name: "blockrepd",
            title: "blockrepd (fio nbd)",
            needs_root: false,
        },
        Spec {
            kind: Kind::BlockrepdNoTracking,
            name: "blockrepd-notrack",
            title: "blockrepd, dirty tracking off (fio nbd)",
            needs_root: false,
        },
        Spec {
            kind: Kind::BlockrepdWriteback,
            name: "blockrepd-writeback",
            title: "blockrepd, cache=writeback (fio nbd)",
            needs_root: false,
        },
        Spec {
            kind: Kind::BlockrepdKernel,
            name: "blockrepd-kernel",
            title: "blockrepd via nbdfuse + loop (fio io_uring)",
            needs_root: true,
        },
        Spec {
            kind: Kind::AsyncPair,
            name: "async-pair",
            title: "async pair, DR agent on this machine (fio nbd)",
            needs_root: true,
        },
        Spec {
            kind: Kind::HypermetroPair,
            name: "hypermetro-pair",
            title: "hypermetro pair, DR agent on this machine (fio nbd)",
            needs_root: true,
        },
        Spec {
            kind: Kind::QuicLink,
            name: "quic-link",
            title: "one replication stream between two agents (blockrep cluster link-test)",
            needs_root: false,
        },
    ]
}

/// A target ready to run.
pub struct Target {
    pub name: &'static str,
    pub title: &'static str,
    pub kind: Kind,
    pub fio_args: Vec<String>,
    /// The production host's process whose CPU time and memory are reported: the server
    /// fio talks to, or a pair's production agent.
    pub production_pid: Option<u32>,
    /// A pair's DR agent (or the link test's receiver).
    pub dr_pid: Option<u32>,
    /// For pair and link targets: the agents.
    pub cluster: Option<crate::pairs::Cluster>,
}

pub struct Setup<'a> {
    pub env: &'a mut Env,
    pub device: &'a Path,
    /// The DR device of the pair targets (a second loop device of the same size).
    pub dr_device: Option<&'a Path>,
    pub work: &'a Path,
    /// Where the DR agents keep their state, when not under `work` (`--dr-disk memory`).
    pub dr_work: Option<&'a Path>,
    pub bin: &'a Path,
}

/// Where the run's devices and binaries are.
#[derive(Clone, Copy)]
pub struct Paths<'a> {
    pub device: &'a Path,
    pub dr_device: Option<&'a Path>,
    pub work: &'a Path,
    pub dr_work: Option<&'a Path>,
    pub bin: &'a Path,
}

impl<'a> Setup<'a> {
    pub fn new(env: &'a mut Env, paths: Paths<'a>) -> Self {
        Self {
            env,
            device: paths.device,
            dr_device: paths.dr_device,
            work: paths.work,
            dr_work: paths.dr_work,
            bin: paths.bin,
        }
    }
}

impl Setup<'_> {
    pub fn target(&mut self, spec: &Spec) -> anyhow::Result<Target> {
        let mut cluster = None;
        let (fio_args, production_pid) = match spec.kind {
            Kind::Raw => (io_uring_args(self.device), None),
            Kind::Nbdkit => {
                let socket = self.work.join("nbdkit.sock");
                let pidfile = self.work.join("nbdkit.pid");
                let pid = self.env.start_server(
                    "nbdkit",
                    crate::env::on_host(crate::env::Host::Production, "nbdkit")
                        .arg("--foreground")
                        .arg("--unix")
                        .arg(&socket)
                        .arg("--pidfile")
                        .arg(&pidfile)
                        .arg("file")
                        .arg(self.device),
                    || pidfile.exists(),
                )?;
                (
                    nbd_args(&format!("nbd+unix:///?socket={}", socket.display())),
                    Some(pid),
                )
            }
            Kind::Blockrepd | Kind::BlockrepdNoTracking | Kind::BlockrepdWriteback => {
                let tracking = spec.kind != Kind::BlockrepdNoTracking;
                let cache = if spec.kind == Kind::BlockrepdWriteback {
                    "writeback"
                } else {
                    "direct"
                };
                let (pid, uri) = self.blockrepd_target(spec.name, tracking, cache)?;
                (nbd_args(&uri), Some(pid))
            }
            Kind::BlockrepdKernel => {
                let (pid, uri) = self.blockrepd_target(spec.name, true, "direct")?;
                let file = self
                    .env
                    .start_nbdfuse(&self.work.join(spec.name).join("fuse"), &uri)?;
                let dev = self.env.attach_loop(&file)?;
                (io_uring_args(Path::new(&dev)), Some(pid))
            }
            Kind::AsyncPair | Kind::HypermetroPair => {
                let model = if spec.kind == Kind::AsyncPair {
                    "async"
                } else {
                    "hypermetro"
                };
                let c = self.pair_cluster(spec.name, model, "")?;
                let args = nbd_args(&c.uri);
                let pid = c.production_pid;
                cluster = Some(c);
                (args, Some(pid))
            }
            Kind::QuicLink => {
                let c = crate::pairs::Cluster::start(
                    self.env,
                    self.work,
                    self.bin,
                    spec.name,
                    crate::pairs::ClusterSpec {
                        dr_home: self.dr_work,
                        ..Default::default()
                    },
                )?;
                cluster = Some(c);
                // The sender is the link test's own process, measured apart.
                (Vec::new(), None)
            }
        };
        let dr_pid = cluster.as_ref().map(|c| c.dr_pid);
        Ok(Target {
            name: spec.name,
            title: spec.title,
            kind: spec.kind,
            fio_args,
            production_pid,
            dr_pid,
            cluster,
        })
    }

    /// Two agents of their own with a pair (of `model`) from the device to the DR device,
    /// initial sync done; `extra` is added to both agents' configuration.
    pub fn pair_cluster(
        &mut self,
        name: &str,
        model: &str,
        extra: &str,
    ) -> anyhow::Result<crate::pairs::Cluster> {
        self.pair_cluster_spec(
            name,
            crate::pairs::ClusterSpec {
                model: Some(model),
                extra,
                ..Default::default()
            },
        )
    }

    /// As [`Setup::pair_cluster`], laid out by `spec` (its devices are the shared ones).
    pub fn pair_cluster_spec(
        &mut self,
        name: &str,
        spec: crate::pairs::ClusterSpec<'_>,
    ) -> anyhow::Result<crate::pairs::Cluster> {
        let dr = self.dr_device.context("pair targets need a DR device")?;
        crate::pairs::Cluster::start(
            self.env,
            self.work,
            self.bin,
            name,
            crate::pairs::ClusterSpec {
                devices: Some((self.device, dr)),
                dr_home: self.dr_work,
                ..spec
            },
        )
    }

    /// An async pair target like `async-pair`, whose agents cut epochs every
    /// `epoch_interval_ms`.
    pub fn async_pair_with_epochs(&mut self, epoch_interval_ms: u64) -> anyhow::Result<Target> {
        let c = self.pair_cluster(
            &format!("async-pair-epoch-{epoch_interval_ms}ms"),
            "async",
            &format!("[replication]\nepoch_interval_ms = {epoch_interval_ms}\n"),
        )?;
        Ok(Target {
            name: "async-pair",
            title: "async pair, shorter epochs",
            kind: Kind::AsyncPair,
            fio_args: nbd_args(&c.uri),
            production_pid: Some(c.production_pid),
            dr_pid: Some(c.dr_pid),
            cluster: Some(c),
        })
    }

    /// Starts a daemon of its own for this target and registers the device as volume `bench`.
    fn blockrepd_target(
        &mut self,
        name: &str,
        tracking: bool,
        cache: &str,
    ) -> anyhow::Result<(u32, String)> {
        let dir = self.work.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("blockrepd.toml");
        std::fs::write(
            &config,
            format!(
                "node_name = \"bench\"\navailability_zone = \"az1\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n[bitmap]\ndirty_tracking = {tracking}\n",
                dir.join("state").display(),
                dir.join("run").display()
            ),
        )?;
        let pid = crate::env::start_daemon(self.env, self.bin, &dir, &config)?;
        crate::env::pin(pid, crate::env::Host::Production)?;
        let socket = dir.join("run/control.sock");
        run(Command::new(self.bin.join("blockrep"))
            .arg("--socket")
            .arg(&socket)
            .args([
                "volume", "add", "--name", "bench", "--cache", cache, "--path",
            ])
            .arg(self.device))
        .context("register the bench volume")?;
        Ok((
            pid,
            format!(
                "nbd+unix:///bench?socket={}",
                dir.join("run/nbd/bench.sock").display()
            ),
        ))
    }
}

fn io_uring_args(device: &Path) -> Vec<String> {
    vec![
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--filename={}", device.display()),
    ]
}

fn nbd_args(uri: &str) -> Vec<String> {
    vec!["--ioengine=nbd".into(), format!("--uri={uri}")]
}

/// The shared backing: a loop device over a preallocated file, or the file itself without root.
pub fn prepare_device(
    env: &mut Env,
    work: &Path,
    bytes: u64,
    root: bool,
) -> anyhow::Result<PathBuf> {
    let file = work.join("backing.img");
    // Written, not just fallocated: unwritten extents would make the first pass slower.
    run(Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .arg("bs=1M")
        .arg(format!("count={}", bytes >> 20))
        .args(["oflag=direct", "conv=fsync", "status=none"]))?;
    if root {
        Ok(PathBuf::from(env.attach_loop(&file)?))
    } else {
        Ok(file)
    }
}

/// A second device of the same size for the pairs' DR volumes, on a file in `work`: a loop
/// device over it, or with `--dr-disk memory` the file itself (in memory already; a loop
/// device would do the DR host's I/O on kernel workers, which the pinned layout keeps on
/// the production host's CPU).
pub fn prepare_dr_device(env: &mut Env, work: &Path, bytes: u64) -> anyhow::Result<PathBuf> {
    let file = work.join("dr.img");
    run(Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .arg("bs=1M")
        .arg(format!("count={}", bytes >> 20))
        .args(["oflag=direct", "conv=fsync", "status=none"]))?;
    if crate::env::dr_disk() == crate::env::DrDisk::Memory {
        return Ok(file);
    }
    Ok(PathBuf::from(env.attach_loop(&file)?))
}
