//! Pairs under faults, measured: the link between the two agents cut and restored, and
//! spoiled by packet loss. Both agents run in a network namespace of the run, where nft
//! rules touch nothing outside it; each scenario has an async pair of its own on the
//! shared devices (initial sync done over a clean link before the fault).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::env::{check_interrupted, run};
use crate::pairs::{Cluster, ClusterSpec};
use crate::report::{Goal, GoalFormat, Report, ScenarioResult};
use crate::targets::Setup;

const GIB: u64 = 1 << 30;

/// The production side's counters at one instant.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    status_active: bool,
    status_copying: bool,
    out_of_sync: u64,
    bytes_sent: u64,
    resync_bytes_sent: u64,
    /// Bytes NBD clients wrote to the production volume.
    written: u64,
}

impl Reading {
    fn take(cluster: &Cluster) -> anyhow::Result<Self> {
        let pair = cluster.pair_state()?;
        let volumes = cluster.json_a(&["volume", "list"])?;
        let written = volumes
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "prod"))
            .and_then(|v| v["bytes_written"].as_u64())
            .context("the production volume's bytes_written")?;
        let counter = |name: &str| pair["counters"][name].as_u64().unwrap_or(0);
        Ok(Self {
            at: Instant::now(),
            status_active: pair["replication_status"] == "active",
            status_copying: pair["replication_status"] == "copying",
            out_of_sync: pair["out_of_sync_bytes"].as_u64().unwrap_or(0),
            bytes_sent: counter("bytes_sent"),
            resync_bytes_sent: counter("resync_bytes_sent"),
            written,
        })
    }
}

/// nft in the agents' namespace: a chain that drops the DR agent's UDP both ways (a cut),
/// or a share of all UDP (loss; on loopback every packet passes the output hook once).
struct Firewall<'a> {
    cluster: &'a Cluster,
    dr_port: String,
}

impl<'a> Firewall<'a> {
    fn new(cluster: &'a Cluster) -> anyhow::Result<Self> {
        let dr_port = cluster
            .dr_address
            .rsplit(':')
            .next()
            .context("DR agent port")?
            .to_owned();
        let fw = Self { cluster, dr_port };
        fw.nft("add table inet bench")?;
        fw.nft("add chain inet bench out { type filter hook output priority 0 ; }")?;
        Ok(fw)
    }

    fn nft(&self, rule: &str) -> anyhow::Result<()> {
        run(self.cluster.in_netns("nft").args(rule.split_whitespace()))?;
        Ok(())
    }

    fn cut(&self) -> anyhow::Result<()> {
        self.nft(&format!(
            "add rule inet bench out udp dport {} drop",
            self.dr_port
        ))?;
        self.nft(&format!(
            "add rule inet bench out udp sport {} drop",
            self.dr_port
        ))
    }

    fn lose_percent(&self, percent: u32) -> anyhow::Result<()> {
        self.nft(&format!(
            "add rule inet bench out meta l4proto udp numgen random mod 100 < {percent} drop"
        ))
    }

    fn heal(&self) -> anyhow::Result<()> {
        self.nft("flush chain inet bench out")
    }
}

/// fio in the background, its jobs threads of the one process, stopped on drop: SIGTERM,
/// then SIGKILL if it is still there after a while (a job whose NBD server died can spin
/// without ever seeing the signal; as a process of its own it would outlive a kill).
pub struct BackgroundFio(Child);

impl BackgroundFio {
    fn start(cluster: &Cluster, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(std::slice::from_ref(&cluster.uri), args)
    }

