//! `blockrep-bench`: fio on a loop device, every target side by side in one run, a Markdown
//! table on stdout and JSON under `benches/results/`. Run through `scripts/bench.sh`.

mod env;
mod fio;
mod groups;
mod ha;
mod meter;
mod outages;
mod pairs;
mod points;
mod report;
mod scenarios;
mod targets;
mod volumes;
mod workloads;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;

use crate::env::{Env, check_interrupted, is_root, run};
use crate::meter::{HostBusy, Meter};
use crate::report::{Report, Row};

#[derive(Parser)]
#[command(about = "fio benchmarks: blockrepd beside nbdkit and the raw device")]
struct Args {
    /// Longer runs and more repetitions.
    #[arg(long)]
    full: bool,
    /// Repetitions of every (workload, target) pair; the table shows the median.
    #[arg(long)]
    repeats: Option<u32>,
    /// Seconds per fio run (after one second of ramp).
    #[arg(long)]
    runtime: Option<u32>,
    /// Size of the benchmark device in MiB.
    #[arg(long)]
    size_mib: Option<u64>,
    /// Only these targets (comma-separated names); `none` for the scenarios alone.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Only these workloads (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Directory holding the blockrepd and blockrep binaries.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Where the JSON and Markdown results are written.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Scenarios measured after the fio rows (comma-separated): `lag` (async lag at half
    /// the async pair's 4k IOPS; needs the async-pair target), `initial-sync` (a 2 GiB
    /// volume, 25% written), `catch-up` (a link outage under 4k randwrite, then the
    /// catch-up), `backlog` (a 1 GiB backlog caught up), `lossy` (async replication over a
    /// link losing 5% of packets), `limited` (a 1 GiB backlog caught up under a 100 MiB/s
    /// send limit), `compressed` (a 1 GiB half-compressible backlog caught up under a 100
    /// MiB/s limit, compression off and then zstd). The last five need root (network
    /// namespaces, nft).
    /// Consistency groups: `group-failover` (call to writable DR exports, production agent
    /// killed), `group-reprotect` (a 4 GiB pair, 1% written on each side: bytes copied
    /// against the union of both bitmaps), `group-iops` (4k randwrite QD32 on two async
    /// pairs in a group against the same pairs alone, and the cuts' answer holds),
    /// `group-rpo` (an async group's consistent point age and abandoned cut rounds under
    /// 2 × 2000 IOPS and at half the group's maximum, `--lag-seconds` each).
    /// `many-volumes`: `--volumes` sparse volumes on one agent (threads, open files,
    /// memory, restart to serving).
    /// `points`: an async group with points in time (4k randwrite with a retention against
    /// without, undo per GB and per epoch, drill creation on 1 GiB and 8 GiB volumes, drill
    /// reads against DR volume reads).
    /// `ha`: an HA coordinator on a three-member etcd (`--leader-kills` leader kills, each
    /// timed to the new leader's first commit applied; then the group-failover rounds with
    /// the etcd store against redb).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Leader kills of the ha scenario.
    #[arg(long, default_value_t = 10)]
    leader_kills: u32,
    /// Volumes of the many-volumes scenario.
    #[arg(long, default_value_t = 10_000)]
    volumes: u32,
    /// Failover rounds of the group-failover scenario (each fails over, then reprotects).
    #[arg(long, default_value_t = 5)]
    failover_rounds: u32,
    /// Seconds the lag scenario runs.
    #[arg(long, default_value_t = 30)]
    lag_seconds: u32,
    /// Seconds the link is cut in the catch-up scenario.
    #[arg(long, default_value_t = 60)]
    outage_seconds: u64,
    /// Where the run's processes go: `shared` (every CPU for every process) or `pinned`
    /// (the production host's agent, fio, nbdkit and the link test's sender on CPU 0, the
    /// DR agent and the coordinator's witness node on CPU 1; pinned with `taskset` on every
    /// thread, and the threads started later inherit it). The kernel's unbound workqueues,
    /// which do the loop devices' I/O, are kept on CPU 0 for the run (as root). The group
    /// scenarios' node-a is on CPU 0, node-b and the witness on CPU 1.
    #[arg(long, value_enum, default_value_t = env::Layout::Shared)]
    layout: env::Layout,
    /// Where the DR host's volume and its agent's state live: `shared` (on the production
    /// volume's disk, so the DR side's writes take from the production host's device) or
    /// `memory` (on `/dev/shm`: a DR host with a disk of its own, faster than a real one).
    #[arg(long, value_enum, default_value_t = env::DrDisk::Shared)]
    dr_disk: env::DrDisk,
    /// The agents' `cluster.max_udp_payload` (and the link test's): the largest UDP payload
    /// path MTU discovery probes for. Loopback carries any size, so without it the run's
    /// links use the agents' default bound, as on a jumbo-frame network; 1472 is a
    /// 1500-byte Ethernet path.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1200..=6500))]
    max_udp_payload: Option<u16>,
}

