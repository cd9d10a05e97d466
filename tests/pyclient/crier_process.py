"""The built crier binary for the Python suites (run.py, webrtc.py): started with a config on
port 0, its addresses read from its JSON log lines."""

import json
import os
import re
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

LISTENERS = [
    ("public", r"listening on http://(\S+) \(public\)$"),
    ("tls", r"listening on https://(\S+) \(public, TLS\)$"),
    ("publish", r"publish API on http://(\S+)$"),
    ("admin", r"admin on http://(\S+)"),
]


def start(d, config_lines):
    """Writes `config_lines` to d/crier.toml and starts crier (CRIER_BIN, default the debug
    build) until it logs "crier is ready". Returns (process, log lines, {listener: address})."""
    config = d / "crier.toml"
    config.write_text("\n".join(config_lines))
    bin_ = os.environ.get("CRIER_BIN") or str(REPO / "target" / "debug" / "crier")
    if not Path(bin_).exists():
        raise SystemExit(f"no crier binary at {bin_}: run `cargo build` (or set CRIER_BIN)")
    proc = subprocess.Popen(
        [bin_, "--config", str(config), "--log-format", "json"],
        env={**os.environ, "CRIER_LOG": "info"},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    log = []
    ready = threading.Event()
    addrs = {}

    def read():
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            log.append(line)
            try:
                msg = json.loads(line)["fields"]["message"]
            except (ValueError, KeyError, TypeError):
                continue
            for key, pat in LISTENERS:
                m = re.match(pat, msg)
                if m:
                    addrs[key] = m.group(1)
            if msg == "crier is ready":
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(20):
        proc.kill()
        raise SystemExit("crier did not become ready within 20 s:\n" + "\n".join(log))
    return proc, log, addrs
