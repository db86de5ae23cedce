//! The service manager's watchdog (`WatchdogSec=` in the unit): `WATCHDOG=1` is sent only
//! while the agent's loops make progress. A loop that waits for disk operations, a sync or
//! its session's ticks and gets none for half the watchdog's interval stops the pings; the
//! service manager then restarts the agent, and the restart is crash recovery. This task
//! runs on the same runtime as the pairs' tasks: a runtime that stops running stops it too.

use std::time::Duration;

use blockrep_volume::liveness::Liveness;

/// Pings every quarter of `interval` while nothing is stuck for half of it.
pub async fn ping(interval: Duration) {
    let limit = interval / 2;
    let mut tick = tokio::time::interval(interval / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck_before = false;
    tracing::info!(interval = ?interval, "watchdog on: pinging while every loop makes progress");
    loop {
        tick.tick().await;
        let stalled = Liveness::global().stalled(limit);
        if stalled.is_empty() {
            if stuck_before {
                tracing::warn!("every loop makes progress again; watchdog pings resume");
                stuck_before = false;
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            continue;
        }
        if !stuck_before {
            for s in &stalled {
                tracing::error!(what = %s.name, stalled_ms = s.for_ms, "a loop makes no progress: watchdog pings stop, the service manager will restart the agent");
            }
            stuck_before = true;
        }
    }
}
