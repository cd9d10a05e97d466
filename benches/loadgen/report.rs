//! results.jsonl (one JSON object per run, tagged server/workload/rep) → RESULTS.md (tables of
//! medians with min–max, subject/peer ratios, the issues' goals) and results.json (the same
//! aggregates plus every raw run). What each workload shows is in `workloads.rs`, the goals in
//! `goals.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::goals::{self, Lookup};
use crate::workloads::{describe, metrics_for, server_rank, subject, Better::Neither};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// One JSON object per line, as the generator's subcommands print them.
    #[arg(long)]
    pub input: PathBuf,
    /// run.sh's description of the run (date, machine, load, command, sizes).
    #[arg(long)]
    pub meta: Option<PathBuf>,
    #[arg(long)]
    pub md: PathBuf,
    #[arg(long)]
    pub json: PathBuf,
}

#[derive(Clone, Copy, Default)]
struct Agg {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn aggregate(mut v: Vec<f64>) -> Option<Agg> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Agg {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        // thousands separators
        let s = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_agg(a: &Agg) -> String {
    if a.n == 1 || a.min == a.max {
        fmt_num(a.median)
    } else {
        format!(
            "{} ({}–{})",
            fmt_num(a.median),
            fmt_num(a.min),
            fmt_num(a.max)
        )
    }
}

fn fmt_ratio(r: f64) -> String {
    if r != 0.0 && r < 0.01 {
        "<0.01".into()
    } else if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.2}")
    }
}

fn ratio(subject: f64, peer: f64) -> Option<f64> {
    (peer != 0.0 && subject.is_finite() && peer.is_finite()).then(|| subject / peer)
}

fn nothing_connected(r: &Value) -> bool {
    r["subscribers"].as_u64().unwrap_or(0) > 0 && r["subs"]["connected"].as_u64() == Some(0)
}

type Table = BTreeMap<String, BTreeMap<String, BTreeMap<&'static str, Agg>>>;

impl Lookup for Table {
    fn median(&self, w: &str, s: &str, metric: &str) -> Option<f64> {
        self.get(w)?.get(s)?.get(metric).map(|a| a.median)
    }
    fn max(&self, w: &str, s: &str, metric: &str) -> Option<f64> {
        self.get(w)?.get(s)?.get(metric).map(|a| a.max)
    }
}

