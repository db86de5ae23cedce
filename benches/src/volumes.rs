//! Many volumes on one agent, as a new user tries it: `volumes` sparse volumes added one
//! after the other with the CLI, then the agent restarted. What it costs: the time to add
//! them, the agent's threads, open files and resident memory, and the time from its start
//! to serving them all again.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use crate::env::{Env, Host, check_interrupted, run};
use crate::report::{Goal, GoalFormat, ScenarioResult};

/// What the agent holds at a moment.
#[derive(Clone, Copy, Debug)]
struct Held {
    threads: u64,
    open_files: u64,
    rss_mib: f64,
}

impl Held {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .context("Threads in /proc/PID/status")?;
        let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        let rss = crate::env::rss(pid).context("the agent's RSS")?;
        Ok(Self {
            threads,
            open_files,
            rss_mib: rss as f64 / f64::from(1 << 20),
        })
    }

    fn json(&self) -> serde_json::Value {
        json!({"threads": self.threads, "open_files": self.open_files, "rss_mib": self.rss_mib})
    }
}

/// Open files an agent holds per volume (its backing, bitmap, activity log, NBD socket).
const FILES_PER_VOLUME: u64 = 4;
/// Open files an agent holds beside its volumes, with room to spare.
const FILES_BESIDE: u64 = 1024;

/// Raises the open files limit the agent inherits so it can hold `volumes` volumes, as far
/// as the system lets this process (raising the hard limit needs `CAP_SYS_RESOURCE`);
/// returns how many volumes fit.
fn raise_open_files(volumes: u32) -> anyhow::Result<u32> {
    let want = u64::from(volumes) * FILES_PER_VOLUME + FILES_BESIDE;
    // SAFETY: getrlimit and setrlimit touch only the struct they are given.
    let hard = unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        anyhow::ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "cannot read the open files limit"
        );
        let raised = libc::rlimit {
            rlim_cur: want.max(limit.rlim_cur),
            rlim_max: want.max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return Ok(volumes);
        }
        let soft = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        limit.rlim_max
    };
    let fit = (hard.saturating_sub(FILES_BESIDE) / FILES_PER_VOLUME) as u32;
    eprintln!(
        "bench: the open files limit here is {hard} (raising it needs CAP_SYS_RESOURCE): {} of the {volumes} volumes fit",
        fit.min(volumes)
    );
    Ok(fit.min(volumes))
}

pub fn many(env: &mut Env, work: &Path, bin: &Path, asked: u32) -> anyhow::Result<ScenarioResult> {
    let volumes = raise_open_files(asked)?;
    let limited = if volumes < asked {
        format!(" ({asked} asked for: the open files limit here holds {volumes})")
    } else {
        String::new()
    };
    let dir = work.join("many-volumes");
    std::fs::create_dir_all(dir.join("files"))?;
    let config = dir.join("blockrepd.toml");
    std::fs::write(
        &config,
        format!(
            "node_name = \"many\"\navailability_zone = \"az1\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n",
            dir.join("state").display(),
            dir.join("run").display()
        ),
    )?;
    let start = |env: &mut Env| -> anyhow::Result<(u32, f64)> {
        let _ = std::fs::remove_file(dir.join("notify.sock"));
        let started = Instant::now();
        let pid = crate::env::start_daemon(env, bin, &dir, &config)?;
        let ready = started.elapsed().as_secs_f64();
        crate::env::pin(pid, Host::Production)?;
        Ok((pid, ready))
    };
    let (pid, _) = start(env)?;
    let socket = dir.join("run/control.sock");
    let add = |i: u32| -> anyhow::Result<()> {
        let file = dir.join("files").join(format!("v{i}.img"));
        std::fs::File::create(&file)?.set_len(64 << 20)?;
        run(Command::new(bin.join("blockrep"))
            .arg("--socket")
            .arg(&socket)
            .args(["volume", "add", "--name", &format!("v{i}"), "--path"])
            .arg(&file))?;
        Ok(())
    };
    add(0)?;
    let one = Held::of(pid)?;
    let adding = Instant::now();
    for i in 1..volumes {
        check_interrupted()?;
        add(i)?;
        if i % 1000 == 0 {
            eprintln!("bench: {i} volumes added");
        }
    }
    let added_s = adding.elapsed().as_secs_f64();
    let all = Held::of(pid)?;
    env.stop_server(pid);
    // READY=1 comes once every registered volume is open and exported.
    let (pid, restart_s) = start(env)?;
    let restarted = Held::of(pid)?;
    env.stop_server(pid);
    let markdown = format!(
        "- **{volumes} sparse volumes on one agent**{limited} (64 MiB files, dirty tracking on, added one by one with `blockrep volume add`): added in {added_s:.1} s; with one volume {} threads, {} open files, {:.0} MiB resident; with all {} threads, {} open files, {:.0} MiB; restart to serving (READY) {restart_s:.2} s, then {} threads and {:.0} MiB.\n",
        one.threads,
        one.open_files,
        one.rss_mib,
        all.threads,
        all.open_files,
        all.rss_mib,
        restarted.threads,
        restarted.rss_mib
    );
    Ok(ScenarioResult {
        name: "many-volumes",
        summary: format!(
            "{volumes} volumes: {} threads (one volume: {}), {:.0} MiB, restart {restart_s:.2} s",
            all.threads, one.threads, all.rss_mib
        ),
        markdown,
        json: json!({
            "volumes": volumes,
            "added_s": added_s,
            "one_volume": one.json(),
            "all_volumes": all.json(),
            "restart_to_ready_s": restart_s,
            "after_restart": restarted.json(),
        }),
        goals: vec![
            Goal::at_most(
                format!("{volumes} volumes: the agent's threads ≤ its threads with one volume + 2"),
                Some(all.threads as f64 - one.threads as f64),
                2.0,
                GoalFormat::Count,
            ),
            Goal::at_most(
                format!("{volumes} volumes: the agent's RSS ≤ 1 GiB"),
                Some(all.rss_mib.max(restarted.rss_mib)),
                1024.0,
                GoalFormat::Mebibytes,
            ),
            Goal::at_most(
                format!("{volumes} volumes: restart to serving ≤ 5 s"),
                Some(restart_s),
                5.0,
                GoalFormat::Seconds,
            ),
        ],
    })
}
