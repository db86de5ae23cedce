//! Points in time, measured (docs/POINT-IN-TIME.md): what keeping undo costs an async
//! group's 4k writes, how much undo a GB overwritten leaves, how long a drill takes to make
//! (1 GiB and 8 GiB volumes), and how fast a drill volume reads against its DR volume.
//!
//! Each cluster is the groups' layout: a witness coordinator, node-a (az1, production, with
//! the writing fio) and node-b (az2, the DR side, with the reading fio).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::json;

use crate::env::{Env, Host, check_interrupted, run};
use crate::groups::{GroupCluster, percentile};
use crate::report::{Goal, GoalFormat, ScenarioResult};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn fill(uri: &str) -> anyhow::Result<()> {
    run(Command::new("fio")
        .args([
            "--name=fill",
            "--ioengine=nbd",
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
        ])
        .arg(format!("--uri={uri}")))?;
    Ok(())
}

/// Bytes of each production volume written while the group keeps points, before the
/// drills: what a drill verification can compare.
const REWRITTEN: u64 = 256 * MIB;

/// Writes the first [`REWRITTEN`] bytes of `uri` again, 64 KiB at a time at 64 MiB/s: about
/// 1024 blocks an epoch, all digested.
fn rewrite(uri: &str) -> anyhow::Result<()> {
    run(Command::new("fio")
        .args([
            "--name=rewrite",
            "--ioengine=nbd",
            "--rw=write",
            "--bs=64k",
            "--iodepth=4",
            "--rate=64m",
        ])
        .arg(format!("--size={REWRITTEN}"))
        .arg(format!("--uri={uri}")))?;
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

impl GroupCluster {
    fn retention(&self, on: bool) -> anyhow::Result<()> {
        self.cli(
            "node-w",
            &[
                "group",
                "update",
                "app",
                "--retention",
                if on { "1h" } else { "0" },
            ],
        )?;
        Ok(())
    }

    /// The group's points: (epoch, bytes of undo behind it).
    fn points(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        let listed = self.json("node-w", &["group", "points", "app"])?;
        Ok(listed["points"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["epoch"].as_u64().unwrap_or(0),
                            p["bytes_behind"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Verifies drill `name` against production's digests (nothing may differ); returns the
    /// seconds it took, and the bytes compared and not comparable over its volumes.
    fn verify(&self, name: &str) -> anyhow::Result<(f64, u64, u64)> {
        let started = Instant::now();
        let v = self.json("node-w", &["group", "drill", "verify", name])?;
        let secs = started.elapsed().as_secs_f64();
        let sum = |key: &str| -> u64 {
            v["volumes"]
                .as_array()
                .map_or(0, |a| a.iter().map(|x| x[key].as_u64().unwrap_or(0)).sum())
        };
        anyhow::ensure!(sum("differing_bytes") == 0, "drill {name} differs: {v}");
        Ok((secs, sum("compared_bytes"), sum("not_comparable_bytes")))
    }

    /// Makes drill `name` at the newest point; returns the seconds until the call returned
    /// and until a 4 KiB read of each drill volume came back (its view built).
    fn drill(&self, name: &str) -> anyhow::Result<(f64, f64)> {
        let started = Instant::now();
        self.cli(
            "node-w",
            &["group", "drill", "create", "app", "--name", name],
        )?;
        let made = started.elapsed().as_secs_f64();
        for pair in ["g1", "g2"] {
            let uri = self.node("node-b").nbd_uri(&format!("{name}-{pair}"));
            run(Command::new("fio")
                .args([
                    "--name=first",
                    "--ioengine=nbd",
                    "--rw=read",
                    "--bs=4k",
                    "--size=4k",
                ])
                .arg(format!("--uri={uri}")))?;
        }
        Ok((made, started.elapsed().as_secs_f64()))
    }
}

/// The whole scenario: retention's cost and undo per GB on 1 GiB volumes, drill creation on
/// 1 GiB and 8 GiB volumes, drill reads against DR volume reads.
pub fn points(
    env: &mut Env,
    work: &Path,
    bin: &Path,
    repeats: u32,
    runtime_s: u32,
) -> anyhow::Result<ScenarioResult> {
    let cluster = GroupCluster::start(env, work, bin, "points")?;
    cluster.group(2, GIB, "async")?;
    let uris: Vec<String> = ["p1", "p2"]
        .iter()
        .map(|v| cluster.node("node-a").nbd_uri(v))
        .collect();
    for uri in &uris {
        fill(uri)?;
    }
    // Retention off and on, paired, the order alternating.
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut undo_per_gb = Vec::new();
    let mut undo_per_epoch = Vec::new();
    for rep in 0..repeats {
        check_interrupted()?;
        let mut this = [0.0f64; 2];
        for k in 0..2 {
            let keeping = (k + rep as usize).is_multiple_of(2);
            cluster.retention(keeping)?;
            cluster.settle()?;
            if keeping {
                // The journal starts at the first unit applied with the retention on.
                cluster.wait("the first point", 60, |c| Ok(!c.points()?.is_empty()))?;
            }
            run(&mut Command::new("sync"))?;
            let before = cluster.points()?;
            let (iops, bytes) =
                // No ramp: the undo kept is set against every byte the run wrote.
                crate::fio::nbd_4k(Host::Production, &uris, "randwrite", 0, runtime_s)?;
            eprintln!(
                "bench: [{}/{repeats}] 4k randwrite QD32 on an async group, retention {}: {iops:.0} IOPS",
                rep + 1,
                if keeping { "on" } else { "off" }
            );
            this[usize::from(keeping)] = iops;
            if keeping {
                cluster.settle()?;
                let after = cluster.points()?;
                let newest_before = before.last().map_or(0, |p| p.0);
                // The undo kept for the run: behind the newest point before it.
                let kept = after
                    .iter()
                    .find(|p| p.0 == newest_before)
                    .map_or(0, |p| p.1);
                let epochs = after.iter().filter(|p| p.0 > newest_before).count();
                if bytes > 0 && kept > 0 {
                    undo_per_gb.push(kept as f64 / (bytes as f64 / 1e9));
                }
                if epochs > 0 {
                    undo_per_epoch.push(kept as f64 / epochs as f64);
                }
            }
        }
        off.push(this[0]);
        on.push(this[1]);
        ratios.push(this[1] / this[0]);
    }
    cluster.retention(true)?;
    cluster.settle()?;
    cluster.wait("a point", 60, |c| Ok(!c.points()?.is_empty()))?;
    // Written while points are kept: what a drill verification compares.
    for uri in &uris {
        rewrite(uri)?;
    }
    cluster.settle()?;
    let written = cluster.points()?.last().map_or(0, |p| p.0);
    cluster.wait("a point after the rewrite", 60, |c| {
        Ok(c.points()?.last().is_some_and(|p| p.0 > written + 1))
    })?;

    // Drills on the 1 GiB volumes, and reads of a drill volume against its DR volume.
    let mut made_1g = Vec::new();
    let mut usable_1g = Vec::new();
    for i in 0..repeats {
        let (made, usable) = cluster.drill(&format!("b{i}"))?;
        made_1g.push(made);
        usable_1g.push(usable);
    }
    // Verification of a drill at the newest point, after the random writes above.
    let mut verify_s = Vec::new();
    let (mut compared, mut not_comparable) = (0, 0);
    for _ in 0..repeats {
        let (secs, c, n) = cluster.verify("b0")?;
        eprintln!(
            "bench: drill verify of 2 × 1 GiB: {secs:.2} s, {c} bytes compared, {n} not comparable"
        );
        verify_s.push(secs);
        (compared, not_comparable) = (c, n);
    }
    let drill_uri = cluster.node("node-b").nbd_uri("b0-g1");
    let dr_uri = cluster.node("node-b").nbd_uri("d1");
    let (mut drill_reads, mut dr_reads, mut read_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repeats {
        check_interrupted()?;
        let mut this = [0.0f64; 2];
        for k in 0..2 {
            let drill = (k + rep as usize).is_multiple_of(2);
            let uri = if drill { &drill_uri } else { &dr_uri };
            run(&mut Command::new("sync"))?;
            let (iops, _) = crate::fio::nbd_4k(
                Host::Dr,
                std::slice::from_ref(uri),
                "randread",
                1,
                runtime_s,
            )?;
            eprintln!(
                "bench: [{}/{repeats}] 4k randread QD32 of the {}: {iops:.0} IOPS",
                rep + 1,
                if drill { "drill volume" } else { "DR volume" }
            );
            this[usize::from(drill)] = iops;
        }
        dr_reads.push(this[0]);
        drill_reads.push(this[1]);
        read_ratios.push(this[1] / this[0]);
    }
    cluster.stop(env);

    // Drills on 8 GiB volumes.
    let big = GroupCluster::start(env, work, bin, "points-8g")?;
    big.group(2, 8 * GIB, "async")?;
    big.retention(true)?;
    for v in ["p1", "p2"] {
        run(Command::new("fio")
            .args([
                "--name=some",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
            ])
            .arg(format!("--size={}", 256 * MIB))
            .arg(format!("--uri={}", big.node("node-a").nbd_uri(v))))?;
    }
    big.settle()?;
    big.wait("a point", 60, |c| Ok(c.points()?.len() > 1))?;
    let mut made_8g = Vec::new();
    let mut usable_8g = Vec::new();
    for i in 0..repeats {
        let (made, usable) = big.drill(&format!("c{i}"))?;
        made_8g.push(made);
        usable_8g.push(usable);
    }
    big.stop(env);

    let (r, read_r) = (median(&ratios), median(&read_ratios));
    let verified = median(&verify_s);
    let compared_share = compared as f64 / (2 * REWRITTEN) as f64;
    let (m1, u1, m8, u8) = (
        median(&made_1g),
        median(&usable_1g),
        median(&made_8g),
        median(&usable_8g),
    );
    let per_gb = (!undo_per_gb.is_empty()).then(|| median(&undo_per_gb));
    let per_epoch = (!undo_per_epoch.is_empty()).then(|| median(&undo_per_epoch));
    let mib = |b: Option<f64>| {
        b.map_or_else(
            || "n/a".to_owned(),
            |b| format!("{:.1} MiB", b / MIB as f64),
        )
    };
    Ok(ScenarioResult {
        name: "points",
        summary: format!(
            "retention on {:.0} vs off {:.0} IOPS: {r:.2}×; undo {} per GB written, {} per epoch; drill made in {m1:.2} s (1 GiB), {m8:.2} s (8 GiB); drill reads {read_r:.2}× the DR volume's; drill verify of 2 × 1 GiB {verified:.2} s, {:.0}% of the bytes written with points kept compared",
            median(&on),
            median(&off),
            mib(per_gb),
            mib(per_epoch),
            compared_share * 100.0
        ),
        markdown: format!(
            "- **Points in time** (async group of two pairs, 1 s cuts): 4k randwrite QD32 on both production volumes (1 GiB, written once beforehand) with a retention of 1 h: {:.0} IOPS, against {:.0} without points: {r:.2}× (median of {repeats} paired runs, order alternating). Undo kept: {} per GB written (4k random, so nearly every write overwrites a distinct block), {} per epoch (both volumes).\n- **Drills**: `group drill create` returned in {m1:.2} s on 1 GiB volumes and {m8:.2} s on 8 GiB volumes; the first 4 KiB read of each drill volume (its view built) came back {u1:.2} s and {u8:.2} s after the call (medians of {repeats}). 4k randread QD32 of a drill volume: {:.0} IOPS, of its DR volume: {:.0} IOPS, {read_r:.2}× (fio on the DR host; the drill is served by eight request threads per connection, the volume by the io_uring path). The first read's time includes starting fio twice.\n- **Drill verify** (production digests each epoch's changed 64 KiB blocks while the group keeps points; the retention-on rate above includes that): after the retention went on, the first 256 MiB of each production volume were written again (64 KiB writes at 64 MiB/s, about 1024 blocks an epoch); `group drill verify` of the 1 GiB drill at a point after that took {verified:.2} s for both volumes (median of {repeats}), and compared {:.0}% of the bytes written since ({} bytes compared, {} not comparable: blocks not written since the retention went on).\n",
            median(&on),
            median(&off),
            mib(per_gb),
            mib(per_epoch),
            median(&drill_reads),
            median(&dr_reads),
            compared_share * 100.0,
            compared,
            not_comparable,
        ),
        json: json!({
            "retention_on_iops": on, "retention_off_iops": off, "ratios": ratios,
            "undo_bytes_per_gb_written": undo_per_gb, "undo_bytes_per_epoch": undo_per_epoch,
            "drill_made_s_1g": made_1g, "drill_usable_s_1g": usable_1g,
            "drill_made_s_8g": made_8g, "drill_usable_s_8g": usable_8g,
            "drill_read_iops": drill_reads, "dr_read_iops": dr_reads, "read_ratios": read_ratios,
            "drill_verify_s_1g": verify_s, "drill_verify_compared_bytes": compared,
            "drill_verify_not_comparable_bytes": not_comparable,
        }),
        goals: vec![
            Goal::at_least(
                "async group 4k randwrite with retention on ≥ 0.8 × retention off".into(),
                Some(r),
                0.8,
            ),
            Goal::at_most(
                "drill creation, 2 pairs of 1 GiB (until readable) ≤ 2 s".into(),
                Some(u1),
                2.0,
                GoalFormat::Seconds,
            ),
            Goal::at_most(
                "drill creation, 2 pairs of 8 GiB (until readable) ≤ 2 s".into(),
                Some(u8),
                2.0,
                GoalFormat::Seconds,
            ),
            Goal::at_least(
                "drill volume 4k random read ≥ 0.5 × its DR volume's".into(),
                Some(read_r),
                0.5,
            ),
        ],
    })
}
