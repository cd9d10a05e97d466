#!/usr/bin/env python3
"""crier's WebRTC transport seen by a second, independent WebRTC stack: aiortc (PyPI), with
`iceServers=[]`, so the implementation is proven against str0m (tests/webrtc.rs), Chromium
(tests/e2e/webrtc.mjs) and this one.

    python3 tests/pyclient/webrtc.py     (after `cargo build`; `cargo test --test e2e` runs it too)

Makes its own venv (CRIER_PY_WEBRTC_VENV, default target/pyclient-webrtc-venv) with the pinned
webrtc-requirements.txt and re-runs itself inside it, then starts the built crier (CRIER_BIN)
on port 0 with a [webrtc] UDP socket on 127.0.0.1, and checks:

- delivery: 100 messages (multi-line, unicode, CR/CRLF, named events, JSON, binary, 10 KiB)
  over the data channel, in order, each one text crier.json envelope, byte-exact;
- resume after the peer connection is closed: a new offer with ?last_event_id= gets exactly
  the rest;
- DELETE on the Location: 204, the channel closes, crier's gauges reach 0; again: 404.

Ends with "python webrtc: N passed, N failed"; exit status 1 on any failure.
"""

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import crier_process

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REQUIREMENTS = HERE / "webrtc-requirements.txt"
SUITE_LIMIT_S = 120
TEXT = "text/plain; charset=utf-8"


def bootstrap():
    """Makes (or reuses) the venv with exactly the requirements, then re-runs this script in it."""
    if os.environ.get("CRIER_PY_IN_VENV") == "1":
        return
    venv = Path(os.environ.get("CRIER_PY_WEBRTC_VENV") or REPO / "target" / "pyclient-webrtc-venv")
    py = venv / "bin" / "python"
    stamp = venv / "crier-requirements.txt"
    want = REQUIREMENTS.read_bytes()
    if not (py.exists() and stamp.exists() and stamp.read_bytes() == want):
        if venv.exists():
            shutil.rmtree(venv)
        print(f"setup: {sys.executable} -m venv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        print(f"setup: pip install -r {REQUIREMENTS.relative_to(REPO)}", flush=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(REQUIREMENTS)],
            check=True,
            timeout=600,
        )
        stamp.write_bytes(want)
    env = {**os.environ, "CRIER_PY_IN_VENV": "1"}
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]], env)


bootstrap()

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402