    /// One job per URI, each with `args`.
    pub fn start_on(uris: &[String], args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = crate::env::on_host(crate::env::Host::Production, "fio");
        cmd.args([
            "--ioengine=nbd",
            "--thread",
            "--time_based",
            "--runtime=3600",
        ])
        .args(args);
        for (i, uri) in uris.iter().enumerate() {
            cmd.arg(format!("--name=background{i}"))
                .arg(format!("--uri={uri}"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start fio")?;
        Ok(Self(child))
    }

    /// Ends fio at once, with SIGKILL: fio writing to a server that died does not end on
    /// SIGTERM, and the drop's 5 s of patience would pass before the next step.
    pub fn kill_now(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.0.try_wait()? {
            bail!("the background fio exited ({status})");
        }
        Ok(())
    }
}

impl Drop for BackgroundFio {
    fn drop(&mut self) {
        // Reaped already (by `kill_now`, or it ended and was waited for): its pid may be
        // another process's by now.
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// fio writing `bytes` once, sequentially in 1 MiB requests at QD8, to completion, with
/// `data` saying what the buffers hold (fio's options; none: fio's random data).
fn write_once(cluster: &Cluster, bytes: u64, data: &[&str]) -> anyhow::Result<()> {
    run(crate::env::on_host(crate::env::Host::Production, "fio")
        .arg("--name=backlog")
        .args(["--ioengine=nbd", &format!("--uri={}", cluster.uri)])
        .args(["--rw=write", "--bs=1M", "--iodepth=8", "--numjobs=1"])
        .args(data)
        .arg(format!("--size={bytes}")))?;
    Ok(())
}

fn wait_for(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&Reading) -> bool,
) -> anyhow::Result<Reading> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Ok(r) = Reading::take(cluster)
            && done(&r)
        {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sleep_checked(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(200).min(end - Instant::now()));
    }
    Ok(())
}

/// From the link's return to the pair active: the readings at the return, at the first
/// sight of `copying`, and at `active`.
struct Recovery {
    restored: Reading,
    copying: Reading,
    active: Reading,
}

impl Recovery {
    fn after_heal(cluster: &Cluster, firewall: &Firewall<'_>) -> anyhow::Result<Self> {
        let restored = Reading::take(cluster)?;
        firewall.heal()?;
        eprintln!(
            "bench: link restored with {} MiB dirty",
            restored.out_of_sync >> 20
        );
        let copying = wait_for(
            cluster,
            "the catch-up to start",
            Duration::from_secs(120),
            |r| r.status_copying || r.status_active,
        )?;
        let active = wait_for(
            cluster,
            "the pair to be active",
            Duration::from_secs(1800),
            |r| r.status_active,
        )?;
        Ok(Self {
            restored,
            copying,
            active,
        })
    }

    /// A 1 GiB backlog made with the link cut (1 MiB sequential writes), then the link
    /// restored: the catch-up.
    fn of_a_backlog(cluster: &Cluster) -> anyhow::Result<Self> {
        Self::of_a_backlog_of(cluster, &[])
    }

    /// As [`Recovery::of_a_backlog`], the backlog's data as fio's `data` options say.
    fn of_a_backlog_of(cluster: &Cluster, data: &[&str]) -> anyhow::Result<Self> {
        let firewall = Firewall::new(cluster)?;
        firewall.cut()?;
        wait_for(
            cluster,
            "the pair to leave active",
            Duration::from_secs(60),
            |r| !r.status_active,
        )?;
        write_once(cluster, GIB, data)?;
        wait_for(cluster, "a 1 GiB backlog", Duration::from_secs(60), |r| {
            r.out_of_sync >= GIB
        })?;
        Self::after_heal(cluster, &firewall)
    }

    fn seconds_to_active(&self) -> f64 {
        (self.active.at - self.restored.at).as_secs_f64()
    }

    fn seconds_to_copying(&self) -> f64 {
        (self.copying.at - self.restored.at).as_secs_f64()
    }

    /// Seconds the pair was `copying`.
    fn seconds_copying(&self) -> f64 {
        (self.active.at - self.copying.at).as_secs_f64()
    }

    /// Data brought up to date per second while the pair was `copying` (the backlog, not
    /// the bytes on the wire).
    fn data_throughput(&self) -> f64 {
        self.restored.out_of_sync as f64 / 1e6 / self.seconds_copying()
    }

    /// Resync payload per second while the pair was `copying`.
    fn catch_up_throughput(&self) -> f64 {
        let bytes = self.active.resync_bytes_sent - self.restored.resync_bytes_sent;
        bytes as f64 / 1e6 / (self.active.at - self.copying.at).as_secs_f64()
    }

    fn sent(&self) -> u64 {
        self.active.bytes_sent - self.restored.bytes_sent
    }

    fn written_during(&self) -> u64 {
        self.active.written - self.restored.written
    }

    fn json(&self) -> Value {
        json!({
            "data_megabytes_per_second": self.data_throughput(),
            "dirty_bytes_at_restore": self.restored.out_of_sync,
            "bytes_written_until_active": self.written_during(),
            "stream_bytes_sent_until_active": self.sent(),
            "resync_bytes_sent": self.active.resync_bytes_sent - self.restored.resync_bytes_sent,
            "seconds_restore_to_copying": self.seconds_to_copying(),
            "seconds_restore_to_active": self.seconds_to_active(),
            "catch_up_megabytes_per_second": self.catch_up_throughput(),
        })
    }
}

/// An async pair whose agents run in a network namespace of their own, with `extra` in
/// their configuration and `cluster_extra` in its `[cluster]` section.
fn pair_in_netns(
    setup: &mut Setup<'_>,
    name: &str,
    extra: &str,
    cluster_extra: &str,
) -> anyhow::Result<Cluster> {
    let ns = setup.env.netns(name)?;
    setup.pair_cluster_spec(
        name,
        ClusterSpec {
            model: Some("async"),
            extra,
            cluster_extra,
            netns: Some(&ns),
            ..Default::default()
        },
    )
}

/// An async pair under 4k randwrite QD32 at half the async pair's maximum IOPS; the link
/// is cut for `outage_s` seconds, then restored: what the catch-up sends against what was
/// dirty at the restore plus what the workload wrote until the pair was active again, and
/// how fast it copies against the quic-link row.
pub fn catch_up(
    setup: &mut Setup<'_>,
    report: &Report,
    outage_s: u64,
) -> anyhow::Result<ScenarioResult> {
    let link = report.median_of("seqwrite-1m-qd8", "quic-link");
    let rate = report
        .median_of("randwrite-4k-qd32", "async-pair")
        .map_or(10_000, |iops| (iops / 2.0).round() as u64);
    let cluster = pair_in_netns(setup, "catch-up", "", "")?;
    let firewall = Firewall::new(&cluster)?;
    let rate_arg = format!("--rate_iops={rate}");
    let mut fio = BackgroundFio::start(
        &cluster,
        &["--rw=randwrite", "--bs=4k", "--iodepth=32", &rate_arg],
    )?;
    sleep_checked(Duration::from_secs(5))?;
    fio.check_running()?;
    let cut_at = Instant::now();
    firewall.cut()?;
    eprintln!("bench: link cut for {outage_s} s");
    let tripped = wait_for(
        &cluster,
        "the pair to leave active",
        Duration::from_secs(60),
        |r| !r.status_active,
    )?;
    let trip_seconds = (tripped.at - cut_at).as_secs_f64();
    let rss_at_trip = crate::env::rss(cluster.production_pid).unwrap_or(0);
    sleep_checked(Duration::from_secs(outage_s).saturating_sub(cut_at.elapsed()))?;
    fio.check_running()?;
    let rss_at_restore = crate::env::rss(cluster.production_pid).unwrap_or(0);
    let recovery = Recovery::after_heal(&cluster, &firewall)?;
    fio.check_running()?;
    drop(fio);
    drop(firewall);
    cluster.stop(setup.env);

    let owed = recovery.restored.out_of_sync + recovery.written_during();
    let ratio = recovery.sent() as f64 / owed as f64;
    let throughput = recovery.catch_up_throughput();
    let markdown = format!(
        "Catch-up after a {outage_s} s link outage (nft drops the DR agent's UDP both ways) under 4k randwrite QD32 at {rate} IOPS, async pair:\n\n\
         - the pair left `active` {trip_seconds:.1} s after the cut (peer timeout 5 s); the production agent's resident memory was {} MiB then and {} MiB at the restore;\n\
         - at the restore {:.1} MB were dirty; the workload wrote {:.1} MB more until the pair was `active`, {:.1} s after the restore ({:.1} s of it reconnecting);\n\
         - the stream carried {:.1} MB: {ratio:.3}× what was owed (dirty at the restore plus written since);\n\
         - the catch-up copied at {throughput:.0} MB/s{}.",
        rss_at_trip >> 20,
        rss_at_restore >> 20,
        recovery.restored.out_of_sync as f64 / 1e6,
        recovery.written_during() as f64 / 1e6,
        recovery.seconds_to_active(),
        recovery.seconds_to_copying(),
        recovery.sent() as f64 / 1e6,
        link.map_or(String::new(), |l| format!(
            " ({:.2}× the quic-link row's {l:.0} MB/s)",
            throughput / l
        )),
    );
    let mut json = recovery.json();
    json["outage_seconds"] = json!(outage_s);
    json["rate_iops"] = json!(rate);
    json["seconds_cut_to_inactive"] = json!(trip_seconds);
    json["production_rss_bytes_at_trip"] = json!(rss_at_trip);
    json["production_rss_bytes_at_restore"] = json!(rss_at_restore);
    json["quic_link_megabytes_per_second"] = json!(link);
    Ok(ScenarioResult {
        name: "catch-up",
        summary: format!(
            "sent {ratio:.3}× owed; catch-up {throughput:.0} MB/s; active {:.1} s after the restore",
            recovery.seconds_to_active()
        ),
        markdown,
        json,
        goals: vec![
            Goal::at_most(
                "catch-up: bytes sent ≤ 1.05 × (dirty at the restore + written during)".into(),
                Some(ratio),
                1.05,
                GoalFormat::Ratio,
            ),
            Goal::at_least(
                "catch-up: throughput ≥ 0.8 × quic-link".into(),
                link.map(|l| throughput / l),
                0.8,
            ),
        ],
    })
}

/// 1 GiB written while the link is cut, no other load: time from the link's return to the
/// pair `active`, and the catch-up's throughput.
pub fn backlog(setup: &mut Setup<'_>, report: &Report) -> anyhow::Result<ScenarioResult> {
    let link = report.median_of("seqwrite-1m-qd8", "quic-link");
    let cluster = pair_in_netns(setup, "backlog", "", "")?;
    let recovery = Recovery::of_a_backlog(&cluster)?;
    cluster.stop(setup.env);
    let throughput = recovery.catch_up_throughput();
    let markdown = format!(
        "A 1 GiB backlog (1 MiB sequential writes while the link was cut), then the link restored, async pair, no other load: `active` {:.2} s after the restore ({:.2} s reconnecting, {:.2} s copying {:.1} MB at {throughput:.0} MB/s{}).",
        recovery.seconds_to_active(),
        recovery.seconds_to_copying(),
        recovery.seconds_to_active() - recovery.seconds_to_copying(),
        recovery.restored.out_of_sync as f64 / 1e6,
        link.map_or(String::new(), |l| format!(
            ", {:.2}× the quic-link row",
            throughput / l
        )),
    );
    Ok(ScenarioResult {
        name: "backlog",
        summary: format!(
            "1 GiB backlog: active {:.2} s after the restore, {throughput:.0} MB/s",
            recovery.seconds_to_active()
        ),
        markdown,
        json: recovery.json(),
        goals: Vec::new(),
    })
}

/// A 1 GiB backlog caught up under the agent's send limit (`replication.max_bytes_per_sec`
/// = `limit_mib` MiB/s): how close the catch-up's rate stays to the limit.
pub fn limited(setup: &mut Setup<'_>, limit_mib: u64) -> anyhow::Result<ScenarioResult> {
    let extra = format!("[replication]\nmax_bytes_per_sec = \"{limit_mib}MiB\"\n");
    let cluster = pair_in_netns(setup, "limited", &extra, "")?;
    let recovery = Recovery::of_a_backlog(&cluster)?;
    cluster.stop(setup.env);
    let limit = (limit_mib << 20) as f64 / 1e6;
    let rate = recovery.catch_up_throughput();
    let off = (rate / limit - 1.0).abs();
    Ok(ScenarioResult {
        name: "limited",
        summary: format!(
            "1 GiB catch-up under a {limit_mib} MiB/s send limit: {rate:.1} MB/s, {:.1}% off the limit",
            off * 100.0
        ),
        markdown: format!(
            "A 1 GiB backlog caught up under `replication.max_bytes_per_sec = \"{limit_mib}MiB\"` ({limit:.1} MB/s): {rate:.1} MB/s while copying ({:.1}% off the limit), `active` {:.2} s after the restore.",
            off * 100.0,
            recovery.seconds_to_active()
        ),
        json: json!({"limit_megabytes_per_second": limit, "catch_up": recovery.json(), "off_the_limit": off}),
        goals: vec![Goal::at_most(
            format!("a catch-up under a {limit_mib} MiB/s send limit stays within 5% of it"),
            Some(off),
            0.05,
            GoalFormat::Percent,
        )],
    })
}

/// A 1 GiB backlog of half-compressible data (fio `buffer_compress_percentage=50`) caught
/// up under a `limit_mib` MiB/s send limit, with `replication.compression` off and then
/// zstd: how much faster the data moves compressed.
pub fn compressed(setup: &mut Setup<'_>, limit_mib: u64) -> anyhow::Result<ScenarioResult> {
    const DATA: &[&str] = &["--buffer_compress_percentage=50", "--refill_buffers"];
    let mut runs = Vec::new();
    for compression in ["off", "zstd"] {
        let extra = format!(
            "[replication]\nmax_bytes_per_sec = \"{limit_mib}MiB\"\ncompression = \"{compression}\"\n"
        );
        let name = format!("compressed-{compression}");
        let cluster = pair_in_netns(setup, &name, &extra, "")?;
        let recovery = Recovery::of_a_backlog_of(&cluster, DATA)?;
        cluster.stop(setup.env);
        eprintln!(
            "bench: compression {compression}: {:.1} MB/s of data, {:.1} MB on the wire",
            recovery.data_throughput(),
            recovery.sent() as f64 / 1e6
        );
        runs.push((compression, recovery));
    }
    let (off, zstd) = (&runs[0].1, &runs[1].1);
    let gain = zstd.data_throughput() / off.data_throughput();
    let line = |(name, r): &(&str, Recovery)| {
        format!(
            "{name}: {:.1} MB/s of data, {:.0} MB on the wire for {:.0} MB dirty, `active` {:.2} s after the restore",
            r.data_throughput(),
            r.sent() as f64 / 1e6,
            r.restored.out_of_sync as f64 / 1e6,
            r.seconds_to_active()
        )
    };
    Ok(ScenarioResult {
        name: "compressed",
        summary: format!(
            "1 GiB half-compressible catch-up under a {limit_mib} MiB/s limit: zstd {gain:.2}× off"
        ),
        markdown: format!(
            "A 1 GiB backlog of half-compressible data (fio `buffer_compress_percentage=50`) caught up under a {limit_mib} MiB/s send limit. {}; {}: zstd moves the data {gain:.2}× as fast.",
            line(&runs[0]),
            line(&runs[1]),
        ),
        json: json!({
            "limit_mib_per_second": limit_mib,
            "off": off.json(),
            "zstd": zstd.json(),
            "gain": gain,
        }),
        goals: vec![Goal::at_least(
            format!(
                "half-compressible catch-up under a {limit_mib} MiB/s limit: zstd ≥ 1.5 × without compression"
            ),
            Some(gain),
            1.5,
        )],
    })
}

/// One lossy-link reading: what `blockrep cluster link-test` moves, and how long 1 GiB of
/// writes takes to reach the DR volume (fio start to the DR side applied all).
struct LossRun {
    label: &'static str,
    link_test: f64,
    replicated: f64,
}

fn loss_run(
    setup: &mut Setup<'_>,
    label: &'static str,
    congestion_control: &str,
    percent: u32,
) -> anyhow::Result<LossRun> {
    let name = format!("loss-{percent}-{congestion_control}");
    let extra = format!("congestion_control = \"{congestion_control}\"");
    let cluster = pair_in_netns(setup, &name, "", &extra)?;
    let firewall = Firewall::new(&cluster)?;
    if percent > 0 {
        firewall.lose_percent(percent)?;
    }
    let link_test = cluster
        .link_test_with(5, congestion_control)?
        .megabytes_per_second;
    let started = Instant::now();
    write_once(&cluster, GIB, &[])?;
    cluster.wait_idle()?;
    let replicated = GIB as f64 / 1e6 / started.elapsed().as_secs_f64();
    drop(firewall);
    cluster.stop(setup.env);
    Ok(LossRun {
        label,
        link_test,
        replicated,
    })
}

/// Async replication over a link dropping 5% of UDP packets both ways, with each congestion
/// controller, against the same pair over a clean link and the quic-link row.
pub fn lossy(setup: &mut Setup<'_>, report: &Report) -> anyhow::Result<ScenarioResult> {
    let link = report.median_of("seqwrite-1m-qd8", "quic-link");
    let runs = vec![
        loss_run(setup, "no loss, cubic", "cubic", 0)?,
        loss_run(setup, "5% loss, cubic", "cubic", 5)?,
        loss_run(setup, "5% loss, bbr", "bbr", 5)?,
    ];
    let ratio = |v: f64| link.map(|l| v / l);
    let mut markdown = String::from(
        "Async replication over a lossy link: nft drops 5% of UDP packets both ways between the agents. 1 GiB written with fio (1 MiB, QD8), timed from fio's start until the DR side applied it all; and `blockrep cluster link-test` (5 s) over the same link.\n",
    );
    for r in &runs {
        markdown.push_str(&format!(
            "\n- {}: replicated {:.0} MB/s{}; link test {:.0} MB/s.",
            r.label,
            r.replicated,
            ratio(r.replicated).map_or(String::new(), |x| format!(" ({x:.2}× the quic-link row)")),
            r.link_test,
        ));
    }
    Ok(ScenarioResult {
        name: "lossy",
        summary: runs
            .iter()
            .map(|r| format!("{}: {:.0} MB/s", r.label, r.replicated))
            .collect::<Vec<_>>()
            .join("; "),
        markdown,
        json: json!({
            "loss_percent": 5,
            "quic_link_megabytes_per_second": link,
            "runs": runs.iter().map(|r| json!({
                "label": r.label,
                "replicated_megabytes_per_second": r.replicated,
                "ratio_to_quic_link": ratio(r.replicated),
                "link_test_megabytes_per_second": r.link_test,
            })).collect::<Vec<_>>(),
        }),
        goals: Vec::new(),
    })
}
