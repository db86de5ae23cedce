//! Measurements outside the fio matrix: how far an async pair's DR image trails under a
//! steady load, and what an initial sync sends and how fast.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::env::{Env, check_interrupted, run};
use crate::fio::{self, Timing};
use crate::pairs::{Cluster, ClusterSpec};
use crate::report::{Goal, GoalFormat, Report, ScenarioResult};
use crate::targets::{Kind, Target};
use crate::workloads;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One lag reading: fio at `rate` IOPS on `target` for `seconds`, the production side's lag
/// sampled every 100 ms.
struct LagRun {
    epoch_ms: u64,
    achieved_iops: f64,
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn lag_run(target: &Target, epoch_ms: u64, rate: u64, seconds: u32) -> anyhow::Result<LagRun> {
    let cluster = target
        .cluster
        .as_ref()
        .context("async-pair has its agents")?;
    let workload = workloads::all()
        .into_iter()
        .find(|w| w.name == "randwrite-4k-qd32")
        .expect("a workload of the list");
    cluster.wait_idle()?;
    let timing = Timing {
        runtime_s: seconds,
        ramp_s: 1,
    };
    let extra = vec![format!("--rate_iops={rate}")];
    let mut lags = Vec::new();
    let sample = std::thread::scope(|scope| -> anyhow::Result<fio::Sample> {
        let fio = scope.spawn(|| fio::run_with(target, &workload, &timing, &extra));
        // Sample once fio is past its ramp.
        std::thread::sleep(Duration::from_secs(2));
        while !fio.is_finished() {
            check_interrupted()?;
            if let Ok(state) = cluster.pair_state()
                && let Some(lag) = state["lag_seconds"].as_f64()
            {
                lags.push(lag);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        fio.join().expect("fio thread")
    })?;
    lags.sort_by(f64::total_cmp);
    Ok(LagRun {
        epoch_ms,
        achieved_iops: sample.value,
        samples: lags.len(),
        p50: percentile(&lags, 0.5),
        p99: percentile(&lags, 0.99),
        max: lags.last().copied().unwrap_or(f64::NAN),
    })
}

/// fio 4k randwrite QD32 at half the async pair's median IOPS for `seconds`, sampling the
/// production side's lag every 100 ms: on the async-pair target (default 1 s epochs), and
/// on `shorter`, an async pair on the same devices with shorter epochs.
pub fn lag(
    ready: &[Target],
    report: &Report,
    seconds: u32,
    shorter: Option<(&Target, u64)>,
) -> anyhow::Result<ScenarioResult> {
    let target = ready
        .iter()
        .find(|t| t.kind == Kind::AsyncPair)
        .context("the lag scenario needs the async-pair target")?;
    let max_iops = report
        .median_of("randwrite-4k-qd32", "async-pair")
        .context("the lag scenario needs the randwrite-4k-qd32 row of async-pair")?;
    let rate = (max_iops / 2.0).round() as u64;
    let mut runs = vec![lag_run(target, 1000, rate, seconds)?];
    if let Some((target, epoch_ms)) = shorter {
        runs.push(lag_run(target, epoch_ms, rate, seconds)?);
    }
    let mut markdown = format!(
        "Async lag: 4k randwrite QD32 at {rate} IOPS (half the async pair's {max_iops:.0}), {seconds} s. Lag is how far the DR volume's consistent image (the last epoch applied) trails production, sampled every 100 ms; with epochs of E seconds it climbs to E plus the time to send, stage and apply an epoch before it drops.\n"
    );
    for r in &runs {
        markdown.push_str(&format!(
            "\n- epoch interval {} ms: fio reached {:.0} IOPS; {} samples: p50 {:.2} s, p99 {:.2} s, max {:.2} s.",
            r.epoch_ms, r.achieved_iops, r.samples, r.p50, r.p99, r.max
        ));
    }
    Ok(ScenarioResult {
        name: "lag",
        summary: runs
            .iter()
            .map(|r| format!("epochs {} ms: lag p50 {:.2} s, p99 {:.2} s", r.epoch_ms, r.p50, r.p99))
            .collect::<Vec<_>>()
            .join("; ")
            + &format!(" at {rate} IOPS"),
        markdown,
        json: json!({
            "rate_iops": rate,
            "runs": runs.iter().map(|r| json!({
                "epoch_interval_ms": r.epoch_ms,
                "achieved_iops": r.achieved_iops,
                "samples": r.samples,
                "lag_p50_s": r.p50,
                "lag_p99_s": r.p99,
                "lag_max_s": r.max,
            })).collect::<Vec<_>>(),
        }),
        goals: runs
            .iter()
            .map(|r| {
                // 1 s epochs: within 1.2 s (replication at the speed of the device); shorter
                // epochs: within 1 s (the pairs' own goal).
                let goal = if r.epoch_ms >= 1000 { 1.2 } else { 1.0 };
                Goal::at_most(
                    format!(
                        "async lag p99 ≤ {goal} s at half the async pair's maximum 4k IOPS (epochs {} ms)",
                        r.epoch_ms
                    ),
                    Some(r.p99).filter(|v| !v.is_nan()),
                    goal,
                    GoalFormat::Seconds,
                )
            })
            .collect(),
    })
}

const SYNC_VOLUME: u64 = 2 << 30;
const CHUNK: u64 = 8 << 20;
const STRIDE: u64 = 32 << 20;

/// A 2 GiB volume with 25% of it written (8 MiB of data every 32 MiB), paired with an
/// empty one: what the initial sync sends, and how fast. Twice: on files, where the sync
/// reads only what `SEEK_DATA` finds, and on loop devices, where it reads everything and
/// sends zero blocks as zero ranges. Each beside what the production device alone takes to
/// read the same (a floor of the copy on the production host; the quic-link row moves memory).
/// With `dr_work` (`--dr-disk memory`), the DR volume (a file, in both runs) and the DR
/// agent's state are there: the DR host's writes do not take from the production device.
pub fn initial_sync(
    env: &mut Env,
    work: &Path,
    dr_work: Option<&Path>,
    bin: &Path,
    report: &Report,
) -> anyhow::Result<ScenarioResult> {
    let files = sync_once(env, work, dr_work, bin, false)?;
    let devices = sync_once(env, work, dr_work, bin, true)?;
    let link = report.median_of("seqwrite-1m-qd8", "quic-link");
    let line = |what: &str, r: &SyncRun| {
        format!(
            "- {what}: sent {:.1} MB on the stream ({:.1} MB of extent payload) for {:.1} MB allocated: {:.3}× allocated; {:.2} s: {:.0} MB/s of allocated data{}; of which copying (status `copying` to `active`) {}. The production device alone reads what the sync reads in {:.2} s ({:.0} MB/s of allocated data; fio, `O_DIRECT`, one read at a time, 4 MiB reads, on the production host's CPU): the copy ran at {}.",
            r.sent as f64 / 1e6,
            r.payload as f64 / 1e6,
            r.allocated as f64 / 1e6,
            r.sent as f64 / r.allocated as f64,
            r.seconds,
            r.throughput(),
            link.map_or(String::new(), |l| format!(
                " ({:.2}× the quic-link row's {l:.0} MB/s)",
                r.throughput() / l
            )),
            match (r.copying_seconds, r.copy_throughput()) {
                (Some(s), Some(rate)) => format!(
                    "{s:.2} s, {rate:.0} MB/s{}",
                    link.map_or(String::new(), |l| format!(", {:.2}×", rate / l))
                ),
                _ => "not seen (the copy ended between two polls)".to_owned(),
            },
            r.device_seconds,
            r.device_throughput(),
            r.copy_throughput().map_or_else(
                || "an unknown share of that".to_owned(),
                |rate| format!("{:.2}× that", rate / r.device_throughput())
            ),
        )
    };
    let markdown = format!(
        "Initial sync of a 2 GiB volume with {} MiB written (8 MiB every 32 MiB), async pair, timed from the create call to the production agent reporting the pair active:\n\n{}\n{}",
        files.allocated >> 20,
        line("files (SEEK_DATA/SEEK_HOLE)", &files),
        line(
            "loop devices (every block read, zero blocks sent as zero ranges)",
            &devices
        ),
    );
    Ok(ScenarioResult {
        name: "initial-sync",
        summary: format!(
            "files {:.3}× allocated at {:.0} MB/s; loop devices {:.3}× at {:.0} MB/s",
            files.sent as f64 / files.allocated as f64,
            files.throughput(),
            devices.sent as f64 / devices.allocated as f64,
            devices.throughput()
        ),
        markdown,
        json: json!({
            "files": files.json(),
            "loop_devices": devices.json(),
            "quic_link_megabytes_per_second": link,
        }),
        goals: vec![
            Goal::at_most(
                "initial sync (files): bytes sent ≤ 1.05 × allocated".into(),
                Some(files.sent as f64 / files.allocated as f64),
                1.05,
                GoalFormat::Ratio,
            ),
            Goal::at_least(
                "initial sync (files): throughput ≥ 0.8 × quic-link".into(),
                link.map(|l| files.throughput() / l),
                0.8,
            ),
            Goal::at_most(
                "initial sync (loop devices): bytes sent ≤ 1.05 × allocated".into(),
                Some(devices.sent as f64 / devices.allocated as f64),
                1.05,
                GoalFormat::Ratio,
            ),
            Goal::at_least(
                "initial sync (loop devices): throughput ≥ 0.8 × quic-link".into(),
                link.map(|l| devices.throughput() / l),
                0.8,
            ),
        ],
    })
}

struct SyncRun {
    allocated: u64,
    sent: u64,
    payload: u64,
    seconds: f64,
    /// From the first status poll (every 50 ms) that saw the pair `copying` to `active`:
    /// the copy without the pair's setup (roles assigned, the agents connected).
    copying_seconds: Option<f64>,
    /// How long the production device alone takes to read what the sync reads of it
    /// (`fio::device_read_seconds`): a floor of the copy on the production host, which the
    /// quic-link row (memory to memory) is not.
    device_seconds: f64,
}

impl SyncRun {
    fn throughput(&self) -> f64 {
        self.allocated as f64 / 1e6 / self.seconds
    }

    /// The production device's read rate, in allocated data per second.
    fn device_throughput(&self) -> f64 {
        self.allocated as f64 / 1e6 / self.device_seconds
    }

    fn copy_throughput(&self) -> Option<f64> {
        self.copying_seconds
            .map(|s| self.allocated as f64 / 1e6 / s)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "volume_bytes": SYNC_VOLUME,
            "allocated_bytes": self.allocated,
            "stream_bytes_sent": self.sent,
            "payload_bytes_sent": self.payload,
            "seconds": self.seconds,
            "megabytes_per_second": self.throughput(),
            "copying_seconds": self.copying_seconds,
            "copying_megabytes_per_second": self.copy_throughput(),
            "device_read_seconds": self.device_seconds,
            "device_read_megabytes_per_second": self.device_throughput(),
        })
    }
}

fn sync_once(
    env: &mut Env,
    work: &Path,
    dr_work: Option<&Path>,
    bin: &Path,
    devices: bool,
) -> anyhow::Result<SyncRun> {
    let tag = if devices { "dev" } else { "file" };
    let prod_file = work.join(format!("sync-{tag}-prod.img"));
    let dr_file = dr_work.unwrap_or(work).join(format!("sync-{tag}-dr.img"));
    for file in [&prod_file, &dr_file] {
        std::fs::File::create(file)?.set_len(SYNC_VOLUME)?;
    }
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&prod_file)?;
        let mut data = vec![0u8; CHUNK as usize];
        let mut x: u64 = 0x243f_6a88_85a3_08d3;
        for b in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let mut at = 0;
        while at < SYNC_VOLUME {
            file.write_all_at(&data, at)?;
            at += STRIDE;
        }
        file.sync_all()?;
    }
    let allocated = SYNC_VOLUME / STRIDE * CHUNK;
    let prod = if devices {
        env.attach_loop(&prod_file)?
    } else {
        prod_file.display().to_string()
    };
    // A DR volume in memory stays a file: a loop device would do the DR host's writes on
    // kernel workers, which the pinned layout keeps on the production host's CPU.
    let dr = if devices && dr_work.is_none() {
        env.attach_loop(&dr_file)?
    } else {
        dr_file.display().to_string()
    };
    // What the sync reads, read by the device alone before the agents start.
    let data = (!devices).then_some((CHUNK, STRIDE, allocated));
    let device_seconds = fio::device_read_seconds(&prod, data)?;
    let cluster = Cluster::start(
        env,
        work,
        bin,
        &format!("initial-sync-{tag}"),
        ClusterSpec {
            dr_home: dr_work,
            ..Default::default()
        },
    )?;
    cluster.cli_a(&["volume", "add", "--name", "prod", "--path", &prod])?;
    run(Command::new(bin.join("blockrep"))
        .arg("--socket")
        .arg(&cluster.dr_socket)
        .args(["volume", "add", "--name", "dr", "--path", &dr]))?;
    // The coordinator learns of the volumes with the agents' next reports.
    let deadline = Instant::now() + Duration::from_secs(30);
    let created = loop {
        match cluster.json_a(&[
            "pair",
            "create",
            "--volumes",
            "prod,dr",
            "--priority-station",
            "az1",
            "--model",
            "async",
        ]) {
            Ok(created) => break created,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    // Timed on the production agent's own view (the coordinator hears of it with the
    // agent's next report, up to a second later).
    let started = Instant::now();
    let job = created["job_id"].as_str().context("job id")?.to_owned();
    let mut copying_since = None;
    loop {
        check_interrupted()?;
        let state = cluster.pair_state().ok();
        let status = state.as_ref().map(|s| s["replication_status"].clone());
        if status.as_ref().is_some_and(|s| s == "copying") && copying_since.is_none() {
            copying_since = Some(Instant::now());
        }
        if status.is_some_and(|s| s == "active") {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the initial sync did not end in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let copying = copying_since.map(|at| at.elapsed().as_secs_f64());
    cluster.cli_a(&["job", "wait", &job, "--timeout", "60"])?;
    let state = cluster.pair_state()?;
    // The agents and the volumes' files go before the next run (a loop device over a file
    // keeps it until the run ends).
    cluster.stop(env);
    for file in [&prod_file, &dr_file] {
        std::fs::remove_file(file)?;
    }
    Ok(SyncRun {
        allocated,
        sent: state["counters"]["bytes_sent"].as_u64().unwrap_or(0),
        payload: state["counters"]["resync_bytes_sent"].as_u64().unwrap_or(0),
        seconds: elapsed,
        copying_seconds: copying,
        device_seconds,
    })
}

/// An async pair under 1 MiB sequential writes at QD8, fio held to 0.85 × what the link
/// carries (the quic-link row) or the unpaired agent writes, whichever is less, for
/// `seconds`: whether the pair keeps that rate while it replicates (its journal never
/// overflows), and what the production side sent meanwhile. Unthrottled, fio writes at
/// local speed, faster than any link carries, and the journal overflows by design (the pair
/// falls back to its bitmap and catches up), so the matrix row measures the local volume.
pub fn sustained(
    ready: &[Target],
    report: &Report,
    seconds: u32,
) -> anyhow::Result<ScenarioResult> {
    const ONE_M: &str = "seqwrite-1m-qd8";
    let target = ready
        .iter()
        .find(|t| t.kind == Kind::AsyncPair)
        .context("the sustained scenario needs the async-pair target")?;
    let cluster = target
        .cluster
        .as_ref()
        .context("async-pair has its agents")?;
    let link = report
        .median_of(ONE_M, "quic-link")
        .context("the sustained scenario needs the quic-link row")?;
    let local = report
        .median_of(ONE_M, "blockrepd")
        .unwrap_or(f64::INFINITY);
    let ceiling = link.min(local);
    let rate_mb = 0.85 * ceiling;
    let workload = workloads::all()
        .into_iter()
        .find(|w| w.name == ONE_M)
        .expect("a workload of the list");
    cluster.wait_idle()?;
    let before = cluster.counts()?;
    let timing = Timing {
        runtime_s: seconds,
        ramp_s: 1,
    };
    let extra = vec![format!("--rate={}", (rate_mb * 1e6) as u64)];
    let sample = fio::run_with(target, &workload, &timing, &extra)?;
    let after = cluster.counts()?;
    let overflows = after
        .journal_overflows
        .saturating_sub(before.journal_overflows);
    let written = after.bytes_written.saturating_sub(before.bytes_written);
    let sent = after.bytes_sent.saturating_sub(before.bytes_sent);
    let ratio = sample.value / ceiling;
    let markdown = format!(
        "Sustained async replication: 1M sequential writes at QD8 on the async pair for {seconds} s (and 1 s of ramp), fio held to {rate_mb:.0} MB/s (0.85 × min(blockrepd {local:.0}, quic-link {link:.0} MB/s)):\n\n\
         - fio reached {:.0} MB/s, {ratio:.2}× the ceiling;\n\
         - the journal overflowed {overflows} times;\n\
         - the production side wrote {:.0} MB and sent {:.0} MB ({:.3}× written; the stream lags by what its journal holds when fio stops).",
        sample.value,
        written as f64 / 1e6,
        sent as f64 / 1e6,
        sent as f64 / written.max(1) as f64,
    );
    Ok(ScenarioResult {
        name: "sustained",
        summary: format!(
            "{:.0} MB/s ({ratio:.2}× min(blockrepd, quic-link)), {overflows} journal overflows",
            sample.value
        ),
        markdown,
        json: json!({
            "rate_limit_mb_s": rate_mb,
            "achieved_mb_s": sample.value,
            "ceiling_mb_s": ceiling,
            "quic_link_mb_s": link,
            "journal_overflows": overflows,
            "bytes_written": written,
            "bytes_sent": sent,
        }),
        goals: vec![
            Goal::at_least(
                "async pair 1M sequential QD8, fio held to 0.85 × min(blockrepd, quic-link): ≥ 0.8 × that minimum".into(),
                Some(ratio),
                0.8,
            ),
            Goal::at_most(
                "async pair 1M sequential QD8 at that rate: journal overflows".into(),
                Some(overflows as f64),
                0.0,
                GoalFormat::Count,
            ),
        ],
    })
}
