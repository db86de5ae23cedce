//! How long a group's cuts held a pair's answers: the last few thousand holds, in
//! microseconds, for `pair show` and the coordinator's report.

use std::collections::VecDeque;

/// The recent holds and how many there were.
#[derive(Debug, Default)]
pub struct HoldTimes {
    recent: VecDeque<u32>,
    count: u64,
}

impl HoldTimes {
    const KEPT: usize = 8192;

    /// Answers held since `held_at_us` each are given at `now_us`.
    pub fn record(&mut self, held_at_us: impl IntoIterator<Item = u64>, now_us: u64) {
        for at in held_at_us {
            if self.recent.len() == Self::KEPT {
                self.recent.pop_front();
            }
            self.recent
                .push_back(now_us.saturating_sub(at).min(u64::from(u32::MAX)) as u32);
            self.count += 1;
        }
    }

    /// The recent holds (µs) and how many answers were held in all: cheap, to be taken
    /// under a lock and summarised outside it.
    pub fn snapshot(&self) -> (Vec<u32>, u64) {
        (self.recent.iter().copied().collect(), self.count)
    }

    /// The median and 99th percentile of `recent` holds (µs), and `held`, how many answers
    /// were held in all.
    pub fn summary(mut recent: Vec<u32>, held: u64) -> HoldSummary {
        recent.sort_unstable();
        let at = |q: f64| {
            recent
                .get(((recent.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        HoldSummary {
            p50_us: at(0.5),
            p99_us: at(0.99),
            held,
        }
    }
}

/// How long the group's cuts held a pair's answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldSummary {
    pub p50_us: u32,
    pub p99_us: u32,
    /// Answers held since the pair started.
    pub held: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_gives_the_median_and_99th_percentile_of_the_last_holds() {
        let mut times = HoldTimes::default();
        assert_eq!(
            HoldTimes::summary(Vec::new(), 0),
            HoldSummary::default(),
            "no hold yet"
        );
        // Held at 0, given at 1..=100 ms, in an order the summary must not depend on.
        for ms in (1..=100u64).rev() {
            times.record([0], ms * 1000);
        }
        let (recent, held) = times.snapshot();
        let summary = HoldTimes::summary(recent, held);
        assert_eq!(summary.held, 100);
        assert_eq!(summary.p50_us, 51_000);
        assert_eq!(summary.p99_us, 99_000);
        // Only the last ones are kept, all are counted.
        for _ in 0..HoldTimes::KEPT {
            times.record([5], 5);
        }
        let (recent, held) = times.snapshot();
        assert_eq!(recent.len(), HoldTimes::KEPT);
        assert_eq!(held, 100 + HoldTimes::KEPT as u64);
        assert_eq!(HoldTimes::summary(recent, held).p99_us, 0);
    }
}
