//! What the report shows for each workload: its metrics (label, where in a run's JSON, which
//! way is better), the server whose figures are divided by every other column's (the
//! "subject": crier, or the crier variant a workload is about), the column order, and one line
//! that says what the workload did.

use serde_json::Value;

#[derive(Clone, Copy, PartialEq)]
pub enum Better {
    Higher,
    Lower,
    Neither,
}

pub struct Metric {
    pub label: &'static str,
    /// JSON pointers into a run, the first present one counts (runs of different kinds).
    pub ptr: &'static str,
    pub scale: f64,
    pub better: Better,
}

impl Metric {
    pub fn value(&self, run: &Value) -> Option<f64> {
        self.ptr
            .split('|')
            .find_map(|p| run.pointer(p)?.as_f64())
            .map(|v| v * self.scale)
    }
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

fn wrk() -> Vec<Metric> {
    vec![
        m("requests/s", "/wrk/rps", Higher),
        m("latency p50 ms", "/wrk/p50_ms", Lower),
        m("latency p99 ms", "/wrk/p99_ms", Lower),
        m("errors", "/wrk/errors", Lower),
        m("server CPU s", "/server/cpu_s", Lower),
    ]
}

fn pubrate() -> Vec<Metric> {
    vec![
        m("publishes/s", "/publish/rate_per_s", Higher),
        m("publish p50 ms", "/publish/latency_ms/p50", Lower),
        m("publish p99 ms", "/publish/latency_ms/p99", Lower),
        m("publish errors", "/publish/errors", Lower),
        m("lost (1 subscriber)", "/delivery/lost_total", Lower),
        m("server CPU s", "/server/cpu_publish_s", Lower),
        m("generator CPU s", "/generator/cpu_publish_s", Neither),
    ]
}

fn fanout() -> Vec<Metric> {
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

pub fn metrics_for(workload: &str) -> Vec<Metric> {
    if workload.starts_with("proxy") || workload.starts_with("publish-on") {
        wrk()
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
    } else if workload.contains("pubrate") || workload == "store-fill" {
        pubrate()
    } else if workload.starts_with("slow-reader") {
        vec![
            m("publishes/s", "/publish/rate_per_s", Higher),
            m("published", "/publish/ok", Neither),
            m("received", "/reader/received", Higher),
            m("lost", "/reader/lost", Lower),
            m("lost %", "/reader/lost_pct", Lower),
            m("lost, told", "/reader/lost_told", Neither),
            m(
                "lost, told or silent (raced)",
                "/reader/lost_ambiguous",
                Lower,
            ),
            m("lost silently", "/reader/lost_silent", Lower),
            m("duplicates", "/reader/duplicates", Lower),
            m("out of order", "/reader/out_of_order", Lower),
            m("reconnects", "/reader/reconnects", Neither),
            m("gap notices (crier.gap)", "/reader/gap_events", Neither),
            m(
                "gap resumes (Crier-Resume: gap)",
                "/reader/gap_headers",
                Neither,
            ),
            m("latency p99 ms", "/reader/latency_ms/p99", Lower),
            m("server CPU s", "/server/cpu_s", Lower),
        ]
    } else if workload == "store-restart" {
        vec![
            m("listener accepting ms", "/startup/listen_ms", Lower),
            m("resume head ms", "/startup/resume_head_ms", Lower),
            m("first resumed event ms", "/startup/first_event_ms", Lower),
            m("store file MiB", "/file_mib", Neither),
            mib("RSS after start MiB", "/server/rss_kib", Lower),
        ]
    } else if workload.starts_with("poll") {
        vec![
            m("upstream requests/s", "/upstream/per_s", Lower),
            m("upstream requests", "/upstream/requests", Lower),
            m("window s", "/upstream/window_s", Neither),
            m("clients connected", "/subs/connected", Higher),
            m("client requests/s", "/requests/per_s", Neither),
            m("client p99 ms", "/requests/latency_ms/p99", Lower),
            m("client errors", "/requests/errors", Lower),
            mib(
                "server RSS MiB",
                "/server/rss_kib|/server/connected/rss_kib",
                Lower,
            ),
        ]
    } else if workload.starts_with("ws-publish") {
        // Frames are not acknowledged: "written" is the client's side, deliveries/s the
        // publishing rate the server sustained end to end.
        let mut v = fanout();
        for x in v.iter_mut().filter(|x| x.label == "publishes/s") {
            x.label = "frames written/s";
            x.better = Neither;
        }
        v
    } else {
        let mut v = fanout();
        if workload.starts_with("mux") {
            v.insert(
                1,
                m("RSS per subscriber KiB", "/server/rss_per_sub_kib", Lower),
            );
        }
        v
    }
}

/// The server a workload is about; the report divides its figures by every other column's.
pub fn subject(workload: &str) -> &'static str {
    match workload {
        w if w.starts_with("cluster") => "crier-cluster",
        w if w.starts_with("store") => "crier-file",
        "publish-on-get" => "crier-rules10",
        "publish-on-post" => "crier-postrule",
        w if w.starts_with("poll") => "crier-poll",
        _ => "crier",
    }
}

/// Column order: the crier builds first, then the peers.
pub fn server_rank(s: &str) -> (usize, String) {
    let order = [
        "crier",
        "crier-base",
        "crier-file",
        "crier-cluster",
        "crier-rules10",
        "crier-postrule",
        "crier-poll",
        "nchan",
        "nchan-redis",
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

/// One line that says what a workload did.
pub fn describe(r: &Value) -> String {
    match r["kind"].as_str() {
        Some("proxy") => {
            let url = r["url"].as_str().unwrap_or("/");
            let path = url
                .strip_prefix("http://")
                .and_then(|u| u.find('/').map(|i| &u[i..]))
                .unwrap_or("/");
            let app = match r["tags"]["app"].as_str() {
                Some("nginx") => "nginx (return 200, 1 worker)",
                _ => "crier-loadgen upstream (1 thread)",
            };
            return format!(
                "wrk -t{} -c{} -d{}s --latency{}, {} {path} through the server to a 13-byte response from {app}",
                r["threads"],
                r["conns"],
                r["duration_s"],
                r["script"].as_str().map_or(String::new(), |s| format!(
                    " -s {}",
                    s.rsplit('/').next().unwrap_or(s)
                )),
                if r["script"].is_string() { "POST" } else { "GET" },
            );
        }
        Some("slowreader") => {
            let pace = r["read_bytes_per_sec"].as_u64().unwrap_or(0);
            return format!(
                "1 SSE reader ({}), reconnecting with Last-Event-ID; {} messages of {} B published as fast as {} connections can",
                if pace > 0 { format!("at most {pace} B/s") } else { "as fast as it can".into() },
                r["messages"],
                r["size"],
                r["pub_conns"]
            );
        }
        Some("startup") => {
            return "time from process start to the public listener accepting, and to a resume (SSE, last_event_id=earliest) answering".into()
        }
        Some("browsers") => {
            return format!(
                "{} clients polling {} every {} s through the proxy; the app's requests/s",
                r["clients"],
                r["url"].as_str().unwrap_or(""),
                r["interval_s"]
            )
        }
        _ => {}
    }
    let rate = r["rate"].as_f64().unwrap_or(0.0);
    let rate = if rate > 0.0 {
        format!("{rate}/s")
    } else {
        "as fast as possible".into()
    };
    let per_sub = r["channels_per_sub"].as_u64().unwrap_or(1);
    let nodes = r["nodes"].as_u64().unwrap_or(1);
    let spread = if nodes > 1 {
        format!(" split over {nodes} nodes")
    } else {
        String::new()
    };
    let each = if per_sub > 1 {
        format!(", {per_sub} channels each (multiplexed)")
    } else {
        String::new()
    };
    if r["messages"].as_u64() == Some(0) {
        return format!(
            "{} idle {} subscribers{spread} on {} channel(s){each}; measured after the ramp",
            r["subscribers"],
            r["transport"].as_str().unwrap_or(""),
            r["channels"]
        );
    }
    let via = if r["pub_ws"].as_bool() == Some(true) {
        "WebSocket frames"
    } else if r["pub"].as_str().unwrap_or("").starts_with("unix:") {
        "Unix socket"
    } else {
        "TCP"
    };
    format!(
        "{} {} subscribers{spread} on {} channel(s){each}; {} messages of {} B, {}, {} publish connection(s) via {via}",
        r["subscribers"],
        r["transport"].as_str().unwrap_or(""),
        r["channels"],
        r["messages"],
        r["size"],
        rate,
        r["pub_conns"].as_u64().unwrap_or(1),
    )
}
