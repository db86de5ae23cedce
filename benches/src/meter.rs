//! What a run cost each simulated host: the CPU seconds and peak resident memory of its
//! process, and the bytes a pair replicated, from before the run until the pair is idle
//! again (an async pair goes on sending after fio stops; that work is the run's too).

use std::time::{Duration, Instant};

use crate::env;

/// One host's process over a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub cpu_s: Option<f64>,
    /// The highest resident set size during the run (the kernel's high-water mark, reset
    /// when the run starts).
    pub peak_rss: Option<u64>,
}

/// What a run cost: the production host's process (the agent, or the target's server), the
/// DR agent, and the bytes replicated between them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub production: Usage,
    pub dr: Usage,
    pub replicated_bytes: Option<u64>,
    /// Bytes clients wrote to the production volume: with `replicated_bytes`, what the
    /// journal's coalescing of overwrites saved.
    pub written_bytes: Option<u64>,
    /// Times a pair's journal overflowed (the pair fell back to its bitmap and caught up
    /// later): such a run measured the local volume, not replication.
    pub journal_overflows: Option<u64>,
    /// The share of the run's steady part the production host's CPU was busy, whoever used
    /// it (the agent, fio, the loop device's kernel workers, the network stack): see
    /// [`HostBusy`].
    pub production_host_busy: Option<f64>,
}

impl Cost {
    /// CPU seconds per GB (10^9 bytes) replicated.
    pub fn per_gb(cpu_s: Option<f64>, bytes: Option<u64>) -> Option<f64> {
        let bytes = bytes.filter(|&b| b > 0)?;
        Some(cpu_s? / (bytes as f64 / 1e9))
    }
}

/// The processes a run is measured on, and what they had used when it started.
pub struct Meter {
    production: Option<(u32, Option<f64>)>,
    dr: Option<(u32, Option<f64>)>,
    before: Option<PairCounts>,
}

/// A pair's counters a run is measured by.
#[derive(Clone, Copy, Debug)]
pub struct PairCounts {
    pub bytes_sent: u64,
    pub bytes_written: u64,
    pub journal_overflows: u64,
}

impl Meter {
    /// Starts measuring `production` and `dr` (their peak RSS is reset here); `pair` is the
    /// pair's counters so far, when the target is a pair.
    pub fn start(production: Option<u32>, dr: Option<u32>, pair: Option<PairCounts>) -> Self {
        let begin = |pid: u32| {
            env::reset_peak_rss(pid);
            (pid, env::cpu_seconds(pid))
        };
        Self {
            production: production.map(begin),
            dr: dr.map(begin),
            before: pair,
        }
    }

    /// The cost from the start until now; `pair` is the pair's counters now.
    pub fn finish(&self, pair: Option<PairCounts>) -> Cost {
        let usage = |p: Option<(u32, Option<f64>)>| {
            p.map_or_else(Usage::default, |(pid, before)| Usage {
                cpu_s: before
                    .zip(env::cpu_seconds(pid))
                    .map(|(before, after)| after - before),
                peak_rss: env::peak_rss(pid),
            })
        };
        Cost {
            production: usage(self.production),
            dr: usage(self.dr),
            replicated_bytes: self
                .before
                .zip(pair)
                .map(|(b, a)| a.bytes_sent.saturating_sub(b.bytes_sent)),
            written_bytes: self
                .before
                .zip(pair)
                .map(|(b, a)| a.bytes_written.saturating_sub(b.bytes_written)),
            journal_overflows: self
                .before
                .zip(pair)
                .map(|(b, a)| a.journal_overflows.saturating_sub(b.journal_overflows)),
            production_host_busy: None,
        }
    }
}

/// How busy the production host's CPU was during the steady part of a run, read from
/// `/proc/stat` on a thread of its own: from `skip` after the run starts (past fio's
/// start-up and ramp, or the link test's handshake) for `length` (ending before the run
/// does), so the share covers the time the run's rate is counted over. Only where the run
/// keeps the host's kernel work on its CPU ([`env::production_cpu`]).
pub struct HostBusy(Option<std::thread::JoinHandle<Option<f64>>>);

impl HostBusy {
    pub fn start(skip: Duration, length: Duration) -> Self {
        let Some(cpu) = env::production_cpu().filter(|_| !length.is_zero()) else {
            return Self(None);
        };
        let sampler = std::thread::Builder::new()
            .name("host-busy".into())
            .spawn(move || {
                std::thread::sleep(skip);
                let before = env::cpu_busy_seconds(cpu)?;
                let started = Instant::now();
                std::thread::sleep(length);
                let after = env::cpu_busy_seconds(cpu)?;
                Some((after - before) / started.elapsed().as_secs_f64())
            });
        match sampler {
            Ok(thread) => Self(Some(thread)),
            Err(e) => {
                eprintln!("bench: cannot start the CPU sampler: {e}");
                Self(None)
            }
        }
    }

    /// The busy share, once the sampling ended (`None` if it could not be read).
    pub fn share(self) -> Option<f64> {
        let share = self.0?.join().ok()?;
        if share.is_none() {
            eprintln!("bench: could not read the production CPU's busy time from /proc/stat");
        }
        share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_gb_needs_both_figures_and_some_bytes() {
        assert_eq!(Cost::per_gb(Some(3.0), Some(2_000_000_000)), Some(1.5));
        assert_eq!(Cost::per_gb(None, Some(1)), None);
        assert_eq!(Cost::per_gb(Some(1.0), Some(0)), None);
        assert_eq!(Cost::per_gb(Some(1.0), None), None);
    }
}