pub fn run(a: ReportArgs) -> Result<(), String> {
    let text =
        std::fs::read_to_string(&a.input).map_err(|e| format!("{}: {e}", a.input.display()))?;
    let all: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // run.sh records a server that did not start (e.g. a config for a feature not built yet).
    let (skipped, runs): (Vec<Value>, Vec<Value>) =
        all.into_iter().partition(|r| r["kind"] == "skipped");
    let meta: Value = match &a.meta {
        Some(p) => std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null),
        None => Value::Null,
    };

    // workload → server → runs, keeping the order workloads first appear in.
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, BTreeMap<String, Vec<&Value>>> = BTreeMap::new();
    for r in &runs {
        let w = r["tags"]["workload"].as_str().unwrap_or("?").to_string();
        let s = r["tags"]["server"].as_str().unwrap_or("?").to_string();
        if !order.contains(&w) {
            order.push(w.clone());
        }
        groups.entry(w).or_default().entry(s).or_default().push(r);
    }
    let mut table: Table = BTreeMap::new();
    for (w, servers) in &groups {
        for (s, rs) in servers {
            for met in metrics_for(w) {
                // A run where no subscriber connected (e.g. a URL form this build refuses)
                // measured nothing but that: its zeros are not figures.
                let vals: Vec<f64> = rs
                    .iter()
                    .filter(|r| met.label == "connected" || !nothing_connected(r))
                    .filter_map(|r| met.value(r))
                    .collect();
                if let Some(agg) = aggregate(vals) {
                    table
                        .entry(w.clone())
                        .or_default()
                        .entry(s.clone())
                        .or_default()
                        .insert(met.label, agg);
                }
            }
        }
    }

    let mut md = String::new();
    let _ = writeln!(md, "# crier benchmark results\n");
    let mv = |k: &str| meta[k].as_str().unwrap_or("?").to_string();
    let _ = writeln!(
        md,
        "- **Date:** {}\n- **Machine:** {} cores ({}), {} memory, kernel {}\n- **Load average** (1/5/15 min) at start: {}; at end: {}\n- **Command:** `{}`\n- **Sizes:** {}\n- **Versions:** {}\n",
        mv("date"),
        mv("cores"),
        mv("cpu"),
        mv("memory"),
        mv("kernel"),
        mv("load_start"),
        mv("load_end"),
        mv("command"),
        mv("sizes"),
        mv("versions"),
    );
    let _ = writeln!(
        md,
        "{}\n",
        meta["note"].as_str().unwrap_or(
            "A run on a machine that is busy with other work is noisy: compare ratios from one run, \
             and rerun on a quiet machine before quoting absolute figures."
        )
    );

    let targets = goals::evaluate(&order, &table);
    let _ = writeln!(md, "## Goals of the issues, medians\n");
    if targets.is_empty() {
        let _ = writeln!(
            md,
            "None of the comparisons the goals need ran (see Not run below)."
        );
    } else {
        let _ = writeln!(
            md,
            "| issue | target | subject | value | peer | peer value | ratio | goal | met |\n|---|---|---|---|---|---|---|---|---|"
        );
    }
    for t in &targets {
        let f = |v: &Value| v.as_f64().map_or("–".to_string(), fmt_num);
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t["issue"],
            s(&t["target"]),
            s(&t["subject"]),
            f(&t["value"]),
            s(&t["peer"]),
            f(&t["peer_value"]),
            t["ratio"]
                .as_f64()
                .map_or("–".to_string(), |r| format!("{}×", fmt_ratio(r))),
            s(&t["goal"]),
            match (t["met"].as_bool(), t["note"].as_str()) {
                (Some(true), _) => "yes".to_string(),
                (Some(false), _) => "**no**".to_string(),
                (None, Some(n)) => format!("– ({n})"),
                (None, None) => "–".to_string(),
            }
        );
    }
    if !skipped.is_empty() {
        let _ = writeln!(
            md,
            "\n## Not run\n\nServers that did not start (a crier config for a feature this build does not have yet is refused at start-up):\n"
        );
        let mut seen = BTreeMap::new();
        for r in &skipped {
            let key = format!(
                "{} / {}",
                r["tags"]["workload"].as_str().unwrap_or("?"),
                r["tags"]["server"].as_str().unwrap_or("?")
            );
            seen.entry(key)
                .or_insert_with(|| r["reason"].as_str().unwrap_or("").to_string());
        }
        for (k, why) in seen {
            let _ = writeln!(md, "- {k}: {why}");
        }
    }

    let _ = writeln!(
        md,
        "\n## Every workload\n\nMedian over the repetitions (and rounds), (min–max) when they differ. \
         subject/peer is the ratio of medians, the subject being the server the workload is about \
         (higher is better for rates, lower for latency, memory and CPU).\n"
    );
    for w in &order {
        let Some(servers) = table.get(w) else {
            continue;
        };
        let mut cols: Vec<&String> = servers.keys().collect();
        cols.sort_by_key(|s| server_rank(s));
        let subj = subject(w);
        let has_subject = servers.contains_key(subj);
        let peers: Vec<&String> = cols.iter().copied().filter(|s| *s != subj).collect();
        let reps = cols.iter().map(|s| groups[w][*s].len()).max().unwrap_or(0);
        // Describe the workload from the run with the most nodes (a cluster's, not its baseline's).
        let example = groups[w]
            .values()
            .flatten()
            .copied()
            .max_by_key(|r| r["nodes"].as_u64().unwrap_or(1));
        let _ = writeln!(md, "### {w}\n");
        if let Some(e) = example {
            let _ = writeln!(md, "{} — {} run(s) per server\n", describe(e), reps);
        }
        let mut head = String::from("| metric |");
        let mut sep = String::from("|---|");
        for c in &cols {
            let _ = write!(head, " {c} |");
            sep.push_str("---|");
        }
        if has_subject {
            for p in &peers {
                let _ = write!(head, " {subj}/{p} |");
                sep.push_str("---|");
            }
        }
        let _ = writeln!(md, "{head}\n{sep}");
        for met in metrics_for(w) {
            if !cols.iter().any(|c| servers[*c].contains_key(met.label)) {
                continue;
            }
            let mut row = format!("| {} |", met.label);
            for c in &cols {
                let cell = servers[*c].get(met.label).map_or("–".into(), fmt_agg);
                let _ = write!(row, " {cell} |");
            }
            if has_subject {
                for p in &peers {
                    let r = servers[subj]
                        .get(met.label)
                        .zip(servers[*p].get(met.label))
                        .and_then(|(c, p)| ratio(c.median, p.median));
                    let cell = match (r, met.better) {
                        (Some(r), Neither) => fmt_ratio(r),
                        (Some(r), _) => format!("{}×", fmt_ratio(r)),
                        (None, _) => "–".into(),
                    };
                    let _ = write!(row, " {cell} |");
                }
            }
            let _ = writeln!(md, "{row}");
        }
        // Errors seen, summed over the repetitions, so a failed run explains itself.
        let mut errs: BTreeMap<String, u64> = BTreeMap::new();
        for (s, rs) in &groups[w] {
            for r in rs {
                for src in ["/errors", "/publish/error_kinds"] {
                    if let Some(o) = r.pointer(src).and_then(Value::as_object) {
                        for (k, v) in o {
                            *errs.entry(format!("{s}: {k}")).or_default() +=
                                v.as_u64().unwrap_or(0);
                        }
                    }
                }
            }
        }
        if !errs.is_empty() {
            let _ = writeln!(md, "\nErrors (summed over repetitions):");
            for (k, v) in errs.iter().take(12) {
                let _ = writeln!(md, "- {k} × {v}");
            }
        }
        let _ = writeln!(md);
    }
    if let Some(notes) = meta["notes"].as_array() {
        let _ = writeln!(md, "## Notes\n");
        for n in notes {
            let _ = writeln!(md, "- {}", n.as_str().unwrap_or(""));
        }
    }

    let aggregates: BTreeMap<&String, BTreeMap<&String, BTreeMap<&str, Value>>> = table
        .iter()
        .map(|(w, ss)| {
            (
                w,
                ss.iter()
                    .map(|(s, ms)| {
                        (
                            s,
                            ms.iter()
                                .map(|(k, a)| {
                                    (*k, json!({"median": a.median, "min": a.min, "max": a.max, "n": a.n}))
                                })
                                .collect(),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    let out = json!({"meta": meta, "targets": targets, "aggregates": aggregates, "skipped": skipped, "runs": runs});
    std::fs::write(&a.md, md).map_err(|e| format!("{}: {e}", a.md.display()))?;
    std::fs::write(
        &a.json,
        serde_json::to_string_pretty(&out).unwrap_or_default() + "\n",
    )
    .map_err(|e| format!("{}: {e}", a.json.display()))?;
    eprintln!(
        "crier-loadgen: wrote {} and {} ({} runs, {} not run)",
        a.md.display(),
        a.json.display(),
        runs.len(),
        skipped.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let a = aggregate(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((a.median, a.min, a.max, a.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(aggregate(vec![1.0, 4.0]).unwrap().median, 2.5);
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(0.1234), "0.123");
    }
}
