//! The ops kit in contrib/: the Prometheus alert rules pass `promtool check rules` and their
//! own `promtool test rules` cases (one per alert); the Grafana dashboard parses, takes its data
//! source from a variable, and every query in it is PromQL that promtool accepts; and every
//! metric either of them names exists in the /metrics of a running crier, with the labels and
//! label values the queries use. Except the metrics only a clustered crier exposes, listed in
//! LATER (the test fails if a single node shows one, so the list stays true; tests/cluster.rs
//! checks them on a cluster).
//!
//! promtool comes from Debian's `prometheus` package (.ci/run installs it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::*;

const DASHBOARD: &str = include_str!("../contrib/grafana/crier.json");
const ALERTS: &str = include_str!("../contrib/prometheus/crier-alerts.yml");
const ALERT_TESTS: &str = include_str!("../contrib/prometheus/crier-alerts.test.yml");
const CONTRIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib");

/// Named by the dashboard or the alerts, exposed only by a clustered crier (`[cluster]`): the
/// single node this test runs has none, so their panels stay empty and their alerts silent
/// there (a node with no Redis has no Redis to lose).
const LATER: &[&str] = &["crier_cluster_up"];

/// Labels Prometheus adds at scrape time; never in crier's own output.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (apt-get install prometheus; .ci/run does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_alert_rules() {
    let said = promtool(&[
        "check",
        "rules",
        &format!("{CONTRIB}/prometheus/crier-alerts.yml"),
    ]);
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn every_alert_fires_in_its_promtool_test() {
    let said = promtool(&[
        "test",
        "rules",
        &format!("{CONTRIB}/prometheus/crier-alerts.test.yml"),
    ]);
    assert!(said.contains("SUCCESS"), "{said}");
    let alerts: BTreeSet<&str> = ALERTS
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    let tested: BTreeSet<&str> = ALERT_TESTS
        .lines()
        .filter_map(|l| l.trim().strip_prefix("alertname: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    assert_eq!(
        alerts, tested,
        "each alert needs a case in crier-alerts.test.yml"
    );
    // Every alert says how bad it is and what happened.
    for block in ALERTS.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap();
        assert!(block.contains("severity: "), "{name}: no severity label");
        assert!(block.contains("summary: "), "{name}: no summary");
        assert!(block.contains("description: "), "{name}: no description");
    }
}

/// The dashboard's panels, rows' nested panels included.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Every PromQL query of the dashboard: panel targets, then the variables' label_values().
fn dashboard_queries(d: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    let mut exprs = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("target expr").to_string());
        }
    }
    let mut label_values = Vec::new();
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| panic!("variable query {q:?}"));
            label_values.push(inner);
        }
    }
    (exprs, label_values)
}

#[test]
fn the_dashboard_is_importable_with_any_prometheus_data_source() {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert!(d["title"].is_string() && d["uid"].is_string());
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = serde_json::json!({"type": "prometheus", "uid": format!("${{{}}}", ds["name"].as_str().unwrap())});
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], ds_ref, "variable {}", v["name"]);
    }

    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels(&d) {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap() > 0,
            "{}",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert_eq!(p["datasource"], ds_ref, "panel {}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"], ds_ref, "panel {}", p["title"]);
            assert!(refs.insert(t["refId"].as_str().unwrap()));
            queries += 1;
        }
    }
    assert!(queries >= 30, "{queries} queries");
    // No data source is named by uid anywhere (an import would need it to exist).
    let text = DASHBOARD.replace("\"${datasource}\"", "");
    for (i, _) in text.match_indices("\"uid\": \"") {
        let v = &text[i + 8..];
        let v = &v[..v.find('"').unwrap()];
        assert!(
            v == d["uid"].as_str().unwrap() || v == "-- Grafana --",
            "hard-coded uid {v:?}"
        );
    }
}

/// Grafana's variables replaced by what they would be at query time.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "6h")
        .replace("$job", ".*")
        .replace("$instance", ".*")
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let (exprs, label_values) = dashboard_queries(&d);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().chain(&label_values).enumerate() {
        let e = as_promql(e);
        assert!(
            !e.contains('$'),
            "a Grafana variable this test does not know: {e}"
        );
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: |\n"
        ));
        for line in e.lines() {
            rules.push_str(&format!("          {line}\n"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    promtool(&["check", "rules", path.to_str().unwrap()]);
}

/// A metric selector in a query: the name and its label matchers (label, op, value).
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// What a PromQL expression names: selectors of metrics (crier_*, process_*, up) and the
/// labels of `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`.
fn names_in(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let b = expr.as_bytes();
    let mut i = 0;
    let mut selectors = Vec::new();
    let mut grouping = Vec::new();
    let ident = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_' || b[*i] == b':') {
            *i += 1;
        }
        expr[s..*i].to_string()
    };
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == b'[' {
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
        } else if c == b'$' || c.is_ascii_digit() {
            i += 1;
            let _ = ident(&mut i);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let word = ident(&mut i);
            skip_ws(&mut i);
            let next = b.get(i).copied();
            if matches!(word.as_str(), "by" | "without" | "on" | "ignoring") && next == Some(b'(') {
                let end = i + expr[i..].find(')').unwrap();
                grouping.extend(
                    expr[i + 1..end]
                        .split(',')
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty()),
                );
                i = end + 1;
            } else if word.starts_with("crier_") || word.starts_with("process_") || word == "up" {
                let mut matchers = Vec::new();
                if next == Some(b'{') {
                    let end = i + expr[i..].find('}').unwrap();
                    for m in expr[i + 1..end].split(',').filter(|m| !m.trim().is_empty()) {
                        let m = m.trim();
                        let op_at = m.find(['=', '!']).expect("a matcher");
                        let label = m[..op_at].trim().to_string();
                        let rest = &m[op_at..];
                        let op_len = if rest.starts_with("=~")
                            || rest.starts_with("!=")
                            || rest.starts_with("!~")
                        {
                            2
                        } else {
                            1
                        };
                        let value = rest[op_len..].trim().trim_matches('"').to_string();
                        matchers.push((label, rest[..op_len].to_string(), value));
                    }
                    i = end + 1;
                }
                selectors.push(Selector {
                    name: word,
                    matchers,
                });
            }
        } else {
            i += 1;
        }
    }
    (selectors, grouping)
}