fn main() -> std::process::ExitCode {
    match run_bench(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}; everything it set up was removed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The lag scenario's second reading: an async pair cutting epochs this often.
const SHORT_EPOCH_MS: u64 = 500;

fn run_bench(args: Args) -> anyhow::Result<()> {
    env::catch_interrupts()?;
    env::set_layout(args.layout);
    env::set_dr_disk(args.dr_disk);
    if let Some(bytes) = args.max_udp_payload {
        env::set_max_udp_payload(bytes);
    }
    let repeats = args.repeats.unwrap_or(if args.full { 5 } else { 3 });
    let timing = fio::Timing {
        runtime_s: args.runtime.unwrap_or(if args.full { 15 } else { 4 }),
        ramp_s: 1,
    };
    let size = args.size_mib.unwrap_or(if args.full { 4096 } else { 1024 }) << 20;
    let bin = std::path::absolute(&args.bin)?;
    for binary in ["blockrepd", "blockrep"] {
        if !bin.join(binary).exists() {
            bail!(
                "{} missing: build with `cargo build --release --bins`",
                bin.join(binary).display()
            );
        }
    }
    let root = is_root();
    if !root {
        eprintln!(
            "bench: not root: using a plain file instead of a loop device, and skipping the kernel-path target"
        );
    }
    // `--targets none`: only the scenarios.
    let specs: Vec<_> = targets::all()
        .into_iter()
        .filter(|s| args.targets.is_empty() || args.targets.iter().any(|t| t == s.name))
        .filter(|s| root || !s.needs_root)
        .collect();
    let workloads: Vec<_> = workloads::all()
        .into_iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
        .collect();
    let no_matrix = args.targets.iter().any(|t| t == "none");
    if (specs.is_empty() || workloads.is_empty()) && !no_matrix {
        bail!("no targets or no workloads selected");
    }

    // Taken before the runs: the commit and date describe what was measured.
    let machine = machine_info(&timing, repeats, size, root, args.full);
    let mut env = Env::default();
    if root {
        env.confine_kernel_work()?;
    }
    let work = env.temp_dir()?;
    eprintln!("bench: preparing a {} MiB device", size >> 20);
    let device = targets::prepare_device(&mut env, &work, size, root)?;
    let pairs_selected = specs.iter().any(|s| {
        matches!(
            s.kind,
            targets::Kind::AsyncPair | targets::Kind::HypermetroPair
        )
    }) || args
        .scenarios
        .iter()
        .any(|s| ["catch-up", "backlog", "lossy", "limited", "compressed"].contains(&s.as_str()));
    let dr_work = match env::dr_disk() {
        env::DrDisk::Shared => None,
        env::DrDisk::Memory => Some(env.temp_dir_in(std::path::Path::new("/dev/shm"))?),
    };
    let dr_device = if pairs_selected {
        Some(targets::prepare_dr_device(
            &mut env,
            dr_work.as_deref().unwrap_or(&work),
            size,
        )?)
    } else {
        None
    };
    let paths = targets::Paths {
        device: &device,
        dr_device: dr_device.as_deref(),
        work: &work,
        dr_work: dr_work.as_deref(),
        bin: &bin,
    };
    let mut ready = Vec::new();
    for spec in &specs {
        check_interrupted()?;
        let mut setup = targets::Setup::new(&mut env, paths);
        ready.push(
            setup
                .target(spec)
                .with_context(|| format!("set up target {}", spec.name))?,
        );
    }

    let mut rows: Vec<Row> = workloads
        .iter()
        .flat_map(|w| {
            ready.iter().map(|t| Row {
                workload: w.clone(),
                target: t.name,
                target_title: t.title,
                samples: Vec::new(),
                journal_limit: t
                    .cluster
                    .as_ref()
                    .filter(|_| t.kind != targets::Kind::QuicLink)
                    .and_then(|c| c.journal_limit()),
            })
        })
        .collect();
    // Repetitions outermost and targets innermost, so drift on a noisy machine hits every
    // target alike. The target order rotates each repetition: a run right after a heavy
    // writer pays for the host's write-back, and no target should always be that run.
    for rep in 0..repeats {
        for (wi, workload) in workloads.iter().enumerate() {
            for ti in (0..ready.len()).map(|i| (i + rep as usize) % ready.len()) {
                let target = &ready[ti];
                check_interrupted()?;
                if target.kind == targets::Kind::QuicLink
                    && workload.figure != workloads::Figure::MegabytesPerSecond
                {
                    continue;
                }
                // Every pair settles first, not just this target's: an async pair still
                // catching up from its own run would take CPU from this one.
                for cluster in ready
                    .iter()
                    .filter(|t| t.kind != targets::Kind::QuicLink)
                    .filter_map(|t| t.cluster.as_ref())
                {
                    cluster
                        .wait_idle()
                        .context("wait for the pairs to settle")?;
                }
                settle(root)?;
                let sample = run_once(target, workload, &timing)?;
                eprintln!(
                    "bench: [{}/{repeats}] {:<22} {:<18} {:>10.0} {}",
                    rep + 1,
                    workload.name,
                    target.name,
                    sample.value,
                    if workload.figure == workloads::Figure::Iops {
                        "IOPS"
                    } else {
                        "MB/s"
                    }
                );
                rows[wi * ready.len() + ti].samples.push(sample);
            }
        }
    }
    rows.retain(|r| !r.samples.is_empty());
    let mut report = Report {
        rows,
        scenarios: Vec::new(),
    };
    for scenario in &args.scenarios {
        check_interrupted()?;
        let result = match scenario.as_str() {
            "lag" => {
                let shorter = if dr_device.is_some() {
                    let mut setup = targets::Setup::new(&mut env, paths);
                    Some(setup.async_pair_with_epochs(SHORT_EPOCH_MS)?)
                } else {
                    None
                };
                scenarios::lag(
                    &ready,
                    &report,
                    args.lag_seconds,
                    shorter.as_ref().map(|t| (t, SHORT_EPOCH_MS)),
                )?
            }
            "initial-sync" => {
                scenarios::initial_sync(&mut env, &work, dr_work.as_deref(), &bin, &report)?
            }
            "sustained" => scenarios::sustained(&ready, &report, args.lag_seconds)?,
            "catch-up" | "backlog" | "lossy" | "limited" | "compressed" => {
                let mut setup = targets::Setup::new(&mut env, paths);
                match scenario.as_str() {
                    "catch-up" => outages::catch_up(&mut setup, &report, args.outage_seconds)?,
                    "backlog" => outages::backlog(&mut setup, &report)?,
                    "limited" => outages::limited(&mut setup, 100)?,
                    "compressed" => outages::compressed(&mut setup, 100)?,
                    _ => outages::lossy(&mut setup, &report)?,
                }
            }
            "group-failover" => groups::failover(&mut env, &work, &bin, args.failover_rounds)?,
            "group-reprotect" => groups::reprotect(&mut env, &work, &bin)?,
            "group-iops" => groups::iops(&mut env, &work, &bin, repeats, timing.runtime_s)?,
            "group-rpo" => groups::rpo(&mut env, &work, &bin, args.lag_seconds)?,
            "many-volumes" => volumes::many(&mut env, &work, &bin, args.volumes)?,
            "points" => points::points(&mut env, &work, &bin, repeats, timing.runtime_s)?,
            "ha" => ha::ha(
                &mut env,
                &work,
                &bin,
                args.leader_kills,
                args.failover_rounds,
            )?,
            other => bail!(
                "unknown scenario {other:?} (lag, sustained, initial-sync, catch-up, backlog, lossy, limited, group-failover, group-reprotect, group-iops, group-rpo, many-volumes, points, ha)"
            ),
        };
        eprintln!("bench: scenario {scenario}: {}", result.summary);
        report.scenarios.push(result);
    }
    drop(ready);
    drop(env);

    let table = report.markdown();
    let goals = report.goals_markdown();
    let scenario_text = report.scenarios_markdown();
    println!("{table}\n{goals}{scenario_text}");
    std::fs::create_dir_all(&args.out)?;
    let stem = format!(
        "{}-{}",
        machine["date"].as_str().unwrap_or("run").replace(':', ""),
        machine["commit"].as_str().unwrap_or("unknown")
    );
    let json_path = args.out.join(format!("{stem}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report.json(machine.clone()))?,
    )?;
    let md = format!("{}\n\n{table}\n{goals}{scenario_text}", describe(&machine));
    std::fs::write(args.out.join(format!("{stem}.md")), md)?;
    eprintln!("bench: results in {}", json_path.display());
    Ok(())
}

/// One run of `workload` on `target` (a link test for the link target), with what it cost
/// each host until a pair had sent and applied everything the run wrote.
fn run_once(
    target: &targets::Target,
    workload: &workloads::Workload,
    timing: &fio::Timing,
) -> anyhow::Result<fio::Sample> {
    let pair = target
        .cluster
        .as_ref()
        .filter(|_| target.kind != targets::Kind::QuicLink);
    let sent = || pair.map(|c| c.counts()).transpose();
    let meter = Meter::start(target.production_pid, target.dr_pid, sent()?);
    // The steady part of the run, where the production CPU's busy share is sampled: from
    // half a second past the start (and fio's ramp) for the runtime less a second: it
    // ends inside the counted time when the start-up takes at most half a second. A run of
    // less than 2 s is not sampled.
    let start_up = Duration::from_millis(500);
    let steady = Duration::from_secs(u64::from(timing.runtime_s.saturating_sub(1)));
    let skip = match target.kind {
        targets::Kind::QuicLink => start_up,
        _ => Duration::from_secs(u64::from(timing.ramp_s)) + start_up,
    };
    let busy = HostBusy::start(skip, steady);
    match (&target.cluster, target.kind) {
        (Some(cluster), targets::Kind::QuicLink) => {
            let link = cluster.link_test(timing.runtime_s)?;
            let mut cost = meter.finish(None);
            cost.production.cpu_s = Some(link.sender_cpu_s);
            cost.replicated_bytes = Some(link.bytes);
            cost.production_host_busy = busy.share();
            Ok(fio::Sample {
                value: link.megabytes_per_second,
                p50_us: f64::NAN,
                p99_us: f64::NAN,
                cost,
            })
        }
        _ => {
            let mut sample = fio::run(target, workload, timing)?;
            if let Some(cluster) = pair {
                cluster.wait_idle().context("wait for the pair to settle")?;
            }
            sample.cost = meter.finish(sent()?);
            sample.cost.production_host_busy = busy.share();
            Ok(sample)
        }
    }
}

/// Same starting point for every run: dirty pages written back and caches dropped.
fn settle(root: bool) -> anyhow::Result<()> {
    run(&mut Command::new("sync"))?;
    if root {
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop caches")?;
    }
    Ok(())
}

fn machine_info(
    timing: &fio::Timing,
    repeats: u32,
    size: u64,
    root: bool,
    full: bool,
) -> serde_json::Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let git = |args: &[&str]| {
        run(Command::new("git").args(args))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let commit = format!(
        "{}{}",
        git(&["rev-parse", "--short", "HEAD"]),
        if dirty { "-dirty" } else { "" }
    );
    json!({
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "commit": commit,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "memory_gib": std::fs::read_to_string("/proc/meminfo").ok()
            .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
            .map(|kib| kib >> 20),
        "kernel": nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        "fio": fio::version(),
        "mode": if full { "full" } else { "quick" },
        "runtime_s": timing.runtime_s,
        "ramp_s": timing.ramp_s,
        "repeats": repeats,
        "device_bytes": size,
        "device": if root { "loop device (direct-io=on) over a preallocated file" } else { "preallocated file (not root)" },
        "dr_disk": match env::dr_disk() {
            env::DrDisk::Shared => "shared with the production volume",
            env::DrDisk::Memory => "memory (/dev/shm): the DR volume (a file, no loop device) and the DR agent's state",
        },
        "max_udp_payload": match env::max_udp_payload() {
            Some(bytes) => format!("{bytes} bytes (cluster.max_udp_payload)"),
            None => "the agents' default bound (loopback carries it whole)".to_string(),
        },
        "layout": match env::layout() {
            env::Layout::Shared => "shared: every process on every CPU",
            env::Layout::Pinned if root => "pinned (taskset on every thread): production host (agent, fio, nbdkit, link-test sender, and the kernel's unbound workqueues, which do the loop devices' I/O) on CPU 0, DR agent and the coordinator's witness node on CPU 1",
            env::Layout::Pinned => "pinned (taskset on every thread): production host (agent, fio, nbdkit, link-test sender) on CPU 0, DR agent and the coordinator's witness node on CPU 1; the kernel's workqueues unconfined (not root)",
        },
    })
}

fn describe(m: &serde_json::Value) -> String {
    format!(
        "{} · commit {} · {} CPUs ({}) · kernel {} · {} · {} mode: {} × {} s per row, {} MiB {} · layout {} · DR disk {} · UDP payload {}",
        m["date"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["fio"].as_str().unwrap_or(""),
        m["mode"].as_str().unwrap_or(""),
        m["repeats"],
        m["runtime_s"],
        m["device_bytes"].as_u64().unwrap_or(0) >> 20,
        m["device"].as_str().unwrap_or(""),
        m["layout"].as_str().unwrap_or(""),
        m["dr_disk"].as_str().unwrap_or(""),
        m["max_udp_payload"].as_str().unwrap_or(""),
    )
}
