//! Memory and CPU of a server made of one or more processes, read from /proc: the given root
//! pids and every descendant (nginx's workers, Pushpin's condure/zurl/proxy/handler).

use std::collections::{HashMap, HashSet};
use std::fs;

#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub procs: usize,
    /// Sum of VmRSS over the processes (shared pages count once per process).
    pub rss_kib: u64,
    /// Sum of Pss (shared pages split between their users): the fairer total for multi-process servers.
    pub pss_kib: u64,
    /// utime + stime of the processes, seconds.
    pub cpu_s: f64,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime+stime ticks) from /proc/PID/stat; fields after the last ')' to dodge odd names.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// The roots and all their descendants that are alive now.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        if !seen.insert(p) || fs::metadata(format!("/proc/{p}")).is_err() {
            continue;
        }
        out.push(p);
        if let Some(c) = children.get(&p) {
            todo.extend(c);
        }
    }
    out
}

fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sums memory and CPU over `roots` and their descendants.
pub fn sample(roots: &[u32]) -> Sample {
    let tck = clk_tck();
    let mut s = Sample::default();
    for pid in tree(roots) {
        let Some((_, ticks)) = stat(pid) else {
            continue;
        };
        s.procs += 1;
        s.cpu_s += ticks as f64 / tck;
        if let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) {
            s.rss_kib += kib_field(&st, "VmRSS:");
        }
        if let Ok(r) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            s.pss_kib += kib_field(&r, "Pss:");
        }
    }
    s
}

/// This process's CPU seconds (all threads).
pub fn self_cpu_s() -> f64 {
    stat(std::process::id()).map_or(0.0, |(_, t)| t as f64 / clk_tck())
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Whether a process is alive (and not a zombie waiting for its parent).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|st| st != "Z")
    })
}
