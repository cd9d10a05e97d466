//! The goals the issues set, checked against one run's medians: each compares a metric of the
//! subject server with a peer's from the same run (or asks for zero), so RESULTS.md says at the
//! top which goals a build meets. A goal is listed only when its workload ran with the servers
//! it compares (a crier feature that does not exist yet shows up under "Not run" instead).

use serde_json::{json, Value};

enum Test {
    /// subject ≥ k × peer
    AtLeast(f64),
    /// subject ≤ k × peer
    AtMost(f64),
    /// the subject's largest value over the repetitions is 0
    Zero,
    /// reported for reference, no goal
    Info,
}

struct Goal {
    issue: u32,
    /// Workload name; `*` matches any run of characters.
    workload: &'static str,
    metric: &'static str,
    subject: &'static str,
    peer: &'static str,
    /// The peer's figure comes from this workload instead (e.g. Nchan over TCP for crier's Unix socket).
    peer_workload: Option<&'static str>,
    test: Test,
    goal: &'static str,
}

use Test::{AtLeast, AtMost, Info, Zero};

const fn g(
    issue: u32,
    workload: &'static str,
    metric: &'static str,
    subject: &'static str,
    peer: &'static str,
    test: Test,
    goal: &'static str,
) -> Goal {
    Goal {
        issue,
        workload,
        metric,
        subject,
        peer,
        peer_workload: None,
        test,
        goal,
    }
}

