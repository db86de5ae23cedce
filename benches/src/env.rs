//! What the benchmark sets up, and its teardown: in reverse order, at the end, on error and
//! on Ctrl-C.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Where the processes of a run are placed on the machine's CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Every process shares every CPU.
    #[default]
    Shared,
    /// Each simulated host on a CPU of its own, as each AZ is its own host: the production
    /// host (its agent, fio, the link test's sender) on CPU 0, the DR host (its agent, and
    /// the coordinator's witness node beside it) on CPU 1.
    Pinned,
}

/// The simulated host a process of the run belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Production,
    Dr,
}

impl Host {
    fn cpu(self) -> &'static str {
        match self {
            Host::Production => "0",
            Host::Dr => "1",
        }
    }
}

/// Where the DR host's data lives: its volume and its agent's state (the stage log).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DrDisk {
    /// On the disk the production volume is on: the DR side's writes take from the
    /// production host's device.
    #[default]
    Shared,
    /// In memory (`/dev/shm`): a DR host with a disk of its own, faster than any real one.
    Memory,
}

static LAYOUT: OnceLock<Layout> = OnceLock::new();
static DR_DISK: OnceLock<DrDisk> = OnceLock::new();
static MAX_UDP_PAYLOAD: OnceLock<u16> = OnceLock::new();
/// The kernel's unbound workqueues were kept on the production host's CPU for the run.
static KERNEL_WORK_CONFINED: AtomicBool = AtomicBool::new(false);

/// Sets where the DR host's data lives (once, before anything starts).
pub fn set_dr_disk(disk: DrDisk) {
    let _ = DR_DISK.set(disk);
}

pub fn dr_disk() -> DrDisk {
    DR_DISK.get().copied().unwrap_or_default()
}

/// Sets the agents' and the link test's `cluster.max_udp_payload` for the run (once,
/// before anything starts); without it they keep their default.
pub fn set_max_udp_payload(bytes: u16) {
    let _ = MAX_UDP_PAYLOAD.set(bytes);
}

/// The run's `cluster.max_udp_payload`, when it is not the agents' default.
pub fn max_udp_payload() -> Option<u16> {
    MAX_UDP_PAYLOAD.get().copied()
}

/// Sets the run's layout (once, before anything starts).
pub fn set_layout(layout: Layout) {
    let _ = LAYOUT.set(layout);
}

pub fn layout() -> Layout {
    LAYOUT.get().copied().unwrap_or_default()
}

/// `program`, started on `host`'s CPU in the pinned layout.
pub fn on_host(host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match layout() {
        Layout::Shared => Command::new(program),
        Layout::Pinned => {
            let mut cmd = Command::new("taskset");
            cmd.args(["--cpu-list", host.cpu()]).arg(program);
            cmd
        }
    }
}

