//! A bandwidth limit on what an agent sends to its peers (DRBD's `c-max-rate`, AWS DRS's
//! bandwidth throttling): every pair's stream, its catch-ups and initial syncs alike, shared
//! by all the pairs of the agent (`replication.max_bytes_per_sec`, changed while it runs
//! with `blockrep send-limit`). A GCRA limiter (`governor`) in 1 KiB cells, with a burst of
//! a tenth of a second's worth, so a second of sending stays within a few percent of it.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Bytes per cell of the limiter.
const CELL: u64 = 1024;
/// The least limit there is: 1 MiB/s.
pub const MIN_BYTES_PER_SEC: u64 = blockrep_core::replication::MIN_SEND_LIMIT;

/// The limiter's clock: tokio's, so the waits it asks for are the ones tokio sleeps (and
/// a test's paused clock moves both).
#[derive(Clone, Debug)]
struct TokioClock {
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// The agent's send limit, if it has one.
#[derive(Default, Debug)]
pub struct SendLimit {
    current: Mutex<Option<Limit>>,
}

#[derive(Clone, Debug)]
struct Limit {
    bytes_per_sec: u64,
    limiter: Arc<Limiter>,
    clock: TokioClock,
    /// The most cells one wait may ask for.
    burst: u32,
}

impl SendLimit {
    pub fn new(bytes_per_sec: Option<u64>) -> Result<Self, String> {
        let limit = Self::default();
        limit.set(bytes_per_sec)?;
        Ok(limit)
    }

    /// Sets the limit (`None`: none); it holds from the next bytes sent.
    pub fn set(&self, bytes_per_sec: Option<u64>) -> Result<(), String> {
        let limit = match bytes_per_sec {
            None => None,
            Some(rate) => {
                blockrep_core::replication::check_send_limit(rate)?;
                let cells = u32::try_from(rate / CELL).expect("checked: at most u32::MAX cells");
                let per_second = NonZeroU32::new(cells).expect("at least 1 MiB/s");
                let burst = NonZeroU32::new((cells / 10).max(1)).expect("at least one cell");
                let clock = TokioClock {
                    start: tokio::time::Instant::now(),
                };
                Some(Limit {
                    bytes_per_sec: rate,
                    limiter: Arc::new(RateLimiter::direct_with_clock(
                        Quota::per_second(per_second).allow_burst(burst),
                        clock.clone(),
                    )),
                    clock,
                    burst: burst.get(),
                })
            }
        };
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = limit;
        Ok(())
    }

    /// The limit in bytes per second, if there is one.
    pub fn bytes_per_sec(&self) -> Option<u64> {
        self.limit().map(|l| l.bytes_per_sec)
    }

    fn limit(&self) -> Option<Limit> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a limit is set.
    pub fn is_set(&self) -> bool {
        self.limit().is_some()
    }

    /// Waits until `bytes` more may be sent (at once, without a limit); `waiting` is called
    /// each time it starts to wait (at least every tenth of a second while it waits).
    pub async fn take(&self, bytes: u64, mut waiting: impl FnMut()) {
        let mut cells = bytes.div_ceil(CELL);
        while cells > 0 {
            // Read each time: a limit changed meanwhile holds from here.
            let Some(limit) = self.limit() else {
                break;
            };
            let piece = cells.min(u64::from(limit.burst)) as u32;
            match limit.wait(piece) {
                None => cells -= u64::from(piece),
                Some(wait) => {
                    waiting();
                    tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
                }
            }
        }
    }
}

impl Limit {
    /// Takes `cells` (at most the burst) if they may go now; else how long until they may.
    fn wait(&self, cells: u32) -> Option<Duration> {
        let n = NonZeroU32::new(cells).expect("cells to take");
        match self.limiter.check_n(n) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(not_until.wait_time_from(self.clock.now())),
            // Never: a piece is at most the burst.
            Err(_) => Some(Duration::from_millis(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_limit_spaces_what_is_sent() {
        let limit = SendLimit::new(Some(10 << 20)).unwrap();
        // 30 MiB at 10 MiB/s: about three seconds (less the first burst).
        let started = tokio::time::Instant::now();
        for _ in 0..30 {
            limit.take(1 << 20, || {}).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!(
            (2.8..=3.1).contains(&took),
            "30 MiB at 10 MiB/s took {took} s"
        );
    }

    #[test]
    fn limits_out_of_range_are_refused_and_none_is_no_limit() {
        assert!(
            SendLimit::new(Some(1000))
                .unwrap_err()
                .contains("below the least")
        );
        let limit = SendLimit::new(None).unwrap();
        assert_eq!(limit.bytes_per_sec(), None);
        limit.set(Some(100 << 20)).unwrap();
        assert_eq!(limit.bytes_per_sec(), Some(100 << 20));
    }
}