/// The `expr:` values of a rules file (one line, or a `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, l) in lines.iter().enumerate() {
        let Some(v) = l.trim_start().strip_prefix("expr: ") else {
            continue;
        };
        if v.trim() == "|" {
            let indent = l.len() - l.trim_start().len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|x| x.trim().is_empty() || x.len() - x.trim_start().len() > indent)
                .map(|x| x.trim())
                .collect();
            out.push(block.join(" "));
        } else {
            out.push(v.to_string());
        }
    }
    out
}

/// Sample names of a Prometheus text exposition, each with the label sets it has.
fn exposition(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..line.rfind('}').unwrap()]),
            None => (line.split_whitespace().next().unwrap(), ""),
        };
        let mut set = BTreeMap::new();
        for kv in labels.split("\",").filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap();
            set.insert(k.to_string(), v.trim_matches('"').to_string());
        }
        out.entry(name.to_string()).or_default().push(set);
    }
    out
}

#[tokio::test]
async fn every_metric_the_kit_names_is_in_crier_metrics() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        secret.path(),
        "whsec_MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI=",
    )
    .unwrap();
    // A webhook, a poll and a publish_on rule, so their per-name series exist.
    let c = Crier::start(
        "http://127.0.0.1:9",
        &format!(
            "[[webhook]]\nurl = \"http://127.0.0.1:9/hook\"\nname = \"ops\"\nsecret_file = \"{}\"\n\
             [[poll]]\nurl = \"/api/scoreboard\"\nchannel = \"scoreboard\"\n\
             [[publish_on]]\nname = \"orders\"\npath = \"/api/orders/{{id}}\"\nchannel = \"orders.{{id}}\"\n",
            secret.path().display()
        ),
    )
    .await;
    let text = client()
        .get(c.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let have = exposition(&text);
    c.shutdown().await;

    let d: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let (mut exprs, label_values) = dashboard_queries(&d);
    exprs.extend(label_values);
    exprs.extend(rule_exprs(ALERTS));
    assert!(exprs.len() >= 40, "{} queries", exprs.len());

    let mut named = BTreeSet::new();
    let mut problems = Vec::new();
    for e in &exprs {
        let (selectors, grouping) = names_in(e);
        assert!(!selectors.is_empty(), "no metric in {e}");
        let mut labels_here = BTreeSet::new();
        for s in &selectors {
            named.insert(s.name.clone());
            if s.name == "up" || LATER.contains(&s.name.as_str()) {
                continue; // up: Prometheus's own
            }
            let Some(sets) = have.get(&s.name) else {
                problems.push(format!("{}: not in /metrics (in {e})", s.name));
                continue;
            };
            labels_here.extend(sets.iter().flat_map(|set| set.keys().cloned()));
            for (label, op, value) in &s.matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let ok = match op.as_str() {
                    "=" => sets.iter().any(|set| set.get(label) == Some(value)),
                    "=~" => value.split('|').all(|v| {
                        sets.iter()
                            .any(|set| set.get(label).map(String::as_str) == Some(v))
                    }),
                    _ => sets.iter().any(|set| set.contains_key(label)),
                };
                if !ok {
                    problems.push(format!(
                        "{}{{{label}{op}\"{value}\"}}: no such series (in {e})",
                        s.name
                    ));
                }
            }
        }
        let later = selectors.iter().any(|s| LATER.contains(&s.name.as_str()));
        for l in grouping {
            if !TARGET_LABELS.contains(&l.as_str()) && !labels_here.contains(&l) && !later {
                problems.push(format!("label {l}: on none of the metrics of {e}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    for m in LATER {
        assert!(
            named.contains(*m),
            "{m} is in LATER but the kit does not use it"
        );
        assert!(
            !have.contains_key(*m)
                && !have.contains_key(&format!("{m}_total"))
                && !have.keys().any(|k| k.starts_with(&format!("{m}_"))),
            "{m} is in a single node's /metrics: a node without [cluster] must not expose it"
        );
    }
}