const GOALS: &[Goal] = &[
    g(
        5,
        "fanout-*-max",
        "deliveries/s",
        "crier",
        "nchan",
        AtLeast(1.5),
        "≥ 1.5× Nchan",
    ),
    g(
        5,
        "fanout-*-max",
        "latency p99 ms",
        "crier",
        "nchan",
        AtMost(1.0),
        "≤ Nchan",
    ),
    g(5, "fanout-*", "lost", "crier", "", Zero, "0"),
    g(5, "channels", "lost", "crier", "", Zero, "0"),
    g(
        5,
        "capacity-sse",
        "RSS per subscriber KiB",
        "crier",
        "nchan",
        AtMost(0.5),
        "≤ 0.5× Nchan",
    ),
    g(
        5,
        "capacity-ws",
        "RSS per subscriber KiB",
        "crier",
        "nchan",
        Info,
        "(for reference)",
    ),
    Goal {
        peer_workload: Some("pubrate-tcp"),
        ..g(
            5,
            "pubrate-*",
            "publishes/s",
            "crier",
            "nchan",
            AtLeast(1.0),
            "≥ Nchan over TCP",
        )
    },
    g(
        5,
        "proxy",
        "requests/s",
        "crier",
        "nginx",
        AtLeast(1.0),
        "≥ nginx",
    ),
    g(
        5,
        "proxy",
        "latency p99 ms",
        "crier",
        "nginx",
        AtMost(1.0),
        "≤ nginx",
    ),
    // Issue 15: the restructured build against the one before it, same run.
    g(
        15,
        "fanout-*-max",
        "deliveries/s",
        "crier",
        "crier-base",
        AtLeast(0.95),
        "no regression (≥ 0.95× base)",
    ),
    g(
        15,
        "fanout-*-max",
        "latency p99 ms",
        "crier",
        "crier-base",
        AtMost(1.1),
        "no regression (≤ 1.1× base)",
    ),
    g(
        15,
        "proxy*",
        "requests/s",
        "crier",
        "crier-base",
        AtLeast(0.95),
        "no regression (≥ 0.95× base)",
    ),
    g(
        15,
        "proxy*",
        "latency p99 ms",
        "crier",
        "crier-base",
        AtMost(1.1),
        "no regression (≤ 1.1× base)",
    ),
    // Issue 19: a slow reader loses no more than with Nchan, and is told of every loss.
    g(
        19,
        "slow-reader*",
        "lost",
        "crier",
        "nchan",
        AtMost(1.0),
        "≤ Nchan",
    ),
    g(
        19,
        "slow-reader*",
        "lost silently",
        "crier",
        "",
        Zero,
        "0 (lost = told)",
    ),
    g(
        19,
        "proxy-nginxapp",
        "requests/s",
        "crier",
        "nginx",
        AtLeast(1.2),
        "≥ 1.2× nginx",
    ),
    g(
        19,
        "proxy-nginxapp",
        "latency p99 ms",
        "crier",
        "nginx",
        AtMost(1.0),
        "≤ nginx",
    ),
    // Issue 20: multiplexed subscribers.
    g(20, "mux", "lost", "crier", "", Zero, "0"),
    g(
        20,
        "mux",
        "deliveries/s",
        "crier",
        "nchan",
        Info,
        "(vs Nchan's multiplexed subscriber)",
    ),
    g(
        20,
        "mux",
        "latency p99 ms",
        "crier",
        "nchan",
        Info,
        "(vs Nchan's multiplexed subscriber)",
    ),
    g(
        20,
        "mux",
        "RSS per subscriber KiB",
        "crier",
        "nchan",
        Info,
        "(4 channels per subscriber)",
    ),
    Goal {
        peer_workload: Some("mux-single"),
        ..g(
            20,
            "mux",
            "latency p99 ms",
            "crier",
            "crier",
            Info,
            "(vs single-channel subscribers)",
        )
    },
    // The cost claim: a publish to a channel with N multiplexed subscribers costs what it
    // costs for N single-channel ones (`mux-single-fanout`: as many subscribers per channel,
    // the same deliveries per publish).
    Goal {
        peer_workload: Some("mux-single-fanout"),
        ..g(
            20,
            "mux",
            "deliveries/s",
            "crier",
            "crier",
            Info,
            "(vs as many single-channel subscribers per channel)",
        )
    },
    Goal {
        peer_workload: Some("mux-single-fanout"),
        ..g(
            20,
            "mux",
            "server CPU s (publish)",
            "crier",
            "crier",
            Info,
            "(vs as many single-channel subscribers per channel)",
        )
    },
    // Issue 17: two nodes on one Redis.
    g(
        17,
        "cluster-pubrate",
        "publishes/s",
        "crier-cluster",
        "crier",
        AtLeast(0.5),
        "≥ 0.5× single-node memory",
    ),
    g(
        17,
        "cluster-fanout",
        "deliveries/s",
        "crier-cluster",
        "nchan-redis",
        AtLeast(1.5),
        "≥ 1.5× Nchan with Redis",
    ),
    g(
        17,
        "cluster-fanout",
        "latency p99 ms",
        "crier-cluster",
        "nchan-redis",
        AtMost(1.0),
        "≤ Nchan with Redis",
    ),
    g(17, "cluster-fanout", "lost", "crier-cluster", "", Zero, "0"),
    // Issue 16: the file store.
    g(
        16,
        "store-pubrate-32",
        "publishes/s",
        "crier-file",
        "crier",
        AtLeast(0.5),
        "≥ 0.5× memory",
    ),
    g(
        16,
        "store-pubrate-1",
        "publishes/s",
        "crier-file",
        "crier",
        Info,
        "(1 publisher)",
    ),
    g(
        16,
        "store-pubrate-*",
        "publish p99 ms",
        "crier-file",
        "crier",
        Info,
        "(durability costs latency)",
    ),
    g(
        16,
        "store-restart",
        "resume head ms",
        "crier-file",
        "crier",
        Info,
        "(restart with the buffers stored)",
    ),
    // Issue 21: clients publishing over their WebSocket.
    g(
        21,
        "ws-publish-rate",
        "publishes/s",
        "crier",
        "nchan",
        Info,
        "(vs nchan_pubsub)",
    ),
    g(
        21,
        "ws-publish-rate",
        "deliveries/s",
        "crier",
        "nchan",
        Info,
        "(vs nchan_pubsub)",
    ),
    g(
        21,
        "ws-publish-fanout",
        "latency p99 ms",
        "crier",
        "nchan",
        Info,
        "(vs nchan_pubsub)",
    ),
    g(21, "ws-publish-*", "lost", "crier", "", Zero, "0"),
    // Issue 22: publish_on rules and [[poll]].
    g(
        22,
        "publish-on-get",
        "requests/s",
        "crier-rules10",
        "crier",
        AtLeast(0.95),
        "nothing measurable (≥ 0.95× no rules)",
    ),
    g(
        22,
        "publish-on-get",
        "latency p99 ms",
        "crier-rules10",
        "crier",
        AtMost(1.1),
        "nothing measurable (≤ 1.1× no rules)",
    ),
    g(
        22,
        "publish-on-post",
        "requests/s",
        "crier-postrule",
        "crier",
        Info,
        "(a matching rule on every POST)",
    ),
    g(
        22,
        "poll-upstream",
        "upstream requests/s",
        "crier-poll",
        "crier",
        Info,
        "(one request per interval vs one per browser)",
    ),
];

