//! The table: medians, spread, ratios, and the targets the project holds itself to.

use serde_json::{Value, json};

use crate::fio::Sample;
use crate::meter::{Cost, Usage};
use crate::workloads::{Figure, Workload};

pub struct Row {
    pub workload: Workload,
    pub target: &'static str,
    pub target_title: &'static str,
    pub samples: Vec<Sample>,
    /// A pair's journal bound, as the production agent reports it.
    pub journal_limit: Option<u64>,
}

const MIB: f64 = (1 << 20) as f64;

/// The workload the one-CPU ceiling is measured at.
const ONE_M: &str = "seqwrite-1m-qd8";

/// Seconds of the production host's CPU per GB a run moved: its busy share over the run's
/// steady part against its rate in MB/s.
fn host_s_per_gb(sample: &Sample) -> Option<f64> {
    let busy = sample.cost.production_host_busy?;
    (sample.value > 0.0).then(|| busy * 1000.0 / sample.value)
}

/// The median of the values that are there, if any is.
fn median_of_known(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let known: Vec<f64> = values.into_iter().flatten().collect();
    (!known.is_empty()).then(|| median(known))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

impl Row {
    pub fn median(&self) -> f64 {
        median(self.samples.iter().map(|s| s.value).collect())
    }
    fn min(&self) -> f64 {
        self.samples
            .iter()
            .map(|s| s.value)
            .fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.samples.iter().map(|s| s.value).fold(0.0, f64::max)
    }
    fn p50(&self) -> f64 {
        median(self.samples.iter().map(|s| s.p50_us).collect())
    }
    fn p99(&self) -> f64 {
        median(self.samples.iter().map(|s| s.p99_us).collect())
    }
    fn median_of(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self.samples.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    }
    fn cpu(&self, side: Side) -> Option<f64> {
        self.median_of(|s| side.of(&s.cost).cpu_s)
    }
    /// CPU seconds per GB replicated: the median over the runs.
    fn cpu_per_gb(&self, side: Side) -> Option<f64> {
        self.median_of(|s| Cost::per_gb(side.of(&s.cost).cpu_s, s.cost.replicated_bytes))
    }
    /// Bytes sent to the DR side per byte written: the median over the runs.
    fn sent_per_written(&self) -> Option<f64> {
        self.median_of(|s| {
            let written = s.cost.written_bytes.filter(|&w| w > 0)?;
            Some(s.cost.replicated_bytes? as f64 / written as f64)
        })
    }
    /// Per run, the seconds of the production host's CPU per GB it moved (clients' bytes,
    /// or the link test's): see [`host_s_per_gb`].
    fn host_s_per_gb(&self) -> Vec<Option<f64>> {
        if self.workload.figure != Figure::MegabytesPerSecond {
            return vec![None; self.samples.len()];
        }
        self.samples.iter().map(host_s_per_gb).collect()
    }
    /// Whether the pair's journal overflowed in any run.
    fn overflowed(&self) -> bool {
        self.samples
            .iter()
            .any(|s| s.cost.journal_overflows.unwrap_or(0) > 0)
    }
    /// The highest resident set size of any run.
    fn peak_rss(&self, side: Side) -> Option<u64> {
        self.samples
            .iter()
            .filter_map(|s| side.of(&s.cost).peak_rss)
            .max()
    }
}

/// One of the two simulated hosts of a row.
#[derive(Clone, Copy)]
enum Side {
    Production,
    Dr,
}

impl Side {
    fn of(self, cost: &Cost) -> &Usage {
        match self {
            Side::Production => &cost.production,
            Side::Dr => &cost.dr,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Side::Production => "production",
            Side::Dr => "DR",
        }
    }
}

#[derive(Clone)]
pub struct Goal {
    pub claim: String,
    pub measured: Option<f64>,
    pub met: Option<bool>,
    pub format: GoalFormat,
}

/// How a goal's figure is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum GoalFormat {
    Ratio,
    Percent,
    Seconds,
    Mebibytes,
    Count,
}

