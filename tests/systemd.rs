//! The shipped unit file passes `systemd-analyze verify` and keeps the settings the
//! operations issue asks for. CI installs the `systemd` package for this check.

use std::process::Command;

const UNIT: &str = include_str!("../systemd/crier.service");

#[test]
fn unit_file_has_the_required_settings() {
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "LimitNOFILE=1048576",
        "RuntimeDirectory=crier",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "SystemCallFilter=@system-service",
    ] {
        assert!(UNIT.lines().any(|l| l.trim() == line), "missing {line}");
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    // verify checks that ExecStart exists: point it at the binary cargo built.
    let dir = tempfile::tempdir().unwrap();
    let unit = UNIT.replace("/usr/local/bin/crier", env!("CARGO_BIN_EXE_crier"));
    let path = dir.path().join("crier.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let complaints: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("crier.service"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}