/// Pins every thread of the running process `pid` to `host`'s CPU in the pinned layout;
/// the threads it starts later inherit the pinning.
pub fn pin(pid: u32, host: Host) -> anyhow::Result<()> {
    if layout() == Layout::Pinned {
        run(Command::new("taskset").args([
            "--all-tasks",
            "--pid",
            "--cpu-list",
            host.cpu(),
            &pid.to_string(),
        ]))
        .with_context(|| format!("pin process {pid} to CPU {}", host.cpu()))?;
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag the run checks between steps (fio, in our process
/// group, gets the terminal's Ctrl-C too and stops), so the run still tears down what it
/// set up (the workqueue mask among it).
pub fn catch_interrupts() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        sigaction(Signal::SIGINT, &action)?;
        sigaction(Signal::SIGTERM, &action)?;
        sigaction(Signal::SIGHUP, &action)?;
    }
    Ok(())
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

enum Resource {
    Loop(String),
    /// A server: SIGTERM, then wait.
    Process(String, Child),
    /// nbdfuse: unmount, then wait for it to exit.
    Fuse(PathBuf, Child),
    Dir(PathBuf),
    /// A network namespace of the run: deleted after the servers in it stopped.
    NetNs(String),
    /// The kernel's unbound workqueues' CPUs before the run confined them: put back.
    WorkqueueCpus(String),
}

/// Which CPUs the kernel's unbound workqueues run on: the loop devices' I/O, among others.
/// The setting is the whole machine's.
const UNBOUND_WORKQUEUE_CPUS: &str = "/sys/devices/virtual/workqueue/cpumask";
/// The mask last asked for (the one in effect leaves out isolated CPUs): what is put back.
const UNBOUND_WORKQUEUE_CPUS_REQUESTED: &str = "/sys/devices/virtual/workqueue/cpumask_requested";

/// Everything set up so far, torn down last-in first-out when dropped.
#[derive(Default)]
pub struct Env {
    stack: Vec<Resource>,
}

impl Env {
    pub fn temp_dir(&mut self) -> anyhow::Result<PathBuf> {
        self.temp_dir_in(Path::new("/tmp"))
    }

    /// A directory of the run under `parent`, removed at the end.
    pub fn temp_dir_in(&mut self, parent: &Path) -> anyhow::Result<PathBuf> {
        // Kept past the TempDir: removal is this stack's job, in its order.
        let dir = tempfile::Builder::new()
            .prefix("blockrep-bench.")
            .tempdir_in(parent)?
            .keep();
        self.stack.push(Resource::Dir(dir.clone()));
        Ok(dir)
    }

    pub fn attach_loop(&mut self, file: &Path) -> anyhow::Result<String> {
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file))?;
        let dev = dev.trim().to_owned();
        self.stack.push(Resource::Loop(dev.clone()));
        Ok(dev)
    }

    /// In the pinned layout, runs the kernel's unbound workqueues on the production host's
    /// CPU until the run ends. A loop device does its I/O on them, so otherwise the
    /// production device's work would float onto the DR host's CPU (the unpaired row then
    /// had a second CPU the pairs have not). The DR volume of `--dr-disk memory` is a file,
    /// not a loop device, so the DR host's I/O stays in its agent's threads.
    pub fn confine_kernel_work(&mut self) -> anyhow::Result<()> {
        if layout() != Layout::Pinned {
            return Ok(());
        }
        let before = std::fs::read_to_string(UNBOUND_WORKQUEUE_CPUS_REQUESTED)
            .or_else(|_| std::fs::read_to_string(UNBOUND_WORKQUEUE_CPUS))
            .with_context(|| format!("read {UNBOUND_WORKQUEUE_CPUS}"))?;
        let mask = format!("{:x}", 1u64 << Host::Production.cpu().parse::<u32>()?);
        if before.trim().trim_start_matches(['0', ',']) == mask {
            eprintln!(
                "bench: warning: {UNBOUND_WORKQUEUE_CPUS} is already {mask} (a bench run that was \
                 killed may have left it): it stays so after this run; write the machine's usual \
                 mask (usually all CPUs) back"
            );
        }
        std::fs::write(UNBOUND_WORKQUEUE_CPUS, &mask)
            .with_context(|| format!("write {mask} to {UNBOUND_WORKQUEUE_CPUS}"))?;
        self.stack
            .push(Resource::WorkqueueCpus(before.trim().to_owned()));
        KERNEL_WORK_CONFINED.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// A network namespace of this run with its loopback up, for scenarios that cut or
    /// spoil the link between two agents (nft inside it touches nothing outside).
    pub fn netns(&mut self, name: &str) -> anyhow::Result<String> {
        let name = format!("brbench-{name}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.stack.push(Resource::NetNs(name.clone()));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(name)
    }

    /// Stops a server started with [`Env::start_server`] before the run ends (SIGTERM, wait).
    pub fn stop_server(&mut self, pid: u32) {
        if let Some((name, child)) = self.take_server(pid) {
            terminate(&name, child);
        }
    }

    /// Kills a server started with [`Env::start_server`] with SIGKILL (a crash) and reaps it.
    pub fn kill_server(&mut self, pid: u32) {
        if let Some((_, mut child)) = self.take_server(pid) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server `pid` of the run, no longer the run's to clean up.
    fn take_server(&mut self, pid: u32) -> Option<(String, std::process::Child)> {
        let i = self
            .stack
            .iter()
            .position(|r| matches!(r, Resource::Process(_, c) if c.id() == pid))?;
        match self.stack.remove(i) {
            Resource::Process(name, child) => Some((name, child)),
            _ => unreachable!("found as a process"),
        }
    }

    /// Starts a server in its own process group (so Ctrl-C reaches it only through us) and
    /// waits until `ready()` says it serves.
    pub fn start_server(
        &mut self,
        name: &str,
        cmd: &mut Command,
        ready: impl FnMut() -> bool,
    ) -> anyhow::Result<u32> {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let pid = child.id();
        self.stack.push(Resource::Process(name.to_owned(), child));
        self.wait_ready(name, ready)?;
        Ok(pid)
    }

    pub fn start_nbdfuse(&mut self, mountpoint: &Path, uri: &str) -> anyhow::Result<PathBuf> {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(mountpoint)?;
        let pidfile = mountpoint.with_extension("pid");
        let child = Command::new("nbdfuse")
            .arg("--pidfile")
            .arg(&pidfile)
            .arg(mountpoint)
            .arg(uri)
            .process_group(0)
            .stdout(Stdio::null())
            .spawn()
            .context("start nbdfuse")?;
        self.stack
            .push(Resource::Fuse(mountpoint.to_owned(), child));
        self.wait_ready("nbdfuse", || pidfile.exists())?;
        Ok(mountpoint.join("nbd"))
    }

    fn wait_ready(&mut self, name: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            check_interrupted()?;
            if let Some(Resource::Process(_, child) | Resource::Fuse(_, child)) =
                self.stack.last_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("{name} exited before it was ready ({status})");
            }
            if Instant::now() > deadline {
                bail!("{name} not ready after 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        while let Some(resource) = self.stack.pop() {
            match resource {
                Resource::Loop(dev) => {
                    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
                }
                Resource::Process(name, child) => terminate(&name, child),
                Resource::Fuse(mountpoint, mut child) => {
                    let _ = Command::new("fusermount3")
                        .arg("-u")
                        .arg(&mountpoint)
                        .status();
                    let _ = child.wait();
                }
                Resource::Dir(dir) => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Resource::NetNs(name) => {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
                Resource::WorkqueueCpus(mask) => {
                    if let Err(e) = std::fs::write(UNBOUND_WORKQUEUE_CPUS, &mask) {
                        eprintln!("bench: cannot put {mask} back in {UNBOUND_WORKQUEUE_CPUS}: {e}");
                    }
                }
            }
        }
    }
}

fn terminate(name: &str, mut child: Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    if let Err(e) = child.wait() {
        eprintln!("bench: waiting for {name}: {e}");
    }
}

/// Runs a command and returns its stdout; fails with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Seconds `cpu` has been busy since boot (everything but idle and I/O wait, from
/// `/proc/stat`), or `None` when the machine has no such CPU or the file cannot be read.
pub fn cpu_busy_seconds(cpu: usize) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    // SAFETY: sysconf has no memory effects.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(busy_ticks(line)? / per_second)
}

/// The busy ticks of one CPU's `/proc/stat` line: user, nice, system, irq, softirq and
/// steal (a virtual machine's stolen time is time the host's work could not run). Guest
/// time is counted within user already; idle and I/O wait are not busy.
fn busy_ticks(line: &str) -> Option<f64> {
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = *ticks.get(..8)? else {
        return None;
    };
    Some(user + nice + system + irq + softirq + steal)
}

/// The production host's CPU, when the run keeps that host, kernel work included, on it:
/// the pinned layout, run as root (see [`Env::confine_kernel_work`]).
pub fn production_cpu() -> Option<usize> {
    if !KERNEL_WORK_CONFINED.load(Ordering::SeqCst) {
        return None;
    }
    Host::Production.cpu().parse().ok()
}

/// Peak resident set size of a process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM:")
}

/// Resets `pid`'s peak resident set size to its current one (`clear_refs` 5), so the next
/// [`peak_rss`] covers only what follows; best effort.
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// CPU seconds (user + system) of this process's children that have been waited for.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Resident memory of `pid` now.
pub fn rss(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Starts blockrepd with `config` (runtime and state under `dir`) as a server of the run,
/// on the production host, and waits for its `READY=1`.
pub fn start_daemon(env: &mut Env, bin: &Path, dir: &Path, config: &Path) -> anyhow::Result<u32> {
    start_daemon_in(env, bin, dir, config, None, Host::Production)
}

/// The host a cluster's node runs on: `node-a` is the production host, the others (the DR
/// agent, the coordinator's witness) are on the DR host.
pub fn host_of(node: &str) -> Host {
    if node == "node-a" {
        Host::Production
    } else {
        Host::Dr
    }
}

/// As [`start_daemon`], on `host` and inside network namespace `netns` if given (`ip netns
/// exec` execs, so the pid is the daemon's; its unix sockets are on the shared file system).
/// In the pinned layout the daemon starts on its host's CPU: from its first instruction it
/// sees only the CPU its host has.
pub fn start_daemon_in(
    env: &mut Env,
    bin: &Path,
    dir: &Path,
    config: &Path,
    netns: Option<&str>,
    host: Host,
) -> anyhow::Result<u32> {
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_nonblocking(true)?;
    let log = std::fs::File::create(dir.join("blockrepd.log"))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = on_host(host, "ip");
            c.args(["netns", "exec", ns]).arg(bin.join("blockrepd"));
            c
        }
        None => on_host(host, bin.join("blockrepd")),
    };
    env.start_server(
        "blockrepd",
        cmd.arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify_path)
            // Quiet by default (logging costs CPU the figures share); BLOCKREP_BENCH_LOG sets
            // the agents' filter to look into a run.
            .env(
                "BLOCKREP_LOG",
                std::env::var("BLOCKREP_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stderr(log),
        || {
            let mut buf = [0u8; 128];
            notify
                .recv(&mut buf)
                .is_ok_and(|n| String::from_utf8_lossy(&buf[..n]).contains("READY=1"))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpus_busy_ticks_leave_out_idle_and_io_wait_and_count_guest_time_once() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu0 100 5 50 1000 20 3 7 2 40 1";
        assert_eq!(busy_ticks(line), Some(167.0));
        assert_eq!(busy_ticks("cpu0 1 2 3"), None);
        assert_eq!(busy_ticks("cpu0 1 2 3 x 5 6 7 8"), None);
    }

    #[test]
    fn this_machines_cpu0_is_read_and_an_absent_cpu_is_none() {
        let before = cpu_busy_seconds(0).expect("cpu0 is in /proc/stat");
        assert!(cpu_busy_seconds(0).unwrap() >= before);
        assert_eq!(cpu_busy_seconds(1 << 20), None);
    }
}
