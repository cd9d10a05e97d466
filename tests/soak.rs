//! The soak's short mode (issue 18, part 5): `crier-loadgen soak` against the built binary for
//! half a minute — every transport, slow readers, readers reconnecting every second with their
//! last id, publishes over many channels, proxied requests the app resets or stalls, a SIGHUP
//! every 5 s — and its verdict: nothing lost silently or twice, every reader that kept up got
//! everything, no connection lost to a reload, RSS flat after the warm-up, descriptors back to
//! their baseline, every healthy proxied request answered. `benches/soak.sh` runs the full size.

mod common;

use std::process::Command;

use common::process::CrierProcess;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn a_short_soak_with_faults_passes() {
    common::raise_fd_limit();
    let port = free_port();
    let c = CrierProcess::start(
        &format!("http://127.0.0.1:{port}"),
        "[upstream]\nread_timeout = \"2s\"\n[channels]\nbuffer_messages = 20\n\
         [[push]]\npath = \"/live/{channel}\"\nlongpoll_timeout = \"20s\"\n",
    );
    let sock = c
        .config_path
        .parent()
        .expect("config dir")
        .join("publish.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_crier-loadgen"))
        .args(["soak", "--sub-url", &c.url("/live/{channel}")])
        .args([
            "--pub-url",
            "http://127.0.0.1:9/pub/{channel}",
            "--pub-unix",
        ])
        .arg(&sock)
        .args(["--proxy-url", &c.url("")])
        .args(["--upstream-listen", &format!("127.0.0.1:{port}")])
        .args(["--pid", &c.pid().to_string()])
        .args(["--conns", "1000", "--channels", "100", "--rate", "500"])
        .args([
            "--seconds",
            "30",
            "--warmup-frac",
            "0.4",
            "--reload-every",
            "5",
        ])
        .args(["--hot-rate", "200"])
        .args(["--drain-max", "30"])
        .output()
        .expect("run crier-loadgen soak");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "the soak failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).expect("a JSON report");
    let subs = &v["subscribers"];
    assert_eq!(subs["subscribers"], 1000);
    assert!(v["reloads"].as_u64() >= Some(4), "{v}");
    assert!(
        subs["reconnects"].as_u64() > Some(50),
        "readers reconnected: {v}"
    );
    assert!(v["proxy"]["reset_answers"].as_u64() > Some(0), "{v}");
    assert!(v["proxy"]["stall_answers"].as_u64() > Some(0), "{v}");
}
