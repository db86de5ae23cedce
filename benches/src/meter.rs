//! What a run cost each simulated host: the CPU seconds and peak resident memory of its
//! process, and the bytes a pair replicated, from before the run until the pair is idle
//! again (an async pair goes on sending after fio stops; that work is the run's too).

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
    sent_before: Option<u64>,
}

impl Meter {
    /// Starts measuring `production` and `dr` (their peak RSS is reset here); `sent` is the
    /// pair's count of bytes sent so far, when the target is a pair.
    pub fn start(production: Option<u32>, dr: Option<u32>, sent: Option<u64>) -> Self {
        let begin = |pid: u32| {
            env::reset_peak_rss(pid);
            (pid, env::cpu_seconds(pid))
        };
        Self {
            production: production.map(begin),
            dr: dr.map(begin),
            sent_before: sent,
        }
    }

    /// The cost from the start until now; `sent` is the pair's count of bytes sent now.
    pub fn finish(&self, sent: Option<u64>) -> Cost {
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
                .sent_before
                .zip(sent)
                .map(|(before, after)| after.saturating_sub(before)),
        }
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
