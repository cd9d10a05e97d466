//! The proxy workload: runs `wrk --latency` against a URL, samples the server's CPU and memory
//! around it, and turns wrk's text output into one JSON object.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::procstat;
use crate::push::{emit, round3, tags};

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Target URL (loopback), e.g. http://127.0.0.1:18080/
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// The wrk binary.
    #[arg(long, default_value = "wrk")]
    pub wrk: String,
    /// A wrk Lua script (e.g. one that makes every request a POST).
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Server process ids (their descendants included): the proxy and/or the upstream.
    #[arg(long)]
    pub server_pid: Vec<u32>,
    #[arg(long)]
    pub tag: Vec<String>,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `1.23ms` → milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let i = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(i);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    })
}

/// Picks the figures out of `wrk --latency` output.
pub fn parse(out: &str) -> serde_json::Value {
    let mut v = serde_json::Map::new();
    let mut in_dist = false;
    let mut errors = 0u64;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut it = t.split_whitespace();
            match (it.next(), it.next()) {
                (Some(p), Some(d)) if p.ends_with('%') => {
                    if let Some(ms) = duration_ms(d) {
                        let key =
                            format!("p{}_ms", p.trim_end_matches('%').trim_end_matches(".000"));
                        v.insert(key, json!(ms));
                    }
                    continue;
                }
                _ => in_dist = false,
            }
        }
        if let Some(r) = t.strip_prefix("Requests/sec:") {
            v.insert("rps".into(), json!(r.trim().parse::<f64>().unwrap_or(0.0)));
        } else if let Some(r) = t.strip_prefix("Socket errors:") {
            errors += r
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(r) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += r.trim().parse::<u64>().unwrap_or(0);
        } else if t.contains(" requests in ") {
            if let Some(n) = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            {
                v.insert("requests".into(), json!(n));
            }
        }
    }
    v.insert("errors".into(), json!(errors));
    serde_json::Value::Object(v)
}

pub fn run(a: ProxyArgs) -> Result<(), String> {
    crate::push::split_url(&a.url)?;
    let before = procstat::sample(&a.server_pid);
    let load_start = procstat::loadavg();
    let mut cmd = Command::new(&a.wrk);
    cmd.args([
        format!("-t{}", a.threads),
        format!("-c{}", a.conns),
        format!("-d{}s", a.duration),
        "--latency".into(),
    ]);
    if let Some(s) = &a.script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd
        .arg(&a.url)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", a.wrk))?;
    let after = procstat::sample(&a.server_pid);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v = json!({
        "kind": "proxy",
        "tags": tags(&a.tag),
        "url": a.url,
        "threads": a.threads,
        "conns": a.conns,
        "duration_s": a.duration,
        "script": a.script.as_ref().map(|s| s.display().to_string()),
        "wrk": parse(&text),
        "server": {
            "pids": a.server_pid,
            "cpu_s": round3(after.cpu_s - before.cpu_s),
            "rss_kib_end": after.rss_kib,
        },
        "load_start": load_start,
        "load_end": procstat::loadavg(),
    });
    emit(&v, a.out.as_ref());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 10s test @ http://127.0.0.1:18090/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.03ms  209.94us   6.86ms   83.35%
    Req/Sec    62.10k     2.10k   66.00k    75.00%
  Latency Distribution
     50%    0.99ms
     75%    1.10ms
     90%    1.26ms
     99%    1.80ms
  617889 requests in 10.00s, 53.62MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  61777.65
Transfer/sec:      5.36MB
";
        let v = parse(out);
        assert_eq!(v["rps"], 61777.65);
        assert_eq!(v["p99_ms"], 1.8);
        assert_eq!(v["p50_ms"], 0.99);
        assert_eq!(v["requests"], 617889);
        assert_eq!(v["errors"], 3);
    }
}