class Crier:
    """The built binary with every listener on port 0; addresses read from its log lines."""

    def __init__(self, d):
        self.proc, self.log, addrs = crier_process.start(d, [
            "[server]", 'listen = ["127.0.0.1:0"]',
            "[upstream]", 'url = "http://127.0.0.1:9"', 'connect_timeout = "1s"',
            "[publish]", f'unix = "{d / "publish.sock"}"', 'listen = ["127.0.0.1:0"]',
            "[admin]", 'listen = "127.0.0.1:0"',
            "[channels]", "buffer_messages = 1000",
            "[webrtc]", 'listen = "127.0.0.1:0"', 'ice_timeout = "10s"',
        ])
        self.public, self.publish_addr, self.admin = addrs["public"], addrs["publish"], addrs["admin"]

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def http(method, url, body=b"", headers=None):
    """(status, headers, body) of one request; errors are answers too."""
    req = urllib.request.Request(url, data=body if method in ("POST", "PUT") else None,
                                 method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


async def publish(c, channel, m):
    headers = {"content-type": m["ct"]}
    if m["event"]:
        headers["crier-event"] = m["event"]
    status, _, body = await asyncio.to_thread(
        http, "POST", f"http://{c.publish_addr}/pub/{channel}", m["body"], headers)
    assert status == 201, f"publish answered {status}: {body!r}"
    return json.loads(body)["id"]


async def metric(c, sample):
    _, _, body = await asyncio.to_thread(http, "GET", f"http://{c.admin}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line[len(sample) + 1:])
    return None


async def until(what, cond, timeout=15.0):
    end = asyncio.get_running_loop().time() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def messages(n, tag):
    """Bodies of every kind; #50 is 10 KiB of multi-line unicode."""
    out = []
    for i in range(n):
        k = i % 8
        if i == 50:
            s = ""
            while len(s.encode()) < 10 * 1024:
                s += f"line {len(s)} — ünïcödé ✓ 日本 🎉\n"
            m = (s.encode(), TEXT, None)
        elif k == 0:
            m = (f"multi\nline {tag} #{i}\n".encode(), TEXT, None)
        elif k == 1:
            m = (f"ünïcödé ✓ 中文 🚀 {tag} #{i}".encode(), TEXT, None)
        elif k == 2:
            m = (f"cr {tag} #{i}\r\ncrlf above, lone CR here:\rend\r".encode(), TEXT, None)
        elif k == 3:
            m = (f"named event {tag} #{i}".encode(), TEXT, "py-note")
        elif k == 4:
            m = (json.dumps({"i": i, "tag": tag, "s": "ß"}).encode(), "application/json", None)
        elif k == 5:
            m = (bytes((j * 13 + i) % 256 for j in range(300)), "application/octet-stream", None)
        elif k == 6:
            m = (f"\n\nleading newlines, trailing space {tag} #{i} ".encode(), TEXT, None)
        else:
            m = (f"plain {tag} #{i}".encode(), TEXT, None)
        out.append({"body": m[0], "ct": m[1], "event": m[2]})
    return out


def want(sent):
    """What the data channel must carry for `sent`: the crier.json envelope's fields."""
    out = []
    for m in sent:
        try:
            out.append((m["id"], m["event"], "data", m["body"].decode("utf-8")))
        except UnicodeDecodeError:
            out.append((m["id"], m["event"], "data_b64", base64.b64encode(m["body"]).decode()))
    return out


def same(name, got, expected):
    for i, (g, w) in enumerate(zip(got, expected)):
        if g != w:
            raise AssertionError(f"{name}: message {i} differs\n  got  {repr(g)[:240]}\n  want {repr(w)[:240]}")
    if len(got) != len(expected):
        raise AssertionError(f"{name}: got {len(got)} messages, want {len(expected)}")


class Peer:
    """One aiortc peer connection with one data channel, subscribed to a crier URL."""

    def __init__(self):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.dc = self.pc.createDataChannel("crier")
        self.got = []
        self.opened = False
        self.closed = False
        self.binary = 0
        self.location = None

        @self.dc.on("open")
        def _open():
            self.opened = True

        @self.dc.on("close")
        def _close():
            self.closed = True

        @self.dc.on("message")
        def _message(m):
            if not isinstance(m, str):
                self.binary += 1
                return
            v = json.loads(m)
            kind = "data_b64" if "data_b64" in v else "data"
            self.got.append((v["id"], v.get("event"), kind, v[kind]))

    async def subscribe(self, c, path):
        await self.pc.setLocalDescription(await self.pc.createOffer())
        status, headers, body = await asyncio.to_thread(
            http, "POST", f"http://{c.public}{path}", self.pc.localDescription.sdp.encode(),
            {"content-type": "application/sdp"})
        assert status == 201, f"POST offer answered {status}: {body!r}"
        assert headers["content-type"] == "application/sdp", headers["content-type"]
        self.location = headers["location"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))
        await until("the data channel to open", lambda: self.opened)


async def main():
    results = []

    async def check(name, coro):
        try:
            await asyncio.wait_for(coro, 60)
            results.append(True)
            print(f"ok     {name}", flush=True)
        except Exception:  # noqa: BLE001 (every failure is reported the same way)
            results.append(False)
            print(f"FAILED {name}\n" + "".join("    " + l for l in traceback.format_exc().splitlines(True)), flush=True)

    with tempfile.TemporaryDirectory(prefix="crier-pywebrtc-") as d:
        c = Crier(Path(d))
        sent, peers = [], []
        try:
            async def delivery():
                p = Peer()
                peers.append(p)
                await p.subscribe(c, "/live/py")
                assert re.fullmatch(r"/live/py\?webrtc_session=[0-9a-f]{32}", p.location), p.location
                for m in messages(100, "py"):
                    sent.append({**m, "id": await publish(c, "py", m)})
                await until("100 messages", lambda: len(p.got) >= 100)
                assert p.binary == 0, "crier sends text messages only"
                same("aiortc", p.got, want(sent))

            async def resume():
                p = peers[0]
                await p.pc.close()
                async def ended():
                    return (await metric(c, 'crier_connections{transport="webrtc"}')) == 0
                # aiortc says goodbye (SCTP ABORT, DTLS close_notify): no waiting for ice_timeout.
                await until("the session to end", ended, timeout=5)
                rest = []
                for m in messages(5, "after"):
                    rest.append({**m, "id": await publish(c, "py", m)})
                q = Peer()
                peers.append(q)
                await q.subscribe(c, f"/live/py?last_event_id={sent[-1]['id']}")
                await until("the rest", lambda: len(q.got) >= 5)
                await asyncio.sleep(0.5)  # nothing more may come
                same("aiortc resume", q.got, want(rest))

            async def delete():
                q = peers[-1]
                status, _, _ = await asyncio.to_thread(http, "DELETE", f"http://{c.public}{q.location}")
                assert status == 204, status
                await until("the data channel to close", lambda: q.closed)

                async def zero():
                    return (await metric(c, 'crier_webrtc_sessions{state="open"}')) == 0 \
                        and (await metric(c, 'crier_connections{transport="webrtc"}')) == 0
                await until("the gauges to reach zero", zero)
                status, _, _ = await asyncio.to_thread(http, "DELETE", f"http://{c.public}{q.location}")
                assert status == 404, status

            await check("100 messages over an aiortc data channel, in order, byte-exact", delivery())
            await check("resume after the peer connection is closed: exactly the rest", resume())
            await check("DELETE on the Location ends the session", delete())
        finally:
            for p in peers:
                await p.pc.close()
            code = c.stop()
            if code != 0:
                results.append(False)
                print(f"FAILED crier exited {code}\n" + "\n".join(c.log[-20:]), flush=True)
    failed = results.count(False)
    print(f"python webrtc: {len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    threading.Timer(SUITE_LIMIT_S, lambda: os._exit(1)).start()
    code = asyncio.run(main())
    os._exit(code)