impl Goal {
    pub fn at_least(claim: String, measured: Option<f64>, bound: f64) -> Self {
        let measured = known(measured, bound);
        Self {
            claim,
            measured,
            met: measured.map(|m| m >= bound),
            format: GoalFormat::Ratio,
        }
    }

    pub fn at_most(claim: String, measured: Option<f64>, bound: f64, format: GoalFormat) -> Self {
        let measured = known(measured, bound);
        Self {
            claim,
            measured,
            met: measured.map(|m| m <= bound),
            format,
        }
    }
}

/// A figure is measured only if it and its bound are numbers (a missing row's p50, or a
/// journal bound not reported, is NaN).
fn known(measured: Option<f64>, bound: f64) -> Option<f64> {
    measured.filter(|m| !m.is_nan() && !bound.is_nan())
}

/// What one production CPU allows a pair at 1M (see [`Report::one_cpu_ceilings`]).
#[derive(Clone, Copy, Debug)]
struct Ceiling {
    megabytes_per_second: f64,
    /// Seconds of the CPU per GB: the unpaired row's and the quic-link row's.
    local: f64,
    link: f64,
}

pub struct Report {
    pub rows: Vec<Row>,
    pub scenarios: Vec<ScenarioResult>,
}

/// A measurement outside the fio matrix (lag, initial sync), with its goals.
pub struct ScenarioResult {
    pub name: &'static str,
    /// One line for the progress output.
    pub summary: String,
    pub markdown: String,
    pub json: Value,
    pub goals: Vec<Goal>,
}

fn unit(figure: Figure) -> &'static str {
    match figure {
        Figure::Iops => "IOPS",
        Figure::MegabytesPerSecond => "MB/s",
    }
}

fn fmt_value(v: f64, figure: Figure) -> String {
    match figure {
        Figure::Iops if v >= 1000.0 => format!("{:.1}k", v / 1000.0),
        Figure::Iops => format!("{v:.0}"),
        Figure::MegabytesPerSecond => format!("{v:.0}"),
    }
}

