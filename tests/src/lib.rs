//! Harness for process-level tests: real `blockrepd` daemons in temporary directories, the
//! `blockrep` CLI, and a small raw NBD client.

pub mod cluster;
pub mod daemon;
pub mod etcd;
pub mod group;
pub mod nbd;
pub mod records;
pub mod rest;
pub mod small_fs;

pub use daemon::{Daemon, binary, require_tool};
pub use nbd::NbdClient;

/// Runs a command, fails the test with its output if it fails, and returns its stdout
/// without surrounding white space.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Creates a file of `size` bytes with its blocks allocated.
pub fn preallocated(path: &std::path::Path, size: u64) {
    run(std::process::Command::new("fallocate")
        .arg("-l")
        .arg(size.to_string())
        .arg(path));
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &std::path::Path, size: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create sparse file");
}

/// A seed from `BLOCKREP_SEED` or the given default, printed so a failure can be replayed.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("BLOCKREP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed: BLOCKREP_SEED={seed}");
    seed
}

/// A process's resident memory, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Samples the resident memory of `pids` every 50 ms until dropped; [`PeakRss::peaks`]
/// gives each one's highest.
pub struct PeakRss {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl PeakRss {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut peaks = vec![0u64; pids.len()];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for (peak, pid) in peaks.iter_mut().zip(&pids) {
                        *peak = (*peak).max(rss_bytes(*pid));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                peaks
            })
        };
        Self {
            stop,
            sampler: Some(sampler),
        }
    }

    pub fn peaks(mut self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampler.take().expect("sampling").join().unwrap()
    }
}
