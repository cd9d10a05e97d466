//! crier-loadgen: the benchmark harness's load generator (see benches/README.md).
//!
//! - `push`: N subscribers (SSE, WebSocket or long-poll) on one or many channels each, spread
//!   over one or more nodes, M published messages (POSTs, or WebSocket frames), and a JSON report
//!   of delivery rate, latency, loss and server memory/CPU;
//! - `slow-reader`: one SSE reader under a publish flood, with exact told/silent loss accounting;
//! - `soak`: every transport, slow and reconnecting readers, proxy faults and reloads for
//!   minutes, with exact per-subscriber accounting and a pass/fail verdict;
//! - `browsers`: clients polling a URL through the proxy (the baseline for `[[poll]]`);
//! - `startup`: time from starting a server to its listener and a resume answering;
//! - `proxy`: `wrk` against a URL, as JSON;
//! - `upstream`: a fast upstream for the proxy workload (it counts requests);
//! - `grip`: the GRIP backend that makes Pushpin hold subscribers;
//! - `report`: results.jsonl → RESULTS.md and results.json.
//!
//! Every run is bounded in count and time and targets loopback addresses only.

mod browsers;
mod gaps;
mod goals;
mod hist;
mod payload;
mod procstat;
mod publisher;
mod push;
mod rawhttp;
mod report;
mod servers;
mod slowreader;
mod soak;
mod sse;
mod startup;
mod subscriber;
mod tracker;
mod upcount;
mod workloads;
mod wrk;
mod wspub;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "crier-loadgen",
    version,
    about = "crier's benchmark load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Subscribers, publishes, and a JSON report.
    Push {
        #[command(flatten)]
        args: push::PushArgs,
        /// Generator runtime threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// One SSE reader under a publish flood: told vs silent loss.
    SlowReader {
        #[command(flatten)]
        args: slowreader::SlowArgs,
    },
    /// A bounded soak with faults: every transport, slow and reconnecting readers, publishes,
    /// proxied resets and stalls, reloads; exact accounting and a pass/fail verdict.
    Soak {
        #[command(flatten)]
        args: soak::SoakArgs,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Clients polling a URL every few seconds through the proxy.
    Browsers {
        #[command(flatten)]
        args: browsers::BrowsersArgs,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Start a server; time to its listener and to a resume answering.
    Startup(startup::StartupArgs),
    /// wrk against a URL, as JSON.
    Proxy(wrk::ProxyArgs),
    /// A fast upstream: 200 "hello, world" to everything.
    Upstream(servers::ServeArgs),
    /// Pushpin's GRIP backend.
    Grip(servers::ServeArgs),
    /// Aggregates results into RESULTS.md and results.json.
    Report(report::ReportArgs),
}

/// The open-file limit: raise the soft limit to the hard one (19,000 sockets need it).
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn block_on<F: std::future::Future<Output = Result<(), String>>>(
    threads: usize,
    f: F,
) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(f))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_nofile();
    let res: Result<(), String> = match cli.cmd {
        Cmd::Push { args, threads } => block_on(threads, push::run(args)),
        // One reader and its publishers: two threads, as the servers get.
        Cmd::SlowReader { args } => block_on(2, slowreader::run(args)),
        Cmd::Soak { args, threads } => block_on(threads, soak::run(args)),
        Cmd::Browsers { args, threads } => block_on(threads, browsers::run(args)),
        Cmd::Startup(a) => block_on(1, startup::run(a)),
        Cmd::Proxy(a) => wrk::run(a),
        Cmd::Upstream(a) => servers::upstream(a).map_err(|e| e.to_string()),
        Cmd::Grip(a) => servers::grip(a).map_err(|e| e.to_string()),
        Cmd::Report(a) => report::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crier-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
