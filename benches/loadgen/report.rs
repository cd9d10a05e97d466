//! results.jsonl (one JSON object per run, tagged server/workload/rep) → RESULTS.md (tables of
//! medians with min–max, crier/peer ratios, the targets) and results.json (the same
//! aggregates plus every raw run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// One JSON object per line, as `push`/`proxy` print them.
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

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
    Neither,
}

struct Metric {
    label: &'static str,
    ptr: &'static str,
    scale: f64,
    better: Better,
}

const fn m(label: &'static str, ptr: &'static str, better: Better) -> Metric {
    Metric {
        label,
        ptr,
        scale: 1.0,
        better,
    }
}

const fn mib(label: &'static str, ptr: &'static str, better: Better) -> Metric {
    Metric {
        label,
        ptr,
        scale: 1.0 / 1024.0,
        better,
    }
}

use Better::{Higher, Lower, Neither};

fn metrics_for(workload: &str) -> Vec<Metric> {
    if workload.starts_with("proxy") {
        vec![
            m("requests/s", "/wrk/rps", Higher),
            m("latency p50 ms", "/wrk/p50_ms", Lower),
            m("latency p99 ms", "/wrk/p99_ms", Lower),
            m("errors", "/wrk/errors", Lower),
            m("server CPU s", "/server/cpu_s", Lower),
        ]
    } else if workload.starts_with("capacity") {
        vec![
            m("connected", "/subs/connected", Higher),
            m("failed", "/subs/failed", Lower),
            m("RSS per subscriber KiB", "/server/rss_per_sub_kib", Lower),
            m("PSS per subscriber KiB", "/server/pss_per_sub_kib", Lower),
            mib("RSS connected MiB", "/server/connected/rss_kib", Lower),
            m("server CPU s (connect)", "/server/cpu_connect_s", Lower),
            m("ramp s", "/ramp_s", Lower),
        ]
    } else if workload.starts_with("pubrate") {
        vec![
            m("publishes/s", "/publish/rate_per_s", Higher),
            m("publish p50 ms", "/publish/latency_ms/p50", Lower),
            m("publish p99 ms", "/publish/latency_ms/p99", Lower),
            m("publish errors", "/publish/errors", Lower),
            m("lost (1 subscriber)", "/delivery/lost_total", Lower),
            m("server CPU s", "/server/cpu_publish_s", Lower),
            m("generator CPU s", "/generator/cpu_publish_s", Neither),
        ]
    } else {
        vec![
            m("connected", "/subs/connected", Higher),
            m("deliveries/s", "/delivery/per_s", Higher),
            m("latency p50 ms", "/delivery/latency_ms/p50", Lower),
            m("latency p99 ms", "/delivery/latency_ms/p99", Lower),
            m("latency max ms", "/delivery/latency_ms/max", Lower),
            m("lost", "/delivery/lost_total", Lower),
            m("subscribers with loss", "/delivery/subs_with_loss", Lower),
            m("duplicates", "/delivery/dup_total", Lower),
            m("ended early", "/subs/ended_early", Lower),
            m("publishes/s", "/publish/rate_per_s", Higher),
            m("server CPU s (publish)", "/server/cpu_publish_s", Lower),
            m(
                "generator CPU s (publish)",
                "/generator/cpu_publish_s",
                Neither,
            ),
            mib("server RSS peak MiB", "/server/peak_rss_kib", Lower),
        ]
    }
}