impl Report {
    fn find(&self, workload: &str, target: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.workload.name == workload && r.target == target)
    }

    fn ratio(&self, row: &Row, baseline: &str) -> Option<f64> {
        let base = self.find(row.workload.name, baseline)?.median();
        (base > 0.0).then(|| row.median() / base)
    }

    /// Per repetition, an estimate of the most a pair can move at 1M on the production
    /// host's one CPU, which must do the link's work and the local write path:
    /// 1000 / (the quic-link run's + the unpaired run's seconds of that CPU per GB), in
    /// MB/s, with those two costs. It assumes each cost per GB holds at the pair's rate and
    /// that the two add; it is not a bound.
    fn one_cpu_ceilings(&self) -> Vec<Option<Ceiling>> {
        let (Some(local), Some(link)) =
            (self.find(ONE_M, "blockrepd"), self.find(ONE_M, "quic-link"))
        else {
            return Vec::new();
        };
        local
            .host_s_per_gb()
            .into_iter()
            .zip(link.host_s_per_gb())
            .map(|(local, link)| {
                let (local, link) = (local?, link?);
                Some(Ceiling {
                    megabytes_per_second: 1000.0 / (local + link),
                    local,
                    link,
                })
            })
            .collect()
    }

    /// The ceiling's medians over the repetitions.
    fn one_cpu_ceiling(&self) -> Option<Ceiling> {
        let ceilings = self.one_cpu_ceilings();
        let of =
            |f: fn(&Ceiling) -> f64| median_of_known(ceilings.iter().map(|c| c.as_ref().map(f)));
        Some(Ceiling {
            megabytes_per_second: of(|c| c.megabytes_per_second)?,
            local: of(|c| c.local)?,
            link: of(|c| c.link)?,
        })
    }

    /// A pair's 1M runs against the ceiling of the same repetition: the median multiple.
    fn of_ceiling(&self, pair: &Row) -> Option<f64> {
        median_of_known(
            pair.samples
                .iter()
                .zip(self.one_cpu_ceilings())
                .map(|(sample, ceiling)| Some(sample.value / ceiling?.megabytes_per_second)),
        )
    }

    /// Each repetition's ceiling against its quic-link run: the median multiple.
    fn ceiling_of_link(&self) -> Option<f64> {
        let link = self.find(ONE_M, "quic-link")?;
        median_of_known(self.one_cpu_ceilings().into_iter().zip(&link.samples).map(
            |(ceiling, run)| {
                Some(ceiling?.megabytes_per_second / run.value).filter(|m| m.is_finite())
            },
        ))
    }

    /// The ceiling's lines, if the run measured it.
    fn ceiling_markdown(&self) -> String {
        let Some(ceiling) = self.one_cpu_ceiling() else {
            return String::new();
        };
        let of_link = self
            .ceiling_of_link()
            .map_or_else(|| "–".to_owned(), |m| format!("{m:.2}"));
        let mut out = format!(
            "\nThe production host's one CPU at 1M (each figure a median over the repetitions on \
             its own): the unpaired row took {:.2} s of it per GB, the quic-link row {:.2} s. A pair \
             must do both on that CPU, so if each cost per GB holds at the pair's rate and the two \
             add, it can move about {:.0} MB/s at most ({of_link}× the quic-link run of the same \
             repetition): an estimate, not a bound.\n",
            ceiling.local, ceiling.link, ceiling.megabytes_per_second,
        );
        for target in ["async-pair", "hypermetro-pair"] {
            let Some(row) = self.find(ONE_M, target) else {
                continue;
            };
            let overflowed = if row.overflowed() {
                " (the journal overflowed: the runs measured the local volume, not replication)"
            } else {
                ""
            };
            let own = median_of_known(row.host_s_per_gb())
                .map_or_else(String::new, |s| format!(", {s:.2} s of that CPU per GB"));
            let multiple = self
                .of_ceiling(row)
                .map_or_else(|| "–".to_owned(), |m| format!("{m:.2}"));
            out.push_str(&format!(
                "- {target} at 1M: {:.0} MB/s{own}, {multiple}× the ceiling (median of per-repetition ratios){overflowed}\n",
                row.median(),
            ));
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| workload | target | median | spread (min–max) | p50 µs | p99 µs | × nbdkit | × raw | × blockrepd | CPU s prod / DR | CPU s per GB prod / DR | peak RSS prod / DR |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for row in &self.rows {
            let f = row.workload.figure;
            let ratio = |b| self.ratio(row, b).map_or("–".into(), |r| format!("{r:.2}"));
            let both = |f: &dyn Fn(Side) -> Option<String>| {
                let [p, d] = [Side::Production, Side::Dr].map(|s| f(s).unwrap_or("–".into()));
                format!("{p} / {d}")
            };
            out.push_str(&format!(
                "| {} | {} | {} {} | {}–{} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
                row.workload.title,
                row.target,
                fmt_value(row.median(), f),
                unit(f),
                fmt_value(row.min(), f),
                fmt_value(row.max(), f),
                row.p50(),
                row.p99(),
                ratio("nbdkit"),
                ratio("raw"),
                ratio("blockrepd"),
                both(&|s| row.cpu(s).map(|c| format!("{c:.1}"))),
                both(&|s| row.cpu_per_gb(s).map(|c| format!("{c:.2}"))),
                both(&|s| row.peak_rss(s).map(|b| format!("{} MiB", b >> 20))),
            ));
        }
        out
    }

    /// The median over repetitions of `target / baseline`, each pair measured back to back in
    /// the same repetition, so slow drift of the machine cancels out.
    fn paired_ratio(&self, workload: &str, target: &str, baseline: &str) -> Option<f64> {
        let t = self.find(workload, target)?;
        let b = self.find(workload, baseline)?;
        let ratios: Vec<f64> = t
            .samples
            .iter()
            .zip(&b.samples)
            .map(|(t, b)| t.value / b.value)
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    }

    /// The figures the project holds itself to, as medians of paired ratios. A goal whose
    /// rows were not run is unmeasured.
    pub fn goals(&self) -> Vec<Goal> {
        let ratio = |w: &str, t: &str, b: &str| self.paired_ratio(w, t, b);
        let mut goals = Vec::new();
        for target in ["blockrepd", "blockrepd-writeback"] {
            goals.push(Goal::at_least(
                format!("4k randwrite QD32: {target} ≥ 1.0 × nbdkit"),
                ratio("randwrite-4k-qd32", target, "nbdkit"),
                1.0,
            ));
        }
        // nbdkit's file plugin writes into the page cache: the writeback volume is the like
        // for like, the direct one is the figure the goal names.
        for target in ["blockrepd", "blockrepd-writeback"] {
            goals.push(Goal::at_least(
                format!("1k seq write QD16 (sub-block, pipelined): {target} ≥ 0.5 × nbdkit"),
                ratio("seqwrite-1k-qd16", target, "nbdkit"),
                0.5,
            ));
        }
        goals.push(Goal::at_least(
            "1M seq write QD8: blockrepd ≥ 0.9 × raw".into(),
            ratio("seqwrite-1m-qd8", "blockrepd", "raw"),
            0.9,
        ));
        for w in ["randwrite-4k-qd32", "seqwrite-1m-qd8"] {
            let cost = ratio(w, "blockrepd", "blockrepd-notrack").map(|r| 1.0 - r);
            goals.push(Goal {
                claim: format!("{w}: dirty tracking costs ≤ 5%"),
                measured: cost,
                met: cost.map(|c| c <= 0.05),
                format: GoalFormat::Percent,
            });
        }
        self.replication_goals(&mut goals);
        for scenario in &self.scenarios {
            goals.extend(scenario.goals.iter().cloned());
        }
        goals
    }

    /// The replication figures of "Replication at the speed of the device".
    fn replication_goals(&self, goals: &mut Vec<Goal>) {
        const FOUR_K: &str = "randwrite-4k-qd32";
        const ONE_M: &str = "seqwrite-1m-qd8";
        for (target, least) in [("async-pair", 0.9), ("hypermetro-pair", 0.6)] {
            goals.push(Goal::at_least(
                format!(
                    "{}: {target} ≥ {least:.1} × blockrepd",
                    self.title_of(FOUR_K)
                ),
                self.paired_ratio(FOUR_K, target, "blockrepd"),
                least,
            ));
        }
        for target in ["async-pair", "hypermetro-pair"] {
            // A run whose journal overflowed went at local speed and caught up afterwards.
            let overflowed = self.find(ONE_M, target).is_some_and(Row::overflowed);
            goals.push(Goal::at_least(
                format!(
                    "1M seq write QD8: {target} ≥ 0.8 × min(blockrepd, quic-link){}",
                    if overflowed {
                        " (the journal overflowed: the runs measured the local volume, not replication)"
                    } else {
                        ""
                    }
                ),
                self.ratio_to_min(ONE_M, target, "blockrepd", "quic-link")
                    .filter(|_| !overflowed),
                0.8,
            ));
        }
        // The link's round trip (tens of µs on loopback) is left out of the bound, which
        // makes it stricter; the DR write's p50 is the raw device's at the same workload.
        let extra = self
            .find(FOUR_K, "hypermetro-pair")
            .zip(self.find(FOUR_K, "blockrepd"));
        let dr_write = self.find(FOUR_K, "raw").map(Row::p50);
        goals.push(Goal::at_most(
            "4k randwrite QD32: hypermetro-pair p50 − blockrepd p50 ≤ raw device p50 (in units of it)".into(),
            extra
                .zip(dr_write)
                .map(|((h, b), raw)| (h.p50() - b.p50()) / raw),
            1.0,
            GoalFormat::Ratio,
        ));
        const ZIPF: &str = "randwrite-4k-zipf-qd32";
        goals.push(Goal::at_most(
            format!(
                "{}: async-pair bytes sent (frames) ≤ 0.5 × bytes written",
                self.title_of(ZIPF)
            ),
            self.find(ZIPF, "async-pair")
                .and_then(Row::sent_per_written),
            0.5,
            GoalFormat::Ratio,
        ));
        let link = self.find(ONE_M, "quic-link");
        for target in ["async-pair", "hypermetro-pair"] {
            for workload in [FOUR_K, ONE_M] {
                let Some(row) = self.find(workload, target) else {
                    continue;
                };
                for side in [Side::Production, Side::Dr] {
                    goals.push(Goal::at_most(
                        format!(
                            "{}: {target} {} agent's CPU per GB ≤ 1.5 × the quic-link row's {}",
                            self.title_of(workload),
                            side.name(),
                            match side {
                                Side::Production => "sender",
                                Side::Dr => "receiver",
                            }
                        ),
                        row.cpu_per_gb(side)
                            .zip(link.and_then(|l| l.cpu_per_gb(side)))
                            .map(|(a, l)| a / l),
                        1.5,
                        GoalFormat::Ratio,
                    ));
                }
            }
        }
        let peak = |target, side| {
            self.rows
                .iter()
                .filter(|r| r.target == target)
                .filter_map(|r| r.peak_rss(side))
                .max()
                .map(|b| b as f64 / MIB)
        };
        let journal = self
            .rows
            .iter()
            .find(|r| r.target == "async-pair")
            .and_then(|r| r.journal_limit);
        goals.push(Goal::at_most(
            format!(
                "async-pair production agent peak RSS ≤ journal bound ({}) + 64 MiB",
                journal.map_or("unknown".into(), |j| format!("{} MiB", j >> 20))
            ),
            peak("async-pair", Side::Production),
            journal.map_or(f64::NAN, |j| j as f64 / MIB + 64.0),
            GoalFormat::Mebibytes,
        ));
        for target in ["async-pair", "hypermetro-pair"] {
            goals.push(Goal::at_most(
                format!("{target} DR agent peak RSS ≤ 128 MiB"),
                peak(target, Side::Dr),
                128.0,
                GoalFormat::Mebibytes,
            ));
        }
    }

    fn title_of(&self, workload: &str) -> String {
        crate::workloads::all()
            .into_iter()
            .find(|w| w.name == workload)
            .map_or(workload.to_owned(), |w| w.title.to_owned())
    }

    /// The median over repetitions of `target / min(a, b)`, each measured in the same
    /// repetition.
    fn ratio_to_min(&self, workload: &str, target: &str, a: &str, b: &str) -> Option<f64> {
        let t = self.find(workload, target)?;
        let a = self.find(workload, a)?;
        let b = self.find(workload, b)?;
        let ratios: Vec<f64> = t
            .samples
            .iter()
            .zip(&a.samples)
            .zip(&b.samples)
            .map(|((t, a), b)| t.value / a.value.min(b.value))
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    }

    /// The median of a row, for scenarios that scale from it.
    pub fn median_of(&self, workload: &str, target: &str) -> Option<f64> {
        self.find(workload, target).map(Row::median)
    }

    pub fn scenarios_markdown(&self) -> String {
        self.scenarios
            .iter()
            .map(|s| format!("\n{}\n", s.markdown))
            .collect()
    }

    pub fn goals_markdown(&self) -> String {
        let mut out = String::from("Goals (median of per-repetition paired ratios):\n\n");
        for goal in self.goals() {
            let value = match (goal.measured, goal.format) {
                (None, _) => "not measured".to_owned(),
                (Some(v), GoalFormat::Percent) => format!("{:.1}%", v * 100.0),
                (Some(v), GoalFormat::Seconds) => format!("{v:.2} s"),
                (Some(v), GoalFormat::Ratio) => format!("{v:.2}×"),
                (Some(v), GoalFormat::Mebibytes) => format!("{v:.0} MiB"),
                (Some(v), GoalFormat::Count) => format!("{v:.0}"),
            };
            let verdict = match goal.met {
                None => "",
                Some(true) => " — met",
                Some(false) => " — NOT met",
            };
            out.push_str(&format!("- {}: {value}{verdict}\n", goal.claim));
        }
        out.push_str(&self.ceiling_markdown());
        out
    }

    pub fn json(&self, machine: Value) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "workload": r.workload.name,
                    "target": r.target,
                    "target_title": r.target_title,
                    "unit": unit(r.workload.figure),
                    "median": r.median(),
                    "min": r.min(),
                    "max": r.max(),
                    "samples": r.samples.iter().map(|s| s.value).collect::<Vec<_>>(),
                    "p50_us": r.p50(),
                    "p99_us": r.p99(),
                    "ratio_to_nbdkit": self.ratio(r, "nbdkit"),
                    "ratio_to_raw": self.ratio(r, "raw"),
                    "production_cpu_s": r.cpu(Side::Production),
                    "dr_cpu_s": r.cpu(Side::Dr),
                    "production_cpu_s_per_gb": r.cpu_per_gb(Side::Production),
                    "dr_cpu_s_per_gb": r.cpu_per_gb(Side::Dr),
                    "production_peak_rss_bytes": r.peak_rss(Side::Production),
                    "dr_peak_rss_bytes": r.peak_rss(Side::Dr),
                    "replicated_bytes": r.samples.iter().map(|s| s.cost.replicated_bytes).collect::<Vec<_>>(),
                    "journal_overflows": r.samples.iter().map(|s| s.cost.journal_overflows).collect::<Vec<_>>(),
                    "written_bytes": r.samples.iter().map(|s| s.cost.written_bytes).collect::<Vec<_>>(),
                    "production_host_busy": r.samples.iter().map(|s| s.cost.production_host_busy).collect::<Vec<_>>(),
                    "production_host_s_per_gb": r.host_s_per_gb(),
                })
            })
            .collect();
        let goals: Vec<Value> = self
            .goals()
            .into_iter()
            .map(|g| json!({"claim": g.claim, "measured": g.measured, "met": g.met}))
            .collect();
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|s| json!({"name": s.name, "figures": s.json}))
            .collect();
        let ceiling = self.one_cpu_ceiling().map(|c| {
            json!({
                "megabytes_per_second": c.megabytes_per_second,
                "unpaired_s_per_gb": c.local,
                "link_s_per_gb": c.link,
                "per_repetition_megabytes_per_second": self
                    .one_cpu_ceilings()
                    .iter()
                    .map(|c| c.map(|c| c.megabytes_per_second))
                    .collect::<Vec<_>>(),
                "link_multiple": self.ceiling_of_link(),
                "async_pair_multiple": self.find(ONE_M, "async-pair").and_then(|r| self.of_ceiling(r)),
                "hypermetro_pair_multiple": self.find(ONE_M, "hypermetro-pair").and_then(|r| self.of_ceiling(r)),
            })
        });
        json!({ "machine": machine, "rows": rows, "goals": goals, "scenarios": scenarios, "one_cpu_ceiling_1m": ceiling })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratios_cancel_drift() {
        let sample = |value| Sample {
            value,
            p50_us: 1.0,
            p99_us: 1.0,
            cost: Cost::default(),
        };
        let w = crate::workloads::all().remove(0);
        let row = |target, values: &[f64]| Row {
            workload: w.clone(),
            target,
            target_title: "",
            samples: values.iter().map(|&v| sample(v)).collect(),
            journal_limit: None,
        };
        // The machine slows down over the run; each pair is 10% apart all the same.
        let report = Report {
            scenarios: Vec::new(),
            rows: vec![
                row("a", &[110.0, 55.0, 220.0]),
                row("b", &[100.0, 50.0, 200.0]),
            ],
        };
        let r = report.paired_ratio(w.name, "a", "b").unwrap();
        assert!((r - 1.1).abs() < 1e-9);
    }

    #[test]
    fn a_goal_with_an_unknown_figure_or_bound_is_unmeasured() {
        let unknown_bound = Goal::at_most("x".into(), Some(1.0), f64::NAN, GoalFormat::Ratio);
        assert_eq!((unknown_bound.measured, unknown_bound.met), (None, None));
        let unknown_figure = Goal::at_least("x".into(), Some(f64::NAN), 1.0);
        assert_eq!((unknown_figure.measured, unknown_figure.met), (None, None));
        assert_eq!(Goal::at_least("x".into(), Some(2.0), 1.0).met, Some(true));
    }

    #[test]
    fn the_one_cpu_ceiling_pairs_each_repetitions_runs() {
        let one_m = crate::workloads::all()
            .into_iter()
            .find(|w| w.name == ONE_M)
            .unwrap();
        // Each run of a row: its rate (MB/s) and the production CPU's busy share.
        let row = |target, runs: &[(f64, Option<f64>)]| Row {
            workload: one_m.clone(),
            target,
            target_title: "",
            samples: runs
                .iter()
                .map(|&(value, busy)| Sample {
                    value,
                    p50_us: 1.0,
                    p99_us: 1.0,
                    cost: Cost {
                        production_host_busy: busy,
                        ..Cost::default()
                    },
                })
                .collect(),
            journal_limit: None,
        };
        // Repetition by repetition, the local path costs 0.5, 0.25 and 1.0 s per GB and the
        // link 1.25, 2.0 and 1.0 s: ceilings of 1000/1.75, 1000/2.25 and 1000/2.0 MB/s.
        let (full, half) = (Some(1.0), Some(0.5));
        let report = Report {
            scenarios: Vec::new(),
            rows: vec![
                row(
                    "blockrepd",
                    &[(2000.0, full), (2000.0, half), (1000.0, full)],
                ),
                row(
                    "quic-link",
                    &[(800.0, full), (400.0, Some(0.8)), (900.0, Some(0.9))],
                ),
                row(
                    "hypermetro-pair",
                    &[(300.0, full), (400.0, full), (500.0, full)],
                ),
            ],
        };
        let ceilings: Vec<f64> = report
            .one_cpu_ceilings()
            .into_iter()
            .map(|c| c.unwrap().megabytes_per_second)
            .collect();
        for (got, want) in ceilings.iter().zip([1000.0 / 1.75, 1000.0 / 2.25, 500.0]) {
            assert!((got - want).abs() < 1e-6, "{got} against {want}");
        }
        // The pair's multiple is the median of each run over its repetition's own ceiling
        // (0.525, 0.90, 1.0), not the median run over the median ceiling (400 / 500).
        let pair = report.find(ONE_M, "hypermetro-pair").unwrap();
        assert!((report.of_ceiling(pair).unwrap() - 0.9).abs() < 1e-9);
        // Against each repetition's link run (800, 400, 900 MB/s): 0.71, 1.11, 0.56.
        let of_link = report.ceiling_of_link().unwrap();
        assert!((of_link - 1000.0 / 1.75 / 800.0).abs() < 1e-9, "{of_link}");
        assert!(
            report
                .ceiling_markdown()
                .contains("hypermetro-pair at 1M: 400 MB/s, 2.50 s of that CPU per GB, 0.90×")
        );
        // Without the host's busy share (not pinned, or not root), there is no ceiling.
        let unpinned = Report {
            scenarios: Vec::new(),
            rows: vec![
                row("blockrepd", &[(2000.0, None)]),
                row("quic-link", &[(800.0, full)]),
            ],
        };
        assert!(unpinned.one_cpu_ceiling().is_none());
        assert!(unpinned.ceiling_markdown().is_empty());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
