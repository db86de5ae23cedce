//! Running fio and reading its JSON.

use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::meter::Cost;
use crate::targets::Target;
use crate::workloads::{Figure, Workload};

/// One fio run's figures.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// IOPS, or MB/s (10^6 bytes) for bandwidth workloads.
    pub value: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// What the run cost the hosts' processes (filled in by the caller's meter).
    pub cost: Cost,
}

pub struct Timing {
    pub runtime_s: u32,
    pub ramp_s: u32,
}

pub fn run(target: &Target, workload: &Workload, timing: &Timing) -> anyhow::Result<Sample> {
    run_with(target, workload, timing, &[])
}

/// As [`run`], with extra fio arguments (a rate limit).
pub fn run_with(
    target: &Target,
    workload: &Workload,
    timing: &Timing,
    extra: &[String],
) -> anyhow::Result<Sample> {
    let mut cmd = crate::env::on_host(crate::env::Host::Production, "fio");
    cmd.arg(format!("--name={}", workload.name))
        .args([
            "--output-format=json",
            "--time_based",
            "--numjobs=1",
            "--group_reporting",
        ])
        .arg("--percentile_list=50:99")
        .arg(format!("--runtime={}", timing.runtime_s))
        .arg(format!("--ramp_time={}", timing.ramp_s))
        .args(&target.fio_args)
        .args(workload.fio_args)
        .args(extra);
    let json = json_report(&mut cmd, &format!("on {} / {}", target.name, workload.name))?;
    parse(&json, workload.figure)
}

/// Runs fio (`--output-format=json`) and returns its JSON report; `what` says what the run
/// was, for the error if it fails.
fn json_report(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().context("run fio")?;
    if !out.status.success() {
        // Ctrl-C reaches fio too; say what happened rather than blame fio.
        crate::env::check_interrupted()?;
        bail!(
            "fio failed {what} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // fio may print notices before its JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("no JSON in fio output")?;
    Ok(text[start..].to_owned())
}

fn parse(json: &str, figure: Figure) -> anyhow::Result<Sample> {
    let v: Value = serde_json::from_str(json).context("parse fio JSON")?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio job error {}", job["error"]);
    }
    let num = |dir: &str, key: &str| job[dir][key].as_f64().unwrap_or(0.0);
    let value = match figure {
        Figure::Iops => num("read", "iops") + num("write", "iops"),
        Figure::MegabytesPerSecond => (num("read", "bw_bytes") + num("write", "bw_bytes")) / 1e6,
    };
    // Latency of the direction that did most of the I/O.
    let dir = if num("read", "total_ios") >= num("write", "total_ios") {
        "read"
    } else {
        "write"
    };
    let pct = |p: &str| {
        job[dir]["clat_ns"]["percentile"][p]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1000.0
    };
    Ok(Sample {
        value,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        cost: Cost::default(),
    })
}

/// Seconds the production host's device takes to read what an initial sync reads of it,
/// in 4 MiB reads with `O_DIRECT`, one at a time, fio on the production host's CPU: with
/// `data`, `(chunk, stride, bytes)`, the `chunk` at the start of every `stride` of `path`
/// up to `bytes` (what `SEEK_DATA` finds of the scenario's volume); otherwise all of it
/// (a loop device, read whole).
pub fn device_read_seconds(path: &str, data: Option<(u64, u64, u64)>) -> anyhow::Result<f64> {
    let mut cmd = crate::env::on_host(crate::env::Host::Production, "fio");
    cmd.args([
        "--name=device-read",
        "--output-format=json",
        "--direct=1",
        "--ioengine=psync",
        "--numjobs=1",
        "--rw=read",
        "--bs=4m",
    ])
    .arg(format!("--filename={path}"));
    if let Some((chunk, stride, bytes)) = data {
        cmd.arg("--zonemode=strided")
            .arg(format!("--zonesize={chunk}"))
            .arg(format!("--zonerange={stride}"))
            .arg(format!("--io_size={bytes}"));
    }
    let json = json_report(&mut cmd, &format!("reading {path}"))?;
    let v: Value = serde_json::from_str(&json).context("parse fio JSON")?;
    let read = &v["jobs"][0]["read"];
    let bytes = read["io_bytes"].as_f64().unwrap_or(0.0);
    let bw = read["bw_bytes"].as_f64().unwrap_or(0.0);
    if bytes <= 0.0 || bw <= 0.0 {
        bail!("fio read nothing of {path}");
    }
    Ok(bytes / bw)
}

/// fio on `uris` at once (one job each), `rw` 4k QD32 for `runtime_s` after `ramp_s` not
/// counted, on `host`: total IOPS and bytes moved (counted: not the ramp's).
pub fn nbd_4k(
    host: crate::env::Host,
    uris: &[String],
    rw: &str,
    ramp_s: u32,
    runtime_s: u32,
) -> anyhow::Result<(f64, u64)> {
    let mut cmd = crate::env::on_host(host, "fio");
    cmd.args(["--ioengine=nbd", "--bs=4k", "--iodepth=32"])
        .arg(format!("--rw={rw}"))
        .args(["--time_based", "--group_reporting", "--output-format=json"])
        .arg(format!("--ramp_time={ramp_s}"))
        .arg(format!("--runtime={runtime_s}"));
    for (i, uri) in uris.iter().enumerate() {
        cmd.arg(format!("--name=j{i}")).arg(format!("--uri={uri}"));
    }
    let out = crate::env::run(&mut cmd)?;
    let json = out.find('{').map_or(out.as_str(), |i| &out[i..]);
    let v: Value = serde_json::from_str(json).context("fio's JSON")?;
    let dir = if rw.contains("read") { "read" } else { "write" };
    let iops = v["jobs"][0][dir]["iops"].as_f64().context("fio IOPS")?;
    let bytes = v["jobs"][0][dir]["io_bytes"].as_u64().unwrap_or(0);
    Ok((iops, bytes))
}

pub fn version() -> String {
    crate::env::run(Command::new("fio").arg("--version"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iops_and_the_dominant_direction_latency() {
        let json = r#"{"jobs":[{"error":0,
            "read":{"iops":700.0,"bw_bytes":2867200,"total_ios":7000,"clat_ns":{"percentile":{"50.000000":1000,"99.000000":5000}}},
            "write":{"iops":300.0,"bw_bytes":1228800,"total_ios":3000,"clat_ns":{"percentile":{"50.000000":2000,"99.000000":9000}}}}]}"#;
        let s = parse(json, Figure::Iops).unwrap();
        assert_eq!((s.value, s.p50_us, s.p99_us), (1000.0, 1.0, 5.0));
        let s = parse(json, Figure::MegabytesPerSecond).unwrap();
        assert!((s.value - 4.096).abs() < 1e-9);
    }

    #[test]
    fn a_job_error_is_an_error() {
        assert!(parse(r#"{"jobs":[{"error":5}]}"#, Figure::Iops).is_err());
    }
}