/// Column order: crier first, then the peers.
fn server_rank(s: &str) -> (usize, String) {
    let order = [
        "crier",
        "crier-unix",
        "nchan",
        "nginx",
        "pushpin",
        "pushpin-tuned",
        "direct",
    ];
    (
        order.iter().position(|o| *o == s).unwrap_or(order.len()),
        s.to_string(),
    )
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

fn ratio(crier: f64, peer: f64) -> Option<f64> {
    (peer != 0.0 && crier.is_finite() && peer.is_finite()).then(|| crier / peer)
}

type Table = BTreeMap<String, BTreeMap<String, BTreeMap<&'static str, Agg>>>;

pub fn run(a: ReportArgs) -> Result<(), String> {
    let text =
        std::fs::read_to_string(&a.input).map_err(|e| format!("{}: {e}", a.input.display()))?;
    let runs: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
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
                let vals: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r.pointer(met.ptr)?.as_f64())
                    .map(|v| v * met.scale)
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

    // Targets from issue 5.
    let med = |w: &str, s: &str, label: &str| -> Option<f64> {
        table.get(w)?.get(s)?.get(label).map(|a| a.median)
    };
    let mut targets = Vec::new();
    let mut target =
        |what: String, c: Option<f64>, p: Option<f64>, peer: &str, ok: Option<bool>, goal: &str| {
            targets.push(json!({
                "target": what, "crier": c, "peer": peer, "peer_value": p,
                "ratio": c.zip(p).and_then(|(c, p)| ratio(c, p)), "goal": goal, "met": ok,
            }));
        };
    for w in order
        .iter()
        .filter(|w| w.starts_with("fanout") && w.ends_with("max"))
    {
        let (c, p) = (
            med(w, "crier", "deliveries/s"),
            med(w, "nchan", "deliveries/s"),
        );
        let ok = c.zip(p).map(|(c, p)| c >= 1.5 * p);
        target(
            format!("{w}: deliveries/s"),
            c,
            p,
            "nchan",
            ok,
            "≥ 1.5× Nchan",
        );
        let (c, p) = (
            med(w, "crier", "latency p99 ms"),
            med(w, "nchan", "latency p99 ms"),
        );
        target(
            format!("{w}: p99 latency ms"),
            c,
            p,
            "nchan",
            c.zip(p).map(|(c, p)| c <= p),
            "≤ Nchan",
        );
    }
    for w in order
        .iter()
        .filter(|w| w.starts_with("fanout") || w.starts_with("channels"))
    {
        if let Some(c) = med(w, "crier", "lost") {
            let max_lost = table[w]["crier"]["lost"].max;
            target(
                format!("{w}: lost (max over reps)"),
                Some(max_lost),
                None,
                "",
                Some(max_lost == 0.0 && c == 0.0),
                "0",
            );
        }
    }
    for w in order.iter().filter(|w| w.starts_with("capacity")) {
        let (c, p) = (
            med(w, "crier", "RSS per subscriber KiB"),
            med(w, "nchan", "RSS per subscriber KiB"),
        );
        let goal = if w.contains("sse") {
            "≤ 0.5× Nchan"
        } else {
            "(no target; for reference)"
        };
        let ok = w
            .contains("sse")
            .then(|| c.zip(p).map(|(c, p)| c <= 0.5 * p))
            .flatten();
        target(
            format!("{w}: RSS per subscriber KiB"),
            c,
            p,
            "nchan",
            ok,
            goal,
        );
    }
    for w in order.iter().filter(|w| w.starts_with("pubrate")) {
        let c = med(w, "crier", "publishes/s");
        let p = med("pubrate-tcp", "nchan", "publishes/s");
        target(
            format!("{w}: publishes/s (vs Nchan over TCP)"),
            c,
            p,
            "nchan",
            c.zip(p).map(|(c, p)| c >= p),
            "≥ Nchan",
        );
    }
    for w in order.iter().filter(|w| w.starts_with("proxy")) {
        let (c, p) = (med(w, "crier", "requests/s"), med(w, "nginx", "requests/s"));
        target(
            format!("{w}: requests/s"),
            c,
            p,
            "nginx",
            c.zip(p).map(|(c, p)| c >= p),
            "≥ nginx",
        );
        let (c, p) = (
            med(w, "crier", "latency p99 ms"),
            med(w, "nginx", "latency p99 ms"),
        );
        target(
            format!("{w}: p99 ms"),
            c,
            p,
            "nginx",
            c.zip(p).map(|(c, p)| c <= p),
            "≤ nginx",
        );
    }
    let _ = writeln!(md, "## Targets (issue 5), medians\n");
    let _ = writeln!(
        md,
        "| target | crier | peer | crier/peer | goal | met |\n|---|---|---|---|---|---|"
    );
    for t in &targets {
        let f = |v: &Value| v.as_f64().map_or("–".to_string(), fmt_num);
        let _ = writeln!(
            md,
            "| {} | {} | {} {} | {} | {} | {} |",
            t["target"].as_str().unwrap_or(""),
            f(&t["crier"]),
            t["peer"].as_str().unwrap_or(""),
            f(&t["peer_value"]),
            t["ratio"]
                .as_f64()
                .map_or("–".to_string(), |r| format!("{r:.2}×")),
            t["goal"].as_str().unwrap_or(""),
            match t["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        );
    }

    let _ = writeln!(
        md,
        "\n## Every workload\n\nMedian over the repetitions, (min–max) when they differ. \
         crier/peer is the ratio of medians (higher is better for rates, lower for latency, memory and CPU).\n"
    );
    for w in &order {
        let Some(servers) = table.get(w) else {
            continue;
        };
        let mut cols: Vec<&String> = servers.keys().collect();
        cols.sort_by_key(|s| server_rank(s));
        let peers: Vec<&String> = cols
            .iter()
            .copied()
            .filter(|s| !s.starts_with("crier"))
            .collect();
        let has_crier = servers.contains_key("crier");
        let reps = cols.iter().map(|s| groups[w][*s].len()).max().unwrap_or(0);
        let example = groups[w].values().next().and_then(|v| v.first()).copied();
        let _ = writeln!(md, "### {w}\n");
        if let Some(e) = example {
            let _ = writeln!(md, "{} — {} repetition(s)\n", describe(e), reps);
        }
        let mut head = String::from("| metric |");
        let mut sep = String::from("|---|");
        for c in &cols {
            let _ = write!(head, " {c} |");
            sep.push_str("---|");
        }
        if has_crier {
            for p in &peers {
                let _ = write!(head, " crier/{p} |");
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
            if has_crier {
                for p in &peers {
                    let r = servers["crier"]
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
    let out = json!({"meta": meta, "targets": targets, "aggregates": aggregates, "runs": runs});
    std::fs::write(&a.md, md).map_err(|e| format!("{}: {e}", a.md.display()))?;
    std::fs::write(
        &a.json,
        serde_json::to_string_pretty(&out).unwrap_or_default() + "\n",
    )
    .map_err(|e| format!("{}: {e}", a.json.display()))?;
    eprintln!(
        "crier-loadgen: wrote {} and {} ({} runs)",
        a.md.display(),
        a.json.display(),
        runs.len()
    );
    Ok(())
}

/// One line that says what a workload did.
fn describe(r: &Value) -> String {
    if r["kind"] == "proxy" {
        return format!(
            "wrk -t{} -c{} -d{}s --latency, GET / through the server to a 13-byte upstream response",
            r["threads"], r["conns"], r["duration_s"]
        );
    }
    let rate = r["rate"].as_f64().unwrap_or(0.0);
    let rate = if rate > 0.0 {
        format!("{rate}/s")
    } else {
        "as fast as possible".into()
    };
    if r["messages"].as_u64() == Some(0) {
        return format!(
            "{} idle {} subscribers on {} channel(s); memory measured after the ramp",
            r["subscribers"],
            r["transport"].as_str().unwrap_or(""),
            r["channels"]
        );
    }
    format!(
        "{} {} subscribers on {} channel(s); {} messages of {} B, {}, {} publish connection(s) via {}",
        r["subscribers"],
        r["transport"].as_str().unwrap_or(""),
        r["channels"],
        r["messages"],
        r["size"],
        rate,
        r["pub_conns"].as_u64().unwrap_or(1),
        if r["pub"].as_str().unwrap_or("").starts_with("unix:") { "Unix socket" } else { "TCP" },
    )
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
