//! `blockrep job wait`: follows a job to its end, with a progress bar and an estimate of
//! the time left on a terminal, and a line per change otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use blockrep_api::proto::{self, agent_client::AgentClient};
use tonic::transport::Channel;

use crate::call;
use crate::render::Output;
use crate::stdout::{say, sayln};

/// Polls start this often and slow down to `POLL`: a short job is seen to end at once.
const FIRST_POLL: Duration = Duration::from_millis(25);
const POLL: Duration = Duration::from_millis(500);
/// How long the coordinator may be unavailable before the wait gives up.
const COORDINATOR_AWAY: Duration = Duration::from_secs(30);

pub async fn wait_for_job(
    client: &mut AgentClient<Channel>,
    job: &str,
    timeout_s: u64,
    out: &Output,
) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal() && !out.json;
    let started = Instant::now();
    let mut last_line = String::new();
    let mut poll = FIRST_POLL;
    let mut unavailable_since = None;
    loop {
        // A coordinator that is away for a moment (an HA coordinator's leader changing) is
        // waited for, within the timeout; any other error ends the wait.
        let asked = client
            .get_job(proto::JobRef {
                job: job.to_owned(),
            })
            .await;
        let j = match asked {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                let since = *unavailable_since.get_or_insert_with(Instant::now);
                let waited_out =
                    timeout_s > 0 && started.elapsed() > Duration::from_secs(timeout_s);
                if waited_out || since.elapsed() > COORDINATOR_AWAY {
                    return call(std::future::ready(Err(status)))
                        .await
                        .map(|_: proto::Job| ());
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
            asked => {
                unavailable_since = None;
                call(std::future::ready(asked)).await?
            }
        };
        let finished = j.status == "SUCCESS" || j.status == "FAIL";
        if terminal {
            let width = 30;
            let filled = ((j.progress * width as f64) as usize).min(width);
            let eta = eta(started.elapsed(), j.progress)
                .map(|d| format!(" ETA {}s", d.as_secs()))
                .unwrap_or_default();
            say!(
                "\r{} [{}{}] {:5.1}% {}{eta}   ",
                j.job_type,
                "#".repeat(filled),
                " ".repeat(width - filled),
                j.progress * 100.0,
                j.status
            );
            let _ = std::io::stdout().flush();
        } else if !out.json {
            let line = format!("job {} {} {:.0}%", j.id, j.status, j.progress * 100.0);
            if line != last_line {
                sayln!("{line}");
                last_line = line;
            }
        }
        if finished {
            if terminal {
                sayln!();
            }
            if out.json {
                out.print(&j);
            }
            if j.status == "FAIL" {
                anyhow::bail!("job {} failed: {}", j.id, j.fail_reason);
            }
            return Ok(());
        }
        if timeout_s > 0 && started.elapsed() > Duration::from_secs(timeout_s) {
            anyhow::bail!("job {} still {} after {timeout_s} s", j.id, j.status);
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(POLL);
    }
}

/// Time left at the rate so far.
fn eta(elapsed: Duration, progress: f64) -> Option<Duration> {
    (progress > 0.01 && progress < 1.0).then(|| elapsed.mul_f64((1.0 - progress) / progress))
}
