//! The table: medians, spread, ratios, and the targets the project holds itself to.

use serde_json::{Value, json};

use crate::fio::Sample;
use crate::workloads::{Figure, Workload};

pub struct Row {
    pub workload: Workload,
    pub target: &'static str,
    pub target_title: &'static str,
    pub samples: Vec<Sample>,
    pub peak_rss: Option<u64>,
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
    fn cpu(&self) -> Option<f64> {
        let v: Vec<f64> = self.samples.iter().filter_map(|s| s.server_cpu_s).collect();
        (!v.is_empty()).then(|| median(v))
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
}

impl Goal {
    pub fn at_least(claim: String, measured: Option<f64>, bound: f64) -> Self {
        Self {
            claim,
            measured,
            met: measured.map(|m| m >= bound),
            format: GoalFormat::Ratio,
        }
    }

    pub fn at_most(claim: String, measured: Option<f64>, bound: f64, format: GoalFormat) -> Self {
        Self {
            claim,
            measured,
            met: measured.map(|m| m <= bound),
            format,
        }
    }
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

    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| workload | target | median | spread (min–max) | p50 µs | p99 µs | × nbdkit | × raw | × blockrepd | server CPU s | server peak RSS |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for row in &self.rows {
            let f = row.workload.figure;
            let ratio = |b| self.ratio(row, b).map_or("–".into(), |r| format!("{r:.2}"));
            out.push_str(&format!(
                "| {} | {} | {} {} | {}–{} | {:.0} | {:.0} | {} | {} | {} | {} | {} |\n",
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
                row.cpu().map_or("–".into(), |c| format!("{c:.1}")),
                row.peak_rss
                    .map_or("–".into(), |b| format!("{} MiB", b >> 20)),
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
        for (workload, target, least) in [
            ("randwrite-4k-qd32", "async-pair", 0.8),
            ("seqwrite-1m-qd8", "async-pair", 0.8),
            ("randwrite-4k-qd32", "hypermetro-pair", 0.5),
        ] {
            goals.push(Goal::at_least(
                format!(
                    "{}: {target} ≥ {least:.1} × blockrepd",
                    self.title_of(workload)
                ),
                ratio(workload, target, "blockrepd"),
                least,
            ));
        }
        goals.push(Goal::at_least(
            "1M seq write QD8: hypermetro-pair ≥ 0.8 × min(blockrepd, quic-link)".into(),
            self.ratio_to_min(
                "seqwrite-1m-qd8",
                "hypermetro-pair",
                "blockrepd",
                "quic-link",
            ),
            0.8,
        ));
        for scenario in &self.scenarios {
            goals.extend(scenario.goals.iter().cloned());
        }
        goals
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
            };
            let verdict = match goal.met {
                None => "",
                Some(true) => " — met",
                Some(false) => " — NOT met",
            };
            out.push_str(&format!("- {}: {value}{verdict}\n", goal.claim));
        }
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
                    "server_cpu_s": r.cpu(),
                    "server_peak_rss_bytes": r.peak_rss,
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
        json!({ "machine": machine, "rows": rows, "goals": goals, "scenarios": scenarios })
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
            server_cpu_s: None,
        };
        let w = crate::workloads::all().remove(0);
        let row = |target, values: &[f64]| Row {
            workload: w.clone(),
            target,
            target_title: "",
            samples: values.iter().map(|&v| sample(v)).collect(),
            peak_rss: None,
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
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