/// `*` matches any run of characters.
fn glob(p: &str, s: &str) -> bool {
    match p.split_once('*') {
        None => p == s,
        Some((head, tail)) => {
            s.starts_with(head)
                && (0..=s.len() - head.len())
                    .any(|i| s.is_char_boundary(head.len() + i) && glob(tail, &s[head.len() + i..]))
        }
    }
}

/// A median (and the largest value, for `Zero`) of (workload, server, metric).
pub trait Lookup {
    fn median(&self, w: &str, s: &str, metric: &str) -> Option<f64>;
    fn max(&self, w: &str, s: &str, metric: &str) -> Option<f64>;
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// Every goal that applies to the workloads of this run, in the order they ran.
pub fn evaluate(order: &[String], t: &impl Lookup) -> Vec<Value> {
    let mut out = Vec::new();
    for goal in GOALS {
        for w in order.iter().filter(|w| glob(goal.workload, w)) {
            let Some(s) = t.median(w, goal.subject, goal.metric) else {
                continue;
            };
            // A run where no subscriber connected measured nothing (e.g. a crier without
            // multiplexing answers 400): say so instead of judging its zeros.
            if t.median(w, goal.subject, "connected") == Some(0.0) {
                out.push(json!({
                    "issue": goal.issue, "target": format!("{w}: {}", goal.metric),
                    "subject": goal.subject, "goal": goal.goal, "met": null,
                    "note": "no subscriber connected",
                }));
                continue;
            }
            let pw = goal.peer_workload.unwrap_or(w);
            let (value, peer, met) = match goal.test {
                Zero => {
                    let mx = t.max(w, goal.subject, goal.metric).unwrap_or(s);
                    (mx, None, Some(mx == 0.0))
                }
                AtLeast(k) | AtMost(k) => {
                    let Some(p) = t.median(pw, goal.peer, goal.metric) else {
                        continue;
                    };
                    let ok = if matches!(goal.test, AtLeast(_)) {
                        s >= k * p
                    } else {
                        s <= k * p
                    };
                    (s, Some(p), Some(ok))
                }
                Info => {
                    let Some(p) = t.median(pw, goal.peer, goal.metric) else {
                        continue;
                    };
                    (s, Some(p), None)
                }
            };
            let peer_name = if goal.peer_workload.is_some() {
                format!("{} ({pw})", goal.peer)
            } else {
                goal.peer.to_string()
            };
            out.push(json!({
                "issue": goal.issue,
                "target": format!("{w}: {}", goal.metric),
                "subject": goal.subject,
                "value": value,
                "peer": peer_name,
                "peer_value": peer,
                "ratio": peer.and_then(|p| ratio(value, p)),
                "goal": goal.goal,
                "met": met,
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("fanout-*-max", "fanout-ws-max"));
        assert!(!glob("fanout-*-max", "fanout-ws-rate"));
        assert!(glob("proxy*", "proxy"));
        assert!(glob("proxy*", "proxy-nginxapp"));
        assert!(!glob("mux", "mux-single"));
    }
}
